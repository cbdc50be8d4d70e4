"""A bounded read of a feed's history: `GET /v1/feeds/{feed}/messages`, for clients that
want a page of the catalogue rather than a stream.

    GET /v1/feeds/execution/messages?after=<cursor>&limit=100&symbol=AAPL
    -> {"feed": "execution",
        "events": [{"id": "v2:execution.1795862595094.43", "event": "execution", "data": {...}}, ...],
        "has_more": true, "next": "v2:execution.1795862595094.180"}

Served from PostgreSQL (the feed's table and its dead letters, the same rows a stream
catches up from) by keyset pagination on (epoch, seq), so any page costs one index range
scan however deep it is:

- `after=<cursor>`: the events after that position (exclusive), oldest first; without
  `after` or `before`, from the first archived event. `next` (when `has_more`) is the
  `after` of the next page.
- `before=<cursor>` alone: the `limit` events just before it, still oldest first; `next`
  is then the `before` of the previous page. With both, the events between them.
- `since=` / `until=` (ISO 8601): broker time at or after / before.
- `limit=` 1..1000 (default 100); the filters of the stream (`symbol`, `market` for
  executions, `sport` for sport events), within a JWT's `filters` claim as on the stream.

Each event is what the stream sends: `event` is the feed (or `malformed` for a payload
that was not a valid message: it keeps its seq), `data` the same JSON, and `id` the same
version 2 cursor, so `Last-Event-ID: <id of the last event read>` on `/v1/stream?feeds=<feed>`
resumes at exactly the next seq. A cursor names positions per feed; only this feed's is
read (400 if it has none). The access rules are the stream's (`auth`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.sse_gateway import cursor, filters, tokens
from services.sse_gateway.cursor import NO_EPOCH, CursorError, LegacyCursor, Position
from services.sse_gateway.filters import FilterError, Filters
from services.sse_gateway.history import Archive, ArchiveUnavailable
from shared.feeds import FEED_NAMES

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
PARAMETERS = frozenset(
    {"after", "before", "since", "until", "limit", "access_token", "ticket", *filters.PARAMETERS}
)
# A catalogue not (fully) there yet: the archiver has not created the table or column.
_NOT_THERE = (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.InvalidSchemaNameError)
_PG_ERRORS = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)
# Epochs of contract v2 are decimal Unix ms, all of one length for centuries: their text
# order is their time order, so the (epoch, seq) unique index serves the keyset as it is.
_V2_EPOCH = "epoch ~ '^[0-9]+$'"


class BadRequest(Exception):
    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


@dataclass(frozen=True, slots=True)
class Query:
    feed: str
    after: Position | None
    before: Position | None
    since: datetime | None
    until: datetime | None
    limit: int
    filters: Filters

    @property
    def backwards(self) -> bool:
        return self.before is not None and self.after is None


def _position(request: Request, name: str, feed: str) -> Position | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        positions = cursor.parse(text)
    except LegacyCursor:
        raise BadRequest(
            400, "bad cursor", f"`{name}` is a version 1 cursor, which cannot be mapped; use a v2 cursor"
        ) from None
    except CursorError as exc:
        raise BadRequest(400, "bad cursor", f"`{name}`: {exc}") from None
    if feed not in positions:
        raise BadRequest(400, "bad cursor", f"`{name}` names no position in the {feed} feed")
    return positions[feed]


def _time(request: Request, name: str) -> datetime | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            400, "bad time", f"bad `{name}` {text[:80]!r}: expected an ISO 8601 time (2026-11-28T09:00:00Z)"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _limit(request: Request) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return DEFAULT_LIMIT
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= MAX_LIMIT:
        raise BadRequest(400, "bad limit", f"bad `limit` {text[:40]!r}: expected 1 to {MAX_LIMIT}")
    return int(text)


def parse(request: Request, feed: str) -> Query:
    """The query of a request (BadRequest for a bad parameter), filters not yet narrowed."""
    unknown = sorted({k for k in request.query_params if k not in PARAMETERS})
    if unknown:
        shown = ", ".join(repr(k[:40]) for k in unknown[:5])
        takes = ", ".join(sorted(PARAMETERS))
        raise BadRequest(400, "unknown parameter", f"{shown}: not a parameter here; it takes {takes}")
    for name in ("after", "before", "since", "until", "limit"):
        if len(request.query_params.getlist(name)) > 1:
            raise BadRequest(400, "bad parameter", f"`{name}` is given more than once")
    try:
        chosen = filters.parse(request.query_params.multi_items(), (feed,))
    except FilterError as exc:
        raise BadRequest(400, "bad filter", str(exc)) from None
    return Query(
        feed=feed,
        after=_position(request, "after", feed),
        before=_position(request, "before", feed),
        since=_time(request, "since"),
        until=_time(request, "until"),
        limit=_limit(request),
        filters=chosen,
    )


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def sql(query: Query, schema: str) -> tuple[str, list[Any]]:
    """The keyset query (limit + 1 rows, to tell whether there is more) and its arguments."""
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    where = [_V2_EPOCH]
    if query.after is not None and query.after.epoch != NO_EPOCH:
        where.append(f"(epoch, seq) > ({arg(query.after.epoch)}::text, {arg(query.after.seq)}::bigint)")
    if query.before is not None:
        if query.before.epoch == NO_EPOCH:
            where.append("false")  # before the first message of the feed: nothing
        else:
            where.append(f"(epoch, seq) < ({arg(query.before.epoch)}::text, {arg(query.before.seq)}::bigint)")
    if query.since is not None:
        where.append(f"broker_time >= {arg(query.since)}")
    if query.until is not None:
        where.append(f"broker_time < {arg(query.until)}")
    feed_where = list(where)
    for field, values in query.filters.for_feed(query.feed):
        feed_where.append(f"{_quoted(field)} = ANY({arg(sorted(values))}::text[])")
    order = "DESC" if query.backwards else "ASC"
    limit = arg(query.limit + 1)
    table = f"{_quoted(schema)}.{_quoted(query.feed)}"
    dead = f"{_quoted(schema)}.dead_letter"
    text = (
        f"(SELECT epoch, seq, message::text AS message, message_id, NULL::text AS error FROM {table} "
        f"WHERE {' AND '.join(feed_where)} ORDER BY epoch {order}, seq {order} LIMIT {limit}) "
        f"UNION ALL "
        f"(SELECT epoch, seq, NULL::text, message_id, error FROM {dead} "
        f"WHERE feed = {arg(query.feed)} AND seq IS NOT NULL AND {' AND '.join(where)} "
        f"ORDER BY epoch {order}, seq {order} LIMIT {limit}) "
        f"ORDER BY epoch {order}, seq {order} LIMIT {limit}"
    )
    return text, args


def _event(feed: str, row: asyncpg.Record) -> dict[str, Any]:
    position = {feed: Position(row["epoch"], int(row["seq"]))}
    cid = cursor.format(position, [feed])
    if row["message"] is None:
        data = {"feed": feed, "seq": int(row["seq"]), "message_id": row["message_id"], "error": row["error"]}
        return {"id": cid, "event": "malformed", "data": data}
    return {"id": cid, "event": feed, "data": json.loads(row["message"])}


async def read(archive: Archive, schema: str, query: Query) -> dict[str, Any]:
    """The page: {feed, events, has_more, next}. ArchiveUnavailable while Postgres is down."""
    text, args = sql(query, schema)
    pool = await archive.pool()
    try:
        rows: list[asyncpg.Record] = await pool.fetch(text, *args)
    except _NOT_THERE:
        rows = []  # nothing archived yet
    except _PG_ERRORS as exc:
        raise ArchiveUnavailable(f"reading the catalogue failed: {type(exc).__name__}") from None
    seen: set[tuple[str, int]] = set()
    unique = []
    for row in rows:  # a seq in both tables (outside the contract) is listed once, like the stream
        key = (row["epoch"], int(row["seq"]))
        if key not in seen:
            seen.add(key)
            unique.append(row)
    has_more = len(unique) > query.limit
    page = unique[: query.limit]
    if query.backwards:
        page.reverse()
    events = [_event(query.feed, row) for row in page]
    following = None
    if has_more and events:
        following = events[0]["id"] if query.backwards else events[-1]["id"]
    return {"feed": query.feed, "events": events, "has_more": has_more, "next": following}


async def list_messages(request: Request) -> Response:
    """GET /v1/feeds/{feed}/messages"""
    state = request.app.state
    feed: str = request.path_params["feed"]
    if feed not in FEED_NAMES:
        return JSONResponse(
            {
                "error": "unknown feed",
                "detail": f"no feed named {feed[:64]!r}; known feeds: {', '.join(FEED_NAMES)}",
                "known_feeds": list(FEED_NAMES),
            },
            status_code=404,
        )
    try:
        query = parse(request, feed)
    except BadRequest as exc:
        return _error(exc.status, exc.error, exc.detail)
    grant = await state.access.check(request, [feed])  # AccessError: 401/403 by the app's handler
    try:
        narrowed = tokens.narrow(query.filters, grant.filters, [feed])
    except tokens.FilterNotAllowed as exc:
        return _error(403, "forbidden", str(exc))
    query = Query(feed, query.after, query.before, query.since, query.until, query.limit, narrowed)
    try:
        body = await read(state.archive, state.settings.db_schema, query)
    except ArchiveUnavailable as exc:
        log.warning("history page: catalogue unavailable", extra={"feed": feed, "error": str(exc)})
        return _error(503, "history unavailable", str(exc), {"Retry-After": "5"})
    return JSONResponse(body)


routes = [Route("/v1/feeds/{feed}/messages", list_messages, methods=["GET"])]
