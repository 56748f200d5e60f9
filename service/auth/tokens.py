"""Tokens to principals: JWT verification with PyJWT, on the settings' terms only."""

from __future__ import annotations

import time
from typing import Any

import jwt

from service.auth.principal import CHANNELS_CLAIM, EVERYONE, Principal
from service.settings import Settings


class InvalidToken(Exception):
    """A token was refused. `reason` is short and safe to show the client."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# Longer tokens are refused unread: PyJWT checks base64 in a Python loop before the
# signature, so a huge bogus token is a cheap way to make a worker busy. Handshakes are
# capped near this anyway (uvicorn answers 414 to longer request lines).
MAX_TOKEN_LENGTH = 8192

# PyJWT's exceptions, most specific first, to the few words a client is told.
_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token for another audience"),
    (jwt.InvalidIssuerError, "token from another issuer"),
    (jwt.MissingRequiredClaimError, "token lacks a required claim"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.InvalidSignatureError, "bad token signature"),
    (jwt.DecodeError, "malformed token"),
)


class Authenticator:
    """Verifies tokens with the configured key and algorithms and builds principals."""

    def __init__(self, settings: Settings) -> None:
        self._key: Any = None
        if settings.jwt_secret is not None:
            self._key = settings.jwt_secret.get_secret_value()
        elif settings.jwt_public_key_file is not None:
            self._key = settings.jwt_public_key_file.read_text()
        self._enabled = settings.auth_enabled
        # From settings only: the token's own `alg` header is never trusted.
        self._algorithms = list(settings.jwt_algorithms)
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway
        self._anonymous = Principal(
            None, tuple(settings.anonymous_subscribe), tuple(settings.anonymous_publish)
        )
        # A token never gives fewer rights than no token: it adds to the anonymous ones.
        self._granted = (
            tuple(settings.authenticated_subscribe) + self._anonymous.subscribe,
            tuple(settings.authenticated_publish) + self._anonymous.publish,
        )

    @property
    def enabled(self) -> bool:
        """False in development mode (nothing secret configured): everyone may do anything."""
        return self._enabled

    def authenticate(self, token: str | None) -> Principal:
        """The principal of `token` (anonymous without one); raises `InvalidToken`."""
        if not self._enabled:
            return EVERYONE
        if token is None:
            if not (self._anonymous.subscribe or self._anonymous.publish):
                raise InvalidToken("token required")
            return self._anonymous
        return self._verify(token)

    def _verify(self, token: str) -> Principal:
        if self._key is None:
            raise InvalidToken("tokens are not accepted here")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("token too long")
        try:
            claims = jwt.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                # PyJWT then also refuses a token that names an audience when none is
                # configured: a shared identity provider's tokens for other apps.
                options={"require": ["exp"]},
            )
        except jwt.PyJWTError as exc:
            raise InvalidToken(_reason(exc)) from None
        except (UnicodeError, ValueError):
            # Text that is not even encodable, which PyJWT does not wrap.
            raise InvalidToken("malformed token") from None
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise InvalidToken("token lacks a subject")
        subscribe, publish = _channels(claims.get(CHANNELS_CLAIM))
        try:
            expires_at = float(claims["exp"])
        except (OverflowError, TypeError, ValueError):
            raise InvalidToken("token expiry out of range") from None
        return Principal(
            subject, subscribe + self._granted[0], publish + self._granted[1], expires_at
        )


def _reason(exc: jwt.PyJWTError) -> str:
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"


def _channels(claim: object) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if claim is None:
        return (), ()
    if not isinstance(claim, dict):
        raise InvalidToken(f"claim {CHANNELS_CLAIM!r} must be an object")
    lists = []
    for action in ("subscribe", "publish"):
        patterns = claim.get(action, [])
        if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
            raise InvalidToken(f"claim {CHANNELS_CLAIM}.{action} must be a list of patterns")
        lists.append(tuple(patterns))
    return lists[0], lists[1]


def mint(
    settings: Settings,
    subject: str,
    *,
    subscribe: list[str],
    publish: list[str],
    ttl: float,
    private_key: str | None = None,
    now: float | None = None,
) -> str:
    """A token `Authenticator(settings)` accepts: `sub`, `exp`, and the `channels` claim.

    Signed with JWT_SECRET and the first of JWT_ALGORITHMS, or with `private_key` (PEM)
    when the service verifies with JWT_PUBLIC_KEY_FILE. `aud` and `iss` are set when the
    settings require them. For development and tests: production tokens come from the
    backend that knows the users (docs/security.md).
    """
    if not subject:
        raise ValueError("the subject (sub) must not be empty")
    if ttl <= 0:
        raise ValueError("the lifetime (ttl) must be positive")
    if settings.jwt_secret is not None:
        key: Any = settings.jwt_secret.get_secret_value()
    elif settings.jwt_public_key_file is not None:
        if private_key is None:
            raise ValueError(
                "the service verifies tokens with JWT_PUBLIC_KEY_FILE: the private key that "
                "matches it is needed to sign them"
            )
        key = private_key
    else:
        raise ValueError("no JWT_SECRET or JWT_PUBLIC_KEY_FILE is set: tokens are refused")
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {
        "sub": subject,
        "iat": int(issued),
        "exp": int(issued + ttl),
        CHANNELS_CLAIM: {"subscribe": list(subscribe), "publish": list(publish)},
    }
    if settings.jwt_audience is not None:
        claims["aud"] = settings.jwt_audience
    if settings.jwt_issuer is not None:
        claims["iss"] = settings.jwt_issuer
    try:
        return jwt.encode(claims, key, algorithm=settings.jwt_algorithms[0])
    except (ValueError, TypeError, jwt.PyJWTError) as exc:
        raise ValueError(
            f"cannot sign with {settings.jwt_algorithms[0]} and this key: {exc}"
        ) from None
