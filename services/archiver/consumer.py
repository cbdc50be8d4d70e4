"""Redis stream -> catalogue: consumer-group readers per feed stream.

Per feed stream the loop is:

1. at start, drain this consumer's own pending entries (XREADGROUP from id 0);
2. every `claim_idle / 2`, XAUTOCLAIM entries pending longer than `claim_idle` (left
   by a dead archiver, or entries of ours whose storing failed) and store them;
3. otherwise XREADGROUP `>` with BLOCK and COUNT; if that brings less than a batch
   (the stream is caught up), wait `linger`, then take what came meanwhile (XREADGROUP
   `>` without BLOCK), so that a trickle is stored a few entries per commit rather than
   one. The linger is a bounded delay, not a poll: one timer and one read per batch.

Steps 1 and 2 are the stream's primary reader's; `workers` readers per feed stream do
step 3 in turn (one at a time holds the feed's read lock, through its linger) and store
side by side, so one batch is read and converted while another is stored, and while
the feed is quiet only one of them waits in XREADGROUP. For each batch: convert the
entries to rows, store them in ONE transaction, commit, and only THEN XACK. A crash
anywhere before the XACK leaves the entries pending, so they are delivered again; the
insert skips rows already there (ON CONFLICT on the message id or the position (epoch,
seq)), so a redelivery never makes a second row. An entry the ingestor marked
malformed (`error` field) becomes a `dead_letter` row in the same transaction as the
batch's feed rows.

The stream (and so the group) can vanish: Redis restarted empty, a failover, eviction,
or the ingestor replacing it for a new epoch. A read then fails with NOGROUP (or
UNBLOCKED for a blocked read); the reader creates the group again from id 0 (MKSTREAM)
and carries on: entries the ingestor appends again under the same ids are stored once
(the rows are there: duplicates), the others are new rows.

An entry that cannot be converted or stored (a poison entry, isolated by retrying the
batch row by row) stays pending and is retried via XAUTOCLAIM; once it has been
delivered `max_deliveries` times it goes to the `dead_letter` table with its error and
raw fields, and is acked. Postgres or Redis unreachable: back off and retry the same
batch; nothing is acked that is not committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from services.archiver import metrics
from services.archiver.rows import BadEntry, DeadLetterRow, Row, feed_row, malformed_row, poison_row
from services.archiver.settings import ArchiverSettings
from services.archiver.store import STORE_ERRORS, TRANSIENT_ERRORS, Store, is_data_error
from shared import codec
from shared.feeds import FEEDS, Feed
from shared.keys import Keys
from shared.lifecycle import Backoff, wait_or_stop

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError)
# Replies meaning the stream or its group is gone: a blocked XREADGROUP whose key was
# deleted gets UNBLOCKED, any later command NOGROUP.
_GROUP_GONE = ("NOGROUP", "UNBLOCKED")


@dataclass(slots=True)
class Entry:
    id: str
    fields: dict[str, str]


@dataclass(slots=True)
class Counts:
    rows: int = 0  # new rows in the feed's table
    malformed: int = 0  # new dead_letter rows for the ingestor's malformed entries
    duplicates: int = 0  # entries already stored (redeliveries)
    dead_letters: int = 0  # poison entries the archiver gave up on
    batches: int = 0
    groups_created: int = 0  # consumer group (re)created by this reader


def raise_if_cancelled() -> None:
    """Re-raise a cancellation that something below swallowed (seen with blocking
    redis-py reads on Python 3.11: a cancelled reader kept looping, so the TaskGroup that
    cancelled it never finished)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def raw_stream_replies(client: Redis) -> Redis:
    """Have `client` return XREADGROUP and XAUTOCLAIM replies as Redis sent them (each
    entry an id and a flat field/value list): `_entries` decodes them in one pass, which
    is most of the archiver's Redis-side CPU otherwise."""
    for command in ("XREADGROUP", "XAUTOCLAIM"):
        client.set_response_callback(command, _as_sent)
    return client


def _as_sent(response: Any, **options: Any) -> Any:
    return response


def _entries(raw: Sequence[Any]) -> list[Entry]:
    """Entries as redis-py returns them: (id, {field: value}) with the default reply
    parsing, or [id, [field, value, ...]] with `raw_stream_replies`. A deleted entry
    still pending has no fields."""
    out = []
    for entry_id, fields in raw:
        if not fields:
            decoded: dict[str, str] = {}
        elif isinstance(fields, dict):
            try:
                decoded = {k.decode(): v.decode() for k, v in fields.items()}
            except UnicodeDecodeError:
                decoded = {_text_lossless(k): _text_lossless(v) for k, v in fields.items()}
        else:
            decoded = _decode_flat(fields)
        out.append(Entry(codec.text(entry_id), decoded))
    return out


def _decode_flat(flat: list[bytes]) -> dict[str, str]:
    try:
        # One decode for the whole entry; NUL cannot be in the text unless a value holds one.
        parts = b"\x00".join(flat).decode().split("\x00")
    except UnicodeDecodeError:
        parts = []
    if len(parts) != len(flat):
        # Not UTF-8, or a NUL inside a value: field by field, kept (escaped) so that the
        # entry can be dead-lettered with what it held.
        parts = [_text_lossless(v) for v in flat]
    return dict(zip(parts[::2], parts[1::2], strict=True))


def _stream_reply(reply: Any) -> Any:
    """The entries of a one-stream XREADGROUP reply (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return next(iter(reply.values()))
    return reply[0][1]


def _text_lossless(value: bytes | str) -> str:
    if isinstance(value, str):
        return value
    try:
        return value.decode()
    except UnicodeDecodeError:
        return "\x00" + value.decode("utf-8", "backslashreplace")  # NUL marks it as not convertible


class StreamArchiver:
    """Archives one stream through the consumer group. Subclasses say how an entry
    becomes a row and where rows go."""

    name: str  # the feed

    def __init__(
        self,
        name: str,
        settings: ArchiverSettings,
        redis: Redis,
        store: Store,
        *,
        primary: bool = True,
        reading: asyncio.Lock | None = None,
    ) -> None:
        self.name = name
        self.primary = primary  # the one reader of a stream that also recovers pending entries
        # Shared by the stream's readers: one at a time reads new entries (and lingers).
        self._reading = reading if reading is not None else asyncio.Lock()
        self.settings = settings
        self.redis = redis
        self.store = store
        self.keys = Keys(settings.key_prefix)
        self.stream = self.keys.stream(name)
        self.group = settings.archive_group
        self.consumer = settings.consumer_name
        self.counts = Counts()
        self._backoff = Backoff()
        # Draining our own pending entries from here (the primary reader, at start).
        self._own_cursor: str | None = "0" if primary else None
        self._claim_cursor = "0-0"
        self._next_claim = 0.0 if primary else float("inf")
        self._group_ready = False
        self._rows = metrics.ROWS.labels(name)
        self._malformed = metrics.MALFORMED.labels(name)
        self._duplicates = metrics.DUPLICATES.labels(name)

    # -- the loop ---------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info(
            "archiving stream", extra={"feed": self.name, "stream": self.stream, "consumer": self.consumer}
        )
        while not stop.is_set():
            raise_if_cancelled()
            try:
                if not self._group_ready:
                    await self.ensure_group()
                entries = await self.next_batch(stop)
                if entries:
                    await self.process(entries, stop)
                self._backoff.reset()
            except REDIS_ERRORS as exc:
                metrics.ERRORS.labels("redis").inc()
                log.warning("redis unavailable, retrying", extra={"feed": self.name, "error": str(exc)})
                if self.primary:  # entries read but not acked are ours: read them again first
                    self._own_cursor = "0"
                await self._backoff.wait(stop)
            except redis_errors.ResponseError as exc:
                if self.primary:
                    self._own_cursor = "0"
                if str(exc).startswith(_GROUP_GONE):
                    # The stream or the group vanished (Redis restarted empty, a failover,
                    # eviction, a new epoch): create it again, from the stream's start.
                    log.warning(
                        "consumer group missing, creating it again",
                        extra={"feed": self.name, "error": str(exc)},
                    )
                    self._group_ready = False
                    self._claim_cursor = "0-0"
                    continue
                # OOM, READONLY (a failover), MISCONF...: the server refuses for now.
                metrics.ERRORS.labels("redis").inc()
                log.error("redis refused a command, retrying", extra={"feed": self.name, "error": str(exc)})
                await self._backoff.wait(stop)
        log.info(
            "stopped archiving stream",
            extra={
                "feed": self.name,
                "rows": self.counts.rows,
                "duplicates": self.counts.duplicates,
                "dead_letters": self.counts.dead_letters,
                "batches": self.counts.batches,
            },
        )

    async def ensure_group(self) -> None:
        """Create the group from the stream's first entry (idempotent, MKSTREAM)."""
        try:
            await self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            self.counts.groups_created += 1
            log.info("created consumer group", extra={"feed": self.name, "group": self.group})
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    async def next_batch(self, stop: asyncio.Event) -> list[Entry]:
        """Own pending entries first, then idle entries to claim when due, then new ones."""
        count = self.settings.batch
        if self._own_cursor is not None:
            reply: Any = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: self._own_cursor}, count=count
            )
            entries = _entries(_stream_reply(reply))
            if not entries:
                self._own_cursor = None
                return []
            self._own_cursor = entries[-1].id
            return entries
        now = time.monotonic()
        if now >= self._next_claim:
            cursor, raw, deleted = await self._autoclaim(count)
            if deleted:
                log.error(
                    "pending entries were deleted from the stream before being archived",
                    extra={"feed": self.name, "ids": [codec.text(d) for d in deleted]},
                )
            self._claim_cursor = cursor
            if cursor == "0-0":  # a full pass over the pending entries is done
                self._next_claim = now + self.settings.claim_idle / 2
            if raw:
                return _entries(raw)
            if cursor != "0-0":
                return []
        return await self._read_new(count, stop)

    async def _read_new(self, count: int, stop: asyncio.Event) -> list[Entry]:
        """New entries, up to `count`: a blocking read, then, if it brought less than
        `count`, what else arrives within the linger. Under the feed's read lock, so that
        the stream's other readers do not take the entries this one lingers for."""
        async with self._reading:
            if stop.is_set():  # stopped while another reader held the lock
                return []
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count, block=self.settings.block_ms
            )
            entries = _entries(_stream_reply(reply))
            if not entries or len(entries) >= count or not self.settings.linger_s:
                return entries
            if await self.linger(stop):
                return entries  # stopping: store what was read, wait for nothing more
            reply = await self.redis.xreadgroup(
                self.group, self.consumer, {self.stream: ">"}, count=count - len(entries)
            )
            return entries + _entries(_stream_reply(reply))

    async def linger(self, stop: asyncio.Event) -> bool:
        """Wait `linger` for more entries (a seam for tests); True if stopped meanwhile."""
        return await wait_or_stop(stop, self.settings.linger_s)

    async def _autoclaim(self, count: int) -> tuple[str, list[tuple[Any, Any]], list[Any]]:
        reply: Any = await self.redis.xautoclaim(
            self.stream,
            self.group,
            self.consumer,
            int(self.settings.claim_idle * 1000),
            start_id=self._claim_cursor,
            count=count,
        )
        return codec.text(reply[0]), reply[1], reply[2] if len(reply) > 2 else []

    # -- one batch --------------------------------------------------------------------

    async def process(self, entries: list[Entry], stop: asyncio.Event) -> None:
        """Store a batch, then acknowledge it; poison entries are set aside."""
        started = time.perf_counter()
        rows, stored, failed = await self.convert(entries)
        while True:
            try:
                inserted, malformed, row_failures = await self._store_isolating(rows, stored)
                break
            except TRANSIENT_ERRORS as exc:
                if is_data_error(exc):
                    raise
                metrics.ERRORS.labels("postgres").inc()
                log.warning(
                    "postgres unavailable, retrying the batch",
                    extra={"feed": self.name, "entries": len(entries), "error": str(exc)},
                )
                if await self._backoff.wait(stop):
                    log.info("stopping with a batch not stored; it stays pending", extra={"feed": self.name})
                    return
                await self._reopen_if_schema_missing(exc)
        failed += row_failures
        failed_ids = {e.id for e, _ in row_failures}
        done = [e.id for e in stored if e.id not in failed_ids]
        await self.after_commit(done)
        if done:
            await self.redis.xack(self.stream, self.group, *done)
        self._counted(len(done), inserted, malformed)
        if failed:
            await self.settle_poison(failed, stop)
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        self.counts.batches += 1

    async def after_commit(self, ids: list[str]) -> None:
        """Called between the commit and the XACK (a seam for crash tests)."""

    def _counted(self, stored: int, inserted: int, malformed: int) -> None:
        self.counts.rows += inserted
        self.counts.malformed += malformed
        self.counts.duplicates += stored - inserted - malformed
        self._rows.inc(inserted)
        self._malformed.inc(malformed)
        self._duplicates.inc(stored - inserted - malformed)

    async def _store_isolating(
        self, rows: list[Row], entries: list[Entry]
    ) -> tuple[int, int, list[tuple[Entry, str]]]:
        """Store all rows at once; if a row's data is refused, store them one by one to
        find which. Returns (feed rows inserted, dead-letter rows inserted, [(entry,
        error)] refused)."""
        try:
            return (*await self.store_rows(rows), [])
        except STORE_ERRORS as exc:
            if not is_data_error(exc):
                raise
            log.warning("batch refused, storing it row by row", extra={"feed": self.name, "error": str(exc)})
        inserted = malformed = 0
        failures: list[tuple[Entry, str]] = []
        for row, entry in zip(rows, entries, strict=True):
            try:
                new_rows, new_dead = await self.store_rows([row])
            except STORE_ERRORS as exc:
                if not is_data_error(exc):
                    raise
                failures.append((entry, f"{type(exc).__name__}: {exc}"))
            else:
                inserted += new_rows
                malformed += new_dead
        return inserted, malformed, failures

    async def _reopen_if_schema_missing(self, exc: BaseException) -> None:
        import asyncpg

        if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
            try:
                await self.store.open()
            except TRANSIENT_ERRORS as again:
                log.warning("could not migrate the catalogue", extra={"error": str(again)})

    # -- poison entries ---------------------------------------------------------------

    async def settle_poison(self, failed: list[tuple[Entry, str]], stop: asyncio.Event) -> None:
        """Dead-letter the failed entries delivered `max_deliveries` times; leave the
        others pending, to be claimed and retried once idle."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for entry, _ in failed:
                pipe.xpending_range(self.stream, self.group, entry.id, entry.id, 1)
            replies = await pipe.execute()
        give_up: list[tuple[Entry, str]] = []
        for (entry, error), reply in zip(failed, replies, strict=True):
            deliveries = int(reply[0]["times_delivered"]) if reply else self.settings.max_deliveries
            if deliveries >= self.settings.max_deliveries:
                give_up.append((entry, error))
            else:
                log.warning(
                    "entry cannot be stored, will retry",
                    extra={
                        "feed": self.name,
                        "stream_id": entry.id,
                        "deliveries": deliveries,
                        "error": error,
                    },
                )
        if not give_up:
            return
        rows = [poison_row(self.name, e.id, e.fields, error) for e, error in give_up]
        while True:
            try:
                await self.store.insert_dead_letters(rows)
                break
            except TRANSIENT_ERRORS as exc:
                metrics.ERRORS.labels("postgres").inc()
                log.warning(
                    "could not store dead letters, retrying", extra={"feed": self.name, "error": str(exc)}
                )
                if await self._backoff.wait(stop):
                    return
        await self.redis.xack(self.stream, self.group, *(e.id for e, _ in give_up))
        for entry, error in give_up:
            log.error(
                "entry dead-lettered after repeated failures",
                extra={
                    "feed": self.name,
                    "stream_id": entry.id,
                    "message_id": entry.fields.get("message_id"),
                    "error": error,
                },
            )
        self.counts.dead_letters += len(give_up)
        metrics.DEAD_LETTERS.inc(len(give_up))

    # -- what subclasses vary ---------------------------------------------------------

    async def convert(self, entries: list[Entry]) -> tuple[list[Row], list[Entry], list[tuple[Entry, str]]]:
        """(rows, the entries they came from, [(entry, error)] that cannot convert)."""
        to_row = await self.row_maker()
        rows: list[Row] = []
        ok: list[Entry] = []
        failed: list[tuple[Entry, str]] = []
        for entry in entries:
            try:
                if not entry.fields:
                    raise BadEntry("entry was deleted from the stream before it was archived")
                rows.append(to_row(entry))
                ok.append(entry)
            except BadEntry as exc:
                failed.append((entry, str(exc)))
        return rows, ok, failed

    async def row_maker(self) -> Callable[[Entry], Row]:
        """How this batch's entries become rows (raising BadEntry for one that cannot)."""
        raise NotImplementedError

    async def store_rows(self, rows: list[Row]) -> tuple[int, int]:
        """Store rows; returns how many were new: (feed rows, dead-letter rows)."""
        raise NotImplementedError


class FeedArchiver(StreamArchiver):
    """A feed's stream -> its table, and its malformed entries -> dead_letter."""

    @cached_property
    def feed(self) -> Feed:
        return FEEDS[self.name]

    @cached_property
    def subject(self) -> str:
        return self.settings.subject(self.name)

    async def row_maker(self) -> Callable[[Entry], Row]:
        return self._row

    def _row(self, entry: Entry) -> Row:
        if codec.is_malformed(entry.fields):
            return malformed_row(self.name, self.subject, entry.id, entry.fields)
        return feed_row(self.feed, entry.id, entry.fields)

    async def store_rows(self, rows: list[Row]) -> tuple[int, int]:
        feed_rows = [r for r in rows if not isinstance(r, DeadLetterRow)]
        dead = [r for r in rows if isinstance(r, DeadLetterRow)] if len(feed_rows) < len(rows) else []
        return await self.store.insert_entries(self.name, feed_rows, dead)
