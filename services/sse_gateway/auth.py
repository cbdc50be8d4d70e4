"""Who may read which feed: bearer tokens scoped to feeds, JWTs, single-use tickets, CORS.

Static tokens come from `GatewaySettings.tokens` (FANOUT_TOKENS, or the file named by
FANOUT_TOKENS_FILE):

    FANOUT_TOKENS="s3cret=execution+sport_event;t0k=execution;ops=*"

Each `TOKEN=FEEDS` pair names the feeds the token may read, joined by `+`; `*` is
every feed. Beside them, JSON Web Tokens signed by another backend (`tokens.py`:
FANOUT_JWT_SECRET, FANOUT_JWT_PUBLIC_KEY or FANOUT_JWT_JWKS) name their feeds, and
optionally the widest filters, in their claims, and expire (`exp`). With neither
configured the gateway serves everyone (and says so at start-up, see
`Access.log_mode`); the settings allow that only on a loopback address.

A request presents its token in one of three ways, checked in this order:

- `Authorization: Bearer <token>`;
- `?access_token=<token>` (EventSource cannot set headers);
- `?ticket=<ticket>`: a short-lived, single-use ticket got with
  `POST /v1/tickets` carrying the token as a Bearer header, so the long-lived token
  never appears in a URL or an access log. The ticket lives in Redis under
  `Keys.ticket(<sha256 of the ticket>)` with a TTL and is redeemed with GETDEL, so
  several gateways behind a load balancer share tickets and each is used once.
  A browser that reconnects by itself reuses the URL, so a ticket suits one
  connection: get a new ticket and reconnect with `?last_event_id=` to resume.
  A ticket carries its credential's feeds, filters and expiry, and never outlives it.

No credential (or an unknown one) is a 401 with `WWW-Authenticate: Bearer`; a valid
credential for a feed it may not read is a 403; both carry a JSON body
`{"error": ..., "detail": ...}`. Tokens, JWTs, keys and tickets are never logged: a
static token is named in logs by its position in FANOUT_TOKENS (`token#2`), a JWT by
its subject (`jwt:<sub>`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.sse_gateway import tokens as jwts
from services.sse_gateway.tokens import FilterRules, JwtConfig, JwtSettings, TokenError, Verifier
from shared.feeds import FEED_NAMES
from shared.keys import Keys
from shared.settings import SettingsError

log = logging.getLogger(__name__)

REALM = "fanout"


class AccessSettings(JwtSettings, Protocol):
    """What this module reads from GatewaySettings."""

    @property
    def tokens(self) -> str: ...
    @property
    def tokens_file(self) -> str: ...
    @property
    def ticket_ttl(self) -> float: ...
    @property
    def cors_origins(self) -> str: ...
    @property
    def key_prefix(self) -> str: ...


@dataclass(frozen=True, slots=True)
class Grant:
    """What a request may read, and how it proved it (for logs: never the secret)."""

    feeds: frozenset[str]
    via: str  # "open", "bearer", "access_token" or "ticket"
    who: str  # "anyone", "token#N", "jwt:<sub>", or "ticket(<who>)"
    filters: FilterRules = ()  # the widest filters allowed (a JWT's `filters` claim); () none
    expires: float | None = None  # Unix seconds: the stream ends then (a JWT's `exp`)


class AccessError(HTTPException):
    """A 401 or 403 (or 503 when tickets cannot be checked), rendered as JSON.

    Its `detail` is the JSON body, `{"error": ..., "detail": ...}`, so the app's
    HTTPException handler renders it as is; `message` is the human-readable part."""

    def __init__(self, status_code: int, error: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(status_code, message, dict(headers) if headers else None)
        self.error = error
        self.message = message
        self.detail = self.body()  # type: ignore[assignment]

    def __str__(self) -> str:
        return f"{self.status_code} {self.error}: {self.message}"

    def body(self) -> dict[str, str]:
        return {"error": self.error, "detail": self.message}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


async def access_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette exception handler: `exception_handlers={AccessError: access_error_handler}`."""
    assert isinstance(exc, AccessError)
    return exc.response()


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class _Token:
    feeds: frozenset[str]
    name: str  # token#N, by position in FANOUT_TOKENS


@lru_cache(maxsize=8)
def parse_tokens(text: str) -> dict[str, _Token]:
    """`TOKEN=feed+feed;TOKEN2=*` -> {sha256(token): _Token}. Errors name the pair by
    position, never quoting the token."""
    tokens: dict[str, _Token] = {}
    for position, pair in enumerate((p.strip() for p in text.split(";")), start=1):
        if not pair:
            continue
        where = f"FANOUT_TOKENS pair #{position}"
        token, sep, scope = pair.partition("=")
        token, scope = token.strip(), scope.strip()
        if not sep or not token:
            raise SettingsError(f"{where}: expected TOKEN=FEED+FEED or TOKEN=*")
        if not scope:
            raise SettingsError(
                f"{where}: names no feed; expected feeds joined by + ({'+'.join(FEED_NAMES)}) or *"
            )
        if scope == "*":
            feeds = frozenset(FEED_NAMES)
        else:
            names = [n.strip() for n in scope.split("+")]
            unknown = [n for n in names if n not in FEED_NAMES]
            if unknown:
                raise SettingsError(
                    f"{where}: unknown feed(s) {', '.join(map(repr, unknown))}; "
                    f"known feeds: {', '.join(FEED_NAMES)}"
                )
            feeds = frozenset(names)
        digest = _digest(token)
        if digest in tokens:
            raise SettingsError(f"{where}: the same token is configured twice")
        tokens[digest] = _Token(feeds, f"token#{position}")
    return tokens


def parse_origins(text: str) -> list[str]:
    """FANOUT_CORS_ORIGINS: `*`, or origins separated by commas (or spaces)."""
    origins = [o.strip().rstrip("/") for o in text.replace(",", " ").split()]
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise SettingsError(
                f"FANOUT_CORS_ORIGINS: {origin!r} is not an origin; expected * or URLs like https://app.example.com"
            )
    return origins


def middleware(settings: AccessSettings) -> list[Middleware]:
    """The middleware for `Starlette(middleware=...)`: CORS when origins are configured."""
    origins = parse_origins(settings.cors_origins)
    if not origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "OPTIONS"],
            allow_headers=["Authorization", "Last-Event-ID", "Content-Type"],
            expose_headers=["Retry-After"],
            max_age=600,
        )
    ]


def _unauthorized(detail: str, invalid: bool) -> AccessError:
    challenge = f'Bearer realm="{REALM}"' + (', error="invalid_token"' if invalid else "")
    return AccessError(401, "unauthorized", detail, {"WWW-Authenticate": challenge})


@lru_cache(maxsize=8)
def _tokens_text(value: str, path: str) -> str:
    """FANOUT_TOKENS, or the text of FANOUT_TOKENS_FILE (read once per process)."""
    return jwts.secret(value, path, "FANOUT_TOKENS")


@lru_cache(maxsize=8)
def _verifier(config: JwtConfig) -> Verifier | None:
    """The JWT verifier of the settings (keys read and parsed once per process)."""
    return Verifier.from_settings(config)


class Access:
    """Access control for one gateway. Cheap to build per request (parsing is cached)."""

    def __init__(self, settings: AccessSettings) -> None:
        self.settings = settings
        self.tokens = parse_tokens(_tokens_text(settings.tokens, settings.tokens_file).strip())
        self.jwt = _verifier(JwtConfig.of(settings))
        self.keys = Keys(settings.key_prefix)

    @property
    def open(self) -> bool:
        return not self.tokens and self.jwt is None

    def log_mode(self) -> None:
        """The start-up line saying who may read what (never the tokens themselves)."""
        if self.open:
            log.warning(
                "access control off: no tokens configured (FANOUT_TOKENS) and no JWT key (FANOUT_JWT_*): "
                "every feed is served to everyone (open mode, for localhost only)",
                extra={"auth": "open"},
            )
            return
        scopes = {t.name: "+".join(sorted(t.feeds)) for t in self.tokens.values()}
        log.info(
            "access control on: "
            + ("bearer tokens" if self.tokens else "")
            + (" and " if self.tokens and self.jwt else "")
            + ("JWTs" if self.jwt else "")
            + " (header, access_token or single-use tickets) required",
            extra={
                "auth": "+".join(n for n, on in (("tokens", self.tokens), ("jwt", self.jwt)) if on),
                "tokens": len(self.tokens),
                "scopes": scopes,
                **(self.jwt.describe() if self.jwt else {}),
            },
        )

    async def authenticate(self, request: Request) -> Grant:
        """The grant of the request's credential; 401 if it has none or an unknown one."""
        if self.open:
            return Grant(frozenset(FEED_NAMES), "open", "anyone")
        header = request.headers.get("authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise _unauthorized("the Authorization header must be `Bearer <token>`", invalid=True)
            return self._token_grant(token.strip(), "bearer")
        query_token = request.query_params.get("access_token")
        if query_token:
            return self._token_grant(query_token, "access_token")
        ticket = request.query_params.get("ticket")
        if ticket:
            return await self._redeem(request, ticket)
        raise _unauthorized(
            "a token is required: send `Authorization: Bearer <token>`, `?access_token=<token>`, "
            "or `?ticket=<ticket>` from POST /v1/tickets",
            invalid=False,
        )

    async def check(self, request: Request, feeds: Iterable[str]) -> Grant:
        """Authenticate, then require every feed in `feeds`: 401 or 403 otherwise."""
        grant = await self.authenticate(request)
        wanted = list(feeds)
        denied = [f for f in wanted if f not in grant.feeds]
        if denied:
            log.info(
                "access denied",
                extra={"who": grant.who, "via": grant.via, "denied": denied, "path": request.url.path},
            )
            raise AccessError(
                403,
                "forbidden",
                f"this {'ticket' if grant.via == 'ticket' else 'token'} may not read "
                f"{', '.join(denied)}; it may read: {', '.join(sorted(grant.feeds)) or 'nothing'}",
                {"WWW-Authenticate": f'Bearer realm="{REALM}", error="insufficient_scope"'},
            )
        return grant

    def _token_grant(self, token: str, via: str) -> Grant:
        found = self.tokens.get(_digest(token))
        if found is not None:
            return Grant(found.feeds, via, found.name)
        if self.jwt is not None and jwts.looks_like_jwt(token):
            try:
                claims = self.jwt.verify(token)
            except TokenError as exc:
                log.info("JWT refused", extra={"via": via, "reason": str(exc)})
                raise _unauthorized(str(exc), invalid=True) from None
            return Grant(claims.feeds, via, f"jwt:{claims.subject}", claims.filters, claims.expires)
        log.info("unknown token presented", extra={"via": via})
        raise _unauthorized("unknown token", invalid=True)

    async def issue_ticket(
        self, redis: Redis, grant: Grant, feeds: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """A new single-use ticket for `feeds` (default: all of the grant's feeds)."""
        scope = sorted(grant.feeds if feeds is None else set(feeds))
        ticket = secrets.token_urlsafe(24)
        ttl = self.settings.ticket_ttl
        if grant.expires is not None:  # a ticket never outlives its credential
            ttl = min(ttl, grant.expires - time.time())
        ttl_ms = max(1, int(ttl * 1000))
        filters = {name: sorted(values) for name, values in grant.filters}
        value = json.dumps({"feeds": scope, "who": grant.who, "filters": filters, "expires": grant.expires})
        await redis.set(self.keys.ticket(_digest(ticket)), value, px=ttl_ms)
        log.info("ticket issued", extra={"who": grant.who, "feeds": scope, "ttl_s": ttl_ms / 1000})
        expires_at = None
        if grant.expires is not None:
            expires_at = datetime.fromtimestamp(grant.expires, UTC).isoformat().replace("+00:00", "Z")
        return {
            "ticket": ticket,
            "expires_in": ttl_ms / 1000,
            "feeds": scope,
            "filters": filters,
            "expires_at": expires_at,
        }

    async def _redeem(self, request: Request, ticket: str) -> Grant:
        redis: Redis = request.app.state.redis
        try:
            raw = await redis.getdel(self.keys.ticket(_digest(ticket)))
        except RedisError as exc:
            log.warning("cannot redeem a ticket: Redis unreachable", extra={"error": str(exc)})
            raise AccessError(
                503, "unavailable", "tickets cannot be checked right now (Redis unreachable); retry",
                {"Retry-After": "2"},
            ) from None
        if raw is None:
            raise _unauthorized(
                "unknown, expired or already used ticket; get a new one with POST /v1/tickets", invalid=True
            )
        data = json.loads(raw)
        rules: FilterRules = tuple(sorted((k, frozenset(v)) for k, v in (data.get("filters") or {}).items()))
        expires = data.get("expires")
        return Grant(
            frozenset(data["feeds"]),
            "ticket",
            f"ticket({data.get('who', '?')})",
            rules,
            None if expires is None else float(expires),
        )


def requested_feeds(request: Request) -> list[str] | None:
    """`?feeds=a,b` (also repeatable) as a list, None if absent; 404 JSON on an unknown feed."""
    values = request.query_params.getlist("feeds")
    if not values:
        return None
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in FEED_NAMES]
    if unknown:
        raise AccessError(
            404, "unknown_feed", f"unknown feed(s) {', '.join(unknown)}; known feeds: {', '.join(FEED_NAMES)}"
        )
    return list(dict.fromkeys(names))


async def post_ticket(request: Request) -> Response:
    """POST /v1/tickets (Bearer token; optional `?feeds=` to narrow) -> {ticket, expires_in, feeds}."""
    access = getattr(request.app.state, "access", None) or Access(request.app.state.settings)
    try:
        if not access.open and "authorization" not in request.headers:
            # Tickets exist to keep tokens out of URLs: only the header is accepted here.
            raise _unauthorized("POST /v1/tickets needs `Authorization: Bearer <token>`", invalid=False)
        wanted = requested_feeds(request)
        grant = await access.check(request, wanted or ())
        body = await access.issue_ticket(request.app.state.redis, grant, wanted)
    except AccessError as exc:
        return exc.response()
    except RedisError as exc:
        log.warning("cannot issue a ticket: Redis unreachable", extra={"error": str(exc)})
        return JSONResponse(
            {"error": "unavailable", "detail": "tickets cannot be issued now (Redis unreachable); retry"},
            status_code=503,
            headers={"Retry-After": "2"},
        )
    return JSONResponse(body, status_code=201, headers={"Cache-Control": "no-store"})


routes = [Route("/v1/tickets", post_ticket, methods=["POST"])]
