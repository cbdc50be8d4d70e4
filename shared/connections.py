"""Clients for the three servers, configured the same way in every service."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

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


async def create_database_if_missing(url: str, *, connect_timeout: float = 10.0) -> bool:
    """Create the database that the PostgreSQL `url` names if the server lacks it, through
    the server's maintenance database `postgres`; True if it was created here. Whoever needs
    the catalogue first (the archiver, `fanout up`, the test session) calls it, so a fresh
    server works with the default URL. Connection errors propagate."""
    import asyncpg

    try:
        conn = await asyncpg.connect(url, timeout=connect_timeout)
    except asyncpg.InvalidCatalogNameError:
        pass  # the database does not exist: create it below
    else:
        await conn.close()
        return False
    name = unquote(urlsplit(url).path.lstrip("/"))
    if not name:
        return False  # no database named: the server's default (the user's name) is used
    admin = await asyncpg.connect(url, database="postgres", timeout=connect_timeout)
    try:
        await admin.execute(f'CREATE DATABASE "{name.replace(chr(34), chr(34) * 2)}"')
    except (asyncpg.DuplicateDatabaseError, asyncpg.UniqueViolationError):
        return False  # another process created it meanwhile (a race can surface as either)
    finally:
        await admin.close()
    return True
