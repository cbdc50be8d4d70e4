"""Clients for the three servers, configured the same way in every service."""

from __future__ import annotations

from redis.asyncio import Redis

# redis-py 8 defaults to a 5 s socket timeout; a blocking XREAD/XREADGROUP must
# always return before the socket gives up, so keep this well above any BLOCK.
REDIS_SOCKET_TIMEOUT = 30.0
MAX_BLOCK_MS = 5_000


def redis_client(url: str, *, decode_responses: bool = False) -> Redis:
    return Redis.from_url(
        url,
        decode_responses=decode_responses,
        socket_timeout=REDIS_SOCKET_TIMEOUT,
        socket_connect_timeout=5.0,
        health_check_interval=15,
    )
