"""The hub's recent window against the real stores: subscribers resuming inside it, just
before it (Redis), far behind it (the catalogue, then Redis, then the window), and across a
restart of the gateway process (the new process fills its window from Redis), each get
exactly the seqs after their cursor, judged by message id against what the Writer
appended."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.sse_gateway import cursor
from services.sse_gateway.cursor import Position
from services.sse_gateway.protocol import StreamProtocol
from shared.feeds import FEED_NAMES
from shared.keys import Keys
from tests.integration.test_gateway_helpers import (
    EPOCH,
    Event,
    GatewayProcess,
    Stream,
    Writer,
    archive,
    cancel,
    inprocess_gateway,
    open_stream,
    xrange_all,
)
from tests.integration.test_gateway_restart import Client

pytestmark = pytest.mark.timeout(180)


def feed_events(stream: Stream) -> list[Event]:
    return [e for e in stream.events if e.event in FEED_NAMES]


def at(feed: str, seq: int) -> str:
    return cursor.format({feed: Position(EPOCH, seq)}, [feed])


def window(app: Any, after: int) -> list[int] | None:
    records = app.state.hub.recent("execution", EPOCH, after, 1000)
    return None if records is None else [r.seq for r in records]


async def test_resumes_inside_before_and_far_behind_the_window_each_exactly(
    make_settings: Any, redis: Any, pg: Any, writer: Writer
) -> None:
    settings = make_settings(hub_recent=10, catchup_batch=4)
    await writer.append("execution", 40)
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    await archive(pg, settings.db_schema, "execution", entries[:30])  # the archiver committed 1..30
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=25, approximate=False)  # 16..40
    cursors = {"catalogue": 3, "redis": 20, "before the window": 29, "its first": 30, "inside": 35, "top": 40}
    async with inprocess_gateway(settings, http=StreamProtocol) as app:
        await app.state.hub.wait_ready("execution")
        assert window(app, 30) == list(range(31, 41))  # filled from Redis when the reader started
        assert window(app, 29) is None  # seq 30 is not in it: History answers
        streams = {
            name: await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", c)})
            for name, c in cursors.items()
        }
        await writer.append("execution", 12)  # 41..52, live; the window moves on to 43..52
        for name, s in streams.items():
            await s.collect(52 - cursors[name])
        assert window(app, 42) == list(range(43, 53))
        assert window(app, 41) is None
        cursors["behind the moved window"] = 38  # Redis, then the window or live
        streams["behind the moved window"] = late = await open_stream(
            app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", 38)}
        )
        await late.collect(52 - 38)
        for s in streams.values():
            s.close()
    expected = writer.expected("execution")
    for name, s in streams.items():
        events = feed_events(s)
        assert [e.json()["seq"] for e in events] == list(range(cursors[name] + 1, 53)), name
        assert [e.json()["message_id"] for e in events] == expected[cursors[name] :], name
        assert not [e for e in s.events if e.event in ("gap", "reset")], name


async def test_across_a_restart_every_subscriber_resumes_exactly(make_settings: Any, writer: Writer) -> None:
    """The new process fills its window from Redis (what was written while it was down
    included); clients dropped by its SIGTERM resume from that window, one far behind
    from Redis."""
    settings = make_settings()
    for feed in FEED_NAMES:
        await writer.append(feed, 30)
    gateway = GatewayProcess(settings, None, FANOUT_HUB_RECENT="20")
    await gateway.start()
    progress = asyncio.Condition()
    done = asyncio.Event()
    starts = [(0, 0), (12, 29), (25, 5), (29, 30), (30, 30)]  # (execution, sport_event) cursors
    clients: list[tuple[Client, tuple[int, int]]] = []
    tasks: list[asyncio.Task[None]] = []

    def join(start: tuple[int, int]) -> None:
        client = Client(gateway.port, progress)
        if start != (0, 0):
            positions = {f: Position(EPOCH, s) for f, s in zip(FEED_NAMES, start, strict=True)}
            client.last_id = cursor.format(positions, FEED_NAMES)
        clients.append((client, start))
        tasks.append(asyncio.create_task(client.run(done)))

    async def all_have(top: int) -> None:
        async with asyncio.timeout(60), progress:
            await progress.wait_for(lambda: all(c.count() >= 2 * top - sum(s) for c, s in clients))

    try:
        for start in starts:
            join(start)
        await all_have(30)
        assert await asyncio.to_thread(gateway.terminate, 30) == 0
        for feed in FEED_NAMES:
            await writer.append(feed, 10)  # 31..40 while it is down
        await gateway.start()
        join((3, 4))  # far behind the new window (21..40): from Redis
        for feed in FEED_NAMES:
            await writer.append(feed, 5)  # 41..45, live
        await all_have(45)
        assert "Traceback" not in gateway.stderr()
    finally:
        done.set()
        await cancel(tasks)
        gateway.close()
    for client, start in clients:
        for feed, after in zip(FEED_NAMES, start, strict=True):
            assert client.seqs[feed] == list(range(after + 1, 46)), (feed, start)
            assert client.seen[feed] == writer.expected(feed)[after:], (feed, start)
    assert all(c.connects >= 2 for c, _ in clients[: len(starts)])  # each was dropped and came back
