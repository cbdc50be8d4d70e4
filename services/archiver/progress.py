"""How far the archiver group has got through a stream: what is archived, what is not,
and how far the stream can be trimmed without losing an unarchived entry.

An entry is archived when the group has delivered it (id <= last-delivered-id) and it
is no longer pending (acked after the commit). So every entry strictly below
`min(oldest pending id, last-delivered-id + 1)` is archived: that is the trim floor.

Entry ids are `<seq>-0` (contract v2), so an id says nothing about time: the lag in
seconds is the age of the oldest unarchived entry by its `broker_time` field.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from shared import codec
from shared.codec import parse_iso
from shared.feeds import id_key

parse_id = id_key  # the stream-id parser, under the name the trimmer reads it by


def format_id(parts: tuple[int, int]) -> str:
    return f"{parts[0]}-{parts[1]}"


def next_id(stream_id: str) -> str:
    ms, n = parse_id(stream_id)
    return format_id((ms, n + 1))


def min_id(*ids: str) -> str:
    return format_id(min(parse_id(i) for i in ids))


def broker_time(fields: Mapping[Any, Any] | None) -> float | None:
    """An entry's `broker_time` as Unix seconds; None if it has none or it is unreadable."""
    if not fields:
        return None
    raw = fields.get(b"broker_time", fields.get("broker_time"))
    if raw is None:
        return None
    try:
        when = parse_iso(codec.text(raw))
    except ValueError:
        return None
    return when.timestamp() if when.tzinfo is not None else None


@dataclass(frozen=True, slots=True)
class Progress:
    """One stream as seen by one consumer group, read in one MULTI."""

    length: int
    first_id: str | None
    last_id: str | None
    group_exists: bool
    last_delivered: str = "0-0"
    pending: int = 0
    oldest_pending: str | None = None
    undelivered: int | None = None  # XINFO GROUPS `lag`; None when Redis cannot tell
    oldest_undelivered: str | None = None
    oldest_unarchived_time: float | None = None  # its broker_time, Unix seconds

    @property
    def archived_below(self) -> str:
        """Every entry with a smaller id is archived (acked by the group)."""
        if not self.group_exists:
            return "0-0"
        floor = next_id(self.last_delivered)
        return min_id(floor, self.oldest_pending) if self.oldest_pending else floor

    @property
    def lag_entries(self) -> int:
        """Entries not yet archived: pending plus not yet delivered."""
        if not self.group_exists:
            return self.length
        return self.pending + (self.undelivered if self.undelivered is not None else 0)

    @property
    def oldest_unarchived(self) -> str | None:
        if not self.group_exists:
            return self.first_id
        candidates = [i for i in (self.oldest_pending, self.oldest_undelivered) if i]
        return min_id(*candidates) if candidates else None

    def lag_seconds(self, now: float | None = None) -> float:
        """Age of the oldest unarchived entry by its broker_time (0 if none, or if its
        broker_time cannot be read)."""
        if self.oldest_unarchived is None or self.oldest_unarchived_time is None:
            return 0.0
        now = time.time() if now is None else now
        return max(0.0, now - self.oldest_unarchived_time)


async def read_progress(redis: Redis, stream: str, group: str) -> Progress:
    async with redis.pipeline(transaction=True) as pipe:
        pipe.xlen(stream)
        pipe.xrange(stream, "-", "+", count=1)
        pipe.xrevrange(stream, "+", "-", count=1)
        pipe.xinfo_groups(stream)
        pipe.xpending(stream, group)
        length, first, last, groups, pending = await pipe.execute(raise_on_error=False)
    for reply in (length, first, last):
        if isinstance(reply, Exception):
            raise reply
    base: dict[str, Any] = {
        "length": int(length),
        "first_id": codec.text(first[0][0]) if first else None,
        "last_id": codec.text(last[0][0]) if last else None,
    }
    info = None
    if not isinstance(groups, Exception):
        info = next((g for g in groups if codec.text(g["name"]) == group), None)
    if info is None or isinstance(pending, redis_errors.ResponseError):
        return Progress(
            group_exists=False, oldest_unarchived_time=broker_time(first[0][1]) if first else None, **base
        )
    if isinstance(pending, Exception):
        raise pending
    last_delivered = codec.text(info["last-delivered-id"])
    lag = info.get("lag")
    undelivered = int(lag) if lag is not None else None
    oldest_undelivered = None
    undelivered_time = None
    if undelivered is None or undelivered > 0:
        after = await redis.xrange(stream, f"({last_delivered}", "+", count=1)
        oldest_undelivered = codec.text(after[0][0]) if after else None
        undelivered_time = broker_time(after[0][1]) if after else None
        if undelivered is None and not after:
            undelivered = 0
    oldest_pending = codec.text(pending["min"]) if pending["pending"] and pending["min"] is not None else None
    oldest_time = undelivered_time
    if oldest_pending is not None and (
        oldest_undelivered is None or parse_id(oldest_pending) < parse_id(oldest_undelivered)
    ):
        entry = await redis.xrange(stream, oldest_pending, "+", count=1)
        oldest_time = broker_time(entry[0][1]) if entry else None
    return Progress(
        group_exists=True,
        last_delivered=last_delivered,
        pending=int(pending["pending"]),
        oldest_pending=oldest_pending,
        undelivered=undelivered,
        oldest_undelivered=oldest_undelivered,
        oldest_unarchived_time=oldest_time,
        **base,
    )
