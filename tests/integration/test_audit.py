"""`fanout audit` against the real NATS JetStream, Redis and PostgreSQL.

Each test builds a consistent pipeline state by hand, the way the services leave it:
messages published to a JetStream stream and acked by the `ingestor` consumer, the same
messages appended to the feed streams by shared/lua/ingest_append.lua, the archiver's
consumer group past them, and their catalogue rows (schema from the archiver's
migrations). Then it breaks one thing and checks the audit names it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import sys
from dataclasses import dataclass, fields
from typing import Any

import aiohttp
import pytest

from fanout.audit import AuditMetrics, AuditSettings, Report, audit, table, watch
from shared import codec, scripts
from shared.feeds import FEEDS
from shared.keys import Keys
from shared.proto import event_pb2, execution_pb2
from shared.settings import Settings

pytestmark = pytest.mark.timeout(120)


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
    created_ms: int = 0
    published: dict[int, str] | None = None  # JetStream seq -> feed

    @property
    def keys(self) -> Keys:
        return Keys(self.settings.key_prefix)

    def message_id(self, seq: int) -> str:
        return f"{self.created_ms}.{seq}"

    async def publish(self, feeds: list[str], *, ingest: bool = True, archive: bool = True) -> None:
        """Publish one message per item of `feeds`; ingest them (Lua), ack them; archive them."""
        js = self.nats.jetstream()
        s = self.settings
        await js.add_stream(name=s.js_stream, subjects=[s.subject(f) for f in FEEDS])
        self.created_ms = int((await js.stream_info(s.js_stream)).created.timestamp() * 1000)
        self.published = self.published or {}
        for i, feed in enumerate(feeds):
            ack = await js.publish(s.subject(feed), payload(feed, i))
            self.published[ack.seq] = feed
        sub = await js.pull_subscribe("", durable=s.js_consumer, stream=s.js_stream)
        msgs = await sub.fetch(len(feeds), timeout=5)
        assert len(msgs) == len(feeds)
        script = scripts.register(self.redis, "ingest_append")
        for msg in msgs:
            seq = msg.metadata.sequence.stream
            feed = self.published[seq]
            if ingest:
                await self.append(script, feed, seq, codec.decode(FEEDS[feed], msg.data))
            await msg.ack()
        await self.nats.flush()
        for feed in FEEDS:
            stream = self.keys.stream(feed)
            if await self.redis.exists(stream):
                await self.redis.xgroup_create(stream, s.archive_group, id="$" if archive else "0")
        if archive:
            await self.archive()

    async def append(self, script: Any, feed: str, seq: int, fields_: dict[str, str]) -> None:
        entry = codec.entry_fields(
            self.message_id(seq), fields_, "2026-11-28T09:13:32.123Z", "2026-11-28T09:13:32.125Z"
        )
        await script(
            keys=[self.keys.stream(feed), self.keys.meta(feed), self.keys.dedup(feed, self.message_id(seq))],
            args=[3600, "ep0ch001", seq, len(entry), *entry],
        )

    async def archive(self) -> None:
        from services.archiver.store import migrate

        await migrate(self.pg, self.settings.db_schema)
        for feed in FEEDS:
            epoch = (await self.redis.hget(self.keys.meta(feed), "epoch") or b"").decode()
            for entry_id, raw in await self.redis.xrange(self.keys.stream(feed)):
                await self.insert_row(feed, epoch, entry_id.decode(), codec.str_entry(raw))

    async def insert_row(self, feed: str, epoch: str, stream_id: str, entry: dict[str, str]) -> None:
        typed = codec.typed_message(FEEDS[feed], entry)
        ms, n = (int(x) for x in stream_id.split("-"))
        own = (
            {
                "symbol": typed["symbol"],
                "market": typed["market"],
                "price": typed["price"],
                "quantity": typed["quantity"],
                "execution_epoch": typed["executionEpoch"],
                "state_symbol": typed["stateSymbol"],
            }
            if feed == "execution"
            else {
                "sport": typed["sport"],
                "match_title": typed["match_title"],
                "data_event": typed["data_event"],
            }
        )
        cols = {
            "message_id": typed["message_id"],
            "epoch": epoch,
            "seq": typed["seq"],
            "stream_id": stream_id,
            "entry_ms": ms,
            "entry_n": n,
            "broker_time": codec.parse_iso(typed["broker_time"]),
            "ingest_time": codec.parse_iso(typed["ingest_time"]),
            **own,
            "message": json.dumps(typed),
        }
        names = ", ".join(cols)
        marks = ", ".join(f"${i}" for i in range(1, len(cols) + 1))
        await self.pg.execute(
            f'INSERT INTO "{self.settings.db_schema}".{feed} ({names}) VALUES ({marks})', *cols.values()
        )


@pytest.fixture
async def pipeline(settings: AuditSettings, redis: Any, pg: Any, nats: Any) -> Pipeline:
    return Pipeline(settings, redis, pg, nats)


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


async def test_a_duplicate_row_is_named(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    # The same stream entry catalogued twice under another message id.
    row = await pipeline.pg.fetchrow(f'SELECT * FROM "{s.db_schema}".execution WHERE seq = 2')
    await pipeline.pg.execute(
        f'INSERT INTO "{s.db_schema}".execution SELECT $1, epoch, seq, stream_id, entry_ms, entry_n + 1000,'
        f" broker_time, ingest_time, archived_at, symbol, market, price, quantity, execution_epoch,"
        f' state_symbol, message FROM "{s.db_schema}".execution WHERE seq = 2',
        f"{pipeline.created_ms}.999",
    )
    report = await audit(s)
    assert report.feeds["execution"].duplicates == 1
    assert report.feeds["sport_event"].discrepancies == 0
    assert f"epoch {row['epoch']} seq 2" in problems(report)
    assert "duplicate rows in Postgres" in problems(report)


async def test_a_missing_row_is_named(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    gone = await pipeline.pg.fetchval(
        f'DELETE FROM "{s.db_schema}".sport_event WHERE seq = 2 RETURNING message_id'
    )
    report = await audit(s)
    assert report.feeds["sport_event"].missing == 1, table(report)
    assert report.feeds["execution"].discrepancies == 0
    assert f"{gone} (seq 2" in problems(report)
    assert "without a Postgres row" in problems(report)


async def test_a_seq_gap_is_named_in_redis_postgres_and_against_jetstream(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    stream = pipeline.keys.stream("execution")
    entry_id, raw = (await pipeline.redis.xrange(stream))[2]  # seq 3
    message_id = raw[b"message_id"].decode()
    await pipeline.redis.xdel(stream, entry_id)
    await pipeline.pg.execute(f'DELETE FROM "{s.db_schema}".execution WHERE seq = 3')
    report = await audit(s)
    ex = report.feeds["execution"]
    text = problems(report)
    assert ex.seq_gaps == 2, table(report)  # once in the Redis stream, once in Postgres
    assert ex.missing == 1  # and the JetStream message is nowhere
    assert "seqs missing in the Redis stream: seq 3..3" in text
    assert "seqs missing in Postgres: epoch ep0ch001 seq 3..3" in text
    assert message_id in text


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
    sub = await js.pull_subscribe("", durable=s.js_consumer, stream=s.js_stream)
    (msg,) = await sub.fetch(1, timeout=5)
    await msg.ack_sync()
    # Published, not yet delivered: in flight.
    await js.publish(s.subject("execution"), payload("execution", 101))
    report = await audit(s)
    assert report.feeds["sport_event"].missing == 1, table(report)
    assert pipeline.message_id(lost.seq) in problems(report)
    assert report.feeds["execution"].in_flight == 1
    assert report.feeds["execution"].discrepancies == 0


async def test_a_dead_lettered_message_is_accounted_for(pipeline: Pipeline) -> None:
    await pipeline.publish(MIX)
    s = pipeline.settings
    js = pipeline.nats.jetstream()
    bad = await js.publish(s.subject("execution"), b"\xff\x00garbage")
    sub = await js.pull_subscribe("", durable=s.js_consumer, stream=s.js_stream)
    (msg,) = await sub.fetch(1, timeout=5)
    script = scripts.register(pipeline.redis, "ingest_append")
    message_id = pipeline.message_id(bad.seq)
    dl = [
        "message_id", message_id, "subject", s.subject("execution"), "broker_seq", str(bad.seq),
        "error", "not a valid protobuf", "payload_b64", base64.b64encode(msg.data).decode(),
        "broker_time", "2026-11-28T09:13:32.123Z", "ingest_time", "2026-11-28T09:13:32.125Z",
    ]  # fmt: skip
    dead = "dead_letter"
    await script(
        keys=[pipeline.keys.stream(dead), pipeline.keys.meta(dead), pipeline.keys.dedup(dead, message_id)],
        args=[3600, "dl000001", bad.seq, len(dl), *dl],
    )
    await msg.ack_sync()
    report = await audit(s)
    assert report.discrepancies == 0, table(report)
    assert report.feeds["execution"].dead_letters == 1
    # The same message ALSO in its feed: accounted twice.
    await pipeline.append(
        script, "execution", bad.seq, codec.decode(FEEDS["execution"], payload("execution", 0))
    )
    report = await audit(s)
    assert report.feeds["execution"].duplicates == 1, table(report)
    assert message_id in problems(report)


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
