"""Reading behind the live position: Redis (XRANGE) and the Postgres catalogue.

Both give `Record`s: an entry's id, seq, the JSON of its `data:` and the fields the
filters look at. The catalogue is read per the contract: rows of a feed's table by
(epoch, seq), `message` being the same JSON as a live event's data.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from redis.asyncio import Redis

from services.sse_gateway import frames
from shared.keys import Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Record:
    entry_id: str
    seq: int
    data: bytes
    fields: Mapping[str, Any]
    valid: bool = True  # False: `data` describes a malformed entry (sent as `event: malformed`)


class ArchiveUnavailable(RuntimeError):
    """The Postgres catalogue cannot be read right now."""


async def redis_after(
    redis: Redis, keys: Keys, feed: str, after_id: str, upto_id: str, limit: int
) -> list[Record]:
    """Entries after `after_id` (exclusive) up to `upto_id` (inclusive), oldest first."""
    raw: Any = await redis.xrange(keys.stream(feed), min="(" + after_id, max=upto_id, count=limit)
    out = []
    for entry_id, fields in raw:
        if "seq" not in fields and b"seq" not in fields:  # outside the contract: cannot be placed
            log.error("stream entry without a seq skipped", extra={"feed": feed, "entry_id": _s(entry_id)})
            continue
        out.append(from_entry(feed, entry_id, fields))
    return out


def from_entry(feed: str, entry_id: Any, raw: Mapping[Any, Any]) -> Record:
    fields = {_s(k): _s(v) for k, v in raw.items()}
    name, data = frames.entry_payload(feed, feed.encode(), fields)
    return Record(_s(entry_id), int(fields["seq"]), data, fields, name != frames.MALFORMED)


async def redis_first(redis: Redis, keys: Keys, feed: str, min_id: str = "-") -> tuple[str, int] | None:
    """The (id, seq) of the first entry at or after `min_id`."""
    raw: Any = await redis.xrange(keys.stream(feed), min=min_id, max="+", count=1)
    if not raw:
        return None
    entry_id, fields = raw[0]
    return _s(entry_id), int(_s(fields.get("seq", fields.get(b"seq", "0"))))


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


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

    def _table(self, feed: str) -> str:
        return f'"{self.schema}"."{feed}"'

    async def _fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        pool = await self.pool()
        try:
            rows: list[asyncpg.Record] = await pool.fetch(query, *args)
            return rows
        except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError):
            return []  # nothing archived yet
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise ArchiveUnavailable(f"reading the catalogue failed: {exc}") from None

    async def after(self, feed: str, epoch: str, seq: int, limit: int, upto: int | None) -> list[Record]:
        """Rows of `epoch` with seq > `seq` (and <= `upto`), by seq."""
        bound = "" if upto is None else " AND seq <= $4"
        args: list[Any] = [epoch, seq, limit] + ([] if upto is None else [upto])
        rows = await self._fetch(
            f"SELECT seq, stream_id, message::text AS message FROM {self._table(feed)}"
            f" WHERE epoch = $1 AND seq > $2{bound} ORDER BY seq LIMIT $3",
            *args,
        )
        out = []
        for row in rows:
            message = json.loads(row["message"])
            out.append(Record(row["stream_id"], row["seq"], frames.dumps(message), message))
        return out

    async def first(self, feed: str, epoch: str, min_ms: int = 0) -> tuple[str, int] | None:
        """The (stream id, seq) of the first row of `epoch` whose entry id is at or after `min_ms`."""
        rows = await self._fetch(
            f"SELECT stream_id, seq FROM {self._table(feed)} WHERE epoch = $1 AND entry_ms >= $2"
            " ORDER BY entry_ms, entry_n LIMIT 1",
            epoch,
            min_ms,
        )
        return (rows[0]["stream_id"], rows[0]["seq"]) if rows else None
