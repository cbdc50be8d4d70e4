"""The gateway's settings: the common ones plus HTTP, access, and per-subscriber limits."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shared.settings import (
    Replaced,
    Settings,
    SettingsError,
    format_duration,
    format_host_port,
    parse_bool,
    parse_duration,
    parse_host_port,
    parse_milliseconds,
    require_positive,
    setting,
)

# The two settings FANOUT_GATEWAY_LISTEN replaced, refused with its name by every command
# that reads it (`fanout gateway`, and `fanout up`, which passes it on to the gateway).
LISTEN_REPLACED = (
    Replaced("FANOUT_GATEWAY_HOST", "--gateway-host", "gateway_listen", "HOST:PORT"),
    Replaced("FANOUT_GATEWAY_PORT", "--gateway-port", "gateway_listen", "HOST:PORT"),
)


@dataclass(frozen=True)
class GatewaySettings(Settings):
    gateway_listen: tuple[str, int] = setting(
        "FANOUT_GATEWAY_LISTEN",
        ("127.0.0.1", 8000),
        "HOST:PORT the gateway serves the feeds on (IPv6: [::1]:8000; port 0: a free port)",
        parse_host_port,
    )
    workers: int = setting(
        "FANOUT_GATEWAY_WORKERS",
        0,
        "worker processes serving the port, each with its own feed readers; a dead one is replaced "
        "(0: one per core; 1: a single process, no supervisor)",
    )
    gateway_ops: tuple[str, int] = setting(
        "FANOUT_GATEWAY_OPS",
        ("127.0.0.1", 9103),
        "HOST:PORT of the ops endpoints /metrics /healthz /readyz, never served on the public port; if "
        "the port is taken (another gateway on this host), a free port is used and logged (port 0: always "
        "a free port)",
        parse_host_port,
    )
    tokens: str = setting(
        "FANOUT_TOKENS",
        "",
        "access tokens and their feeds, `TOKEN=execution+sport_event;TOKEN2=execution` "
        "(`*` for all feeds); with no JWT key either, everyone may read every feed (only on localhost)",
    )
    tokens_file: str = setting(
        "FANOUT_TOKENS_FILE", "", "a file holding FANOUT_TOKENS (a mounted secret), instead of the variable"
    )
    jwt_secret: str = setting(
        "FANOUT_JWT_SECRET", "", "HS256 secret (at least 32 bytes) of the JWTs accepted; empty: no HS256"
    )
    jwt_secret_file: str = setting("FANOUT_JWT_SECRET_FILE", "", "a file holding FANOUT_JWT_SECRET")
    jwt_public_key: str = setting(
        "FANOUT_JWT_PUBLIC_KEY",
        "",
        "PEM public key of the JWTs accepted: RSA (RS256) or P-256 EC (ES256); empty: none",
    )
    jwt_public_key_file: str = setting(
        "FANOUT_JWT_PUBLIC_KEY_FILE", "", "a file holding FANOUT_JWT_PUBLIC_KEY"
    )
    jwt_jwks: str = setting(
        "FANOUT_JWT_JWKS",
        "",
        'JSON Web Key Set ({"keys": [...]}) of the JWTs accepted, RS256/ES256 keys picked by `kid`; '
        "empty: none",
    )
    jwt_jwks_file: str = setting("FANOUT_JWT_JWKS_FILE", "", "a file holding FANOUT_JWT_JWKS")
    jwt_audience: str = setting(
        "FANOUT_JWT_AUDIENCE", "", "the `aud` a JWT must name; empty: `aud` is not checked"
    )
    jwt_issuer: str = setting("FANOUT_JWT_ISSUER", "", "the `iss` a JWT must carry; empty: not checked")
    jwt_leeway: float = setting(
        "FANOUT_JWT_LEEWAY", 30.0, "clock skew allowed when checking a JWT's exp, nbf and iat", parse_duration
    )
    allow_open: bool = setting(
        "FANOUT_ALLOW_OPEN",
        False,
        "with no token and no JWT key configured, serve every feed to everyone even when listening beyond "
        "localhost (behind an authenticating proxy); off: the gateway refuses to start open there",
        parse_bool,
    )
    ticket_ttl: float = setting(
        "FANOUT_TICKET_TTL", 30.0, "lifetime of a single-use stream ticket", parse_duration
    )
    cors_origins: str = setting(
        "FANOUT_CORS_ORIGINS", "", "origins allowed by CORS, comma-separated (`*` for any); empty: none"
    )
    max_subscribers: int = setting(
        "FANOUT_MAX_SUBSCRIBERS",
        10_000,
        "concurrent stream subscribers, all workers together (503 past it)",
    )
    heartbeat: float = setting(
        "FANOUT_HEARTBEAT", 15.0, "interval of the `:` heartbeat comments on an idle stream", parse_duration
    )
    retry_ms: int = setting(
        "FANOUT_RETRY_MS",
        2000,
        "the `retry:` reconnection hint sent to clients, plus up to 50% at random per stream so that a "
        "crowd dropped at once does not come back at once: a duration (2s) or bare milliseconds (2000)",
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
    hub_recent: int = setting(
        "FANOUT_HUB_RECENT",
        4000,
        "records per feed the hub keeps of what it last sent (the last N seqs), so that a subscriber "
        "that resumes (a reconnect, a restarted gateway) within them catches up from memory instead of "
        "reading Redis; about 5 s at 800 msg/s per feed, ~1.5 KB each (0: none, every catch-up reads "
        "Redis)",
    )
    db_pool_size: int = setting(
        "FANOUT_DB_POOL_SIZE", 4, "PostgreSQL connections for history reads (opened on first need)"
    )
    shutdown_grace: float = setting(
        "FANOUT_SHUTDOWN_GRACE", 5.0, "time given to streams to end on shutdown", parse_duration
    )

    replaced = LISTEN_REPLACED

    def validate(self) -> None:
        super().validate()
        for env, value, low in (
            ("FANOUT_GATEWAY_WORKERS", self.workers, 0),
            ("FANOUT_MAX_SUBSCRIBERS", self.max_subscribers, 1),
            ("FANOUT_RETRY_MS", self.retry_ms, 0),
            ("FANOUT_CLIENT_BUFFER", self.client_buffer, 1),
            ("FANOUT_CLIENT_BUFFER_BYTES", self.client_buffer_bytes, 1024),
            ("FANOUT_CATCHUP_BATCH", self.catchup_batch, 1),
            ("FANOUT_READER_BATCH", self.reader_batch, 1),
            ("FANOUT_DB_POOL_SIZE", self.db_pool_size, 1),
            ("FANOUT_HISTORY_CONNECTIONS", self.history_connections, 1),
            ("FANOUT_HUB_RECENT", self.hub_recent, 0),
        ):
            if value < low:
                raise SettingsError(f"{env}={value}: expected at least {low}")
        require_positive(
            {
                "FANOUT_HEARTBEAT": self.heartbeat,
                "FANOUT_TICKET_TTL": self.ticket_ttl,
                "FANOUT_SLOW_CLIENT_TIMEOUT": self.slow_client_timeout,
            }
        )
        if not self.allow_open and not self.has_credentials and not _loopback(self.gateway_listen[0]):
            raise SettingsError(
                f"FANOUT_GATEWAY_LISTEN={format_host_port(*self.gateway_listen)} with no credential "
                "configured would serve every "
                "feed to everyone: set FANOUT_TOKENS (or FANOUT_TOKENS_FILE) or a JWT key "
                "(FANOUT_JWT_SECRET, FANOUT_JWT_PUBLIC_KEY or FANOUT_JWT_JWKS, or their _FILE), listen on "
                "127.0.0.1, or set FANOUT_ALLOW_OPEN=true"
            )
        if self.jwt_leeway < 0:
            raise SettingsError(
                f"FANOUT_JWT_LEEWAY={format_duration(self.jwt_leeway)}: expected a duration of 0 or more"
            )
        if not 0 < self.reader_block < 25:
            raise SettingsError(
                f"FANOUT_READER_BLOCK={format_duration(self.reader_block)}: expected a duration above 0 "
                "and below 25s "
                "(the Redis socket timeout is 30s)"
            )

    @property
    def has_credentials(self) -> bool:
        """Whether any static token or JWT key is configured (inline or as a file)."""
        return any(
            value.strip()
            for value in (
                self.tokens,
                self.tokens_file,
                self.jwt_secret,
                self.jwt_secret_file,
                self.jwt_public_key,
                self.jwt_public_key_file,
                self.jwt_jwks,
                self.jwt_jwks_file,
            )
        )

    def listen_url(self, port: int | None = None) -> str:
        """`http://HOST:PORT` of FANOUT_GATEWAY_LISTEN (an IPv6 host in brackets); `port`: the
        one its port 0 became."""
        host, listen_port = self.gateway_listen
        return "http://" + format_host_port(host, listen_port if port is None else port)

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
