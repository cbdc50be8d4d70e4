"""Access control of the SSE gateway against the real Redis: tokens scoped to feeds,
the three ways to present them, single-use tickets shared through Redis, CORS, and
the start-up log line. The routes are driven through ASGI directly."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from services.sse_gateway import auth, lookup
from shared.keys import Keys
from shared.settings import Settings, SettingsError

TOKENS = "tok-both=execution+sport_event;tok-exec=execution;tok-all=*"


# --- helpers shared with the lookup tests -----------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    extra: list[Any] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str,
    path: str,
    query: Mapping[str, str] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Reply:
    """One request through the ASGI app, answered in full (no streaming)."""
    raw_headers = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": urlencode(query or {}).encode(),
        "headers": [(b"host", b"testserver"), *raw_headers],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "root_path": "",
        "app": app,
    }
    sent = False
    reply = Reply(0, {})

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")

    await app(scope, receive, send)
    return reply


def gateway_settings(base: Settings, **overrides: Any) -> Any:
    """GatewaySettings on the test's isolated base settings."""
    from services.sse_gateway.settings import GatewaySettings

    values = {f.name: getattr(base, f.name) for f in dataclasses.fields(Settings)}
    return GatewaySettings(**{**values, **overrides})


def small_app(settings: Any, redis: Any, archive: Any = None) -> Starlette:
    """The lookup/ticket routes plus a probe that checks access like /v1/stream does, on the
    app.state that create_app's lifespan provides (settings, redis, archive)."""

    async def probe(request: Request) -> JSONResponse:
        feeds = auth.requested_feeds(request) or ["execution", "sport_event"]
        try:
            grant = await auth.Access(request.app.state.settings).check(request, feeds)
        except auth.AccessError as exc:
            return exc.response()
        return JSONResponse({"feeds": sorted(grant.feeds), "via": grant.via, "who": grant.who})

    app = Starlette(
        routes=[*lookup.routes, *auth.routes, Route("/probe", probe)],
        middleware=auth.middleware(settings),
    )
    app.state.settings = settings
    app.state.redis = redis
    app.state.archive = archive
    return app


# --- fixtures ----------------------------------------------------------------------


@pytest.fixture
async def app(base_settings: Settings, redis: Any) -> AsyncIterator[Starlette]:
    yield small_app(gateway_settings(base_settings, tokens=TOKENS, ticket_ttl=30.0), redis)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- token parsing -------------------------------------------------------------------


def test_tokens_parse_scopes_and_star() -> None:
    tokens = auth.parse_tokens(" a=execution+sport_event ; b=execution;c=*; ")
    scopes = sorted((t.name, sorted(t.feeds)) for t in tokens.values())
    assert scopes == [
        ("token#1", ["execution", "sport_event"]),
        ("token#2", ["execution"]),
        ("token#3", ["execution", "sport_event"]),
    ]
    assert "a" not in tokens  # keyed by digest, never the token itself


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("secret", "pair #1: expected TOKEN=FEED+FEED or TOKEN=*"),
        ("=execution", "pair #1: expected TOKEN"),
        ("ok=execution;secret=", "pair #2: names no feed"),
        ("secret=trades", "unknown feed(s) 'trades'; known feeds: execution, sport_event"),
        ("secret=execution;secret=sport_event", "pair #2: the same token is configured twice"),
    ],
)
def test_bad_tokens_setting_names_the_pair_not_the_secret(text: str, expected: str) -> None:
    with pytest.raises(SettingsError, match="FANOUT_TOKENS") as caught:
        auth.parse_tokens(text)
    assert expected in str(caught.value)
    assert "secret" not in str(caught.value)


def test_bad_cors_origin_is_a_settings_error(base_settings: Settings) -> None:
    with pytest.raises(SettingsError, match=r"FANOUT_CORS_ORIGINS: 'example\.com' is not an origin"):
        auth.middleware(gateway_settings(base_settings, cors_origins="https://ok.example, example.com"))
    assert auth.middleware(gateway_settings(base_settings, cors_origins="")) == []


# --- 401 / 403 / 200 -------------------------------------------------------------------


async def test_no_token_is_401_with_challenge(app: Starlette) -> None:
    reply = await call(app, "GET", "/probe")
    assert reply.status == 401
    assert reply.headers["www-authenticate"] == 'Bearer realm="fanout"'
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"] == "unauthorized"
    assert "Authorization: Bearer" in reply.json()["detail"]


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"Authorization": "Bearer nope"}, {}),
        ({"Authorization": "Basic dG9rLWFsbDo="}, {}),
        ({}, {"access_token": "nope"}),
        ({}, {"ticket": "nope"}),
    ],
)
async def test_unknown_credential_is_401_invalid_token(
    app: Starlette, headers: dict[str, str], query: dict[str, str]
) -> None:
    reply = await call(app, "GET", "/probe", query, headers)
    assert reply.status == 401
    assert 'error="invalid_token"' in reply.headers["www-authenticate"]
    assert reply.json()["error"] == "unauthorized"


async def test_token_for_another_feed_is_403(app: Starlette) -> None:
    reply = await call(app, "GET", "/probe", {"feeds": "sport_event"}, bearer("tok-exec"))
    assert reply.status == 403
    assert reply.json() == {
        "error": "forbidden",
        "detail": "this token may not read sport_event; it may read: execution",
    }
    assert 'error="insufficient_scope"' in reply.headers["www-authenticate"]
    # both feeds asked: still 403, naming only the one denied
    reply = await call(app, "GET", "/probe", {"feeds": "execution,sport_event"}, bearer("tok-exec"))
    assert reply.status == 403 and "may not read sport_event;" in reply.json()["detail"]


async def test_token_in_header_or_query_grants_its_feeds(app: Starlette) -> None:
    reply = await call(app, "GET", "/probe", {"feeds": "execution"}, bearer("tok-exec"))
    assert (reply.status, reply.json()) == (200, {"feeds": ["execution"], "via": "bearer", "who": "token#2"})
    reply = await call(app, "GET", "/probe", {"access_token": "tok-all"})
    assert reply.status == 200
    assert reply.json() == {"feeds": ["execution", "sport_event"], "via": "access_token", "who": "token#3"}


async def test_header_wins_over_query_token(app: Starlette) -> None:
    reply = await call(app, "GET", "/probe", {"access_token": "tok-all"}, bearer("nope"))
    assert reply.status == 401


async def test_open_mode_serves_everyone_and_says_so(
    base_settings: Settings, redis: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = gateway_settings(base_settings, tokens="")
    app = small_app(settings, redis)
    reply = await call(app, "GET", "/probe")
    assert (reply.status, reply.json()["via"]) == (200, "open")
    with caplog.at_level(logging.INFO, logger=auth.__name__):
        auth.Access(settings).log_mode()
    assert "no tokens configured" in caplog.text and "everyone" in caplog.text


async def test_start_up_line_counts_tokens_and_never_logs_them(
    base_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=auth.__name__):
        auth.Access(gateway_settings(base_settings, tokens=TOKENS)).log_mode()
    [record] = caplog.records
    assert record.tokens == 3  # type: ignore[attr-defined]
    assert record.scopes["token#2"] == "execution"  # type: ignore[attr-defined]
    assert "tok-" not in caplog.text and "tok-" not in json.dumps(vars(record), default=str)


# --- tickets -----------------------------------------------------------------------------


async def test_ticket_is_single_use_and_scoped(app: Starlette, redis: Any, base_settings: Settings) -> None:
    reply = await call(app, "POST", "/v1/tickets", {"feeds": "execution"}, bearer("tok-both"))
    assert reply.status == 201
    body = reply.json()
    assert body["feeds"] == ["execution"] and body["expires_in"] == 30.0
    ticket = body["ticket"]
    assert len(ticket) >= 32
    # stored under a digest with the TTL, never under the ticket itself
    stored = [k async for k in redis.scan_iter(match=Keys(base_settings.key_prefix).ticket("*"))]
    assert len(stored) == 1 and ticket.encode() not in stored[0]
    assert 0 < await redis.pttl(stored[0]) <= 30_000

    # narrowed to execution: asking for sport_event with it is a 403 (and spends it)
    denied = await call(app, "GET", "/probe", {"ticket": ticket, "feeds": "execution,sport_event"})
    assert denied.status == 403 and "this ticket may not read sport_event" in denied.json()["detail"]
    again = await call(app, "GET", "/probe", {"ticket": ticket, "feeds": "execution"})
    assert again.status == 401 and "already used" in again.json()["detail"]

    fresh = (await call(app, "POST", "/v1/tickets", {}, bearer("tok-both"))).json()
    assert fresh["feeds"] == ["execution", "sport_event"]
    ok = await call(app, "GET", "/probe", {"ticket": fresh["ticket"]})
    assert ok.status == 200 and ok.json() == {
        "feeds": ["execution", "sport_event"],
        "via": "ticket",
        "who": "ticket(token#1)",
    }
    assert (await call(app, "GET", "/probe", {"ticket": fresh["ticket"]})).status == 401


async def test_ticket_is_shared_by_gateways_on_the_same_redis(
    base_settings: Settings, redis: Any
) -> None:
    settings = gateway_settings(base_settings, tokens=TOKENS)
    one, two = small_app(settings, redis), small_app(settings, redis)
    ticket = (await call(one, "POST", "/v1/tickets", {}, bearer("tok-exec"))).json()["ticket"]
    assert (await call(two, "GET", "/probe", {"ticket": ticket, "feeds": "execution"})).status == 200
    assert (await call(one, "GET", "/probe", {"ticket": ticket, "feeds": "execution"})).status == 401


async def test_ticket_expires(base_settings: Settings, redis: Any) -> None:
    app = small_app(gateway_settings(base_settings, tokens=TOKENS, ticket_ttl=0.05), redis)
    reply = await call(app, "POST", "/v1/tickets", {}, bearer("tok-exec"))
    assert reply.json()["expires_in"] == 0.05
    key = Keys(base_settings.key_prefix).ticket("*")

    async def gone() -> bool:
        return not [k async for k in redis.scan_iter(match=key)]

    await wait_until(gone)  # Redis expires it; nothing here waits on a clock of its own
    assert (await call(app, "GET", "/probe", {"ticket": reply.json()["ticket"]})).status == 401


async def test_posting_for_a_ticket_needs_the_header(app: Starlette) -> None:
    reply = await call(app, "POST", "/v1/tickets", {"access_token": "tok-all"})
    assert reply.status == 401 and "Authorization: Bearer" in reply.json()["detail"]
    reply = await call(app, "POST", "/v1/tickets", {"feeds": "sport_event"}, bearer("tok-exec"))
    assert reply.status == 403
    reply = await call(app, "POST", "/v1/tickets", {"feeds": "trades"}, bearer("tok-exec"))
    assert reply.status == 404 and "known feeds: execution, sport_event" in reply.json()["detail"]
    reply = await call(app, "GET", "/v1/tickets", {}, bearer("tok-exec"))
    assert reply.status == 405


async def test_tickets_with_redis_down_are_503_not_500(base_settings: Settings) -> None:
    from shared.connections import redis_client

    dead = redis_client("redis://127.0.0.1:1/0")  # nothing listens on port 1
    app = small_app(gateway_settings(base_settings, tokens=TOKENS), dead)
    try:
        reply = await call(app, "POST", "/v1/tickets", {}, bearer("tok-exec"))
        assert reply.status == 503 and reply.headers["retry-after"] == "2"
        reply = await call(app, "GET", "/probe", {"ticket": "x" * 32, "feeds": "execution"})
        assert reply.status == 503 and reply.json()["error"] == "unavailable"
    finally:
        await dead.aclose()


async def test_tokens_and_tickets_never_reach_the_logs(
    app: Starlette, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        ticket = (await call(app, "POST", "/v1/tickets", {}, bearer("tok-both"))).json()["ticket"]
        await call(app, "GET", "/probe", {"ticket": ticket})
        await call(app, "GET", "/probe", {"ticket": ticket})
        await call(app, "GET", "/probe", {"access_token": "tok-exec"})
        await call(app, "GET", "/probe", {"access_token": "wrong-secret"})
    text = caplog.text + json.dumps([vars(r) for r in caplog.records], default=str)
    for secret in ("tok-both", "tok-exec", "wrong-secret", ticket):
        assert secret not in text


# --- CORS ----------------------------------------------------------------------------------


async def test_cors_preflight_and_simple_request(base_settings: Settings, redis: Any) -> None:
    settings = gateway_settings(base_settings, tokens="", cors_origins="https://app.example")
    app = small_app(settings, redis)
    reply = await call(
        app,
        "OPTIONS",
        "/v1/tickets",
        headers={
            "Origin": "https://app.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        },
    )
    assert reply.status == 200
    assert reply.headers["access-control-allow-origin"] == "https://app.example"
    assert "authorization" in reply.headers["access-control-allow-headers"].lower()
    reply = await call(app, "GET", "/probe", headers={"Origin": "https://app.example"})
    assert reply.headers["access-control-allow-origin"] == "https://app.example"
    reply = await call(app, "GET", "/probe", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in reply.headers


async def wait_until(condition: Any, within: float = 10.0) -> None:
    """Poll `condition()` (async) until true, failing after `within` seconds: only for
    states nothing can be awaited on (a key expiring in Redis)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


# --- the real app ------------------------------------------------------------------------------


async def test_the_gateway_app_enforces_access_on_stream_lookup_and_tickets(base_settings: Settings) -> None:
    from services.sse_gateway.app import create_app

    settings = gateway_settings(base_settings, tokens=TOKENS, cors_origins="https://app.example")
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        reply = await call(app, "GET", "/v1/stream")
        assert reply.status == 401 and reply.headers["www-authenticate"] == 'Bearer realm="fanout"'
        assert reply.json()["error"] == "unauthorized"
        reply = await call(app, "GET", "/v1/stream", {"feeds": "sport_event"}, bearer("tok-exec"))
        assert reply.status == 403
        assert reply.json() == {
            "error": "forbidden",
            "detail": "this token may not read sport_event; it may read: execution",
        }
        reply = await call(app, "GET", "/v1/stream", {"feeds": "execution,sport_event", "access_token": "x"})
        assert reply.status == 401 and 'error="invalid_token"' in reply.headers["www-authenticate"]

        reply = await call(app, "GET", "/v1/feeds", {"access_token": "tok-exec"})
        assert reply.status == 200 and [f["name"] for f in reply.json()["feeds"]] == ["execution"]
        assert (await call(app, "GET", "/v1/messages/1.2")).status == 401

        reply = await call(app, "POST", "/v1/tickets", {"feeds": "execution"}, bearer("tok-both"))
        assert reply.status == 201
        ticket = reply.json()["ticket"]
        # a ticket for execution does not open sport_event (and is spent by trying)
        reply = await call(app, "GET", "/v1/stream", {"feeds": "sport_event", "ticket": ticket})
        assert reply.status == 403 and "this ticket may not read sport_event" in reply.json()["detail"]

        reply = await call(
            app, "OPTIONS", "/v1/stream",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "GET",
                     "Access-Control-Request-Headers": "last-event-id"},
        )
        assert reply.status == 200 and reply.headers["access-control-allow-origin"] == "https://app.example"
