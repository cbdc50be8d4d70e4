"""The hub: ONE reader per feed stream per process, feeding every live subscriber.

Each reader blocks on `XREAD` from the hub's position in its feed. For a batch of
entries, each entry's JSON is encoded once, each frame once per variant of subscription
(its feed set, which fixes the `id:`, and its filters, which decide event or `id:`-only
frame), and each variant's frames are joined into ONE chunk handed to every member of
that variant: the hub never awaits a client.

A live member is always exactly at the hub's positions in its feeds (that is what being
live means): joining checks the member's positions equal the hub's and adds it in the
same synchronous step, so no entry can fall between its catch-up and the live stream.

A member whose bounded buffer is full is dropped from the live set at the position of
the frames it did get; it catches up on its own and rejoins. When a feed's stream is
reset (another epoch in the meta hash) or trimmed past the reader, every member of that
feed drops to catch-up, which sends the `event: reset` or `event: gap` it needs.
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

from services.sse_gateway import cursor, frames, metrics
from services.sse_gateway.cursor import NO_EPOCH, Position
from services.sse_gateway.filters import Filters
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

    def push(self, chunk: bytes, count: int) -> bool:
        """Queue a chunk of `count` frames; False if the buffer has no room (nothing queued)."""

    def fall_behind(self, positions: dict[str, Position], *, overflow: bool) -> None:
        """Leave the live set at `positions` (what it was sent) and catch up on its own."""


@dataclass(eq=False)
class _Group:
    feeds: tuple[str, ...]
    filters: Filters
    members: set[Member] = field(default_factory=set)


class Hub:
    def __init__(
        self, redis: Redis, keys: Keys, stop: asyncio.Event, *, batch: int = 1000, block: float = 2.0
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.stop = stop
        self.batch = batch
        self.block_ms = max(1, int(block * 1000))
        self.positions: dict[str, Position] = {}
        self._groups: dict[tuple[tuple[str, ...], Filters], _Group] = {}
        self._by_feed: dict[str, list[_Group]] = {f: [] for f in FEED_NAMES}
        self._ready = {f: asyncio.Event() for f in FEED_NAMES}
        self._moved = {f: asyncio.Event() for f in FEED_NAMES}
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        self._closing = False
        self._tasks = [asyncio.create_task(self._run(f), name=f"hub-reader-{f}") for f in FEED_NAMES]

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
        return self._ready[feed].is_set()

    def live_members(self) -> int:
        return sum(len(g.members) for g in self._groups.values())

    async def wait_moved(self, feeds: Sequence[str], within: float) -> bool:
        """Until the hub's position in one of `feeds` moves (or it becomes ready): True; or
        `within` seconds passed: False."""
        waits = [asyncio.ensure_future(self._moved[f].wait()) for f in feeds]
        try:
            done, _ = await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return bool(done)

    # -- membership (synchronous: no await between the check and the join) -------------

    def join(self, member: Member) -> bool:
        """Add `member` to the live set if it is exactly at the hub's positions."""
        for feed in member.feeds:
            hub = self.positions.get(feed)
            mine = member.positions[feed]
            if hub is None or not self.ready(feed) or hub.epoch != mine.epoch or hub.seq != mine.seq:
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
        """Every live member of `feed` leaves at the hub's current positions and catches up."""
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

    async def _run(self, feed: str) -> None:
        backoff = Backoff(cap=5.0)
        stream = self.keys.stream(feed)
        synced = False
        warned = False
        while not self.stop.is_set() and not self._closing:
            try:
                if not synced:
                    await self._sync(feed)
                    synced = True
                    if warned:
                        log.info("feed reader reading again", extra={"feed": feed})
                    warned = False
                    backoff.reset()
                    self._ready[feed].set()
                    self._signal(feed)
                position = self.positions[feed]
                reply: Any = await self.redis.xread(
                    {stream: position.entry_id}, count=self.batch, block=self.block_ms
                )
                if reply:
                    await self._accept(feed, reply[0][1])
                else:
                    epoch = await self.redis.hget(self.keys.meta(feed), "epoch")
                    if _s(epoch) != position.epoch:
                        await self._sync(feed)
            except (RedisError, OSError) as exc:
                if not warned:
                    log.warning(
                        "feed reader cannot read Redis; retrying", extra={"feed": feed, "error": str(exc)}
                    )
                    warned = True
                self._ready[feed].clear()
                synced = False
                if await backoff.wait(self.stop):
                    break

    async def _meta(self, feed: str) -> Position:
        epoch, seq, last_id = await self.redis.hmget(self.keys.meta(feed), ["epoch", "seq", "last_id"])
        return Position(_s(epoch), _s(last_id) if last_id else cursor.ORIGIN_ID, int(seq or 0))

    async def _sync(self, feed: str) -> None:
        """Take the position from the meta hash; on another epoch, send the members to catch up."""
        meta = await self._meta(feed)
        old = self.positions.get(feed)
        if old is None:
            self.positions[feed] = meta
            log.info("feed reader started", extra={"feed": feed, "epoch": meta.epoch, "seq": meta.seq})
        elif old.epoch == NO_EPOCH and old.seq == 0 and meta.epoch != NO_EPOCH:
            self.positions[feed] = Position(meta.epoch, old.entry_id, 0)  # the feed's first entries
        elif meta.epoch != old.epoch or meta.seq < old.seq:
            log.warning(
                "feed stream reset",
                extra={"feed": feed, "old_epoch": old.epoch, "epoch": meta.epoch, "seq": meta.seq},
            )
            self._kick(feed, "stream reset")  # at the old positions: their catch-up sends the reset
            self.positions[feed] = meta
            self._signal(feed)

    async def _accept(self, feed: str, entries: list[tuple[Any, Mapping[Any, Any]]]) -> None:
        position = self.positions[feed]
        first = _seq(entries[0][1])
        if first is None:
            first = position.seq + 1  # judged when dispatched
        if position.epoch == NO_EPOCH or first != position.seq + 1:
            epoch = _s(await self.redis.hget(self.keys.meta(feed), "epoch"))
            if position.epoch == NO_EPOCH and position.seq == 0 and epoch != NO_EPOCH:
                self.positions[feed] = position = Position(epoch, position.entry_id, 0)
            if epoch != position.epoch:
                await self._sync(feed)  # reset: continue from the new epoch's top
                return
            if first > position.seq + 1:
                self._kick(feed, "entries trimmed before the reader read them")
        self._dispatch(feed, entries)

    def _dispatch(self, feed: str, entries: list[tuple[Any, Mapping[Any, Any]]]) -> None:
        before = self.positions[feed]
        epoch = before.epoch
        groups = list(self._by_feed[feed])
        last_seq = before.seq
        if not groups:
            for entry_id, fields in reversed(entries):
                seq = _seq(fields)
                if seq is None:
                    continue
                if seq > last_seq:
                    self.positions[feed] = Position(epoch, _s(entry_id), seq)
                break
            else:
                self._unreadable(feed, entries[-1][0], last_seq)
        else:
            feed_b = feed.encode()
            out: dict[int, list[bytes]] = {id(g): [] for g in groups}
            full: dict[int, int] = dict.fromkeys(out, 0)
            for raw_id, raw in entries:
                fields = {_s(k): _s(v) for k, v in raw.items()}
                seq = _seq(fields)
                if seq is None:
                    self._unreadable(feed, raw_id, last_seq)
                    continue
                if seq <= last_seq:
                    continue
                last_seq = seq
                self.positions[feed] = Position(epoch, _s(raw_id), seq)
                data: bytes | None = None
                name = feed_b
                ids: dict[tuple[str, ...], bytes] = {}
                for group in groups:
                    cid = ids.get(group.feeds)
                    if cid is None:
                        cid = ids[group.feeds] = cursor.format(self.positions, group.feeds).encode()
                    if group.filters.matches(feed, fields):
                        if data is None:
                            name, data = frames.entry_payload(feed, feed_b, fields)
                        out[id(group)].append(frames.event(name, data, cid))
                        full[id(group)] += 1
                    else:
                        out[id(group)].append(frames.id_only(cid))
            sent = 0
            for group in groups:
                pending = out[id(group)]
                if not pending:
                    continue
                chunk = b"".join(pending)
                for member in list(group.members):
                    if member.push(chunk, len(pending)):
                        sent += full[id(group)]
                    else:
                        group.members.discard(member)
                        positions = {f: self.positions[f] for f in group.feeds}
                        positions[feed] = before
                        metrics.OVERFLOWS.inc()
                        member.fall_behind(positions, overflow=True)
                if not group.members:
                    self._drop_group(group)
            if sent:
                metrics.EVENTS_SENT.labels(feed).inc(sent)
        last_id = self.positions[feed].entry_id
        metrics.READER_LAG.labels(feed).set(max(0.0, time.time() - cursor.entry_key(last_id)[0] / 1000))
        self._signal(feed)

    def _unreadable(self, feed: str, entry_id: Any, last_seq: int) -> None:
        """An entry without a seq (outside the contract): step over it, loudly."""
        log.error("stream entry without a valid seq skipped", extra={"feed": feed, "entry_id": _s(entry_id)})
        current = self.positions[feed]
        if cursor.entry_key(_s(entry_id)) > current.id_key:
            self.positions[feed] = Position(current.epoch, _s(entry_id), last_seq)

    def _signal(self, feed: str) -> None:
        event = self._moved[feed]
        self._moved[feed] = asyncio.Event()
        event.set()


def _s(value: Any) -> str:
    if value is None:
        return NO_EPOCH
    return value.decode() if isinstance(value, bytes) else str(value)


def _seq(fields: Mapping[Any, Any]) -> int | None:
    raw = fields.get("seq", fields.get(b"seq"))
    try:
        return int(_s(raw)) if raw is not None else None
    except ValueError:
        return None
