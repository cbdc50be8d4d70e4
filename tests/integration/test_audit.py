"""`fanout audit` against the real NATS JetStream, Redis and PostgreSQL (contract v2).

Each test builds a consistent pipeline state by hand, the way the services leave it:
messages published to the per-feed JetStream streams and acked by the `ingestor`
consumer, the same messages appended to the feed streams at their positions (XADD
`<seq>-0`, message id `<epoch>.<seq>`; a payload that does not decode as a malformed
entry), the archiver's consumer group past them, and their catalogue rows (made by the
archiver's own row functions and store). Then it breaks one thing and checks the audit
names it.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, fields
from typing import Any

import aiohttp
import pytest

from fanout.audit import AuditMetrics, AuditSettings, Report, audit, table, watch
from services.archiver.rows import feed_row, malformed_row
from services.archiver.store import Store
from shared import codec
from shared.feeds import FEED_NAMES, FEEDS, js_stream_name
from shared.keys import Keys
from shared.proto import event_pb2, execution_pb2
from shared.settings import Settings

pytestmark = pytest.mark.timeout(120)

TIMES = ("2026-11-28T09:13:32.123Z", "2026-11-28T09:13:32.125Z")


@pytest.fixture
def settings(base_settings: Settings) -> AuditSettings:
    values = {f.name: getattr(base_settings, f.name) for f in fields(Settings)}
    return AuditSettings.from_env({}, **values, audit_http=("127.0.0.1", 0), audit_interval=0.2)


def payload(feed: str, i: int) -> bytes:
    if feed == "execution":
        return execution_pb2.execution(
            symbol=f"SYM{i % 7}",
            market="NASDAQ",
            price=100.25 + i,
            quantity=10,
            executionEpoch=1764321212345 + i,
            stateSymbol="CA",
        ).SerializeToString()
    return event_pb2.event(
        sport=2, match_title="Lakers vs Celtics", data_event=f"basket #{i}"
    ).SerializeToString()


@dataclass
class Pipeline:
    settings: AuditSettings
    redis: Any
    pg: Any
    nats: Any
    epochs: dict[str, str] = field(default_factory=dict)

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)

    def stream(self, feed: str) -> str:
        return js_stream_name(self.settings.js_stream, feed)

    async def streams(self) -> None:
        js = self.nats.jetstream()
        for feed in FEED_NAMES:
            info = await js.add_stream(name=self.stream(feed), subjects=[self.settings.subject(feed)])
            self.epochs[feed] = str(int(info.created.timestamp() * 1000))

    async def publish(
        self, feeds: list[str], *, ingest: bool = True, archive: bool = True, bad: bytes | None = None
    ) -> None:
        """Publish one message per item of `feeds` (`bad` as the payload of the last one),
        ingest them (XADD at their seq), ack them, archive them."""
        if not self.epochs:
            await self.streams()
        js = self.nats.jetstream()
        s = self.settings
        for i, feed in enumerate(feeds):
            last = bad is not None and i == len(feeds) - 1
            await js.publish(s.subject(feed), bad if last else payload(feed, i))
        for feed in FEED_NAMES:
            count = feeds.count(feed)
            if not count:
                continue
            sub = await js.pull_subscribe(s.subject(feed), durable=s.js_consumer, stream=self.stream(feed))
            msgs = await sub.fetch(count, timeout=5)
            assert len(msgs) == count
            for msg in msgs:
                if ingest:
                    await self.ingest(feed, msg.metadata.sequence.stream, msg.data)
                await msg.ack_sync()
            stream = self.keys.stream(feed)
            if ingest and not await self.has_group(stream):
                await self.redis.xgroup_create(stream, s.archive_group, id="0")
        if archive:
            await self.archive()

    async def has_group(self, stream: str) -> bool:
        try:
            return bool(await self.redis.xinfo_groups(stream))
        except Exception:  # noqa: BLE001 - no such key
            return False

    async def ingest(self, feed: str, seq: int, data: bytes) -> None:
        message_id = f"{self.epochs[feed]}.{seq}"
        try:
            entry = codec.entry_fields(message_id, codec.decode(FEEDS[feed], data), *TIMES)
        except codec.BadPayload as exc:
            entry = codec.malformed_fields(message_id, str(exc), data, *TIMES)
        await self.xadd(feed, seq, ["seq", str(seq), *entry])

    async def xadd(self, feed: str, seq: int, flat: list[str]) -> None:
        await self.redis.xadd(
            self.keys.stream(feed), dict(zip(flat[::2], flat[1::2], strict=True)), id=f"{seq}-0"
        )
        await self.redis.hset(self.keys.meta(feed), mapping={"epoch": self.epochs[feed], "seq": seq})

    async def archive(self) -> None:
        """What the archiver does: read with the group, store the rows, then XACK."""
        s = self.settings
        store = Store(s.database_url, s.db_schema, pool_size=1)
        await store.open()
        try:
            for feed in FEED_NAMES:
                stream = self.keys.stream(feed)
                if not await self.redis.exists(stream):
                    continue
                reply = await self.redis.xreadgroup(s.archive_group, "audit-test", {stream: ">"})
                for _, entries in reply:
                    rows, dead = [], []
                    for entry_id, raw in entries:
                        fields_ = codec.str_entry(raw)
                        eid = entry_id.decode()
                        if codec.is_malformed(fields_):
                            dead.append(malformed_row(feed, s.subject(feed), eid, fields_))
                        else:
                            rows.append(feed_row(FEEDS[feed], eid, fields_))
                    await store.insert_entries(feed, rows, dead)
                    await self.redis.xack(stream, s.archive_group, *(e for e, _ in entries))
        finally:
            await store.close()


@pytest.fixture
async def pipeline(settings: AuditSettings, redis: Any, pg: Any, nats: Any) -> AsyncIterator[Pipeline]:
    from nats.js.errors import NotFoundError

    yield Pipeline(settings, redis, pg, nats)
    for feed in FEED_NAMES:
        try:
            await nats.jetstream().delete_stream(js_stream_name(settings.js_stream, feed))
        except NotFoundError:
            pass


MIX = ["execution", "sport_event", "execution", "execution", "sport_event", "execution", "sport_event"]


def problems(report: Report) -> str:
    return "\n".join(p for a in report.feeds.values() for p in a.problems)


async def test_a_clean_pipeline_reconciles(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    report = await audit(pipeline.settings)
    assert report.discrepancies == 0, table(report)
    ex, sp = report.feeds["execution"], report.feeds["sport_event"]
    assert (ex.jetstream, ex.redis, ex.postgres) == (4, 4, 4)
    assert (sp.jetstream, sp.redis, sp.postgres) == (3, 3, 3)
    assert report.lag == 0
    assert "OK" in table(report)


async def test_a_malformed_message_is_accounted_for_by_its_dead_letter(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX, bad=b"\xff\x00garbage")  # sport_event seq 3
    report = await audit(pipeline.settings)
    assert report.discrepancies == 0, table(report)
    sp = report.feeds["sport_event"]
    assert (sp.jetstream, sp.redis, sp.postgres, sp.dead_letters) == (3, 3, 2, 1)


async def test_a_position_catalogued_twice_is_named(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    epoch = pipeline.epochs["execution"]
    # Seq 2 also as a dead letter: two places for one position.
    await pipeline.pg.execute(
        f'INSERT INTO "{s.db_schema}".dead_letter (source, feed, message_id, stream_id, error, epoch, seq)'
        " VALUES ('archiver', 'execution', $1, '2-0', 'e', $2, 2)",
        f"{epoch}.2",
        epoch,
    )
    report = await audit(s)
    assert report.feeds["execution"].duplicates == 1, table(report)
    assert report.feeds["sport_event"].discrepancies == 0
    assert f"epoch {epoch} seq 2" in problems(report)
    assert "positions catalogued twice" in problems(report)


async def test_a_missing_row_is_named(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    gone = await pipeline.pg.fetchval(
        f'DELETE FROM "{s.db_schema}".sport_event WHERE seq = 2 RETURNING message_id'
    )
    report = await audit(s)
    assert report.feeds["sport_event"].missing == 1, table(report)
    assert report.feeds["execution"].discrepancies == 0
    assert gone in problems(report)
    assert "archived Redis entries without a row" in problems(report)


async def test_a_seq_gap_is_named_in_redis_and_against_jetstream(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    stream = pipeline.keys.stream("execution")
    await pipeline.redis.xdel(stream, "3-0")
    await pipeline.pg.execute(f'DELETE FROM "{s.db_schema}".execution WHERE seq = 3')
    report = await audit(s)
    ex = report.feeds["execution"]
    text = problems(report)
    assert ex.seq_gaps == 1, table(report)  # in the Redis stream
    assert ex.missing == 1  # and the JetStream message is nowhere
    assert "seqs missing in the Redis stream: seq 3..3" in text
    assert f"{pipeline.epochs['execution']}.3" in text


async def test_a_hole_below_what_jetstream_and_redis_hold_is_a_seq_gap(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    # JetStream and Redis no longer hold seqs 1..3 (max age, the hot window): PostgreSQL
    # is the only place for them, and seq 2 is not there.
    await pipeline.nats.jetstream().purge_stream(pipeline.stream("execution"), seq=4)
    await pipeline.redis.xtrim(pipeline.keys.stream("execution"), minid="4-0", approximate=False)
    await pipeline.pg.execute(f'DELETE FROM "{s.db_schema}".execution WHERE seq = 2')
    report = await audit(s)
    ex = report.feeds["execution"]
    assert (ex.seq_gaps, ex.missing) == (1, 0), table(report)
    assert f"epoch {pipeline.epochs['execution']} seq 2..2" in problems(report)


async def test_an_entry_not_at_its_position_is_a_mismatch(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    epoch = pipeline.epochs["sport_event"]
    entry = codec.entry_fields(f"{epoch}.9", codec.decode(FEEDS["sport_event"], payload("x", 1)), *TIMES)
    await pipeline.xadd("sport_event", 4, ["seq", "9", *entry])  # id 4-0 says seq 9
    report = await audit(pipeline.settings)
    sp = report.feeds["sport_event"]
    assert sp.mismatches == 1, table(report)
    assert "entry 4-0: seq '9'" in problems(report)


async def test_lag_is_reported_but_is_not_a_discrepancy(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX, archive=False)
    report = await audit(pipeline.settings)
    assert report.discrepancies == 0, table(report)
    assert report.feeds["execution"].unarchived == 4 and report.feeds["sport_event"].unarchived == 3
    assert "not yet ingested or archived" in table(report)


async def test_a_message_acked_but_never_ingested_is_missing_one_not_acked_is_in_flight(
    pipeline: Pipeline,
) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    js = pipeline.nats.jetstream()
    # Acked without reaching Redis: lost.
    lost = await js.publish(s.subject("sport_event"), payload("sport_event", 100))
    sub = await js.pull_subscribe(
        s.subject("sport_event"), durable=s.js_consumer, stream=pipeline.stream("sport_event")
    )
    (msg,) = await sub.fetch(1, timeout=5)
    await msg.ack_sync()
    # Published, not yet delivered: in flight.
    await js.publish(s.subject("execution"), payload("execution", 101))
    report = await audit(s)
    assert report.feeds["sport_event"].missing == 1, table(report)
    assert f"{pipeline.epochs['sport_event']}.{lost.seq}" in problems(report)
    assert report.feeds["execution"].in_flight == 1
    assert report.feeds["execution"].discrepancies == 0


async def test_a_recreated_jetstream_stream_keeps_the_old_epochs_rows_and_starts_a_new_one(
    pipeline: Pipeline,
) -> None:
    await pipeline.publish(MIX)
    old = pipeline.epochs["execution"]
    js = pipeline.nats.jetstream()
    await js.delete_stream(pipeline.stream("execution"))
    await pipeline.redis.delete(pipeline.keys.stream("execution"), pipeline.keys.meta("execution"))
    info = await js.add_stream(
        name=pipeline.stream("execution"), subjects=[pipeline.settings.subject("execution")]
    )
    pipeline.epochs["execution"] = str(int(info.created.timestamp() * 1000))
    assert pipeline.epochs["execution"] != old
    await pipeline.publish(["execution", "execution"])
    report = await audit(pipeline.settings)
    assert report.discrepancies == 0, table(report)
    assert report.feeds["execution"].postgres == 6


async def test_the_watch_mode_exports_the_counts(pipeline: Pipeline) -> None:
    from prometheus_client import CollectorRegistry

    await pipeline.publish(MIX)
    s = pipeline.settings
    await pipeline.pg.execute(f'DELETE FROM "{s.db_schema}".execution WHERE seq = 1')
    registry = CollectorRegistry()
    stop = asyncio.Event()
    port: list[int] = []
    task = asyncio.create_task(watch(s, stop, AuditMetrics(registry), port))
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        # Nothing to await on: poll the registry for the first completed audit.
        while not registry.get_sample_value("fanout_audit_last_run_timestamp_seconds"):
            assert loop.time() < deadline and not task.done(), "no audit completed"
            await asyncio.sleep(0.05)
        assert registry.get_sample_value("fanout_audit_missing_total", {"feed": "execution"}) == 1
        assert registry.get_sample_value("fanout_audit_missing_total", {"feed": "sport_event"}) == 0
        assert registry.get_sample_value("fanout_audit_duplicates_total", {"feed": "execution"}) == 0
        assert registry.get_sample_value("fanout_audit_mismatches_total", {"feed": "execution"}) == 0
        assert registry.get_sample_value("fanout_audit_up") == 1
        async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port[0]}/readyz") as ready:
            assert ready.status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def _cli(settings: AuditSettings, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "NATS_URL": settings.nats_url,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "FANOUT_KEY_PREFIX": settings.key_prefix,
        "FANOUT_SUBJECT_PREFIX": settings.subject_prefix,
        "FANOUT_JS_STREAM": settings.js_stream,
        "FANOUT_DB_SCHEMA": settings.db_schema,
    }
    return subprocess.run(
        [sys.executable, "-m", "fanout", "audit", *extra], env=env, capture_output=True, text=True, timeout=60
    )


async def test_the_command_exits_0_1_2(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    done = await asyncio.to_thread(_cli, s)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout and "execution" in done.stdout
    await pipeline.pg.execute(f'DELETE FROM "{s.db_schema}".execution WHERE seq = 1')
    done = await asyncio.to_thread(_cli, s, "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    assert json.loads(done.stdout)["feeds"]["execution"]["missing"] == 1
    done = await asyncio.to_thread(_cli, s, "--redis-url", "redis://127.0.0.1:1/0")
    assert done.returncode == 2
    assert "Redis at redis://127.0.0.1:1/0 is unreachable" in done.stderr
    assert "Traceback" not in done.stderr
