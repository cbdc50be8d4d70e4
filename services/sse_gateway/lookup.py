"""Lookup endpoints: what each feed holds, and where one message is.

- `GET /v1/feeds`: per feed the token may read: its epoch, last id and seq, the
  stream's length and first entry, the cursor that resumes from the latest point,
  and how far the Postgres catalogue has archived it; plus one cursor resuming all
  of those feeds from their latest points.
- `GET /v1/messages/{message_id}`: where a message is. Its id is `<epoch>.<seq>`, its
  stream entry `<seq>-0` (`XRANGE key <seq>-0 <seq>-0`, checked against the entry's
  message id) while Redis still holds it, its catalogue row (the feed's table, or
  `dead_letter` for a payload that was not a valid message). 400 for a malformed id,
  404 when neither Redis nor the catalogue knows it (in the feeds the token may read).

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
from services.sse_gateway.history import Archive, ArchiveUnavailable, entry_epoch, entry_seq
from shared import codec
from shared.codec import is_malformed, str_entry
from shared.feeds import DEAD_LETTER, FEED_NAMES, entry_id
from shared.keys import Keys

log = logging.getLogger(__name__)

# What a catalogue query can raise when Postgres is down, slow or not set up yet.
_PG_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)

# `<stream created unix ms>.<JetStream stream seq>`
MESSAGE_ID = re.compile(r"[0-9]{1,19}\.[0-9]{1,19}")  # fullmatch: `$` would take a trailing newline

_COMMON_COLUMNS = (
    "message_id, epoch, seq, stream_id, broker_time, ingest_time, archived_at, message"
)


def _error(status: int, error: str, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)




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


def _resume_cursor(feed: str, epoch: str | None, seq: int) -> str | None:
    """The cursor (`Last-Event-ID`) that resumes `feed` right after its latest entry."""
    if epoch is None:
        return None
    return cursor.format({feed: cursor.Position(epoch, seq)}, [feed])


def _entry(raw: Any) -> tuple[str, dict[str, str]] | None:
    """(entry id, fields) of the single entry of an XRANGE/XREVRANGE reply, if any."""
    if not raw:
        return None
    return codec.text(raw[0][0]), str_entry(raw[0][1])


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
                pipe.xrevrange(keys.stream(feed), count=1)
            answers = await pipe.execute()
    except RedisError as exc:
        log.warning("feeds lookup: Redis unreachable", extra={"error": str(exc)})
        return _error(503, "unavailable", "Redis is unreachable; retry", {"Retry-After": "2"})
    out = []
    started: dict[str, cursor.Position] = {}
    for i, feed in enumerate(feeds):
        meta_raw, length, first_raw, last_raw = answers[4 * i : 4 * i + 4]
        meta = {codec.text(k): codec.text(v) for k, v in meta_raw.items()}
        first, last = _entry(first_raw), _entry(last_raw)
        # The meta hash may have been lost (evicted, Redis emptied): the stream tells the same.
        epoch = meta.get("epoch") or (entry_epoch(last[1]) if last else None)
        seq = int(meta.get("seq") or (last and entry_seq(last[0])) or 0)
        first_seq = entry_seq(first[0]) if first else None
        if epoch is not None:
            started[feed] = cursor.Position(epoch, seq)
        out.append(
            {
                "name": feed,
                "epoch": epoch,
                "last_id": entry_id(seq) if epoch is not None and seq else None,
                "last_seq": seq,
                "length": length,
                "first_id": first[0] if first else None,
                "first_seq": first_seq,
                "resume_latest": _resume_cursor(feed, epoch, seq),
                "archive": await _archive_state(request, feed, epoch),
            }
        )
    # one cursor for all of them, for `curl -H 'Last-Event-ID: ...'` on a multi-feed stream
    both = cursor.format(started, [f for f in feeds if f in started]) if started else None
    return JSONResponse({"feeds": out, "resume_latest": both})


async def _archive_state(request: Request, feed: str, epoch: str | None) -> dict[str, Any]:
    """How far the catalogue holds `feed` in this epoch (cheap: the (epoch, seq) index)."""
    archive: Archive | None = getattr(request.app.state, "archive", None)
    if archive is None:
        return {"available": False, "detail": "the catalogue is not configured"}
    if epoch is None:
        try:
            await archive.pool()
        except ArchiveUnavailable as exc:
            return {"available": False, "detail": str(exc)}
        return {"available": True, "last_seq": None, "last_id": None}
    try:
        last = await archive.last(feed, epoch)
    except ArchiveUnavailable as exc:  # the catalogue is optional here: its state is reported
        return {"available": False, "detail": str(exc)}
    return {"available": True, "last_seq": last, "last_id": None if last is None else entry_id(last)}


def _catalogue_unavailable(exc: Exception) -> dict[str, Any]:
    if isinstance(exc, asyncpg.UndefinedTableError | asyncpg.InvalidSchemaNameError):
        return {"available": True, "detail": "nothing archived yet"}
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
    seq = int(message_id.partition(".")[2])
    try:
        # The entry id is the seq: one XRANGE per feed (each feed's keys live in their own
        # cluster slot), and the entry whose message id is this one.
        async with redis.pipeline(transaction=False) as pipe:
            for f in feeds:
                pipe.xrange(keys.stream(f), min=entry_id(seq), max=entry_id(seq))
            replies = await pipe.execute()
    except RedisError as exc:
        log.warning("message lookup: Redis unreachable", extra={"error": str(exc)})
        return _error(503, "unavailable", "Redis is unreachable; retry", {"Retry-After": "2"})
    found: tuple[str, str, dict[str, str]] | None = None
    for f, reply in zip(feeds, replies, strict=True):
        entry = _entry(reply)
        if entry is not None and entry[1].get("message_id") == message_id:
            found = (f, entry[0], entry[1])
            break

    archive = await _find_archived(request, feeds if found is None else [found[0]], message_id, grant)
    if found is None and archive.get("feed") is None:
        if not archive["available"]:
            return _error(
                503,
                "unavailable",
                f"message {message_id} is not in Redis and the catalogue cannot be searched "
                f"({archive['detail']}); retry",
                {"Retry-After": "5"},
            )
        searched = feeds + ([DEAD_LETTER] if set(FEED_NAMES) <= grant.feeds else [])
        return _error(
            404,
            "not_found",
            f"message {message_id} is unknown: neither Redis nor the catalogue holds it "
            f"(searched: {', '.join(searched)})",
        )
    row = archive.get("row")
    body: dict[str, Any] = {
        "message_id": message_id,
        "feed": found[0] if found is not None else archive["feed"],
        "stream_id": found[1] if found is not None else (row or {}).get("stream_id") or entry_id(seq),
        "in_redis": found is not None,
        "entry": {"id": found[1], "fields": found[2]} if found is not None else None,
        "malformed": is_malformed(found[2]) if found is not None else archive.get("table") == DEAD_LETTER,
        "archived": row is not None,
        "table": archive.get("table"),
        "row": row,
    }
    if not archive["available"]:
        body["archive_detail"] = archive["detail"]
    return JSONResponse(body)


async def _find_archived(
    request: Request, feeds: list[str], message_id: str, grant: auth.Grant
) -> dict[str, Any]:
    """{available, feed, table, row}: the catalogue row of the message in the first of
    `feeds` whose table holds it, else its dead_letter row (a payload that was not a valid
    message) of one of `feeds`; a dead letter of the old layout, which names no feed, only
    for a token that reads every feed."""
    pool, why = await _pool(request)
    if pool is None:
        return {"available": False, "detail": why}
    schema = _schema(request)
    queries = [(f, f, f"SELECT {_COMMON_COLUMNS} FROM {schema}.{f} WHERE message_id = $1") for f in feeds]
    every_feed = set(FEED_NAMES) <= grant.feeds
    queries.append(
        (
            "",
            DEAD_LETTER,
            "SELECT * FROM {schema}.dead_letter WHERE message_id = $1 "
            "AND (feed = ANY($2::text[]) OR (feed IS NULL AND $3)) ORDER BY id LIMIT 1".replace(
                "{schema}", schema
            ),
        )
    )
    for feed, table, sql in queries:
        args: list[Any] = [message_id] if feed else [message_id, feeds, every_feed]
        try:
            record = await pool.fetchrow(sql, *args)
        except _PG_ERRORS as exc:  # reported; the Redis half still answers
            state = _catalogue_unavailable(exc)
            if state["available"]:
                continue  # that table does not exist yet: nothing archived there
            return state
        if record is not None:
            row = _row(record)
            found = feed or row.get("feed") or DEAD_LETTER
            return {"available": True, "feed": found, "table": table, "row": row}
    return {"available": True, "feed": None, "table": None, "row": None}


routes = [
    Route("/v1/feeds", list_feeds, methods=["GET"]),
    Route("/v1/messages/{message_id}", get_message, methods=["GET"]),
]
