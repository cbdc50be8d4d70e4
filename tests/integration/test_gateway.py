"""The SSE gateway against the real Redis and PostgreSQL: exact resumption (one feed,
both feeds, filtered), history from the catalogue, gaps and resets reported in-band,
slow clients, bad requests, limits and the ops endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from typing import Any

import aiohttp
import pytest
from prometheus_client import REGISTRY

from services.sse_gateway import cursor
from services.sse_gateway.cursor import Position
from services.sse_gateway.settings import GatewaySettings
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_gateway_helpers import (
    Event,
    Stream,
    Writer,
    inprocess_gateway,
    open_stream,
    xrange_all,
)

pytestmark = pytest.mark.timeout(120)

EPOCH = "e0e0e0e0"


@pytest.fixture
def make_settings(base_settings: Settings) -> Any:
    def make(**overrides: Any) -> GatewaySettings:
        return GatewaySettings.from_env(
            os.environ,
            key_prefix=base_settings.key_prefix,
            db_schema=base_settings.db_schema,
            log_format="text",
            tokens="",
            **overrides,
        )

    return make


@pytest.fixture
def writer(redis: Any, base_settings: Settings) -> Writer:
    return Writer(redis, base_settings.key_prefix, EPOCH)


def feed_events(stream: Stream) -> list[Event]:
    return [e for e in stream.events if e.event in ("execution", "sport_event")]


def seqs(events: list[Event], feed: str) -> list[int]:
    return [e.json()["seq"] for e in events if e.event == feed]


async def expected(redis: Any, prefix: str, feed: str) -> list[str]:
    return [f["message_id"] for _, f in await xrange_all(redis, prefix, feed)]


async def archive(
    pg: Any, schema: str, feed: str, entries: list[tuple[str, dict[str, str]]], epoch: str
) -> None:
    """Catalogue rows per the contract (common columns + message jsonb), by plain SQL."""
    from services.sse_gateway.frames import entry_data

    await pg.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    await pg.execute(
        f'CREATE TABLE IF NOT EXISTS "{schema}".{feed} (message_id text PRIMARY KEY, epoch text NOT NULL,'
        " seq bigint NOT NULL, stream_id text NOT NULL, entry_ms bigint NOT NULL, entry_n bigint NOT NULL,"
        " broker_time timestamptz NOT NULL, ingest_time timestamptz NOT NULL,"
        " archived_at timestamptz NOT NULL DEFAULT now(), message jsonb NOT NULL)"
    )
    rows = []
    for entry_id, fields in entries:
        ms, n = cursor.entry_key(entry_id)
        rows.append(
            (
                fields["message_id"],
                epoch,
                int(fields["seq"]),
                entry_id,
                ms,
                n,
                entry_data(feed, fields).decode(),
            )
        )
    await pg.executemany(
        f'INSERT INTO "{schema}".{feed} (message_id, epoch, seq, stream_id, entry_ms, entry_n, broker_time,'
        " ingest_time, message) VALUES ($1, $2, $3, $4, $5, $6, now(), now(), $7::jsonb)",
        rows,
    )


def at(feed: str, entries: list[tuple[str, dict[str, str]]], seq: int, epoch: str = EPOCH) -> str:
    entry_id = next(i for i, f in entries if int(f["seq"]) == seq)
    return cursor.format({feed: Position(epoch, entry_id, seq)}, [feed])


async def forget_everything(redis: Any, prefix: str) -> None:
    await redis.delete(*[k async for k in redis.scan_iter(match=f"{prefix}:*")])


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- exact resumption ------------------------------------------------------------------


async def test_one_feed_resumes_exactly_after_a_disconnect(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    prefix = make_settings().key_prefix
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
    assert got == await expected(redis, prefix, "execution")
    assert seqs(feed_events(first) + feed_events(second), "execution") == list(range(1, 36))


async def test_both_feeds_resume_exactly_with_the_query_parameter(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    prefix = make_settings().key_prefix
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
        assert [e.json()["message_id"] for e in events if e.event == feed] == await expected(
            redis, prefix, feed
        )


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
    await archive(pg, settings.db_schema, "execution", entries, EPOCH)
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=15, approximate=False)
    async with inprocess_gateway(settings) as app:
        s = await open_stream(
            app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", entries, 5)}
        )
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
    await archive(pg, settings.db_schema, "execution", entries[:5], EPOCH)  # 1..5 archived
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=10, approximate=False)  # 11..20
    before = metric("fanout_gateway_gaps_total")
    async with inprocess_gateway(settings) as app:
        s = await open_stream(
            app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", entries, 2)}
        )
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
    old = Writer(redis, settings.key_prefix, "01d01d01")
    await old.append("execution", 6)
    old_entries = await xrange_all(redis, settings.key_prefix, "execution")
    await archive(pg, settings.db_schema, "execution", old_entries, "01d01d01")
    await forget_everything(redis, settings.key_prefix)  # Redis lost its data
    await writer.append("execution", 4)  # a new epoch
    async with inprocess_gateway(settings) as app:
        s = await open_stream(
            app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", old_entries, 3, "01d01d01")}
        )
        await s.collect(7)
        s.close()
    named = [e for e in s.events if e.event]
    assert [e.json()["seq"] for e in named[:3]] == [4, 5, 6]  # the rest of the old epoch, from the catalogue
    assert named[3].event == "reset"
    assert named[3].json()["asked_epoch"] == "01d01d01"
    assert named[3].json()["current_epoch"] == EPOCH
    assert [e.json()["seq"] for e in named[4:]] == [1, 2, 3, 4]
    assert named[-1].id is not None and f"execution.{EPOCH}." in named[-1].id


async def test_a_live_subscriber_is_told_when_the_stream_is_reset(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    settings = make_settings(reader_block=0.2)
    await writer.append("execution", 3)
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        await writer.append("execution", 2)
        assert seqs(await s.collect(2), "execution") == [4, 5]
        await forget_everything(redis, settings.key_prefix)
        await Writer(redis, settings.key_prefix, "fe11fe11").append("execution", 3)
        await s.collect(3)
        s.close()
    named = [e.event for e in s.events if e.event]
    assert named == ["execution"] * 2 + ["reset"] + ["execution"] * 3
    reset = next(e for e in s.events if e.event == "reset").json()
    assert (reset["asked_epoch"], reset["current_epoch"], reset["asked_after"]) == (EPOCH, "fe11fe11", 5)
    assert seqs(feed_events(s), "execution") == [4, 5, 1, 2, 3]


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
    assert [e.json()["message_id"] for e in feed_events(s)] == await expected(
        redis, settings.key_prefix, "execution"
    )


# -- bad requests and limits -----------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "headers", "status", "error"),
    [
        ("feeds=execution,nope", {}, 404, "unknown feed"),
        ("feeds=execution,execution", {}, 400, "bad feeds"),
        ("feeds=execution&symbl=AAPL", {}, 400, "unknown parameter"),
        ("feeds=execution", {"X-Pad": "p" * 20_000}, 431, "headers too large"),
        ("feeds=execution", {"Last-Event-ID": "garbage"}, 400, "bad cursor"),
        ("last_event_id=v1:execution.e0e0e0e0.1-0", {}, 400, "bad cursor"),
        ("lastEventID=v9:x", {}, 400, "bad cursor"),
        ("feeds=execution&symbol=", {}, 400, "bad filter"),
        ("feeds=sport_event&symbol=AAPL", {}, 400, "bad filter"),
        ("feeds=sport_event&sport=CURLING", {}, 400, "bad filter"),
        ("from=yesterday", {}, 400, "bad from"),
        (
            "feeds=execution",
            {"Last-Event-ID": f"v1:execution.{EPOCH}.99999999999999-0.3"},
            400,
            "cursor from the future",
        ),
        ("feeds=execution", {"Last-Event-ID": f"v1:execution.{EPOCH}.1-0.99"}, 400, "cursor from the future"),
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
    await writer.append("execution", 2)
    async with inprocess_gateway(make_settings()) as app, aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{app.state.port}"
        s = await open_stream(app.state.port, "from=earliest")
        await s.collect(2)
        async with http.get(base + "/healthz") as r:
            assert r.status == 200
        async with http.get(base + "/readyz") as r:
            assert r.status == 200
            assert (await r.json())["checks"]["redis"] == "ok"
        async with http.get(base + "/metrics") as r:
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


async def test_from_a_time_starts_at_the_first_entry_at_or_after_it(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    prefix = make_settings().key_prefix
    await writer.append("execution", 3)
    entries = await xrange_all(redis, prefix, "execution")
    ms = cursor.entry_key(entries[-1][0])[0] + 1
    from datetime import UTC, datetime

    when = datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")
    async with inprocess_gateway(make_settings()) as app:
        # entries written at least 1 ms later than `when`
        await asyncio.sleep(0.005)  # wall-clock separation for the entry ids, not synchronisation
        await writer.append("execution", 2)
        s = await open_stream(app.state.port, f"feeds=execution&from={when}")
        assert seqs(await s.collect(2), "execution") == [4, 5]
        s.close()


async def test_an_idle_stream_gets_heartbeat_comments_and_a_retry_hint(make_settings: Any) -> None:
    async with inprocess_gateway(make_settings(heartbeat=0.2, retry_ms=1234)) as app:
        s = await open_stream(app.state.port, "feeds=execution")
        raw = b""
        async with asyncio.timeout(20):
            while raw.count(b": heartbeat") < 2:
                raw += await s._read_body()
        s.close()
    assert raw.startswith(b"retry: 1234\n\nid: v1:execution.-.0-0.0\n\n")


async def test_a_client_that_stops_reading_is_disconnected_and_resumes_exactly(
    make_settings: Any, redis: Any, writer: Writer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(client_buffer=20, slow_client_timeout=0.5)
    disconnects = metric("fanout_gateway_slow_disconnects_total")
    caplog.set_level(logging.INFO)
    async with inprocess_gateway(settings) as app:
        s = await open_stream(app.state.port, "feeds=execution", receive_buffer=4096)
        await s.next()
        for _ in range(20):  # far more than the socket buffers hold, and the client reads nothing
            await writer.append("execution", 500)
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
    entries = await xrange_all(redis, settings.key_prefix, "execution")
    await redis.xtrim(Keys(settings.key_prefix).stream("execution"), maxlen=10, approximate=False)
    async with inprocess_gateway(settings) as app:
        live = await open_stream(app.state.port, "feeds=execution")
        behind = await open_stream(
            app.state.port, "feeds=execution", {"Last-Event-ID": at("execution", entries, 2)}
        )
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


async def test_an_entry_that_is_not_a_valid_message_is_reported_not_skipped(
    make_settings: Any, redis: Any, writer: Writer
) -> None:
    settings = make_settings()
    keys = Keys(settings.key_prefix)
    await writer.append("execution", 2)
    async with inprocess_gateway(settings) as app:
        live = await open_stream(app.state.port, "feeds=execution")
        await live.next()
        # outside the contract: an entry written by hand, one with a price that is no number
        # (meta updated as the Lua script would), and one with no seq at all
        bad_id = await redis.xadd(keys.stream("execution"), {"seq": "3", "message_id": "x.3", "price": "abc"})
        await redis.hset(keys.meta("execution"), mapping={"seq": 3, "last_id": bad_id})
        await redis.xadd(keys.stream("execution"), {"junk": "1"})
        writer.counter = 3
        await writer.append("execution", 2)
        got = [await live.next() for _ in range(3)]
        live.close()
        again = await open_stream(app.state.port, "feeds=execution&from=earliest")
        replay = [e for e in [await again.next() for _ in range(6)] if e.event]
        again.close()
    for events in (got, replay[2:]):
        assert [e.event for e in events] == ["malformed", "execution", "execution"]
        assert "malformed stream entry" in events[0].json()["error"]
        assert [e.json()["seq"] for e in events[1:]] == [4, 5]


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
