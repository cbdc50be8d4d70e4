"""The archiver against the real Redis and PostgreSQL: each entry exactly one row.

Entries are appended as the contract v2 ingestor leaves them (id `<seq>-0`, message id
`<epoch>.<seq>`), with plain XADD: these tests do not depend on the ingest script."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
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
from services.archiver.rows import feed_row
from services.archiver.service import Archiver
from services.archiver.settings import ArchiverSettings
from services.archiver.store import MIGRATIONS, Store, migrate
from services.archiver.trim import Trimmer
from shared import codec
from shared.catalogue import archived_top
from shared.feeds import DEAD_LETTER, EXECUTION, SPORT_EVENT, Feed
from shared.keys import Keys
from shared.settings import Settings

# -- helpers (used by the other test_archiver* files too) ------------------------------


def archiver_settings(base: Settings, **overrides: Any) -> ArchiverSettings:
    values = {f.name: getattr(base, f.name) for f in fields(Settings)}
    values.update(
        block_ms=100, claim_idle=0.5, http=("127.0.0.1", 0), trim_interval=3600.0, consumer="test-a",
        linger=0.05,  # below the 0.2 s claim_idle some tests use
    )
    values.update(overrides)
    return ArchiverSettings(**values)


_BASE_MS = 1_795_000_000_000
EPOCH = "1795000000000"  # the feeds' JetStream epoch in these tests (contract v2: creation ms)


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
    """broker_time and ingest_time of message `i`: one second apart per seq, in 2026-11."""
    broker = datetime.fromtimestamp((_BASE_MS + i * 1000) / 1000, UTC)
    return codec.iso_ms(broker), codec.iso_ms(broker + timedelta(milliseconds=7))


def broker_seconds(i: int) -> float:
    return (_BASE_MS + i * 1000) / 1000


def message_id(seq: int, epoch: str = EPOCH) -> str:
    return f"{epoch}.{seq}"


async def append(
    redis: Redis, settings: Settings, feed: str, entries: list[tuple[int, list[str]]], *, epoch: str = EPOCH
) -> list[str]:
    """Append entries as the contract v2 ingestor does, with plain XADD: each at id
    `<seq>-0` with fields `seq` then `fields` (codec.entry_fields or malformed_fields);
    the meta hash gets epoch, seq (top), last_id and first_seq (if unset)."""
    keys = Keys(settings.key_prefix)
    stream, meta = keys.stream(feed), keys.meta(feed)
    async with redis.pipeline(transaction=True) as pipe:
        for seq, fields in entries:
            pairs: dict[Any, Any] = {"seq": str(seq)}
            pairs.update(zip(fields[::2], fields[1::2], strict=True))
            pipe.xadd(stream, pairs, id=f"{seq}-0")
        top = entries[-1][0]
        pipe.hset(meta, mapping={"epoch": epoch, "seq": top, "last_id": f"{top}-0"})
        pipe.hsetnx(meta, "first_seq", entries[0][0])
        replies = await pipe.execute()
    return [r.decode() if isinstance(r, bytes) else str(r) for r in replies[: len(entries)]]


def feed_entry(feed: Feed, seq: int, epoch: str = EPOCH) -> list[str]:
    fields = execution_fields(seq) if feed is EXECUTION else sport_fields(seq)
    return codec.entry_fields(message_id(seq, epoch), fields, *times(seq))


def malformed_entry(seq: int, payload: bytes = b"\x00\xffbad", epoch: str = EPOCH) -> list[str]:
    return codec.malformed_fields(message_id(seq, epoch), "not a valid protobuf", payload, *times(seq))


async def append_feed(
    redis: Redis, settings: Settings, feed: Feed, first_seq: int, count: int, *, epoch: str = EPOCH
) -> list[str]:
    """Append messages of seqs first_seq .. first_seq + count - 1 (message ids `<epoch>.<seq>`)."""
    ids: list[str] = []
    for chunk in range(first_seq, first_seq + count, 1000):
        seqs = range(chunk, min(chunk + 1000, first_seq + count))
        ids += await append(
            redis, settings, feed.name, [(i, feed_entry(feed, i, epoch)) for i in seqs], epoch=epoch
        )
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


async def test_entries_become_typed_rows_and_malformed_entries_dead_letters(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings)
    exec_ids = await append_feed(redis, settings, EXECUTION, 1, 50)
    await append(redis, settings, "execution", [(51, malformed_entry(51)), (52, feed_entry(EXECUTION, 52))])
    await append_feed(redis, settings, SPORT_EVENT, 100, 30)
    schema = settings.db_schema
    archiver = Archiver(settings)
    async with running(archiver):
        await rows_reach(pg, schema, "execution", 51)
        await rows_reach(pg, schema, "sport_event", 30)
        await rows_reach(pg, schema, "dead_letter", 1)

    row = await pg.fetchrow(f'SELECT * FROM "{schema}".execution WHERE message_id = $1', message_id(3))
    assert row is not None
    b3, i3 = times(3)
    assert (row["symbol"], row["market"], row["state_symbol"]) == ("SYM3", "NASDAQ", "FILLED")
    assert row["price"] == pytest.approx(103.25) and row["quantity"] == pytest.approx(2.0)
    assert row["execution_epoch"] == 1_700_000_000_003
    assert row["epoch"] == EPOCH and row["seq"] == 3  # the epoch is the message id's prefix
    assert row["stream_id"] == exec_ids[2] == "3-0"
    assert (row["entry_ms"], row["entry_n"]) == (3, 0)
    assert row["broker_time"] == codec.parse_iso(b3) and row["ingest_time"] == codec.parse_iso(i3)
    entry = feed_entry(EXECUTION, 3)
    as_dict = dict(zip(entry[::2], entry[1::2], strict=True)) | {"seq": "3"}
    assert json.loads(row["message"]) == codec.typed_message(EXECUTION, as_dict)

    sport = await pg.fetchrow(f'SELECT * FROM "{schema}".sport_event WHERE message_id = $1', message_id(105))
    assert (sport["sport"], sport["match_title"], sport["data_event"]) == (
        "TENNIS",
        "Match 105 — café",
        "point 105",
    )

    # The malformed entry: a dead letter at its epoch and seq, never a feed row.
    dl = await pg.fetchrow(f'SELECT * FROM "{schema}".dead_letter')
    assert (dl["source"], dl["feed"], dl["epoch"], dl["seq"]) == ("ingestor", "execution", EPOCH, 51)
    assert dl["message_id"] == message_id(51) and dl["stream_id"] == "51-0" and dl["broker_seq"] == 51
    assert dl["subject"] == settings.subject("execution")
    assert dl["payload"] == b"\x00\xffbad" and dl["error"] == "not a valid protobuf"
    assert dl["broker_time"] == codec.parse_iso(times(51)[0])
    assert await pg.fetchval(f'SELECT count(*) FROM "{schema}".execution WHERE seq = 51') == 0
    assert archiver.counts("execution").malformed == 1 and archiver.counts("execution").rows == 51
    for feed in (EXECUTION.name, SPORT_EVENT.name):
        assert await pending(redis, settings, feed) == 0
    # The retired dead-letter stream is not created any more.
    assert not await redis.exists(Keys(settings.key_prefix).stream(DEAD_LETTER))


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
    await append_feed(redis, settings, EXECUTION, 1, 100)
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
    await assert_exactly_once(pg, settings.db_schema, "execution", {message_id(i) for i in range(1, 101)})
    reader = again.counts("execution")
    # The redelivered batch was skipped, not re-inserted (a batch claimed again while slow
    # to store adds duplicates, never rows).
    assert reader.duplicates >= committed
    assert reader.rows == 100 - committed


async def _no_pending(redis: Redis, settings: Settings, feed: str = "execution") -> bool:
    return await pending(redis, settings, feed) == 0


class RecordingLinger(FeedArchiver):
    """Records each linger; the first one appends more entries to the stream first (the
    upstream trickle arriving while the reader lingers)."""

    lingered: list[int] = []
    arriving: list[tuple[int, list[str]]] = []
    redis_client: Redis | None = None

    async def linger(self, stop: asyncio.Event) -> bool:
        type(self).lingered.append(self.counts.batches)
        if type(self).arriving and self.redis_client is not None:
            arriving, type(self).arriving = type(self).arriving, []
            await append(self.redis_client, self.settings, self.name, arriving)
        return await super().linger(stop)


class LingeringArchiver(Archiver):
    feed_class = RecordingLinger


async def test_a_small_read_lingers_and_is_committed_with_what_came_meanwhile(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, batch=10, linger=0.2, workers=2)
    RecordingLinger.lingered, RecordingLinger.redis_client = [], redis
    RecordingLinger.arriving = [(i, feed_entry(EXECUTION, i)) for i in (2, 3)]
    await append(redis, settings, "execution", [(1, feed_entry(EXECUTION, 1))])
    archiver = LingeringArchiver(settings)
    async with running(archiver):
        await rows_reach(pg, settings.db_schema, "execution", 3)
        await eventually(lambda: _no_pending(redis, settings), what="all entries acked")
    # One read brought seq 1, the linger let seqs 2 and 3 in: one batch, one commit.
    assert archiver.counts("execution").batches == 1
    assert RecordingLinger.lingered == [0]
    await assert_exactly_once(pg, settings.db_schema, "execution", {message_id(i) for i in (1, 2, 3)})


async def test_a_full_batch_is_stored_without_lingering(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, batch=5, linger=0.2)
    RecordingLinger.lingered, RecordingLinger.arriving, RecordingLinger.redis_client = [], [], redis
    await append_feed(redis, settings, EXECUTION, 1, 12)
    archiver = LingeringArchiver(settings)
    async with running(archiver):
        await rows_reach(pg, settings.db_schema, "execution", 12)
        await eventually(lambda: _no_pending(redis, settings), what="all entries acked")
    # Two full batches of 5, each stored at once; only the tail of 2 lingered.
    assert archiver.counts("execution").batches == 3
    assert len(RecordingLinger.lingered) == 1
    await assert_exactly_once(pg, settings.db_schema, "execution", {message_id(i) for i in range(1, 13)})


async def test_two_archivers_racing_store_each_message_once(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    one = Archiver(archiver_settings(base_settings, batch=50, consumer="racer-1"))
    two = Archiver(archiver_settings(base_settings, batch=50, consumer="racer-2"))
    await append_feed(redis, base_settings, EXECUTION, 1, 500)
    async with running(one), running(two):
        await append_feed(redis, base_settings, EXECUTION, 501, 1500)
        await rows_reach(pg, base_settings.db_schema, "execution", 2000)
        await eventually(lambda: _no_pending(redis, base_settings), what="all entries acked")
    await assert_exactly_once(
        pg, base_settings.db_schema, "execution", {message_id(i) for i in range(1, 2001)}
    )
    total = one.counts("execution").rows + two.counts("execution").rows
    assert total == 2000


async def test_poison_entries_go_to_dead_letter_at_their_position_and_the_rest_is_stored(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, claim_idle=0.2, max_deliveries=3)
    not_a_number = codec.entry_fields(message_id(11), execution_fields(11, price="12,5"), *times(11))
    too_big_for_real = codec.entry_fields(message_id(12), execution_fields(12, price="1e39"), *times(12))
    missing = codec.entry_fields(message_id(13), {"symbol": "X"}, *times(13))
    await append_feed(redis, settings, EXECUTION, 1, 10)
    bad_ids = await append(
        redis, settings, "execution", [(11, not_a_number), (12, too_big_for_real), (13, missing)]
    )
    await append_feed(redis, settings, EXECUTION, 14, 5)
    schema = settings.db_schema
    archiver = Archiver(settings)
    async with running(archiver):
        await rows_reach(pg, schema, "dead_letter", 3)
        await eventually(lambda: _no_pending(redis, settings), what="poison entries acked")
    good = {message_id(i) for i in (*range(1, 11), *range(14, 19))}
    await assert_exactly_once(pg, schema, "execution", good)
    dead = await pg.fetch(f'SELECT * FROM "{schema}".dead_letter ORDER BY seq')
    assert [d["stream_id"] for d in dead] == bad_ids == ["11-0", "12-0", "13-0"]
    assert {d["source"] for d in dead} == {"archiver"} and {d["feed"] for d in dead} == {"execution"}
    assert [d["message_id"] for d in dead] == [message_id(11), message_id(12), message_id(13)]
    assert [(d["epoch"], d["seq"]) for d in dead] == [(EPOCH, 11), (EPOCH, 12), (EPOCH, 13)]
    assert json.loads(dead[0]["fields"])["price"] == "12,5"
    assert "price" in dead[0]["error"] or "12,5" in dead[0]["error"]
    assert "out of float32 range" in dead[1]["error"]  # refused by the COPY, isolated row by row
    assert "missing field" in dead[2]["error"]
    assert archiver.counts("execution").dead_letters == 3
    # Every seq of the epoch is in exactly one place: the catalogue's archived top is 18.
    assert await archived_top(pg, schema, "execution", EPOCH) == 18


async def test_trim_removes_only_archived_entries_older_than_the_retention(
    base_settings: Settings, redis: Redis
) -> None:
    settings = archiver_settings(base_settings, retention=0.0, maxlen=0)
    keys = Keys(settings.key_prefix)
    stream = keys.stream("execution")
    await redis.xgroup_create(stream, "archiver", id="0", mkstream=True)
    ids = await append_feed(redis, settings, EXECUTION, 1, 10)  # broker times 1 s apart
    trimmer = Trimmer(settings, redis, ["execution"])
    later = broker_seconds(10) + 60

    assert await trimmer.trim("execution", now=later) == 0  # nothing delivered: nothing archived
    await redis.xreadgroup("archiver", "c", {stream: ">"}, count=6)  # delivered 1..6, all pending
    assert await trimmer.trim("execution", now=later) == 0
    await redis.xack(stream, "archiver", ids[0], ids[1], ids[2], ids[4], ids[5])  # seq 4 still pending
    assert await trimmer.trim("execution", now=later) == 3
    assert await _ids(redis, stream) == ids[3:]

    await redis.xack(stream, "archiver", ids[3])  # 4..6 archived now
    young = Trimmer(archiver_settings(base_settings, retention=3600.0, maxlen=0), redis, ["execution"])
    assert await young.trim("execution", now=later) == 0  # archived but within the retention
    # The retention by broker_time: at broker time of seq 10 + 4.5 s, a 9 s retention
    # keeps seqs with broker_time >= seq 5.5's: seq 4 and 5 go, 6 (archived) stays.
    window = Trimmer(archiver_settings(base_settings, retention=9.0, maxlen=0), redis, ["execution"])
    assert await window.trim("execution", now=broker_seconds(10) + 4.5) == 2
    assert await _ids(redis, stream) == ids[5:]
    capped = Trimmer(archiver_settings(base_settings, retention=3600.0, maxlen=2), redis, ["execution"])
    assert await capped.trim("execution", now=later) == 1  # beyond max length, but only up to 7 (undelivered)
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
    await append_feed(redis, settings, EXECUTION, 1, 5)
    assert await Trimmer(settings, redis, ["execution"]).trim("execution", now=time.time() + 60) == 0
    assert await redis.xlen(Keys(settings.key_prefix).stream("execution")) == 5


def test_the_hot_window_defaults() -> None:
    settings = ArchiverSettings.from_env({})
    assert (settings.retention, settings.maxlen) == (900.0, 1_000_000)


async def test_archiver_trims_what_it_archived_and_measures_lag_by_broker_time(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, retention=0.0, trim_interval=0.2)
    stream = Keys(settings.key_prefix).stream("execution")
    await redis.xgroup_create(stream, "archiver", id="0", mkstream=True)
    await append_feed(redis, settings, EXECUTION, 1, 20)
    trimmer = Trimmer(settings, redis, ["execution"])
    await trimmer.trim("execution", now=broker_seconds(1) + 30)  # nothing archived yet
    assert REGISTRY.get_sample_value("fanout_archiver_lag_entries", {"feed": "execution"}) == 20
    assert REGISTRY.get_sample_value("fanout_archiver_lag_seconds", {"feed": "execution"}) == 30.0
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


async def test_a_stream_lost_and_rebuilt_from_a_later_seq_is_archived_once(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis loses the stream (restart without persistence, failover, eviction) while the
    archiver is blocked reading it; the ingestor rebuilds it from a later seq with the same
    ids and message ids: the archiver creates its group again and stores each message once."""
    settings = archiver_settings(base_settings, batch=20)
    schema = settings.db_schema
    stream = Keys(settings.key_prefix).stream("execution")
    archiver = Archiver(settings)
    async with running(archiver):
        await append_feed(redis, settings, EXECUTION, 1, 50)
        await rows_reach(pg, schema, "execution", 50)
        await eventually(lambda: _no_pending(redis, settings), what="all entries acked")
        await redis.delete(stream)  # the stream and its consumer group are gone
        # Rebuilt from seq 31 (as if 31..50 had not been archived), then live traffic.
        await append_feed(redis, settings, EXECUTION, 31, 50)
        await rows_reach(pg, schema, "execution", 80)

        async def caught_up() -> bool:
            info: Any = await redis.xinfo_groups(stream)
            return bool(info) and info[0]["lag"] == 0 and await _no_pending(redis, settings)

        await eventually(caught_up, what="the rebuilt stream archived")
    await assert_exactly_once(pg, schema, "execution", {message_id(i) for i in range(1, 81)})
    counts = archiver.counts("execution")
    # 31..50 delivered again, not stored again (a worker may also re-read its sibling's
    # pending batch: more duplicates, never more rows).
    assert counts.rows == 80 and counts.duplicates >= 20
    assert counts.groups_created >= 2
    # Handled as what it is, not as an error (no backoff on the way either).
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "redis refused a command, retrying" not in caplog.text
    assert "consumer group missing, creating it again" in caplog.text


async def test_a_new_epoch_restarts_the_seqs_and_both_epochs_rows_stay(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings)
    schema = settings.db_schema
    stream = Keys(settings.key_prefix).stream("execution")
    new_epoch = str(int(EPOCH) + 86_400_000)
    archiver = Archiver(settings)
    async with running(archiver):
        await append_feed(redis, settings, EXECUTION, 1, 30)
        await rows_reach(pg, schema, "execution", 30)
        await eventually(lambda: _no_pending(redis, settings), what="all entries acked")
        # The JetStream stream was recreated: the ingestor's script deletes the old Redis
        # stream and starts the new epoch at seq 1.
        await redis.delete(stream, Keys(settings.key_prefix).meta("execution"))
        await append_feed(redis, settings, EXECUTION, 1, 20, epoch=new_epoch)
        await rows_reach(pg, schema, "execution", 50)
    by_epoch = {
        r["epoch"]: (r["n"], r["lo"], r["hi"])
        for r in await pg.fetch(
            f"SELECT epoch, count(*) AS n, min(seq) AS lo, max(seq) AS hi"
            f' FROM "{schema}".execution GROUP BY 1'
        )
    }
    assert by_epoch == {EPOCH: (30, 1, 30), new_epoch: (20, 1, 20)}
    assert archiver.counts("execution").rows == 50
    assert await archived_top(pg, schema, "execution", new_epoch) == 20


async def test_a_row_whose_position_is_taken_by_another_message_is_skipped_not_fatal(
    base_settings: Settings, pg: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    store = Store(base_settings.database_url, base_settings.db_schema, pool_size=1)
    await store.open()
    try:

        def row(seq: int, mid: str) -> tuple[object, ...]:
            entry = feed_entry(EXECUTION, seq)
            fields = dict(zip(entry[::2], entry[1::2], strict=True)) | {"seq": str(seq), "message_id": mid}
            return feed_row(EXECUTION, f"{seq}-0", fields)

        assert await store.insert_feed("execution", [row(1, message_id(1)), row(2, message_id(2))]) == 2
        # Seq 2 of the epoch claimed again by another message id: skipped, counted, no error.
        batch = [row(2, f"{EPOCH}.2"), row(2, f"{EPOCH}.02"), row(3, message_id(3))]
        assert await store.insert_feed("execution", batch) == 1
        # The redelivery is quiet; the other message at seq 2 is named.
        (record,) = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert record.rows == [f"{EPOCH}.02 at {EPOCH}/2 (held by {EPOCH}.2)"]  # type: ignore[attr-defined]
    finally:
        await store.close()
    ids = {r[0] for r in await pg.fetch(f'SELECT message_id FROM "{base_settings.db_schema}".execution')}
    assert ids == {message_id(1), message_id(2), message_id(3)}


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
    assert latest == [1, 2]
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


async def test_a_v1_catalogue_is_migrated_keeping_its_rows(
    base_settings: Settings, pg: asyncpg.Connection
) -> None:
    schema = base_settings.db_schema
    s = f'"{schema}"'
    await pg.execute(f"CREATE SCHEMA {s}")
    await pg.execute(
        f"CREATE TABLE {s}.schema_migrations"
        " (version int PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    await pg.execute(MIGRATIONS[0][1].replace("{s}", s))
    await pg.execute(f"INSERT INTO {s}.schema_migrations (version) VALUES (1)")
    broker, ingest = (codec.parse_iso(t) for t in times(1))
    old = (
        f"INSERT INTO {s}.sport_event VALUES ($1, 'bf6c20b3', 1, '1795862597009-0', 1795862597009, 0,"
        " $2, $3, now(), 'GOLF', 'm', 'e', '{}')"
    )
    await pg.execute(old, "1795862595094.7", broker, ingest)
    await pg.execute(
        f"INSERT INTO {s}.dead_letter (source, feed, message_id, stream_id, error)"
        " VALUES ('ingestor', 'execution', 'x.1', '1-0', 'e')"
    )
    assert await migrate(pg, schema) == [2]
    assert await pg.fetchval(f"SELECT epoch FROM {s}.sport_event") == "bf6c20b3"
    assert await pg.fetchval(f"SELECT (epoch, seq) IS NULL FROM {s}.dead_letter") is True
    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await pg.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema)
    }
    assert "UNIQUE" in indexes["sport_event_epoch_seq_key"] and "sport_event_entry_idx" not in indexes
    assert "(feed, epoch, seq)" in indexes["dead_letter_position_idx"]
    # The same entry position (entry_ms, entry_n) in two epochs is allowed now.
    await pg.execute(old.replace("'bf6c20b3', 1", "'1795862595094', 1"), "1795862595094.1", broker, ingest)


def test_environment_is_not_read_at_import() -> None:
    group = ArchiverSettings.from_env({}).archive_group
    assert "FANOUT_ARCHIVE_GROUP" not in os.environ or group == "archiver"


async def test_a_malformed_entry_that_cannot_be_read_is_kept_as_an_archiver_dead_letter(
    base_settings: Settings, redis: Redis, pg: asyncpg.Connection
) -> None:
    settings = archiver_settings(base_settings, claim_idle=0.2, max_deliveries=1)
    bad = malformed_entry(1)
    bad[bad.index("payload_b64") + 1] = "%%%"
    await append(redis, settings, "execution", [(1, bad)])
    async with running(Archiver(settings)):
        await rows_reach(pg, settings.db_schema, "dead_letter", 1)
    row = await pg.fetchrow(f'SELECT * FROM "{settings.db_schema}".dead_letter')
    assert (row["source"], row["feed"], row["message_id"]) == ("archiver", "execution", message_id(1))
    assert (row["epoch"], row["seq"]) == (EPOCH, 1)
    assert "bad field value" in row["error"] and json.loads(row["fields"])["payload_b64"] == "%%%"
    assert await pending(redis, settings, "execution") == 0
