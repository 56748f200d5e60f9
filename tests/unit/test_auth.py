"""Auth without sockets: tokens to principals, channel patterns, API keys, origins, settings.

Tokens are real ones, signed by PyJWT (or forged by hand where PyJWT refuses to help an
attacker), with keys generated here by `cryptography`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from pydantic import SecretStr, ValidationError

from service.auth import EVERYONE, ApiKeys, Authenticator, InvalidToken, Principal, origin_allowed
from service.auth.principal import matches_any
from service.settings import PLACEHOLDER_SECRETS, Settings

SECRET = "unit-test-secret-0123456789abcdef-ZYXW"  # 38 characters, no placeholder
OTHER_SECRET = "another-secret-0123456789abcdef-VUTS"
LONG_SECRET = "long-secret-" + "0123456789abcdef" * 3 + "ABCD"  # 64 characters
AUDIENCE = "broadcast"
ISSUER = "https://issuer.example"
MISSING: Any = object()  # `claims(sub=MISSING)` leaves the claim out


def make(**values: object) -> Settings:
    return Settings.model_validate(values)


# --- tokens -----------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: object) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims(**changes: Any) -> dict[str, Any]:
    """Good claims: alice, expiring in 5 minutes, with a channels claim; `changes` override."""
    values: dict[str, Any] = {
        "sub": "alice",
        "exp": int(time.time()) + 300,
        "channels": {"subscribe": ["chat:*"], "publish": ["chat:lobby"]},
    }
    values.update(changes)
    return {name: value for name, value in values.items() if value is not MISSING}


def hmac_signed(header: object, payload_segment: str, key: bytes) -> str:
    """An HS256 token made by hand (PyJWT refuses some keys and payloads an attacker uses)."""
    signing_input = f"{segment(header)}.{payload_segment}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def unsigned(alg: str, payload: dict[str, Any]) -> str:
    """An `alg: none` token: header, payload and an empty signature."""
    return f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(payload)}."


def hs(payload: dict[str, Any], key: str = SECRET, algorithm: str = "HS256") -> str:
    with warnings.catch_warnings():
        # An attacker's HS512 token under SECRET: PyJWT warns that 38 bytes are short for it.
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(payload, key, algorithm=algorithm)


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Keys:
    """Key pairs for the public-key algorithms, the verifying halves written as PEM files."""

    rsa_key: rsa.RSAPrivateKey
    other_rsa: rsa.RSAPrivateKey
    ec_key: ec.EllipticCurvePrivateKey
    other_ec: ec.EllipticCurvePrivateKey
    rsa_file: Path
    ec_file: Path


@pytest.fixture(scope="module")
def key_pairs() -> tuple[Any, ...]:
    """Generated once: RSA generation is the slowest step of this module."""
    return (
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )


@pytest.fixture
def keys(key_pairs: tuple[Any, ...], tmp_path: Path) -> Keys:
    rsa_key, other_rsa, ec_key, other_ec = key_pairs
    rsa_file = tmp_path / "rsa.pem"
    rsa_file.write_bytes(public_pem(rsa_key))
    ec_file = tmp_path / "ec.pem"
    ec_file.write_bytes(public_pem(ec_key))
    return Keys(rsa_key, other_rsa, ec_key, other_ec, rsa_file, ec_file)


def config(kind: str, keys: Keys) -> dict[str, Any]:
    """Settings verifying tokens of `kind`: HS256, HS256+aud+iss, RS256 or ES256."""
    if kind == "HS256":
        return {"jwt_secret": SECRET}
    if kind == "HS256+aud+iss":
        return {"jwt_secret": SECRET, "jwt_audience": AUDIENCE, "jwt_issuer": ISSUER}
    if kind == "RS256":
        return {"jwt_public_key_file": str(keys.rsa_file), "jwt_algorithms": ["RS256"]}
    if kind == "ES256":
        return {"jwt_public_key_file": str(keys.ec_file), "jwt_algorithms": ["ES256"]}
    raise AssertionError(kind)


def sign(kind: str, keys: Keys, payload: dict[str, Any]) -> str:
    """A token that the settings of `config(kind)` accept (given good claims)."""
    if kind == "RS256":
        return jwt.encode(payload, keys.rsa_key, algorithm="RS256")
    if kind == "ES256":
        return jwt.encode(payload, keys.ec_key, algorithm="ES256")
    return hs(payload)


def assert_safe_reason(exc: InvalidToken, token: str) -> None:
    """The reason goes to the client and the log: short, and without the token or a key."""
    reason = exc.reason
    assert str(exc) == reason
    assert 0 < len(reason) <= 60
    assert SECRET not in reason
    assert "BEGIN" not in reason
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in reason
    # `from None`: a logged traceback does not carry PyJWT's own (longer) message either.
    assert exc.__cause__ is None
    assert exc.__context__ is None or exc.__suppress_context__


# --- valid tokens -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["HS256", "RS256", "ES256"])
def test_a_valid_token_becomes_a_principal_with_its_channels(kind: str, keys: Keys) -> None:
    settings = make(
        **config(kind, keys),
        authenticated_subscribe=["public:*"],
        authenticated_publish=["echo:*"],
        anonymous_subscribe=["anon:*"],
    )
    payload = claims()
    principal = Authenticator(settings).authenticate(sign(kind, keys, payload))
    assert principal.subject == "alice"
    assert not principal.anonymous
    assert principal.expires_at == float(payload["exp"])
    assert principal.subscribe == ("chat:*", "public:*", "anon:*")
    assert principal.publish == ("chat:lobby", "echo:*")
    assert principal.may_subscribe("chat:general")
    assert principal.may_subscribe("public:news")
    assert principal.may_subscribe("anon:x")  # a token never has fewer rights than none
    assert not principal.may_subscribe("private:x")
    assert principal.may_publish("chat:lobby")
    assert principal.may_publish("echo:1")
    assert not principal.may_publish("chat:general")


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms_when_configured(algorithm: str) -> None:
    secret = LONG_SECRET  # 64 bytes: what PyJWT expects of HS512 (48 of HS384)
    authenticator = Authenticator(make(jwt_secret=secret, jwt_algorithms=["HS256", algorithm]))
    token = hs(claims(), key=secret, algorithm=algorithm)
    assert authenticator.authenticate(token).subject == "alice"
    assert authenticator.authenticate(hs(claims(), key=secret)).subject == "alice"


@pytest.mark.parametrize(("algorithm", "length"), [("HS384", 47), ("HS512", 63)])
def test_hmac_secrets_shorter_than_the_hash_are_refused_in_production(
    algorithm: str, length: int
) -> None:
    # PyJWT (2.15) warns (InsecureKeyLengthWarning, RFC 7518 3.2) on every decode with an
    # HS384 key under 48 bytes or an HS512 key under 64; the settings let them through (only
    # 32 characters are checked), so the workers would warn per token, and any code run
    # with warnings as errors (as this suite is) would crash instead of verifying.
    with pytest.raises(ValidationError, match="JWT_SECRET"):
        make(jwt_secret="x" * length, jwt_algorithms=[algorithm])


@pytest.mark.parametrize("channels", [MISSING, {}, {"subscribe": []}])
def test_without_channels_a_token_gets_only_the_authenticated_patterns(channels: Any) -> None:
    settings = make(jwt_secret=SECRET, authenticated_subscribe=["public:*"])
    principal = Authenticator(settings).authenticate(hs(claims(channels=channels)))
    assert principal.subscribe == ("public:*",)
    assert principal.publish == ()
    assert not principal.may_publish("public:news")


def test_unknown_claims_are_ignored() -> None:
    token = hs(claims(name="Alice", roles=["admin"], channels={"subscribe": [], "extra": 1}))
    principal = Authenticator(make(jwt_secret=SECRET)).authenticate(token)
    assert principal.subject == "alice"
    assert principal.subscribe == ()


def test_expired_within_the_leeway_is_accepted() -> None:
    exp = int(time.time()) - 5
    principal = Authenticator(make(jwt_secret=SECRET, jwt_leeway=60)).authenticate(
        hs(claims(exp=exp))
    )
    assert principal.expires_at == float(exp)


def test_expired_without_leeway_is_refused() -> None:
    authenticator = Authenticator(make(jwt_secret=SECRET, jwt_leeway=0))
    with pytest.raises(InvalidToken, match=r"^token expired$"):
        authenticator.authenticate(hs(claims(exp=int(time.time()) - 5)))


def test_not_before_within_the_leeway_is_accepted() -> None:
    authenticator = Authenticator(make(jwt_secret=SECRET, jwt_leeway=60))
    assert authenticator.authenticate(hs(claims(nbf=int(time.time()) + 5))).subject == "alice"


def test_audience_is_not_required_when_not_configured() -> None:
    authenticator = Authenticator(make(jwt_secret=SECRET))
    assert authenticator.authenticate(hs(claims())).subject == "alice"
    assert authenticator.authenticate(hs(claims(iss="anyone"))).subject == "alice"


@pytest.mark.parametrize("aud", [AUDIENCE, [AUDIENCE, "other"]])
def test_configured_audience_and_issuer_are_accepted(aud: object) -> None:
    settings = make(jwt_secret=SECRET, jwt_audience=AUDIENCE, jwt_issuer=ISSUER)
    principal = Authenticator(settings).authenticate(hs(claims(aud=aud, iss=ISSUER)))
    assert principal.subject == "alice"


# --- bad tokens -------------------------------------------------------------------------


@dataclass(frozen=True)
class BadToken:
    """A token `config(kind)` must refuse, and the reason the client is told."""

    kind: str
    token: Callable[[Keys], str]
    reason: str


MALFORMED = "malformed token"
BAD_SIGNATURE = "bad token signature"
NOT_ALLOWED = "token algorithm not allowed"
HS256_HEADER = {"alg": "HS256", "typ": "JWT"}

BAD_TOKENS = [
    # malformed
    pytest.param(BadToken("HS256", lambda k: "not-a-token", MALFORMED), id="garbage"),
    pytest.param(BadToken("HS256", lambda k: "", MALFORMED), id="empty-string"),
    pytest.param(BadToken("HS256", lambda k: "abc.def", MALFORMED), id="two-segments"),
    pytest.param(BadToken("HS256", lambda k: hs(claims()) + ".x", MALFORMED), id="four-segments"),
    pytest.param(BadToken("HS256", lambda k: "!!!.???.***", MALFORMED), id="bad-base64"),
    pytest.param(BadToken("HS256", lambda k: "\u00e9.\u00e9.\u00e9", MALFORMED), id="non-ascii"),
    pytest.param(
        BadToken("HS256", lambda k: f"{b64url(b'{nope')}.{segment(claims())}.", MALFORMED),
        id="header-not-json",
    ),
    pytest.param(
        BadToken("HS256", lambda k: f"{segment(['HS256'])}.{segment(claims())}.", MALFORMED),
        id="header-not-object",
    ),
    pytest.param(
        BadToken(
            "HS256",
            lambda k: hmac_signed(HS256_HEADER, b64url(b"{nope"), SECRET.encode()),
            MALFORMED,
        ),
        id="payload-not-json",
    ),
    pytest.param(
        BadToken(
            "HS256",
            lambda k: hmac_signed(HS256_HEADER, segment(["alice"]), SECRET.encode()),
            MALFORMED,
        ),
        id="payload-not-object",
    ),
    # signatures
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(), key=OTHER_SECRET), BAD_SIGNATURE),
        id="other-secret",
    ),
    pytest.param(
        BadToken(
            "HS256",
            # Keep alice's signature, give her every channel.
            lambda k: ".".join(
                (
                    hs(claims()).split(".")[0],
                    segment(claims(channels={"subscribe": ["*"], "publish": ["*"]})),
                    hs(claims()).split(".")[2],
                )
            ),
            BAD_SIGNATURE,
        ),
        id="tampered-payload",
    ),
    pytest.param(
        BadToken("HS256", lambda k: hs(claims()).rsplit(".", 1)[0] + ".", BAD_SIGNATURE),
        id="signature-stripped",
    ),
    pytest.param(
        BadToken("RS256", lambda k: jwt.encode(claims(), k.other_rsa, "RS256"), BAD_SIGNATURE),
        id="RS256-other-key",
    ),
    pytest.param(
        BadToken("ES256", lambda k: jwt.encode(claims(), k.other_ec, "ES256"), BAD_SIGNATURE),
        id="ES256-other-key",
    ),
    # algorithms: only the configured ones, whatever the token's header says
    pytest.param(BadToken("HS256", lambda k: unsigned("none", claims()), NOT_ALLOWED), id="none"),
    pytest.param(BadToken("HS256", lambda k: unsigned("None", claims()), NOT_ALLOWED), id="None"),
    pytest.param(BadToken("HS256", lambda k: unsigned("NONE", claims()), NOT_ALLOWED), id="NONE"),
    pytest.param(
        BadToken("RS256", lambda k: unsigned("none", claims()), NOT_ALLOWED), id="RS-none"
    ),
    pytest.param(
        BadToken("HS256", lambda k: jwt.encode(claims(), "", algorithm="none"), NOT_ALLOWED),
        id="pyjwt-none",
    ),
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(), algorithm="HS512"), NOT_ALLOWED),
        id="HS512-not-configured",
    ),
    pytest.param(
        BadToken(
            "RS256",
            # Key confusion: the public key (which anyone may have) used as an HMAC secret.
            lambda k: hmac_signed(HS256_HEADER, segment(claims()), public_pem(k.rsa_key)),
            NOT_ALLOWED,
        ),
        id="RS256-key-confusion",
    ),
    pytest.param(
        BadToken(
            "ES256",
            lambda k: hmac_signed(HS256_HEADER, segment(claims()), public_pem(k.ec_key)),
            NOT_ALLOWED,
        ),
        id="ES256-key-confusion",
    ),
    pytest.param(
        BadToken("RS256", lambda k: jwt.encode(claims(), k.rsa_key, "PS256"), NOT_ALLOWED),
        id="PS256-same-key-not-configured",
    ),
    pytest.param(
        BadToken("ES256", lambda k: jwt.encode(claims(), k.rsa_key, "RS256"), NOT_ALLOWED),
        id="RS256-on-ES256",
    ),
    # time
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(exp=int(time.time()) - 60)), "token expired"),
        id="expired-beyond-leeway",
    ),
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(nbf=int(time.time()) + 60)), "token not yet valid"),
        id="nbf-in-future",
    ),
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(iat=int(time.time()) + 3600)), "token not yet valid"),
        id="iat-in-future",
    ),
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(exp=MISSING)), "token lacks a required claim"),
        id="missing-exp",
    ),
    pytest.param(BadToken("HS256", lambda k: hs(claims(exp="soon")), MALFORMED), id="exp-not-int"),
    # audience and issuer, when configured
    pytest.param(
        BadToken(
            "HS256+aud+iss",
            lambda k: hs(claims(aud="elsewhere", iss=ISSUER)),
            "token for another audience",
        ),
        id="wrong-aud",
    ),
    pytest.param(
        BadToken("HS256+aud+iss", lambda k: hs(claims(iss=ISSUER)), "token lacks a required claim"),
        id="missing-aud",
    ),
    pytest.param(
        BadToken(
            "HS256+aud+iss",
            lambda k: hs(claims(aud=AUDIENCE, iss="https://evil.example")),
            "token from another issuer",
        ),
        id="wrong-iss",
    ),
    pytest.param(
        BadToken(
            "HS256+aud+iss", lambda k: hs(claims(aud=AUDIENCE)), "token lacks a required claim"
        ),
        id="missing-iss",
    ),
    # subject
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(sub=MISSING)), "token lacks a subject"),
        id="missing-sub",
    ),
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(sub="")), "token lacks a subject"), id="empty-sub"
    ),
    pytest.param(BadToken("HS256", lambda k: hs(claims(sub=42)), "invalid token"), id="int-sub"),
    # channels claim
    pytest.param(
        BadToken(
            "HS256",
            lambda k: hs(claims(channels=["chat:*"])),
            "claim 'channels' must be an object",
        ),
        id="channels-list",
    ),
    pytest.param(
        BadToken("HS256", lambda k: hs(claims(channels="*")), "claim 'channels' must be an object"),
        id="channels-string",
    ),
    pytest.param(
        BadToken(
            "HS256",
            lambda k: hs(claims(channels={"subscribe": "chat:*"})),
            "claim channels.subscribe must be a list of patterns",
        ),
        id="subscribe-string",
    ),
    pytest.param(
        BadToken(
            "HS256",
            lambda k: hs(claims(channels={"subscribe": None})),
            "claim channels.subscribe must be a list of patterns",
        ),
        id="subscribe-null",
    ),
    pytest.param(
        BadToken(
            "HS256",
            lambda k: hs(claims(channels={"subscribe": [], "publish": ["ok", 1]})),
            "claim channels.publish must be a list of patterns",
        ),
        id="publish-not-strings",
    ),
]


@pytest.mark.parametrize("case", BAD_TOKENS)
def test_bad_tokens_are_refused_with_a_short_reason(case: BadToken, keys: Keys) -> None:
    # Anonymous access is on: a bad token must not fall back to it.
    settings = make(**config(case.kind, keys), anonymous_subscribe=["*"])
    token = case.token(keys)
    with pytest.raises(InvalidToken) as caught:
        Authenticator(settings).authenticate(token)
    assert caught.value.reason == case.reason
    assert_safe_reason(caught.value, token)


def test_the_same_claims_pass_when_well_signed(keys: Keys) -> None:
    # Guards the table above: its refusals come from the flaw under test, not the claims.
    for kind in ("HS256", "RS256", "ES256"):
        assert (
            Authenticator(make(**config(kind, keys)))
            .authenticate(sign(kind, keys, claims()))
            .subject
            == "alice"
        )
    with_aud = Authenticator(make(**config("HS256+aud+iss", keys)))
    assert with_aud.authenticate(hs(claims(aud=AUDIENCE, iss=ISSUER))).subject == "alice"


def test_a_token_that_is_not_utf8_encodable_is_refused_not_crashed() -> None:
    # `authenticate` promises InvalidToken for any bad token; a lone surrogate (possible in
    # a Python str, though not from today's callers: orjson and starlette never make one)
    # makes PyJWT's `token.encode("utf-8")` raise UnicodeEncodeError instead.
    authenticator = Authenticator(make(jwt_secret=SECRET))
    with pytest.raises(InvalidToken):
        authenticator.authenticate("\ud800.\ud800.\ud800")


def test_missing_token_is_refused_without_anonymous_patterns() -> None:
    with pytest.raises(InvalidToken, match=r"^token required$") as caught:
        Authenticator(make(jwt_secret=SECRET)).authenticate(None)
    assert_safe_reason(caught.value, "")


def test_tokens_are_refused_when_only_api_keys_are_configured() -> None:
    authenticator = Authenticator(make(api_keys=["k" * 40]))
    assert authenticator.enabled
    with pytest.raises(InvalidToken, match=r"^tokens are not accepted here$"):
        authenticator.authenticate(hs(claims()))
    with pytest.raises(InvalidToken, match=r"^token required$"):
        authenticator.authenticate(None)


def test_a_key_file_that_is_not_a_public_key_is_refused_at_startup(tmp_path: Path) -> None:
    # A wrong file (a certificate, a truncated copy, the wrong path's contents) must stop the
    # worker at startup. Accepted, it refuses every token as "invalid token" at run time,
    # which looks like a client's fault rather than the operator's.
    key_file = tmp_path / "key.pem"
    key_file.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    with pytest.raises(ValueError, match="JWT_PUBLIC_KEY_FILE"):
        Authenticator(make(jwt_public_key_file=str(key_file), jwt_algorithms=["RS256"]))


# --- anonymous and auth off -------------------------------------------------------------


def test_no_token_with_anonymous_patterns_is_anonymous() -> None:
    settings = make(jwt_secret=SECRET, anonymous_subscribe=["public:*"])
    principal = Authenticator(settings).authenticate(None)
    assert principal.anonymous
    assert principal.subject is None
    assert principal.expires_at is None
    assert principal.may_subscribe("public:news")
    assert not principal.may_subscribe("private:x")
    assert not principal.may_subscribe("public")
    assert not principal.may_publish("public:news")


def test_anonymous_publish_alone_lets_a_token_less_connection_in() -> None:
    principal = Authenticator(
        make(jwt_secret=SECRET, anonymous_publish=["guestbook"])
    ).authenticate(None)
    assert principal.may_publish("guestbook")
    assert not principal.may_subscribe("guestbook")


def test_a_token_gets_the_anonymous_patterns_too() -> None:
    # Logging in must not take away what a visitor without a token may do.
    settings = make(jwt_secret=SECRET, anonymous_subscribe=["public:*"])
    principal = Authenticator(settings).authenticate(hs(claims(channels=MISSING)))
    assert principal.may_subscribe("public:news")
    assert not principal.may_publish("public:news")


@pytest.mark.parametrize("token", [None, "", "garbage", "a.b.c", "eyJhbGciOiJub25lIn0.e30."])
@pytest.mark.parametrize("extra", [{}, {"anonymous_subscribe": ["public:*"]}])
def test_with_auth_off_everyone_may_do_anything(token: str | None, extra: dict[str, Any]) -> None:
    settings = make(**extra)
    assert not settings.auth_enabled
    authenticator = Authenticator(settings)
    assert not authenticator.enabled
    assert authenticator.authenticate(token) is EVERYONE


def test_with_auth_off_a_signed_token_is_not_even_read() -> None:
    assert Authenticator(make()).authenticate(hs(claims(), key=OTHER_SECRET)) is EVERYONE
    assert EVERYONE.may_subscribe("any:thing")
    assert EVERYONE.may_publish("any:thing")


# --- channel patterns -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "channel", "allowed"),
    [
        (("*",), "anything", True),
        (("*",), "a:b:c", True),
        (("chat",), "chat", True),
        (("chat",), "chat:x", False),
        (("chat",), "chatroom", False),
        (("chat",), "xchat", False),
        (("chat",), "Chat", False),
        (("chat:*",), "chat:a", True),
        (("chat:*",), "chat:a:b", True),
        (("chat:*",), "chat", False),
        (("chat:*",), "chatx:a", False),
        (("chat:*",), "CHAT:a", False),
        (("chat:*",), "x:chat:a", False),
        (("*:news",), "public:news", True),
        (("*:news",), "public:news:old", False),
        (("room:*:read",), "room:1:read", True),
        (("room:*:read",), "room:1:write", False),
        (("a", "b:*"), "b:1", True),
        (("a", "b:*"), "a", True),
        (("a", "b:*"), "c", False),
        ((), "anything", False),
        ((), "", False),
    ],
)
def test_channel_patterns(patterns: tuple[str, ...], channel: str, allowed: bool) -> None:
    subscriber = Principal("u", subscribe=patterns, publish=())
    publisher = Principal("u", subscribe=(), publish=patterns)
    assert subscriber.may_subscribe(channel) is allowed
    assert publisher.may_publish(channel) is allowed
    assert not subscriber.may_publish(channel)
    assert not publisher.may_subscribe(channel)


def regex_semantics(channel: str, patterns: tuple[str, ...]) -> bool:
    """What patterns meant when they were matched as a regex, each `*` turned into `.*`.

    For channel names, which hold no newline (`validate_channel`): `.*` stopped at one.
    """
    alternatives = [".*".join(map(re.escape, pattern.split("*"))) for pattern in patterns]
    return any(re.fullmatch(alternative, channel) for alternative in alternatives)


@pytest.mark.parametrize(
    ("patterns", "channel", "allowed"),
    [
        (("*",), "", True),
        (("**",), "x", True),
        (("",), "", True),
        (("",), "a", False),
        (("user:4?",), "user:42", False),
        (("user:4?",), "user:4?", True),
        (("[ab]",), "a", False),
        (("[ab]",), "[ab]", True),
        (("a.c",), "abc", False),
        (("a\\*",), "a\\b", True),
        (("ab*ba",), "aba", False),  # prefix and suffix may not overlap
        (("ab*ba",), "abba", True),
        (("*ab*b",), "ab", False),  # nor a middle part and the suffix
        (("*ab*b",), "abb", True),
        (("a*b*c",), "acbc", True),
        (("a*b*c",), "acb", False),
        (("a*", "*z"), "bz", True),
        (("a*", "*z"), "ba", False),
    ],
)
def test_channel_pattern_edge_cases(patterns: tuple[str, ...], channel: str, allowed: bool) -> None:
    assert regex_semantics(channel, patterns) is allowed  # the cases are what it always did
    assert matches_any(channel, patterns) is allowed


# Two letters (and `*`), so that patterns and channels often nearly match; or a few
# more: every character the old regex treated specially. No newline: no channel name
# holds one.
FEW, MORE = "ab", "ab:*?[.\\"
PATTERN_TEXT = st.text(alphabet=FEW + "*", max_size=8) | st.text(alphabet=MORE, max_size=12)
CHANNEL_TEXT = st.text(alphabet=FEW, max_size=12) | st.text(alphabet=MORE, max_size=16)


@given(patterns=st.lists(PATTERN_TEXT, max_size=4).map(tuple), channel=CHANNEL_TEXT)
@hypothesis_settings(max_examples=2000, deadline=None)
def test_channel_patterns_mean_what_they_meant_as_a_regex(
    patterns: tuple[str, ...], channel: str
) -> None:
    assert matches_any(channel, patterns) is regex_semantics(channel, patterns)


def test_every_short_pattern_means_what_it_meant_as_a_regex() -> None:
    # All of them, up to 6 characters of `a`, `b` and `*`, against every channel of up
    # to 6 letters: the near misses (overlapping parts, a part just too late) included.
    def words(alphabet: str, longest: int) -> list[str]:
        return ["".join(w) for n in range(longest + 1) for w in product(alphabet, repeat=n)]

    channels = words(FEW, 6)
    for pattern in words(FEW + "*", 6):
        for channel in channels:
            expected = regex_semantics(channel, (pattern,))
            assert matches_any(channel, (pattern,)) is expected, (pattern, channel)


@given(pattern=PATTERN_TEXT, data=st.data())
@hypothesis_settings(max_examples=500, deadline=None)
def test_a_channel_built_from_a_pattern_matches_it(pattern: str, data: st.DataObject) -> None:
    # Random channels rarely match a pattern with several parts: build ones that do, by
    # filling each `*` with a run of characters (no newline: `*` never matched one).
    fillers = data.draw(
        st.lists(
            st.text(alphabet="ab:", max_size=5),
            min_size=pattern.count("*"),
            max_size=pattern.count("*"),
        )
    )
    parts = pattern.split("*")
    channel = parts[0] + "".join(
        filler + part for filler, part in zip(fillers, parts[1:], strict=True)
    )
    assert regex_semantics(channel, (pattern,))
    assert matches_any(channel, (pattern,))


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("pattern", "channel", "allowed"),
    [
        # Found by attacking a worker: as a regex, the first pattern stalled it for over
        # 30 s on a subscribe to a 128-character channel name, the second for seconds
        # (here on a longer name, past the timeout), and one more `*:` for tens of seconds.
        pytest.param("a*a*a*a*a*a*a*a*a*a*b", "a" * 128, False, id="ten-a-stars-then-b"),
        pytest.param("*:*:*:*:*:x", ":" * 200, False, id="five-colon-stars-then-x"),
        pytest.param("*:*:*:*:*:*:x", ":" * 128, False, id="six-colon-stars-then-x"),
        pytest.param("*a*a*a*a*a*b*", "a" * 128, False, id="b-in-the-middle"),
        pytest.param("*a" * 64 + "*", "a" * 128, True, id="64-parts-that-fit"),
        pytest.param("*a" * 129 + "*", "a" * 128, False, id="129-parts-that-do-not"),
        pytest.param("*" * 4000 + "b", "a" * 10_000, False, id="4000-stars"),
        pytest.param("*ab" * 1000 + "*", "ab" * 5000, True, id="1000-parts-long-channel"),
    ],
)
def test_patterns_with_many_stars_are_matched_without_backtracking(
    pattern: str, channel: str, allowed: bool
) -> None:
    principal = Principal("mallory", subscribe=(pattern,), publish=(pattern, "x"))
    assert principal.may_subscribe(channel) is allowed
    assert principal.may_publish(channel) is allowed


# --- API keys ---------------------------------------------------------------------------

KEY_OLD = "old-key-0123456789abcdefghijklmnop"
KEY_NEW = "new-key-ZYXWVUTSRQPONMLKJIHGFEDCBA"


@pytest.mark.parametrize("presented", [KEY_OLD, KEY_NEW])
def test_every_key_of_a_rotation_is_accepted(presented: str) -> None:
    assert ApiKeys([SecretStr(KEY_OLD), SecretStr(KEY_NEW)]).check(presented)


@pytest.mark.parametrize(
    "presented",
    [
        None,
        "",
        "wrong",
        KEY_OLD[:-1],
        KEY_OLD[:8],
        KEY_OLD + "x",
        KEY_OLD.upper(),
        f" {KEY_OLD}",
        f"{KEY_OLD} ",
        KEY_OLD + KEY_NEW,
        "\u043a\u043b\u044e\u0447",
    ],
)
def test_other_keys_are_refused(presented: str | None) -> None:
    assert not ApiKeys([SecretStr(KEY_OLD), SecretStr(KEY_NEW)]).check(presented)


def test_no_keys_accept_nothing() -> None:
    keys = ApiKeys([])
    assert not keys.check(None)
    assert not keys.check("")
    assert not keys.check(KEY_OLD)


def test_api_keys_from_settings() -> None:
    keys = ApiKeys(make(api_keys=[KEY_OLD, KEY_NEW]).api_keys)
    assert keys.check(KEY_NEW)
    assert not keys.check("**********")


# --- origins ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("origin", "host", "allowed", "expected"),
    [
        (None, "svc.example:8000", [], True),
        (None, None, [], True),
        ("http://svc.example:8000", "svc.example:8000", [], True),
        ("https://svc.example", "svc.example", [], True),
        ("HTTP://SVC.Example:8000", "svc.example:8000", [], True),
        ("http://svc.example:8000", "SVC.EXAMPLE:8000", [], True),
        ("http://svc.example:8000/", "svc.example:8000", [], True),
        ("http://svc.example:8001", "svc.example:8000", [], False),
        ("http://svc.example", "svc.example:8000", [], False),
        ("http://evil.example", "svc.example", [], False),
        ("http://svc.example.evil.example", "svc.example", [], False),
        ("http://evil.example@svc.example", "svc.example", [], False),
        ("http://svc.example", None, [], False),
        ("null", "svc.example", [], False),
        ("null", "null", [], False),
        ("ws://svc.example", "svc.example", [], False),
        ("file://svc.example", "svc.example", [], False),
        ("svc.example", "svc.example", [], False),
        ("https://app.example", "svc.example", ["https://app.example"], True),
        ("https://app.example", "svc.example", ["https://app.example/"], True),
        ("https://app.example/", "svc.example", ["https://app.example"], True),
        ("https://app.example:8443", "svc.example", ["https://app.example"], False),
        ("http://app.example", "svc.example", ["https://app.example"], False),
        ("https://evil.example", "svc.example", ["https://app.example"], False),
        ("http://svc.example", "svc.example", ["https://app.example"], True),
        ("https://evil.example", "svc.example", ["*"], True),
        ("null", "svc.example", ["*"], True),
    ],
)
def test_origins(origin: str | None, host: str | None, allowed: list[str], expected: bool) -> None:
    assert origin_allowed(origin, host, allowed) is expected


# --- settings ---------------------------------------------------------------------------


@pytest.mark.parametrize("placeholder", [*sorted(PLACEHOLDER_SECRETS), "  ChangeMe  "])
def test_placeholder_secrets_are_refused_in_production(placeholder: str) -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        make(jwt_secret=placeholder)
    with pytest.raises(ValidationError, match="placeholder"):
        make(api_keys=[KEY_OLD, placeholder])


def test_a_long_enough_placeholder_is_allowed_in_development() -> None:
    # The compose demo's secret; shorter placeholders fail the length rule everywhere.
    placeholder = "dev-secret-do-not-use-in-production-0123456789"
    development = make(jwt_secret=placeholder, api_keys=[placeholder], environment="development")
    assert development.jwt_secret is not None
    assert development.jwt_secret.get_secret_value() == placeholder


def test_secrets_shorter_than_the_hash_are_refused_everywhere() -> None:
    # PyJWT warns on every decode with a shorter key (RFC 7518 3.2): no environment wants that.
    for environment in ("production", "development"):
        with pytest.raises(ValidationError, match="at least 32 bytes"):
            make(jwt_secret="x" * 31, environment=environment)
        with pytest.raises(ValidationError, match="at least 32 bytes"):
            make(jwt_secret=" " * 40, environment=environment)
    assert make(jwt_secret="x" * 32).auth_enabled


def test_short_api_keys_are_refused() -> None:
    with pytest.raises(ValidationError, match="at least 16 characters"):
        make(api_keys=["short"])
    with pytest.raises(ValidationError, match="at least 16 characters"):
        make(api_keys=[""])


def test_an_unknown_environment_is_refused() -> None:
    with pytest.raises(ValidationError, match="environment"):
        make(environment="staging")


@pytest.mark.parametrize("algorithms", [["HS256"], ["RS256", "HS256"], ["HS512"]])
def test_hmac_algorithms_with_a_public_key_are_refused(algorithms: list[str], keys: Keys) -> None:
    # With HS* allowed, the (public) key would verify HMACs that anyone can compute.
    with pytest.raises(ValidationError, match="public-key algorithms"):
        make(jwt_public_key_file=str(keys.rsa_file), jwt_algorithms=algorithms)


@pytest.mark.parametrize("algorithms", [["RS256"], ["ES256"], ["HS256", "RS256"], ["EdDSA"]])
def test_public_key_algorithms_with_a_secret_are_refused(algorithms: list[str]) -> None:
    with pytest.raises(ValidationError, match="only HS256/HS384/HS512"):
        make(jwt_secret=SECRET, jwt_algorithms=algorithms)


def test_a_secret_and_a_key_file_together_are_refused(keys: Keys) -> None:
    with pytest.raises(ValidationError, match="not both"):
        make(jwt_secret=SECRET, jwt_public_key_file=str(keys.rsa_file), jwt_algorithms=["RS256"])


def test_a_missing_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a PEM public key"):
        make(jwt_public_key_file=str(tmp_path / "absent.pem"), jwt_algorithms=["RS256"])


def test_a_key_that_cannot_verify_the_algorithms_is_refused(keys: Keys) -> None:
    with pytest.raises(ValidationError, match="RSA key, which cannot verify ES256"):
        make(jwt_public_key_file=str(keys.rsa_file), jwt_algorithms=["RS256", "ES256"])


@pytest.mark.parametrize(
    "algorithms", [["none"], ["None"], ["HS256", "none"], ["hs256"], ["HS1024"], ["RSA"], []]
)
def test_unknown_algorithms_are_refused(algorithms: list[str]) -> None:
    with pytest.raises(ValidationError, match="JWT_ALGORITHMS"):
        make(jwt_secret=SECRET, jwt_algorithms=algorithms)


@pytest.mark.parametrize("algorithms", [["RS256"], ["RS256", "PS256"]])
def test_public_key_algorithms_with_a_key_file_are_accepted(
    algorithms: list[str], keys: Keys
) -> None:
    settings = make(jwt_public_key_file=str(keys.rsa_file), jwt_algorithms=algorithms)
    assert settings.jwt_enabled
    assert settings.jwt_public_key_file == keys.rsa_file


def test_empty_jwt_values_mean_unset() -> None:
    settings = make(jwt_secret="", jwt_public_key_file="", jwt_audience="", jwt_issuer="")
    assert settings.jwt_secret is None
    assert settings.jwt_public_key_file is None
    assert settings.jwt_audience is None
    assert settings.jwt_issuer is None
    assert not settings.auth_enabled


def test_empty_jwt_secret_in_the_environment_means_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("JWT_SECRET", "")
    assert Settings().jwt_secret is None
    monkeypatch.delenv("JWT_SECRET")
    # The conftest runs each test in its tmp_path, so this is the .env that Settings reads.
    (tmp_path / ".env").write_text("JWT_SECRET=\nJWT_PUBLIC_KEY_FILE=\n")
    from_file = Settings()
    assert from_file.jwt_secret is None
    assert from_file.jwt_public_key_file is None
    assert not from_file.auth_enabled


def test_handover_json_keeps_the_secrets_and_model_dump_json_masks_them() -> None:
    settings = make(jwt_secret=SECRET, api_keys=[KEY_OLD, KEY_NEW], jwt_audience=AUDIENCE)
    handed_over = Settings.model_validate_json(settings.handover_json())
    assert handed_over.jwt_secret is not None
    assert handed_over.jwt_secret.get_secret_value() == SECRET
    assert [key.get_secret_value() for key in handed_over.api_keys] == [KEY_OLD, KEY_NEW]
    assert handed_over == settings
    dumped = settings.model_dump_json()
    for secret in (SECRET, KEY_OLD, KEY_NEW):
        assert secret not in dumped
        assert secret not in repr(settings)
    assert json.loads(dumped)["jwt_secret"] == "**********"


def test_handover_json_round_trips_without_secrets_and_with_a_key_file(keys: Keys) -> None:
    for settings in (
        make(),
        make(jwt_public_key_file=str(keys.ec_file), jwt_algorithms=["ES256"]),
    ):
        handed_over = Settings.model_validate_json(settings.handover_json())
        assert handed_over == settings
        assert handed_over.jwt_secret is None


# --- hardening found in review ----------------------------------------------------------


def test_only_the_star_is_a_wildcard() -> None:
    # fnmatch's `?` and `[...]` would let a pattern built from a user's id match others'.
    principal = Principal("u", subscribe=("user:4?", "room:[a-c]", "a.b"), publish=())
    assert not principal.may_subscribe("user:42")
    assert not principal.may_subscribe("room:b")
    assert principal.may_subscribe("a.b")
    assert not principal.may_subscribe("axb")


def test_an_overlong_token_is_refused_unread() -> None:
    authenticator = Authenticator(make(jwt_secret=SECRET))
    with pytest.raises(InvalidToken, match="too long"):
        authenticator.authenticate("eyJ" + "A" * 10_000 + ".x.y")


def test_an_expiry_beyond_floats_is_refused_not_crashed() -> None:
    authenticator = Authenticator(make(jwt_secret=SECRET))
    with pytest.raises(InvalidToken):
        authenticator.authenticate(hs(claims(exp=10**400)))


def test_a_token_for_some_audience_is_refused_when_none_is_configured() -> None:
    # A shared identity provider's token for another app must not get in.
    authenticator = Authenticator(make(jwt_secret=SECRET))
    with pytest.raises(InvalidToken, match="audience"):
        authenticator.authenticate(hs(claims(aud="another-app")))


def test_a_weak_rsa_key_is_refused_at_start(tmp_path: Path) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    path = tmp_path / "weak.pem"
    path.write_bytes(public_pem(weak))
    with pytest.raises(ValidationError, match="1024-bit RSA key"):
        make(jwt_public_key_file=str(path), jwt_algorithms=["RS256"])


def test_validation_errors_do_not_echo_secrets() -> None:
    with pytest.raises(ValidationError) as caught:
        make(jwt_secret="short-but-secret-value", api_keys=["also-secret-api-key-123"])
    assert "short-but-secret" not in str(caught.value)
