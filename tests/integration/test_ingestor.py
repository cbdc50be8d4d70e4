"""The ingestor against the real NATS JetStream and Redis, run in-process as a task.

Each test has its own JetStream stream, subject prefix and Redis key prefix (conftest).
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import fields
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio import Redis

from services.ingestor import jetstream, replay
from services.ingestor.consumer import Ingestor
from services.ingestor.settings import IngestorSettings
from services.ingestor.writer import Delivery, Writer
from shared import codec
from shared.feeds import EXECUTION, SPORT_EVENT
from shared.keys import Keys
from shared.proto import event_pb2, execution_pb2
from shared.settings import Settings, SettingsError
from tests.integration.test_gateway_helpers import free_port
from tests.protowire import f_len, varint

# -- helpers (also used by test_ingestor_process.py) -----------------------------------


def ingestor_settings(base: Settings, **overrides: Any) -> IngestorSettings:
    values = {f.name: getattr(base, f.name) for f in fields(Settings)}
    values.update({"http": ("127.0.0.1", 0), "js_ack_wait": 1.0, "batch": 200})
    values.update(overrides)
    return IngestorSettings.from_env({}, **values)


async def until(condition: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "") -> None:
    """Poll a condition that nothing can be awaited for, up to a deadline."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)


async def read_stream(redis: Redis, key: str, count: int, within: float = 30.0) -> list[dict[str, str]]:
    """Block on XREAD until `count` entries are in the stream; return them all (as str)."""
    entries: list[dict[str, str]] = []
    last = "0-0"
    deadline = time.monotonic() + within
    while len(entries) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{key}: {len(entries)} entries, expected {count}")
        reply: Any = await redis.xread({key: last}, count=10_000, block=500)
        for _, batch in reply:
            for entry_id, raw in batch:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                entries.append(codec.str_entry(raw))
    return entries


@asynccontextmanager
async def running(settings: IngestorSettings, redis: Redis) -> AsyncIterator[Ingestor]:
    stop = asyncio.Event()
    ingestor = Ingestor(settings, redis, stop)
    task = asyncio.create_task(ingestor.run())
    try:
        await until(ingestor.nats_ready, what="the ingestor to set up JetStream")
        yield ingestor
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def execution(i: int) -> execution_pb2.execution:
    return execution_pb2.execution(
        symbol=f"S{i % 7}",
        market="NASDAQ",
        price=100 + i / 8,
        quantity=0.1 * (i + 1),
        executionEpoch=1764321212345 + i,
        stateSymbol="CA",
    )


def event(i: int) -> event_pb2.event:
    return event_pb2.event(sport=1 + i % 7, match_title=f"Match {i}", data_event=f"goal é {i}")


async def publish(nc: Any, subject: str, payloads: list[bytes]) -> None:
    for p in payloads:
        await nc.publish(subject, p)
    await nc.flush()


# -- tests --------------------------------------------------------------------------------


async def test_published_messages_become_entries_once_with_contiguous_seq(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    executions = [execution(i) for i in range(700)]
    events = [event(i) for i in range(300)]
    async with running(settings, redis) as ingestor:
        before_ms = time.time_ns() // 1_000_000
        await publish(nats, settings.subject("execution"), [m.SerializeToString() for m in executions])
        await publish(nats, settings.subject("sport_event"), [m.SerializeToString() for m in events])
        exec_entries = await read_stream(redis, keys.stream("execution"), len(executions))
        event_entries = await read_stream(redis, keys.stream("sport_event"), len(events))
        created_ms = ingestor.handle.created_ms if ingestor.handle else 0

    assert [int(e["seq"]) for e in exec_entries] == list(range(1, 701))
    assert [int(e["seq"]) for e in event_entries] == list(range(1, 301))
    # Stream sequences 1..700 are the executions (published first), 701..1000 the events.
    assert [e["message_id"] for e in exec_entries] == [f"{created_ms}.{s}" for s in range(1, 701)]
    assert [e["message_id"] for e in event_entries] == [f"{created_ms}.{s}" for s in range(701, 1001)]

    first = exec_entries[3]
    assert list(first)[:2] == ["seq", "message_id"]
    assert list(first)[-2:] == ["broker_time", "ingest_time"]
    typed = codec.typed_message(EXECUTION, first)
    m = executions[3]
    assert typed["symbol"] == m.symbol and typed["market"] == "NASDAQ" and typed["stateSymbol"] == "CA"
    assert struct.pack("<f", typed["price"]) == struct.pack("<f", m.price)
    assert first["quantity"] == codec.float32_text(m.quantity)  # shortest text: 0.4, not 0.4000000059604645
    assert typed["executionEpoch"] == m.executionEpoch
    broker = codec.parse_iso(first["broker_time"])
    ingested = codec.parse_iso(first["ingest_time"])
    assert first["broker_time"].endswith("Z") and len(first["broker_time"]) == len("2026-11-28T09:13:32.123Z")
    assert before_ms - 1000 <= broker.timestamp() * 1000 <= ingested.timestamp() * 1000 + 1

    sport = codec.typed_message(SPORT_EVENT, event_entries[1])
    assert sport["sport"] == "BASKETBALL" and sport["data_event"] == "goal é 1"

    meta = codec.str_entry(await redis.hgetall(keys.meta("execution")))
    assert meta["seq"] == "700" and meta["broker_seq"] == "700" and len(meta["epoch"]) == 8
    dedup = await redis.get(keys.dedup("execution", exec_entries[0]["message_id"]))
    assert dedup is not None  # remembered with its entry id
    assert await redis.ttl(keys.dedup("execution", exec_entries[0]["message_id"])) > 24 * 3600


async def test_a_redelivered_message_makes_no_second_entry(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    handle = await jetstream.setup(nats, settings)
    await publish(nats, settings.subject("execution"), [execution(i).SerializeToString() for i in range(50)])

    # A crash between the Redis write and the ack: write a fetched batch, never ack it.
    sub = await nats.jetstream().pull_subscribe_bind(settings.js_consumer, stream=settings.js_stream)
    msgs = await sub.fetch(50, timeout=5)
    assert len(msgs) == 50
    deliveries = [
        Delivery(
            m.subject,
            m.data,
            m.metadata.sequence.stream,
            m.metadata.num_delivered,
            int(m.metadata.timestamp.timestamp() * 1e9),
            m.reply,
        )
        for m in msgs
    ]
    await Writer(redis, settings).write(deliveries, handle.created_ms)
    assert await redis.xlen(keys.stream("execution")) == 50

    # JetStream redelivers them (ack_wait 1 s) to the ingestor, which must not append again.
    async with running(settings, redis) as ingestor:
        await until(lambda: _settled(ingestor, 50), what="the redelivered messages")
    assert ingestor.stats.redelivered == 50
    assert ingestor.stats.duplicates["execution"] == 50
    assert ingestor.stats.appended["execution"] == 0
    entries = await read_stream(redis, keys.stream("execution"), 50)
    assert len(entries) == 50 and await redis.xlen(keys.stream("execution")) == 50
    assert [int(e["seq"]) for e in entries] == list(range(1, 51))
    info = await nats.jetstream().consumer_info(settings.js_stream, settings.js_consumer)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def _settled(ingestor: Ingestor, n: int) -> bool:
    stats = ingestor.stats
    return sum(stats.duplicates.values()) + sum(stats.appended.values()) + stats.dead_letters >= n


async def test_malformed_payloads_are_dead_lettered_with_their_bytes_and_the_rest_flows(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings, max_payload=200)
    keys = Keys(settings.key_prefix)
    good = execution(1).SerializeToString()
    bad: dict[str, bytes] = {
        "garbage": b"\xff\xfe not protobuf at all",
        "truncated": good[: len(good) // 2],
        "missing": execution_pb2.execution(symbol="X", market="Y").SerializePartialToString(),
        "utf8": (
            f_len(1, b"\xc3\x28")
            + f_len(2, b"NASDAQ")
            + varint(3 << 3 | 5)
            + struct.pack("<f", 1.0)
            + varint(4 << 3 | 5)
            + struct.pack("<f", 1.0)
            + varint(5 << 3)
            + varint(1)
            + f_len(6, b"CA")
        ),
        "oversized": execution_pb2.execution(
            symbol="A" * 300, market="M", price=1, quantity=1, executionEpoch=1, stateSymbol="CA"
        ).SerializeToString(),
        "empty": b"",
    }
    expected_error = {
        "garbage": "not a valid protobuf",
        "truncated": "not a valid protobuf",
        "missing": "missing required field",
        "utf8": "not valid UTF-8",
        "oversized": "exceeds FANOUT_MAX_PAYLOAD",
        "empty": "missing required field",
    }
    async with running(settings, redis) as ingestor:
        subject = settings.subject("execution")
        for payload in bad.values():
            await publish(nats, subject, [good, payload])
        await publish(nats, subject, [good])
        dead = await read_stream(redis, keys.dead_letter_stream(), len(bad))
        entries = await read_stream(redis, keys.stream("execution"), len(bad) + 1)
        await until(lambda: _settled(ingestor, 2 * len(bad) + 1), what="all messages settled")

    assert [int(e["seq"]) for e in entries] == list(range(1, len(bad) + 2))  # the rest flowed on, in order
    assert [int(d["seq"]) for d in dead] == list(range(1, len(bad) + 1))
    for (name, payload), d in zip(bad.items(), dead, strict=True):
        assert set(d) == {
            "seq",
            "message_id",
            "subject",
            "broker_seq",
            "error",
            "payload_b64",
            "broker_time",
            "ingest_time",
        }
        assert base64.b64decode(d["payload_b64"]) == payload, name
        assert expected_error[name] in d["error"], (name, d["error"])
        assert d["subject"] == subject
        assert d["message_id"].endswith(f".{d['broker_seq']}")
    # Stream sequences alternate good, bad, good, ...: every bad one is at an even position.
    assert [int(d["broker_seq"]) for d in dead] == list(range(2, 2 * len(bad) + 1, 2))
    assert ingestor.stats.dead_letters == len(bad)
    info = await nats.jetstream().consumer_info(settings.js_stream, settings.js_consumer)
    assert info.num_ack_pending == 0  # dead letters are acked too


async def test_bytes_from_an_independent_encoder_are_ingested_as_the_spec_says(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    # Hand-encoded per the protobuf wire format and the upstream spec, not by the library.
    exec_bytes = (
        f_len(1, b"AAPL")
        + f_len(2, b"NASDAQ")
        + varint(3 << 3 | 5)
        + struct.pack("<f", 189.25)
        + varint(4 << 3 | 5)
        + struct.pack("<f", 0.1)
        + varint(5 << 3 | 0)
        + varint(1764321212345)
        + f_len(6, b"CA")
    )
    title = "Nadal \u2013 Federer"
    event_bytes = varint(1 << 3 | 0) + varint(7) + f_len(2, title.encode()) + f_len(3, b"ace")
    async with running(settings, redis):
        await publish(nats, settings.subject("execution"), [exec_bytes])
        await publish(nats, settings.subject("sport_event"), [event_bytes])
        [ex] = await read_stream(redis, keys.stream("execution"), 1)
        [ev] = await read_stream(redis, keys.stream("sport_event"), 1)
    assert {k: ex[k] for k in ("symbol", "market", "price", "quantity", "executionEpoch", "stateSymbol")} == {
        "symbol": "AAPL",
        "market": "NASDAQ",
        "price": "189.25",
        "quantity": "0.1",
        "executionEpoch": "1764321212345",
        "stateSymbol": "CA",
    }
    assert (ev["sport"], ev["match_title"], ev["data_event"]) == ("TENNIS", title, "ace")


async def test_a_deleted_and_recreated_stream_gives_ids_that_do_not_collide(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    subject = settings.subject("execution")
    async with running(settings, redis) as ingestor:
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(5)])
        await read_stream(redis, keys.stream("execution"), 5)
        old = ingestor.handle
        assert old is not None
        await nats.jetstream().delete_stream(settings.js_stream)
        # The ingestor notices the consumer is gone and sets the stream up again.
        await until(lambda: _recreated(ingestor, old.created_ms), what="the stream to be set up again")
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(5, 10)])
        entries = await read_stream(redis, keys.stream("execution"), 10)
    ids = [e["message_id"] for e in entries]
    assert len(set(ids)) == 10  # stream sequences restarted at 1, the ids did not repeat
    new_created = ingestor.handle.created_ms if ingestor.handle else 0
    assert ids[:5] == [f"{old.created_ms}.{s}" for s in range(1, 6)]
    assert ids[5:] == [f"{new_created}.{s}" for s in range(1, 6)]
    assert [int(e["seq"]) for e in entries] == list(range(1, 11))


async def _recreated(ingestor: Ingestor, old_created_ms: int) -> bool:
    return ingestor.handle is not None and ingestor.handle.created_ms != old_created_ms


async def test_setup_is_idempotent_and_updates_max_age(base_settings: Settings, nats: Any) -> None:
    settings = ingestor_settings(base_settings)
    first = await jetstream.setup(nats, settings)
    again = await jetstream.setup(nats, settings)
    assert first == again  # same stream, same creation time: same message ids
    longer = ingestor_settings(base_settings, js_max_age=48 * 3600.0, dedup_ttl=49 * 3600.0)
    assert await jetstream.setup(nats, longer) == first
    info = await nats.jetstream().stream_info(settings.js_stream)
    assert info.config.max_age == 48 * 3600.0
    assert sorted(info.config.subjects) == sorted(
        [settings.subject("execution"), settings.subject("sport_event")]
    )
    consumer = await nats.jetstream().consumer_info(settings.js_stream, settings.js_consumer)
    assert consumer.config.ack_policy == "explicit"
    assert consumer.config.max_ack_pending and consumer.config.max_ack_pending > 0


async def test_setup_updates_only_subjects_and_max_age_and_keeps_what_the_operator_set(
    base_settings: Settings, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    js = nats.jetstream()
    # The operator created the stream with limits of their own and an old subject list.
    operator = jetstream.stream_config(settings)
    operator.subjects = [settings.subject("execution")]
    operator.max_age = 3600.0
    operator.max_msgs = 123_456
    operator.max_bytes = 512 * 1024 * 1024
    operator.duplicate_window = 90.0
    operator.description = "feeds, sized by ops"
    await js.add_stream(operator)
    await jetstream.setup(nats, settings)
    info = await js.stream_info(settings.js_stream)
    assert info.config.max_age == settings.js_max_age
    assert sorted(info.config.subjects) == sorted(settings.subject(f) for f in ("execution", "sport_event"))
    kept = (
        info.config.max_msgs,
        info.config.max_bytes,
        info.config.duplicate_window,
        info.config.description,
    )
    assert kept == (123_456, 512 * 1024 * 1024, 90.0, "feeds, sized by ops")
    assert info.config.num_replicas == 1


async def test_a_new_stream_gets_the_configured_replicas(base_settings: Settings, nats: Any) -> None:
    settings = ingestor_settings(base_settings, js_replicas=1)
    assert jetstream.stream_config(settings).num_replicas == 1
    assert jetstream.stream_config(ingestor_settings(base_settings, js_replicas=3)).num_replicas == 3
    await jetstream.setup(nats, settings)
    assert (await nats.jetstream().stream_info(settings.js_stream)).config.num_replicas == 1


async def test_nats_url_may_list_several_servers_one_of_them_down(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    dead = f"nats://127.0.0.1:{free_port()}"
    settings = ingestor_settings(base_settings, nats_url=f"{dead}, {base_settings.nats_url}")
    keys = Keys(settings.key_prefix)
    async with running(settings, redis) as ingestor:
        await publish(
            nats, settings.subject("execution"), [execution(i).SerializeToString() for i in range(20)]
        )
        entries = await read_stream(redis, keys.stream("execution"), 20)
        assert ingestor.nc is not None and ingestor.nc.connected_url is not None
        assert ingestor.nc.connected_url.netloc == base_settings.nats_url.split("://", 1)[1]
    assert [e["symbol"] for e in entries] == [execution(i).symbol for i in range(20)]


async def test_the_replay_of_an_intact_redis_reads_the_margin_and_appends_nothing(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings, batch=10)
    keys = Keys(settings.key_prefix)
    async with running(settings, redis) as ingestor:
        await publish(
            nats, settings.subject("execution"), [execution(i).SerializeToString() for i in range(30)]
        )
        before = await read_stream(redis, keys.stream("execution"), 30)
        assert ingestor.handle is not None
        handle = ingestor.handle
    result = await replay.replay_if_behind(nats, redis, Writer(redis, settings), handle, keys, settings.batch)
    # All 30 are within the margin of the newest: read again, none appended a second time.
    assert (result.read, result.appended, result.from_seq) == (30, 0, 1)
    assert await read_stream(redis, keys.stream("execution"), 30) == before
    assert await redis.xlen(keys.stream("execution")) == 30


@pytest.mark.parametrize("batch", [1, 7])
async def test_small_batches_keep_order_and_seq(
    base_settings: Settings, redis: Redis, nats: Any, batch: int
) -> None:
    settings = ingestor_settings(base_settings, batch=batch)
    keys = Keys(settings.key_prefix)
    async with running(settings, redis):
        await publish(
            nats, settings.subject("sport_event"), [event(i).SerializeToString() for i in range(40)]
        )
        entries = await read_stream(redis, keys.stream("sport_event"), 40)
    assert [e["match_title"] for e in entries] == [f"Match {i}" for i in range(40)]
    assert [int(e["seq"]) for e in entries] == list(range(1, 41))


# -- pure helpers of the pull loop and the writer (no servers) ----------------------------


def test_replicas_and_replay_margin_settings_are_read_and_checked() -> None:
    s = IngestorSettings.from_env({"FANOUT_JS_REPLICAS": "3", "FANOUT_REPLAY_MARGIN": "2m"})
    assert (s.js_replicas, s.replay_margin) == (3, 120.0)
    defaults = IngestorSettings.from_env({})
    assert (defaults.js_replicas, defaults.replay_margin) == (1, 60.0)
    with pytest.raises(SettingsError, match="FANOUT_JS_REPLICAS"):
        IngestorSettings.from_env({"FANOUT_JS_REPLICAS": "0"})
    with pytest.raises(SettingsError, match=r"FANOUT_REPLAY_MARGIN .* shorter than FANOUT_JS_ACK_WAIT"):
        IngestorSettings.from_env({"FANOUT_REPLAY_MARGIN": "10s", "FANOUT_JS_ACK_WAIT": "30s"})


def test_ack_subjects_of_both_formats_parse() -> None:
    from services.ingestor.jetstream import parse_ack_subject

    v1 = "$JS.ACK.FEEDS.ingestor.3.1042.1040.1795857710302347757.17"
    v2 = "$JS.ACK.hub.ACCHASH.FEEDS.ingestor.3.1042.1040.1795857710302347757.17.tok"
    assert parse_ack_subject(v1) == (3, 1042, 1795857710302347757)
    assert parse_ack_subject(v2) == (3, 1042, 1795857710302347757)
    with pytest.raises(ValueError):
        parse_ack_subject("_INBOX.abc.1")


@given(st.lists(st.integers(min_value=0, max_value=4_102_444_800 * 10**9), max_size=50))
def test_the_writers_broker_clock_formats_as_the_codec_does(stamps: list[int]) -> None:
    from services.ingestor.writer import BrokerClock

    clock = BrokerClock()
    for ns in sorted(stamps) + stamps:
        assert clock.iso_ms(ns) == codec.iso_ms_from_ns(ns)


def test_the_packed_command_is_what_redis_py_would_send() -> None:
    from redis.connection import Connection

    from services.ingestor.writer import _bulk, _Group

    group = _Group("execution", ["k:stream", "k:meta"], [_bulk(b"90000"), _bulk(b"ab12cd34")], [])
    group.add("k:msg:1.5", 5, ["message_id", "1.5", "symbol", "\u00e9"], {})
    expected = b"".join(
        Connection().pack_command(  # type: ignore[no-untyped-call]
            "EVALSHA",
            "f" * 40,
            3,
            "k:stream",
            "k:meta",
            "k:msg:1.5",
            90000,
            "ab12cd34",
            5,
            4,
            "message_id",
            "1.5",
            "symbol",
            "\u00e9",
        )
    )
    assert group.command(b"f" * 40) == expected


def _writer(**overrides: Any) -> Writer:
    import fakeredis

    settings = IngestorSettings.from_env({}, subject_prefix="up.", **overrides)
    return Writer(fakeredis.FakeAsyncRedis(), settings)


def _delivery(subject: str, payload: bytes, seq: int = 1) -> Delivery:
    return Delivery(subject, payload, seq, 1, 1_795_857_710_302_347_757, f"$JS.ACK.S.c.1.{seq}.{seq}.1.0")


def test_a_message_on_an_unknown_subject_is_dead_lettered() -> None:
    [group] = _writer().build([_delivery("up.trades", b"x")], 1000, "2026-11-28T09:00:00.000Z")
    assert group.name == "dead_letter" and group.count == 1
    assert group.labels[0][:2] == ("unknown", "unknown_subject")
    assert "no feed is published on subject 'up.trades'" in group.labels[0][3]


def test_a_decoder_that_fails_unexpectedly_dead_letters_instead_of_stopping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(feed: Any, payload: bytes) -> dict[str, str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(codec, "decode", broken)
    good_subject = "up.execution"
    [group] = _writer().build([_delivery(good_subject, b"\x0a\x01A")], 1000, "2026-11-28T09:00:00.000Z")
    assert group.name == "dead_letter"
    assert group.labels[0][:2] == ("execution", "decoder_error")
    assert "RuntimeError: boom" in group.labels[0][3]


def test_a_batch_is_split_by_feed_in_arrival_order() -> None:
    ex = execution(1).SerializeToString()
    ev = event(1).SerializeToString()
    batch = [
        _delivery("up.execution", ex, 1),
        _delivery("up.sport_event", ev, 2),
        _delivery("up.execution", ex, 3),
    ]
    groups = _writer().build(batch, 1000, "2026-11-28T09:00:00.000Z")
    assert [(g.name, g.count) for g in groups] == [("execution", 2), ("sport_event", 1)]
    assert groups[0].keys[2:] == ["fanout:{execution}:msg:1000.1", "fanout:{execution}:msg:1000.3"]


async def test_a_deleted_consumer_is_set_up_again_and_nothing_is_lost_or_repeated(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    subject = settings.subject("execution")
    async with running(settings, redis) as ingestor:
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(20)])
        await read_stream(redis, keys.stream("execution"), 20)
        created = ingestor.handle.created_ms if ingestor.handle else 0
        await nats.jetstream().delete_consumer(settings.js_stream, settings.js_consumer)
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(20, 40)])
        # The new consumer starts from the stream's first message: the first 20 are
        # redelivered and dropped as duplicates, the next 20 appended once.
        entries = await read_stream(redis, keys.stream("execution"), 40)
        await until(lambda: _settled(ingestor, 60), what="the redelivered messages")
    assert [e["message_id"] for e in entries] == [f"{created}.{s}" for s in range(1, 41)]
    assert await redis.xlen(keys.stream("execution")) == 40
    assert ingestor.stats.duplicates["execution"] == 20
