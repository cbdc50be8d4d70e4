"""The SSE gateway against the real Redis and PostgreSQL: exact resumption (one feed,
both feeds, filtered), history from the catalogue, gaps and resets reported in-band,
slow clients, bad requests, limits and the ops endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from services.sse_gateway import cursor
from services.sse_gateway.cursor import Position
from shared.keys import Keys
from tests.integration.test_gateway_helpers import (
    EPOCH,
    Event,
    Stream,
    Writer,
    archive,
    inprocess_gateway,
    open_stream,
    xrange_all,
)

pytestmark = pytest.mark.timeout(120)

OLD_EPOCH = str(int(EPOCH) - 86_400_000)  # the JetStream stream before it was recreated
NEW_EPOCH = str(int(EPOCH) + 86_400_000)  # ... and after


def feed_events(stream: Stream) -> list[Event]:
    return [e for e in stream.events if e.event in ("execution", "sport_event")]


def seqs(events: list[Event], feed: str) -> list[int]:
    return [e.json()["seq"] for e in events if e.event == feed]


def at(feed: str, seq: int, epoch: str = EPOCH) -> str:
    return cursor.format({feed: Position(epoch, seq)}, [feed])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- exact resumption ------------------------------------------------------------------


async def test_one_feed_resumes_exactly_after_a_disconnect(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    await writer.append("execution", 20)
    async with inprocess_gateway(make_settings()) as app:
        first = await open_stream(app.state.port, "feeds=execution&from=earliest")
        assert first.status == 200
        assert first.headers["content-type"].startswith("text/event-stream")
        assert first.headers["cache-control"] == "no-cache"
        assert first.headers["x-accel-buffering"] == "no"
        await first.collect(8)
        first.close()
        await writer.append("execution", 10)  # while disconnected
        second = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": first.last_id or ""})
        await second.collect(22)
        await writer.append("execution", 5)  # live
        await second.collect(5)
        second.close()
    got = [e.json()["message_id"] for e in feed_events(first) + feed_events(second)]
    assert got == writer.expected("execution")
    assert seqs(feed_events(first) + feed_events(second), "execution") == list(range(1, 36))


async def test_both_feeds_resume_exactly_with_the_query_parameter(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    for _ in range(5):
        await writer.append("execution", 3)
        await writer.append("sport_event", 2)
    async with inprocess_gateway(make_settings()) as app:
        streams = [await open_stream(app.state.port, "from=earliest")]
        await streams[0].collect(7)
        for k, param in enumerate(["last_event_id", "lastEventID", "last_event_id"]):
            streams[-1].close()
            await writer.append("sport_event", 4)
            await writer.append("execution", 3)
            streams.append(await open_stream(app.state.port, f"{param}={streams[-1].last_id}"))
            await streams[-1].collect(3 + k)
        streams[-1].close()
        final = await open_stream(app.state.port, f"last_event_id={streams[-1].last_id}")
        streams.append(final)
        total = 5 * 5 + 3 * 7
        await final.collect(total - sum(len(feed_events(s)) for s in streams))
        final.close()
    events = [e for s in streams for e in feed_events(s)]
    for feed in ("execution", "sport_event"):
        assert [e.json()["message_id"] for e in events if e.event == feed] == writer.expected(feed)


async def test_a_cursor_taken_from_the_other_feed_resumes_exactly(make_settings: Any, writer: Writer) -> None:
    await writer.append("execution", 4)
    await writer.append("sport_event", 4)
    async with inprocess_gateway(make_settings()) as app:
        both = await open_stream(app.state.port, "from=earliest")
        events = await both.collect(8)
        both.close()
        sport_id = next(e.id for e in events if e.event == "sport_event" and e.json()["seq"] == 2)
        # the cursor of sport_event seq 2 also holds execution seq 4: resume execution alone from it
        await writer.append("execution", 2)
        one = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": sport_id or ""})
        assert seqs(await one.collect(2), "execution") == [5, 6]
        one.close()


# -- history beyond Redis, gaps, resets -------------------------------------------------


async def test_resume_reads_postgres_then_redis_then_live(
    make_settings: Any, redis: Any, pg: Any, writer: Writer
) -> None:
    settings = make_settings(catchup_batch=7)
    await writer.append("execution", 40)
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    await archive(pg, settings.db_schema, "execution", entries)
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=15, approximate=False)
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", 5)})
        await s.collect(35)
        await writer.append("execution", 3)
        await s.collect(3)
        s.close()
        earliest = await open_stream(app.state.port, "feeds=execution&from=earliest")
        await earliest.collect(43)
        earliest.close()
    assert seqs(feed_events(s), "execution") == list(range(6, 44))
    assert [e.json() for e in feed_events(s)][:35] == [json.loads(e.data) for e in feed_events(earliest)][
        5:40
    ]
    assert seqs(feed_events(earliest), "execution") == list(range(1, 44))
    assert not [e for e in s.events + earliest.events if e.event in ("gap", "reset")]


async def test_a_span_neither_store_holds_is_reported_as_a_gap(
    make_settings: Any, redis: Any, pg: Any, writer: Writer
) -> None:
    settings = make_settings()
    await writer.append("execution", 20)
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    # 6..10 are in neither store: trimmed from Redis, and gone from the catalogue (a restore
    # from an older backup), which holds the seqs around them
    await archive(pg, settings.db_schema, "execution", entries[:5] + entries[10:])
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=10, approximate=False)  # 11..20
    before = metric("fanout_gateway_gaps_total")
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", 2)})
        await s.collect(13)
        s.close()
    kinds = [(e.event, e.json()["seq"] if e.event == "execution" else e.json()) for e in s.events if e.event]
    assert kinds == [
        ("execution", 3),
        ("execution", 4),
        ("execution", 5),
        ("gap", {"feed": "execution", "asked_after": 5, "resumed_at": 11, "missed": 5}),
        *[("execution", n) for n in range(11, 21)],
    ]
    assert metric("fanout_gateway_gaps_total") == before + 1


async def test_a_cursor_from_another_epoch_gets_a_reset_then_the_current_epoch(
    make_settings: Any, redis: Any, pg: Any, writer: Writer
) -> None:
    settings = make_settings()
    old = Writer(redis, settings.key_prefix, OLD_EPOCH)
    await old.append("execution", 6)
    old_entries = await xrange_all(redis, settings.key_prefix, "execution")
    await archive(pg, settings.db_schema, "execution", old_entries)
    await writer.append("execution", 4)  # the JetStream stream was recreated: a new epoch
    async with inprocess_gateway(settings) as app:
        s = await open_stream(
            app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", 3, OLD_EPOCH)}
        )
        await s.collect(7)
        s.close()
    named = [e for e in s.events if e.event]
    assert [e.json()["seq"] for e in named[:3]] == [4, 5, 6]  # the rest of the old epoch, from the catalogue
    assert named[3].event == "reset"
    assert named[3].json() == {
        "feed": "execution",
        "reason": "epoch",
        "asked_epoch": OLD_EPOCH,
        "current_epoch": EPOCH,
        "asked_after": 6,
        "resumes_at": "the first entry of the current epoch",
    }
    assert [e.json()["seq"] for e in named[4:]] == [1, 2, 3, 4]
    assert named[-1].id == f"v2:execution.{EPOCH}.4"


async def test_a_live_subscriber_is_told_when_the_jetstream_stream_is_recreated(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    settings = make_settings(reader_block=0.2)
    await writer.append("execution", 3)
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        await writer.append("execution", 2)
        assert seqs(await s.collect(2), "execution") == [4, 5]
        # a new epoch: the ingest script replaces the old stream by the new epoch's
        await Writer(redis, settings.key_prefix, NEW_EPOCH).append("execution", 3)
        await s.collect(3)
        s.close()
    named = [e.event for e in s.events if e.event]
    assert named == ["execution"] * 2 + ["reset"] + ["execution"] * 3
    reset = next(e for e in s.events if e.event == "reset").json()
    assert (reset["asked_epoch"], reset["current_epoch"], reset["asked_after"]) == (EPOCH, NEW_EPOCH, 5)
    assert seqs(feed_events(s), "execution") == [4, 5, 1, 2, 3]
    assert [e.json()["message_id"] for e in feed_events(s)][2:] == [f"{NEW_EPOCH}.{n}" for n in (1, 2, 3)]


async def test_a_v1_cursor_gets_an_in_band_reset_and_starts_at_from(
    make_settings: Any, writer: Writer
) -> None:
    await writer.append("execution", 5)
    await writer.append("sport_event", 3)
    v1 = "v1:execution.ab12cd34.1732770000123-0.42,sport_event.ef56ab78.1732769999000-2.17"
    resets = metric("fanout_gateway_resets_total")
    async with inprocess_gateway(make_settings()) as app:
        latest = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": v1})
        assert latest.status == 200
        start = await latest.next()
        notice = await latest.next()
        await writer.append("execution", 1)
        [live] = await latest.collect(1)
        latest.close()
        earliest = await open_stream(app.state.port, f"from=earliest&last_event_id={v1}")
        assert earliest.status == 200
        notices = [await earliest.next() for _ in range(3)][1:]
        events = await earliest.collect(9)
        earliest.close()
    assert start.id == f"v2:execution.{EPOCH}.5"
    assert (notice.event, notice.json()) == (
        "reset",
        {"feed": "execution", "reason": "cursor_version", "asked": v1, "resumes_at": f"execution.{EPOCH}.5"},
    )
    assert live.json()["seq"] == 6
    assert [(n.event, n.json()["feed"], n.json()["resumes_at"]) for n in notices] == [
        ("reset", "execution", f"execution.{EPOCH}.0"),
        ("reset", "sport_event", f"sport_event.{EPOCH}.0"),
    ]
    assert [(e.event, e.json()["seq"]) for e in events] == [("execution", n) for n in range(1, 7)] + [
        ("sport_event", n) for n in range(1, 4)
    ]
    assert metric("fanout_gateway_resets_total") == resets + 3


# -- filters ---------------------------------------------------------------------------


async def test_a_filtered_subscription_resumes_exactly_after_id_only_frames(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    prefix = make_settings().key_prefix
    await writer.append("execution", 12)
    async with inprocess_gateway(make_settings()) as app:
        s = await open_stream(app.state.port, "feeds=execution&symbol=AAPL&from=earliest")
        frames: list[Event] = []
        while (
            len([f for f in frames if f.event]) < 2 or frames[-1].event
        ):  # stop right after an id-only frame
            frames.append(await s.next())
        s.close()
        await writer.append("execution", 9)
        t = await open_stream(
            app.state.port, "feeds=execution&symbol=AAPL", {"Last-Event-ID": s.last_id or ""}
        )
        wanted = [
            f["message_id"] for _, f in await xrange_all(redis, prefix, "execution") if f["symbol"] == "AAPL"
        ]
        await t.collect(len(wanted) - 2)
        t.close()
    got = feed_events(s) + feed_events(t)
    assert [e.json()["message_id"] for e in got] == wanted
    assert all(e.json()["symbol"] == "AAPL" for e in got)
    assert frames[-1].event == "" and frames[-1].id  # the last thing seen was an id-only frame
    assert seqs(got, "execution") == [n for n in range(1, 22) if n % 3 == 0]


async def test_sport_filter_accepts_names_case_insensitively(make_settings: Any, writer: Writer) -> None:
    await writer.append("sport_event", 6)
    async with inprocess_gateway(make_settings()) as app:
        s = await open_stream(app.state.port, "feeds=sport_event&sport=tennis&from=earliest")
        got = await s.collect(3)
        s.close()
    assert [e.json()["sport"] for e in got] == ["TENNIS"] * 3


# -- slow clients ----------------------------------------------------------------------


async def test_a_slow_client_past_its_buffer_still_gets_every_event_in_order(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    settings = make_settings(client_buffer=5, catchup_batch=50)
    overflows = metric("fanout_gateway_buffer_overflows_total")
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        await s.next()  # the start frame: it is live
        for _ in range(10):  # not reading meanwhile
            await writer.append("execution", 200)
        await s.collect(2000, within=60)
        s.close()
    assert metric("fanout_gateway_buffer_overflows_total") > overflows
    assert seqs(feed_events(s), "execution") == list(range(1, 2001))
    assert [e.json()["message_id"] for e in feed_events(s)] == writer.expected("execution")


async def test_a_live_buffer_is_bounded_in_bytes_too(make_settings: Any, writer: Writer) -> None:
    # room for 10,000 frames but only 8 KB: a few hundred-byte events fill it first
    settings = make_settings(client_buffer=10_000, client_buffer_bytes=8192, catchup_batch=50)
    overflows = metric("fanout_gateway_buffer_overflows_total")
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution", receive_buffer=4096)
        await s.next()  # the start frame: it is live
        [sub] = list(app.state.subscribers)
        for _ in range(10):  # not reading meanwhile
            await writer.append("execution", 100)
            assert sub.buffered <= 8192
        await s.collect(1000, within=60)
        s.close()
    assert metric("fanout_gateway_buffer_overflows_total") > overflows
    assert [e.json()["message_id"] for e in feed_events(s)] == writer.expected("execution")


# -- bad requests and limits -----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "headers", "status", "error"),
    [
        ("feeds=execution,nope", {}, 404, "unknown feed"),
        ("feeds=execution,execution", {}, 400, "bad feeds"),
        ("feeds=execution&symbl=AAPL", {}, 400, "unknown parameter"),
        ("feeds=execution", {"X-Pad": "p" * 20_000}, 431, "headers too large"),
        ("feeds=execution", {"Last-Event-ID": "garbage"}, 400, "bad cursor"),
        ("last_event_id=v2:execution.1795862595094", {}, 400, "bad cursor"),
        ("last_event_id=v2:execution.e0e0e0e0.1", {}, 400, "bad cursor"),
        ("feeds=execution", {"Last-Event-ID": "v1:execution.e0e0.1-0"}, 400, "bad cursor"),
        ("lastEventID=v9:x", {}, 400, "bad cursor"),
        ("feeds=execution&symbol=", {}, 400, "bad filter"),
        ("feeds=sport_event&symbol=AAPL", {}, 400, "bad filter"),
        ("feeds=sport_event&sport=CURLING", {}, 400, "bad filter"),
        ("from=yesterday", {}, 400, "bad from"),
    ],
)
async def test_bad_requests_get_a_clear_json_error(
    make_settings: Any, writer: Writer, query: str, headers: dict[str, str], status: int, error: str
) -> None:
    await writer.append("execution", 3)
    async with inprocess_gateway(make_settings()) as app:
        s = await open_stream(app.state.port, query, headers)
    assert s.status == status
    body = json.loads(s.body)
    assert body["error"] == error
    assert body["detail"]
    if status == 404:
        assert body["known_feeds"] == ["execution", "sport_event"]


async def test_past_the_subscriber_limit_is_a_503_with_retry_after(make_settings: Any) -> None:
    async with inprocess_gateway(make_settings(max_subscribers=2)) as app:
        held = [await open_stream(app.state.port) for _ in range(2)]
        for h in held:
            await h.next()
        refused = await open_stream(app.state.port, accept="*/*")  # curl, scripts
        assert refused.status == 503
        assert refused.headers["retry-after"].isdigit()
        assert json.loads(refused.body)["error"] == "too many subscribers"
        # An EventSource would give up for good on a 503: it gets a 200 that says so and ends.
        in_band = await open_stream(app.state.port)
        assert in_band.status == 200
        assert in_band.headers["content-type"].startswith("text/event-stream")
        body = await in_band.rest()
        retry, comment = body.decode().split("\n\n")[:2]
        assert retry == f"retry: {int(refused.headers['retry-after']) * 1000}"
        assert comment.startswith(": unavailable ")
        assert json.loads(comment.removeprefix(": unavailable "))["error"] == "too many subscribers"
        assert body.endswith(b"\n\n") and b"\nid:" not in body  # no id: the browser keeps its own
        for h in held:
            h.close()
        async with asyncio.timeout(10):
            await app.state.subscribers.empty.wait()  # the server sees the disconnects on its own tasks
        again = await open_stream(app.state.port)
        assert again.status == 200
        again.close()


async def test_ops_endpoints(make_settings: Any, writer: Writer) -> None:
    from tests.integration.test_gateway_helpers import free_port

    await writer.append("execution", 2)
    ops = free_port()  # /metrics is on the ops port only (test_gateway_ops.py)
    settings = make_settings(gateway_ops=("127.0.0.1", ops))
    async with inprocess_gateway(settings) as app, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{app.state.port}"
        s = await open_stream(app.state.port, "from=earliest")
        await s.collect(2)
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["checks"]["redis"] == "ok"
        async with http.get(f"http://127.0.0.1:{ops}/metrics") as r:
            text = await r.text()
        s.close()
    for name in (
        "fanout_gateway_subscribers",
        "fanout_gateway_events_sent_total",
        "fanout_gateway_catchups_total",
        "fanout_gateway_gaps_total",
        "fanout_gateway_resets_total",
        "fanout_gateway_slow_disconnects_total",
        "fanout_gateway_reader_lag_seconds",
    ):
        assert name in text


async def test_from_a_time_starts_at_the_first_entry_broker_time_at_or_after_it(
    make_settings: Any, redis: Any, pg: Any, writer: Writer
) -> None:
    settings = make_settings()
    for second in range(6):  # seqs 1..30, five per broker-time second
        await writer.append("execution", 5, broker_time=f"2026-11-28T09:00:0{second}.000Z")
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    await archive(pg, settings.db_schema, "execution", entries[:20])
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=12, approximate=False)  # 19..30
    async with inprocess_gateway(settings) as app:
        firsts = {}
        for when in ("2026-11-28T09:00:00.500Z", "2026-11-28T09:00:03Z", "2026-11-28T09:00:04.2Z",
                     "2026-11-28T09:00:05Z", "2026-11-28T08:00:00Z"):
            s = await open_stream(app.state.port, f"feeds=execution&from={when}")
            [first] = await s.collect(1)
            firsts[when] = first.json()["seq"]
            s.close()
        later = await open_stream(app.state.port, "feeds=execution&from=2026-11-28T09:00:06Z")
        await later.next()
        await writer.append("execution", 1, broker_time="2026-11-28T09:00:07.000Z")
        [after] = await later.collect(1)
        later.close()
    assert firsts == {
        "2026-11-28T09:00:00.500Z": 6,  # from the catalogue
        "2026-11-28T09:00:03Z": 16,  # the catalogue (Redis's first is 19)
        "2026-11-28T09:00:04.2Z": 26,  # Redis, by binary search
        "2026-11-28T09:00:05Z": 26,
        "2026-11-28T08:00:00Z": 1,
    }
    assert after.json()["seq"] == 31  # nothing at or after that time yet: from the top


async def test_from_earliest_starts_at_the_first_seq_either_store_holds(
    make_settings: Any, redis: Any, pg: Any, writer: Writer
) -> None:
    settings = make_settings()
    await writer.append("execution", 10)
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    await archive(pg, settings.db_schema, "execution", entries[3:6])  # 4..6 (1..3 long gone)
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=4, approximate=False)  # 7..10
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution&from=earliest")
        start = await s.next()
        got = await s.collect(7)
        s.close()
    assert start.id == f"v2:execution.{EPOCH}.3"
    assert seqs(got, "execution") == list(range(4, 11))
    assert not [e for e in s.events if e.event in ("gap", "reset")]


async def test_an_idle_stream_gets_heartbeat_comments_and_a_retry_hint(make_settings: Any) -> None:
    async with inprocess_gateway(make_settings(heartbeat=0.2, retry_ms=1234)) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        raw = b""
        async with asyncio.timeout(20):
            while raw.count(b": heartbeat") < 2:
                raw += await s._read_body()
        s.close()
    retry, _, rest = raw.partition(b"\n\n")
    assert retry.startswith(b"retry: ") and 1234 <= int(retry[7:]) <= 1234 * 3 // 2  # jittered per stream
    assert rest.startswith(b"id: v2:execution.-.0\n\n")


async def test_a_client_that_stops_reading_is_disconnected_and_resumes_exactly(
    make_settings: Any, redis: Any, writer: Writer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(client_buffer=20, slow_client_timeout=0.5)
    disconnects = metric("fanout_gateway_slow_disconnects_total")
    caplog.set_level(logging.INFO)
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution", receive_buffer=4096)
        await s.next()
        for _ in range(20):  # far more than the socket buffers hold (~13 MB), and the client reads nothing
            await writer.append("execution", 500, stateSymbol="CA" + "x" * 1000)
        async with asyncio.timeout(60):
            await app.state.subscribers.empty.wait()  # the server gave up on it
        with pytest.raises(EOFError):  # what was in the pipe, then the end: the server hung up
            while True:
                await s.next(within=60)
        s.close()
        assert metric("fanout_gateway_slow_disconnects_total") == disconnects + 1
        # an expected event, logged once at INFO by the gateway; no ERROR from uvicorn for it
        # (it stalled in a write, or stayed behind too long and then stalled or not)
        assert caplog.text.count("subscriber disconnected: a write stalled") + caplog.text.count(
            "slow subscriber disconnected"
        ) == 1
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        t = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": s.last_id or ""})
        await t.collect(10_000 - len(feed_events(s)), within=60)
        t.close()
    assert seqs(feed_events(s) + feed_events(t), "execution") == list(range(1, 10_001))


async def test_without_postgres_live_streaming_goes_on_and_a_history_resume_ends_cleanly(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    from tests.integration.test_gateway_helpers import free_port

    settings = make_settings(database_url=f"postgresql://127.0.0.1:{free_port()}/nothing")
    await writer.append("execution", 20)
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=10, approximate=False)
    async with inprocess_gateway(settings) as app:
        live = await open_stream(app.state.port, "feeds=execution")
        behind = await open_stream(app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", 2)})
        await writer.append("execution", 2)
        assert seqs(await live.collect(2), "execution") == [21, 22]
        raw = b""
        with contextlib.suppress(EOFError):
            while chunk := await behind._read_body():
                raw += chunk
        live.close()
        behind.close()
        earliest = await open_stream(app.state.port, "feeds=execution&from=earliest", accept="*/*")
        in_band = await open_stream(app.state.port, "feeds=execution&from=earliest")
        in_band_body = await in_band.rest()
    assert b"history is unavailable" in raw
    assert b"event: execution" not in raw  # nothing skipped: it ends rather than jump the hole
    assert earliest.status == 503
    assert json.loads(earliest.body)["error"] == "history unavailable"
    assert in_band.status == 200
    assert in_band_body.startswith(b"retry: 5000\n\n: unavailable {")
    assert b'"error":"history unavailable"' in in_band_body


async def test_a_crowd_catching_up_at_once_shares_a_bounded_redis_pool(
    make_settings: Any, writer: Writer
) -> None:
    settings = make_settings(history_connections=2, catchup_batch=50)
    await writer.append("execution", 300)
    async with inprocess_gateway(settings) as app:
        crowd = [await open_stream(app.state.port, "feeds=execution&from=earliest") for _ in range(150)]
        for s in crowd:
            assert s.status == 200
        for s in crowd:
            assert seqs(await s.collect(300, within=60), "execution") == list(range(1, 301))
            s.close()


async def test_malformed_entries_are_sent_as_malformed_with_their_seq_live_and_from_both_stores(
    make_settings: Any, redis: Any, pg: Any, writer: Writer
) -> None:
    settings = make_settings()
    keys = Keys(settings.key_prefix)
    await writer.append("execution", 2)
    async with inprocess_gateway(settings) as app:
        live = await open_stream(app.state.port, "feeds=execution&symbol=NOPE")  # filters: no matter
        await live.next()
        await writer.append_malformed("execution", "missing required field(s): price")  # seq 3
        # outside the contract, by hand: a price that is no number, and no seq field at all
        bad = {"seq": "4", "message_id": "by-hand.4", "price": "x"}  # no epoch either
        await redis.xadd(keys.stream("execution"), bad, id="4-0")
        await redis.xadd(keys.stream("execution"), {"junk": "1"}, id="5-0")
        writer.top["execution"] = 5
        await writer.append("execution", 2)  # 6, 7
        got = [e for e in [await live.next() for _ in range(5)] if e.event]
        live.close()
        # from Redis in catch-up, then from the catalogue (dead_letter rows)
        again = await open_stream(app.state.port, "feeds=execution&from=earliest")
        replay = await _named(again, 7)
        entries = await xrange_all(redis, settings.key_prefix, "execution")
        await archive(pg, settings.db_schema, "execution", entries[:3])  # 1, 2 and the dead letter 3
        await redis.xtrim(keys.stream("execution"), maxlen=4, approximate=False)  # 4..7
        archived = await open_stream(app.state.port, "feeds=execution&from=earliest")
        from_pg = await _named(archived, 7)
    assert [(e.event, e.json()["seq"]) for e in got if e.event == "malformed"] == [
        ("malformed", 3), ("malformed", 4), ("malformed", 5)
    ]
    assert got[0].json() == {
        "feed": "execution",
        "seq": 3,
        "message_id": f"{EPOCH}.3",
        "error": "missing required field(s): price",
    }
    assert got[0].id == f"v2:execution.{EPOCH}.3"  # it moves the cursor
    assert "malformed stream entry" in got[1].json()["error"]
    assert got[2].json()["error"] == "stream entry 5-0 has seq field None"
    for events in (replay, from_pg):
        assert [(e.event, e.json()["seq"]) for e in events] == [
            ("execution", 1), ("execution", 2), ("malformed", 3), ("malformed", 4), ("malformed", 5),
            ("execution", 6), ("execution", 7),
        ]
        assert events[2].json() == got[0].json()
    assert not [e for e in again.events + archived.events if e.event in ("gap", "reset")]


async def _named(stream: Stream, count: int) -> list[Event]:
    """The next `count` events with a name (feed events, malformed, notices); closes it."""
    out: list[Event] = []
    while len(out) < count:
        event = await stream.next()
        if event.event:
            out.append(event)
    stream.close()
    return out


async def test_a_feed_the_cursor_does_not_name_starts_at_from(make_settings: Any, writer: Writer) -> None:
    await writer.append("execution", 3)
    await writer.append("sport_event", 2)
    async with inprocess_gateway(make_settings()) as app:
        one = await open_stream(app.state.port, "feeds=execution&from=earliest")
        await one.collect(2)
        one.close()
        both = await open_stream(app.state.port, f"from=earliest&last_event_id={one.last_id}")
        events = await both.collect(3)
        both.close()
    assert [(e.event, e.json()["seq"]) for e in events] == [
        ("execution", 3),
        ("sport_event", 1),
        ("sport_event", 2),
    ]


async def test_new_viewers_joining_while_entries_arrive_get_every_entry_after_their_start(
    make_settings: Any, writer: Writer
) -> None:
    """`from=latest` starts where the hub's reader is, which may be behind what Redis
    already holds: what lies between comes live. Each viewer's start frame names its
    start; from there it gets every entry the writer appended, once, in order."""
    await writer.append("execution", 5)
    async with inprocess_gateway(make_settings()) as app:
        viewers = []
        for _ in range(30):
            await writer.append("execution", 3)
            viewers += [await open_stream(app.state.port, "feeds=execution") for _ in range(2)]
        await writer.append("execution", 1)  # the last: every viewer must reach it
        top = writer.top["execution"]
        starts = []
        for v in viewers:
            assert v.status == 200
            start = await v.next()
            assert start.event == "" and start.has_id
            first = cursor.parse(start.id or "")["execution"].seq
            starts.append(first)
            got = await v.collect(top - first)
            assert [e.json()["message_id"] for e in got] == writer.expected("execution")[first:]
            v.close()
    assert starts == sorted(starts) and 5 <= starts[0] and starts[-1] < top
