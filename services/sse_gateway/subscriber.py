"""One client's stream: where it starts, its catch-up on its own, then the hub's live set.

A subscriber behind the hub reads history itself, feed by feed, in batches: the Postgres
catalogue while its position is before what Redis still holds, then Redis (XRANGE), and
joins the hub when it is exactly at the hub's position in every feed it reads. Each
handover is checked by `seq` (the next entry must be seq + 1), so nothing is repeated,
and what neither store holds is reported in-band:

    event: gap    data: {"feed", "asked_after", "resumed_at", "missed"}   (seqs)
    event: reset  data: {"feed", "asked_epoch", "current_epoch", "asked_after", "resumes_at"}

A live subscriber gets the hub's chunks through a bounded buffer, and its writer sends
everything pending as ONE chunk per wake-up. Past the buffer it drops to catch-up; if it
has not caught up within `slow_client_timeout` it is disconnected (it resumes by its id).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from services.sse_gateway import cursor, frames, history, metrics
from services.sse_gateway.cursor import NO_EPOCH, CursorError, Position
from services.sse_gateway.filters import Filters
from services.sse_gateway.history import Archive, ArchiveUnavailable, Record
from services.sse_gateway.hub import Hub
from services.sse_gateway.settings import GatewaySettings
from shared.keys import Keys
from shared.lifecycle import wait_or_stop

log = logging.getLogger(__name__)


class Registry:
    """The connected subscribers of the process, and an event set when there are none."""

    def __init__(self) -> None:
        self._members: set[Subscriber] = set()
        self.empty = asyncio.Event()
        self.empty.set()

    def __len__(self) -> int:
        return len(self._members)

    def __iter__(self) -> Iterator[Subscriber]:
        return iter(list(self._members))

    def add(self, sub: Subscriber) -> None:
        self._members.add(sub)
        self.empty.clear()
        metrics.SERVED.inc()
        metrics.SUBSCRIBERS.set(len(self._members))

    def discard(self, sub: Subscriber) -> None:
        self._members.discard(sub)
        metrics.SUBSCRIBERS.set(len(self._members))
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


RETRY_AFTER_REDIS_ERROR = 0.5
SLOW_CLIENT = "too far behind for too long"  # the close reason of a SlowClient


class SlowClient(Exception):
    """The subscriber stayed behind the live position for too long."""


class Subscriber:
    __slots__ = (
        "_waiter",
        "archive",
        "behind_since",
        "buffer",
        "close_reason",
        "closed",
        "feeds",
        "filters",
        "hub",
        "keys",
        "limit",
        "live",
        "pending",
        "positions",
        "quiet",
        "redis",
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
        redis: Redis,
        archive: Archive,
        settings: GatewaySettings,
    ) -> None:
        self.feeds = feeds
        self.filters = filters
        self.positions = positions
        self.hub = hub
        self.redis = redis  # the history client (a bounded pool), not the hub's
        self.keys: Keys = hub.keys
        self.archive = archive
        self.settings = settings
        self.limit = settings.client_buffer
        self.buffer: list[bytes] = []
        self.pending = 0
        self._waiter: asyncio.Future[None] | None = None
        self.quiet = False
        self.sending_since = 0.0  # loop time a write started, 0 when none is in progress
        self.stalled = False
        self.task: asyncio.Task[Any] | None = None  # the task writing this stream
        self.live = False
        self.closed = False
        self.behind_since: float | None = None
        self.close_reason = ""

    # -- called by the hub (synchronous) ---------------------------------------------

    def push(self, chunk: bytes, count: int) -> bool:
        if self.pending + count > self.limit:
            return False
        self.buffer.append(chunk)
        self.pending += count
        self._wake()
        return True

    def stall(self) -> None:
        """Its current write has not finished for too long: cancel it (see EventStream)."""
        if not self.stalled and self.task is not None:
            self.stalled = True
            self.close("a write stalled")
            self.task.cancel()

    def heartbeat(self) -> None:
        if self.quiet and self.live and not self.buffer:
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

    def close(self, reason: str = "") -> None:
        self.closed = True
        self.close_reason = self.close_reason or reason
        self._wake()

    # -- the stream ------------------------------------------------------------------

    def cursor(self) -> bytes:
        return cursor.format(self.positions, self.feeds).encode()

    async def stream(self) -> AsyncGenerator[bytes, None]:
        """The bytes to send, chunk by chunk, until closed."""
        yield frames.retry(self.settings.retry_ms) + frames.id_only(self.cursor())
        self.live = self.hub.join(self)
        if not self.live:
            metrics.CATCHUPS.inc()
        try:
            while not self.closed:
                if self.buffer:
                    chunk = b"".join(self.buffer)
                    self.buffer.clear()
                    self.pending = 0
                    self.quiet = False
                    yield chunk
                elif not self.live:
                    chunk = await self._catch_up()
                    if chunk:
                        self.quiet = False
                        yield chunk
                else:
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        except SlowClient:
            self.close(SLOW_CLIENT)
            metrics.SLOW_DISCONNECTS.inc()
            log.info("slow subscriber disconnected", extra={"feeds": ",".join(self.feeds)})
            yield b": disconnected: too far behind for too long; reconnect with your last id\n\n"
        except (KeyError, ValueError) as exc:  # an entry without a seq: outside the contract
            log.error("unreadable stream entry, closing the stream", extra={"error": str(exc)})
            yield b": an unreadable stream entry stopped this stream; see the gateway's log\n\n"
        except ArchiveUnavailable as exc:
            log.warning("history unavailable, closing the stream", extra={"error": str(exc)})
            yield b": history is unavailable right now (catalogue database); reconnect with your last id\n\n"
        finally:
            self.hub.leave(self)
            self.live = False

    async def _catch_up(self) -> bytes:
        """One round of catch-up: a batch per feed behind, or the join, or a wait."""
        if (
            self.behind_since is not None
            and time.monotonic() - self.behind_since > self.settings.slow_client_timeout
        ):
            raise SlowClient
        out: list[bytes] = []
        try:
            for feed in self.feeds:
                out += await self._step(feed)
                if self.closed:
                    return b""
        except (RedisError, OSError) as exc:
            # Redis away (the hub's reader waits for it too): keep the stream, retry later.
            log.warning("catch-up read failed; retrying", extra={"error": str(exc) or type(exc).__name__})
            await asyncio.sleep(RETRY_AFTER_REDIS_ERROR)  # a retry delay, bounded by the heartbeat
            return b"".join(out) + frames.HEARTBEAT
        if out:
            return b"".join(out)
        if self.hub.join(self):
            self.live = True
            self.behind_since = None
            return b""
        # Ahead of the hub, or it is not reading (Redis away): wait for it to move.
        moved = await self.hub.wait_moved(self.feeds, self.settings.heartbeat)
        return b"" if moved else frames.HEARTBEAT

    async def _step(self, feed: str) -> list[bytes]:
        hub = self.hub.positions.get(feed)
        if hub is None or not self.hub.ready(feed):
            return []
        mine = self.positions[feed]
        if mine.epoch == NO_EPOCH:
            if hub.epoch == NO_EPOCH:
                return []
            mine = self.positions[feed] = cursor.origin(hub.epoch)  # there was nothing before
        if mine.epoch != hub.epoch:
            # Another epoch: the rest of ours from the catalogue, then say so and start the new one.
            rows = await self.archive.after(feed, mine.epoch, mine.seq, self.settings.catchup_batch, None)
            if rows:
                return self._deliver(feed, rows)
            metrics.RESETS.inc()
            notice = frames.notice(
                "reset",
                {
                    "feed": feed,
                    "asked_epoch": mine.epoch,
                    "current_epoch": None if hub.epoch == NO_EPOCH else hub.epoch,
                    "asked_after": mine.seq,
                    "resumes_at": "the first entry of the current epoch",
                },
            )
            self.positions[feed] = cursor.origin(hub.epoch)
            log.info("reset sent", extra={"feed": feed, "asked_epoch": mine.epoch, "epoch": hub.epoch})
            return [notice]
        if mine.seq >= hub.seq:
            return []  # caught up (the join checks), or ahead of the hub (wait)
        batch = self.settings.catchup_batch
        recs = await history.redis_after(self.redis, self.keys, feed, mine.entry_id, hub.entry_id, batch)
        if recs and recs[0].seq == mine.seq + 1:
            return self._deliver(feed, recs)
        rows = await self.archive.after(feed, mine.epoch, mine.seq, batch, hub.seq)
        if rows and rows[0].seq == mine.seq + 1:
            return self._deliver(feed, rows)
        # Neither holds the next entry: a gap, reported, then on from what exists.
        if not recs and not rows:
            return [self._gap(feed, mine, hub.seq + 1, hub.entry_id, hub.seq)]
        source = recs if recs and (not rows or recs[0].seq < rows[0].seq) else rows
        return self._deliver(feed, source)

    def _gap(self, feed: str, mine: Position, resumed_at: int, entry_id: str, seq: int) -> bytes:
        metrics.GAPS.inc()
        missed = resumed_at - mine.seq - 1
        log.info("gap sent", extra={"feed": feed, "asked_after": mine.seq, "missed": missed})
        self.positions[feed] = Position(mine.epoch, entry_id, seq)
        return frames.notice(
            "gap", {"feed": feed, "asked_after": mine.seq, "resumed_at": resumed_at, "missed": missed}
        )

    def _deliver(self, feed: str, records: Sequence[Record]) -> list[bytes]:
        """Frames for the contiguous run of `records` (a gap notice first if they start late)."""
        mine = self.positions[feed]
        out: list[bytes] = []
        first = records[0]
        if first.seq != mine.seq + 1:
            out.append(self._gap(feed, mine, first.seq, cursor.id_before(first.entry_id), first.seq - 1))
        feed_b = feed.encode()
        epoch = mine.epoch
        sent = 0
        for record in records:
            if record.seq != self.positions[feed].seq + 1:
                break  # a hole inside the batch: the next round looks at both stores again
            self.positions[feed] = Position(epoch, record.entry_id, record.seq)
            cid = self.cursor()
            if not record.valid:
                out.append(frames.event(frames.MALFORMED, record.data, cid))
            elif self.filters.matches(feed, record.fields):
                out.append(frames.event(feed_b, record.data, cid))
                sent += 1
            else:
                out.append(frames.id_only(cid))
        if sent:
            metrics.EVENTS_SENT.labels(feed).inc(sent)
        return out


# -- where a subscription starts ---------------------------------------------------------


async def start_positions(
    redis: Redis,
    keys: Keys,
    archive: Archive,
    feeds: Sequence[str],
    resume: dict[str, Position],
    start: str,
) -> dict[str, Position]:
    """Per feed: the cursor's position, else `start` (latest | earliest | ISO time).

    Raises CursorError for a cursor from the future, ValueError for a bad `start`.
    """
    when: datetime | None = None
    if start not in ("latest", "earliest"):
        when = parse_time(start)
    positions: dict[str, Position] = {}
    for feed in feeds:
        epoch, seq, last_id = await redis.hmget(keys.meta(feed), ["epoch", "seq", "last_id"])
        top = Position(_s(epoch) or NO_EPOCH, _s(last_id) or cursor.ORIGIN_ID, int(seq or 0))
        asked = resume.get(feed)
        if asked is not None:
            if asked.epoch == top.epoch and (asked.seq > top.seq or asked.id_key > top.id_key):
                raise CursorError(
                    f"cursor from the future: {feed} is at seq {top.seq} (entry {top.entry_id}) in epoch "
                    f"{top.epoch}, the cursor asks for after seq {asked.seq} (entry {asked.entry_id})"
                )
            positions[feed] = asked
        elif start == "latest" or top.epoch == NO_EPOCH:
            positions[feed] = top
        else:
            min_ms = 0 if when is None else int(when.timestamp() * 1000)
            positions[feed] = await _first_from(redis, keys, archive, feed, top, min_ms)
    return positions


async def _first_from(
    redis: Redis, keys: Keys, archive: Archive, feed: str, top: Position, min_ms: int
) -> Position:
    """Just before the first entry (Redis or catalogue) whose id time is at or after `min_ms`."""
    oldest = await history.redis_first(redis, keys, feed)
    found: tuple[str, int] | None = None
    if oldest is not None and cursor.entry_key(oldest[0])[0] <= min_ms:
        found = await history.redis_first(redis, keys, feed, f"{min_ms}-0")
    elif oldest is not None and oldest[1] == 1:
        found = oldest  # Redis still holds the epoch's first entry: nothing older in the catalogue
    else:
        found = await archive.first(feed, top.epoch, min_ms) or oldest
    if found is None:
        return top
    entry_id, seq = found
    if seq <= 1:
        return cursor.origin(top.epoch)
    return Position(top.epoch, cursor.id_before(entry_id), seq - 1)


def parse_time(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"bad `from` {text[:80]!r}: expected latest, earliest or an ISO 8601 time such as "
            "2026-11-28T09:00:00Z"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _s(value: object) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
