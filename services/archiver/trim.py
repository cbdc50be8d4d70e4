"""Bounded Redis memory: trim each feed stream of entries that are archived AND outside
the hot window.

Every `trim_interval` (and at start), per stream: read the group's progress, publish
the lag metrics, and XTRIM MINID to the smaller of

- the archived floor (below the oldest pending entry and at or below the group's
  last-delivered id: acked after their commit), and
- the retention floor: entries whose `broker_time` is older than `retention`, or, with
  a max length, beyond the newest `maxlen` entries (whichever trims more).

So an unarchived entry is never trimmed, whatever the settings.

Entry ids are `<seq>-0` (contract v2), so age is read from the entries themselves:
a binary search by seq over `XRANGE <seq>-0 + COUNT 1` for the first archived entry
whose broker_time is within the retention (about log2(archived entries) reads, 20 for a
million). broker_time grows with seq (JetStream stamps messages as it stores them); an
entry without a readable broker_time counts as young (kept), and the max length still
bounds the stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from services.archiver import metrics
from services.archiver.consumer import raise_if_cancelled
from services.archiver.progress import Progress, broker_time, format_id, min_id, parse_id, read_progress
from services.archiver.settings import ArchiverSettings
from shared.keys import Keys
from shared.lifecycle import wait_or_stop

log = logging.getLogger(__name__)

_SCAN_CHUNK = 10_000


class Trimmer:
    def __init__(self, settings: ArchiverSettings, redis: Redis, names: list[str]) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = Keys(settings.key_prefix)
        self.names = names
        self.trimmed = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            raise_if_cancelled()
            for name in self.names:
                try:
                    await self.trim(name)
                except (redis_errors.RedisError, OSError) as exc:
                    log.warning("could not trim stream", extra={"feed": name, "error": str(exc)})
            if await wait_or_stop(stop, self.settings.trim_interval):
                break
        log.info("trimmer stopped", extra={"trimmed": self.trimmed})

    async def trim(self, name: str, now: float | None = None) -> int:
        """Measure the lag and trim one stream once; returns the entries removed."""
        stream = self.keys.stream(name)
        progress = await read_progress(self.redis, stream, self.settings.archive_group)
        metrics.LAG_ENTRIES.labels(name).set(progress.lag_entries)
        metrics.LAG_SECONDS.labels(name).set(progress.lag_seconds(now))
        if not progress.group_exists or progress.first_id is None:
            return 0
        floor = min_id(progress.archived_below, await self._retention_floor(stream, progress, now))
        if parse_id(floor) <= parse_id(progress.first_id):
            return 0
        removed = int(await self.redis.xtrim(stream, minid=floor, approximate=False))
        if removed:
            self.trimmed += removed
            metrics.TRIMMED.labels(name).inc(removed)
            log.info("trimmed archived entries", extra={"feed": name, "removed": removed, "below": floor})
        return removed

    async def _retention_floor(self, stream: str, progress: Progress, now: float | None) -> str:
        """The id below which entries are too old (or beyond the max length) to keep;
        looked for only among the archived entries (nothing above them is trimmed)."""
        now = time.time() if now is None else now
        floor = await self._age_floor(stream, progress, now - self.settings.retention)
        maxlen = self.settings.maxlen
        if maxlen and progress.length > maxlen:
            floor = max(floor, await self._length_floor(stream, progress, maxlen), key=parse_id)
        return floor

    async def _age_floor(self, stream: str, progress: Progress, cutoff: float) -> str:
        """The first archived entry's id whose broker_time is at or after `cutoff` (or
        the archived floor if every archived entry is older)."""
        assert progress.first_id is not None
        below = parse_id(progress.archived_below)
        lo, hi = parse_id(progress.first_id)[0], below[0] + (1 if below[1] else 0)
        # Invariant: every entry below seq `lo` is old; the answer is in [lo, hi].
        while lo < hi:
            mid = (lo + hi) // 2
            entry = await self._at_or_after(stream, mid)
            if entry is None or parse_id(entry[0]) >= parse_id(progress.archived_below):
                hi = mid
                continue
            when = broker_time(entry[1])
            if when is not None and when < cutoff:
                lo = parse_id(entry[0])[0] + 1
            else:
                hi = mid
        return format_id((lo, 0))

    async def _at_or_after(self, stream: str, seq: int) -> tuple[str, Any] | None:
        reply: Any = await self.redis.xrange(stream, format_id((seq, 0)), "+", count=1)
        if not reply:
            return None
        entry_id, fields = reply[0]
        return (entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)), fields

    async def _length_floor(self, stream: str, progress: Progress, maxlen: int) -> str:
        """The id of the first entry to keep so that at most `maxlen` remain."""
        assert progress.first_id is not None and progress.last_id is not None
        first, last = parse_id(progress.first_id), parse_id(progress.last_id)
        excess = progress.length - maxlen
        if first[1] == last[1] == 0 and last[0] - first[0] + 1 == progress.length:
            return format_id((first[0] + excess, 0))  # contiguous seqs (contract v2)
        # Otherwise skip `excess` entries from the start, never further than the archived
        # floor (a bounded read).
        start, limit = "-", progress.archived_below
        while excess > 0:
            step = min(excess, _SCAN_CHUNK)
            batch: Any = await self.redis.xrange(stream, start, "+", count=step + 1)
            if len(batch) <= step:
                return "0-0"  # the stream shrank meanwhile
            keep = batch[step][0]
            keep_id = keep.decode() if isinstance(keep, bytes) else str(keep)
            excess -= step
            if excess == 0 or parse_id(keep_id) >= parse_id(limit):
                return keep_id if excess == 0 else limit
            start = keep_id
        return "0-0"
