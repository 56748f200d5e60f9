"""Request heads and handshakes are bounded in size and in time, by the worker itself.

Oversized requests are answered (414 for the request line, 431 for header lines, the
number of fields or the whole head) and closed; a request, or a WebSocket upgrade, not
complete within HANDSHAKE_TIMEOUT gets 408 and is closed; sockets held that way come
back (counted in the worker's /proc/<pid>/fd). An accepted WebSocket, however idle, is
not the handshake's business. Raw sockets on loopback, against one real worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from service.adapters.uvicorn import MAX_HEADERS, MAX_LINE_BYTES, REFUSAL_LINGER
from tests.conftest import WorkerFactory
from tests.helpers import UNIT, Client, Worker, wait_for

#: The worker's HANDSHAKE_TIMEOUT: short, and scaled like every other deadline.
HANDSHAKE_TIMEOUT = 1.0 * UNIT
SECRET = secrets.token_urlsafe(48)

UPGRADE_HEADERS = (
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """One worker with auth on (tokens are what grows handshakes) and a short deadline.

    The deadline is given in the environment, which a worker without the setting ignores,
    so that these tests fail on such a worker for what it does, not for a flag.
    """
    worker = Worker(
        tmp_path_factory.mktemp("handshake"),
        ["--jwt-secret", SECRET],
        env={"HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT)},
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture
def baseline(worker: Worker) -> int:
    """The worker's open file descriptors before the test; each test waits for them back."""
    return open_fds(worker)


def open_fds(worker: Worker) -> int:
    assert worker.process is not None
    return len(os.listdir(Path("/proc") / str(worker.process.pid) / "fd"))


def token(padding: int = 0) -> str:
    """A valid token for `*`, made `padding` characters longer by a claim nobody reads."""
    claims = {
        "sub": "t",
        "exp": int(time.time()) + 300,
        "channels": {"subscribe": ["*"]},
        "pad": "x" * padding,
    }
    return jwt.encode(claims, SECRET, algorithm="HS256")


def request(target: str = "/ws", *, upgrade: bool = True, extra: bytes = b"") -> bytes:
    """A whole GET request (a WebSocket upgrade by default) with `extra` header lines."""
    head = b"GET " + target.encode() + b" HTTP/1.1\r\n"
    headers = UPGRADE_HEADERS if upgrade else b"Host: 127.0.0.1\r\n"
    return head + headers + extra + b"\r\n"


@contextlib.contextmanager
def connection(worker: Worker) -> Iterator[socket.socket]:
    with socket.create_connection((worker.host, worker.port), timeout=5 * UNIT) as sock:
        yield sock


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    """Everything the worker sends until it closes its side; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"not closed within {timeout} s; got {received[:80]!r}") from None
        if not chunk:
            return received
        received += chunk


OVERSIZED = {
    "request line": ("/ws?token=" + "a" * MAX_LINE_BYTES, b"", 414),
    "header line": ("/ws", b"X-Big: " + b"a" * MAX_LINE_BYTES + b"\r\n", 431),
    "header fields": (
        "/ws",
        b"".join(b"X-Field-%d: v\r\n" % n for n in range(MAX_HEADERS + 72)),  # 200 in all
        431,
    ),
}


@pytest.mark.parametrize("upgrade", [True, False], ids=["upgrade", "plain"])
@pytest.mark.parametrize("kind", list(OVERSIZED))
def test_an_oversized_request_is_answered_and_closed(
    worker: Worker, baseline: int, kind: str, upgrade: bool
) -> None:
    target, extra, status = OVERSIZED[kind]
    if not upgrade:
        target = target.replace("/ws", "/healthz", 1)
    with connection(worker) as sock:
        started = time.monotonic()
        sock.sendall(request(target, upgrade=upgrade, extra=extra))
        answer = read_until_closed(sock, 5 * UNIT)
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
        assert b"connection: close" in answer
        assert b"%d bytes" % MAX_LINE_BYTES in answer or b"%d header" % MAX_HEADERS in answer
        # Answered at once, not at the handshake's deadline.
        assert elapsed < HANDSHAKE_TIMEOUT, elapsed
        # The client keeps its socket open: the worker lets go of its own by itself.
        wait_for(lambda: open_fds(worker) <= baseline, REFUSAL_LINGER + 5, "the socket closed")


def test_an_upgrade_websockets_cannot_read_is_answered_and_closed(
    worker: Worker, baseline: int
) -> None:
    # websockets refuses a handshake with a body and prepares no answer: uvicorn left
    # the socket open for ever.
    with connection(worker) as sock:
        sock.sendall(request(extra=b"Content-Length: 3\r\n") + b"abc")
        answer = read_until_closed(sock, 5 * UNIT)
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert b"unsupported request body" in answer
    wait_for(lambda: open_fds(worker) <= baseline, 5, "the socket closed")


def test_a_half_sent_handshake_is_closed_at_the_deadline(worker: Worker, baseline: int) -> None:
    with connection(worker) as sock:
        started = time.monotonic()
        sock.sendall(request()[:40])  # the request line and a bit: then nothing
        wait_for(lambda: open_fds(worker) > baseline, 5, "the connection held")
        answer = read_until_closed(sock, HANDSHAKE_TIMEOUT + 5 * UNIT)
        elapsed = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert elapsed >= HANDSHAKE_TIMEOUT * 0.9, elapsed
        wait_for(lambda: open_fds(worker) <= baseline, 5, "the socket closed")


def test_a_connection_that_sends_nothing_is_closed_at_the_deadline(
    worker: Worker, baseline: int
) -> None:
    with connection(worker) as sock:
        assert read_until_closed(sock, HANDSHAKE_TIMEOUT + 5 * UNIT).startswith(b"HTTP/1.1 408 ")
        wait_for(lambda: open_fds(worker) <= baseline, 5, "the socket closed")


def test_many_half_sent_handshakes_are_all_closed(worker: Worker, baseline: int) -> None:
    count = 200
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(connection(worker)) for _ in range(count)]
        for sock in socks:
            sock.sendall(request()[:60])
        peak = wait_for(lambda: (n := open_fds(worker)) >= baseline + count // 2 and n, 5, "held")
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT + 10 * UNIT
        answers = [read_until_closed(sock, deadline - time.monotonic()) for sock in socks]
        assert all(answer.startswith(b"HTTP/1.1 408 ") for answer in answers)
        wait_for(lambda: open_fds(worker) <= baseline, 5, "every socket closed")
    assert peak >= baseline + count // 2
    assert worker.status("/healthz") == 200


def test_a_kept_alive_connection_serves_requests_and_its_next_one_has_a_deadline(
    worker: Worker, baseline: int
) -> None:
    with connection(worker) as sock:
        for _ in range(2):
            sock.sendall(request("/healthz", upgrade=False))
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
            assert b"connection: close" not in answer
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # the third request stalls
        assert read_until_closed(sock, HANDSHAKE_TIMEOUT + 5 * UNIT).startswith(b"HTTP/1.1 408 ")
    wait_for(lambda: open_fds(worker) <= baseline, 5, "the socket closed")


def test_a_body_that_never_ends_is_cut_without_a_408_after_the_response(
    worker: Worker, baseline: int
) -> None:
    # /healthz answers without reading the body: the deadline then only closes.
    with connection(worker) as sock:
        sock.sendall(request("/healthz", upgrade=False, extra=b"Content-Length: 100\r\n") + b"{")
        answer = read_until_closed(sock, HANDSHAKE_TIMEOUT + 5 * UNIT)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert b"408" not in answer
    wait_for(lambda: open_fds(worker) <= baseline, 5, "the socket closed")


def test_a_publish_whose_body_stalls_gets_a_408_and_no_error_in_the_log(
    make_worker: WorkerFactory,
) -> None:
    worker = make_worker(env={"HANDSHAKE_TIMEOUT": str(HANDSHAKE_TIMEOUT)})
    with connection(worker) as sock:
        head = b"POST /api/channels/news/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        sock.sendall(head + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        answer = read_until_closed(sock, HANDSHAKE_TIMEOUT + 5 * UNIT)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    # The handler that waited for the body ends quietly, a few turns of the event loop
    # after the close: before a request on a new connection is answered.
    assert worker.status("/healthz") == 200
    assert "Traceback" not in worker.log()


async def test_an_accepted_websocket_outlives_the_handshake_deadline(
    worker: Worker, baseline: int
) -> None:
    client = await Client.connect(worker.ws + "/ws", additional_headers=auth(token()))
    try:
        await client.welcome()
        # A handshake begun now and never finished marks the deadline's passing.
        with connection(worker) as stalled:
            stalled.sendall(request()[:40])
            answer = await asyncio.to_thread(
                read_until_closed, stalled, HANDSHAKE_TIMEOUT + 5 * UNIT
            )
        assert answer.startswith(b"HTTP/1.1 408 ")
        await client.alive()  # idle past the deadline, and still there
    finally:
        await client.close()


def auth(value: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {value}"}


@pytest.mark.parametrize("where", ["query", "header"])
async def test_a_valid_token_over_8kb_is_refused_with_a_reason(worker: Worker, where: str) -> None:
    big = token(padding=7000)
    assert len(big) > MAX_LINE_BYTES
    url, headers = worker.ws + "/ws", {}
    if where == "query":
        url += "?token=" + big
    else:
        headers = auth(big)
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, additional_headers=headers, open_timeout=5 * UNIT)
    response = refused.value.response
    assert response.status_code == (414 if where == "query" else 431)
    assert f"over {MAX_LINE_BYTES} bytes".encode() in response.body


async def test_a_valid_token_under_the_limit_opens(worker: Worker) -> None:
    fits = token(padding=5800)
    assert 7500 < len(fits) < MAX_LINE_BYTES - 100
    for headers, url in [(auth(fits), worker.ws + "/ws"), ({}, worker.ws + "/ws?token=" + fits)]:
        client = await Client.connect(url, additional_headers=headers)
        try:
            await client.welcome()
        finally:
            await client.close()
