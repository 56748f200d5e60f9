"""A worker's life end to end: graceful SIGTERM, SIGKILL, start-up without Redis, bad URLs.

Real `python -m service` processes, real redis-servers and real WebSocket clients. Each
test measures what it bounds (exit after SIGTERM, readiness after Redis appears) and
prints the figure (`pytest -s` shows it).
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from tests.conftest import WorkerFactory, WorkersFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    Worker,
    async_wait_for,
    free_port,
    hermetic_environment,
    redis_args,
    subscribed_client,
    unique,
    wait_for,
)

pytestmark = pytest.mark.e2e

# Long enough for the test to look at a worker in the middle of its shutdown.
SHUTDOWN_TIMEOUT = 4.0 * UNIT
# What a worker may take past its shutdown timeout: uvicorn's polling (0.1 s twice), the
# lifespan shutdown (unsubscribing, closing Redis) and the interpreter's exit.
EXIT_MARGIN = 2.0 * UNIT
# More than the kernel buffers of one loopback connection hold (about 4 MiB of send
# buffer at most, see net.ipv4.tcp_wmem, plus a receive buffer kept small below): a
# client that reads none of it leaves the worker with data it can never flush.
BACKLOG_MESSAGES = 256
BACKLOG_PADDING = "x" * 32_000
RECONNECTS = "broadcast_redis_reconnects_total"


async def closing_frame(client: Client) -> ConnectionClosed:
    """Read until the connection closes (each read is bounded); return how it closed."""
    try:
        while True:
            await client.recv(timeout=10)
    except ConnectionClosed as closed:
        return closed


def numsub(server: RedisServer, key: str) -> int:
    return int(server.client().pubsub_numsub(key)[0][1])


def wait_exit(worker: Worker, timeout: float = 30.0) -> tuple[int, float]:
    """The worker's exit code, and the monotonic time at which it was seen to exit."""
    assert worker.process is not None
    try:
        code = worker.process.wait(timeout * UNIT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"still running after {timeout * UNIT:g} s:\n{worker.log()}") from None
    return code, time.monotonic()


class StubbornClient:
    """A WebSocket client that reads only when asked and never answers a close frame.

    websockets' sans-I/O protocol over a non-blocking socket: unlike `Client`, nothing
    runs in the background, so the close frame (and any ping) the server sends stays
    unanswered, and what the test does not read stays in the socket buffers.
    """

    def __init__(self, sock: socket.socket, url: str) -> None:
        self.sock = sock
        self.protocol = ClientProtocol(parse_uri(url))
        self._events: list[Response | Frame] = []
        self._eof = False

    @classmethod
    async def connect(cls, worker: Worker, *, rcvbuf: int | None = None) -> StubbornClient:
        sock = socket.socket()
        try:
            if rcvbuf is not None:
                # Before connecting, so that the TCP window stays this small.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(5 * UNIT):
                await loop.sock_connect(sock, ("127.0.0.1", worker.port))
            client = cls(sock, worker.ws + "/ws")
            client.protocol.send_request(client.protocol.connect())
            await client._flush()
            response = await client._next_event()
            assert isinstance(response, Response), response
            assert response.status_code == 101, response
            welcome = await client.recv()
            assert welcome["type"] == "welcome", welcome
        except BaseException:
            sock.close()
            raise
        return client

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for data in self.protocol.data_to_send():
            if data:
                await loop.sock_sendall(self.sock, data)

    async def _next_event(self, timeout: float = 5.0) -> Response | Frame:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout * UNIT):
            while not self._events:
                if self._eof:
                    raise EOFError("the server closed the TCP connection")
                data = await loop.sock_recv(self.sock, 65536)
                if data:
                    self.protocol.receive_data(data)
                else:
                    self._eof = True
                    self.protocol.receive_eof()
                self._events.extend(self.protocol.events_received())
        return self._events.pop(0)

    async def next_frame(self, timeout: float = 5.0) -> Frame:
        event = await self._next_event(timeout)
        assert isinstance(event, Frame), event
        return event

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        frame = await self.next_frame(timeout)
        assert frame.opcode is Opcode.TEXT, frame
        parsed = json.loads(frame.data)
        assert isinstance(parsed, dict), parsed
        return parsed

    async def subscribe(self, channel: str) -> None:
        # The only time this client writes after the handshake.
        self.protocol.send_text(json.dumps({"type": "subscribe", "channel": channel}).encode())
        await self._flush()
        reply = await self.recv()
        assert (reply["type"], reply["channel"]) == ("subscribed", channel), reply

    async def wait_eof(self, timeout: float = 5.0) -> list[Frame]:
        """Read (without answering) until the server closes TCP; return the frames read."""
        frames: list[Frame] = []
        try:
            while True:
                frames.append(await self.next_frame(timeout))
        except EOFError:
            return frames

    def close(self) -> None:
        self.sock.close()


async def fill_backlog(worker: Worker, channel: str, witness: Client) -> None:
    """Publish BACKLOG_MESSAGES big messages and wait until `witness` has read them all.

    `witness` is on the same worker: once it has the last message, the worker has
    queued every message for each of its subscribers of `channel` (the fan-out hands a
    frame to all local members in one go).
    """

    async def publish() -> None:
        async with httpx.AsyncClient(base_url=worker.http, timeout=10 * UNIT) as http:
            for n in range(BACKLOG_MESSAGES):
                response = await http.post(
                    f"/api/channels/{channel}/messages",
                    json={"data": {"n": n, "pad": BACKLOG_PADDING}},
                )
                assert response.status_code == 200, response.text

    async def read() -> None:
        for n in range(BACKLOG_MESSAGES):
            frame = await witness.recv(timeout=10)
            assert (frame["type"], frame["data"]["n"]) == ("message", n)

    await asyncio.gather(publish(), read())


def monitored_commands(monitor: Any, server: RedisServer) -> list[dict[str, Any]]:
    """Every command MONITOR saw until now: ends at a marker sent after them."""
    marker = unique("marker")
    server.client().echo(marker)
    commands = []
    while True:
        command = monitor.next_command()  # bounded by the client's socket timeout
        if command["command"] == f"ECHO {marker}":
            return commands
        commands.append(command)


# -- 1. graceful shutdown -----------------------------------------------------------------


async def test_sigterm_refuses_new_connections_closes_with_1012_releases_redis_and_exits(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    leaving = make_worker(
        *redis_args(
            redis_server,
            prefix,
            "--shutdown-timeout",
            f"{SHUTDOWN_TIMEOUT:g}",
            # Room for the whole backlog of the client that stops reading (no 1013).
            "--outbox-max-messages",
            "100000",
            "--outbox-max-bytes",
            "100000000",
        )
    )
    staying = make_worker(*redis_args(redis_server, prefix))
    channel, bulk = unique("news"), unique("bulk")
    clients = [await subscribed_client(leaving, channel) for _ in range(3)]
    elsewhere = await subscribed_client(staying, channel)
    # A client that stopped reading with megabytes on their way to it: the worker can
    # flush neither them nor its close frame, so its shutdown lasts the whole timeout.
    # That is the window in which the test looks at the worker shutting down.
    stuck = await StubbornClient.connect(leaving, rcvbuf=4096)
    witness: Client | None = None
    moved: Client | None = None
    try:
        await stuck.subscribe(bulk)
        witness = await subscribed_client(leaving, bulk)
        await fill_backlog(leaving, bulk, witness)
        assert numsub(redis_server, prefix + channel) == 2
        assert numsub(redis_server, prefix + bulk) == 1
        name = leaving.redis_name(prefix)
        [pubsub] = redis_server.pubsub_clients(name)
        pubsub_port = pubsub["addr"].rsplit(":", 1)[1]

        with redis_server.client().monitor() as monitor:
            leaving.signal(signal.SIGTERM)
            signalled = time.monotonic()
            exited = asyncio.create_task(asyncio.to_thread(wait_exit, leaving))

            # Every client that answers the close is closed with 1012 (service restart).
            for client in [*clients, witness]:
                closed = await closing_frame(client)
                assert closed.rcvd is not None, closed
                assert closed.rcvd.code == 1012, closed
            # The worker is shutting down (the stuck client holds it): nothing new gets in.
            with pytest.raises(ConnectionRefusedError):
                await Client.connect(leaving.ws + "/ws")
            with pytest.raises(httpx.ConnectError):
                httpx.get(leaving.http + "/healthz", timeout=5 * UNIT)
            assert not exited.done()
            assert leaving.process is not None
            assert leaving.process.poll() is None, "the refusal must happen during shutdown"
            # 1012 means "reconnect now, elsewhere": there the conversation carries on.
            moved = await subscribed_client(staying, channel)
            message_id = staying.publish(channel, "after the move")
            for client in (moved, elsewhere):
                frame = await client.recv()
                assert (frame["id"], frame["data"]) == (message_id, "after the move")

            code, exited_at = await exited
            took = exited_at - signalled
            commands = monitored_commands(monitor, redis_server)

        print(f"\nSIGTERM to exit, with a client holding the shutdown: {took:.2f} s")
        log = leaving.log()
        # uvicorn re-raises the captured SIGTERM once it has shut down cleanly.
        assert code in (0, -signal.SIGTERM), log
        assert took < SHUTDOWN_TIMEOUT + EXIT_MARGIN, (took, log)
        # It was the timeout that ended the wait for the stuck client...
        assert "timeout graceful shutdown exceeded" in log
        # ...and the application still shut down cleanly after it.
        assert "Application shutdown complete" in log
        assert "Traceback" not in log
        # The worker itself unsubscribed before exiting (not just dropped by its death)...
        unsubscribed = {c["command"] for c in commands if c["client_port"] == pubsub_port} & {
            f"UNSUBSCRIBE {prefix}{channel}",
            f"UNSUBSCRIBE {prefix}{bulk}",
        }
        assert len(unsubscribed) == 2, [c["command"] for c in commands]
        # ...and nothing of it is left in Redis; the other worker keeps its subscription.
        wait_for(
            lambda: not redis_server.clients_named(name) and not redis_server.publish_clients(name),
            what="no connection left",
        )
        assert numsub(redis_server, prefix + channel) == 1
        assert numsub(redis_server, prefix + bulk) == 0
    finally:
        stuck.close()
        for client in [*clients, witness, moved, elsewhere]:
            if client is not None:
                await client.close()


async def test_a_client_ignoring_the_close_does_not_delay_the_exit(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # An idle client that never answers the close frame and keeps its socket open:
    # the worker does not wait for its close handshake (the backlogged case, where it
    # cannot even send the close frame, is the test above: it exits at the timeout).
    worker = make_worker(
        *redis_args(redis_server, prefix, "--shutdown-timeout", f"{SHUTDOWN_TIMEOUT:g}")
    )
    channel = unique("deaf")
    stubborn = await StubbornClient.connect(worker)
    try:
        await stubborn.subscribe(channel)
        assert numsub(redis_server, prefix + channel) == 1
        worker.signal(signal.SIGTERM)
        signalled = time.monotonic()
        frames = await stubborn.wait_eof(timeout=SHUTDOWN_TIMEOUT + EXIT_MARGIN)
        # The worker sent its 1012 and closed TCP without waiting for our reply.
        assert [f.opcode for f in frames] == [Opcode.CLOSE], frames
        assert Close.parse(frames[0].data).code == 1012
        code, exited_at = wait_exit(worker)
    finally:
        stubborn.close()
    took = exited_at - signalled
    print(f"\nSIGTERM to exit, with a client ignoring the close: {took:.2f} s")
    log = worker.log()
    assert code in (0, -signal.SIGTERM), log
    assert took < SHUTDOWN_TIMEOUT, (took, log)
    assert "timeout graceful shutdown exceeded" not in log
    assert "Application shutdown complete" in log
    assert "Traceback" not in log
    wait_for(lambda: numsub(redis_server, prefix + channel) == 0, what="subscription released")


# -- 2. SIGKILL of one worker ---------------------------------------------------------------


async def test_sigkill_of_one_worker_affects_only_its_own_clients(
    make_workers: WorkersFactory, redis_server: RedisServer, prefix: str
) -> None:
    workers = make_workers(3, *redis_args(redis_server, prefix))
    victim, publisher, other = workers
    channel = unique("kill")
    victims = [await subscribed_client(victim, channel) for _ in range(2)]
    survivors = [await subscribed_client(w, channel) for w in (publisher, other) for _ in range(2)]
    assert numsub(redis_server, prefix + channel) == 3
    marker = "after the kill"

    async def collect(client: Client) -> list[dict[str, Any]]:
        frames = []
        while True:
            frames.append(await client.recv(timeout=20))
            if frames[-1].get("data") == marker:
                return frames

    collectors = [asyncio.create_task(collect(c)) for c in survivors]
    acked: list[str] = []
    stop = asyncio.Event()

    async def publish_throughout() -> None:
        # Messages keep coming before, while and after the victim dies.
        async with httpx.AsyncClient(base_url=publisher.http, timeout=5 * UNIT) as http:
            while not stop.is_set():
                response = await http.post(
                    f"/api/channels/{channel}/messages", json={"data": {"n": len(acked)}}
                )
                assert response.status_code == 200, response.text
                acked.append(response.json()["id"])

    async def published(count: int) -> bool:
        if publishing.done():
            publishing.result()  # raises what went wrong
        return len(acked) >= count

    publishing = asyncio.create_task(publish_throughout())
    try:
        await async_wait_for(lambda: published(20), 10, "messages before the kill")
        assert victim.process is not None
        victim.process.kill()
        await asyncio.to_thread(victim.process.wait, 10 * UNIT)
        at_kill = len(acked)
        # The victim's clients see their connection drop, with no close frame.
        for client in victims:
            closed = await closing_frame(client)
            assert closed.rcvd is None, closed
            assert client.connection.close_code == 1006
        await async_wait_for(lambda: published(at_kill + 30), 10, "messages after the kill")
        stop.set()
        await asyncio.wait_for(publishing, 10 * UNIT)
    finally:
        publishing.cancel()
    # Published after the kill was seen by its clients, by another surviving worker.
    marker_id = other.publish(channel, marker)
    received = await asyncio.gather(*collectors)
    for frames in received:
        # Every acknowledged message, once, in order, and the marker right after:
        # no gap frame, no loss, no disconnection anywhere in between.
        assert [f["type"] for f in frames] == ["message"] * (len(acked) + 1)
        assert [f["id"] for f in frames] == [*acked, marker_id]
    for client in survivors:
        await client.alive()
    for worker in (publisher, other):
        assert worker.status("/readyz") == 200
        assert worker.metric(RECONNECTS) == 0
        assert worker.metric("broadcast_gaps_total") == 0
    wait_for(lambda: numsub(redis_server, prefix + channel) == 2, what="the victim's sub gone")
    print(f"\npublished {at_kill} before the kill and {len(acked) - at_kill} after it")
    for client in [*survivors, *victims]:
        await client.close()


# -- 3. start-up while Redis is down --------------------------------------------------------


# A line starts with its date and time, then the level and the worker's name.
_STAMP = r"^\S+ \S+ "
_WORKER = r"\s+\[[^\]]+\] "
_FAILED = re.compile(
    _STAMP + r"(\w+):" + _WORKER + r"Redis pub/sub connection failed \(attempt (\d+),",
    re.MULTILINE,
)
_RESTORED = re.compile(
    _STAMP + "WARNING:" + _WORKER + r"Redis pub/sub connection restored after (\d+) failures",
    re.MULTILINE,
)


async def test_a_worker_started_without_redis_retries_quietly_and_becomes_ready_alone(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    own_redis.kill()
    worker = make_worker(*redis_args(own_redis, prefix), start=False)
    worker.start(wait_ready=False)
    # Alive (it serves) but not ready, and saying why.
    wait_for(lambda: worker.status("/healthz") == 200, 20, "liveness without Redis")
    readiness = httpx.get(worker.http + "/readyz", timeout=5 * UNIT)
    assert readiness.status_code == 503
    reason = readiness.json()["reason"]
    assert "pub/sub connection down" in reason, reason
    assert f"127.0.0.1:{own_redis.port}" in reason, reason

    # It retries with backoff: once the delay has reached its cap (2 s by default, with
    # jitter: between 1 and 2 s), two more attempts take at least 2 s. Without backoff
    # they would take a fraction of a second.
    wait_for(lambda: worker.metric(RECONNECTS) >= 7, 20, "seven attempts")
    seventh = time.monotonic()
    wait_for(lambda: worker.metric(RECONNECTS) >= 9, 20, "two more attempts")
    two_attempts = time.monotonic() - seventh
    assert two_attempts > 1.5, two_attempts
    assert worker.status("/readyz") == 503

    # Logged once, at the first failure, not once per attempt (and no traceback).
    log = worker.log()
    assert [(m[0], m[1]) for m in _FAILED.findall(log)] == [("WARNING", "1")], log
    assert "Traceback" not in log
    assert "ERROR" not in log

    own_redis.start()  # returns once Redis answers
    answered = time.monotonic()
    wait_for(lambda: worker.status("/readyz") == 200, 10, "ready once Redis is back")
    took = time.monotonic() - answered
    print(f"\nready {took:.2f} s after Redis answered ({two_attempts:.2f} s for two retries)")
    assert took < 5 * UNIT, took

    log = worker.log()
    [failures] = [int(n) for n in _RESTORED.findall(log)] or [0]
    assert failures >= 9, log
    # A warning at the first failure and at every 20th, whatever the count.
    expected = [str(n) for n in range(1, failures + 1) if n == 1 or n % 20 == 0]
    assert [m[1] for m in _FAILED.findall(log)] == expected, log
    assert "Traceback" not in log

    channel = unique("late")
    client = await subscribed_client(worker, channel)
    message_id = worker.publish(channel, "finally")
    frame = await client.recv()
    assert (frame["type"], frame["id"], frame["data"]) == ("message", message_id, "finally")
    await client.close()


# -- 4. a malformed BROADCAST_URL -----------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """How `python -m service` ended: `code` is None if it started serving instead."""

    code: int | None
    stdout: str
    stderr: str
    took: float


def run_service(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> Run:
    """Run the service until it exits, or until it starts serving (then kill it)."""
    environment = hermetic_environment()
    environment.update(env or {})
    out, err = cwd / "stdout.txt", cwd / "stderr.txt"
    started = time.monotonic()
    with out.open("wb") as stdout, err.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--port", str(free_port()), *args],
            cwd=cwd,
            env=environment,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        wait_for(
            lambda: (
                process.poll() is not None or b"Application startup complete" in err.read_bytes()
            ),
            15,
            "the service to exit (or to start serving)",
        )
        took = time.monotonic() - started
    finally:
        serving = process.poll() is None
        if serving:
            process.kill()
        process.wait(10 * UNIT)
    return Run(
        None if serving else process.returncode,
        out.read_text(errors="replace"),
        err.read_text(errors="replace"),
        took,
    )


def assert_refused_at_start(run: Run, problems: dict[str, str]) -> None:
    """Exited non-zero, quickly, with one line per problem naming the setting."""
    output = run.stdout + run.stderr
    assert run.code is not None, f"it started serving:\n{output}"
    assert run.code != 0, output
    assert run.took < 10 * UNIT, run.took
    assert "Traceback" not in output, output
    assert "Started server process" not in output, output
    lines = run.stderr.strip().splitlines()
    for setting, what in problems.items():
        [line] = [line for line in lines if setting in line.lower()]
        assert what in line, line
    # A heading and nothing but the problems.
    assert len(lines) <= 1 + len(problems), lines


def _nobody() -> str:
    """host:port where nothing listens (never the shared Redis on 6379)."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("url", "what"),
    [
        pytest.param("redis://host:notaport/0", "malformed port", id="port-not-a-number"),
        pytest.param("postgres://x", "unsupported scheme 'postgres'", id="other-scheme"),
        pytest.param("redis:///0", "needs a host", id="no-host"),
        pytest.param(f"redis://{_nobody()}/abc", "database must be a number", id="db-not-a-number"),
        # redis-py interprets the query string: a bad value, and an unknown parameter
        # (which it rejects only when building a connection), are refused at start too.
        pytest.param(
            f"redis://{_nobody()}/0?socket_timeout=abc", "socket_timeout", id="bad-query-value"
        ),
        pytest.param(f"redis://{_nobody()}/0?colour=blue", "colour", id="unknown-query-parameter"),
    ],
)
def test_a_malformed_broadcast_url_is_a_clear_error_at_start(
    url: str, what: str, tmp_path: Path
) -> None:
    run = run_service(["--broadcast-url", url], tmp_path)
    assert_refused_at_start(run, {"broadcast_url": what})
    print(f"\nrefused in {run.took:.2f} s: {run.stderr.strip()!r}")


def test_a_malformed_broadcast_url_in_the_environment_is_a_clear_error(tmp_path: Path) -> None:
    run = run_service([], tmp_path, env={"BROADCAST_URL": "redis://host:notaport/0"})
    assert_refused_at_start(run, {"broadcast_url": "malformed port"})


def test_each_problem_of_the_settings_gets_its_own_line(tmp_path: Path) -> None:
    run = run_service(["--broadcast-url", "postgres://x", "--max-data-bytes", "0"], tmp_path)
    assert_refused_at_start(
        run,
        {"broadcast_url": "unsupported scheme 'postgres'", "max_data_bytes": "greater than 0"},
    )
