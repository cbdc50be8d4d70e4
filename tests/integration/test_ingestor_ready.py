"""The ingestor's /readyz after a Redis outage: green as soon as Redis answers again.

The Redis check pings through the shared pool, which still holds the connection that
died with the outage; that one failure must not turn /readyz red while ingestion works
(found by the fault suite: one red probe after every Redis restart)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fanout.servers import RedisServer
from services.ingestor.consumer import Ingestor
from shared.connections import redis_client
from shared.settings import Settings
from tests.integration.test_ingestor import ingestor_settings


async def test_readyz_is_green_on_the_first_probe_after_redis_restarted(
    base_settings: Settings, tmp_path: Path
) -> None:
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    try:
        redis = redis_client(server.url)
        ingestor = Ingestor(ingestor_settings(base_settings, redis_url=server.url), redis, asyncio.Event())
        assert await ingestor.redis_ready()  # the pool now holds a connection
        await asyncio.to_thread(server.restart)  # ...which dies with this Redis
        assert await ingestor.redis_ready()
        await redis.aclose()
    finally:
        await asyncio.to_thread(server.stop)
