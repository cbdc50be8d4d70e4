"""Clients for the three servers, configured the same way in every service."""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

# redis-py 8 defaults to a 5 s socket timeout; a blocking XREAD/XREADGROUP must
# always return before the socket gives up, so keep this well above any BLOCK.
REDIS_SOCKET_TIMEOUT = 30.0
MAX_BLOCK_MS = 5_000


def read_retry(retries: int = 2) -> Retry:
    """A command that met a dead pooled connection ("Connection closed by server": the
    server restarted since the connection was last used) is sent again, on the same
    connection object reconnected, after 50-500 ms of jittered backoff, `retries` times.

    Only for clients whose commands are safe to send twice (reads, or idempotent writes):
    after a connection error the first send may have run. Timeouts are not retried (a
    timed-out command waited REDIS_SOCKET_TIMEOUT already). Redis really down costs a
    caller about a second more before its ConnectionError.
    """
    return Retry(
        ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries, supported_errors=(RedisConnectionError,)
    )


def redis_client(url: str, *, decode_responses: bool = False, retry: Retry | None = None) -> Redis:
    """`retry`: None (the default) sends each command once, as redis-py does for a client
    built from a URL, and lets the caller's own loop decide; see read_retry()."""
    options: dict[str, Any] = {} if retry is None else {"retry": retry}
    return Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=5.0,
        health_check_interval=15,
        **options,
    )
