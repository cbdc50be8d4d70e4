"""The archiver's settings: the shared ones plus its consumer group, batching, recovery
and trimming."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from shared.connections import MAX_BLOCK_MS
from shared.settings import (
    Settings,
    SettingsError,
    format_duration,
    parse_duration,
    parse_host_port,
    parse_milliseconds,
    require_positive,
    setting,
)


@dataclass(frozen=True)
class ArchiverSettings(Settings):
    group: str = setting("FANOUT_ARCHIVE_GROUP", "archiver", "Redis consumer group of the archivers")
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

    def validate(self) -> None:
        super().validate()
        if not self.group:
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
        if self.max_deliveries < 1:
            raise SettingsError(f"FANOUT_ARCHIVE_MAX_DELIVERIES={self.max_deliveries}: expected at least 1")
        if self.retention < 0:
            raise SettingsError(
                f"FANOUT_RETENTION={format_duration(self.retention)}: expected a duration of 0 or more"
            )
        if self.maxlen < 0:
            raise SettingsError(f"FANOUT_STREAM_MAXLEN={self.maxlen}: expected 0 (no limit) or a length")

    @property
    def consumer_name(self) -> str:
        return self.consumer or f"{socket.gethostname()}-{os.getpid()}"
