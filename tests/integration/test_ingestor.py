"""The ingestor against the real NATS JetStream and Redis, run in-process as a task.

Each test has its own JetStream streams (one per feed), subject prefix and Redis key
prefix (conftest). Contract v2: an entry's id is `<seq>-0` where seq is the JetStream
stream sequence of its feed's stream, and its message id is `<epoch>.<seq>` with epoch
the stream's creation time in ms.
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
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from services.ingestor import jetstream
from services.ingestor.consumer import Ingestor
from services.ingestor.jetstream import StreamHandle, parse_ack_subject
from services.ingestor.settings import IngestorSettings
from services.ingestor.writer import Delivery, Writer
from shared import codec
from shared.feeds import DEAD_LETTER, EXECUTION, FEED_NAMES, SPORT_EVENT, epoch_of, js_stream_name
from shared.keys import Keys
from shared.proto import event_pb2, execution_pb2
from shared.settings import Settings
from tests.integration.test_gateway_helpers import free_port
from tests.protowire import f_len, varint

# -- helpers (also used by the other ingestor tests) ------------------------------------


def ingestor_settings(base: Settings, **overrides: Any) -> IngestorSettings:
    values = {f.name: getattr(base, f.name) for f in fields(Settings)}
    values.update({"http": ("127.0.0.1", 0), "js_ack_wait": 1.0, "batch": 200})
    values.update(overrides)
    return IngestorSettings.from_env({}, **values)


def stream_of(settings: Settings, feed: str) -> str:
    """The feed's JetStream stream."""
    return js_stream_name(settings.js_stream, feed)


async def until(condition: Callable[[], Awaitable[bool]], within: float = 30.0, what: str = "") -> None:
    """Poll a condition that nothing can be awaited for, up to a deadline."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.05)


async def read_entries(
    redis: Redis, key: str, count: int, within: float = 30.0, after: str = "0-0"
) -> list[tuple[str, dict[str, str]]]:
    """Block on XREAD until `count` entries after `after` are in the stream; (id, fields) each."""
    entries: list[tuple[str, dict[str, str]]] = []
    last = after
    deadline = time.monotonic() + within
    while len(entries) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"{key}: {len(entries)} entries, expected {count}")
        reply: Any = await redis.xread({key: last}, count=10_000, block=500)
        for _, batch in reply:
            for entry_id, raw in batch:
                last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                entries.append((last, codec.str_entry(raw)))
    return entries


async def read_stream(redis: Redis, key: str, count: int, within: float = 30.0) -> list[dict[str, str]]:
    """Block on XREAD until `count` entries are in the stream; return them all (as str)."""
    return [fields for _, fields in await read_entries(redis, key, count, within)]


async def top_of(redis: Redis, key: str) -> int:
    """The seq of a stream's last entry (0: none)."""
    last: Any = await redis.xrevrange(key, count=1)
    return int(last[0][0].split(b"-")[0]) if last else 0


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


async def fetch_unacked(nats: Any, handle: StreamHandle, count: int) -> tuple[list[Any], list[Delivery]]:
    """`count` messages delivered to the durable consumer (not acked), and as Deliveries."""
    sub = await nats.jetstream().pull_subscribe_bind(handle.consumer, stream=handle.stream)
    msgs = await sub.fetch(count, timeout=5)
    assert len(msgs) == count
    deliveries = [
        Delivery(m.subject, m.data, m.metadata.sequence.stream, 1, parse_ack_subject(m.reply)[2], m.reply)
        for m in msgs
    ]
    return msgs, deliveries


async def _settled(ingestor: Ingestor, n: int) -> bool:
    stats = ingestor.stats
    return sum(stats.duplicates.values()) + sum(stats.appended.values()) + stats.dead_letters >= n


# -- tests --------------------------------------------------------------------------------


async def test_published_messages_become_entries_at_their_jetstream_seq(
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
        exec_entries = await read_entries(redis, keys.stream("execution"), len(executions))
        event_entries = await read_entries(redis, keys.stream("sport_event"), len(events))
        handles = ingestor.handles

    js = nats.jetstream()
    for feed, entries, n in (("execution", exec_entries, 700), ("sport_event", event_entries, 300)):
        info = await js.stream_info(stream_of(settings, feed))
        epoch = epoch_of(info.created)
        assert handles[feed].epoch == epoch and handles[feed].stream == f"{settings.js_stream}_{feed}"
        assert info.config.subjects == [settings.subject(feed)]
        assert (info.state.first_seq, info.state.last_seq) == (1, n)
        # The entry id is the JetStream sequence, and so are seq and the message id.
        assert [i for i, _ in entries] == [f"{s}-0" for s in range(1, n + 1)]
        assert [int(e["seq"]) for _, e in entries] == list(range(1, n + 1))
        assert [e["message_id"] for _, e in entries] == [f"{epoch}.{s}" for s in range(1, n + 1)]
        meta = codec.str_entry(await redis.hgetall(keys.meta(feed)))
        assert meta == {"epoch": epoch, "seq": str(n), "last_id": f"{n}-0", "first_seq": "1"}
        for s in (1, n):  # the JetStream message at seq s is the entry at seq s
            assert (await js.get_msg(stream_of(settings, feed), s)).data == (
                executions if feed == "execution" else events
            )[s - 1].SerializeToString()

    first = exec_entries[3][1]
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

    sport = codec.typed_message(SPORT_EVENT, event_entries[1][1])
    assert sport["sport"] == "BASKETBALL" and sport["data_event"] == "goal é 1"

    dedup = keys.dedup("execution", exec_entries[0][1]["message_id"])
    # remembered with its entry id in its block's hash, for the redelivery window
    assert await redis.hget(dedup, exec_entries[0][1]["message_id"]) == b"1-0"
    assert 0 < await redis.ttl(dedup) <= settings.dedup_ttl == 15 * 60


async def test_a_redelivered_message_makes_no_second_entry(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    handles = await jetstream.setup(nats, settings)
    handle = handles["execution"]
    await publish(nats, settings.subject("execution"), [execution(i).SerializeToString() for i in range(50)])

    # A crash between the Redis write and the ack: write a fetched batch, never ack it.
    _, deliveries = await fetch_unacked(nats, handle, 50)
    writer = Writer(redis, settings, "execution")
    outcome = await writer.write(deliveries, handle.epoch)
    await writer.close()
    assert outcome.appended == 50 and await redis.xlen(keys.stream("execution")) == 50

    # JetStream redelivers them (ack_wait 1 s) to the ingestor, which must not append again.
    async with running(settings, redis) as ingestor:
        await until(lambda: _settled(ingestor, 50), what="the redelivered messages")
    assert ingestor.stats.redelivered == 50
    assert ingestor.stats.duplicates["execution"] == 50
    assert ingestor.stats.appended["execution"] == 0
    entries = await read_entries(redis, keys.stream("execution"), 50)
    assert [i for i, _ in entries] == [f"{s}-0" for s in range(1, 51)]
    assert await redis.xlen(keys.stream("execution")) == 50
    info = await nats.jetstream().consumer_info(handle.stream, handle.consumer)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_malformed_payloads_keep_their_seq_as_error_entries_and_the_rest_flows(
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
        entries = await read_entries(redis, keys.stream("execution"), 2 * len(bad) + 1)
        await until(lambda: _settled(ingestor, 2 * len(bad) + 1), what="all messages settled")
        epoch = ingestor.handles["execution"].epoch

    # Every seq is there: good ones at the odd seqs, the malformed ones at the even seqs.
    assert [i for i, _ in entries] == [f"{s}-0" for s in range(1, 2 * len(bad) + 2)]
    malformed = [e for _, e in entries if codec.is_malformed(e)]
    assert [int(e["seq"]) for e in malformed] == list(range(2, 2 * len(bad) + 1, 2))
    for (name, payload), d in zip(bad.items(), malformed, strict=True):
        assert list(d) == ["seq", "message_id", "error", "payload_b64", "broker_time", "ingest_time"]
        assert base64.b64decode(d["payload_b64"]) == payload, name
        assert expected_error[name] in d["error"], (name, d["error"])
        assert d["message_id"] == f"{epoch}.{d['seq']}"
    assert ingestor.stats.dead_letters == len(bad)
    assert ingestor.stats.appended["execution"] == len(bad) + 1
    assert not await redis.exists(keys.stream(DEAD_LETTER))  # the first layout's, retired: nothing goes there
    info = await nats.jetstream().consumer_info(stream_of(settings, "execution"), settings.js_consumer)
    assert info.num_ack_pending == 0  # malformed ones are acked too


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


async def test_a_recreated_jetstream_stream_starts_a_new_epoch_and_resets_the_redis_stream(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    subject = settings.subject("execution")
    async with running(settings, redis) as ingestor:
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(5)])
        await read_stream(redis, keys.stream("execution"), 5)
        old = ingestor.handles["execution"]
        await nats.jetstream().delete_stream(old.stream)
        # The ingestor notices the consumer is gone and sets the stream up again.
        await until(lambda: _recreated(ingestor, old), what="the stream to be set up again")
        new = ingestor.handles["execution"]
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(5, 8)])

        async def reset() -> bool:
            return await redis.hget(keys.meta("execution"), "epoch") == new.epoch.encode() and (
                await redis.xlen(keys.stream("execution")) == 3
            )

        await until(reset, what="the Redis stream to start the new epoch")
        entries = await read_entries(redis, keys.stream("execution"), 3)
    assert new.epoch != old.epoch
    assert [i for i, _ in entries] == ["1-0", "2-0", "3-0"]
    assert [e["message_id"] for _, e in entries] == [f"{new.epoch}.{s}" for s in range(1, 4)]
    assert [e["symbol"] for _, e in entries] == [execution(i).symbol for i in range(5, 8)]


async def _recreated(ingestor: Ingestor, old: StreamHandle) -> bool:
    handle = ingestor.handles.get(old.feed)
    return handle is not None and handle.created_ms != old.created_ms


async def test_setup_makes_one_stream_per_feed_is_idempotent_and_updates_max_age(
    base_settings: Settings, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    first = await jetstream.setup(nats, settings)
    again = await jetstream.setup(nats, settings)
    assert first == again  # same streams, same creation times: same epochs
    assert sorted(first) == sorted(FEED_NAMES)
    longer = ingestor_settings(base_settings, js_max_age=48 * 3600.0)
    assert await jetstream.setup(nats, longer) == first
    for feed in FEED_NAMES:
        info = await nats.jetstream().stream_info(stream_of(settings, feed))
        assert info.config.max_age == 48 * 3600.0
        assert info.config.subjects == [settings.subject(feed)]
        consumer = await nats.jetstream().consumer_info(stream_of(settings, feed), settings.js_consumer)
        assert consumer.config.ack_policy == "explicit"
        assert consumer.config.max_ack_pending and consumer.config.max_ack_pending > 0


async def test_setup_updates_only_subjects_and_max_age_and_keeps_what_the_operator_set(
    base_settings: Settings, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    js = nats.jetstream()
    # The operator created the stream with limits of their own and an old subject list.
    operator = jetstream.stream_config(settings, "execution")
    operator.subjects = [f"{settings.subject_prefix}old.execution"]
    operator.max_age = 3600.0
    operator.max_msgs = 123_456
    operator.max_bytes = 512 * 1024 * 1024
    operator.duplicate_window = 90.0
    operator.description = "feeds, sized by ops"
    await js.add_stream(operator)
    await jetstream.setup(nats, settings)
    info = await js.stream_info(stream_of(settings, "execution"))
    assert info.config.max_age == settings.js_max_age
    assert info.config.subjects == [settings.subject("execution")]
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
    assert jetstream.stream_config(settings, "execution").num_replicas == 1
    assert (
        jetstream.stream_config(ingestor_settings(base_settings, js_replicas=3), "execution").num_replicas
        == 3
    )
    await jetstream.setup(nats, settings)
    assert (await nats.jetstream().stream_info(stream_of(settings, "sport_event"))).config.num_replicas == 1


async def _legacy_stream(nats: Any, settings: IngestorSettings, published: int) -> Any:
    """The first layout: one stream capturing both feeds, the ingestor's durable consumer on it."""
    js = nats.jetstream()
    await js.add_stream(name=settings.js_stream, subjects=[settings.subject(f) for f in FEED_NAMES])
    await js.add_consumer(settings.js_stream, jetstream.consumer_config(settings))
    await publish(
        nats, settings.subject("execution"), [execution(i).SerializeToString() for i in range(published)]
    )
    return js


async def test_a_drained_legacy_stream_is_retired_keeping_its_messages(
    base_settings: Settings, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    js = await _legacy_stream(nats, settings, 3)
    sub = await js.pull_subscribe_bind(settings.js_consumer, stream=settings.js_stream)
    for m in await sub.fetch(3, timeout=5):
        await m.ack_sync()
    handles = await jetstream.setup(nats, settings)
    legacy = await js.stream_info(settings.js_stream)
    assert legacy.config.subjects == [f"{settings.js_stream}.retired"]
    assert legacy.state.messages == 3
    assert sorted(handles) == sorted(FEED_NAMES)
    await publish(nats, settings.subject("execution"), [execution(9).SerializeToString()])
    assert (await js.stream_info(stream_of(settings, "execution"))).state.messages == 1
    assert await jetstream.setup(nats, settings) == handles  # and once retired, left alone


async def test_a_legacy_stream_with_messages_pending_is_refused_saying_how_to_drain_it(
    base_settings: Settings, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    js = await _legacy_stream(nats, settings, 3)
    with pytest.raises(jetstream.LegacyStreamBusy) as raised:
        await jetstream.setup(nats, settings)
    text = str(raised.value)
    assert settings.js_stream in text and "3 message(s) not yet delivered" in text
    assert f"nats consumer info {settings.js_stream} {settings.js_consumer}" in text
    legacy = await js.stream_info(settings.js_stream)
    assert sorted(legacy.config.subjects) == sorted(settings.subject(f) for f in FEED_NAMES)  # untouched


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


async def test_a_deleted_consumer_is_set_up_again_and_nothing_is_lost_or_repeated(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    subject = settings.subject("execution")
    async with running(settings, redis) as ingestor:
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(20)])
        await read_stream(redis, keys.stream("execution"), 20)
        epoch = ingestor.handles["execution"].epoch
        await nats.jetstream().delete_consumer(stream_of(settings, "execution"), settings.js_consumer)
        await publish(nats, subject, [execution(i).SerializeToString() for i in range(20, 40)])
        # The new consumer starts from the stream's first message: the first 20 are
        # redelivered and dropped as duplicates, the next 20 appended once.
        entries = await read_stream(redis, keys.stream("execution"), 40)
        await until(lambda: _settled(ingestor, 60), what="the redelivered messages")
    assert [e["message_id"] for e in entries] == [f"{epoch}.{s}" for s in range(1, 41)]
    assert await redis.xlen(keys.stream("execution")) == 40
    assert ingestor.stats.duplicates["execution"] == 20


# -- pure helpers of the pull loop and the writer (no servers) ----------------------------


def test_ack_subjects_of_both_formats_parse() -> None:
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


def _writer(feed: str = "execution", **overrides: Any) -> Writer:
    import fakeredis

    settings = IngestorSettings.from_env({}, subject_prefix="up.", **overrides)
    return Writer(fakeredis.FakeAsyncRedis(), settings, feed)


def _delivery(subject: str, payload: bytes, seq: int = 1) -> Delivery:
    return Delivery(subject, payload, seq, 1, 1_795_857_710_302_347_757, f"$JS.ACK.S.c.1.{seq}.{seq}.1.0")


@hypothesis_settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(min_value=1, max_value=2**53), st.text(max_size=30), st.binary(max_size=30)),
        max_size=20,
    )
)
def test_the_packed_command_is_the_bytes_redis_py_would_send(rows: list[tuple[int, str, bytes]]) -> None:
    from redis._parsers import Encoder
    from redis.connection import PythonRespSerializer

    from services.ingestor.writer import Message, pack

    writer = _writer()
    messages = [
        Message(seq, f"1795.{seq}", ["message_id", f"1795.{seq}", "symbol", text]) for seq, text, _ in rows
    ]
    args = writer.command(messages, "1795862595094", start=7)
    assert args[:3] == ["EVALSHA", writer._sha, 2 + len(rows)]
    # redis-py's own packer in pure Python (its default is hiredis itself when installed).
    python_packer: Any = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)  # type: ignore[no-untyped-call]
    assert pack(args) == b"".join(python_packer.pack(*args))
    raw: list[str | int | bytes] = ["SET", "k", *(blob for _, _, blob in rows), *(seq for seq, _, _ in rows)]
    assert pack(raw) == b"".join(python_packer.pack(*raw))


def test_a_message_on_another_subject_keeps_its_seq_as_a_malformed_entry() -> None:
    [m] = _writer().messages([_delivery("up.trades", b"x")], "1000", "2026-11-28T09:00:00.000Z")
    assert m.rejected is not None and m.rejected.reason == "unknown_subject"
    assert m.fields[:2] == ["message_id", "1000.1"] and m.fields[2] == "error"
    assert "not published on subject 'up.trades'" in m.fields[3]


def test_a_decoder_that_fails_unexpectedly_keeps_the_payload_instead_of_stopping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(feed: Any, payload: bytes) -> dict[str, str]:
        raise RuntimeError("boom")

    monkeypatch.setattr(codec, "decode", broken)
    [m] = _writer().messages([_delivery("up.execution", b"\x0a\x01A")], "1000", "2026-11-28T09:00:00.000Z")
    assert m.rejected is not None and m.rejected.reason == "decoder_error"
    assert "RuntimeError: boom" in m.rejected.error


def test_a_batch_is_sorted_by_seq() -> None:
    ex = execution(1).SerializeToString()
    batch = [_delivery("up.execution", ex, s) for s in (3, 1, 2)]
    messages = _writer().messages(batch, "1000", "2026-11-28T09:00:00.000Z")
    assert [m.seq for m in messages] == [1, 2, 3]
    assert [m.message_id for m in messages] == ["1000.1", "1000.2", "1000.3"]


async def test_an_unexpected_error_restarts_the_feeds_pipeline_and_loses_nothing(
    base_settings: Settings, redis: Redis, nats: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ingestor_settings(base_settings)
    keys = Keys(settings.key_prefix)
    original = Writer.send
    failures: list[str] = []
    readiness: list[bool] = []

    async def buggy_once(self: Writer, prepared: Any, meanwhile: Any = None) -> Any:
        if self.feed == "execution" and not failures:
            failures.append(self.feed)
            raise RuntimeError("a bug on the execution feed's path")
        return await original(self, prepared, meanwhile)

    monkeypatch.setattr(Writer, "send", buggy_once)
    async with running(settings, redis) as ingestor:
        await publish(
            nats, settings.subject("execution"), [execution(i).SerializeToString() for i in range(30)]
        )
        await until(lambda: _failed(ingestor, readiness), what="the pipeline to fail")
        await publish(
            nats, settings.subject("sport_event"), [event(i).SerializeToString() for i in range(10)]
        )
        executions = await read_entries(redis, keys.stream("execution"), 30)
        events = await read_entries(redis, keys.stream("sport_event"), 10)
        await until(ingestor.nats_ready, what="/readyz green again")
    assert failures == ["execution"] and readiness == [False]  # red while the feed was down
    assert [i for i, _ in executions] == [f"{s}-0" for s in range(1, 31)]
    assert [i for i, _ in events] == [f"{s}-0" for s in range(1, 11)]  # the other feed went on
    assert await redis.xlen(keys.stream("execution")) == 30


async def _failed(ingestor: Ingestor, readiness: list[bool]) -> bool:
    if not ingestor.feeds["execution"].failed:
        return False
    readiness.append(await ingestor.nats_ready())
    return True
