"""Auth, channel permissions, origins and abuse limits against real workers and Redis.

Every rule of docs/security.md is exercised from the outside: a `python -m service`
worker on a real redis-server, a `websockets` client, tokens signed here with PyJWT
(or forged by hand where PyJWT will not help an attacker). Workers with ordinary
settings are shared by the module and started side by side; tests that need their own
settings start their own.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import jwt
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Close

from service.settings import PLACEHOLDER_SECRETS
from tests.conftest import WorkerFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    Worker,
    async_wait_for,
    free_port,
    hermetic_environment,
    redis_args,
    start_all,
    unique,
    wait_for,
)

SECRET = "integration-secret-" + "0123456789abcdef" * 2 + "-ZYXWVUTSRQPO"  # 64 characters
OTHER_SECRET = "another-secret-" + "fedcba9876543210" * 3 + "-Z"
KEYS = ("k1-" + "a1b2c3d4e5f6a7b8c9d0", "k2-" + "0f9e8d7c6b5a4f3e2d1c")
WRONG_KEY = "k3-" + "not-a-configured-key"
AUDIENCE = "broadcast"
ISSUER = "https://issuer.example"
APP_ORIGIN = "https://app.example"
PUBLISH_RATE = 5
PUBLISH_BURST = 5
MAX_SUBSCRIPTIONS = 4
MAX_CHANNEL_LENGTH = 64
MAX_FRAME_BYTES = 4000
MAX_CONNECTIONS = 3
PLACEHOLDER = "dev-secret-do-not-use-in-production-0123456789"
# Tokens name an audience, and a worker configured with none refuses them.
AUDIENCE_AND_ISSUER = ("--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER)
MISSING: Any = object()  # `token(sub=MISSING)` leaves the claim out

# alice's channels; every token also gets lobby:* from AUTHENTICATED_* (secure worker).
ALICE_CHANNELS = {"subscribe": ["news:*", "chat:*"], "publish": ["chat:*"]}


# --- tokens -----------------------------------------------------------------------------


def token(
    sub: Any = "alice",
    *,
    ttl: float = 300,
    key: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    """A token the secure worker accepts; `claims` override or (MISSING) remove claims."""
    payload: dict[str, Any] = {
        "sub": sub,
        "exp": int(time.time() + ttl),
        "aud": AUDIENCE,
        "iss": ISSUER,
        "channels": ALICE_CHANNELS,
    }
    payload.update(claims)
    payload = {name: value for name, value in payload.items() if value is not MISSING}
    return jwt.encode(payload, key, algorithm=algorithm)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def alg_none() -> str:
    """An unsigned token (`alg: none`) with otherwise perfect claims, made by hand."""
    good = jwt.decode(
        token(), SECRET, algorithms=["HS256"], audience=AUDIENCE, options={"verify_exp": False}
    )
    header = b64url(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{header}.{b64url(json.dumps(good).encode())}."


def forged_raw(header: bytes) -> str:
    """A token with `header` (raw bytes) in front of good claims, signed with SECRET."""
    signing_input = f"{b64url(header)}.{token().split('.')[1]}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def forged(header: dict[str, Any]) -> str:
    return forged_raw(json.dumps(header).encode())


def signature(jwt_text: str) -> str:
    return jwt_text.rpartition(".")[2]


def fragments(text: str, size: int = 8) -> set[str]:
    """Every run of `size` characters of `text`: a log must not hold even part of a token."""
    return {text[i : i + size] for i in range(len(text) - size + 1)}


# --- workers ----------------------------------------------------------------------------


@dataclass
class Fleet:
    """The module's shared workers, one per kind of configuration."""

    secure: Worker  # JWT (aud, iss, no leeway), two API keys, an allowed origin, low limits
    anonymous: Worker  # JWT, and connections without a token may subscribe to public:*
    devmode: Worker  # nothing secret configured: auth is off
    keyless: Worker  # JWT but no API_KEYS: the HTTP API refuses everything
    full: Worker  # JWT, MAX_CONNECTIONS 3


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    workdir = tmp_path_factory.mktemp("security")

    def worker(*extra: str) -> Worker:
        return Worker(workdir, redis_args(redis_server, unique("s") + ":", *extra))

    keys = json.dumps(KEYS)
    fleet = Fleet(
        secure=worker(
            *("--jwt-secret", SECRET, "--jwt-audience", AUDIENCE, "--jwt-issuer", ISSUER),
            *("--jwt-leeway", "0", "--api-keys", keys),
            *("--allowed-origins", json.dumps([APP_ORIGIN])),
            *("--authenticated-subscribe", '["lobby:*"]', "--authenticated-publish", '["lobby:*"]'),
            *("--max-subscriptions", str(MAX_SUBSCRIPTIONS)),
            *("--publish-rate", str(PUBLISH_RATE), "--publish-burst", str(PUBLISH_BURST)),
            *("--max-channel-length", str(MAX_CHANNEL_LENGTH)),
            *("--max-data-bytes", "1000", "--max-frame-bytes", str(MAX_FRAME_BYTES)),
        ),
        anonymous=worker(
            *("--jwt-secret", SECRET, "--api-keys", keys, *AUDIENCE_AND_ISSUER),
            *(
                "--anonymous-subscribe",
                '["public:*"]',
                "--authenticated-subscribe",
                '["members:*"]',
            ),
        ),
        devmode=worker(),
        keyless=worker("--jwt-secret", SECRET, *AUDIENCE_AND_ISSUER),
        full=worker(
            "--jwt-secret", SECRET, *AUDIENCE_AND_ISSUER, "--max-connections", str(MAX_CONNECTIONS)
        ),
    )
    workers = [fleet.secure, fleet.anonymous, fleet.devmode, fleet.keyless, fleet.full]
    try:
        start_all(workers)
        yield fleet
    finally:
        for each in workers:
            each.stop()
    # Whatever the module threw at them, no worker failed on it.
    for each in workers:
        assert_no_traceback(each)


# --- clients ----------------------------------------------------------------------------


async def connect(
    worker: Worker,
    jwt_text: str | None = None,
    *,
    via: str = "query",
    path: str = "/ws",
    origin: str | None = None,
) -> Client:
    """A WebSocket to `worker` presenting `jwt_text` in the query, a header or a cookie."""
    url = worker.ws + path
    headers: dict[str, str] = {}
    if jwt_text is not None:
        if via == "query":
            url += "?token=" + quote(jwt_text, safe="")
        elif via == "header":
            headers["Authorization"] = f"Bearer {jwt_text}"
        else:
            assert via == "cookie", via
            headers["Cookie"] = f"token={jwt_text}"
    kwargs: dict[str, Any] = {"additional_headers": headers}
    if origin is not None:
        kwargs["origin"] = origin
    return await Client.connect(url, **kwargs)


async def welcomed(worker: Worker, jwt_text: str | None = None, **kwargs: Any) -> Client:
    """A `/ws` connection past its welcome."""
    client = await connect(worker, jwt_text, **kwargs)
    await client.welcome()
    return client


async def refused_status(worker: Worker, jwt_text: str | None = None, **kwargs: Any) -> int:
    """The HTTP status a refused handshake got (fails if the WebSocket opened)."""
    try:
        client = await connect(worker, jwt_text, **kwargs)
    except InvalidStatus as refused:
        return refused.response.status_code
    await client.close()
    raise AssertionError("the handshake was accepted")


async def until_closed(client: Client, timeout: float = 10.0) -> tuple[list[dict[str, Any]], Close]:
    """Every frame until the server closes the connection, and its close frame."""
    frames: list[dict[str, Any]] = []
    try:
        while True:
            frames.append(await client.recv(timeout))
    except ConnectionClosed as closed:
        close = closed.rcvd
    assert close is not None, "closed without a close frame"
    return frames, close


async def request(client: Client, frame: dict[str, Any]) -> dict[str, Any]:
    """Send one command and return the next frame (its reply or error)."""
    await client.send(frame)
    return await client.recv()


async def until_time(moment: float, clock: Callable[[], float] = time.time) -> None:
    """Poll `clock` until it reaches `moment` (bounded by the usual timeout)."""

    async def passed() -> bool:
        return clock() >= moment

    await async_wait_for(passed, timeout=30, what=f"the clock to reach {moment}")


def api_publish(worker: Worker, channel: str, data: Any, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"X-API-Key": key}
    return httpx.post(
        f"{worker.http}/api/channels/{channel}/messages",
        json={"data": data},
        headers=headers,
        timeout=5 * UNIT,
    )


def api_history(worker: Worker, channel: str, key: str | None) -> httpx.Response:
    headers = {} if key is None else {"X-API-Key": key}
    return httpx.get(
        f"{worker.http}/api/channels/{channel}/history", headers=headers, timeout=5 * UNIT
    )


def assert_no_traceback(worker: Worker) -> None:
    assert "Traceback" not in worker.log(), worker.log()


# --- 1. the three ways to present a token -----------------------------------------------


@pytest.mark.parametrize("via", ["query", "header", "cookie"])
async def test_token_is_accepted_from_query_header_or_cookie(fleet: Fleet, via: str) -> None:
    channel = unique("news:")
    client = await welcomed(fleet.secure, token(), via=via)
    await client.subscribe(channel, ref=1)
    response = api_publish(fleet.secure, channel, {"via": via}, KEYS[0])
    assert response.status_code == 200, response.text
    assert await client.recv() == {
        "type": "message",
        "channel": channel,
        "id": response.json()["id"],
        "data": {"via": via},
    }
    await client.close()


async def test_a_token_cookie_in_a_second_cookie_header_is_found(fleet: Fleet) -> None:
    """Cookies split over several `Cookie` headers are all read (as Starlette does)."""
    client = await Client.connect(
        fleet.secure.ws + "/ws",
        additional_headers=[("Cookie", "theme=dark"), ("Cookie", f"token={token()}")],
    )
    assert (await client.welcome())["type"] == "welcome"
    await client.close()


# --- 2. bad tokens are refused at the handshake -----------------------------------------

# (id, the token (None: none at all), the reason the worker logs)
BAD_TOKENS: list[tuple[str, Callable[[], str | None], str]] = [
    ("missing", lambda: None, "token required"),
    ("malformed", lambda: "not-a-jwt", "malformed token"),
    ("garbage-segments", lambda: "eyJhbGciOi.eyJzdWIi.c2ln", "malformed token"),
    ("bad-signature", lambda: token(key=OTHER_SECRET), "bad token signature"),
    ("alg-none", alg_none, "token algorithm not allowed"),
    ("hs512-not-allowed", lambda: token(algorithm="HS512"), "token algorithm not allowed"),
    ("expired", lambda: token(ttl=-60), "token expired"),
    ("not-yet-valid", lambda: token(nbf=int(time.time()) + 60), "token not yet valid"),
    ("wrong-audience", lambda: token(aud="somebody-else"), "token for another audience"),
    ("no-audience", lambda: token(aud=MISSING), "token lacks a required claim"),
    ("wrong-issuer", lambda: token(iss="https://evil.example"), "token from another issuer"),
    ("no-exp", lambda: token(exp=MISSING), "token lacks a required claim"),
    ("no-sub", lambda: token(sub=MISSING), "token lacks a subject"),
    ("empty-sub", lambda: token(sub=""), "token lacks a subject"),
    ("channels-not-an-object", lambda: token(channels=["*"]), "must be an object"),
    ("channels-not-lists", lambda: token(channels={"subscribe": "*"}), "list of patterns"),
    ("alg-a-list", lambda: forged({"alg": ["HS256"]}), "token algorithm not allowed"),
    ("header-nested-deep", lambda: forged_raw(b"[" * 2000), "malformed token"),
]


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [pytest.param(make, reason, id=name) for name, make, reason in BAD_TOKENS],
)
async def test_bad_token_is_refused_with_403_and_the_worker_carries_on(
    fleet: Fleet, make_token: Callable[[], str | None], reason: str
) -> None:
    worker = fleet.secure
    refusals = worker.log().count("WebSocket refused: ")
    assert await refused_status(worker, make_token()) == 403
    wait_for(
        lambda: worker.log().count("WebSocket refused: ") > refusals, what="the refusal logged"
    )
    refusal = worker.log().split("WebSocket refused: ")[refusals + 1].splitlines()[0]
    assert reason in refusal
    good = await welcomed(worker, token())
    await good.alive()
    await good.close()
    assert_no_traceback(worker)


@pytest.mark.parametrize("via", ["header", "cookie"])
@pytest.mark.parametrize(
    "make_token", [lambda: token(key=OTHER_SECRET), lambda: token(ttl=-60), alg_none]
)
async def test_bad_token_is_refused_in_a_header_or_cookie_too(
    fleet: Fleet, via: str, make_token: Callable[[], str]
) -> None:
    assert await refused_status(fleet.secure, make_token(), via=via) == 403


@pytest.mark.parametrize("authorization", ["Basic YWxpY2U6cHc=", "Bearer", "Bearer   ", "Token x"])
async def test_malformed_authorization_header_is_refused(fleet: Fleet, authorization: str) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(
            fleet.secure.ws + "/ws", additional_headers={"Authorization": authorization}
        )
    assert refused.value.response.status_code == 403


async def test_a_bad_header_token_is_not_rescued_by_a_good_query_token(fleet: Fleet) -> None:
    url = fleet.secure.ws + "/ws?token=" + token()
    with pytest.raises(InvalidStatus) as refused:
        await Client.connect(
            url, additional_headers={"Authorization": f"Bearer {token(key=OTHER_SECRET)}"}
        )
    assert refused.value.response.status_code == 403


# --- 3. channel permissions -------------------------------------------------------------


async def test_channels_claim_and_authenticated_patterns_decide_what_a_token_may_do(
    fleet: Fleet,
) -> None:
    worker = fleet.secure
    news, chat, lobby = unique("news:"), unique("chat:"), unique("lobby:")
    client = await welcomed(worker, token())
    await client.subscribe(news, ref="s1")
    await client.subscribe(lobby, ref="s2")  # from AUTHENTICATED_SUBSCRIBE, not the claim
    secret = unique("secret:")
    api_publish(worker, secret, "not for alice", KEYS[0])
    for ref, channel, since in [
        ("s3", secret, None),
        ("s4", "chat", None),
        ("s5", unique("newsy"), None),
        ("s6", secret, "0:0"),  # resuming is subscribing: no history either
    ]:
        frame = {"type": "subscribe", "channel": channel, "ref": ref, "since": since}
        error = await request(client, frame)
        assert error["type"] == "error", error
        assert error["code"] == "forbidden"
        assert error["ref"] == ref
    published = await client.publish(chat, "allowed", ref="p1")
    assert published["channel"] == chat
    assert (await client.publish(lobby, "lobby too", ref="p2"))["ref"] == "p2"
    assert (await client.recv())["data"] == "lobby too"  # subscribed to lobby
    error = await request(client, {"type": "publish", "channel": news, "data": 1, "ref": "p3"})
    assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", "p3")
    # Nothing reached the channel the publish was refused on.
    history = api_history(worker, news, KEYS[0]).json()
    assert history["messages"] == []
    await client.alive()
    # The connection carries on: allowed commands still work after the refusals.
    await client.subscribe(chat, ref="s7")
    await client.close()


async def test_token_without_channels_claim_gets_only_the_authenticated_patterns(
    fleet: Fleet,
) -> None:
    client = await welcomed(fleet.secure, token(channels=MISSING))
    await client.subscribe(unique("lobby:"))
    error = await request(client, {"type": "subscribe", "channel": unique("news:"), "ref": 1})
    assert (error["code"], error["ref"]) == ("forbidden", 1)
    await client.close()


async def test_anonymous_connection_gets_only_the_anonymous_patterns(fleet: Fleet) -> None:
    worker = fleet.anonymous
    public, private = unique("public:"), unique("private:")
    client = await welcomed(worker)
    await client.subscribe(public, ref=1)
    response = api_publish(worker, public, "hello, anyone", KEYS[1])
    assert response.status_code == 200, response.text
    assert (await client.recv())["data"] == "hello, anyone"
    error = await request(client, {"type": "subscribe", "channel": private, "ref": 2})
    assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", 2)
    error = await request(client, {"type": "publish", "channel": public, "data": 1, "ref": 3})
    assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", 3)
    # AUTHENTICATED_* patterns are for tokens only.
    members = unique("members:")
    error = await request(client, {"type": "subscribe", "channel": members, "ref": 4})
    assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", 4)
    await client.alive()
    await client.close()
    member = await welcomed(worker, token(channels=MISSING))
    await member.subscribe(members)
    await member.close()


async def test_anonymous_access_does_not_excuse_a_bad_token(fleet: Fleet) -> None:
    # A bad token is refused, not downgraded to an anonymous connection.
    assert await refused_status(fleet.anonymous, token(key=OTHER_SECRET)) == 403
    assert await refused_status(fleet.anonymous, token(ttl=-60), via="cookie") == 403


async def test_simple_mode_on_a_forbidden_channel_errors_then_closes_1008(fleet: Fleet) -> None:
    client = await connect(fleet.anonymous, path="/ws/" + unique("private:"))
    frames, close = await until_closed(client)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "forbidden")]
    assert close.code == 1008


async def test_simple_mode_on_an_allowed_channel_refuses_unallowed_publishes(
    fleet: Fleet,
) -> None:
    worker = fleet.anonymous
    channel = unique("public:")
    client = await connect(worker, path="/ws/" + channel)

    async def joined() -> bool:
        # Subscribed once an HTTP publish reaches the client (simple mode has no reply).
        api_publish(worker, channel, "probe", KEYS[0])
        return bool((await client.recv(timeout=1))["data"] == "probe")

    await async_wait_for(joined, what="the simple-mode subscription")
    await client.send("anonymous writes")
    error = await client.recv()
    assert (error["type"], error["code"]) == ("error", "forbidden")
    assert api_history(worker, channel, KEYS[0]).json()["messages"][-1]["data"] == "probe"
    await client.close()


async def test_patterns_with_many_stars_do_not_stall_the_worker(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # Found by attacking a worker: these patterns, compiled to one regex with a `.*` per
    # `*`, held its event loop for over 30 s (the second for seconds) per subscribe to a
    # 128-character channel name, every other client of the worker waiting.
    worker = make_worker(
        *redis_args(redis_server, prefix, "--jwt-secret", SECRET), *AUDIENCE_AND_ISSUER
    )
    patterns = ["a*a*a*a*a*a*a*a*a*a*b", "*:*:*:*:*:x"]
    mallory = await welcomed(worker, token("mallory", channels={"subscribe": patterns}))
    witness = await welcomed(worker, token())
    try:
        hostile = ["a" * 128, ":" * 128]  # the longest names the worker accepts
        for ref, channel in enumerate(hostile):
            await mallory.send({"type": "subscribe", "channel": channel, "ref": ref})
        # Pings sent while the worker checks the subscribes (the first may come before
        # it starts), each answered within the usual deadline of a reply.
        for _ in range(3):
            await witness.alive()
        for ref in range(len(hostile)):
            error = await mallory.recv()
            assert (error["type"], error["code"], error["ref"]) == ("error", "forbidden", ref)
        # The patterns are in force, not refused wholesale.
        await mallory.subscribe("a" * 127 + "b", ref="fits-a")
        await mallory.subscribe(":::::x", ref="fits-colons")
    finally:
        # Closed even after a failure (aborted if a stalled worker never answers the
        # close): a socket left to the garbage collector fails a later test.
        for client in (mallory, witness):
            await client.close()
            client.connection.transport.abort()


# --- 4. token expiry and refresh --------------------------------------------------------


async def test_expiring_token_closes_1008_unless_refreshed(fleet: Fleet) -> None:
    worker = fleet.secure  # --jwt-leeway 0
    expires = int(time.time()) + 2
    first = token(exp=expires)
    lapsing = await welcomed(worker, first)
    kept = await welcomed(worker, first, via="header")
    extra = unique("extra:")
    error = await request(kept, {"type": "subscribe", "channel": extra, "ref": 0})
    assert error["code"] == "forbidden"

    fresh_expiry = int(time.time()) + 300
    fresh = token(exp=fresh_expiry, channels={"subscribe": ["extra:*"], "publish": []})
    assert await request(kept, {"type": "refresh", "token": fresh, "ref": 1}) == {
        "type": "refreshed",
        "expires": fresh_expiry,
        "ref": 1,
    }
    # The new token's permissions apply from now on.
    await kept.subscribe(extra, ref=2)

    frames, close = await until_closed(lapsing, timeout=10)
    assert frames == []
    assert (close.code, close.reason) == (1008, "token expired")
    assert time.time() >= expires - 0.1, "closed before the token expired"

    await until_time(expires + 1.0)
    await kept.alive()
    await kept.close()


@pytest.mark.parametrize(
    "make_token",
    [
        pytest.param(lambda: token(sub="bob"), id="another-sub"),
        pytest.param(lambda: token(ttl=-60), id="expired"),
        pytest.param(lambda: "garbage", id="garbage"),
        pytest.param(lambda: token(key=OTHER_SECRET), id="bad-signature"),
        pytest.param(alg_none, id="alg-none"),
    ],
)
async def test_refresh_with_a_bad_token_is_an_invalid_token_error(
    fleet: Fleet, make_token: Callable[[], str]
) -> None:
    client = await welcomed(fleet.secure, token())
    error = await request(client, {"type": "refresh", "token": make_token(), "ref": 7})
    assert (error["type"], error["code"], error["ref"]) == ("error", "invalid_token", 7)
    await client.alive()
    # Still alice with her own permissions.
    await client.subscribe(unique("news:"))
    await client.close()


# --- 5. development mode and settings validation ----------------------------------------


async def test_without_secrets_auth_is_off_and_the_log_says_so(fleet: Fleet) -> None:
    worker = fleet.devmode
    assert "AUTH IS OFF" in worker.log()
    channel = unique("private:")
    client = await welcomed(worker, "not-even-a-token")
    await client.subscribe(channel)
    await client.publish(unique("anything:"), "ws publish")
    response = api_publish(worker, channel, "http publish", None)
    assert response.status_code == 200, response.text
    assert (await client.recv())["data"] == "http publish"
    assert api_history(worker, channel, None).status_code == 200
    await client.close()


PLACEHOLDER_KEY = "your-256-bit-secret"


@pytest.mark.parametrize(
    ("flags", "message", "value"),
    [
        pytest.param(["--jwt-secret", PLACEHOLDER], "placeholder", PLACEHOLDER, id="jwt-secret"),
        pytest.param(
            ["--api-keys", json.dumps([PLACEHOLDER_KEY])],
            "placeholder",
            PLACEHOLDER_KEY,
            id="api-key",
        ),
        pytest.param(
            ["--jwt-secret", "short-but-real-Zq8x"], "at least 32 bytes", "Zq8x", id="short-secret"
        ),
        pytest.param(
            ["--api-keys", '["k-short-Zq8x"]'], "at least 16 characters", "Zq8x", id="short-key"
        ),
    ],
)
def test_weak_secrets_are_refused_at_start_without_echoing_them(
    flags: list[str], message: str, value: str
) -> None:
    assert message != "placeholder" or value in PLACEHOLDER_SECRETS
    result = subprocess.run(
        [sys.executable, "-m", "service", "--port", str(free_port()), *flags],
        env=hermetic_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert value not in result.stderr + result.stdout


async def test_placeholder_secret_is_allowed_in_development(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(
        *redis_args(redis_server, prefix, "--jwt-secret", PLACEHOLDER),
        *("--environment", "development"),
    )
    client = await welcomed(
        worker, jwt.encode({"sub": "dev", "exp": time.time() + 60}, PLACEHOLDER)
    )
    await client.alive()
    await client.close()
    assert await refused_status(worker, token()) == 403  # signed with another secret


# --- 6. API keys of the HTTP API --------------------------------------------------------


@pytest.mark.parametrize("key", [None, WRONG_KEY, "", KEYS[0] + "x", KEYS[0][:-1]])
def test_http_api_without_a_valid_key_is_401(fleet: Fleet, key: str | None) -> None:
    channel = unique("lobby:")
    for response in (
        api_publish(fleet.secure, channel, 1, key),
        api_history(fleet.secure, channel, key),
    ):
        assert response.status_code == 401, response.text
        body = response.json()
        assert body["error"] == "unauthorized"
        assert body["message"]


@pytest.mark.parametrize("key", KEYS)
def test_http_api_accepts_each_configured_key(fleet: Fleet, key: str) -> None:
    channel = unique("lobby:")
    published = api_publish(fleet.secure, channel, "rotated", key)
    assert published.status_code == 200, published.text
    history = api_history(fleet.secure, channel, key)
    assert history.status_code == 200, history.text
    assert [m["id"] for m in history.json()["messages"]] == [published.json()["id"]]


@pytest.mark.parametrize("key", [None, KEYS[0], WRONG_KEY])
def test_http_api_with_jwt_but_no_api_keys_refuses_everything(
    fleet: Fleet, key: str | None
) -> None:
    channel = unique("lobby:")
    assert api_publish(fleet.keyless, channel, 1, key).status_code == 401
    assert api_history(fleet.keyless, channel, key).status_code == 401


def test_health_endpoints_stay_open(fleet: Fleet) -> None:
    for worker in (fleet.secure, fleet.keyless):
        assert worker.status("/healthz") == 200
        assert worker.status("/readyz") == 200


# --- 7. Origin --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example",
        "null",
        "https://app.example.evil.example",
        "http://app.example",  # the listed origin is https
        "http://127.0.0.1:1",  # the service's host, another port
        "http://localhost",
    ],
)
async def test_foreign_origin_is_refused_even_with_a_good_token(fleet: Fleet, origin: str) -> None:
    assert await refused_status(fleet.secure, token(), origin=origin) == 403


async def test_own_listed_or_no_origin_is_accepted(fleet: Fleet) -> None:
    worker = fleet.secure
    for origin in (f"http://127.0.0.1:{worker.port}", APP_ORIGIN, None):
        client = await welcomed(worker, token(), origin=origin)
        await client.alive()
        await client.close()


# --- 8. abuse limits --------------------------------------------------------------------


async def test_subscriptions_over_the_cap_get_too_many_subscriptions(fleet: Fleet) -> None:
    client = await welcomed(fleet.secure, token())
    channels = [unique("lobby:") for _ in range(MAX_SUBSCRIPTIONS + 1)]
    for channel in channels[:-1]:
        await client.subscribe(channel)
    error = await request(client, {"type": "subscribe", "channel": channels[-1], "ref": "over"})
    assert (error["type"], error["code"], error["ref"]) == (
        "error",
        "too_many_subscriptions",
        "over",
    )
    await client.alive()
    await client.send({"type": "unsubscribe", "channel": channels[0]})
    assert (await client.recv())["type"] == "unsubscribed"
    await client.subscribe(channels[-1])  # room again
    await client.close()


async def test_publishes_past_the_burst_get_rate_limited_and_the_connection_stays(
    fleet: Fleet,
) -> None:
    client = await welcomed(fleet.secure, token())
    channel = unique("chat:")
    # A burst and a few more, without waiting: fewer refusals than would close it.
    count = PUBLISH_BURST + 3
    for n in range(count):
        await client.send({"type": "publish", "channel": channel, "data": n, "ref": n})
    replies = [await client.recv() for _ in range(count)]
    assert [r["ref"] for r in replies] == list(range(count))
    assert all(r["type"] == "published" for r in replies[:PUBLISH_BURST]), replies
    limited = [r for r in replies if r["type"] == "error"]
    assert limited, replies
    assert {r["code"] for r in limited} == {"rate_limited"}
    await client.alive()
    await client.close()


async def test_hammering_past_the_rate_limit_closes_1008(fleet: Fleet) -> None:
    client = await welcomed(fleet.secure, token())
    channel = unique("chat:")
    with contextlib.suppress(ConnectionClosed):  # the server may close while we still send
        for n in range(20 * PUBLISH_BURST):
            await client.send({"type": "publish", "channel": channel, "data": n, "ref": n})
    frames, close = await until_closed(client)
    assert (close.code, close.reason) == (1008, "publish rate limit exceeded repeatedly")
    published = [f for f in frames if f["type"] == "published"]
    limited = [f for f in frames if f["type"] == "error"]
    assert len(published) >= PUBLISH_BURST
    assert {f["code"] for f in limited} == {"rate_limited"}
    assert len(limited) >= PUBLISH_BURST
    refs = [f["ref"] for f in frames]
    assert refs == sorted(refs)


async def test_a_client_that_slows_down_after_rate_limited_is_not_closed(fleet: Fleet) -> None:
    client = await welcomed(fleet.secure, token())
    channel = unique("chat:")
    count = PUBLISH_BURST + 4  # at most 4 refusals: one short of the abuse threshold
    for n in range(count):
        await client.send({"type": "publish", "channel": channel, "data": n, "ref": n})
    replies = [await client.recv() for _ in range(count)]
    assert any(r["type"] == "error" and r["code"] == "rate_limited" for r in replies), replies
    # Slowed below the rate: every publish goes through, and the connection stays.
    for n in range(2 * PUBLISH_RATE):
        await until_time(time.monotonic() + 1.5 / PUBLISH_RATE, time.monotonic)
        reply = await client.publish(channel, n, ref=f"slow{n}")
        assert reply["ref"] == f"slow{n}"
    await client.alive()
    await client.close()


async def test_connections_over_the_cap_are_closed_1013_until_a_slot_frees(fleet: Fleet) -> None:
    worker = fleet.full
    clients = [await welcomed(worker, token()) for _ in range(MAX_CONNECTIONS)]
    extra = await connect(worker, token())  # the handshake succeeds...
    frames, close = await until_closed(extra)
    assert frames == []  # ...but no welcome: closed at once
    assert close.code == 1013

    # Refused handshakes take no slot either.
    assert await refused_status(worker, token(key=OTHER_SECRET)) == 403

    await clients.pop().close()

    async def admitted() -> Client | None:
        client = await connect(worker, token())
        try:
            frame = await client.recv()
        except ConnectionClosed as closed:
            close = closed.rcvd
        else:
            assert frame["type"] == "welcome"
            return client
        assert close is not None
        assert close.code == 1013
        return None

    clients.append(await async_wait_for(admitted, what="a freed connection slot"))
    still_full = await connect(worker, token())
    assert (await until_closed(still_full))[1].code == 1013
    for client in clients:
        await client.close()


# Frames over MAX_FRAME_BYTES close with 1009: tests/integration/test_ws_protocol.py
# test_oversized_frame_closes_with_1009_and_others_carry_on (and test_fuzz.py).


async def test_channel_name_over_the_limit_is_invalid_channel(fleet: Fleet) -> None:
    worker = fleet.secure
    too_long = "news:" + "x" * MAX_CHANNEL_LENGTH  # matches news:*, but too long
    client = await welcomed(worker, token())
    for kind in ("subscribe", "publish"):
        frame = {"type": kind, "channel": too_long, "data": 1, "ref": kind}
        error = await request(client, frame)
        assert (error["type"], error["code"], error["ref"]) == ("error", "invalid_channel", kind)
    await client.alive()
    await client.close()

    simple = await connect(worker, token(), path="/ws/" + too_long)
    frames, close = await until_closed(simple)
    assert [(f["type"], f["code"]) for f in frames] == [("error", "invalid_channel")]
    assert close.code == 1008

    response = api_publish(worker, "lobby:" + "x" * MAX_CHANNEL_LENGTH, 1, KEYS[0])
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_channel"


def test_http_body_over_max_frame_bytes_is_413(fleet: Fleet) -> None:
    worker = fleet.secure
    url = f"{worker.http}/api/channels/{unique('lobby:')}/messages"
    body = b'{"data": "' + b"x" * MAX_FRAME_BYTES + b'"}'

    def chunked() -> Iterator[bytes]:
        yield from (body[i : i + 1000] for i in range(0, len(body), 1000))

    for content in (body, chunked()):
        response = httpx.post(url, content=content, headers={"X-API-Key": KEYS[0]})
        assert response.status_code == 413, response.text
        assert response.json()["error"] == "message_too_large"
    # Without a key, the body is not the problem.
    assert httpx.post(url, content=body).status_code == 401


# --- 9. no secret in the logs -----------------------------------------------------------


async def test_tokens_secrets_and_keys_never_reach_the_log(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    secret = "log-secret-" + unique("") + "-" + "0123456789abcdef" * 3  # > 64 characters
    keys = ["k1-" + unique("") * 2, "k2-" + unique("") * 2]
    worker = make_worker(
        *redis_args(redis_server, prefix, "--jwt-secret", secret, "--api-keys", json.dumps(keys)),
        *("--log-level", "debug"),
    )

    def signed(**claims: Any) -> str:
        return token(key=secret, aud=MISSING, iss=MISSING, **claims)

    good = {via: signed(sub="alice") for via in ("query", "header", "cookie")}
    refreshed = signed(sub="alice")
    bad_signature, expired = token(key=OTHER_SECRET, aud=MISSING), signed(ttl=-60)
    channel = unique("lobby:")

    clients = [await welcomed(worker, jwt_text, via=via) for via, jwt_text in good.items()]
    reply = await request(clients[0], {"type": "refresh", "token": refreshed, "ref": 1})
    assert reply["type"] == "refreshed"
    assert api_publish(worker, channel, 1, keys[0]).status_code == 200
    assert api_history(worker, channel, keys[1]).status_code == 200
    assert api_publish(worker, channel, 1, WRONG_KEY).status_code == 401
    for via in ("query", "header", "cookie"):
        for bad in (bad_signature, expired):
            assert await refused_status(worker, bad, via=via) == 403
    for client in clients:
        await client.close()
    worker.stop()

    log = worker.log()
    assert "WebSocket /ws?token=[redacted]" in log, log
    assert "WebSocket refused: token expired" in log, log
    assert secret not in log
    for key in [*keys, WRONG_KEY]:
        assert key not in log
    for jwt_text in [*good.values(), refreshed, bad_signature, expired]:
        assert jwt_text not in log
        parts = fragments(signature(jwt_text))
        leaks = [line for line in log.splitlines() if any(part in line for part in parts)]
        assert not leaks, f"part of a token's signature is in the log: {leaks}"


async def test_a_token_under_another_spelling_of_its_name_never_reaches_the_log(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # The worker decodes query parameters before looking for `token`, so `tok%65n`
    # presents a token; with its value percent-encoded too, no pattern recognised it.
    secret = "log-secret-" + unique("") + "-" + "0123456789abcdef" * 3
    worker = make_worker(
        *redis_args(redis_server, prefix, "--jwt-secret", secret, "--log-level", "debug")
    )
    tokens = [token(key=secret, aud=MISSING, iss=MISSING, n=n) for n in range(3)]
    queries = [
        f"tok%65n={tokens[0]}",
        f"tok%65n={tokens[1].replace('.', '%2E')}",
        "%74oken=" + "".join(f"%{byte:02X}" for byte in tokens[2].encode()),
    ]
    for query in queries:
        client = await connect(worker, path="/ws?" + query)
        try:
            await client.welcome()  # accepted: the worker read the token
            await client.alive()
        finally:
            await client.close()
    worker.stop()

    log = worker.log()
    for jwt_text in tokens:
        parts = fragments(signature(jwt_text))
        leaks = [line for line in log.splitlines() if any(part in line for part in parts)]
        assert not leaks, f"part of a token's signature is in the log: {leaks}"
    # Logged, with the spelling the client used.
    assert '"WebSocket /ws?tok%65n=[redacted]" [accepted]' in log, log
    assert '"WebSocket /ws?%74oken=[redacted]" [accepted]' in log, log


# --- refresh hardening ------------------------------------------------------------------


async def test_a_refresh_that_narrows_permissions_ends_the_subscriptions_it_drops(
    fleet: Fleet,
) -> None:
    # Refreshing must not keep a revoked subscription alive.
    worker = fleet.secure
    news, chat = unique("news:"), unique("chat:")
    client = await welcomed(worker, token())
    await client.subscribe(news, ref=1)
    await client.subscribe(chat, ref=2)
    narrower = token(channels={"subscribe": ["chat:*"], "publish": []})
    reply = await request(client, {"type": "refresh", "token": narrower, "ref": 3})
    assert reply["type"] == "refreshed"
    assert await client.recv() == {"type": "unsubscribed", "channel": news}
    # A witness on the same worker hears the next news message; the refreshed client,
    # fanned out to in the same step if it were still a member, does not.
    witness = await welcomed(worker, token())
    await witness.subscribe(news, ref=4)
    assert api_publish(worker, news, "after the refresh", KEYS[0]).status_code == 200
    assert (await witness.recv())["data"] == "after the refresh"
    await client.alive()
    assert api_publish(worker, chat, "still allowed", KEYS[0]).status_code == 200
    assert (await client.recv())["data"] == "still allowed"
    for each in (client, witness):
        await each.close()


async def test_an_anonymous_connection_cannot_refresh_into_a_token(fleet: Fleet) -> None:
    client = await welcomed(fleet.anonymous)
    anyone = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, "HS256")
    error = await request(client, {"type": "refresh", "token": anyone, "ref": 1})
    assert (error["code"], error["ref"]) == ("invalid_token", 1)
    await client.alive()
    await client.close()


async def test_refreshes_are_rate_limited(fleet: Fleet) -> None:
    # Verifying a token is the most expensive command: a few in a row, then slow down.
    client = await welcomed(fleet.secure, token())
    codes = []
    for ref in range(12):
        reply = await request(client, {"type": "refresh", "token": token(), "ref": ref})
        codes.append(reply.get("code", reply["type"]))
    assert codes[:10] == ["refreshed"] * 10  # the burst
    assert "rate_limited" in codes[10:]
    await client.alive()
    await client.close()


def test_the_api_description_is_served_only_with_auth_off(fleet: Fleet) -> None:
    for path in ("/openapi.json", "/docs"):
        assert httpx.get(fleet.secure.http + path, timeout=5).status_code == 404
        assert httpx.get(fleet.devmode.http + path, timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("make_token", "reason"),
    [pytest.param(make, reason, id=name) for name, make, reason in BAD_TOKENS],
)
async def test_a_refused_handshake_says_why_in_its_body(
    fleet: Fleet, make_token: Callable[[], str | None], reason: str
) -> None:
    # A client that can read the 403 (not a browser) learns why, without the worker's
    # log; the Python client puts it in its close reason.
    with pytest.raises(InvalidStatus) as refused:
        await connect(fleet.secure, make_token())
    response = refused.value.response
    assert response.status_code == 403
    body = json.loads(response.body)
    assert body["error"] == "forbidden"
    assert reason in body["message"]
