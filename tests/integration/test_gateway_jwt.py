"""JWT access to the SSE gateway against the real Redis, with keys made in the test: a
token's feeds and filters as a Bearer header, `?access_token=` and through a ticket; a
filter claim cannot be widened; a stream ends at the token's expiry with `event: expired`
and a fresh token resumes it exactly; keys from files (JWKS, PEM); secrets never logged;
open mode only on localhost."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.sse_gateway import contract
from services.sse_gateway.settings import GatewaySettings
from shared.keys import Keys
from shared.settings import Settings, SettingsError
from tests.integration.test_gateway_access import bearer, call, gateway_settings
from tests.integration.test_gateway_helpers import Writer, inprocess_gateway, open_stream

SECRET = "jwt-test-secret-" + "x" * 24  # 40 bytes
STATIC = "static-tok"


def token(
    feeds: Any = ("execution",),
    *,
    exp_in: float = 60,
    key: Any = SECRET,
    alg: str = "HS256",
    headers: dict[str, str] | None = None,
    **claims: Any,
) -> str:
    body = {
        "sub": "user-7",
        "exp": int(time.time() + exp_in),
        "feeds": feeds if isinstance(feeds, str) else list(feeds),
    }
    return jwt.encode({**body, **claims}, key, algorithm=alg, headers=headers)


@pytest.fixture
async def gateway(base_settings: Settings) -> AsyncIterator[Any]:
    settings = gateway_settings(base_settings, tokens=f"{STATIC}=*", jwt_secret=SECRET, heartbeat=1.0)
    async with inprocess_gateway(settings) as app:
        yield app


async def test_a_jwt_as_bearer_or_access_token_reads_its_feeds_only(
    gateway: Any, redis: Any, base_settings: Settings
) -> None:
    writer = Writer(redis, base_settings.key_prefix)
    await writer.append("execution", 3)
    port = gateway.state.port
    good = token(["execution"])
    ways: list[tuple[str, dict[str, str]]] = [("", bearer(good)), (f"&access_token={good}", {})]
    for extra, headers in ways:
        stream = await open_stream(port, "feeds=execution&from=earliest" + extra, headers=headers)
        assert stream.status == 200
        events = await stream.collect(3, feeds=["execution"])
        assert [e.json()["seq"] for e in events] == [1, 2, 3]
        stream.close()

    denied = await open_stream(port, "feeds=sport_event", headers=bearer(good))
    assert denied.status == 403
    assert json.loads(denied.body)["detail"] == "this token may not read sport_event; it may read: execution"

    for bad, reason in (
        (token(exp_in=-120), "the token has expired"),
        (token(key="another-secret-" + "y" * 30), "the token's signature does not verify"),
        (token(feeds="execution"), "must be a list of feed names"),
    ):
        refused = await open_stream(port, "feeds=execution", headers=bearer(bad))
        assert refused.status == 401 and 'error="invalid_token"' in refused.headers["www-authenticate"]
        assert reason in json.loads(refused.body)["detail"]
    # the static tokens still work beside the JWTs
    assert (await call(gateway, "GET", "/v1/feeds", {"access_token": STATIC})).status == 200
    every = await call(gateway, "GET", "/v1/feeds", headers=bearer(token("*")))
    assert [f["name"] for f in every.json()["feeds"]] == ["execution", "sport_event"]


async def test_a_filter_claim_cannot_be_widened(gateway: Any, redis: Any, base_settings: Settings) -> None:
    writer = Writer(redis, base_settings.key_prefix)
    await writer.append("execution", 6)  # symbols AAPL, MSFT, TSLA in turn by seq
    port = gateway.state.port
    limited = bearer(token(["execution", "sport_event"], filters={"symbol": ["AAPL", "MSFT"]}))

    wider = await open_stream(port, "feeds=execution&symbol=AAPL&symbol=TSLA", headers=limited)
    assert wider.status == 403
    assert "`symbol=TSLA` is outside this credential's filter" in json.loads(wider.body)["detail"]

    # no filter asked: the token's; the cursor still moves over what it hides (id-only frames)
    stream = await open_stream(port, "from=earliest", headers=limited)
    assert stream.status == 200
    events = await stream.collect(4, feeds=["execution"])
    assert {e.json()["symbol"] for e in events} == {"AAPL", "MSFT"}
    stream.close()
    # narrower, with another filter: fine
    narrow = await open_stream(
        port, "feeds=execution&from=earliest&symbol=MSFT&market=NASDAQ", headers=limited
    )
    assert narrow.status == 200
    narrow.close()
    # the history page keeps the same rule
    page = await call(gateway, "GET", "/v1/feeds/execution/messages", {"symbol": "TSLA"}, limited)
    assert page.status == 403


async def test_a_ticket_carries_the_tokens_feeds_filters_and_expiry(
    gateway: Any, redis: Any, base_settings: Settings
) -> None:
    writer = Writer(redis, base_settings.key_prefix)
    await writer.append("execution", 3)
    credential = bearer(token(["execution"], exp_in=20, filters={"symbol": ["AAPL"]}))
    reply = await call(gateway, "POST", "/v1/tickets", {}, credential)
    assert reply.status == 201
    body = reply.json()
    assert body["feeds"] == ["execution"] and body["filters"] == {"symbol": ["AAPL"]}
    assert body["expires_at"] is not None and body["expires_in"] <= 20  # never outlives the token
    [key] = [k async for k in redis.scan_iter(match=Keys(base_settings.key_prefix).ticket("*"))]
    assert 0 < await redis.pttl(key) <= 20_000

    wider = await open_stream(gateway.state.port, f"feeds=execution&symbol=MSFT&ticket={body['ticket']}")
    assert wider.status == 403
    fresh = (await call(gateway, "POST", "/v1/tickets", {}, credential)).json()["ticket"]
    stream = await open_stream(gateway.state.port, f"feeds=execution&from=earliest&ticket={fresh}")
    assert stream.status == 200
    [event] = await stream.collect(1, feeds=["execution"])
    assert event.json()["symbol"] == "AAPL"
    stream.close()
    # a ticket for a token that is already past its exp cannot be had
    late = await call(gateway, "POST", "/v1/tickets", {}, bearer(token(exp_in=-100)))
    assert late.status == 401


@pytest.mark.parametrize("http", ["h11", "stream-protocol"])
async def test_an_expired_token_ends_the_live_stream_with_an_expired_event_then_a_fresh_one_resumes(
    http: str, redis: Any, base_settings: Settings
) -> None:
    from services.sse_gateway.protocol import StreamProtocol

    settings = gateway_settings(base_settings, tokens=f"{STATIC}=*", jwt_secret=SECRET, heartbeat=1.0)
    protocol = StreamProtocol if http == "stream-protocol" else "h11"
    async with inprocess_gateway(settings, http=protocol) as app:
        await _expired_then_resumed(app.state.port, redis, base_settings)


async def _expired_then_resumed(port: int, redis: Any, base_settings: Settings) -> None:
    """The live path ends at exp with `event: expired` (whichever way live chunks are
    written: ASGI sends, or straight to the socket), and a fresh token resumes exactly."""
    writer = Writer(redis, base_settings.key_prefix)
    await writer.append("execution", 1)
    short = token(["execution"], exp_in=4)
    stream = await open_stream(port, "feeds=execution", headers=bearer(short))
    assert stream.status == 200
    await writer.append("execution", 2)
    seen = await stream.collect(2, feeds=["execution"])
    assert [e.json()["seq"] for e in seen] == [2, 3]
    while (event := await stream.next(within=30)).event != "expired":
        pass
    contract.validate_event("expired", event.data)
    assert event.json()["reason"] == "token_expired"
    assert await stream.rest() == b""  # it was the last frame: the stream ended

    await writer.append("execution", 2)
    assert stream.last_id is not None
    again = await open_stream(
        port, "feeds=execution", headers={**bearer(token(["execution"])), "Last-Event-ID": stream.last_id}
    )
    assert again.status == 200
    resumed = await again.collect(2, feeds=["execution"])
    assert [e.json()["seq"] for e in resumed] == [4, 5]  # exactly the next seq, nothing repeated
    again.close()


def _pem(public: Any) -> str:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return str(public.public_bytes(serialization.Encoding.PEM, spki).decode())


async def test_rs256_from_a_jwks_file_and_es256_from_a_pem_file(
    base_settings: Settings, tmp_path: Path
) -> None:
    from services.sse_gateway.app import create_app

    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [{**jwk, "kid": "r1", "use": "sig"}]}))
    (tmp_path / "ec.pem").write_text(_pem(ec_key.public_key()))
    settings = gateway_settings(
        base_settings,
        jwt_jwks_file=str(tmp_path / "jwks.json"),
        jwt_public_key_file=str(tmp_path / "ec.pem"),
        jwt_audience="fanout",
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        rs = token(key=rsa_key, alg="RS256", headers={"kid": "r1"}, aud="fanout")
        es = token(["sport_event"], key=ec_key, alg="ES256", aud="fanout")
        assert [
            f["name"] for f in (await call(app, "GET", "/v1/feeds", headers=bearer(rs))).json()["feeds"]
        ] == ["execution"]
        assert [
            f["name"] for f in (await call(app, "GET", "/v1/feeds", headers=bearer(es))).json()["feeds"]
        ] == ["sport_event"]
        no_aud = token(key=rsa_key, alg="RS256", headers={"kid": "r1"})
        reply = await call(app, "GET", "/v1/feeds", headers=bearer(no_aud))
        assert reply.status == 401 and "`aud`" in reply.json()["detail"]
        # HS256 is not configured here: a token signed with a secret is refused
        assert (await call(app, "GET", "/v1/feeds", headers=bearer(token()))).status == 401


async def test_secrets_and_tokens_never_reach_the_logs(
    base_settings: Settings, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    from services.sse_gateway.app import create_app

    (tmp_path / "tokens").write_text(f"{STATIC}=execution\n")
    (tmp_path / "secret").write_text(SECRET + "\n")
    settings = gateway_settings(
        base_settings, tokens_file=str(tmp_path / "tokens"), jwt_secret_file=str(tmp_path / "secret")
    )
    good, expired = token(), token(exp_in=-100)
    with caplog.at_level(logging.DEBUG):
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            assert (await call(app, "GET", "/v1/feeds", headers=bearer(good))).status == 200
            assert (await call(app, "GET", "/v1/feeds", {"access_token": STATIC})).status == 200
            assert (await call(app, "GET", "/v1/feeds", {"access_token": expired})).status == 401
            ticket = (await call(app, "POST", "/v1/tickets", {}, bearer(good))).json()["ticket"]
            assert (
                await call(app, "GET", "/v1/stream", {"feeds": "sport_event", "ticket": ticket})
            ).status == 403
    text = caplog.text + json.dumps([vars(r) for r in caplog.records], default=str)
    assert "jwt" in text.lower()  # the start-up line says JWTs are accepted...
    for secret in (SECRET, STATIC, good, expired, ticket):
        assert secret not in text  # ...and names none of the secrets


def test_open_mode_only_on_localhost(base_settings: Settings) -> None:
    values = {f: getattr(base_settings, f) for f in ("redis_url", "database_url", "key_prefix")}
    local, public = ("127.0.0.1", 8000), ("0.0.0.0", 8000)
    GatewaySettings(**values, gateway_listen=local)  # `fanout up`, `./dev run`: fine, and said at start
    with pytest.raises(SettingsError, match=r"FANOUT_GATEWAY_LISTEN=0\.0\.0\.0:8000 with no credential"):
        GatewaySettings(**values, gateway_listen=public)
    GatewaySettings(**values, gateway_listen=public, tokens="t=*")
    GatewaySettings(**values, gateway_listen=public, jwt_secret=SECRET)
    GatewaySettings(**values, gateway_listen=public, allow_open=True)


def test_credential_settings_that_name_nothing_are_refused(base_settings: Settings, tmp_path: Path) -> None:
    from services.sse_gateway.app import create_app

    (tmp_path / "tokens").write_text("\n")
    with pytest.raises(SettingsError, match="name no token and no key"):
        create_app(gateway_settings(base_settings, tokens_file=str(tmp_path / "tokens")))
