"""Contract v2 against the real Redis and PostgreSQL: a Redis that loses data (emptied,
or a failover to a replica that had less) and is refilled with the same ids is invisible
to subscribers: every live subscriber gets every seq exactly once, with no notice, and
a cursor ahead of what Redis holds waits and resumes exactly. Each subscriber is judged
against what was appended (the Writer's record), not against the gateway's output.

And the hub cannot stall: a refill larger than the reader's batch (the reported stall),
a reader that raises an unexpected exception (it restarts; /readyz is red meanwhile),
an entry that cannot be placed (stepped over loudly)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from services.sse_gateway import cursor
from services.sse_gateway.cursor import Position
from services.sse_gateway.settings import GatewaySettings
from shared.feeds import FEED_NAMES
from shared.keys import Keys
from tests.integration.test_gateway_helpers import (
    EPOCH,
    Stream,
    Writer,
    archive,
    inprocess_gateway,
    open_stream,
    xrange_all,
)

pytestmark = pytest.mark.timeout(180)

TOP = 3000  # entries lost and refilled: more than the reader's batch
BATCH = 500  # FANOUT_READER_BATCH in these tests
NEW = 100  # appended after the refill


@pytest.fixture
def settings(make_settings: Any) -> GatewaySettings:
    return make_settings(reader_batch=BATCH, reader_block=0.2, catchup_batch=200)  # type: ignore[no-any-return]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Listener:
    """One subscriber: everything it got, per feed, by message id and seq."""

    def __init__(self, stream: Stream, feeds: tuple[str, ...]) -> None:
        self.stream = stream
        self.feeds = feeds

    async def until(self, counts: dict[str, int], within: float = 60.0) -> None:
        """Read until it has `counts[feed]` events of each of its feeds."""
        have = {f: sum(1 for e in self.stream.events if e.event == f) for f in self.feeds}
        async with asyncio.timeout(within):
            while any(have[f] < counts[f] for f in self.feeds):
                event = await self.stream.next(within)
                if event.event in have:
                    have[event.event] += 1

    def got(self, feed: str) -> list[tuple[str, int]]:
        return [(e.json()["message_id"], e.json()["seq"]) for e in self.stream.events if e.event == feed]

    def notices(self) -> list[str]:
        return [e.event for e in self.stream.events if e.event and e.event not in FEED_NAMES]


def expected(writer: Writer, feed: str, first: int = 1) -> list[tuple[str, int]]:
    return [(m, s) for s, m in enumerate(writer.expected(feed), start=1) if s >= first]


async def lose(redis: Any, prefix: str) -> None:
    """Redis loses both feeds' streams and meta hashes (the dedup keys may survive: the
    ingest script copes with keys that outlived their entries)."""
    keys = Keys(prefix)
    await redis.delete(*[k for f in FEED_NAMES for k in (keys.stream(f), keys.meta(f))])


@pytest.mark.parametrize(
    ("kept", "archived"),
    [
        pytest.param(0, 0, id="emptied-nothing-archived"),
        pytest.param(0, 1500, id="emptied-half-archived"),
        pytest.param(2000, 0, id="failover-to-a-replica-1000-behind"),
    ],
)
async def test_redis_losing_data_and_refilled_with_the_same_ids_is_invisible_to_subscribers(
    settings: GatewaySettings, redis: Any, pg: Any, writer: Writer, kept: int, archived: int
) -> None:
    sports = TOP // 10
    async with inprocess_gateway(settings) as app:
        port = app.state.port
        choices = [("execution",), ("sport_event",), FEED_NAMES]
        listeners = []
        for i in range(8):  # live from the start, before anything was appended
            feeds = choices[i % 3]
            stream = await open_stream(port, "feeds=" + ",".join(feeds))
            await stream.next()  # the start frame: live
            listeners.append(Listener(stream, feeds))
        for _ in range(TOP // BATCH):
            await writer.append("execution", BATCH)
            await writer.append("sport_event", BATCH // 10)
        for listener in listeners:
            await listener.until({"execution": TOP, "sport_event": sports})
        # per feed: how far the archiver got, and how far the Redis that takes over holds
        done = {"execution": archived, "sport_event": archived // 10}
        held = {"execution": kept, "sport_event": kept // 10}
        for feed in FEED_NAMES:
            entries = await xrange_all(redis, settings.key_prefix, feed)
            archived_entries = [e for e in entries if int(e[1]["seq"]) <= done[feed]]
            await archive(pg, settings.db_schema, feed, archived_entries)
        loss = metric("fanout_gateway_gaps_total"), metric("fanout_gateway_resets_total")

        await lose(redis, settings.key_prefix)
        # what the replica had (a failover), or nothing (an empty Redis); the ingestor
        # then refills from the first seq not archived
        for feed in FEED_NAMES:
            if held[feed]:
                await writer.refill(feed, done[feed] + 1, held[feed])
        # a subscriber whose cursor is ahead of what Redis holds (it waits), one from
        # the catalogue's side of the refill, and one from latest
        one = ("execution",)
        ahead = Listener(await open_stream(port, "feeds=execution", {"Last-Event-ID": _at(2500)}), one)
        behind = Listener(await open_stream(port, "feeds=execution", {"Last-Event-ID": _at(1000)}), one)
        latest = Listener(await open_stream(port, "feeds=execution"), one)
        assert [s.stream.status for s in (ahead, behind, latest)] == [200, 200, 200]
        for feed in FEED_NAMES:
            await writer.refill(feed, max(done[feed], held[feed]) + 1)
        await writer.append("execution", NEW)
        await writer.append("sport_event", NEW)

        for listener in listeners:
            await listener.until({"execution": TOP + NEW, "sport_event": sports + NEW})
        await ahead.until({"execution": TOP + NEW - 2500})
        await behind.until({"execution": TOP + NEW - 1000})
        await latest.until({"execution": NEW})
        for listener in [*listeners, ahead, behind, latest]:
            listener.stream.close()
    for listener in listeners:
        for feed in listener.feeds:
            assert listener.got(feed) == expected(writer, feed), feed
        assert listener.notices() == []
    assert ahead.got("execution") == expected(writer, "execution", 2501)
    assert behind.got("execution") == expected(writer, "execution", 1001)
    assert latest.got("execution") == expected(writer, "execution", TOP + 1)
    assert ahead.notices() == behind.notices() == latest.notices() == []
    assert (metric("fanout_gateway_gaps_total"), metric("fanout_gateway_resets_total")) == loss


def _at(seq: int) -> str:
    return cursor.format({"execution": Position(EPOCH, seq)}, ["execution"])


async def _readyz(port: int) -> tuple[int, dict[str, str]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/readyz") as reply:
        return reply.status, (await reply.json())["checks"]


async def test_a_reader_that_raises_anything_restarts_and_readyz_is_red_meanwhile(
    settings: GatewaySettings,
    redis: Any,
    writer: Writer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    restarts = metric("fanout_gateway_reader_restarts_total", feed="execution")
    await writer.append("execution", 3)
    async with inprocess_gateway(settings) as app:
        hub = app.state.hub
        stream = await open_stream(app.state.port, "feeds=execution")
        await stream.next()
        real = hub.redis.xread
        failed = asyncio.Event()
        fixed = asyncio.Event()

        async def xread(*args: Any, **kwargs: Any) -> Any:
            if not fixed.is_set():
                failed.set()
                raise ZeroDivisionError("injected: not a Redis error")
            return await real(*args, **kwargs)

        monkeypatch.setattr(hub.redis, "xread", xread)
        await failed.wait()
        status, checks = await _readyz(app.state.port)
        assert status == 503 and checks["reader:execution"] == "failing"
        await writer.append("execution", 2)  # while the reader is down
        fixed.set()
        for feed in FEED_NAMES:
            await hub.wait_ready(feed)
        status, checks = await _readyz(app.state.port)
        assert status == 200, checks
        got = await stream.collect(2)
        # an entry that cannot be placed (its id is not `<seq>-0`): stepped over, loudly
        await redis.xadd(Keys(settings.key_prefix).stream("execution"), {"junk": "1"}, id="5-1")
        await writer.append("execution", 2)
        got += await stream.collect(2)
        stream.close()
    assert [e.json()["seq"] for e in got] == [4, 5, 6, 7]
    assert [e.json()["message_id"] for e in got] == writer.expected("execution")[3:]
    assert [e.event for e in stream.events if e.event not in FEED_NAMES and e.event] == []
    assert metric("fanout_gateway_reader_restarts_total", feed="execution") > restarts
    failures = [r for r in caplog.records if r.getMessage() == "feed reader failed; restarting it"]
    assert failures and failures[0].exc_info is not None
    assert "reading again" in caplog.text
    assert any(r.getMessage() == "stream entry without a valid seq skipped" for r in caplog.records)


async def test_a_gateway_started_on_an_emptied_redis_resumes_cursors_from_the_catalogue_then_the_refill(
    settings: GatewaySettings, redis: Any, pg: Any, writer: Writer
) -> None:
    await writer.append("execution", 2000)
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    await archive(pg, settings.db_schema, "execution", entries[:1500])  # the archiver got to 1500
    await lose(redis, settings.key_prefix)  # while the gateway was down
    async with inprocess_gateway(settings) as app:
        resumed = Listener(
            await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": _at(1000)}), ("execution",)
        )
        await resumed.until({"execution": 500})  # 1001..1500 from the catalogue; then it waits
        await writer.refill("execution", 1501)  # the ingestor refills what was not archived
        await writer.append("execution", NEW)
        await resumed.until({"execution": 1000 + NEW})
        resumed.stream.close()
        assert app.state.hub.positions["execution"] == Position(EPOCH, 2000 + NEW)
    assert resumed.got("execution") == expected(writer, "execution", 1001)
    assert resumed.notices() == []


async def test_redis_emptied_while_postgres_is_down_resumed_cursors_wait_for_the_refill(
    settings: GatewaySettings, redis: Any, writer: Writer
) -> None:
    from tests.integration.test_gateway_helpers import free_port

    no_catalogue = dataclasses.replace(settings, database_url=f"postgresql://127.0.0.1:{free_port()}/nothing")
    await writer.append("execution", 100)
    async with inprocess_gateway(no_catalogue) as app:
        live = Listener(await open_stream(app.state.port, "feeds=execution&from=earliest"), ("execution",))
        await live.until({"execution": 100})
        await lose(redis, settings.key_prefix)
        resumed = Listener(
            await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": _at(50)}), ("execution",)
        )
        await resumed.stream.next()  # its start frame: it waits (not the end of the stream)
        await writer.refill("execution", 1)  # nothing was archived: the ingestor refills from seq 1
        await writer.append("execution", NEW)
        await live.until({"execution": 100 + NEW})
        await resumed.until({"execution": 50 + NEW})
        live.stream.close()
        resumed.stream.close()
    assert live.got("execution") == expected(writer, "execution")
    assert resumed.got("execution") == expected(writer, "execution", 51)
    assert live.notices() == resumed.notices() == []
