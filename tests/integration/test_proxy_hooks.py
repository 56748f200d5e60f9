"""Hooks of the standalone service: HTTP calls to the app's backend (HOOK_* settings).

The backend is a real HTTP server in this process (a thread), whose answers each test
chooses; the workers are real `python -m service` processes with JWT auth on, so that
the backend sees who the client is.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from service.auth.tokens import mint
from service.settings import Settings
from tests.conftest import WorkerFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    Worker,
    async_wait_for,
    free_port,
    redis_args,
    unique,
)

SECRET = "hooks-secret-" + "0123456789abcdef" * 3
HOOK_KEY = "hook-key-" + "fedcba9876543210"


class Backend:
    """The app's backend: records each call and answers as `answer` says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.refuse_connect = False
        self.release = threading.Event()  # what "block" publishes wait for
        backend = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                backend.calls.append((self.path, dict(self.headers), body))
                status, answer = backend.answer(self.path, body)
                payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
                self.send_response(status)
                if status == 307:
                    self.send_header("Location", backend.url + "/publish")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        if path == "/connect":
            if self.refuse_connect:
                return 200, {"error": {"code": "banned", "message": "go away"}}
            return 200, {}
        if path == "/subscribe":
            if body["channel"].endswith(":staff"):
                return 200, {"error": {"code": "staff_only", "message": "staff only"}}
            return 200, {}
        if path == "/audit":
            return 200, {"data": {"audited": body["data"]}}
        if path == "/moved":
            return 307, {"see": "/publish"}
        text = body["data"]
        if text == "darn":
            return 200, {"error": {"code": "banned_word", "message": "mind your language"}}
        if text == "bad code":
            return 200, {"error": {"code": "Not A Code!", "message": "odd"}}
        if text == "500":
            return 500, {"detail": "the backend is broken"}
        if text == "junk":
            return 200, b"<html>not json</html>"
        if text == "slow":
            time.sleep(3 * UNIT)  # past HOOK_TIMEOUT
            return 200, {}
        if text == "block":
            self.release.wait(30)
            return 200, {}
        return 200, {"data": {"text": text, "by": body["client"]["subject"]}}

    def calls_to(self, path: str) -> list[dict[str, Any]]:
        return [body for called, _, body in self.calls if called == path]


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    server = Backend()
    server.thread.start()
    yield server
    server.release.set()
    server.server.shutdown()
    server.server.server_close()


def hook_args(backend: Backend, *extra: str) -> list[str]:
    return [
        *("--jwt-secret", SECRET),
        *("--hook-connect-url", backend.url + "/connect"),
        "--hook-subscribe-urls",
        json.dumps({"chat:*": backend.url + "/subscribe"}),
        "--hook-publish-urls",
        json.dumps(
            {
                "chat:*": backend.url + "/publish",
                "audit:*": backend.url + "/audit",
                "moved:*": backend.url + "/moved",
            }
        ),
        *("--hook-timeout", str(1.5 * UNIT)),
        *("--hook-api-key", HOOK_KEY),
        *extra,
    ]


@pytest.fixture(scope="module")
def worker(
    redis_server: RedisServer, backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    # A proxy in the environment that goes nowhere: the hooks must not use it.
    nowhere = f"http://127.0.0.1:{free_port()}"
    proxies = {name: nowhere for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")}
    worker = Worker(
        tmp_path_factory.mktemp("hooks"),
        redis_args(redis_server, unique("h") + ":", *hook_args(backend)),
        {**proxies, **{name.lower(): nowhere for name in proxies}, "NO_PROXY": ""},
    )
    worker.start()
    yield worker
    worker.stop()


def token(subject: str) -> str:
    settings = Settings(jwt_secret=SECRET)  # type: ignore[call-arg]
    return mint(settings, subject, subscribe=["*"], publish=["*"], ttl=600)


async def connect(worker: Worker, subject: str) -> Client:
    client = await Client.connect(f"{worker.ws}/ws?token={token(subject)}")
    await client.welcome()
    return client


async def test_publish_hook_changes_the_data_and_sees_the_sender(
    worker: Worker, backend: Backend
) -> None:
    channel = unique("chat:")
    alice = await connect(worker, "alice")
    try:
        await alice.subscribe(channel)
        published = await alice.publish(channel, "hello")
        message = await alice.recv_type("message")
        assert message["id"] == published["id"]
        assert message["data"] == {"text": "hello", "by": "alice"}
        call = next(
            (headers, body)
            for path, headers, body in backend.calls
            if path == "/publish" and body["channel"] == channel
        )
        headers, body = call
        assert body == {
            "client": {"subject": "alice", "subscribe": ["*"], "publish": ["*"]},
            "channel": channel,
            "data": "hello",
        }
        assert headers["X-API-Key"] == HOOK_KEY
    finally:
        await alice.close()


async def test_each_namespace_has_its_own_hook_and_others_none(
    worker: Worker, backend: Backend
) -> None:
    audit, news = unique("audit:"), unique("news:")
    alice = await connect(worker, "alice")
    try:
        await alice.subscribe(audit)
        await alice.subscribe(news)
        await alice.publish(audit, "x")
        assert (await alice.recv_type("message"))["data"] == {"audited": "x"}
        await alice.publish(news, "darn")  # no hook on news: not even asked
        assert (await alice.recv_type("message"))["data"] == "darn"
        asked = {body["channel"] for _, _, body in backend.calls if "channel" in body}
        assert news not in asked
    finally:
        await alice.close()


@pytest.mark.parametrize(
    ("text", "code", "words"),
    [
        ("darn", "banned_word", "mind your language"),
        ("bad code", "forbidden", "odd"),
        ("500", "unavailable", "answered HTTP 500"),
        ("junk", "unavailable", "answered nonsense"),
        ("slow", "unavailable", "did not answer within"),
    ],
)
async def test_a_refused_or_failed_publish_hook_publishes_nothing(
    worker: Worker, text: str, code: str, words: str
) -> None:
    channel = unique("chat:")
    alice = await connect(worker, "alice")
    try:
        await alice.subscribe(channel)
        await alice.send({"type": "publish", "channel": channel, "data": text, "ref": 7})
        error = await alice.recv_type("error", timeout=10)
        assert (error["code"], error["ref"]) == (code, 7)
        assert words in error["message"]
        # Nothing reached the channel; the next publish does, and is the first message.
        published = await alice.publish(channel, "after")
        message = await alice.recv_type("message")
        assert message["id"] == published["id"]
        assert message["data"] == {"text": "after", "by": "alice"}
    finally:
        await alice.close()


async def test_subscribe_hook_refuses_with_the_backends_code(worker: Worker) -> None:
    alice = await connect(worker, "alice")
    try:
        await alice.send({"type": "subscribe", "channel": "chat:staff", "ref": "s"})
        error = await alice.recv_type("error")
        assert error == {"type": "error", "code": "staff_only", "message": "staff only", "ref": "s"}
        await alice.subscribe(unique("chat:"))
    finally:
        await alice.close()


async def test_connect_hook_refuses_the_handshake(worker: Worker, backend: Backend) -> None:
    backend.refuse_connect = True
    try:
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(f"{worker.ws}/ws?token={token('mallory')}")
    finally:
        backend.refuse_connect = False
    response = refused.value.response
    assert response.status_code == 403
    assert json.loads(response.body) == {"error": "banned", "message": "WebSocket refused: go away"}
    assert backend.calls_to("/connect")[-1]["client"]["subject"] == "mallory"


async def test_a_backend_that_is_down_makes_unavailable_not_silence(
    make_worker: WorkerFactory, redis_server: RedisServer, backend: Backend
) -> None:
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    worker = make_worker(
        *redis_args(
            redis_server,
            unique("d") + ":",
            "--hook-publish-urls",
            json.dumps({"*": down + "/publish"}),
        )
    )
    client = await Client.connect(worker.ws + "/ws")
    await client.welcome()
    try:
        await client.send({"type": "publish", "channel": "c", "data": 1, "ref": 1})
        error = await client.recv_type("error")
        assert error["code"] == "unavailable"
        assert "could not be reached" in error["message"]
        await client.alive()
    finally:
        await client.close()
    # At connect, a backend that is down is a 503 that says so.
    connect_down = make_worker(
        *redis_args(redis_server, unique("d") + ":", "--hook-connect-url", down + "/connect")
    )
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(connect_down.ws + "/ws")
    assert refused.value.response.status_code == 503
    assert json.loads(refused.value.response.body)["error"] == "unavailable"


async def test_calls_in_flight_are_bounded(
    make_worker: WorkerFactory, redis_server: RedisServer, backend: Backend
) -> None:
    worker = make_worker(
        *redis_args(
            redis_server,
            unique("f") + ":",
            "--hook-publish-urls",
            json.dumps({"*": backend.url + "/publish"}),
            *("--hook-max-in-flight", "2", "--hook-timeout", str(20 * UNIT)),
        )
    )
    clients = [await Client.connect(worker.ws + "/ws") for _ in range(3)]
    backend.release.clear()
    try:
        for client in clients:
            await client.welcome()
        waiting = len(backend.calls_to("/publish"))
        for client in clients[:2]:
            await client.send({"type": "publish", "channel": "c", "data": "block", "ref": 1})

        def blocked() -> bool:
            return len(backend.calls_to("/publish")) == waiting + 2

        await async_wait_for(blocked, what="two hook calls waiting in the backend")
        await clients[2].send({"type": "publish", "channel": "c", "data": "x", "ref": 3})
        error = await clients[2].recv_type("error")
        assert error["code"] == "unavailable"
        assert "already waiting" in error["message"]
        backend.release.set()
        for client in clients[:2]:
            assert (await client.recv_type("published"))["ref"] == 1
        # Once they are done, the third gets through.
        assert (await clients[2].publish("c", "x", ref=4))["ref"] == 4
    finally:
        backend.release.set()
        for client in clients:
            await client.close()


async def test_a_redirect_is_not_followed(worker: Worker, backend: Backend) -> None:
    channel = unique("moved:")
    alice = await connect(worker, "alice")
    try:
        await alice.subscribe(channel)
        await alice.send({"type": "publish", "channel": channel, "data": "x", "ref": 1})
        error = await alice.recv_type("error")
        assert error["code"] == "unavailable"
        assert "answered HTTP 307" in error["message"]
        # The backend was asked once, at the URL configured, and not at the Location.
        assert not [body for body in backend.calls_to("/publish") if body["channel"] == channel]
    finally:
        await alice.close()


async def test_subscribes_the_backend_is_asked_about_are_rate_limited(
    make_worker: WorkerFactory, redis_server: RedisServer, backend: Backend
) -> None:
    worker = make_worker(
        *redis_args(
            redis_server,
            unique("r") + ":",
            "--hook-subscribe-urls",
            json.dumps({"*": backend.url + "/subscribe"}),
            *("--publish-rate", "0.1", "--publish-burst", "3"),
        )
    )
    client = await Client.connect(worker.ws + "/ws")
    staff = unique("flood") + ":staff"
    try:
        await client.welcome()
        codes = []
        for ref in range(6):
            await client.send({"type": "subscribe", "channel": staff, "ref": ref})
            codes.append((await client.recv_type("error"))["code"])
        assert codes == ["staff_only"] * 3 + ["rate_limited"] * 3
        asked = [body for body in backend.calls_to("/subscribe") if body["channel"] == staff]
        assert len(asked) == 3
    finally:
        await client.close()


async def test_a_full_worker_does_not_ask_the_backend(
    make_worker: WorkerFactory, redis_server: RedisServer, backend: Backend
) -> None:
    worker = make_worker(
        *redis_args(
            redis_server,
            unique("x") + ":",
            *("--hook-connect-url", backend.url + "/connect", "--max-connections", "1"),
        )
    )
    first = await Client.connect(worker.ws + "/ws")
    try:
        await first.welcome()
        asked = len(backend.calls_to("/connect"))
        second = await Client.connect(worker.ws + "/ws")
        assert await second.close_code() == 1013
        assert len(backend.calls_to("/connect")) == asked
    finally:
        await first.close()
