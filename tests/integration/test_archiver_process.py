"""The archiver as a process (SIGTERM, SIGKILL) and against a PostgreSQL that restarts."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from fanout.servers import PostgresServer, RedisServer, free_port
from services.archiver.service import Archiver
from shared.connections import redis_client
from shared.feeds import EXECUTION, SPORT_EVENT
from shared.settings import Settings
from tests.integration.test_archiver import (
    append_feed,
    archiver_settings,
    assert_exactly_once,
    count_rows,
    eventually,
    message_id,
    pending,
    rows_reach,
    running,
)

pytestmark = pytest.mark.slow


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "FANOUT_KEY_PREFIX": settings.key_prefix,
        "FANOUT_DB_SCHEMA": settings.db_schema,
        "FANOUT_SUBJECT_PREFIX": settings.subject_prefix,
        "FANOUT_ARCHIVE_HTTP": "127.0.0.1:0",
        "FANOUT_ARCHIVE_BLOCK_MS": "200",
        "FANOUT_LOG_FORMAT": "json",
        **extra,
    }


@pytest.fixture
async def spawn() -> AsyncIterator[object]:
    procs: list[asyncio.subprocess.Process] = []

    async def start(env: dict[str, str]) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "fanout.cli",
            "archive",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _ops_url(proc: asyncio.subprocess.Process, log: list[bytes]) -> str:
    """The ops endpoints' URL, from the archiver's log line that announces it."""
    assert proc.stderr is not None
    while line := await asyncio.wait_for(proc.stderr.readline(), 30):
        log.append(line)
        record = json.loads(line)
        if record.get("msg") == "ops endpoints listening":
            return str(record["url"]).removesuffix("/metrics")
    raise AssertionError("the archiver exited before serving its ops endpoints:\n" + b"".join(log).decode())


async def test_sigterm_finishes_and_exits_zero(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection, spawn: object
) -> None:
    await append_feed(redis, base_settings, SPORT_EVENT, 1, 300)
    proc = await spawn(_env(base_settings, FANOUT_ARCHIVE_BATCH="100"))  # type: ignore[operator]
    log: list[bytes] = []
    url = await _ops_url(proc, log)
    await rows_reach(pg, base_settings.db_schema, "sport_event", 300)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/readyz") as ready:
            assert ready.status == 200
            assert (await ready.json())["checks"] == {"redis": "ok", "postgres": "ok"}
        async with http.get(f"{url}/metrics") as metrics:
            text = await metrics.text()
            assert 'fanout_archiver_rows_total{feed="sport_event"} 300.0' in text
            assert "fanout_archiver_batch_seconds_count" in text
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    stderr = b"".join(log) + stderr
    assert proc.returncode == 0, stderr.decode()[-2000:]
    assert b'"archiver stopped"' in stderr
    assert b"Traceback" not in stderr
    assert await pending(redis, base_settings, "sport_event") == 0


async def test_sigkill_mid_run_then_restart_stores_each_message_once(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection, spawn: object
) -> None:
    total = 10_000
    await append_feed(redis, base_settings, EXECUTION, 1, total)
    env = _env(base_settings, FANOUT_ARCHIVE_BATCH="500", FANOUT_ARCHIVE_CONSUMER="fixed-name")
    first = await spawn(env)  # type: ignore[operator]
    await rows_reach(pg, base_settings.db_schema, "execution", 1000)
    first.kill()  # SIGKILL: mid-batch, possibly between a commit and its XACK
    await first.wait()
    stored = await count_rows(pg, base_settings.db_schema, "execution")
    assert stored < total, "the archiver finished before it was killed; the test proves nothing"

    second = await spawn(env)  # type: ignore[operator]
    await rows_reach(pg, base_settings.db_schema, "execution", total, within=120)

    async def all_acked() -> bool:
        return await pending(redis, base_settings, "execution") == 0

    await eventually(all_acked, what="all entries acked")
    second.send_signal(signal.SIGTERM)
    await asyncio.wait_for(second.wait(), 30)
    assert second.returncode == 0
    await assert_exactly_once(
        pg, base_settings.db_schema, "execution", {message_id(i) for i in range(1, total + 1)}
    )
    keys = [k async for k in redis.scan_iter(match=f"{base_settings.key_prefix}:*", count=10_000)]
    await redis.unlink(*keys)  # in bulk: the fixture deletes one key at a time


@pytest.fixture
def private_postgres() -> Iterator[PostgresServer]:
    # Under /tmp with traversable parents: the server runs as the `postgres` user.
    root = Path(tempfile.mkdtemp(prefix="fanout-archiver-pg-", dir="/tmp"))
    root.chmod(0o755)
    server = PostgresServer(root / "pg", database="test")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_postgres_restarted_mid_run_loses_nothing(
    base_settings: Settings, redis: Redis, private_postgres: PostgresServer
) -> None:
    settings = archiver_settings(base_settings, database_url=private_postgres.url, batch=200)
    pg = await asyncpg.connect(private_postgres.url)
    schema = settings.db_schema
    archiver = Archiver(settings)
    async with running(archiver):
        await append_feed(redis, settings, EXECUTION, 1, 1000)
        await rows_reach(pg, schema, "execution", 1000)
        await pg.close()

        private_postgres.kill()  # SIGKILL: a crash, in-flight transactions lost
        await append_feed(redis, settings, EXECUTION, 1001, 1000)  # arrives while Postgres is down

        async def retrying() -> bool:
            return (
                archiver.counts("execution").rows == 1000 and await pending(redis, settings, "execution") > 0
            )

        await eventually(retrying, what="entries kept pending while Postgres is down")
        await asyncio.to_thread(private_postgres.start)
        await append_feed(redis, settings, EXECUTION, 2001, 1000)
        pg = await asyncpg.connect(private_postgres.url)
        await rows_reach(pg, schema, "execution", 3000, within=90)

        async def all_acked() -> bool:
            return await pending(redis, settings, "execution") == 0

        await eventually(all_acked, what="all entries acked")
    try:
        await assert_exactly_once(pg, schema, "execution", {message_id(i) for i in range(1, 3001)})
    finally:
        await pg.close()


@pytest.fixture
def private_redis_factory() -> Iterator[object]:
    root = Path(tempfile.mkdtemp(prefix="fanout-archiver-redis-"))
    servers: list[RedisServer] = []

    def start(*extra: str) -> RedisServer:
        server = RedisServer(root / f"redis{len(servers)}", extra_args=extra)
        servers.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("persistence", ["aof", "none"])
async def test_redis_restarted_mid_run_loses_nothing(
    base_settings: Settings, pg: asyncpg.Connection, private_redis_factory: object, persistence: str
) -> None:
    extra = () if persistence == "aof" else ("--appendonly", "no")
    server: RedisServer = private_redis_factory(*extra)  # type: ignore[operator]
    settings = archiver_settings(base_settings, redis_url=server.url, batch=100)
    client = redis_client(server.url)
    schema = settings.db_schema
    archiver = Archiver(settings)
    try:
        async with running(archiver):
            await append_feed(client, settings, EXECUTION, 1, 500)
            await rows_reach(pg, schema, "execution", 500)
            server.kill()  # SIGKILL: acks of the last second may be lost (AOF fsyncs every second)
            await asyncio.to_thread(server.start)
            await client.aclose()
            client = redis_client(server.url)  # the test's own connections died with the server
            # With AOF the stream and the group come back; without, both are gone and the
            # archiver must create its group again for the new entries.
            await append_feed(client, settings, EXECUTION, 501, 500)
            await rows_reach(pg, schema, "execution", 1000, within=60)

            async def all_acked() -> bool:
                return await pending(client, settings, "execution") == 0

            await eventually(all_acked, what="all entries acked")
        await assert_exactly_once(pg, schema, "execution", {message_id(i) for i in range(1, 1001)})
    finally:
        await client.aclose()


@pytest.fixture
def unstarted_postgres() -> Iterator[PostgresServer]:
    root = Path(tempfile.mkdtemp(prefix="fanout-archiver-pg-late-", dir="/tmp"))
    root.chmod(0o755)
    server = PostgresServer(root / "pg", port=free_port(), database="test")
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


async def test_archiver_started_before_postgres_waits_then_archives(
    base_settings: Settings, redis: Redis, unstarted_postgres: PostgresServer
) -> None:
    server = unstarted_postgres
    settings = archiver_settings(base_settings, database_url=server.url)
    archiver = Archiver(settings)
    await append_feed(redis, settings, EXECUTION, 1, 200)
    async with running(archiver):
        assert not await archiver.postgres_ok()  # not ready: /readyz says so
        await asyncio.to_thread(server.start)
        await asyncio.wait_for(archiver.ready.wait(), 60)
        pg = await asyncpg.connect(server.url)
        try:
            await rows_reach(pg, settings.db_schema, "execution", 200)
            await assert_exactly_once(
                pg, settings.db_schema, "execution", {message_id(i) for i in range(1, 201)}
            )
        finally:
            await pg.close()
