"""The archiver's settings: the shared ones plus its consumer group, batching, recovery
and trimming.

FANOUT_ARCHIVE_LINGER (default 1s): at the upstream rate (a few messages a second per
feed) every read would bring one entry, and storing it costs a PostgreSQL commit and a
few round trips, most of the archiver's idle CPU. A read that brings less than a batch
(the stream is caught up) waits this long, then takes what came meanwhile, so a trickle
is committed a few entries at a time (at 3 msg/s, about 4 per commit). A read that fills
a batch (a backlog) is stored at once: throughput is unchanged, and the archive lag
grows by at most the linger. Bounded
(MAX_LINGER), and cut to half of FANOUT_ARCHIVE_CLAIM_IDLE (`linger_s`), so that entries
held while lingering are never claimed as idle by another archiver.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from shared.connections import MAX_BLOCK_MS
from shared.settings import (
    Replaced,
    Settings,
    SettingsError,
    format_duration,
    parse_duration,
    parse_host_port,
    parse_milliseconds,
    require_positive,
    setting,
)

MAX_LINGER = 5.0  # seconds: a longer linger would only delay the catalogue


@dataclass(frozen=True)
class ArchiverSettings(Settings):
    archive_group: str = setting("FANOUT_ARCHIVE_GROUP", "archiver", "Redis consumer group of the archivers")
    consumer: str = setting(
        "FANOUT_ARCHIVE_CONSUMER", "", "this archiver's consumer name in the group (default: hostname-pid)"
    )
    batch: int = setting("FANOUT_ARCHIVE_BATCH", 2000, "entries read and stored per batch")
    workers: int = setting(
        "FANOUT_ARCHIVE_WORKERS", 2, "batches of a feed read and stored side by side (1: one at a time)"
    )
    block_ms: int = setting(
        "FANOUT_ARCHIVE_BLOCK_MS",
        2000,
        f"XREADGROUP block time: a duration (2s) or bare milliseconds (2000), at most {MAX_BLOCK_MS}ms",
        parse_milliseconds,
    )
    linger: float = setting(
        "FANOUT_ARCHIVE_LINGER",
        1.0,
        "when a read brings less than a batch, wait this long for more entries before storing them "
        "(fewer commits at a low rate; a full batch is stored at once), at most "
        f"{format_duration(MAX_LINGER)} and half of FANOUT_ARCHIVE_CLAIM_IDLE (0: store each read at once)",
        parse_duration,
    )
    claim_idle: float = setting(
        "FANOUT_ARCHIVE_CLAIM_IDLE",
        60.0,
        "claim entries pending longer than this from other (dead) consumers, and retry failed ones",
        parse_duration,
    )
    max_deliveries: int = setting(
        "FANOUT_ARCHIVE_MAX_DELIVERIES",
        5,
        "deliveries of an entry that cannot be stored before it is dead-lettered",
    )
    retention: float = setting(
        "FANOUT_RETENTION",
        900.0,
        "the hot window: keep archived stream entries this long (by broker_time) before trimming them",
        parse_duration,
    )
    maxlen: int = setting(
        "FANOUT_STREAM_MAXLEN",
        1_000_000,
        "also trim archived entries beyond this stream length (0: no length limit)",
    )
    trim_interval: float = setting(
        "FANOUT_ARCHIVE_TRIM_INTERVAL",
        10.0,
        "how often to trim the streams and measure the lag",
        parse_duration,
    )
    http: tuple[str, int] = setting(
        "FANOUT_ARCHIVE_HTTP",
        ("127.0.0.1", 9102),
        "HOST:PORT of /healthz /readyz /metrics; if the port is taken (another archiver on this host), "
        "a free port is used and logged (port 0: always a free port)",
        parse_host_port,
    )

    # The flag was --group; --archive-group is the name `fanout status` and `fanout audit` use.
    replaced = (Replaced(None, "--group", "archive_group", "NAME"),)

    def validate(self) -> None:
        super().validate()
        if not self.archive_group:
            raise SettingsError("FANOUT_ARCHIVE_GROUP: must not be empty")
        if self.batch < 1:
            raise SettingsError(f"FANOUT_ARCHIVE_BATCH={self.batch}: expected at least 1")
        if self.workers < 1:
            raise SettingsError(f"FANOUT_ARCHIVE_WORKERS={self.workers}: expected at least 1")
        if not 1 <= self.block_ms <= MAX_BLOCK_MS:
            raise SettingsError(
                f"FANOUT_ARCHIVE_BLOCK_MS={format_duration(self.block_ms / 1000)}: expected 1ms to "
                f"{format_duration(MAX_BLOCK_MS / 1000)}"
            )
        require_positive(
            {"FANOUT_ARCHIVE_CLAIM_IDLE": self.claim_idle, "FANOUT_ARCHIVE_TRIM_INTERVAL": self.trim_interval}
        )
        if not 0 <= self.linger <= MAX_LINGER:
            raise SettingsError(
                f"FANOUT_ARCHIVE_LINGER={format_duration(self.linger)}: expected 0s to "
                f"{format_duration(MAX_LINGER)}"
            )
        if self.max_deliveries < 1:
            raise SettingsError(f"FANOUT_ARCHIVE_MAX_DELIVERIES={self.max_deliveries}: expected at least 1")
        if self.retention < 0:
            raise SettingsError(
                f"FANOUT_RETENTION={format_duration(self.retention)}: expected a duration of 0 or more"
            )
        if self.maxlen < 0:
            raise SettingsError(f"FANOUT_STREAM_MAXLEN={self.maxlen}: expected 0 (no limit) or a length")

    @property
    def linger_s(self) -> float:
        """The linger in effect: never more than half the claim idle time."""
        return min(self.linger, self.claim_idle / 2)

    @property
    def consumer_name(self) -> str:
        return self.consumer or f"{socket.gethostname()}-{os.getpid()}"
