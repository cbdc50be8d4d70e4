"""Redis behind JetStream: replay what Redis lost from JetStream.

Redis may come back empty or behind (started without persistence, or it lost its last
writes) after the ingestor acked messages to NATS, so JetStream will not deliver them
again. Each feed's meta hash keeps, atomically with each XADD, the highest broker
(stream) sequence ingested; the highest over the feeds and the dead letters is where
Redis stands. Redis persists a prefix of what it was sent, and the ingestor sends in
stream order, so everything after that point (less one batch: a batch's feeds are
separate script calls) is replayed from JetStream, up to the last sequence the
durable consumer delivered, through the same writer. Messages Redis still has are
duplicates by their dedup keys and are not appended again; the lost ones are
appended again (with a new epoch if the meta hash was lost, which tells readers).

Run at start and after every Redis outage, before the batch in flight is written.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import nats
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from redis.asyncio import Redis

from services.ingestor.jetstream import StreamHandle, parse_ack_subject
from services.ingestor.writer import Delivery, Writer
from shared.feeds import DEAD_LETTER, FEED_NAMES
from shared.keys import Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ReplayResult:
    redis_broker_seq: int  # the highest broker sequence Redis held
    delivered_stream_seq: int  # the last the durable consumer delivered
    read: int  # messages read again from JetStream
    appended: int  # of which Redis had lost (appended again)


async def redis_high_water(redis: Redis, keys: Keys) -> int:
    """The highest broker sequence Redis holds, over the feeds and the dead letters (0: none)."""
    async with redis.pipeline(transaction=False) as pipe:
        for name in (*FEED_NAMES, DEAD_LETTER):
            pipe.hget(keys.meta(name), "broker_seq")
        values = await pipe.execute()
    return max((int(v) for v in values if v is not None), default=0)


async def delivered_high_water(nc: NATS, handle: StreamHandle) -> int:
    """The last stream sequence the durable consumer delivered (0: none yet)."""
    info = await nc.jetstream(timeout=5.0).consumer_info(handle.stream, handle.consumer)
    return int(info.delivered.stream_seq or 0) if info.delivered else 0


async def replay_if_behind(
    nc: NATS, redis: Redis, writer: Writer, handle: StreamHandle, keys: Keys, batch: int
) -> ReplayResult:
    """Compare Redis with the consumer and replay the gap; what was found and done."""
    delivered = await delivered_high_water(nc, handle)
    in_redis = await redis_high_water(redis, keys)
    if in_redis >= delivered:
        return ReplayResult(in_redis, delivered, 0, 0)
    start = max(1, in_redis - batch + 1)
    log.warning(
        "Redis is behind what JetStream delivered; replaying the gap from JetStream",
        extra={"redis_broker_seq": in_redis, "delivered_stream_seq": delivered, "from_seq": start},
    )
    appended, seen = await _replay(nc, writer, handle, start, delivered, batch)
    log.warning(
        "replay done",
        extra={"from_seq": start, "to_seq": delivered, "read": seen, "appended_again": appended},
    )
    return ReplayResult(in_redis, delivered, seen, appended)


async def _replay(
    nc: NATS, writer: Writer, handle: StreamHandle, start: int, upto: int, batch: int
) -> tuple[int, int]:
    js = nc.jetstream(timeout=5.0)
    name = f"replay-{secrets.token_hex(4)}"
    await js.add_consumer(
        handle.stream,
        ConsumerConfig(
            name=name,
            ack_policy=AckPolicy.NONE,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
            opt_start_seq=start,
            inactive_threshold=60.0,
        ),
    )
    appended = seen = 0
    try:
        sub = await js.pull_subscribe_bind(name, stream=handle.stream)
        done = False
        while not done:
            try:
                msgs = await sub.fetch(batch, timeout=2)
            except nats.errors.TimeoutError:
                break  # nothing more retained
            deliveries = []
            for m in msgs:
                meta = m.metadata
                if meta.sequence.stream > upto:
                    done = True
                    break
                deliveries.append(Delivery(m.subject, m.data, meta.sequence.stream, 1, _ns(m.reply), m.reply))
                if meta.sequence.stream == upto or meta.num_pending == 0:
                    done = True
            if deliveries:
                result = await writer.write(deliveries, handle.created_ms, watch=False)
                appended += sum(result.appended.values()) + result.dead_letters
                seen += len(deliveries)
        await sub.unsubscribe()
    finally:
        try:
            await js.delete_consumer(handle.stream, name)
        except NotFoundError:
            pass
    return appended, seen


def _ns(reply: str) -> int:
    return parse_ack_subject(reply)[2]
