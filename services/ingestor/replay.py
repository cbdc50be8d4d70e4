"""Redis behind JetStream: replay what Redis lost from JetStream.

Redis may come back empty or behind (started without persistence, or it lost its last
writes) after the ingestor acked messages to NATS, so JetStream will not deliver them
again. Run at start and after every Redis outage, before the batch in flight is written.

Replaying a message Redis still holds is harmless: its dedup key answers with the
original entry and nothing is appended (Redis loses an entry and its dedup key together:
one atomic script writes both). Replaying too little loses acked messages for good. So
the window is chosen wide, and independent of how many ingestors write:

- Redis holds nothing (no entry in any feed stream nor the dead letters): everything
  JetStream retains, up to the durable consumer's delivered sequence.
- Otherwise from the EARLIER of
  - the first JetStream message whose broker time is at or after the newest broker time
    Redis still holds minus FANOUT_REPLAY_MARGIN. With several ingestors on one durable
    consumer their batches reach Redis out of stream order, so Redis can keep ingestor
    B's later batch and lose A's earlier one: the highest broker sequence Redis holds
    proves nothing below it. A batch is written within the ack wait of its delivery (or
    it is redelivered), and Redis loses only its last persistence window of writes, so a
    margin of at least the ack wait plus that window reaches back past any lost batch.
  - the highest broker sequence Redis holds less one batch (one ingestor writes in stream
    order and Redis keeps a prefix of its writes; a batch's feeds are separate script
    calls), which also covers a single ingestor catching up a backlog of old messages.

  up to the last sequence the durable consumer delivered, through the same writer. The
  lost messages are appended again (with a new epoch if the meta hash was lost, which
  tells readers).

Skipped when Redis has not restarted since a completed check (`check_redis`): a running
Redis loses no write it answered for; only a restart (or a failover to a replica) can,
and each Redis process has its own `run_id` (INFO server), new at every start. The key
`Keys.ingest_run_id()` holds the run_id under which a check last completed:

- equal to the current run_id: the same Redis process has held every write answered
  since that check (which restored what was lost before it): nothing to replay;
- missing (a new or emptied Redis: the marker is lost with the data, as FLUSHALL or a
  restart without persistence lose it) or different (a restart that kept a snapshot, a
  promoted replica): replay as above, then write the run_id read BEFORE the replay, and
  only if Redis still reports it after the replay. A restart during the replay changes it:
  the check runs again. A restart between that last read and the write leaves the old
  run_id in the new Redis: different, so the next check (the ingestor checks after every
  reconnect) replays. A crash mid-replay writes nothing: the next start replays.
- several ingestors may replay at once (each replay is harmless); any one completing
  makes the others' later checks cheap.

Not covered: keys removed by hand (DEL) or evicted from a running Redis (run Redis with
`maxmemory-policy noeviction`); delete the marker too, and the next start replays. On a
Redis Cluster the marker would be needed per node (the ingestor talks to one Redis).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.client import JetStreamContext
from nats.js.errors import NotFoundError
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from services.ingestor.jetstream import StreamHandle, parse_ack_subject
from services.ingestor.writer import Delivery, Writer
from shared.feeds import DEAD_LETTER, FEED_NAMES
from shared.keys import Keys

log = logging.getLogger(__name__)

DEFAULT_MARGIN = 60.0  # seconds; FANOUT_REPLAY_MARGIN


@dataclass(frozen=True, slots=True)
class ReplayResult:
    redis_broker_seq: int  # the highest broker sequence Redis held
    delivered_stream_seq: int  # the last the durable consumer delivered
    read: int  # messages read again from JetStream
    appended: int  # of which Redis had lost (appended again)
    from_seq: int = 0  # where the replay started (0: nothing replayed)


@dataclass(frozen=True, slots=True)
class CheckResult:
    run_id: str | None  # the Redis process checked (None: INFO server did not say)
    skipped: bool  # Redis had not restarted since a completed check: nothing replayed
    replays: tuple[ReplayResult, ...] = ()  # more than one if Redis restarted meanwhile

    @property
    def read(self) -> int:
        return sum(r.read for r in self.replays)

    @property
    def appended(self) -> int:
        return sum(r.appended for r in self.replays)


async def redis_run_id(redis: Redis) -> str | None:
    """The run_id of the Redis process answering (new at every start); None if INFO
    server is refused (a managed Redis may disable it) or does not name one."""
    try:
        info = await redis.info("server")
    except ResponseError as exc:
        log.warning(
            "Redis refuses INFO server: cannot tell whether it restarted; replaying at every check",
            extra={"error": str(exc)},
        )
        return None
    run_id = info.get("run_id")
    return str(run_id) if run_id else None


async def check_redis(
    nc: NATS,
    redis: Redis,
    writer: Writer,
    handle: StreamHandle,
    keys: Keys,
    batch: int,
    margin: float = DEFAULT_MARGIN,
) -> CheckResult:
    """Replay what Redis may have lost unless it has not restarted since a completed
    check (see the module docstring)."""
    marker = keys.ingest_run_id()
    replays: list[ReplayResult] = []
    while True:
        run_id = await redis_run_id(redis)
        verified = await redis.get(marker)
        if run_id is not None and verified is not None and _text(verified) == run_id:
            if not replays:
                log.info("Redis has not restarted since its last check: no replay", extra={"run_id": run_id})
            return CheckResult(run_id, not replays, tuple(replays))
        if replays or verified is not None:
            log.warning(
                "Redis restarted since its last check against JetStream",
                extra={"run_id": run_id, "checked_run_id": _text(verified) if verified else None},
            )
        replays.append(await replay_if_behind(nc, redis, writer, handle, keys, batch, margin))
        if run_id is None:
            return CheckResult(None, False, tuple(replays))
        if await redis_run_id(redis) != run_id:
            continue  # restarted during the replay: what it wrote may be lost too
        await redis.set(marker, run_id)
        return CheckResult(run_id, False, tuple(replays))


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class RedisState:
    high_water: int  # the highest broker sequence in the meta hashes (0: none)
    newest_broker_time: datetime | None  # of the newest entry held (None: no entry at all)


async def redis_high_water(redis: Redis, keys: Keys) -> int:
    """The highest broker sequence Redis holds, over the feeds and the dead letters (0: none)."""
    return (await redis_state(redis, keys)).high_water


async def redis_state(redis: Redis, keys: Keys) -> RedisState:
    """Where Redis stands: its highest broker sequence and the newest broker time it holds."""
    names = (*FEED_NAMES, DEAD_LETTER)
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hget(keys.meta(name), "broker_seq")
        for name in names:
            pipe.xrevrange(keys.stream(name), "+", "-", count=1)
        values = await pipe.execute()
    seqs, lasts = values[: len(names)], values[len(names) :]
    newest: datetime | None = None
    for last in lasts:
        for _, fields in last or ():
            raw = fields.get(b"broker_time", fields.get("broker_time"))
            when = _parse_time(raw)
            if when is not None and (newest is None or when > newest):
                newest = when
    return RedisState(max((int(v) for v in seqs if v is not None), default=0), newest)


def _parse_time(raw: object) -> datetime | None:
    if isinstance(raw, bytes):
        raw = raw.decode("ascii", "replace")
    if not isinstance(raw, str):
        return None
    try:
        return datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        log.warning(
            "an entry's broker_time is not a timestamp; replaying from its sequence",
            extra={"broker_time": raw},
        )
        return None


async def delivered_high_water(nc: NATS, handle: StreamHandle) -> int:
    """The last stream sequence the durable consumer delivered (0: none yet)."""
    info = await nc.jetstream(timeout=5.0).consumer_info(handle.stream, handle.consumer)
    return int(info.delivered.stream_seq or 0) if info.delivered else 0


async def replay_if_behind(
    nc: NATS,
    redis: Redis,
    writer: Writer,
    handle: StreamHandle,
    keys: Keys,
    batch: int,
    margin: float = DEFAULT_MARGIN,
) -> ReplayResult:
    """Replay from JetStream what Redis may have lost (see the module docstring); what was
    found and done. Messages Redis still holds are read again and not appended."""
    delivered = await delivered_high_water(nc, handle)
    state = await redis_state(redis, keys)
    if delivered == 0:
        return ReplayResult(state.high_water, delivered, 0, 0)
    js = nc.jetstream(timeout=5.0)
    if state.newest_broker_time is None and state.high_water == 0:
        start = 1  # Redis holds nothing: the first retained message on
    else:
        start = max(1, state.high_water - batch + 1)
        if state.newest_broker_time is not None:
            since = state.newest_broker_time - timedelta(seconds=margin)
            by_time = await _first_seq_since(js, handle, since)
            if by_time is not None:
                start = min(start, by_time)
    if start > delivered:
        return ReplayResult(state.high_water, delivered, 0, 0)
    behind = state.high_water < delivered
    (log.warning if behind else log.info)(
        "checking Redis against JetStream: replaying what Redis may have lost",
        extra={
            "redis_broker_seq": state.high_water,
            "redis_newest_broker_time": state.newest_broker_time.isoformat()
            if state.newest_broker_time
            else None,
            "delivered_stream_seq": delivered,
            "from_seq": start,
            "margin_s": margin,
        },
    )
    appended, seen = await _replay(nc, writer, handle, start, delivered, batch)
    (log.warning if appended else log.info)(
        "replay done",
        extra={"from_seq": start, "to_seq": delivered, "read": seen, "appended_again": appended},
    )
    return ReplayResult(state.high_water, delivered, seen, appended, start)


@contextlib.asynccontextmanager
async def _reader(js: JetStreamContext, stream: str, purpose: str, **start: Any) -> AsyncIterator[Any]:
    """A short-lived, unacked pull consumer on `stream` from `start` (deliver policy and its
    option), bound for reading; deleted on the way out."""
    name = f"{purpose}-{secrets.token_hex(4)}"
    await js.add_consumer(
        stream, ConsumerConfig(name=name, ack_policy=AckPolicy.NONE, inactive_threshold=60.0, **start)
    )
    try:
        sub = await js.pull_subscribe_bind(name, stream=stream)
        try:
            yield sub
        finally:
            await sub.unsubscribe()
    finally:
        try:
            await js.delete_consumer(stream, name)
        except NotFoundError:
            pass


async def _first_seq_since(js: JetStreamContext, handle: StreamHandle, since: datetime) -> int | None:
    """The stream sequence of the first retained message stored at or after `since`
    (None: none is)."""
    async with _reader(
        js, handle.stream, "replay-probe", deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=since
    ) as sub:
        try:
            msgs = await sub.fetch(1, timeout=2)
        except nats.errors.TimeoutError:
            return None
        return int(msgs[0].metadata.sequence.stream) if msgs else None


async def _replay(
    nc: NATS, writer: Writer, handle: StreamHandle, start: int, upto: int, batch: int
) -> tuple[int, int]:
    js = nc.jetstream(timeout=5.0)
    appended = seen = 0
    async with _reader(
        js, handle.stream, "replay", deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
    ) as sub:
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
    return appended, seen


def _ns(reply: str) -> int:
    return parse_ack_subject(reply)[2]
