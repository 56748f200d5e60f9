"""Test helpers: real redis-server and worker processes, a WebSocket client, polling waits.

Every wait polls a condition against a deadline in units of `UNIT` seconds (raise
TEST_TIME_UNIT on a slow machine); nothing sleeps for a fixed time to "let things
settle". Processes are started here and stopped by their own PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import inspect
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import redis
import websockets
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from service.settings import SETTINGS_ENV_VAR, Settings

UNIT = float(os.environ.get("TEST_TIME_UNIT", "1.0"))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def unique(prefix: str = "t") -> str:
    """A fresh name, so tests never share channels or Redis prefixes."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def seq_of(message_id: str) -> int:
    """The sequence number in a message id (`<epoch>:<seq>`); tests may look inside ids."""
    return int(message_id.rpartition(":")[2])


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout` units."""
    deadline = time.monotonic() + timeout * UNIT
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
        except Exception as exc:  # a condition may fail until the thing is up
            last_error = exc
        else:
            if result:
                return result
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what or condition}: last error {last_error!r}")


async def async_wait_for(
    condition: Callable[[], Any], timeout: float = 10.0, what: str = ""
) -> Any:
    """`wait_for` for async tests: `condition` may return an awaitable (a coroutine) or
    a plain value; either way the event loop runs between polls."""
    deadline = time.monotonic() + timeout * UNIT
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            result = condition()
            if inspect.isawaitable(result):
                result = await result
        except Exception as exc:
            last_error = exc
        else:
            if result:
                return result
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}: last error {last_error!r}")


#: Settings of every worker a test starts, unless the test sets them itself: the suite's
#: `--public-paths` run sets FAST_ADAPTERS=false here (tests/conftest.py).
WORKER_DEFAULTS: dict[str, str] = {}


def hermetic_environment() -> dict[str, str]:
    """This process's environment without any of the service's settings in it."""
    settings = {name.upper() for name in Settings.model_fields} | {SETTINGS_ENV_VAR}
    return {k: v for k, v in os.environ.items() if k not in settings}


class RedisServer:
    """A redis-server of the test's own on a free loopback port (never the shared one)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.process: subprocess.Popen[bytes] | None = None
        self._client: redis.Redis | None = None
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (.ci/run installs it)")
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
                "--logfile",
                str(self.workdir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: self.client().ping(), what=f"redis-server on port {self.port}")

    def client(self) -> redis.Redis:
        """The test's own (sync) client of this server, reconnecting as needed."""
        if self._client is None:
            self._client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2 * UNIT)
        return self._client

    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def pubsub_clients(self, name: str) -> list[dict[str, Any]]:
        """Redis's CLIENT LIST entries of subscription connections named `name`."""
        return [
            c
            for c in self.client().client_list()
            if c.get("name") == name and "P" in c.get("flags", "")
        ]

    def kill_pubsub_of(self, name: str) -> dict[str, Any]:
        """Kill the one subscription connection named `name`; its CLIENT LIST entry."""
        [pubsub] = self.pubsub_clients(name)
        self.client().client_kill_filter(_id=pubsub["id"])
        return pubsub

    def clients_named(self, name: str) -> list[dict[str, Any]]:
        """The connections (the command pool's and pub/sub) a worker opened under `name`."""
        return [c for c in self.client().client_list() if c.get("name") == name]

    def publish_clients(self, name: str) -> list[dict[str, Any]]:
        """The publish connection of the worker whose other connections are named `name`."""
        return self.clients_named(name + ":publish")


class Worker:
    """One `python -m service` process (a real uvicorn worker) on a free port.

    `host` is any loopback address (the whole of 127.0.0.0/8 is local): several workers
    may then share one port, as replicas behind one service name do.
    """

    def __init__(
        self,
        workdir: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        program: list[str] | None = None,
    ) -> None:
        #: What runs: `python -m service` unless a test runs an app of its own on uvicorn.
        self.program = program or [sys.executable, "-m", "service"]
        self.host = host
        self.port = port or free_port()
        self.workdir = workdir
        self.args = args
        self.env = env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"worker-{host}-{self.port}.log"

    @property
    def http(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def start(self, *, wait_ready: bool = True) -> Worker:
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = hermetic_environment()
        env.update(WORKER_DEFAULTS)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            # Started from an empty directory so that no developer's .env leaks in.
            self.process = subprocess.Popen(
                [
                    *self.program,
                    *("--host", self.host, "--port", str(self.port)),
                    *self.args,
                ],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if wait_ready:
            self.wait_ready()
        return self

    def status(self, path: str) -> int:
        return httpx.get(self.http + path, timeout=5 * UNIT).status_code

    def wait_ready(self, timeout: float = 20.0) -> None:
        def ready() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited early:\n{self.log()}")
            return self.status("/readyz") == 200

        try:
            wait_for(ready, timeout, what=f"worker on {self.host}:{self.port} to be ready")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- worker log ---\n{self.log()}") from None

    def redis_name(self, prefix: str) -> str:
        """The CLIENT SETNAME of this worker's Redis connections: prefix + worker id."""
        return prefix + str(httpx.get(self.http + "/healthz", timeout=5 * UNIT).json()["worker"])

    def metric(self, name: str) -> float:
        """One sample of this worker's /metrics (0 when absent)."""
        text = httpx.get(self.http + "/metrics", timeout=5 * UNIT).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def publish(self, channel: str, data: Any, api_key: str | None = None) -> str:
        """Publish over the HTTP API (with `api_key` when auth is on); the message id."""
        response = httpx.post(
            f"{self.http}/api/channels/{channel}/messages",
            json={"data": data},
            headers={} if api_key is None else {"X-API-Key": api_key},
            timeout=5 * UNIT,
        )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    async def publish_async(self, channel: str, data: Any, api_key: str | None = None) -> str:
        """`publish` for async tests: does not block the event loop."""
        async with httpx.AsyncClient(timeout=5 * UNIT) as http:
            response = await http.post(
                f"{self.http}/api/channels/{channel}/messages",
                json={"data": data},
                headers={} if api_key is None else {"X-API-Key": api_key},
            )
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=15 * UNIT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)


class Client:
    """A real WebSocket client speaking protocol v1."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    @classmethod
    async def connect(cls, url: str, **kwargs: Any) -> Client:
        kwargs.setdefault("open_timeout", 10 * UNIT)
        kwargs.setdefault("compression", None)
        return cls(await websockets.connect(url, **kwargs))

    async def send(self, frame: Any) -> None:
        if isinstance(frame, (str, bytes)):
            await self.connection.send(frame)
        else:
            await self.connection.send(json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.connection.recv(), timeout * UNIT)
        frame = json.loads(raw)
        assert isinstance(frame, dict), raw
        return frame

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame, which must be of type `kind`."""
        frame = await self.recv(timeout)
        assert frame["type"] == kind, frame
        return frame

    async def welcome(self) -> dict[str, Any]:
        return await self.recv_type("welcome")

    async def subscribe(self, channel: str, **extra: Any) -> dict[str, Any]:
        await self.send({"type": "subscribe", "channel": channel, **extra})
        return await self.recv_type("subscribed")

    async def publish(self, channel: str, data: Any, ref: Any = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "publish", "channel": channel, "data": data}
        if ref is not None:
            frame["ref"] = ref
        await self.send(frame)
        return await self.recv_type("published")

    async def alive(self) -> None:
        """Assert the connection still answers commands."""
        await self.send({"type": "ping", "ref": "alive?"})
        assert await self.recv() == {"type": "pong", "ref": "alive?"}

    async def close_code(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; its close code (None: no close frame came)."""
        try:
            while True:
                await self.recv(timeout)
        except ConnectionClosed as closed:
            return None if closed.rcvd is None else closed.rcvd.code

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.connection.close(), 5 * UNIT)


async def subscribed_client(worker: Worker, *channels: str, **kwargs: Any) -> Client:
    """A client of `worker`'s /ws, past its welcome and subscribed to `channels`."""
    client = await Client.connect(worker.ws + "/ws", **kwargs)
    await client.welcome()
    for channel in channels:
        await client.subscribe(channel)
    return client


def tiny_buffer_socket(port: int) -> socket.socket:
    """A socket connected to `port` with a 4 KB receive buffer: a client that stops
    reading fills up quickly."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    return sock


def redis_args(server: RedisServer, prefix: str, *extra: str) -> list[str]:
    """Worker flags for a Redis backend with a private prefix."""
    return ["--broadcast-url", server.url, "--redis-prefix", prefix, *extra]


def start_all(workers: list[Worker], timeout: float = 20.0) -> None:
    """Start `workers` side by side and wait until each is ready."""
    for worker in workers:
        worker.start(wait_ready=False)
    for worker in workers:
        worker.wait_ready(timeout)


@contextlib.contextmanager
def started(*workers: Worker) -> Iterator[tuple[Worker, ...]]:
    """Start workers (ready) and always stop them."""
    try:
        start_all(list(workers))
        yield workers
    finally:
        for worker in workers:
            worker.stop()


class RedisProxy:
    """A loopback TCP proxy to Redis that injects faults.

    * `arm(marker)`: forward the next request containing `marker`, then no more replies
      on that connection until `cut()` aborts it: the client sees the connection break
      after Redis has run the command.
    * `deafen_open_connections()`: from now on, the connections open at this moment get
      no pub/sub message pushed to them, while every other reply (PONGs included) still
      passes: subscriptions gone silent without an error. New connections are healthy.
    """

    def __init__(self, redis_port: int) -> None:
        self.redis_port = redis_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._marker: bytes | None = None
        self._swallowing: list[asyncio.StreamWriter] = []
        self._writers: list[asyncio.StreamWriter] = []
        self._open: set[asyncio.StreamWriter] = set()
        self._deaf: set[asyncio.StreamWriter] = set()

    async def start(self) -> RedisProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def arm(self, marker: bytes) -> None:
        self._marker = marker

    def deafen_open_connections(self) -> None:
        self._deaf |= self._open

    def cut(self) -> None:
        for writer in self._swallowing:
            writer.transport.abort()

    async def close(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        redis_r, redis_w = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self._writers.extend([client_w, redis_w])
        self._open.add(client_w)
        swallow = False

        async def upstream() -> None:
            nonlocal swallow
            while data := await client_r.read(65536):
                if self._marker is not None and self._marker in data:
                    self._marker = None
                    swallow = True
                    self._swallowing.extend([client_w, redis_w])
                redis_w.write(data)
                await redis_w.drain()

        async def downstream() -> None:
            while data := await redis_r.read(65536):
                if client_w in self._deaf and b"$7\r\nmessage\r\n" in data:
                    continue
                if not swallow:
                    client_w.write(data)
                    await client_w.drain()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        self._open.discard(client_w)
        for writer in (client_w, redis_w):
            writer.transport.abort()


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, made here (no openssl binary needed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path
