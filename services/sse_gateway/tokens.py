"""JSON Web Tokens for the gateway, beside the static tokens of FANOUT_TOKENS.

Another backend signs a short-lived token per user; the gateway only verifies it:

- HS256 with a shared secret (FANOUT_JWT_SECRET, at least 32 bytes), or RS256 / ES256
  with a public key (FANOUT_JWT_PUBLIC_KEY, PEM) or a JSON Web Key Set (FANOUT_JWT_JWKS,
  the JSON of `{"keys": [...]}`; a key is picked by the token's `kid`). Every one of these
  can come from a file instead (`<VARIABLE>_FILE`, the Docker/Kubernetes secrets way).
  The algorithm follows from the key: a token whose `alg` does not fit the key is refused.
- `exp` is required (with FANOUT_JWT_LEEWAY of clock skew); `aud` and `iss` are checked
  when FANOUT_JWT_AUDIENCE / FANOUT_JWT_ISSUER are set; `nbf` and `iat` when present.
- The claims say what the token may read:

      {"sub": "user-42", "exp": 1795866195,
       "feeds": ["execution"],                     // or "*" for every feed
       "filters": {"symbol": ["AAPL", "MSFT"]}}    // optional: the widest filters allowed

  `filters` is keyed by the stream's filter parameters (`symbol`, `market`, `sport`). A
  request with no such filter gets the token's; a request asking a value outside it is a
  403 (see `narrow`). Feeds the gateway does not serve are ignored.

Errors never quote the token or a key: `TokenError` says what is wrong with it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from services.sse_gateway import filters
from services.sse_gateway.filters import FilterError, Filters
from shared.feeds import FEED_NAMES
from shared.settings import SettingsError

log = logging.getLogger(__name__)

MIN_SECRET_BYTES = 32  # RFC 7518 3.2: an HS256 key at least as long as the hash
FEEDS_CLAIM = "feeds"
FILTERS_CLAIM = "filters"
_ALGORITHMS = ("HS256", "RS256", "ES256")
# header.payload.signature, each base64url; a JWT's header always starts `{"` = `eyJ`.
_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

FilterRules = tuple[tuple[str, frozenset[str]], ...]  # (query parameter, allowed values), by parameter


class TokenError(Exception):
    """A JWT that is not accepted; the message says why without quoting it."""


class JwtSettings(Protocol):
    """What this module reads from GatewaySettings."""

    @property
    def jwt_secret(self) -> str: ...
    @property
    def jwt_secret_file(self) -> str: ...
    @property
    def jwt_public_key(self) -> str: ...
    @property
    def jwt_public_key_file(self) -> str: ...
    @property
    def jwt_jwks(self) -> str: ...
    @property
    def jwt_jwks_file(self) -> str: ...
    @property
    def jwt_audience(self) -> str: ...
    @property
    def jwt_issuer(self) -> str: ...
    @property
    def jwt_leeway(self) -> float: ...


@dataclass(frozen=True, slots=True)
class JwtConfig:
    """The JWT settings as a hashable value (a cache key: the keys are read once)."""

    jwt_secret: str = ""
    jwt_secret_file: str = ""
    jwt_public_key: str = ""
    jwt_public_key_file: str = ""
    jwt_jwks: str = ""
    jwt_jwks_file: str = ""
    jwt_audience: str = ""
    jwt_issuer: str = ""
    jwt_leeway: float = 30.0

    @classmethod
    def of(cls, settings: JwtSettings) -> JwtConfig:
        return cls(
            settings.jwt_secret,
            settings.jwt_secret_file,
            settings.jwt_public_key,
            settings.jwt_public_key_file,
            settings.jwt_jwks,
            settings.jwt_jwks_file,
            settings.jwt_audience,
            settings.jwt_issuer,
            settings.jwt_leeway,
        )


def secret(value: str, path: str, env: str) -> str:
    """A secret setting given either inline (`env`) or as a file (`env`_FILE), never both.
    The file's text without its trailing newline; errors name the variable, not the value."""
    if value and path:
        raise SettingsError(f"{env} and {env}_FILE are both set: give the secret one way")
    if not path:
        return value
    try:
        return Path(path).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{env}_FILE={path!r}: cannot read it ({type(exc).__name__})") from None


@dataclass(frozen=True, slots=True)
class Claims:
    """What a verified token grants."""

    feeds: frozenset[str]
    filters: FilterRules
    expires: float  # Unix seconds (`exp`)
    subject: str  # for logs: `sub`, or "?" (never the token)


def looks_like_jwt(token: str) -> bool:
    return _SHAPE.fullmatch(token) is not None


@dataclass(frozen=True, slots=True)
class _Key:
    algorithm: str
    key: Any  # bytes (HS256) or a cryptography public key
    kid: str | None = None


def _algorithm_of(public: Any, where: str) -> str:
    if isinstance(public, rsa.RSAPublicKey):
        return "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey):
        if public.curve.name != "secp256r1":
            raise SettingsError(f"{where}: an EC key must be on P-256 for ES256, not {public.curve.name}")
        return "ES256"
    raise SettingsError(f"{where}: expected an RSA (RS256) or P-256 EC (ES256) public key")


def _jwks_keys(text: str, where: str) -> list[_Key]:
    try:
        data = json.loads(text)
        keys = data["keys"]
        assert isinstance(keys, list)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise SettingsError(f'{where}: expected a JSON Web Key Set, {{"keys": [...]}}') from None
    out: list[_Key] = []
    for position, entry in enumerate(keys, start=1):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        try:
            jwk = jwt.PyJWK(entry)
        except jwt.PyJWKError as exc:
            raise SettingsError(f"{where}: key #{position} cannot be used ({exc})") from None
        if jwk.algorithm_name not in _ALGORITHMS or jwk.key_type == "oct":
            raise SettingsError(
                f"{where}: key #{position} is {jwk.key_type}/{jwk.algorithm_name}; "
                "expected RS256 or ES256 keys"
            )
        out.append(_Key(jwk.algorithm_name, jwk.key, entry.get("kid")))
    if not out:
        raise SettingsError(f"{where}: the key set holds no signing key")
    return out


class Verifier:
    """Verifies tokens against the configured keys; built once at start (`from_settings`)."""

    def __init__(
        self,
        keys: Sequence[_Key],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 30.0,
    ) -> None:
        self.keys = list(keys)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway

    @classmethod
    def from_settings(cls, settings: JwtSettings) -> Verifier | None:
        """The verifier the settings describe, or None when no JWT key is configured.
        SettingsError (naming the variable) for a key that cannot be used."""
        keys: list[_Key] = []
        hs = secret(settings.jwt_secret, settings.jwt_secret_file, "FANOUT_JWT_SECRET")
        if hs:
            if len(hs.encode()) < MIN_SECRET_BYTES:
                raise SettingsError(
                    f"FANOUT_JWT_SECRET: an HS256 secret must be at least {MIN_SECRET_BYTES} bytes "
                    "(e.g. `openssl rand -base64 32`)"
                )
            keys.append(_Key("HS256", hs.encode()))
        pem = secret(settings.jwt_public_key, settings.jwt_public_key_file, "FANOUT_JWT_PUBLIC_KEY")
        if pem:
            try:
                public = load_pem_public_key(pem.encode())
            except ValueError:
                raise SettingsError("FANOUT_JWT_PUBLIC_KEY: not a PEM public key") from None
            keys.append(_Key(_algorithm_of(public, "FANOUT_JWT_PUBLIC_KEY"), public))
        jwks = secret(settings.jwt_jwks, settings.jwt_jwks_file, "FANOUT_JWT_JWKS")
        if jwks:
            keys += _jwks_keys(jwks, "FANOUT_JWT_JWKS")
        if not keys:
            return None
        if settings.jwt_leeway < 0:
            raise SettingsError(f"FANOUT_JWT_LEEWAY={settings.jwt_leeway}: expected a duration of 0 or more")
        return cls(
            keys,
            audience=settings.jwt_audience or None,
            issuer=settings.jwt_issuer or None,
            leeway=settings.jwt_leeway,
        )

    def describe(self) -> dict[str, Any]:
        """For the start-up log line: algorithms and checks, never a key."""
        return {
            "jwt_algorithms": sorted({k.algorithm for k in self.keys}),
            "jwt_keys": len(self.keys),
            "jwt_audience": self.audience or "(not checked)",
            "jwt_issuer": self.issuer or "(not checked)",
        }

    def verify(self, token: str) -> Claims:
        """The claims of a valid token; TokenError otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("not a readable JWT") from None
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in _ALGORITHMS:
            raise TokenError(f"JWT algorithm {str(alg)[:16]!r} is not accepted; expected one of the keys'")
        candidates = [k for k in self.keys if k.algorithm == alg and (kid is None or k.kid in (None, kid))]
        if not candidates:
            raise TokenError(f"no configured key verifies {alg} tokens" + (" with this kid" if kid else ""))
        options: dict[str, Any] = {"require": ["exp"], "verify_aud": self.audience is not None}
        if self.issuer is not None:
            options["require"] = ["exp", "iss"]
        failure: jwt.PyJWTError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[key.algorithm],
                    options=options,  # type: ignore[arg-type]
                    audience=self.audience,
                    issuer=self.issuer,
                    leeway=self.leeway,
                )
            except jwt.InvalidSignatureError as exc:
                failure = exc
                continue  # maybe another key of this algorithm (rotation)
            except jwt.PyJWTError as exc:
                raise TokenError(_reason(exc)) from None
            return _claims(claims)
        assert failure is not None
        raise TokenError(_reason(failure))


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"the token lacks the `{exc.claim}` claim"
    if isinstance(exc, jwt.InvalidAudienceError):
        return "the token is not for this audience (`aud`)"
    if isinstance(exc, jwt.InvalidIssuerError):
        return "the token is not from the expected issuer (`iss`)"
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "the token is not valid yet (`nbf`/`iat`)"
    if isinstance(exc, jwt.InvalidSignatureError):
        return "the token's signature does not verify"
    return f"invalid token ({type(exc).__name__})"


def _claims(claims: Mapping[str, Any]) -> Claims:
    raw_feeds = claims.get(FEEDS_CLAIM)
    if raw_feeds == "*":
        feeds = frozenset(FEED_NAMES)
    elif isinstance(raw_feeds, list) and all(isinstance(f, str) for f in raw_feeds):
        feeds = frozenset(f for f in raw_feeds if f in FEED_NAMES)
    else:
        raise TokenError(f'the token\'s `{FEEDS_CLAIM}` claim must be a list of feed names or "*"')
    return Claims(
        feeds=feeds,
        filters=claim_filters(claims.get(FILTERS_CLAIM)),
        expires=float(claims["exp"]),
        subject=str(claims.get("sub", "?"))[:64],
    )


def claim_filters(raw: Any) -> FilterRules:
    """The `filters` claim as rules; TokenError for one that is not `{parameter: [values]}`
    with known parameters and valid values."""
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise TokenError(f"the token's `{FILTERS_CLAIM}` claim must be an object of lists")
    pairs: list[tuple[str, str]] = []
    for name, values in raw.items():
        if name not in filters.PARAMETERS:
            raise TokenError(
                f"the token's `{FILTERS_CLAIM}` names {str(name)[:32]!r}; "
                f"known: {', '.join(filters.PARAMETERS)}"
            )
        if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
            raise TokenError(f"the token's `{FILTERS_CLAIM}.{name}` must be a non-empty list of strings")
        pairs += [(name, v) for v in values]
    try:
        parsed = filters.parse(pairs, FEED_NAMES)
    except FilterError as exc:
        raise TokenError(f"the token's `{FILTERS_CLAIM}`: {exc}") from None
    return rules_of(parsed)


def rules_of(chosen: Filters) -> FilterRules:
    """Filters as (query parameter, values) rules, by parameter."""
    by_field = {(feed, field): name for name, (feed, field) in filters.PARAMETERS.items()}
    out: list[tuple[str, frozenset[str]]] = []
    for feed, rules in chosen.by_feed:
        out += [(by_field[(feed, field)], values) for field, values in rules]
    return tuple(sorted(out))


class FilterNotAllowed(Exception):
    """A request filter wider than the credential's."""


def narrow(requested: Filters, allowed: FilterRules, feeds: Iterable[str]) -> Filters:
    """The filters a subscription gets: the request's, each within the credential's
    `allowed` rules (the request's values must be a subset; none asked means the
    credential's). FilterNotAllowed names the first value outside them."""
    if not allowed:
        return requested
    subscribed = set(feeds)
    pairs: list[tuple[str, str]] = []
    asked = dict(rules_of(requested))
    for name, values in asked.items():
        pairs += [(name, v) for v in sorted(values)]
    for name, permitted in allowed:
        feed, _ = filters.PARAMETERS[name]
        if feed not in subscribed:
            continue
        wanted = asked.get(name)
        if wanted is None:
            pairs += [(name, v) for v in sorted(permitted)]
            continue
        outside = sorted(wanted - permitted)
        if outside:
            raise FilterNotAllowed(
                f"`{name}={outside[0][:64]}` is outside this credential's filter; "
                f"it may ask {name} in: {', '.join(sorted(permitted))}"
            )
    return filters.parse(pairs, subscribed)
