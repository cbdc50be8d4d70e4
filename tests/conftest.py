"""Fixtures shared by every test: settings isolated per test, and clients of the real
NATS, Redis and PostgreSQL on this machine (REDIS_URL, NATS_URL, DATABASE_URL or the
local defaults).

Each test gets its own Redis key prefix, NATS subject prefix and JetStream stream, and
PostgreSQL schema, and they are removed afterwards, so tests never see each other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator

import pytest

from shared.connections import redis_client
from shared.settings import Settings

pytest_plugins = ["tests.servers"]  # the servers: found, else started privately


@pytest.fixture
def test_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def base_settings(test_id: str) -> Settings:
    return Settings.from_env(
        os.environ,
        key_prefix=f"test:{test_id}",
        subject_prefix=f"t{test_id}.",
        js_stream=f"T{test_id}",
        db_schema=f"t{test_id}",
        log_format="text",
    )


@pytest.fixture
async def redis(base_settings: Settings) -> AsyncIterator[object]:
    client = redis_client(base_settings.redis_url)
    yield client
    async for key in client.scan_iter(match=f"{base_settings.key_prefix}:*", count=1000):
        await client.delete(key)
    await client.aclose()


@pytest.fixture
async def nats(base_settings: Settings) -> AsyncIterator[object]:
    import nats as nats_py
    from nats.js.errors import NotFoundError

    from shared.feeds import FEED_NAMES, js_stream_name

    nc = await nats_py.connect(base_settings.nats_url)
    yield nc
    base = base_settings.js_stream
    for stream in (base, *(js_stream_name(base, feed) for feed in FEED_NAMES)):
        try:
            await nc.jetstream().delete_stream(stream)
        except NotFoundError:
            pass
    await nc.drain()


@pytest.fixture
async def pg(base_settings: Settings) -> AsyncIterator[object]:
    import asyncpg

    conn = await asyncpg.connect(base_settings.database_url)
    yield conn
    await conn.execute(f'DROP SCHEMA IF EXISTS "{base_settings.db_schema}" CASCADE')
    await conn.close()
