"""The archiver process: connect, migrate, then `workers` readers per feed stream and the
trimmer, until the stop event is set. (The ingestor's separate dead-letter stream of
contract v1 is retired: malformed payloads are entries of their feed's stream.)"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import fields

from redis.asyncio import Redis

from services.archiver.consumer import (
    REDIS_ERRORS,
    Counts,
    FeedArchiver,
    StreamArchiver,
    raise_if_cancelled,
    raw_stream_replies,
)
from services.archiver.settings import ArchiverSettings
from services.archiver.store import TRANSIENT_ERRORS, Store
from services.archiver.trim import Trimmer
from shared.connections import redis_client
from shared.feeds import FEED_NAMES
from shared.lifecycle import Backoff

log = logging.getLogger(__name__)


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


class Archiver:
    """Everything one archiver runs. Subclass and replace `feed_class` to vary how a
    feed stream is archived (the crash tests do)."""

    feed_class: type[StreamArchiver] = FeedArchiver

    def __init__(self, settings: ArchiverSettings, *, store: Store | None = None) -> None:
        self.settings = settings
        self.redis: Redis = raw_stream_replies(redis_client(settings.redis_url))
        self.store = store or Store(
            settings.database_url, settings.db_schema, pool_size=2 * settings.workers + 2
        )
        reading = {name: asyncio.Lock() for name in FEED_NAMES}  # a stream's readers take turns
        self.readers: list[StreamArchiver] = [
            self.feed_class(
                name, settings, self.redis, self.store, primary=worker == 0, reading=reading[name]
            )
            for name in FEED_NAMES
            for worker in range(settings.workers)
        ]
        self.trimmer = Trimmer(settings, self.redis, list(FEED_NAMES))
        self.ready = asyncio.Event()  # set once connected and migrated

    def counts(self, name: str) -> Counts:
        """Rows, duplicates, dead letters and batches of one stream, over its readers."""
        total = Counts()
        for reader in self.readers:
            if reader.name == name:
                for f in fields(Counts):
                    setattr(total, f.name, getattr(total, f.name) + getattr(reader.counts, f.name))
        return total

    async def redis_ok(self) -> bool:
        return bool(await self.redis.ping())

    async def postgres_ok(self) -> bool:
        return self.ready.is_set() and await self.store.ping()

    async def run(self, stop: asyncio.Event) -> None:
        """Archive until `stop` is set. If a reader fails, the others are stopped the
        same way (they finish their batch) and the failure is raised as an
        ExceptionGroup."""
        try:
            if not await self._open(stop):
                return
            self.ready.set()
            await self._run_loops(stop)
        finally:
            await self.store.close()
            await self.redis.aclose()

    async def _run_loops(self, stop: asyncio.Event) -> None:
        # Not a TaskGroup: a failure stops the siblings with an event, not by cancelling
        # them, so no batch is cut mid-way (and a cancellation swallowed in a library
        # cannot leave a sibling running forever).
        halt = asyncio.Event()
        relay = asyncio.create_task(_relay(stop, halt))
        loops = [
            asyncio.create_task(reader.run(halt), name=f"archive-{reader.name}-{i}")
            for i, reader in enumerate(self.readers)
        ]
        loops.append(asyncio.create_task(self.trimmer.run(halt), name="trim"))
        try:
            await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            halt.set()
            await asyncio.wait(loops)
        except asyncio.CancelledError:
            for task in loops:
                task.cancel()
            raise
        finally:
            relay.cancel()
        errors = [e for e in (t.exception() for t in loops if not t.cancelled()) if e is not None]
        if any(not isinstance(e, Exception) for e in errors):
            raise next(e for e in errors if not isinstance(e, Exception))
        if errors:
            raise ExceptionGroup("archiver failed", [e for e in errors if isinstance(e, Exception)])

    async def _open(self, stop: asyncio.Event) -> bool:
        """Connect to Postgres and migrate, retrying while it is unreachable; False if
        stopped first."""
        backoff = Backoff(cap=5.0)
        while not stop.is_set():
            raise_if_cancelled()
            try:
                await self.store.open()
                await self.redis.ping()
                return True
            except (*TRANSIENT_ERRORS, *REDIS_ERRORS) as exc:
                log.warning("waiting for postgres and redis", extra={"error": f"{type(exc).__name__}: {exc}"})
                await self.store.close()
                await backoff.wait(stop)
        return False
