"""The gateway when its Redis goes away (a private redis-server, never the shared one):
killed and restarted with its data, live subscribers go on with no gap and no duplicate;
restarted empty (data lost) and refilled with the same ids (as the ingestor does from
JetStream), they go on exactly too, with no notice: positions come from JetStream."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fanout.servers import RedisServer
from services.sse_gateway.settings import GatewaySettings
from shared.connections import redis_client
from shared.settings import Settings
from tests.integration.test_gateway_helpers import EPOCH, Writer, inprocess_gateway, open_stream

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]


@pytest.fixture
async def private_redis(tmp_path: Path) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    yield server
    await asyncio.to_thread(server.stop)


@pytest.fixture
def settings(base_settings: Settings, private_redis: RedisServer) -> GatewaySettings:
    return GatewaySettings.from_env(
        os.environ,
        redis_url=private_redis.url,
        key_prefix=base_settings.key_prefix,
        db_schema=base_settings.db_schema,
        tokens="",
        reader_block=0.5,
    )


async def ready(port: int) -> int:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as r:
        return r.status


async def reader_failing(port: int, feed: str, within: float = 30.0) -> None:
    """Until /readyz says the feed's reader is failing: the gateway knows Redis is gone
    (a ping fails at once; the reader finds out when its blocked XREAD fails)."""
    async with asyncio.timeout(within), aiohttp.ClientSession() as http:
        while True:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status == 503 and (await r.json())["checks"][f"reader:{feed}"] == "failing":
                    return
            await asyncio.sleep(0.05)


async def test_redis_killed_and_restarted_with_its_data_live_streams_go_on_exactly(
    settings: GatewaySettings, private_redis: RedisServer
) -> None:
    redis: Any = redis_client(settings.redis_url)
    try:
        await Writer(redis, settings.key_prefix).append("execution", 5)
        async with inprocess_gateway(settings) as app:
            s = await open_stream(app.state.port, "feeds=execution&from=earliest")
            await s.collect(5)
            await asyncio.to_thread(private_redis.kill)
            assert await ready(app.state.port) == 503
            await reader_failing(app.state.port, "execution")
            # Redis really down, and the gateway knows (until its reader fails, a new viewer
            # starts at the reader's position and waits for Redis): curl gets a 503; an
            # EventSource a 200 that says so and ends (after a 503 it would never reconnect).
            down = await open_stream(app.state.port, "feeds=execution", accept="*/*")
            assert (down.status, json.loads(down.body)["error"]) == (503, "redis unavailable")
            assert down.headers["retry-after"] == "2"
            es = await open_stream(app.state.port, "feeds=execution")
            assert es.status == 200
            assert (await es.rest()).startswith(b'retry: 2000\n\n: unavailable {"error":"redis unavailable"')
            await asyncio.to_thread(private_redis.start)
            await redis.aclose()
            redis = redis_client(settings.redis_url)
            writer = Writer(redis, settings.key_prefix)
            writer.top["execution"] = 5
            await writer.append("execution", 5)
            events = await s.collect(5, within=60)
            s.close()
        assert [e.json()["seq"] for e in s.events if e.event == "execution"] == list(range(1, 11))
        assert not [e for e in s.events if e.event in ("gap", "reset")]
        assert events[-1].json()["message_id"] == f"{EPOCH}.10"
    finally:
        await redis.aclose()


async def test_redis_restarted_empty_and_refilled_is_invisible_to_live_subscribers(
    settings: GatewaySettings, private_redis: RedisServer
) -> None:
    redis: Any = redis_client(settings.redis_url)
    try:
        writer = Writer(redis, settings.key_prefix)
        await writer.append("execution", 4)
        async with inprocess_gateway(settings) as app:
            s = await open_stream(app.state.port, "feeds=execution&from=earliest")
            await s.collect(4)
            await asyncio.to_thread(private_redis.kill)
            shutil.rmtree(private_redis.data_dir)  # the data is lost
            await asyncio.to_thread(private_redis.start)
            await redis.aclose()
            redis = redis_client(settings.redis_url)
            refill = Writer(redis, settings.key_prefix)
            refill.top, refill.written = writer.top, writer.written
            await refill.refill("execution", 1)  # nothing archived: from the first seq, same ids
            await refill.append("execution", 3)
            await s.collect(3, within=60)
            s.close()
        named = [e for e in s.events if e.event]
        assert [e.event for e in named] == ["execution"] * 7
        assert [e.json()["message_id"] for e in named] == refill.expected("execution")
        assert named[-1].id == f"v2:execution.{EPOCH}.7"
    finally:
        await redis.aclose()


async def test_new_subscriber_right_after_a_redis_restart_gets_its_stream(
    settings: GatewaySettings, private_redis: RedisServer
) -> None:
    """Pooled connections of the gateway went stale with the restart; Redis is back, so
    the first new subscriber must get 200 and its events, not a 503 from a dead socket."""
    redis: Any = redis_client(settings.redis_url)
    try:
        await Writer(redis, settings.key_prefix).append("execution", 5)
        async with inprocess_gateway(settings) as app:
            # Warm the history pool: a few streams at once, so several pooled connections exist.
            warm = [await open_stream(app.state.port, "feeds=execution&from=earliest") for _ in range(3)]
            for s in warm:
                await s.collect(5)
                s.close()
            await asyncio.to_thread(private_redis.kill)
            await asyncio.to_thread(private_redis.start)  # same port, same data (its AOF/RDB)
            for attempt in range(3):  # each one on a different stale pooled connection
                s = await open_stream(app.state.port, "feeds=execution&from=earliest")
                assert s.status == 200, (attempt, s.body)
                events = await s.collect(5, within=30)
                s.close()
                assert [e.json()["seq"] for e in events] == [1, 2, 3, 4, 5]
    finally:
        await redis.aclose()
