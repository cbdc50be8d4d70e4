"""Redis losing what the ingestor wrote (contract v2, section 2): whatever Redis loses, the
ingestor writes it again from JetStream at the SAME ids and seqs (nothing renumbered, no
new epoch), before the batch it holds, so every cursor a client holds stays valid.

- the feed's stream DELeted under load: rebuilt from the first seq not yet archived (the
  catalogue's contiguous top of the feed's table and its dead_letter rows, + 1);
- the last entries lost in a failover (the replica had not received them): the hole
  between the stream's top and the batch is filled;
- everything lost while the ingestor was down, with no readable catalogue: rebuilt from
  what JetStream retains;
- seqs that left JetStream before any ingestor wrote them: the stream restarts at
  JetStream's first retained seq, once everything Redis holds is archived.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from services.ingestor import jetstream, refill
from shared import codec
from shared.keys import Keys
from shared.settings import Settings
from tests.integration.test_gateway_helpers import free_port
from tests.integration.test_ingestor import (
    execution,
    ingestor_settings,
    publish,
    running,
    stream_of,
    top_of,
    until,
)

FEED = "execution"


async def all_entries(redis: Redis, key: str) -> list[tuple[str, dict[str, str]]]:
    raw: Any = await redis.xrange(key)
    return [(i.decode(), codec.str_entry(f)) for i, f in raw]


def same_message(a: dict[str, str], b: dict[str, str]) -> bool:
    """The same message at the same position (ingest_time differs for a refilled entry)."""
    return all(a[k] == b[k] for k in ("seq", "message_id", "symbol", "price", "broker_time"))


async def _reaches(redis: Redis, key: str, top: int) -> bool:
    return await top_of(redis, key) >= top


async def _all_acked(nats: Any, settings: Settings, consumer: str) -> bool:
    info = await nats.jetstream().consumer_info(stream_of(settings, FEED), consumer)
    return not info.num_pending and not info.num_ack_pending


async def test_a_stream_deleted_under_load_is_refilled_from_the_archived_top_with_the_same_ids(
    base_settings: Settings, redis: Redis, nats: Any, pg: asyncpg.Connection
) -> None:
    settings = ingestor_settings(base_settings, batch=100)
    keys = Keys(settings.key_prefix)
    key = keys.stream(FEED)
    schema = f'"{settings.db_schema}"'
    # What the archiver's catalogue holds, as far as the ingestor reads it.
    await pg.execute(f"CREATE SCHEMA {schema}")
    await pg.execute(f"CREATE TABLE {schema}.execution (epoch text, seq bigint)")
    await pg.execute(f"CREATE TABLE {schema}.dead_letter (feed text, epoch text, seq bigint)")
    n = 3000
    async with running(settings, redis) as ingestor:
        epoch = ingestor.handles[FEED].epoch

        async def publish_steadily() -> None:
            for start in range(0, n, 100):
                await publish(
                    nats,
                    settings.subject(FEED),
                    [execution(i).SerializeToString() for i in range(start, start + 100)],
                )
                await asyncio.sleep(
                    0.01
                )  # a steady rate (not synchronisation): load while Redis loses the stream

        publisher = asyncio.create_task(publish_steadily())
        try:
            await until(lambda: _reaches(redis, key, 800), what="800 entries")
            before = dict(await all_entries(redis, key))
            # Seqs 1..300 are archived: 1..290 as rows, 291..300 as dead letters.
            await pg.executemany(
                f"INSERT INTO {schema}.execution VALUES ($1, $2)", [(epoch, s) for s in range(1, 291)]
            )
            await pg.executemany(
                f"INSERT INTO {schema}.dead_letter VALUES ($1, $2, $3)",
                [(FEED, epoch, s) for s in range(291, 301)],
            )
            await redis.delete(key)
            await publisher
        finally:
            publisher.cancel()
        await until(lambda: _reaches(redis, key, n), within=60, what=f"{n} entries")
        await until(lambda: _all_acked(nats, settings, settings.js_consumer), what="every message acked")
        after = await all_entries(redis, key)
        meta = codec.str_entry(await redis.hgetall(keys.meta(FEED)))
    assert [i for i, _ in after] == [f"{s}-0" for s in range(301, n + 1)]  # contiguous from the archived top
    assert [e["message_id"] for _, e in after] == [f"{epoch}.{s}" for s in range(301, n + 1)]
    assert [e["symbol"] for _, e in after] == [execution(i).symbol for i in range(300, n)]
    refilled = [(i, e) for i, e in after if i in before]
    assert refilled and all(same_message(e, before[i]) for i, e in refilled)
    assert (meta["epoch"], meta["first_seq"], meta["seq"]) == (epoch, "301", str(n))  # no new epoch
    assert ingestor.stats.rebuilds >= 1 and ingestor.stats.refilled[FEED] > 0


async def test_the_last_entries_lost_in_a_failover_are_refilled_with_the_same_ids(
    base_settings: Settings, redis: Redis, nats: Any
) -> None:
    settings = ingestor_settings(base_settings, batch=50)
    keys = Keys(settings.key_prefix)
    key = keys.stream(FEED)
    async with running(settings, redis) as ingestor:
        epoch = ingestor.handles[FEED].epoch
        await publish(nats, settings.subject(FEED), [execution(i).SerializeToString() for i in range(1000)])
        await until(lambda: _reaches(redis, key, 1000), what="1000 entries")
        before = await all_entries(redis, key)
        # A failover to a replica that had received the first 700 entries only: the
        # stream, its meta and the dedup keys as they were then (more than any batch lost).
        async with redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            for entry_id, fields in before[:700]:
                pipe.xadd(key, fields, id=entry_id)  # type: ignore[arg-type]
            pipe.hset(keys.meta(FEED), mapping={"seq": 700, "last_id": "700-0"})
            for _, e in before[700:]:
                pipe.hdel(keys.dedup(FEED, e["message_id"]), e["message_id"])
            await pipe.execute()
        await publish(
            nats, settings.subject(FEED), [execution(i).SerializeToString() for i in range(1000, 1200)]
        )
        await until(lambda: _reaches(redis, key, 1200), what="1200 entries")
        after = await all_entries(redis, key)
    assert [i for i, _ in after] == [f"{s}-0" for s in range(1, 1201)]
    assert [e["message_id"] for _, e in after] == [f"{epoch}.{s}" for s in range(1, 1201)]
    assert all(same_message(a, b) for (_, a), (_, b) in zip(after[:1000], before, strict=True))
    assert [e["ingest_time"] for _, e in after[:700]] == [e["ingest_time"] for _, e in before[:700]]
    assert ingestor.stats.refilled[FEED] == 300 and ingestor.stats.holes >= 1
    assert ingestor.stats.appended[FEED] == 1200  # each published message appended once by a batch
    assert await redis.hget(keys.meta(FEED), "epoch") == epoch.encode()


async def test_redis_emptied_while_down_with_no_catalogue_is_rebuilt_from_what_jetstream_retains(
    base_settings: Settings, redis: Redis, nats: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(refill, "CATALOGUE_PATIENCE", 1.0)  # the catalogue never answers here
    unreadable = f"postgresql://127.0.0.1:{free_port()}/fanout"  # nothing listens there
    settings = ingestor_settings(base_settings, database_url=unreadable)
    keys = Keys(settings.key_prefix)
    key = keys.stream(FEED)
    async with running(settings, redis) as ingestor:
        epoch = ingestor.handles[FEED].epoch
        await publish(nats, settings.subject(FEED), [execution(i).SerializeToString() for i in range(80)])
        await until(lambda: _reaches(redis, key, 80), what="80 entries")
    before = await all_entries(redis, key)
    async for k in redis.scan_iter(match=f"{settings.key_prefix}:*", count=1000):
        await redis.delete(k)
    await publish(nats, settings.subject(FEED), [execution(i).SerializeToString() for i in range(80, 100)])
    async with running(settings, redis) as again:
        await until(lambda: _reaches(redis, key, 100), what="100 entries")
        after = await all_entries(redis, key)
    assert [i for i, _ in after] == [f"{s}-0" for s in range(1, 101)]
    assert [e["message_id"] for _, e in after] == [f"{epoch}.{s}" for s in range(1, 101)]
    assert all(same_message(a, b) for (_, a), (_, b) in zip(after[:80], before, strict=True))
    assert again.stats.rebuilds == 1 and again.stats.refilled[FEED] == 80
    assert await redis.hget(keys.meta(FEED), "first_seq") == b"1"


async def test_seqs_that_aged_out_unwritten_restart_the_stream_once_redis_is_archived(
    base_settings: Settings, redis: Redis, nats: Any, pg: asyncpg.Connection
) -> None:
    """The ingestors were down longer than JetStream keeps messages (here a stream limited
    by the operator to 50 messages): seqs 11..60 are gone from JetStream unwritten. The
    ingestor waits until the catalogue holds what Redis has (1..10), then starts the Redis
    stream again at JetStream's first retained seq: a gap nobody can fill, and no stall."""
    settings = ingestor_settings(base_settings, batch=20)
    keys = Keys(settings.key_prefix)
    key = keys.stream(FEED)
    schema = f'"{settings.db_schema}"'
    await pg.execute(f"CREATE SCHEMA {schema}")
    await pg.execute(f"CREATE TABLE {schema}.execution (epoch text, seq bigint)")
    await pg.execute(f"CREATE TABLE {schema}.dead_letter (feed text, epoch text, seq bigint)")
    limited = jetstream.stream_config(settings, FEED)
    limited.max_msgs = 50
    await nats.jetstream().add_stream(limited)
    async with running(settings, redis) as ingestor:
        epoch = ingestor.handles[FEED].epoch
        await publish(nats, settings.subject(FEED), [execution(i).SerializeToString() for i in range(10)])
        await until(lambda: _reaches(redis, key, 10), what="10 entries")
    await publish(nats, settings.subject(FEED), [execution(i).SerializeToString() for i in range(10, 110)])
    assert (await nats.jetstream().stream_info(stream_of(settings, FEED))).state.first_seq == 61

    async with running(settings, redis) as again:

        async def held_back() -> bool:
            return again.stats.holes >= 2  # met the hole, and came back to it: waiting

        await until(held_back, what="the ingestor to wait for the archiver")
        assert [i for i, _ in await all_entries(redis, key)] == [f"{s}-0" for s in range(1, 11)]
        await pg.executemany(
            f"INSERT INTO {schema}.execution VALUES ($1, $2)", [(epoch, s) for s in range(1, 11)]
        )
        await until(lambda: _reaches(redis, key, 110), within=30, what="the stream to restart at 61")
        await until(lambda: _all_acked(nats, settings, settings.js_consumer), what="every message acked")
    after = await all_entries(redis, key)
    assert [i for i, _ in after] == [f"{s}-0" for s in range(61, 111)]
    assert [e["message_id"] for _, e in after] == [f"{epoch}.{s}" for s in range(61, 111)]
    assert await redis.hget(keys.meta(FEED), "first_seq") == b"61"
    assert again.stats.skipped[FEED] == 50
