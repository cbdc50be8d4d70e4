"""The archiver against the real Redis and PostgreSQL: each entry exactly one row."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from services.archiver.consumer import FeedArchiver
from services.archiver.service import Archiver
from services.archiver.settings import ArchiverSettings
from services.archiver.store import MIGRATIONS, migrate
from services.archiver.trim import Trimmer
from shared import codec
from shared.feeds import DEAD_LETTER, EXECUTION, SPORT_EVENT, Feed
from shared.keys import Keys
from shared.scripts import register
from shared.settings import Settings

# -- helpers (used by the other test_archiver* files too) ------------------------------


def archiver_settings(base: Settings, **overrides: Any) -> ArchiverSettings:
    values = {f.name: getattr(base, f.name) for f in fields(Settings)}
    values.update(
        block_ms=100, claim_idle=0.5, http=("127.0.0.1", 0), trim_interval=3600.0, consumer="test-a"
    )
    values.update(overrides)
    return ArchiverSettings(**values)


_BASE_MS = 1_795_000_000_000


def execution_fields(i: int, *, price: str | None = None) -> dict[str, str]:
    return {
        "symbol": f"SYM{i % 7}",
        "market": "NASDAQ",
        "price": price if price is not None else codec.float32_text(100.25 + i),
        "quantity": codec.float32_text(0.5 * (i + 1)),
        "executionEpoch": str(1_700_000_000_000 + i),
        "stateSymbol": "FILLED",
    }


def sport_fields(i: int) -> dict[str, str]:
    return {"sport": "TENNIS", "match_title": f"Match {i} — café", "data_event": f"point {i}"}


def times(i: int) -> tuple[str, str]:
    broker = datetime.fromtimestamp((_BASE_MS + i * 1000) / 1000, UTC)
    return codec.iso_ms(broker), codec.iso_ms(broker + timedelta(milliseconds=7))


async def append(
    redis: Redis, settings: Settings, feed: str, messages: list[tuple[str, list[str]]], *, epoch: str = "ep1"
) -> list[str]:
    """Append messages (message id, entry fields) with the ingestor's Lua script."""
    keys = Keys(settings.key_prefix)
    script = register(redis, "ingest_append")
    argv: list[Any] = [3600, epoch]
    for message_id, entry in messages:
        argv += [int(message_id.rsplit(".", 1)[-1]), len(entry), *entry]
    result = await script(
        keys=[keys.stream(feed), keys.meta(feed), *(keys.dedup(feed, m) for m, _ in messages)], args=argv
    )
    return [r[0].decode() for r in result]


def message_id(n: int) -> str:
    return f"{_BASE_MS}.{n}"


async def append_feed(redis: Redis, settings: Settings, feed: Feed, start: int, count: int) -> list[str]:
    messages = []
    for i in range(start, start + count):
        f = execution_fields(i) if feed is EXECUTION else sport_fields(i)
        messages.append((message_id(i), codec.entry_fields(message_id(i), f, *times(i))))
    ids: list[str] = []
    for chunk in range(0, len(messages), 1000):
        ids += await append(redis, settings, feed.name, messages[chunk : chunk + 1000])
    return ids


async def eventually(
    check: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "condition"
) -> None:
    """Poll `check` until true (only where nothing can be awaited): fail after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        for task in _running:  # an archiver that died fails the test now, with its error
            if task.done() and task.exception() is not None:
                raise AssertionError(f"archiver failed while waiting for {what}") from task.exception()
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


_running: list[asyncio.Task[None]] = []  # archivers started by `running`, watched by `eventually`


@contextlib.asynccontextmanager
async def running(archiver: Archiver) -> AsyncIterator[asyncio.Task[None]]:
    """Run an archiver in-process until the block ends, then stop it (it must exit cleanly)."""
    stop = asyncio.Event()
    task = asyncio.create_task(archiver.run(stop))
    _running.append(task)
    try:
        yield task
    finally:
        stop.set()
        try:
            await asyncio.wait_for(task, 30)
        finally:
            _running.remove(task)


async def count_rows(pg: asyncpg.Connection, schema: str, table: str) -> int:
    try:
        return int(await pg.fetchval(f'SELECT count(*) FROM "{schema}".{table}'))
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
        return 0


async def rows_reach(pg: asyncpg.Connection, schema: str, table: str, n: int, within: float = 60.0) -> None:
    async def check() -> bool:
        return await count_rows(pg, schema, table) >= n

    await eventually(check, within, f"{n} rows in {table}")


async def assert_exactly_once(pg: asyncpg.Connection, schema: str, table: str, expected: set[str]) -> None:
    ids = [r[0] for r in await pg.fetch(f'SELECT message_id FROM "{schema}".{table}')]
    assert len(ids) == len(set(ids))
    assert set(ids) == expected


async def pending(redis: Redis, settings: Settings, feed: str, group: str = "archiver") -> int:
    return int((await redis.xpending(Keys(settings.key_prefix).stream(feed), group))["pending"])


# -- tests -------------------------------------------------------------------------------


async def test_entries_become_typed_rows(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings)
    exec_ids = await append_feed(redis, settings, EXECUTION, 0, 50)
    await append_feed(redis, settings, SPORT_EVENT, 100, 30)
    broker, ingest = times(999)
    dead = [
        "message_id",
        message_id(999),
        "subject",
        f"{settings.subject_prefix}execution",
        "broker_seq",
        "999",
        "error",
        "missing required field(s): price",
        "payload_b64",
        base64.b64encode(b"\x00\xffbad").decode(),
        "broker_time",
        broker,
        "ingest_time",
        ingest,
    ]
    await append(redis, settings, DEAD_LETTER, [(message_id(999), dead)])
    schema = settings.db_schema
    async with running(Archiver(settings)):
        await rows_reach(pg, schema, "execution", 50)
        await rows_reach(pg, schema, "sport_event", 30)
        await rows_reach(pg, schema, "dead_letter", 1)

    row = await pg.fetchrow(f'SELECT * FROM "{schema}".execution WHERE message_id = $1', message_id(3))
    assert row is not None
    b3, i3 = times(3)
    assert (row["symbol"], row["market"], row["state_symbol"]) == ("SYM3", "NASDAQ", "FILLED")
    assert row["price"] == pytest.approx(103.25) and row["quantity"] == pytest.approx(2.0)
    assert row["execution_epoch"] == 1_700_000_000_003
    assert row["epoch"] == "ep1" and row["seq"] == 4
    assert row["stream_id"] == exec_ids[3]
    assert f"{row['entry_ms']}-{row['entry_n']}" == exec_ids[3]
    assert row["broker_time"] == codec.parse_iso(b3) and row["ingest_time"] == codec.parse_iso(i3)
    entry = codec.entry_fields(message_id(3), execution_fields(3), b3, i3)
    as_dict = dict(zip(entry[::2], entry[1::2], strict=True)) | {"seq": "4"}
    assert json.loads(row["message"]) == codec.typed_message(EXECUTION, as_dict)

    sport = await pg.fetchrow(f'SELECT * FROM "{schema}".sport_event WHERE message_id = $1', message_id(105))
    assert (sport["sport"], sport["match_title"], sport["data_event"]) == (
        "TENNIS",
        "Match 105 — café",
        "point 105",
    )

    dl = await pg.fetchrow(f'SELECT * FROM "{schema}".dead_letter')
    assert dl["source"] == "ingestor" and dl["feed"] == "execution" and dl["message_id"] == message_id(999)
    assert dl["payload"] == b"\x00\xffbad" and dl["broker_seq"] == 999
    assert dl["error"] == "missing required field(s): price" and dl["broker_time"] == codec.parse_iso(broker)
    for feed in (EXECUTION.name, SPORT_EVENT.name, DEAD_LETTER):
        assert await pending(redis, settings, feed) == 0


class Crash(Exception):
    """Stands for the process dying between the commit and the XACK."""


class CrashAfterCommit(FeedArchiver):
    async def after_commit(self, ids: list[str]) -> None:
        raise Crash(f"crashed after committing {len(ids)} rows, before XACK")


class CrashingArchiver(Archiver):
    feed_class = CrashAfterCommit


@pytest.mark.parametrize("restart_as", ["same consumer", "another consumer"])
async def test_crash_between_commit_and_ack_makes_no_duplicate(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection, restart_as: str
) -> None:
    settings = archiver_settings(base_settings, batch=40, claim_idle=0.2)
    await append_feed(redis, settings, EXECUTION, 0, 100)
    crashing = CrashingArchiver(settings)
    with pytest.raises(ExceptionGroup) as raised:
        await crashing.run(asyncio.Event())
    assert raised.group_contains(Crash)
    committed = await count_rows(pg, settings.db_schema, "execution")
    assert committed >= 40  # the batch was committed ...
    assert await pending(redis, settings, "execution") >= committed  # ... but not acked

    consumer = "test-a" if restart_as == "same consumer" else "test-b"
    again = Archiver(archiver_settings(base_settings, batch=40, claim_idle=0.2, consumer=consumer))
    async with running(again):
        await rows_reach(pg, settings.db_schema, "execution", 100)
        await eventually(lambda: _no_pending(redis, settings), what="all entries acked")
    await assert_exactly_once(pg, settings.db_schema, "execution", {message_id(i) for i in range(100)})
    reader = again.counts("execution")
    # The redelivered batch was skipped, not re-inserted (a batch claimed again while slow
    # to store adds duplicates, never rows).
    assert reader.duplicates >= committed
    assert reader.rows == 100 - committed


async def _no_pending(redis: Redis, settings: Settings) -> bool:
    return await pending(redis, settings, "execution") == 0


async def test_two_archivers_racing_store_each_message_once(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    one = Archiver(archiver_settings(base_settings, batch=50, consumer="racer-1"))
    two = Archiver(archiver_settings(base_settings, batch=50, consumer="racer-2"))
    await append_feed(redis, base_settings, EXECUTION, 0, 500)
    async with running(one), running(two):
        more = asyncio.create_task(append_feed(redis, base_settings, EXECUTION, 500, 1500))
        await more
        await rows_reach(pg, base_settings.db_schema, "execution", 2000)
        await eventually(lambda: _no_pending(redis, base_settings), what="all entries acked")
    await assert_exactly_once(pg, base_settings.db_schema, "execution", {message_id(i) for i in range(2000)})
    total = one.counts("execution").rows + two.counts("execution").rows
    assert total == 2000


async def test_poison_entries_go_to_dead_letter_and_the_rest_is_stored(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, claim_idle=0.2, max_deliveries=3)
    good = [
        (message_id(i), codec.entry_fields(message_id(i), execution_fields(i), *times(i))) for i in range(10)
    ]
    not_a_number = codec.entry_fields(message_id(10), execution_fields(10, price="12,5"), *times(10))
    too_big_for_real = codec.entry_fields(message_id(11), execution_fields(11, price="1e39"), *times(11))
    missing = codec.entry_fields(message_id(12), {"symbol": "X"}, *times(12))
    await append(redis, settings, "execution", good[:5])
    bad_ids = await append(
        redis,
        settings,
        "execution",
        [(message_id(10), not_a_number), (message_id(11), too_big_for_real), (message_id(12), missing)],
    )
    await append(redis, settings, "execution", good[5:])
    schema = settings.db_schema
    archiver = Archiver(settings)
    async with running(archiver):
        await rows_reach(pg, schema, "dead_letter", 3)
        await eventually(lambda: _no_pending(redis, settings), what="poison entries acked")
    await assert_exactly_once(pg, schema, "execution", {message_id(i) for i in range(10)})
    dead = await pg.fetch(f'SELECT * FROM "{schema}".dead_letter ORDER BY stream_id')
    assert [d["stream_id"] for d in dead] == bad_ids
    assert {d["source"] for d in dead} == {"archiver"} and {d["feed"] for d in dead} == {"execution"}
    assert [d["message_id"] for d in dead] == [message_id(10), message_id(11), message_id(12)]
    assert json.loads(dead[0]["fields"])["price"] == "12,5"
    assert "price" in dead[0]["error"] or "12,5" in dead[0]["error"]
    assert "out of float32 range" in dead[1]["error"]  # refused by the COPY, isolated row by row
    assert "missing field" in dead[2]["error"]
    assert archiver.counts("execution").dead_letters == 3


async def test_trim_removes_only_archived_old_entries(base_settings: Settings, redis: Redis) -> None:
    settings = archiver_settings(base_settings, retention=0.0)
    keys = Keys(settings.key_prefix)
    stream = keys.stream("execution")
    await redis.xgroup_create(stream, "archiver", id="0", mkstream=True)
    ids = await append_feed(redis, settings, EXECUTION, 0, 10)
    trimmer = Trimmer(settings, redis, ["execution"])
    later = time.time() + 60

    assert await trimmer.trim("execution", now=later) == 0  # nothing delivered: nothing archived
    await redis.xreadgroup("archiver", "c", {stream: ">"}, count=6)  # delivered 0..5, all pending
    assert await trimmer.trim("execution", now=later) == 0
    await redis.xack(stream, "archiver", ids[0], ids[1], ids[2], ids[4], ids[5])  # 3 still pending
    assert await trimmer.trim("execution", now=later) == 3
    assert await _ids(redis, stream) == ids[3:]

    young = Trimmer(archiver_settings(base_settings, retention=3600.0), redis, ["execution"])
    await redis.xack(stream, "archiver", ids[3])
    assert await young.trim("execution", now=later) == 0  # archived but within the retention
    capped = Trimmer(archiver_settings(base_settings, retention=3600.0, maxlen=2), redis, ["execution"])
    assert await capped.trim("execution", now=later) == 3  # beyond max length, but only up to 6 (undelivered)
    assert await _ids(redis, stream) == ids[6:]
    await redis.xreadgroup("archiver", "c", {stream: ">"})
    await redis.xack(stream, "archiver", *ids[6:])
    assert await capped.trim("execution", now=later) == 2
    assert await _ids(redis, stream) == ids[8:]


async def _ids(redis: Redis, stream: str) -> list[str]:
    entries: Any = await redis.xrange(stream)
    return [i.decode() for i, _ in entries]


async def test_trim_without_a_group_removes_nothing(base_settings: Settings, redis: Redis) -> None:
    settings = archiver_settings(base_settings, retention=0.0, maxlen=1)
    await append_feed(redis, settings, EXECUTION, 0, 5)
    assert await Trimmer(settings, redis, ["execution"]).trim("execution", now=time.time() + 60) == 0
    assert await redis.xlen(Keys(settings.key_prefix).stream("execution")) == 5


async def test_archiver_trims_what_it_archived(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, retention=0.0, trim_interval=0.2)
    await append_feed(redis, settings, EXECUTION, 0, 20)
    stream = Keys(settings.key_prefix).stream("execution")
    async with running(Archiver(settings)):
        await rows_reach(pg, settings.db_schema, "execution", 20)

        async def trimmed() -> bool:
            return int(await redis.xlen(stream)) == 0

        await eventually(trimmed, what="archived entries trimmed")
    assert await count_rows(pg, settings.db_schema, "execution") == 20
    samples = {
        name: REGISTRY.get_sample_value(name, {"feed": "execution"})
        for name in ("fanout_archiver_lag_entries", "fanout_archiver_lag_seconds")
    }
    assert samples == {"fanout_archiver_lag_entries": 0, "fanout_archiver_lag_seconds": 0}


async def test_migrations_are_idempotent_and_safe_concurrently(
    base_settings: Settings, pg: asyncpg.Connection
) -> None:
    schema = base_settings.db_schema
    conns = [await asyncpg.connect(base_settings.database_url) for _ in range(4)]
    try:
        results = await asyncio.gather(*(migrate(c, schema) for c in conns))
    finally:
        for c in conns:
            await c.close()
    latest = [v for v, _ in MIGRATIONS]
    assert sorted(results, key=len) == [[], [], [], latest]
    assert await migrate(pg, schema) == []
    versions = [r[0] for r in await pg.fetch(f'SELECT version FROM "{schema}".schema_migrations ORDER BY 1')]
    assert versions == latest
    tables = {
        r[0]
        for r in await pg.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema
        )
    }
    assert tables == {"execution", "sport_event", "dead_letter", "schema_migrations"}


def test_environment_is_not_read_at_import() -> None:
    assert "FANOUT_ARCHIVE_GROUP" not in os.environ or ArchiverSettings.from_env({}).group == "archiver"


async def test_a_bad_ingestor_dead_letter_is_kept_as_an_archiver_dead_letter(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, claim_idle=0.2, max_deliveries=1)
    broker, ingest = times(1)
    bad = ["message_id", message_id(1), "subject", "x", "broker_seq", "1", "error", "e", "payload_b64", "%%%"]
    await append(
        redis, settings, DEAD_LETTER, [(message_id(1), [*bad, "broker_time", broker, "ingest_time", ingest])]
    )
    async with running(Archiver(settings)):
        await rows_reach(pg, settings.db_schema, "dead_letter", 1)
    row = await pg.fetchrow(f'SELECT * FROM "{settings.db_schema}".dead_letter')
    assert (row["source"], row["feed"], row["message_id"]) == ("archiver", DEAD_LETTER, message_id(1))
    assert "bad field value" in row["error"] and json.loads(row["fields"])["payload_b64"] == "%%%"
    assert await pending(redis, settings, DEAD_LETTER) == 0
