"""The gateway's Starlette app.

    create_app(settings) -> Starlette

Routes: `GET /v1/stream` (the event stream), `GET /healthz`, `GET /readyz` (Redis reachable
and the feed readers reading), plus `lookup.routes`, `auth.routes` (tickets),
`messages.routes` (history pages) and `contract.routes` (`/v1/openapi.json`, the
published contract the routes are held to), and the page `static/index.html` at `/`
(other files of `static/` under `/static/`). `/metrics` is on the ops server only
(`ops.py`, FANOUT_GATEWAY_OPS), which serves `/healthz` and `/readyz` too.

`app.state`, for every route of the package (set by the lifespan):
    settings     GatewaySettings
    redis        redis.asyncio.Redis, decode_responses=True (str replies), the hub's and lookups'
    history_redis  the same, on a bounded blocking pool (FANOUT_HISTORY_CONNECTIONS): for
                 request-time and catch-up reads, so a crowd catching up waits its turn
                 instead of exhausting connections
    archive      history.Archive: `await archive.pool()` is the asyncpg pool of the catalogue,
                 opened on first use; raises history.ArchiveUnavailable while Postgres is down
                 (live streaming never needs it)
    history      history.History on history_redis and archive: the one interface to "the
                 records after seq c of epoch e" (Redis, else the catalogue)
    hub          hub.Hub: `hub.positions[feed]` is the live cursor.Position of each feed
    access       auth.Access(settings): `await access.check(request, feeds)` raises
                 HTTPException 401/403 (JSON detail) for a request not allowed those feeds
    pool         the same asyncpg pool once it opened (a background task keeps trying at
                 start-up), else None
    stop         asyncio.Event, the one shutdown event of the process: set it and every
                 stream ends cleanly
    subscribers  subscriber.Registry of the connected subscribers
    turnstile    turnstile.Turnstile: a stream's set-up starts through it, so that a crowd
                 reconnecting at once waits here in order, not in the kernel's listen queue

Stream requests: `GET /v1/stream?feeds=execution,sport_event` (default: every feed; an
unknown feed is a 404 naming the known ones), filters `symbol=`, `market=` (execution) and
`sport=` (sport_event), repeatable; start: the `Last-Event-ID` header, else
`?last_event_id=`, else `?lastEventID=`, else `?from=latest|earliest|<ISO time>` (the
time of an entry is its broker time). A `v1:` cursor (before positions came from
JetStream) is no error: the stream starts at `from=` with an `event: reset` (reason
`cursor_version`) per feed it named. A cursor ahead of what Redis holds (Redis lost
data and is being refilled) is no error either: the stream waits for it. Errors are JSON
`{"error": ..., "detail": ...}`: 400 bad cursor / filter / from / unknown parameter, 404
unknown feed, 405 not GET, 431 headers over 16 KB, 503 (with Retry-After) past the
subscriber limit, while stopping, or while Redis (or, for history, Postgres) is
unreachable. An EventSource never retries after a 503 (only after a network error or
the end of a 200 stream), so a request that asks for `Accept: text/event-stream` (every
EventSource does) gets that refusal in-band instead: 200, `retry: <Retry-After in ms>`,
the error as a comment `: unavailable {"error": ..., "detail": ...}`, and the end of the
stream; it reconnects by itself with its Last-Event-ID. Other clients (curl, fetch,
scripts: `Accept: */*`) get the 503 JSON and its Retry-After. Both count in
`fanout_gateway_rejected_total{status="503"}`.

The stream: `retry: <FANOUT_RETRY_MS>` and an `id:`-only frame with the start cursor,
then per entry `event: <feed>` / `data: <codec.typed_message JSON>` / `id: <cursor>`
(an `id:`-only frame for an entry the filters reject), `event: gap` and `event: reset`
notices (subscriber.py), `event: malformed` for an entry that is not a valid message, and
`: heartbeat` comments on a quiet stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from prometheus_client import REGISTRY
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from services.sse_gateway import contract, cursor, filters, messages, metrics, ops, tokens
from services.sse_gateway.auth import Access
from services.sse_gateway.cursor import CursorError, LegacyCursor
from services.sse_gateway.expiry import Expiring
from services.sse_gateway.filters import FilterError
from services.sse_gateway.history import Archive, ArchiveUnavailable, History
from services.sse_gateway.hub import Hub
from services.sse_gateway.response import (
    EventStream,
    ExpectedIncomplete,
    unavailable_stream,
    wants_event_stream,
)
from services.sse_gateway.settings import GatewaySettings
from services.sse_gateway.subscriber import Registry, Subscriber, legacy_notices, start_positions
from services.sse_gateway.turnstile import Turnstile
from shared.connections import REDIS_SOCKET_TIMEOUT, read_retry, redis_client
from shared.feeds import FEED_NAMES
from shared.keys import Keys
from shared.lifecycle import Backoff
from shared.settings import SettingsError

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"


def _optional(name: str) -> ModuleType | None:
    """A sibling module built separately (auth, lookup), if it is there."""
    try:
        return importlib.import_module(f"services.sse_gateway.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"services.sse_gateway.{name}":
            return None
        raise


def error(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None, **more: Any
) -> JSONResponse:
    metrics.REJECTED.labels(str(status)).inc()
    return JSONResponse({"error": error, "detail": detail, **more}, status_code=status, headers=headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    body = exc.detail if isinstance(exc.detail, dict) else {"error": exc.detail}
    metrics.REJECTED.labels(str(exc.status_code)).inc()
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


# The query parameters of /v1/stream (`_` is the cache-buster some EventSource polyfills add).
STREAM_PARAMETERS = frozenset(
    {"feeds", "from", "last_event_id", "lastEventID", "access_token", "ticket", "_", *filters.PARAMETERS}
)
MAX_HEADER_BYTES = 16 * 1024


def unknown_parameters(request: Request) -> JSONResponse | None:
    unknown = sorted({k for k in request.query_params if k not in STREAM_PARAMETERS})
    if not unknown:
        return None
    shown = ", ".join(repr(k[:40]) for k in unknown[:5]) + (" ..." if len(unknown) > 5 else "")
    return error(
        400,
        "unknown parameter",
        f"{shown} is not a parameter of /v1/stream; it takes {', '.join(sorted(STREAM_PARAMETERS - {'_'}))}",
    )


def parse_feeds(request: Request) -> tuple[str, ...] | JSONResponse:
    raw = [f.strip() for value in request.query_params.getlist("feeds") for f in value.split(",")]
    asked = [f for f in raw if f]
    if not asked:
        return FEED_NAMES
    if len(asked) != len(set(asked)):
        return error(400, "bad feeds", "a feed is named more than once in `feeds`")
    unknown = [f for f in asked if f not in FEED_NAMES]
    if unknown:
        return error(
            404,
            "unknown feed",
            f"no feed named {', '.join(repr(u[:64]) for u in unknown)}; known feeds: {', '.join(FEED_NAMES)}",
            known_feeds=list(FEED_NAMES),
        )
    return tuple(f for f in FEED_NAMES if f in asked)


async def stream(request: Request) -> Any:
    state = request.app.state
    settings: GatewaySettings = state.settings
    if state.stop.is_set():
        return error(503, "shutting down", "the gateway is stopping; reconnect", {"Retry-After": "1"})
    unknown = unknown_parameters(request)
    if unknown is not None:
        return unknown
    feeds = parse_feeds(request)
    if isinstance(feeds, JSONResponse):
        return feeds
    try:
        chosen = filters.parse(request.query_params.multi_items(), feeds)
    except FilterError as exc:
        return error(400, "bad filter", str(exc))
    grant = await state.access.check(request, feeds)
    try:
        chosen = tokens.narrow(chosen, grant.filters, feeds)
    except tokens.FilterNotAllowed as exc:
        return error(403, "forbidden", str(exc))
    resume_text = (
        request.headers.get("last-event-id")
        or request.query_params.get("last_event_id")
        or request.query_params.get("lastEventID")
    )
    legacy: LegacyCursor | None = None
    try:
        resume = cursor.parse(resume_text) if resume_text else {}
    except LegacyCursor as exc:
        resume, legacy = {}, exc  # answered in-band: a reset notice, then from `from=`
    except CursorError as exc:
        return error(400, "bad cursor", str(exc))
    start = request.query_params.get("from", "latest").strip() or "latest"
    try:
        positions = await start_positions(state.history, state.hub, feeds, resume, start)
    except ValueError as exc:
        return error(400, "bad from", str(exc))
    except ArchiveUnavailable as exc:
        return error(503, "history unavailable", str(exc), {"Retry-After": "5"})
    except (RedisError, OSError) as exc:
        return error(503, "redis unavailable", f"cannot read the feeds: {exc}", {"Retry-After": "2"})
    subscribers: Registry = state.subscribers
    if subscribers.total() >= settings.max_subscribers:  # every worker's
        return error(
            503,
            "too many subscribers",
            f"this gateway serves at most {settings.max_subscribers} streams at once; retry later",
            {"Retry-After": str(max(1, settings.retry_ms // 1000))},
        )
    sub = Subscriber(
        feeds=feeds,
        filters=chosen,
        positions=positions,
        hub=state.hub,
        history=state.history,
        settings=settings,
        notices=legacy_notices(legacy, positions) if legacy is not None else (),
    )
    subscribers.add(sub)
    if state.stop.is_set():
        sub.close("shutting down")
    response: ASGIApp = EventStream(sub, subscribers)
    if grant.expires is not None:  # a JWT's (or its ticket's) `exp`: the stream ends then
        response = Expiring(response, sub, grant.expires, grant.who)
    return _Logged(response, feeds, grant.who, subscribers)


class _Logged:
    """A stream's response, with one log line when it opens and one when it closes: the
    subscribers connected, the feeds and who (a token's name, `jwt:<sub>`, `ticket(...)`;
    never a secret)."""

    __slots__ = ("feeds", "response", "subscribers", "who")

    def __init__(self, response: ASGIApp, feeds: tuple[str, ...], who: str, subscribers: Registry) -> None:
        self.response = response
        self.feeds = feeds
        self.who = who
        self.subscribers = subscribers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        fields = {"feeds": ",".join(self.feeds), "who": self.who}
        log.info("stream opened", extra={**fields, "subscribers": self.subscribers.total()})
        try:
            await self.response(scope, receive, send)
        finally:
            log.info("stream closed", extra={**fields, "subscribers": self.subscribers.total()})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    state = request.app.state
    checks: dict[str, str] = {}
    try:
        async with asyncio.timeout(2.0):
            checks["redis"] = "ok" if await state.redis.ping() else "failing"
    except (RedisError, OSError, TimeoutError) as exc:
        checks["redis"] = f"failing: {exc or type(exc).__name__}"
    for feed in FEED_NAMES:
        checks[f"reader:{feed}"] = "ok" if state.hub.ready(feed) else "failing"
    ok = all(v == "ok" for v in checks.values()) and not state.stop.is_set()
    return JSONResponse(
        {"status": "ok" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
    )


async def index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")


STREAM_PATH = "/v1/stream"


class GatewayApp(Starlette):
    """Starlette, with `/v1/stream` dispatched straight to its handler (through the same
    user middleware, e.g. CORS) instead of through the router and the exception
    middleware: a stream lives for hours, and every frame kept on its stack is memory
    per connected client. Everything else goes the usual way."""

    stream_app: ASGIApp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == STREAM_PATH:
            scope["app"] = self
            await self.stream_app(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


async def _stream_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    await scope["app"].state.turnstile.enter()
    request = Request(scope, receive)
    response: Any
    if scope["method"] != "GET":  # HEAD too: a stream has no end to report a length for
        response = error(405, "method not allowed", "/v1/stream takes GET", {"Allow": "GET"})
    elif sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES:
        response = error(431, "headers too large", f"the request headers exceed {MAX_HEADER_BYTES} bytes")
    else:
        try:
            response = await stream(request)
        except HTTPException as exc:
            handlers = request.app.exception_handlers
            handler = next((handlers[c] for c in type(exc).__mro__ if c in handlers), _http_exception)
            response = await handler(request, exc)
    if (
        isinstance(response, Response)
        and response.status_code == 503
        and wants_event_stream(request.headers.get("accept", ""))
    ):
        response = _in_band(response)
    del request  # not kept for the hours a stream lasts: memory per idle subscriber
    await response(scope, receive, send)


def _in_band(refusal: Response) -> Response:
    """The 503 `refusal` as an EventSource gets it (see response.unavailable_stream)."""
    try:
        body = json.loads(bytes(refusal.body))
    except ValueError:
        body = {"error": "unavailable", "detail": bytes(refusal.body).decode(errors="replace")[:200]}
    try:
        retry_after = float(refusal.headers.get("retry-after", "") or 2)
    except ValueError:
        retry_after = 2.0
    return unavailable_stream(body, retry_after)


def create_app(settings: GatewaySettings) -> Starlette:
    auth = _optional("auth")
    lookup = _optional("lookup")
    access = Access(settings)
    if access.open and settings.has_credentials:  # e.g. FANOUT_TOKENS_FILE names an empty file
        raise SettingsError(
            "the credential settings (FANOUT_TOKENS, FANOUT_JWT_*, or their _FILE) name no token and no "
            "key: refusing to serve every feed to everyone"
        )

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state = app.state
        state.stop.clear()
        # Both clients retry a command that met a stale pooled connection (Redis restarted
        # since it was last used) on a fresh one: the gateway only reads (and sets/takes
        # tickets), so a second send is safe, and a subscriber must not get an error
        # because of a dead socket while Redis is back.
        state.redis = redis_client(settings.redis_url, decode_responses=True, retry=read_retry())
        state.history_redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(
                settings.redis_url,
                max_connections=settings.history_connections,
                timeout=REDIS_SOCKET_TIMEOUT,
                decode_responses=True,
                socket_timeout=REDIS_SOCKET_TIMEOUT,
                socket_connect_timeout=5.0,
                health_check_interval=15,
                retry=read_retry(),
            )
        )
        state.archive = Archive(settings.database_url, settings.db_schema, settings.db_pool_size)
        state.hub = Hub(
            state.redis,
            Keys(settings.key_prefix),
            state.stop,
            batch=settings.reader_batch,
            block=settings.reader_block,
            recent=settings.hub_recent,
        )
        state.history = History(state.history_redis, state.hub.keys, state.archive)
        if hasattr(access, "log_mode"):
            access.log_mode()
        expected_incomplete = ExpectedIncomplete()
        logging.getLogger("uvicorn.error").addFilter(expected_incomplete)
        await state.hub.start()
        state.ops = ops.server(*settings.gateway_ops, state)
        await state.ops.start()
        state.pool = None
        closer = asyncio.create_task(_close_streams_on_stop(state))
        beats = asyncio.create_task(
            state.subscribers.tend(state.stop, settings.heartbeat, settings.slow_client_timeout)
        )
        opener = asyncio.create_task(_open_archive(state))
        log.info(
            "gateway ready",
            extra={"url": f"{settings.listen_url()}/v1/stream"},
        )
        try:
            yield
        finally:
            state.stop.set()
            opener.cancel()
            await closer
            await beats
            await state.ops.stop()
            await state.hub.close()
            await state.archive.close()
            await state.redis.aclose()
            await state.history_redis.aclose()
            await state.history_redis.connection_pool.disconnect()
            log.info("gateway stopped", extra={"subscribers_left": len(state.subscribers), **_totals()})
            logging.getLogger("uvicorn.error").removeFilter(expected_incomplete)

    routes: list[BaseRoute] = [
        Route(STREAM_PATH, stream, methods=["GET"]),  # served by GatewayApp directly; listed for docs
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
    ]
    for module in (auth, lookup):
        routes += list(getattr(module, "routes", []) or [])
    routes += [*messages.routes, *contract.routes]
    if (STATIC / "index.html").is_file():
        routes.append(Route("/", index, methods=["GET"]))
    if STATIC.is_dir():
        routes.append(Mount("/static", StaticFiles(directory=STATIC), name="static"))

    make_middleware: Callable[[GatewaySettings], list[Middleware]] | None = getattr(auth, "middleware", None)
    if make_middleware is not None:
        middleware = make_middleware(settings)
    elif settings.cors_origin_list:
        middleware = [
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origin_list,
                allow_methods=["GET", "POST"],
                allow_headers=["Authorization", "Last-Event-ID", "Content-Type"],
            )
        ]
    else:
        middleware = []

    handlers: dict[Any, Any] = {HTTPException: _http_exception}
    if auth is not None and hasattr(auth, "AccessError") and hasattr(auth, "access_error_handler"):
        handlers[auth.AccessError] = auth.access_error_handler
    app = GatewayApp(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers=handlers)
    stream_app: ASGIApp = _stream_asgi
    for cls, args, kwargs in reversed(middleware):
        stream_app = cls(stream_app, *args, **kwargs)
    app.stream_app = stream_app
    app.state.settings = settings
    app.state.access = access
    app.state.stop = asyncio.Event()
    app.state.subscribers = Registry()
    app.state.turnstile = Turnstile()
    return app


async def _close_streams_on_stop(state: Any) -> None:
    """On stop: end every stream, and give them `shutdown_grace` to finish."""
    await state.stop.wait()
    subscribers: Registry = state.subscribers
    for sub in subscribers:
        sub.close("shutting down")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(state.settings.shutdown_grace):
            await subscribers.empty.wait()


def _totals() -> dict[str, int]:
    """The process's counters, for the one summary line at shutdown."""
    get = REGISTRY.get_sample_value
    return {
        "subscribers_served": int(get("fanout_gateway_served_total") or 0),
        "events_sent": int(
            sum(get("fanout_gateway_events_sent_total", {"feed": f}) or 0 for f in FEED_NAMES)
        ),
        "catchups": int(get("fanout_gateway_catchups_total") or 0),
        "gaps": int(get("fanout_gateway_gaps_total") or 0),
        "resets": int(get("fanout_gateway_resets_total") or 0),
        "slow_disconnects": int(get("fanout_gateway_slow_disconnects_total") or 0),
    }


async def _open_archive(state: Any) -> None:
    """Open the catalogue pool in the background so `app.state.pool` is there for lookups."""
    backoff = Backoff(base=1.0, cap=30.0)
    while not state.stop.is_set():
        try:
            state.pool = await state.archive.pool()
            return
        except ArchiveUnavailable:
            if await backoff.wait(state.stop):
                return
