"""The ingestor's settings: the shared ones plus its JetStream consumer, batching and limits.

FANOUT_DEDUP_TTL (default 15m) bounds the dedup keys' memory in Redis. It needs to cover
only the redelivery window: JetStream redelivers an unacked message after the ack wait,
so a redelivery of a message Redis already holds comes within FANOUT_JS_ACK_WAIT x the
deliveries it takes (a few, unless the ingestor keeps crashing on it), or when a
consumer is recreated and replays the stream. Anything later is dropped by the second
guard of the Lua script: its seq is at or below the top of the feed's Redis stream (the
stream's last-generated id, which trimming does not lower). So an expired key never
lets a message in twice; it only spares Redis ~100 bytes per message held for a day.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import (
    Settings,
    SettingsError,
    parse_duration,
    parse_host_port,
    require_positive,
    setting,
)

MIB = 1024 * 1024


def _positive_int(text: str) -> int:
    if not text.strip().lstrip("-").isdigit():
        raise ValueError("expected a whole number")
    value = int(text)
    if value < 1:
        raise ValueError("expected a number of at least 1")
    return value


@dataclass(frozen=True)
class IngestorSettings(Settings):
    js_consumer: str = setting("FANOUT_JS_CONSUMER", "ingestor", "durable JetStream pull consumer name")
    js_max_age: float = setting(
        "FANOUT_JS_MAX_AGE", 24 * 3600.0, "how long JetStream keeps a message", parse_duration
    )
    js_replicas: int = setting(
        "FANOUT_JS_REPLICAS",
        1,
        "replicas of the JetStream stream, used only when the ingestor creates it; an existing "
        "stream keeps its replica count (change it with `nats stream edit`)",
        _positive_int,
    )
    js_ack_wait: float = setting(
        "FANOUT_JS_ACK_WAIT", 30.0, "how long JetStream waits for an ack before redelivering", parse_duration
    )
    dedup_ttl: float = setting(
        "FANOUT_DEDUP_TTL",
        15 * 60.0,
        "how long a message id is remembered in Redis to drop redeliveries (the redelivery window); "
        "a later redelivery is still dropped by its seq (at or below the stream's top)",
        parse_duration,
    )
    batch: int = setting("FANOUT_INGEST_BATCH", 1000, "messages fetched and written per batch", _positive_int)
    max_payload: int = setting(
        "FANOUT_MAX_PAYLOAD",
        MIB,
        "largest payload in bytes; a larger one keeps its seq as a malformed entry",
        _positive_int,
    )
    http: tuple[str, int] = setting(
        "FANOUT_INGEST_HTTP",
        ("127.0.0.1", 9101),
        "HOST:PORT of /healthz /readyz /metrics; if the port is taken (another ingestor on this host), "
        "a free port is used and logged (port 0: always a free port)",
        parse_host_port,
    )

    def validate(self) -> None:
        super().validate()
        require_positive(
            {
                "FANOUT_JS_MAX_AGE": self.js_max_age,
                "FANOUT_JS_ACK_WAIT": self.js_ack_wait,
                "FANOUT_DEDUP_TTL": self.dedup_ttl,
            }
        )
        if self.batch < 1:
            raise SettingsError(f"FANOUT_INGEST_BATCH={self.batch}: expected a number of at least 1")
        if self.max_payload < 1:
            raise SettingsError(f"FANOUT_MAX_PAYLOAD={self.max_payload}: expected a number of at least 1")
