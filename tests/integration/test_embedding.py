"""The service inside an app of its own (tests/apps/embedded.py), on a real uvicorn.

The app includes `Realtime.router` under `/rt`, identifies clients from its own session
cookie with a FastAPI dependency, publishes from its own routes, and has hooks that
refuse a user, a channel and a word, and sign each message with its sender.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.conftest import WorkerFactory
from tests.helpers import UNIT, Client, RedisServer, Worker, unique, wait_for

REPO = Path(__file__).resolve().parents[2]
API_KEY = "embedded-api-key-0123456789"


def app_program(target: str) -> list[str]:
    """uvicorn running `target` (module:attribute) of tests/apps, as an app's own server."""
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(REPO), target]


@pytest.fixture(scope="module")
def app(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    env = {
        "BROADCAST_URL": redis_server.url,
        "REDIS_PREFIX": unique("e") + ":",
        "ALLOWED_ORIGINS": '["http://app.example"]',
        "API_KEYS": f'["{API_KEY}"]',
    }
    worker = Worker(
        tmp_path_factory.mktemp("app"),
        [],
        env,
        program=app_program("tests.apps.embedded:app"),
    )
    worker.start()
    yield worker
    worker.stop()


async def signed_in(app: Worker, session: str, **kwargs: object) -> Client:
    client = await Client.connect(
        app.ws + "/rt/ws", additional_headers={"Cookie": f"session={session}"}, **kwargs
    )
    await client.welcome()
    return client


async def refusal(url: str, headers: dict[str, str]) -> httpx.Response:
    """The HTTP answer to a WebSocket handshake that must be refused."""
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers, open_timeout=5 * UNIT)
    response = refused.value.response
    return httpx.Response(response.status_code, content=bytes(response.body))


async def test_router_serves_websockets_and_the_http_api_under_the_apps_prefix(
    app: Worker,
) -> None:
    channel = unique("chat:")
    alice = await signed_in(app, "alice-session")
    bob = await signed_in(app, "bob-session")
    try:
        await alice.subscribe(channel)
        await bob.subscribe(channel)
        published = await bob.publish(channel, {"text": "hi"})
        for client in (alice, bob):
            message = await client.recv_type("message")
            assert message["id"] == published["id"]
            # The publish hook signed it with the sender the dependency identified.
            assert message["data"] == {"text": "hi", "by": "bob"}
        # The HTTP API came along with the router, under the same prefix, for backends
        # with one of API_KEYS: the app's login must not be bypassed there.
        url = f"{app.http}/rt/api/channels/{channel}/messages"
        anonymous = httpx.post(url, json={"data": "forged"}, timeout=5 * UNIT)
        assert anonymous.status_code == 401
        assert anonymous.json()["error"] == "unauthorized"
        key = {"X-API-Key": API_KEY}
        response = httpx.post(url, json={"data": "from a backend"}, headers=key, timeout=5)
        assert response.status_code == 200, response.text
        assert (await alice.recv_type("message"))["data"] == "from a backend"
        # A bad request is answered by the router's own error handling, not a 500.
        history = f"{app.http}/rt/api/channels/{channel}/history"
        bad = httpx.get(history + "?limit=x", headers=key, timeout=5 * UNIT)
        assert bad.status_code == 400
        assert bad.json()["error"] == "invalid_request"
    finally:
        await alice.close()
        await bob.close()


async def test_simple_mode_is_under_the_prefix_too(app: Worker) -> None:
    channel = unique("chat:")
    client = await Client.connect(
        f"{app.ws}/rt/ws/{channel}", additional_headers={"Cookie": "session=bob-session"}
    )
    try:
        await client.send("plain")  # simple mode publishes the text as a string
        message = await client.recv_type("message")
        assert message["data"] == {"text": "plain", "by": "bob"}
    finally:
        await client.close()


async def test_the_apps_route_publishes_in_process_and_reads_history(app: Worker) -> None:
    channel = unique("chat:")
    alice = await signed_in(app, "alice-session")
    try:
        await alice.subscribe(channel)
        response = httpx.post(
            f"{app.http}/announce/{channel}", json={"text": "deployed"}, timeout=5 * UNIT
        )
        assert response.status_code == 200, response.text
        message_id = response.json()["id"]
        message = await alice.recv_type("message")
        # No hook for the app's own publishes: the data is as the app gave it.
        assert message == {
            "type": "message",
            "channel": channel,
            "id": message_id,
            "data": {"text": "deployed", "by": "the app"},
        }
        history = httpx.get(f"{app.http}/history/{channel}", timeout=5 * UNIT).json()
        assert history["position"] == message_id
        assert history["messages"] == [{"id": message_id, "data": message["data"]}]
        after = httpx.get(
            f"{app.http}/history/{channel}", params={"since": message_id}, timeout=5 * UNIT
        ).json()
        assert after["messages"] == []
        assert after["recovered"] is True
    finally:
        await alice.close()


async def test_the_apps_dependency_decides_who_connects_and_what_they_may_do(
    app: Worker,
) -> None:
    url = app.ws + "/rt/ws"
    nobody = await refusal(url, {})
    assert nobody.status_code == 403
    assert nobody.json() == {"error": "forbidden", "message": "WebSocket refused: not signed in"}
    stranger = await refusal(url, {"Cookie": "session=forged"})
    assert stranger.status_code == 403

    bob = await signed_in(app, "bob-session")
    try:
        # Bob's Principal does not list `news`; Alice's does.
        await bob.send({"type": "subscribe", "channel": "news", "ref": 1})
        error = await bob.recv_type("error")
        assert (error["code"], error["ref"]) == ("forbidden", 1)
    finally:
        await bob.close()
    alice = await signed_in(app, "alice-session")
    try:
        await alice.subscribe("news")
    finally:
        await alice.close()


async def test_the_dependencys_database_session_ends_with_the_handshake(app: Worker) -> None:
    clients = [await signed_in(app, "alice-session") for _ in range(3)]
    try:
        # Three connections are open, and none holds the app's database session.
        state = httpx.get(f"{app.http}/state", timeout=5 * UNIT).json()
        assert state["open_sessions"] == 0
        # The app's own lifespan ran beside the router's (its state reaches its routes).
        assert state["greeting"] == "hello from the app's lifespan"
        for client in clients:
            await client.alive()
    finally:
        for client in clients:
            await client.close()


async def test_the_origin_is_checked_before_the_apps_dependency(app: Worker) -> None:
    evil = await refusal(
        app.ws + "/rt/ws", {"Origin": "http://evil.example", "Cookie": "session=alice-session"}
    )
    assert evil.status_code == 403
    assert evil.json()["message"] == "WebSocket refused: origin not allowed"
    allowed = await signed_in(app, "alice-session", origin="http://app.example")
    await allowed.close()


async def test_the_connect_hook_refuses_with_the_apps_code(app: Worker) -> None:
    refused = await refusal(app.ws + "/rt/ws", {"Cookie": "session=mallory-session"})
    assert refused.status_code == 403
    assert refused.json() == {"error": "banned", "message": "WebSocket refused: mallory is banned"}


async def test_the_subscribe_hook_refuses_with_the_apps_code(app: Worker) -> None:
    bob = await signed_in(app, "bob-session")
    alice = await signed_in(app, "alice-session")
    try:
        await bob.send({"type": "subscribe", "channel": "chat:staff", "ref": "s"})
        error = await bob.recv_type("error")
        assert error == {
            "type": "error",
            "code": "staff_only",
            "message": "staff only",
            "ref": "s",
        }
        await bob.alive()
        await alice.subscribe("chat:staff")
    finally:
        await bob.close()
        await alice.close()


async def test_the_publish_hook_refuses_fails_and_times_out_without_publishing(
    app: Worker,
) -> None:
    channel = unique("chat:")
    listener = await signed_in(app, "alice-session")
    bob = await signed_in(app, "bob-session")
    try:
        await listener.subscribe(channel)
        refusals = [
            ("darn", "banned_word"),
            ("boom", "unavailable"),
            ("slow", "unavailable"),
            ("not json", "unavailable"),  # the hook's bad data is not the client's fault
        ]
        for text, code in refusals:
            frame = {"type": "publish", "channel": channel, "data": {"text": text}, "ref": text}
            await bob.send(frame)
            error = await bob.recv_type("error", timeout=5)
            assert (error["code"], error["ref"]) == (code, text)
        # Nothing of the three was published; the next one is, in order.
        published = await bob.publish(channel, {"text": "fine"})
        message = await listener.recv_type("message")
        assert message["id"] == published["id"]
        assert message["data"] == {"text": "fine", "by": "bob"}
    finally:
        await listener.close()
        await bob.close()


async def test_channels_the_hooks_do_not_cover_go_through_untouched(app: Worker) -> None:
    alice = await signed_in(app, "alice-session")
    try:
        await alice.subscribe("news")
        response = httpx.post(
            f"{app.http}/rt/api/channels/news/messages",
            json={"data": "darn"},
            headers={"X-API-Key": API_KEY},
            timeout=5 * UNIT,
        )
        assert response.status_code == 200
        assert (await alice.recv_type("message"))["data"] == "darn"
    finally:
        await alice.close()


async def test_a_failing_connect_hook_is_a_503_that_says_so(app: Worker) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(
            app.ws + "/rt/ws",
            additional_headers={"Cookie": "session=crash-session"},
            open_timeout=5 * UNIT,
        )
    response = refused.value.response
    assert response.status_code == 503
    assert response.headers["Retry-After"] == "1"
    body = json.loads(bytes(response.body))
    assert body["error"] == "unavailable"
    assert "connect hook failed" in body["message"]
    wait_for(lambda: "a bug in the app's connect hook" in app.log(), what="the traceback")


async def test_simple_mode_is_refused_by_the_subscribe_hook_with_its_code(app: Worker) -> None:
    client = await Client.connect(
        app.ws + "/rt/ws/chat:staff", additional_headers={"Cookie": "session=bob-session"}
    )
    try:
        error = await client.recv_type("error")
        assert error["code"] == "staff_only"
        assert await client.close_code() == 1008
    finally:
        await client.close()


async def test_a_token_cannot_replace_the_identity_the_app_gave(
    make_worker: WorkerFactory, redis_server: RedisServer
) -> None:
    # With no JWT key and no API_KEYS, any token passes as "everyone", whose subject
    # (none) is the guest's own: a refresh would give the guest every channel.
    app = make_worker(
        env={"BROADCAST_URL": redis_server.url, "REDIS_PREFIX": unique("g") + ":"},
        program=app_program("tests.apps.embedded:app"),
    )
    guest = await signed_in(app, "guest-session")
    try:
        await guest.send({"type": "refresh", "token": "anything", "ref": "r"})
        error = await guest.recv_type("error")
        assert (error["code"], error["ref"]) == ("invalid_token", "r")
        await guest.send({"type": "subscribe", "channel": "news", "ref": "n"})
        assert (await guest.recv_type("error"))["code"] == "forbidden"
    finally:
        await guest.close()


def test_the_apps_dependency_overrides_reach_identify(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    worker = Worker(
        tmp_path,
        [],
        {"BROADCAST_URL": redis_server.url, "REDIS_PREFIX": unique("o") + ":"},
        program=app_program("tests.apps.embedded:overridden"),
    )
    worker.start()
    try:

        async def stand_in_publishes() -> None:
            channel = unique("chat:")
            client = await Client.connect(worker.ws + "/rt/ws")  # no cookie: overridden
            try:
                await client.welcome()
                await client.subscribe(channel)
                await client.publish(channel, "hi")
                assert (await client.recv_type("message"))["data"] == {
                    "text": "hi",
                    "by": "stand-in",
                }
            finally:
                await client.close()

        asyncio.run(stand_in_publishes())
    finally:
        worker.stop()


def test_mounting_the_standalone_app_says_what_to_do_instead(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    worker = Worker(
        tmp_path,
        [],
        {"BROADCAST_URL": redis_server.url, "REDIS_PREFIX": unique("m") + ":"},
        program=app_program("tests.apps.embedded:mounted"),
    )
    worker.start()
    try:
        response = httpx.get(worker.http + "/rt/healthz", timeout=5 * UNIT)
        assert response.status_code == 500
        body = response.json()
        assert body["error"] == "internal"
        assert "app.mount() never gets one" in body["message"]
        assert "include Realtime(settings).router" in body["message"]
        url = worker.ws + "/rt/ws"
        with pytest.raises(InvalidStatus) as refused, connect(url, open_timeout=5 * UNIT):
            pass
        assert refused.value.response.status_code == 500
        assert b"include Realtime(settings).router" in refused.value.response.body
        wait_for(lambda: "never gets one" in worker.log(), what="the error in the log")
    finally:
        worker.stop()
