"""The gateway's settings: the common ones plus HTTP, access, and per-subscriber limits."""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import Settings, SettingsError, parse_duration, parse_milliseconds, setting


@dataclass(frozen=True)
class GatewaySettings(Settings):
    gateway_host: str = setting("FANOUT_GATEWAY_HOST", "127.0.0.1", "address the gateway listens on")
    gateway_port: int = setting("FANOUT_GATEWAY_PORT", 8000, "port the gateway listens on (0: a free port)")
    tokens: str = setting(
        "FANOUT_TOKENS",
        "",
        "access tokens and their feeds, `TOKEN=execution+sport_event;TOKEN2=execution` "
        "(`*` for all feeds); empty: everyone may read every feed",
    )
    ticket_ttl: float = setting(
        "FANOUT_TICKET_TTL", 30.0, "lifetime of a single-use stream ticket", parse_duration
    )
    cors_origins: str = setting(
        "FANOUT_CORS_ORIGINS", "", "origins allowed by CORS, comma-separated (`*` for any); empty: none"
    )
    max_subscribers: int = setting(
        "FANOUT_MAX_SUBSCRIBERS", 10_000, "concurrent stream subscribers per process (503 past it)"
    )
    heartbeat: float = setting(
        "FANOUT_HEARTBEAT", 15.0, "interval of the `:` heartbeat comments on an idle stream", parse_duration
    )
    retry_ms: int = setting(
        "FANOUT_RETRY_MS",
        2000,
        "the `retry:` reconnection hint sent to clients: a duration (2s) or bare milliseconds (2000)",
        parse_milliseconds,
    )
    client_buffer: int = setting(
        "FANOUT_CLIENT_BUFFER",
        2000,
        "events buffered for a live subscriber; past it the subscriber drops to catch-up (reads history "
        "on its own) and rejoins the live stream later",
    )
    client_buffer_bytes: int = setting(
        "FANOUT_CLIENT_BUFFER_BYTES",
        4 * 1024 * 1024,
        "bytes buffered for a live subscriber (with FANOUT_CLIENT_BUFFER, whichever is reached first); "
        "past it the subscriber drops to catch-up",
    )
    catchup_batch: int = setting(
        "FANOUT_CATCHUP_BATCH", 500, "entries read per Redis XRANGE or Postgres query while catching up"
    )
    slow_client_timeout: float = setting(
        "FANOUT_SLOW_CLIENT_TIMEOUT",
        60.0,
        "a subscriber that fell behind (buffer overflow) and has not caught up within this time, or "
        "a write stalled this long, is disconnected (it can resume with its last id)",
        parse_duration,
    )
    reader_batch: int = setting(
        "FANOUT_READER_BATCH", 1000, "entries per XREAD of the shared per-feed reader"
    )
    reader_block: float = setting(
        "FANOUT_READER_BLOCK",
        2.0,
        "XREAD BLOCK time of the shared reader (below the Redis socket timeout)",
        parse_duration,
    )
    history_connections: int = setting(
        "FANOUT_HISTORY_CONNECTIONS",
        16,
        "Redis connections shared by the subscribers reading history (catch-up); more concurrent "
        "catch-ups wait their turn",
    )
    db_pool_size: int = setting(
        "FANOUT_DB_POOL_SIZE", 4, "PostgreSQL connections for history reads (opened on first need)"
    )
    shutdown_grace: float = setting(
        "FANOUT_SHUTDOWN_GRACE", 5.0, "time given to streams to end on shutdown", parse_duration
    )

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.gateway_port <= 65535:
            raise SettingsError(f"FANOUT_GATEWAY_PORT={self.gateway_port}: expected 0..65535")
        for env, value, low in (
            ("FANOUT_MAX_SUBSCRIBERS", self.max_subscribers, 1),
            ("FANOUT_RETRY_MS", self.retry_ms, 0),
            ("FANOUT_CLIENT_BUFFER", self.client_buffer, 1),
            ("FANOUT_CLIENT_BUFFER_BYTES", self.client_buffer_bytes, 1024),
            ("FANOUT_CATCHUP_BATCH", self.catchup_batch, 1),
            ("FANOUT_READER_BATCH", self.reader_batch, 1),
            ("FANOUT_DB_POOL_SIZE", self.db_pool_size, 1),
            ("FANOUT_HISTORY_CONNECTIONS", self.history_connections, 1),
        ):
            if value < low:
                raise SettingsError(f"{env}={value}: expected at least {low}")
        if self.heartbeat <= 0:
            raise SettingsError(f"FANOUT_HEARTBEAT={self.heartbeat}: expected a positive duration")
        if not 0 < self.reader_block < 25:
            raise SettingsError(
                f"FANOUT_READER_BLOCK={self.reader_block}: expected a duration above 0 and below 25s "
                "(the Redis socket timeout is 30s)"
            )

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]
