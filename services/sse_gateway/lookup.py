"""Lookup endpoints: what each feed holds, and where one message is.

- `GET /v1/feeds`: per feed the token may read: its epoch, last id and seq, the
  stream's length and first entry, the cursor that resumes from the latest point,
  and how far the Postgres catalogue has archived it; plus one cursor resuming all
  of those feeds from their latest points.
- `GET /v1/messages/{message_id}`: where a message is: its feed, its stream entry
  (from the dedup key's entry id, `XRANGE id id`) while Redis still holds it, and
  whether it is archived, with its catalogue row. 400 for a malformed id, 404 when
  neither Redis nor the catalogue knows it (in the feeds the token may read).

Both GETs follow the stream's access rules (see `auth`). Postgres is optional: when
the catalogue cannot be reached the answer says so instead of failing, unless the
answer depends on it (a message not in Redis: 503).
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.sse_gateway import auth, cursor
from services.sse_gateway.history import Archive, ArchiveUnavailable
from shared.codec import str_entry
from shared.feeds import DEAD_LETTER, FEED_NAMES
from shared.keys import Keys

log = logging.getLogger(__name__)

# What a catalogue query can raise when Postgres is down, slow or not set up yet.
_PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# `<stream created unix ms>.<JetStream stream seq>`
MESSAGE_ID = re.compile(r"[0-9]{1,19}\.[0-9]{1,20}")  # fullmatch: `$` would take a trailing newline

_COMMON_COLUMNS = (
    "message_id, epoch, seq, stream_id, broker_time, ingest_time, archived_at, message"
)


def _error(status: int, error: str, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _row(record: Mapping[str, Any]) -> dict[str, Any]:
    """A catalogue row as JSON: times in ISO 8601, bytea as `<column>_b64`, jsonb parsed."""
    row: dict[str, Any] = {}
    for name, value in record.items():
        if isinstance(value, datetime):
            row[name] = value.isoformat().replace("+00:00", "Z")
        elif isinstance(value, bytes | memoryview):
            row[f"{name}_b64"] = base64.b64encode(bytes(value)).decode()
        else:
            row[name] = value
    for name in ("message", "fields"):
        if isinstance(row.get(name), str):
            row[name] = json.loads(row[name])
    return row


async def _pool(request: Request) -> tuple[asyncpg.Pool | None, str]:
    """The catalogue's pool (opened on first use by `app.state.archive`), or None and why not."""
    archive: Archive | None = getattr(request.app.state, "archive", None)
    if archive is None:
        return None, "the catalogue is not configured"
    try:
        return await archive.pool(), ""
    except ArchiveUnavailable as exc:
        return None, str(exc)


def _schema(request: Request) -> str:
    return '"' + str(request.app.state.settings.db_schema).replace('"', '""') + '"'


async def _grant(request: Request) -> auth.Grant | JSONResponse:
    try:
        return await auth.Access(request.app.state.settings).authenticate(request)
    except auth.AccessError as exc:
        return exc.response()


def _resume_cursor(feed: str, epoch: str | None, last_id: str | None, seq: int) -> str | None:
    """The cursor (`Last-Event-ID`) that resumes `feed` right after its latest entry."""
    if epoch is None or last_id is None:
        return None
    return cursor.format({feed: cursor.Position(epoch, last_id, seq)}, [feed])


async def list_feeds(request: Request) -> Response:
    """GET /v1/feeds"""
    grant = await _grant(request)
    if isinstance(grant, JSONResponse):
        return grant
    redis: Redis = request.app.state.redis
    keys = Keys(request.app.state.settings.key_prefix)
    feeds = [f for f in FEED_NAMES if f in grant.feeds]
    try:
        async with redis.pipeline(transaction=False) as pipe:
            for feed in feeds:
                pipe.hgetall(keys.meta(feed))
                pipe.xlen(keys.stream(feed))
                pipe.xrange(keys.stream(feed), count=1)
            answers = await pipe.execute()
    except RedisError as exc:
        log.warning("feeds lookup: Redis unreachable", extra={"error": str(exc)})
        return _error(503, "unavailable", "Redis is unreachable; retry", {"Retry-After": "2"})
    out = []
    for i, feed in enumerate(feeds):
        meta_raw, length, first = answers[3 * i : 3 * i + 3]
        meta = {_s(k): _s(v) for k, v in meta_raw.items()}
        epoch, last_id = meta.get("epoch"), meta.get("last_id")
        seq = int(meta.get("seq") or 0)
        first_id = _s(first[0][0]) if first else None
        first_seq = int(str_entry(first[0][1]).get("seq", 0)) if first else None
        out.append(
            {
                "name": feed,
                "epoch": epoch,
                "last_id": last_id,
                "last_seq": seq,
                "length": length,
                "first_id": first_id,
                "first_seq": first_seq,
                "resume_latest": _resume_cursor(feed, epoch, last_id, seq),
                "archive": await _archive_state(request, feed, epoch),
            }
        )
    # one cursor for all of them, for `curl -H 'Last-Event-ID: ...'` on a multi-feed stream
    started = {f["name"]: cursor.Position(f["epoch"], f["last_id"], f["last_seq"]) for f in out if f["epoch"]}
    both = cursor.format(started, [f for f in feeds if f in started]) if started else None
    return JSONResponse({"feeds": out, "resume_latest": both})


async def _archive_state(request: Request, feed: str, epoch: str | None) -> dict[str, Any]:
    """How far the catalogue holds `feed` in this epoch (cheap: the (epoch, seq) index)."""
    pool, why = await _pool(request)
    if pool is None:
        return {"available": False, "detail": why}
    if epoch is None:
        return {"available": True, "last_seq": None, "last_id": None}
    try:
        record = await pool.fetchrow(
            f"SELECT seq, stream_id FROM {_schema(request)}.{feed} "
            "WHERE epoch = $1 ORDER BY seq DESC LIMIT 1",
            epoch,
        )
    except _PG_ERRORS as exc:  # the catalogue is optional here: its state is reported
        return _catalogue_unavailable(exc)
    return {
        "available": True,
        "last_seq": record["seq"] if record else None,
        "last_id": record["stream_id"] if record else None,
    }


def _catalogue_unavailable(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
        return {"available": True, "last_seq": None, "last_id": None, "detail": "nothing archived yet"}
    log.warning("catalogue lookup failed", extra={"error": f"{type(exc).__name__}: {exc}"})
    return {"available": False, "detail": f"the catalogue is unreachable ({type(exc).__name__})"}


async def get_message(request: Request) -> Response:
    """GET /v1/messages/{message_id}"""
    message_id: str = request.path_params["message_id"]
    if not MESSAGE_ID.fullmatch(message_id):
        return _error(
            400,
            "bad_message_id",
            f"malformed message id {message_id[:80]!r}: expected <stream created unix ms>.<stream seq>, "
            "such as 1764321000123.42",
        )
    grant = await _grant(request)
    if isinstance(grant, JSONResponse):
        return grant
    redis: Redis = request.app.state.redis
    keys = Keys(request.app.state.settings.key_prefix)
    feeds = [f for f in FEED_NAMES if f in grant.feeds]
    # Undecodable messages are the dead-letter pseudo-feed's; shown to tokens for all feeds.
    if set(FEED_NAMES) <= grant.feeds:
        feeds.append(DEAD_LETTER)
    try:
        # One GET per feed, not MGET: each feed's keys live in their own cluster slot.
        async with redis.pipeline(transaction=False) as pipe:
            for f in feeds:
                pipe.get(keys.dedup(f, message_id))
            ids = [_s(v) for v in await pipe.execute()]
        found = next(((f, i) for f, i in zip(feeds, ids, strict=True) if i is not None), None)
        entry: dict[str, Any] | None = None
        if found is not None:
            rows = await redis.xrange(keys.stream(found[0]), min=found[1], max=found[1])
            if rows and rows[0][1] is not None:
                entry = {"id": found[1], "fields": str_entry(rows[0][1])}
    except RedisError as exc:
        log.warning("message lookup: Redis unreachable", extra={"error": str(exc)})
        return _error(503, "unavailable", "Redis is unreachable; retry", {"Retry-After": "2"})

    archive = await _find_archived(request, feeds if found is None else [found[0]], message_id)
    if found is None and archive.get("feed") is None:
        if not archive["available"]:
            return _error(
                503,
                "unavailable",
                f"message {message_id} is not in Redis and the catalogue cannot be searched "
                f"({archive['detail']}); retry",
                {"Retry-After": "5"},
            )
        return _error(
            404,
            "not_found",
            f"message {message_id} is unknown: neither Redis nor the catalogue holds it "
            f"(searched: {', '.join(feeds)})",
        )
    feed = found[0] if found is not None else archive["feed"]
    stream_id = found[1] if found is not None else (archive.get("row") or {}).get("stream_id")
    body: dict[str, Any] = {
        "message_id": message_id,
        "feed": feed,
        "stream_id": stream_id,
        "in_redis": entry is not None,
        "entry": entry,
        "archived": archive.get("row") is not None,
        "row": archive.get("row"),
    }
    if not archive["available"]:
        body["archive_detail"] = archive["detail"]
    return JSONResponse(body)


async def _find_archived(request: Request, feeds: list[str], message_id: str) -> dict[str, Any]:
    """{available, feed, row} for the first of `feeds` whose catalogue table holds the message."""
    pool, why = await _pool(request)
    if pool is None:
        return {"available": False, "detail": why}
    schema = _schema(request)
    for feed in feeds:
        if feed == DEAD_LETTER:
            sql = (
                "SELECT id, source, feed, message_id, subject, broker_seq, stream_id, error, payload, "
                f"fields, broker_time, ingest_time, archived_at FROM {schema}.dead_letter "
                "WHERE message_id = $1 ORDER BY id LIMIT 1"
            )
        else:
            sql = f"SELECT {_COMMON_COLUMNS} FROM {schema}.{feed} WHERE message_id = $1"
        try:
            record = await pool.fetchrow(sql, message_id)
        except _PG_ERRORS as exc:  # reported; the Redis half still answers
            state = _catalogue_unavailable(exc)
            if state["available"]:
                continue  # that table does not exist yet: nothing archived there
            return state
        if record is not None:
            return {"available": True, "feed": feed, "row": _row(record)}
    return {"available": True, "feed": None, "row": None}


routes = [
    Route("/v1/feeds", list_feeds, methods=["GET"]),
    Route("/v1/messages/{message_id}", get_message, methods=["GET"]),
]
