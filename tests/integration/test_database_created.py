"""The catalogue's database is created by whoever needs it first: the archiver at start,
`fanout up` (and the test session, through the same helper)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest

from fanout.up import Up, UpSettings
from services.archiver.store import Store
from shared.connections import create_database_if_missing
from shared.settings import Settings


@pytest.fixture
async def new_database_url(base_settings: Settings, test_id: str) -> AsyncIterator[str]:
    """A URL on the session's PostgreSQL naming a database that does not exist yet."""
    name = f"fanout_t{test_id}"
    admin = await asyncpg.connect(base_settings.database_url)
    try:
        base = base_settings.database_url.rsplit("/", 1)[0]
        yield f"{base}/{name}"
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def test_the_archiver_creates_a_missing_database_then_migrates(
    new_database_url: str, base_settings: Settings
) -> None:
    with pytest.raises(asyncpg.InvalidCatalogNameError):
        await asyncpg.connect(new_database_url)
    store = Store(new_database_url, base_settings.db_schema, pool_size=1)
    await store.open()
    try:
        async with store.connection() as conn:
            table = f"{base_settings.db_schema}.execution"
            assert await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table)
    finally:
        await store.close()
    assert await create_database_if_missing(new_database_url) is False  # there now: nothing to do


async def test_fanout_up_creates_a_missing_database(new_database_url: str) -> None:

    up = Up(UpSettings.from_env({}), {"nats_url": False, "redis_url": False, "database_url": True}, "json")
    up.urls["postgres"] = new_database_url
    await asyncio.to_thread(up.create_database)  # up runs it before its event loop starts
    conn = await asyncpg.connect(new_database_url)
    await conn.close()
