"""One client's stream: where it starts, its catch-up on its own, then the hub's live set.

A subscriber behind the hub reads history itself, feed by feed, in batches, through
`history.History` (Redis while it holds the next seq, else the PostgreSQL catalogue),
and joins the hub when it is exactly at the hub's position in every feed it reads.
Every handover is by seq (the next record is seq + 1), so nothing is repeated. When
neither store holds the next seq yet (the archiver is behind, or Redis lost data and is
being refilled) it waits, with heartbeats; what neither store will ever hold, and an
epoch that is no longer the feed's, are reported in-band:

    event: gap        data: {"feed", "asked_after", "resumed_at", "missed"}   (seqs)
    event: reset      data: {"feed", "reason": "epoch", "asked_epoch", "current_epoch",
                             "asked_after", "resumes_at"}
                      data: {"feed", "reason": "cursor_version", "asked", "resumes_at"}
    event: malformed  data: {"feed", "seq", "message_id", "error"}  (a payload that was not a
                      valid message: it has its seq and its id, so it is no gap)

A live subscriber whose connection the server gave (`protocol.Connection`, uvicorn with
`protocol.StreamProtocol`) gets the hub's chunks written straight to its socket by the
hub, already framed, with no task woken: its own task sleeps until it must catch up or
end. The socket's write buffer is then its buffer, bounded by FANOUT_CLIENT_BUFFER_BYTES.
Without a connection (another server), the chunks go through a buffer bounded in frames
and in bytes, and its writer sends everything pending as ONE chunk per wake-up. Past
either bound it drops to catch-up; if it has not caught up within `slow_client_timeout`
it is disconnected (it resumes by its id).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from services.sse_gateway import cursor, frames, metrics
from services.sse_gateway.cursor import NO_EPOCH, LegacyCursor, Position
from services.sse_gateway.filters import Filters
from services.sse_gateway.history import ArchiveUnavailable, History, Record
from services.sse_gateway.hub import Hub
from services.sse_gateway.protocol import Connection, frame
from services.sse_gateway.settings import GatewaySettings
from services.sse_gateway.workers import SubscriberCounts
from shared.lifecycle import Backoff, wait_or_stop

log = logging.getLogger(__name__)


class Registry:
    """The connected subscribers of the process, and an event set when there are none.
    Under a supervisor (`workers.py`) each worker also writes its count in its slot of
    the shared `SubscriberCounts`, so `total()` counts every worker's subscribers."""

    def __init__(self) -> None:
        self._members: set[Subscriber] = set()
        self.empty = asyncio.Event()
        self.empty.set()
        self.shared: SubscriberCounts | None = None

    def __len__(self) -> int:
        return len(self._members)

    def total(self) -> int:
        """Subscribers of every worker (of this process when it is the only one)."""
        return self.shared.total() if self.shared is not None else len(self._members)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(list(self._members))

    def add(self, sub: Subscriber) -> None:
        self._members.add(sub)
        self.empty.clear()
        metrics.SERVED.inc()
        metrics.SUBSCRIBERS.set(len(self._members))
        if self.shared is not None:
            self.shared.set(len(self._members))

    def discard(self, sub: Subscriber) -> None:
        self._members.discard(sub)
        metrics.SUBSCRIBERS.set(len(self._members))
        if self.shared is not None:
            self.shared.set(len(self._members))
        if not self._members:
            self.empty.set()

    async def tend(self, stop: asyncio.Event, heartbeat: float, stall_timeout: float) -> None:
        """One ticker for every stream instead of timers per connection or per write: a live
        subscriber quiet for a whole heartbeat interval gets a heartbeat comment, and a write
        stalled past `stall_timeout` is cancelled (the stream ends; the client resumes)."""
        loop = asyncio.get_running_loop()
        tick = max(0.05, min(heartbeat, stall_timeout / 4, 1.0))
        next_beat = loop.time() + heartbeat
        while not await wait_or_stop(stop, tick):
            now = loop.time()
            beat = now >= next_beat
            if beat:
                next_beat = now + heartbeat
            for sub in list(self._members):
                if beat:
                    sub.heartbeat()
                if sub.sending_since and now - sub.sending_since > stall_timeout:
                    sub.stall()


FRAMED_HEARTBEAT = frame(frames.HEARTBEAT)
RETRY_JITTER = 0.5  # each stream's `retry:` is FANOUT_RETRY_MS plus up to this share of it


def jittered(ms: int) -> int:
    """`ms` plus a random 0-50%: a crowd dropped at once (a restart, a dead worker) comes
    back spread over half the delay instead of all in the same millisecond."""
    return ms + random.randint(0, int(ms * RETRY_JITTER))


RETRY_AFTER_REDIS_ERROR = 0.5
WAIT_RETRY_CAP = 2.0  # seconds: the longest pause between looks while a store catches up
SLOW_CLIENT = "too far behind for too long"  # the close reason of a SlowClient


class SlowClient(Exception):
    """The subscriber stayed behind the live position for too long."""


class Subscriber:
    __slots__ = (
        "_retry",
        "_waiter",
        "behind_since",
        "buffer",
        "buffered",
        "byte_limit",
        "close_reason",
        "closed",
        "conn",
        "feeds",
        "filters",
        "history",
        "hub",
        "limit",
        "live",
        "notices",
        "pending",
        "positions",
        "quiet",
        "redis_first",
        "sending_since",
        "settings",
        "stalled",
        "task",
    )

    def __init__(
        self,
        *,
        feeds: tuple[str, ...],
        filters: Filters,
        positions: dict[str, Position],
        hub: Hub,
        history: History,
        settings: GatewaySettings,
        notices: Sequence[bytes] = (),
    ) -> None:
        self.feeds = feeds
        self.filters = filters
        self.positions = positions
        self.hub = hub
        self.history = history  # on the history client (a bounded pool), not the hub's
        self.settings = settings
        self.notices: Sequence[bytes] = notices  # sent right after the start frame
        self.limit = settings.client_buffer
        self.byte_limit = settings.client_buffer_bytes
        self.buffer: list[bytes] = []
        self.pending = 0  # frames in `buffer`
        self.buffered = 0  # bytes in `buffer`
        self.redis_first: dict[str, int | None] = {}  # per feed: Redis's first seq, last seen
        self._retry = Backoff(base=0.05, cap=min(WAIT_RETRY_CAP, settings.heartbeat))
        self._waiter: asyncio.Future[None] | None = None
        self.quiet = False
        self.sending_since = 0.0  # loop time a write started, 0 when none is in progress
        self.stalled = False
        self.task: asyncio.Task[Any] | None = None  # the task writing this stream
        self.live = False
        self.closed = False
        self.behind_since: float | None = None
        self.close_reason = ""
        self.conn: Connection | None = None  # set by EventStream when the server gives it

    # -- called by the hub (synchronous) ---------------------------------------------

    def push(self, chunk: bytes, count: int, framed: bytes) -> bool:
        conn = self.conn
        if conn is not None and self.live and not self.buffer:
            # Live, and the connection at hand: straight to the socket, no task woken.
            if self.closed:
                return True  # it is leaving: nothing more to write
            if not conn.send(framed, self.byte_limit):
                return False
            self.quiet = False
            return True
        if self.pending + count > self.limit or self.buffered + len(chunk) > self.byte_limit:
            return False
        self.buffer.append(chunk)
        self.pending += count
        self.buffered += len(chunk)
        self._wake()
        return True

    def stall(self) -> None:
        """Its current write has not finished for too long: cancel it (see EventStream)."""
        if not self.stalled and self.task is not None:
            self.stalled = True
            self.close("a write stalled")
            self.task.cancel()

    def heartbeat(self) -> None:
        """A heartbeat comment if nothing was sent for a whole interval (live, or waiting
        in catch-up for a store to catch up)."""
        if self.quiet and not self.buffer:
            conn = self.conn
            if conn is not None and self.live:
                if not (self.closed or conn.closing):
                    conn.write(FRAMED_HEARTBEAT)
            else:
                self.buffer.append(frames.HEARTBEAT)
                self._wake()
        self.quiet = True

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fall_behind(self, positions: dict[str, Position], *, overflow: bool) -> None:
        self.live = False
        self.positions = positions
        metrics.CATCHUPS.inc()
        if overflow and self.behind_since is None:
            self.behind_since = time.monotonic()
        self._wake()

    def lost(self) -> None:
        """The client's connection is gone (called by the protocol)."""
        self.close("client disconnected")

    def close(self, reason: str = "") -> None:
        self.closed = True
        self.close_reason = self.close_reason or reason
        self._wake()

    # -- the stream ------------------------------------------------------------------

    def cursor(self) -> bytes:
        return cursor.format(self.positions, self.feeds).encode()

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """The bytes to send, chunk by chunk, until closed. The first chunk also carries
        what the hub's recent windows hold after the start (a resumed subscriber a little
        behind: no read, one write less); the join comes after it is written, so that the
        hub's own writes never go out before it."""
        start = frames.retry(jittered(self.settings.retry_ms)) + frames.id_only(self.cursor())
        yield start + b"".join([*self.notices, *self._recent()])
        self.notices = ()
        self.live = self.hub.join(self)
        if not self.live:
            metrics.CATCHUPS.inc()
        try:
            while not self.closed:
                if self.buffer:
                    chunk = b"".join(self.buffer)
                    self.buffer.clear()
                    self.pending = self.buffered = 0
                    self.quiet = False
                    yield chunk
                elif not self.live:
                    chunk = await self._catch_up()
                    if chunk:
                        self.quiet = False
                        yield chunk
                else:
                    await self._pause(None)
        except SlowClient:
            self.close(SLOW_CLIENT)
            metrics.SLOW_DISCONNECTS.inc()
            log.info("slow subscriber disconnected", extra={"feeds": ",".join(self.feeds)})
            yield b": disconnected: too far behind for too long; reconnect with your last id\n\n"
        except ArchiveUnavailable as exc:
            log.warning("history unavailable, closing the stream", extra={"error": str(exc)})
            yield b": history is unavailable right now (catalogue database); reconnect with your last id\n\n"
        finally:
            self.hub.leave(self)
            self.live = False

    async def _pause(self, within: float | None) -> None:
        """Until woken (a chunk, a heartbeat, a drop to catch-up, the close); in catch-up
        (`within` set) also until the hub moves in one of our feeds, or `within` passed."""
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            if within is None:
                await waiter
            else:
                await self.hub.wait_moved(self.feeds, within, also=waiter)
        finally:
            self._waiter = None

    async def _catch_up(self) -> bytes:
        """One round of catch-up: a batch per feed behind, or the join, or a wait."""
        if (
            self.behind_since is not None
            and time.monotonic() - self.behind_since > self.settings.slow_client_timeout
        ):
            raise SlowClient
        out: list[bytes] = []
        waiting = False
        try:
            for feed in self.feeds:
                got, wait = await self._step(feed)
                out += got
                waiting = waiting or wait
                if self.closed:
                    return b""
        except (RedisError, OSError) as exc:
            # Redis away (the hub's reader waits for it too): keep the stream, retry later.
            log.warning("catch-up read failed; retrying", extra={"error": str(exc) or type(exc).__name__})
            await self._pause(RETRY_AFTER_REDIS_ERROR)
            return b"".join(out)
        if out:
            self._retry.reset()
            return b"".join(out)
        if self.hub.join(self):
            self.live = True
            self.behind_since = None
            return b""
        # Ahead of the hub, or it is not reading (Redis away): wait for it to move. Or a
        # store is catching up (the archiver behind, Redis being refilled): look again soon.
        await self._pause(self._retry.next_delay() if waiting else self.settings.heartbeat)
        return b""

    def _recent(self) -> list[bytes]:
        """Frames of what the hub's recent windows hold after this subscriber's positions."""
        out: list[bytes] = []
        for feed in self.feeds:
            mine = self.positions[feed]
            records = self.hub.recent(feed, mine.epoch, mine.seq, self.settings.catchup_batch)
            if records:
                out += self._deliver(feed, records)
        return out

    async def _step(self, feed: str) -> tuple[list[bytes], bool]:
        """Frames for `feed`, and whether it waits for a store that does not hold the next
        entry yet."""
        hub = self.hub.positions.get(feed)
        if hub is None or not self.hub.ready(feed):
            return [], False
        mine = self.positions[feed]
        if mine.epoch == NO_EPOCH:
            if hub.epoch == NO_EPOCH:
                return [], False
            mine = self.positions[feed] = cursor.origin(hub.epoch)  # there was nothing before
        batch = self.settings.catchup_batch
        if hub.epoch != NO_EPOCH and mine.epoch != hub.epoch:
            # Another epoch: the rest of ours from the catalogue, then say so and start the new one.
            rows = await self.history.archived_after(feed, mine.epoch, mine.seq, batch)
            if rows:
                return self._deliver(feed, rows), False
            current = await self.history.top(feed)
            if current is not None and current[0] == mine.epoch:
                return [], True  # ours is the feed's new epoch; the hub has not seen it yet: wait
            return [self._reset(feed, mine, hub.epoch)], False
        if hub.epoch != NO_EPOCH and mine.seq >= hub.seq:
            return [], False  # caught up (the join checks), or ahead of the hub (wait for it)
        recent = self.hub.recent(feed, mine.epoch, mine.seq, batch)
        if recent:  # from the hub's window, no read: the next round (no await) can join
            return self._deliver(feed, recent), False
        upto = None if hub.epoch == NO_EPOCH else hub.seq
        page = await self.history.after(feed, mine.epoch, mine.seq, upto, batch, self.redis_first.get(feed))
        self.redis_first[feed] = page.redis_first
        if page.records:
            return self._deliver(feed, page.records), False
        if page.gap_to is not None:
            return [self._gap(feed, mine, page.gap_to)], False
        if self._retry.attempt == 0:  # once per wait
            log.info(
                "catch-up waits: neither Redis nor the catalogue holds the next seq yet",
                extra={"feed": feed, "epoch": mine.epoch, "after": mine.seq, "redis_first": page.redis_first},
            )
        return [], True

    def _reset(self, feed: str, mine: Position, epoch: str) -> bytes:
        metrics.RESETS.inc()
        log.info("reset sent", extra={"feed": feed, "asked_epoch": mine.epoch, "epoch": epoch})
        self.positions[feed] = cursor.origin(epoch)
        self.redis_first.pop(feed, None)
        return frames.notice(
            "reset",
            {
                "feed": feed,
                "reason": "epoch",
                "asked_epoch": mine.epoch,
                "current_epoch": epoch,
                "asked_after": mine.seq,
                "resumes_at": "the first entry of the current epoch",
            },
        )

    def _gap(self, feed: str, mine: Position, resumed_at: int) -> bytes:
        metrics.GAPS.inc()
        missed = resumed_at - mine.seq - 1
        log.info("gap sent", extra={"feed": feed, "asked_after": mine.seq, "missed": missed})
        self.positions[feed] = Position(mine.epoch, resumed_at - 1)
        return frames.notice(
            "gap", {"feed": feed, "asked_after": mine.seq, "resumed_at": resumed_at, "missed": missed}
        )

    def _deliver(self, feed: str, records: Sequence[Record]) -> list[bytes]:
        """Frames for `records`, which go on from the subscriber's position without a hole."""
        if not records:
            return []
        out: list[bytes] = []
        feed_b = feed.encode()
        head, tail = cursor.around(self.positions, self.feeds, feed)
        matches = self.filters.matches
        sent = 0
        for record in records:
            cid = b"%s%d%s" % (head, record.seq, tail)
            if not record.valid:
                out.append(frames.event(frames.MALFORMED, record.data, cid))
            elif matches(feed, record.fields):
                out.append(frames.event(feed_b, record.data, cid))
                sent += 1
            else:
                out.append(frames.id_only(cid))
        self.positions[feed] = Position(self.positions[feed].epoch, records[-1].seq)
        if sent:
            metrics.EVENTS_SENT.labels(feed).inc(sent)
        return out


# -- where a subscription starts ---------------------------------------------------------


async def start_positions(
    history: History,
    hub: Hub,
    feeds: Sequence[str],
    resume: dict[str, Position],
    start: str,
) -> dict[str, Position]:
    """Per feed: the cursor's position, else `start`: `latest` (the feed's top: where the
    hub's reader is, else read from Redis while the reader is not running),
    `earliest` (before the first seq PostgreSQL or Redis holds of the epoch), or an ISO
    time (before the first entry whose broker time is at or after it; the top if none).

    A cursor is taken as it is, even ahead of what Redis holds (Redis lost data and is
    being refilled: the subscriber waits until the hub gets there). Raises ValueError
    for a bad `start`.
    """
    when: datetime | None = None
    if start not in ("latest", "earliest"):
        when = parse_time(start)
    positions: dict[str, Position] = {}
    for feed in feeds:
        asked = resume.get(feed)
        positions[feed] = asked if asked is not None else await _start(history, hub, feed, start, when)
    return positions


async def _start(history: History, hub: Hub, feed: str, start: str, when: datetime | None) -> Position:
    live = hub.positions.get(feed)
    if start == "latest" and live is not None and live.epoch != NO_EPOCH and hub.ready(feed):
        # A new viewer joins where the hub's reader is, with no Redis read (a crowd of new
        # viewers costs the shared history pool nothing): anything appended since comes to
        # it live, as to every member. Should Redis already hold an epoch the reader has
        # not met yet, the viewer goes through the epoch change with the hub's members.
        return live
    found = await history.top(feed)
    top = Position(*found) if found is not None else None
    if live is not None and live.epoch != NO_EPOCH:
        if top is None or (top.epoch == live.epoch and top.seq < live.seq):
            top = live  # Redis holds less than the hub read: it lost data and is being refilled
    if top is None:
        return cursor.origin(NO_EPOCH)
    if start == "latest":
        return top
    if when is None:
        first = await history.earliest(feed, top.epoch)
    else:
        first = await history.seq_at(feed, top.epoch, when)
    if first is None:
        return top if when is not None else cursor.origin(top.epoch)
    return Position(top.epoch, min(first - 1, top.seq))


def legacy_notices(legacy: LegacyCursor, positions: Mapping[str, Position]) -> list[bytes]:
    """The in-band answer to a v1 cursor: per feed it names that is subscribed, an
    `event: reset` saying where the stream resumes instead (the request's `from=`)."""
    out = []
    for feed in legacy.feeds:
        if feed in positions:
            metrics.RESETS.inc()
            out.append(
                frames.notice(
                    "reset",
                    {
                        "feed": feed,
                        "reason": "cursor_version",
                        "asked": legacy.text,
                        "resumes_at": positions[feed].text(feed),
                    },
                )
            )
    return out


def parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"bad `from` {text[:80]!r}: expected latest, earliest or an ISO 8601 time such as "
            "2026-11-28T09:00:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)
