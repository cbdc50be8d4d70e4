"""History: one interface for "the records after seq c of epoch e, up to seq u".

Positions come from JetStream (seq = the feed's JetStream stream sequence, epoch = that
stream's creation ms), and two stores hold a feed's records by seq:

- Redis, the hot window: the feed's stream, entry id `<seq>-0`, contiguous from its first
  entry to its top within one epoch (a Redis loss is refilled with the same ids);
- PostgreSQL, everything archived: the feed's table by (epoch, seq), plus the feed's
  `dead_letter` rows of that epoch (payloads that were not valid messages; they keep
  their seq and are sent as `event: malformed`).

The one handover rule, by seq: Redis serves when it holds c+1 (`XRANGE key (c-0 u-0`
starts at c+1, in the same epoch), else PostgreSQL when it holds c+1. Redis is read first:
the archiver trims only what it committed, so what Redis no longer holds PostgreSQL
already has. When neither holds c+1:

- a gap (`Page.gap_to`), only when PostgreSQL holds later seqs of the epoch and Redis's
  first entry is above c+1: c+1 is gone from both;
- otherwise wait (`Page` empty): the archiver is behind, or the ingestor is refilling a
  Redis that lost data; c+1 will come. The catalogue being unreadable is a wait too
  while Redis is being refilled up to c+1; when only the catalogue can hold c+1 it
  raises ArchiveUnavailable (the stream ends, the client resumes later by its id).

`Archive` is the PostgreSQL side, read-only; it also finds where a subscription starts
(the first seq of an epoch, the first seq at a broker time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis

from services.sse_gateway import frames
from shared import codec
from shared.codec import parse_iso
from shared.feeds import seq_of_entry_id
from shared.keys import Keys

log = logging.getLogger(__name__)

_MAX_SEQ = 2**63 - 1
# A catalogue not (fully) there yet: the archiver has not created the table or column.
_NOT_THERE = (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.InvalidSchemaNameError)


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    data: bytes
    fields: Mapping[str, Any]
    valid: bool = True  # False: `data` describes a malformed entry (sent as `event: malformed`)


@dataclass(frozen=True, slots=True)
class Page:
    """What `History.after` found: records from c+1 on (contiguous), or a gap to `gap_to`
    (the first seq held after c), or neither: wait. `redis_first` is Redis's first seq as
    seen (None: Redis holds nothing of the epoch), a hint for the next call."""

    records: Sequence[Record] = ()
    gap_to: int | None = None
    redis_first: int | None = None


class ArchiveUnavailable(RuntimeError):
    """The Postgres catalogue cannot be read right now."""


def entry_seq(entry_id: Any) -> int | None:
    """The seq of a stream entry: its id `<seq>-0`; None for an id outside the contract
    (the entry cannot be placed)."""
    try:
        return seq_of_entry_id(codec.text(entry_id))
    except ValueError:
        return None


def checked(fields: dict[str, str], seq: int) -> dict[str, str]:
    """`fields`, or, for an entry whose `seq` field is not its id's (outside the contract:
    written by hand?), fields that make it a malformed entry at that seq."""
    if fields.get("seq") == str(seq):
        return fields
    error = f"stream entry {seq}-0 has seq field {fields.get('seq')!r}"
    return {**fields, "seq": str(seq), "error": fields.get("error", error)}


def entry_epoch(fields: Mapping[str, str]) -> str | None:
    """The epoch an entry names in its message id `<epoch>.<seq>` (None without a valid
    one: an entry written by hand is not taken for another epoch)."""
    epoch, dot, _ = fields.get("message_id", "").rpartition(".")
    return epoch if dot and epoch.isascii() and epoch.isdigit() else None


def from_entry(feed: str, fields: dict[str, str], seq: int) -> Record:
    fields = checked(fields, seq)
    name, data = frames.entry_payload(feed, feed.encode(), fields)
    return Record(seq, data, fields, name != frames.MALFORMED)


def contiguous(records: Sequence[Record], after: int) -> list[Record]:
    """The leading run of `records` that goes on from seq `after` without a hole."""
    out: list[Record] = []
    expect = after + 1
    for record in records:
        if record.seq != expect:
            break
        out.append(record)
        expect += 1
    return out


class History:
    def __init__(self, redis: Redis, keys: Keys, archive: Archive) -> None:
        self.redis = redis
        self.keys = keys
        self.archive = archive

    async def after(
        self, feed: str, epoch: str, after: int, upto: int | None, limit: int, hint: int | None = None
    ) -> Page:
        """Records of `epoch` after seq `after` up to `upto` (None: no bound), at most
        `limit`, by the handover rule (see the module). `hint`: Redis's first seq as a
        previous call saw it; while c+1 is below it PostgreSQL is asked first."""
        want = after + 1
        if hint is not None and want < hint:
            with contextlib.suppress(ArchiveUnavailable):  # asked again below, after Redis
                rows = await self.archive.after(feed, epoch, after, upto, limit)
                if rows and rows[0].seq == want:
                    return Page(contiguous(rows, after), redis_first=hint)
        recs, first = await self._redis_after(feed, epoch, after, upto, limit)
        if recs and recs[0].seq == want:
            return Page(contiguous(recs, after), redis_first=first)
        try:
            rows = await self.archive.after(feed, epoch, after, upto, limit)
        except ArchiveUnavailable:
            if first is None or first <= want:
                return Page(redis_first=first)  # Redis is being refilled up to it: wait for Redis
            raise  # only the catalogue can hold it, and it cannot be read
        if rows and rows[0].seq == want:
            return Page(contiguous(rows, after), redis_first=first)
        if rows and first is not None and first > want:
            return Page(gap_to=min(rows[0].seq, first), redis_first=first)
        return Page(redis_first=first)

    async def archived_after(self, feed: str, epoch: str, after: int, limit: int) -> list[Record]:
        """The rest of an epoch that is no longer the feed's: PostgreSQL only."""
        return contiguous(await self.archive.after(feed, epoch, after, None, limit), after)

    async def _redis_after(
        self, feed: str, epoch: str, after: int, upto: int | None, limit: int
    ) -> tuple[list[Record], int | None]:
        """Redis's records of `epoch` after `after` (oldest first), and Redis's first seq
        in that epoch (None if it holds nothing of it)."""
        top = "+" if upto is None else f"{upto}-0"
        raw: Any = await self.redis.xrange(self.keys.stream(feed), min=f"({after}-0", max=top, count=limit)
        out: list[Record] = []
        for entry_id, raw_fields in raw:
            fields = {codec.text(k): codec.text(v) for k, v in raw_fields.items()}
            seq = entry_seq(entry_id)
            if seq is None:
                log.error(
                    "stream entry without a valid seq skipped",
                    extra={"feed": feed, "entry_id": codec.text(entry_id)},
                )
                continue
            named = entry_epoch(fields)
            if named is not None and named != epoch:
                break  # another epoch's stream: not ours to serve
            out.append(from_entry(feed, fields, seq))
        if out and out[0].seq == after + 1:
            return out, None
        if out:
            return out, out[0].seq
        return [], await self.first_seq(feed, epoch)

    async def first_seq(self, feed: str, epoch: str) -> int | None:
        """The seq of Redis's first entry if it is of `epoch`."""
        raw: Any = await self.redis.xrange(self.keys.stream(feed), min="-", max="+", count=1)
        if not raw:
            return None
        fields = {codec.text(k): codec.text(v) for k, v in raw[0][1].items()}
        if entry_epoch(fields) not in (None, epoch):
            return None
        return entry_seq(raw[0][0])

    async def top(self, feed: str) -> tuple[str, int] | None:
        """(epoch, seq) of the feed's newest entry in Redis: the meta hash, or the stream's
        last entry if the meta hash was lost; None if Redis holds nothing of the feed."""
        epoch, seq = await self.redis.hmget(self.keys.meta(feed), ["epoch", "seq"])
        if epoch and seq:
            return codec.text(epoch), int(codec.text(seq))
        raw: Any = await self.redis.xrevrange(self.keys.stream(feed), max="+", min="-", count=1)
        if not raw:
            return None
        fields = {codec.text(k): codec.text(v) for k, v in raw[0][1].items()}
        named, last = entry_epoch(fields), entry_seq(raw[0][0])
        return (named, last) if named is not None and last is not None else None

    async def earliest(self, feed: str, epoch: str) -> int | None:
        """The first seq PostgreSQL or Redis holds of `epoch` (Redis holding seq 1: the
        catalogue holds nothing older, and is not asked)."""
        first = await self.first_seq(feed, epoch)
        if first == 1:
            return first
        held = [s for s in (first, await self.archive.first(feed, epoch)) if s]
        return min(held) if held else None

    async def seq_at(self, feed: str, epoch: str, when: datetime) -> int | None:
        """The first seq of `epoch` whose broker time is at or after `when`, or None if
        none is (yet). Broker times grow with seq (JetStream stamps them in order)."""
        first = await self.first_seq(feed, epoch)
        if first is None:
            return await self.archive.seq_at(feed, epoch, when)
        if await self._broker_time(feed, first) >= when:
            older = await self.archive.seq_at(feed, epoch, when)
            return first if older is None else min(older, first)
        top = await self.top(feed)
        if top is None or top[0] != epoch:
            return None
        low, high = first, top[1]  # broker_time(low) < when; find the first seq at or after
        if await self._broker_time(feed, high) < when:
            return None
        while high - low > 1:
            mid = (low + high) // 2
            if await self._broker_time(feed, mid) >= when:
                high = mid
            else:
                low = mid
        return high

    async def _broker_time(self, feed: str, seq: int) -> datetime:
        """The broker time of entry `seq`, or of the next entry Redis still holds."""
        raw: Any = await self.redis.xrange(self.keys.stream(feed), min=f"{seq}-0", max="+", count=1)
        if not raw:
            return datetime.max.replace(tzinfo=UTC)  # trimmed meanwhile: past any time asked
        fields = {codec.text(k): codec.text(v) for k, v in raw[0][1].items()}
        return parse_iso(fields["broker_time"])


class Archive:
    """The Postgres catalogue, read-only. The pool opens on first need; while Postgres is
    down each call raises ArchiveUnavailable (live streaming does not need it)."""

    RETRY_AFTER = 5.0

    def __init__(self, dsn: str, schema: str, pool_size: int) -> None:
        self.dsn = dsn
        self.schema = schema
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()
        self._failed_at = 0.0

    async def pool(self) -> asyncpg.Pool:
        if self._pool is not None:
            return self._pool
        async with self._lock:
            if self._pool is None:
                if time.monotonic() - self._failed_at < self.RETRY_AFTER:
                    raise ArchiveUnavailable("the catalogue database was unreachable moments ago")
                try:
                    self._pool = await asyncpg.create_pool(
                        self.dsn, min_size=0, max_size=self.pool_size, command_timeout=30, timeout=5
                    )
                except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
                    self._failed_at = time.monotonic()
                    log.warning("catalogue database unreachable", extra={"error": str(exc)})
                    raise ArchiveUnavailable(f"the catalogue database is unreachable: {exc}") from None
        return self._pool

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    def _table(self, name: str) -> str:
        return f'"{self.schema}"."{name}"'

    async def _fetch(self, queries: Sequence[str], *args: Any) -> list[asyncpg.Record]:
        """The rows of the first of `queries` whose tables and columns exist: each one after
        the first leaves out the dead letters (a catalogue whose `dead_letter` table is not
        there yet, or lacks the epoch and seq columns)."""
        pool = await self.pool()
        for query in queries:
            try:
                rows: list[asyncpg.Record] = await pool.fetch(query, *args)
                return rows
            except _NOT_THERE:
                continue  # nothing archived there yet
            except (OSError, TimeoutError) as exc:
                raise ArchiveUnavailable(f"the catalogue database is unreachable: {exc}") from None
            except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise ArchiveUnavailable(f"reading the catalogue failed: {exc}") from None
        return []

    async def after(self, feed: str, epoch: str, after: int, upto: int | None, limit: int) -> list[Record]:
        """Rows of `epoch` with seq > `after` (and <= `upto`), by seq: the feed's rows, and
        its dead letters as malformed records."""
        where = "epoch = $1 AND seq > $2 AND seq <= $3"
        feed_rows = (
            f"(SELECT seq, message::text AS message, message_id, NULL::text AS error "
            f"FROM {self._table(feed)} WHERE {where} ORDER BY seq LIMIT $4)"
        )
        dead_rows = (
            f"(SELECT seq, NULL::text, message_id, error FROM {self._table('dead_letter')} "
            f"WHERE feed = $5 AND {where} ORDER BY seq LIMIT $4)"
        )
        rows = await self._fetch(
            [
                f"{feed_rows} UNION ALL {dead_rows} ORDER BY seq LIMIT $4",
                f"SELECT * FROM {feed_rows} AS f WHERE $5::text IS NOT NULL ORDER BY seq",
            ],
            epoch,
            after,
            _MAX_SEQ if upto is None else upto,
            limit,
            feed,
        )
        out: list[Record] = []
        for row in rows:
            seq = int(row["seq"])
            if out and out[-1].seq == seq:
                continue  # in both tables (outside the contract): sent once
            if row["message"] is None:
                data = frames.malformed_data(feed, seq, row["message_id"], row["error"])
                out.append(Record(seq, data, {}, valid=False))
            else:
                message = json.loads(row["message"])
                out.append(Record(seq, frames.dumps(message), message))
        return out

    async def first(self, feed: str, epoch: str) -> int | None:
        """The first seq of `epoch` in the catalogue (feed rows or dead letters)."""
        return await self._min_seq(feed, "epoch = $1", epoch)

    async def seq_at(self, feed: str, epoch: str, when: datetime) -> int | None:
        """The first seq of `epoch` whose broker time is at or after `when`."""
        return await self._min_seq(feed, "epoch = $1 AND broker_time >= $3", epoch, when)

    async def last(self, feed: str, epoch: str) -> int | None:
        """The last seq of `epoch` in the catalogue (feed rows or dead letters)."""
        return await self._min_seq(feed, "epoch = $1", epoch, agg="max")

    async def _min_seq(self, feed: str, where: str, epoch: str, *more: Any, agg: str = "min") -> int | None:
        feed_min = f"(SELECT {agg}(seq) AS seq FROM {self._table(feed)} WHERE {where})"
        dead_min = f"(SELECT {agg}(seq) FROM {self._table('dead_letter')} WHERE feed = $2 AND {where})"
        rows = await self._fetch(
            [
                f"SELECT {agg}(seq) AS seq FROM ({feed_min} UNION ALL {dead_min}) AS m",
                f"SELECT seq FROM {feed_min} AS m WHERE $2::text IS NOT NULL",
            ],
            epoch,
            feed,
            *more,
        )
        return int(rows[0]["seq"]) if rows and rows[0]["seq"] is not None else None
