"""JWT verification (services/sse_gateway/tokens.py) with keys made in the test: HS256,
RS256 and ES256 from PEM or a JWKS, `exp` required, `aud`/`iss`, feeds and filters
claims, secrets from files, and errors that never quote a token or a key."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from services.sse_gateway import filters, tokens
from services.sse_gateway.tokens import FilterNotAllowed, JwtConfig, TokenError, Verifier
from shared.settings import SettingsError

SECRET = "s" * 40


def Conf(**settings: Any) -> JwtConfig:
    """The JWT settings as GatewaySettings holds them, no leeway unless asked."""
    return JwtConfig(**({"jwt_leeway": 0.0} | settings))


def pem(public: Any) -> str:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return str(public.public_bytes(serialization.Encoding.PEM, spki).decode())


def claims(**more: Any) -> dict[str, Any]:
    return {"sub": "user-1", "exp": int(time.time()) + 60, "feeds": ["execution"], **more}


def verifier(**conf: Any) -> Verifier:
    made = Verifier.from_settings(Conf(**conf))
    assert made is not None
    return made


def test_no_key_configured_means_no_verifier() -> None:
    assert Verifier.from_settings(Conf()) is None


def test_hs256_token_grants_its_feeds_and_expiry() -> None:
    exp = int(time.time()) + 60
    made = claims(exp=exp, feeds=["execution", "sport_event", "other"])
    token = jwt.encode(made, SECRET, algorithm="HS256")
    assert tokens.looks_like_jwt(token)
    got = verifier(jwt_secret=SECRET).verify(token)
    assert got.feeds == {"execution", "sport_event"}  # a feed this gateway does not serve is ignored
    assert got.expires == exp and got.subject == "user-1" and got.filters == ()
    every = verifier(jwt_secret=SECRET).verify(jwt.encode(claims(feeds="*"), SECRET, algorithm="HS256"))
    assert every.feeds == {"execution", "sport_event"}


def test_a_short_secret_is_refused_at_start() -> None:
    with pytest.raises(SettingsError, match="FANOUT_JWT_SECRET: an HS256 secret must be at least 32 bytes"):
        Verifier.from_settings(Conf(jwt_secret="short"))


@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_rs256_and_es256_from_a_pem_public_key(kind: str) -> None:
    private: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    alg = "RS256" if kind == "rsa" else "ES256"
    check = verifier(jwt_public_key=pem(private.public_key()))
    assert check.verify(jwt.encode(claims(), private, algorithm=alg)).feeds == {"execution"}
    other: Any = (
        rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if kind == "rsa"
        else ec.generate_private_key(ec.SECP256R1())
    )
    with pytest.raises(TokenError, match="signature does not verify"):
        check.verify(jwt.encode(claims(), other, algorithm=alg))
    # HS256 signed with the public key's PEM as the secret (algorithm confusion): refused
    forged = jwt.encode(claims(), "x" * 40, algorithm="HS256")
    with pytest.raises(TokenError, match="no configured key verifies HS256"):
        check.verify(forged)


def test_jwks_file_picks_the_key_by_kid(tmp_path: Path) -> None:
    first = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    second = ec.generate_private_key(ec.SECP256R1())
    keys = []
    for kid, private, alg in (("k1", first, "RS256"), ("k2", second, "ES256")):
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(private.public_key()))
        keys.append({**jwk, "kid": kid, "use": "sig"})
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": keys}))
    check = verifier(jwt_jwks_file=str(path))
    assert check.describe()["jwt_algorithms"] == ["ES256", "RS256"]
    for kid, private, alg in (("k1", first, "RS256"), ("k2", second, "ES256")):
        token = jwt.encode(claims(), private, algorithm=alg, headers={"kid": kid})
        assert check.verify(token).feeds == {"execution"}
    wrong_kid = jwt.encode(claims(), first, algorithm="RS256", headers={"kid": "k2"})
    with pytest.raises(TokenError):
        check.verify(wrong_kid)


def test_exp_is_required_and_enforced_with_leeway() -> None:
    check = verifier(jwt_secret=SECRET, jwt_leeway=5.0)
    no_exp = {k: v for k, v in claims().items() if k != "exp"}
    with pytest.raises(TokenError, match="lacks the `exp` claim"):
        check.verify(jwt.encode(no_exp, SECRET, algorithm="HS256"))
    with pytest.raises(TokenError, match="has expired"):
        check.verify(jwt.encode(claims(exp=int(time.time()) - 30), SECRET, algorithm="HS256"))
    # within the leeway: accepted
    assert check.verify(jwt.encode(claims(exp=int(time.time()) - 2), SECRET, algorithm="HS256"))


def test_audience_and_issuer_checked_when_configured() -> None:
    check = verifier(jwt_secret=SECRET, jwt_audience="fanout", jwt_issuer="https://auth.example.com")
    good = claims(aud="fanout", iss="https://auth.example.com")
    assert check.verify(jwt.encode(good, SECRET, algorithm="HS256"))
    with pytest.raises(TokenError, match="audience"):
        check.verify(jwt.encode({**good, "aud": "other"}, SECRET, algorithm="HS256"))
    with pytest.raises(TokenError, match="issuer"):
        check.verify(jwt.encode({**good, "iss": "https://evil.example.com"}, SECRET, algorithm="HS256"))
    with pytest.raises(TokenError, match="lacks the `iss` claim"):
        check.verify(jwt.encode({k: v for k, v in good.items() if k != "iss"}, SECRET, algorithm="HS256"))
    # not configured: a token with an aud is still accepted
    assert verifier(jwt_secret=SECRET).verify(jwt.encode(good, SECRET, algorithm="HS256"))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"feeds": "execution"}, "must be a list of feed names"),
        ({"filters": ["AAPL"]}, "must be an object of lists"),
        ({"filters": {"colour": ["red"]}}, "names 'colour'"),
        ({"filters": {"symbol": []}}, "non-empty list of strings"),
        ({"filters": {"sport": ["CHESS"]}}, "unknown sport"),
    ],
)
def test_bad_claims_are_invalid_tokens(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(TokenError, match=message):
        verifier(jwt_secret=SECRET).verify(jwt.encode(claims(**extra), SECRET, algorithm="HS256"))


def test_a_token_limited_to_a_filter_cannot_widen_it() -> None:
    token = jwt.encode(claims(filters={"symbol": ["AAPL", "MSFT"]}), SECRET, algorithm="HS256")
    allowed = verifier(jwt_secret=SECRET).verify(token).filters
    assert allowed == (("symbol", frozenset({"AAPL", "MSFT"})),)
    feeds = ("execution", "sport_event")
    # no filter asked: the token's
    default = tokens.narrow(filters.parse([], feeds), allowed, feeds)
    assert default.matches("execution", {"symbol": "MSFT"})
    assert not default.matches("execution", {"symbol": "TSLA"})
    # narrower: kept, with the other filters asked
    asked = filters.parse([("symbol", "AAPL"), ("market", "NASDAQ")], feeds)
    got = tokens.narrow(asked, allowed, feeds)
    assert got.matches("execution", {"symbol": "AAPL", "market": "NASDAQ"})
    assert not got.matches("execution", {"symbol": "MSFT", "market": "NASDAQ"})
    # wider: refused, naming the value
    with pytest.raises(FilterNotAllowed, match="`symbol=TSLA` is outside"):
        tokens.narrow(filters.parse([("symbol", "AAPL"), ("symbol", "TSLA")], feeds), allowed, feeds)
    # a subscription without the filtered feed is not filtered
    assert not tokens.narrow(filters.parse([], ("sport_event",)), allowed, ("sport_event",))


def test_secrets_come_from_files_and_never_both_ways(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    check = verifier(jwt_secret_file=str(path))
    assert check.verify(jwt.encode(claims(), SECRET, algorithm="HS256"))
    with pytest.raises(SettingsError, match="FANOUT_JWT_SECRET and FANOUT_JWT_SECRET_FILE are both set"):
        Verifier.from_settings(Conf(jwt_secret=SECRET, jwt_secret_file=str(path)))
    with pytest.raises(SettingsError, match=r"FANOUT_JWT_PUBLIC_KEY_FILE=.*cannot read it"):
        Verifier.from_settings(Conf(jwt_public_key_file=str(tmp_path / "missing.pem")))
    with pytest.raises(SettingsError, match="FANOUT_JWT_PUBLIC_KEY: not a PEM public key"):
        Verifier.from_settings(Conf(jwt_public_key="-----BEGIN PUBLIC KEY-----\nnope\n"))


def test_errors_never_quote_the_token_or_the_key() -> None:
    token = jwt.encode(claims(exp=int(time.time()) - 100), SECRET, algorithm="HS256")
    with pytest.raises(TokenError) as caught:
        verifier(jwt_secret=SECRET).verify(token)
    assert token not in str(caught.value) and SECRET not in str(caught.value)
    assert not tokens.looks_like_jwt("s3cret")
