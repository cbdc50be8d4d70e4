"""Bounded Redis memory: trim each stream of entries that are archived AND old.

Every `trim_interval` (and at start), per stream: read the group's progress, publish
the lag metrics, and XTRIM MINID to the smaller of

- the archived floor (below the oldest pending entry and at or below the group's
  last-delivered id: acked after their commit), and
- the retention floor: entries older than `retention`, or, with a max length, beyond
  the newest `maxlen` entries (whichever trims more).

So an unarchived entry is never trimmed, whatever the settings.
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
from services.archiver.progress import Progress, format_id, min_id, parse_id, read_progress
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
        progress = await read_progress(self.redis, stream, self.settings.group)
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
        """The id below which entries are too old (or beyond the max length) to keep."""
        now = time.time() if now is None else now
        floor = format_id((max(0, int((now - self.settings.retention) * 1000)), 0))
        maxlen = self.settings.maxlen
        if maxlen and progress.length > maxlen:
            # The id of the first entry to keep: skip `length - maxlen` entries from the
            # start, never further than the archived floor (a bounded read).
            excess = progress.length - maxlen
            start, limit = "-", progress.archived_below
            while excess > 0:
                batch: Any = await self.redis.xrange(stream, start, "+", count=min(excess, _SCAN_CHUNK) + 1)
                if len(batch) <= min(excess, _SCAN_CHUNK):
                    return floor  # the stream shrank meanwhile
                keep = batch[min(excess, _SCAN_CHUNK)][0]
                keep_id = keep.decode() if isinstance(keep, bytes) else str(keep)
                excess -= min(excess, _SCAN_CHUNK)
                if excess == 0 or parse_id(keep_id) >= parse_id(limit):
                    return (
                        max(floor, keep_id, key=parse_id) if excess == 0 else max(floor, limit, key=parse_id)
                    )
                start = keep_id
        return floor
