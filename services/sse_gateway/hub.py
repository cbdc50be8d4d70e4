"""The hub: ONE reader per feed stream per process, feeding every live subscriber.

Each reader blocks on `XREAD` after the last entry id it read (`<seq>-0`: positions come
from JetStream, so a Redis that lost data and is refilled with the same ids keeps that
position valid, and a refill needs no special case: entries at or below the reader's
seq are skipped, and the read position always moves past whatever a read returned).
For a run of entries, each entry's JSON is encoded once, each frame once per variant of
subscription (its feed set, which fixes the `id:`, and its filters, which decide event
or `id:`-only frame), and each variant's frames are joined into ONE chunk, framed once
as an HTTP chunk, handed to every member of that variant (written to its socket at once
when the member has its connection at hand): the hub never awaits a client.

A live member is always exactly at the hub's positions in its feeds (that is what being
live means): joining checks the member's positions equal the hub's and adds it in the
same synchronous step, so no entry can fall between its catch-up and the live stream.

A member whose bounded buffer is full is dropped from the live set at the position of
the frames it did get; it catches up on its own and rejoins. When a feed moves to
another epoch (its JetStream stream was recreated) or entries were trimmed before the
reader read them, every member of that feed drops to catch-up, which sends the
`event: reset` or reads the catalogue. A meta hash or stream that disappeared (Redis
emptied) is not a reset: the reader waits at its position for the refill.

Each feed also keeps its recent window (`recent.Recent`): the last records the hub
dispatched, contiguous by seq within the feed's epoch, filled from Redis (one
XREVRANGE) when the reader starts at a position, cleared on an epoch change or a hole.
A subscriber a few entries behind takes its records from there instead of reading
Redis (`Hub.recent`), so a crowd resuming at once does not queue on the history pool.

Each reader is supervised: whatever ends it (a Redis error, any other exception) is
logged and the reader restarts with backoff; `ready(feed)` is False meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.sse_gateway import cursor, frames, history, metrics
from services.sse_gateway.cursor import NO_EPOCH, Position
from services.sse_gateway.filters import Filters
from services.sse_gateway.history import Record
from services.sse_gateway.recent import Recent
from shared.codec import parse_iso, text
from shared.feeds import FEED_NAMES
from shared.keys import Keys
from shared.lifecycle import Backoff

log = logging.getLogger(__name__)

CLOSE_MARGIN = 2.0  # seconds past one XREAD block for the readers to stop at close
CLOSE_RECANCEL = 0.2  # seconds between cancellations of a reader that has not stopped


class Member(Protocol):
    feeds: tuple[str, ...]
    filters: Filters
    positions: dict[str, Position]

    def push(self, chunk: bytes, count: int, framed: bytes) -> bool:
        """Send (or queue) a chunk of `count` frames, `framed` the same as one HTTP chunk;
        False if its buffer has no room (nothing sent)."""

    def fall_behind(self, positions: dict[str, Position], *, overflow: bool) -> None:
        """Leave the live set at `positions` (what it was sent) and catch up on its own."""


@dataclass(eq=False)
class _Group:
    feeds: tuple[str, ...]
    filters: Filters
    members: set[Member] = field(default_factory=set)


class Hub:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        stop: asyncio.Event,
        *,
        batch: int = 1000,
        block: float = 2.0,
        recent: int = 0,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stop = stop
        self.batch = batch
        self.block_ms = max(1, int(block * 1000))
        self.positions: dict[str, Position] = {}
        self._read_from: dict[str, str] = {}  # the XREAD position: the last entry id read
        self._groups: dict[tuple[tuple[str, ...], Filters], _Group] = {}
        self._by_feed: dict[str, list[_Group]] = {f: [] for f in FEED_NAMES}
        self._ready = {f: asyncio.Event() for f in FEED_NAMES}
        self._moved = {f: asyncio.Event() for f in FEED_NAMES}
        self._recent = {f: Recent(recent) for f in FEED_NAMES}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._closing = False
        self._tasks = [asyncio.create_task(self._supervise(f), name=f"hub-reader-{f}") for f in FEED_NAMES]

    async def close(self) -> None:
        """Stop the readers, within a bound. A reader is cancelled while it blocks in XREAD,
        and redis-py 8.1 now and then swallows that cancellation (the XREAD just returns):
        so the loop also checks `_closing` (and the app's stop event, set before this), and
        a reader still running is cancelled again until the bound, then left behind with a
        warning rather than hanging the shutdown."""
        self._closing = True
        tasks, self._tasks = self._tasks, []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.block_ms / 1000 + CLOSE_MARGIN
        pending = {t for t in tasks if not t.done()}
        while pending and loop.time() < deadline:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=min(CLOSE_RECANCEL, deadline - loop.time()))
        if pending:
            log.warning(
                "feed readers did not stop in time; left behind",
                extra={"readers": ",".join(t.get_name() for t in pending)},
            )
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                error = repr(task.exception())
                log.error("feed reader failed", extra={"reader": task.get_name(), "error": error})

    def ready(self, feed: str) -> bool:
        """Whether the feed's reader is running (synced with Redis and reading)."""
        return self._ready[feed].is_set()

    async def wait_ready(self, feed: str) -> None:
        await self._ready[feed].wait()

    def live_members(self) -> int:
        return sum(len(g.members) for g in self._groups.values())

    async def wait_moved(
        self, feeds: Sequence[str], within: float, also: asyncio.Future[None] | None = None
    ) -> bool:
        """Until the hub's position in one of `feeds` moves (or it becomes ready), or
        `also` is done: True; or `within` seconds passed: False."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._moved[f].wait()) for f in feeds]
        if also is not None:
            waits.append(also)
        try:
            done, _ = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return bool(done)

    def recent(self, feed: str, epoch: str, after: int, limit: int) -> list[Record] | None:
        """The records of `epoch` after seq `after` from the feed's recent window (at most
        `limit`; `[]` when `after` is the newest it holds), or None when the window does
        not hold seq `after` + 1 of that epoch: read History then."""
        return self._recent[feed].after(epoch, after, limit)

    # -- membership (synchronous: no await between the check and the join) -------------

    def join(self, member: Member) -> bool:
        """Add `member` to the live set if it is exactly at the hub's positions."""
        for feed in member.feeds:
            hub = self.positions.get(feed)
            mine = member.positions[feed]
            if hub is None or not self.ready(feed) or hub != mine:
                return False
        for feed in member.feeds:
            member.positions[feed] = self.positions[feed]
        key = (member.feeds, member.filters)
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(member.feeds, member.filters)
            for feed in member.feeds:
                self._by_feed[feed].append(group)
        group.members.add(member)
        return True

    def leave(self, member: Member) -> None:
        group = self._groups.get((member.feeds, member.filters))
        if group is not None and member in group.members:
            group.members.discard(member)
            if not group.members:
                self._drop_group(group)

    def _drop_group(self, group: _Group) -> None:
        self._groups.pop((group.feeds, group.filters), None)
        for feed in group.feeds:
            with contextlib.suppress(ValueError):
                self._by_feed[feed].remove(group)

    def _kick(self, feed: str, reason: str) -> None:
        """Every live member of `feed` leaves at the hub's current positions and catches up;
        the recent window starts again (what follows does not go on from it)."""
        self._recent[feed].clear()
        groups = list(self._by_feed[feed])
        count = 0
        for group in groups:
            for member in group.members:
                member.fall_behind({f: self.positions[f] for f in group.feeds}, overflow=False)
                count += 1
            self._drop_group(group)
        if count:
            log.warning(
                "live subscribers sent to catch-up", extra={"feed": feed, "count": count, "reason": reason}
            )

    # -- the reader ------------------------------------------------------------------

    async def _supervise(self, feed: str) -> None:
        """Run the feed's reader, and restart it, with backoff, whatever ends it: a Redis
        error (logged once until it reads again) or any other exception (logged with its
        traceback). While it is not reading, `ready(feed)` is False (`/readyz` is red)."""
        backoff = Backoff(cap=5.0)
        warned = False
        while not self.stop.is_set() and not self._closing:
            try:
                await self._read(feed, backoff, warned)
                return  # stopping
            except (RedisError, OSError) as exc:
                if not warned:
                    log.warning(
                        "feed reader cannot read Redis; retrying", extra={"feed": feed, "error": str(exc)}
                    )
                    warned = True
            except Exception as exc:  # supervised: any other failure restarts the reader too
                log.error(
                    "feed reader failed; restarting it",
                    exc_info=True,
                    extra={"feed": feed, "error": f"{type(exc).__name__}: {exc}"},
                )
                metrics.READER_RESTARTS.labels(feed).inc()
                warned = True
            finally:
                self._ready[feed].clear()
            if await backoff.wait(self.stop):
                break

    async def _read(self, feed: str, backoff: Backoff, warned: bool) -> None:
        stream = self.keys.stream(feed)
        await self._sync(feed)
        self._ready[feed].set()
        self._signal(feed)
        if warned:
            log.info("feed reader reading again", extra={"feed": feed})
        while not self.stop.is_set() and not self._closing:
            reply: Any = await self.redis.xread(
                {stream: self._read_from[feed]}, count=self.batch, block=self.block_ms
            )
            backoff.reset()
            if reply:
                await self._accept(feed, reply[0][1])
            else:
                await self._idle(feed)

    async def _top(self, feed: str) -> Position | None:
        """The feed's top in Redis: the meta hash, or its stream's last entry if the meta
        hash was lost; None when Redis holds nothing of the feed (lost, being refilled)."""
        epoch, seq = await self.redis.hmget(self.keys.meta(feed), ["epoch", "seq"])
        if epoch and seq:
            return Position(text(epoch), int(text(seq)))
        last: Any = await self.redis.xrevrange(self.keys.stream(feed), max="+", min="-", count=1)
        if not last:
            return None
        fields = _fields(last[0][1])
        named, top = history.entry_epoch(fields), history.entry_seq(last[0][0])
        return Position(named, top) if named is not None and top is not None else None

    async def _sync(self, feed: str) -> None:
        """The reader's position from Redis at a (re)start. Only a different epoch (the
        JetStream stream was recreated) is a reset; Redis holding less than the reader
        read (lost data, being refilled with the same ids) changes nothing."""
        top = await self._top(feed)
        old = self.positions.get(feed)
        if old is None:
            self.positions[feed] = top if top is not None else cursor.origin(NO_EPOCH)
            position = self.positions[feed]
            await self._fill(feed)
            started = {"feed": feed, "epoch": position.epoch, "seq": position.seq}
            log.info("feed reader started", extra={**started, "recent": len(self._recent[feed])})
        elif top is not None and old.epoch != NO_EPOCH and top.epoch != old.epoch:
            log.warning(
                "feed stream reset: another epoch",
                extra={"feed": feed, "old_epoch": old.epoch, "epoch": top.epoch, "seq": top.seq},
            )
            self._kick(feed, "stream reset")  # at the old positions: their catch-up sends the reset
            self.positions[feed] = top
            await self._fill(feed)
            self._signal(feed)
        self._read_from[feed] = self.positions[feed].entry_id

    async def _fill(self, feed: str) -> None:
        """The recent window from Redis when the reader starts at a position: the last
        entries up to it (one XREVRANGE), built as History builds them, the run of the
        position's epoch that reaches it without a hole."""
        window = self._recent[feed]
        position = self.positions[feed]
        window.clear()
        if not window.limit or position.epoch == NO_EPOCH or position.seq < 1:
            return
        raw: Any = await self.redis.xrevrange(
            self.keys.stream(feed), max=position.entry_id, min="-", count=window.limit
        )
        records: list[Record] = []
        for entry_id, raw_fields in raw:  # newest first
            seq, fields = history.entry_seq(entry_id), _fields(raw_fields)
            if seq is None or history.entry_epoch(fields) not in (None, position.epoch):
                break
            records.append(history.from_entry(feed, fields, seq))
        records.reverse()
        window.fill(position.epoch, records, position.seq)

    async def _idle(self, feed: str) -> None:
        """Nothing new: has the feed moved to another epoch (its new stream still below
        the reader's position)? A meta hash that disappeared is not that."""
        epoch = await self.redis.hget(self.keys.meta(feed), "epoch")
        position = self.positions[feed]
        if epoch and position.epoch != NO_EPOCH and text(epoch) != position.epoch:
            await self._sync(feed)

    async def _accept(self, feed: str, entries: list[tuple[Any, Mapping[Any, Any]]]) -> None:
        # Always past what was read, whatever it held: the reader never reads a batch twice.
        self._read_from[feed] = text(entries[-1][0])
        parsed = [(entry_id, _fields(raw)) for entry_id, raw in entries]
        epoch = next((e for e in (history.entry_epoch(f) for _, f in parsed) if e is not None), None)
        position = self.positions[feed]
        if epoch is not None and epoch != position.epoch:
            if position.epoch == NO_EPOCH:
                first = next((s for s in (history.entry_seq(i) for i, _ in parsed) if s is not None), 1)
                self.positions[feed] = Position(epoch, first - 1)  # the feed's first entries we see
            else:
                await self._sync(feed)  # another epoch: the reset, from the new epoch's top
                if self.positions[feed].epoch != position.epoch:
                    return
                # Redis says the epoch is ours (an entry naming another was written by hand):
                # not a reset, go on with the batch.
                self._read_from[feed] = text(entries[-1][0])
        self._dispatch(feed, parsed)

    def _dispatch(self, feed: str, entries: list[tuple[Any, dict[str, str]]]) -> None:
        """Hand `entries` (oldest first) to the live members; entries at or below the
        reader's seq are skipped, an entry without a valid seq is stepped over loudly, and
        a hole (entries trimmed before the reader read them) sends every member of the
        feed to catch-up at the seq before it. Each entry's record is built once, for the
        live members and the recent window."""
        epoch = self.positions[feed].epoch
        window = self._recent[feed]
        batch = _Batch(self, feed)
        skipped = 0
        last_fields: Mapping[str, Any] | None = None
        for entry_id, fields in entries:
            seq = history.entry_seq(entry_id)
            if seq is None:
                skipped_id = {"feed": feed, "entry_id": text(entry_id)}
                log.error("stream entry without a valid seq skipped", extra=skipped_id)
                continue
            current = self.positions[feed].seq
            if seq <= current:
                skipped += 1
                continue
            if seq != current + 1:
                batch.flush()
                self._kick(feed, f"seqs {current + 1}..{seq - 1} not in Redis when the reader got there")
                batch = _Batch(self, feed)
            self.positions[feed] = Position(epoch, seq)
            record = history.from_entry(feed, fields, seq)
            if history.entry_epoch(record.fields) in (None, epoch):
                window.add(epoch, record)
            else:  # an entry naming another epoch, written by hand: History stops there too
                window.clear()
            batch.add(record)
            last_fields = record.fields
        batch.flush()
        if skipped:
            log.debug("entries already dispatched skipped", extra={"feed": feed, "count": skipped})
        if last_fields is not None and "broker_time" in last_fields:
            with contextlib.suppress(ValueError):
                age = time.time() - parse_iso(last_fields["broker_time"]).timestamp()
                metrics.READER_LAG.labels(feed).set(max(0.0, age))
        self._signal(feed)

    def _signal(self, feed: str) -> None:
        event = self._moved[feed]
        self._moved[feed] = asyncio.Event()
        event.set()


class _Batch:
    """The frames of a run of one feed's entries for each live group of that feed, pushed
    as ONE chunk per group: each entry's payload encoded once, each frame once per
    variant (feed set: the `id:`; filters: event or `id:`-only frame)."""

    __slots__ = ("before", "feed", "feed_b", "full", "groups", "hub", "out")

    def __init__(self, hub: Hub, feed: str) -> None:
        self.hub = hub
        self.feed = feed
        self.feed_b = feed.encode()
        self.before = hub.positions[feed]
        self.groups = list(hub._by_feed[feed])
        self.out: dict[int, list[bytes]] = {id(g): [] for g in self.groups}
        self.full: dict[int, int] = dict.fromkeys(self.out, 0)

    def add(self, record: Record) -> None:
        if not self.groups:
            return
        positions = self.hub.positions
        feed = self.feed
        fields, data = record.fields, record.data
        malformed = not record.valid  # sent whatever the filters: it moves the cursor
        name = self.feed_b if record.valid else frames.MALFORMED
        ids: dict[tuple[str, ...], bytes] = {}
        for group in self.groups:
            cid = ids.get(group.feeds)
            if cid is None:
                cid = ids[group.feeds] = cursor.format(positions, group.feeds).encode()
            if malformed or group.filters.matches(feed, fields):
                self.out[id(group)].append(frames.event(name, data, cid))
                self.full[id(group)] += 1
            else:
                self.out[id(group)].append(frames.id_only(cid))

    def flush(self) -> None:
        hub = self.hub
        sent = 0
        for group in self.groups:
            pending = self.out[id(group)]
            if not pending:
                continue
            chunk = b"".join(pending)
            framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)  # once for every member written directly
            count = len(pending)
            for member in list(group.members):
                if member.push(chunk, count, framed):
                    sent += self.full[id(group)]
                else:
                    group.members.discard(member)
                    positions = {f: hub.positions[f] for f in group.feeds}
                    positions[self.feed] = self.before
                    metrics.OVERFLOWS.inc()
                    member.fall_behind(positions, overflow=True)
            if not group.members:
                hub._drop_group(group)
            pending.clear()
        if sent:
            metrics.EVENTS_SENT.labels(self.feed).inc(sent)
        self.before = hub.positions[self.feed]


def _fields(raw: Mapping[Any, Any]) -> dict[str, str]:
    return {text(k): text(v) for k, v in raw.items()}
