"""The many-connections tool's load generator (bench/loadgen/listeners.c) against scripted servers.

Each test starts the compiled generator with one or a few connections and a server on a
loopback port that plays one script byte by byte: the opening handshake (right, refused,
wrong, or never answered), the service's frames (welcome, subscribed, messages), and
what a peer may send besides (fragments, pings, closes, frames that break RFC 6455).
Checked: what the generator reports on stdout, and what it sends back. With real
workers the tool itself runs in tests/e2e/test_many_connections.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from bench import listeners
from tests.helpers import UNIT, async_wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
Script = Callable[["Peer"], Awaitable[None]]


def frame(
    opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = False
) -> bytes:
    """A frame as a server writes it (unmasked unless `mask`)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    length = len(payload)
    masked = 0x80 if mask else 0
    if length < 126:
        head = bytes([first, masked | length])
    elif length < 65536:
        head = bytes([first, masked | 126]) + struct.pack("!H", length)
    else:
        head = bytes([first, masked | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def text(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode()


def broadcast(k: int, *, pad: int = 0) -> bytes:
    """A `message` frame's payload as the service sends it, sent now (CLOCK_MONOTONIC)."""
    data: dict[str, Any] = {"k": k, "t": time.monotonic() * 1000}
    if pad:
        data["pad"] = "x" * pad
    return text({"type": "message", "channel": "c", "data": data, "seq": 1})


class Peer:
    """The server's side of one connection, in a script."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.request = b""

    async def read_request(self) -> str:
        """The handshake request's head; its Sec-WebSocket-Key."""
        self.request = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 5 * UNIT)
        for line in self.request.decode("latin-1").split("\r\n"):
            name, _, value = line.partition(":")
            if name.strip().lower() == "sec-websocket-key":
                return value.strip()
        raise AssertionError(f"no Sec-WebSocket-Key in {self.request!r}")

    async def accept(self, then: bytes = b"", *, accept: str | None = None) -> None:
        """Answer 101 (with `accept` instead of the right key, if given), and `then`."""
        key = await self.read_request()
        right = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        self.writer.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept or right}\r\n\r\n"
            ).encode()
            + then
        )
        await self.writer.drain()

    async def subscribe(self) -> None:
        """The service's side of a subscription: welcome, the client's subscribe, subscribed."""
        await self.accept(frame(0x1, text({"type": "welcome"})))
        opcode, payload = await self.read_frame()
        assert opcode == 0x1
        assert json.loads(payload) == {"type": "subscribe", "channel": "c"}
        await self.send(frame(0x1, text({"type": "subscribed", "channel": "c"})))

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def read_frame(self) -> tuple[int, bytes]:
        """The next frame from the client, which must be masked: its opcode and payload."""
        first, second = await asyncio.wait_for(self.reader.readexactly(2), 5 * UNIT)
        assert first & 0x80, "a fragmented frame from the client"
        assert second & 0x80, "an unmasked frame from the client"
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        key = await self.reader.readexactly(4)
        payload = await self.reader.readexactly(length)
        return first & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    async def read_close(self) -> int:
        """The client's close frame (skipping nothing else): its code."""
        opcode, payload = await self.read_frame()
        assert opcode == 0x8, (opcode, payload)
        (code,) = struct.unpack("!H", payload[:2])
        return int(code)


@asynccontextmanager
async def server(*scripts: Script) -> AsyncIterator[tuple[int, list[BaseException]]]:
    """A server whose n-th connection plays `scripts[n]` (the last one for any after)."""
    problems: list[BaseException] = []
    served = 0
    tasks: list[asyncio.Task[None]] = []

    async def play(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal served
        script = scripts[min(served, len(scripts) - 1)]
        served += 1
        try:
            await script(Peer(reader, writer))
        except BaseException as exc:
            problems.append(exc)
        finally:
            writer.close()

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.ensure_future(play(reader, writer)))

    listening = await asyncio.start_server(connected, "127.0.0.1", 0)
    try:
        yield listening.sockets[0].getsockname()[1], problems
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks), 10 * UNIT)
    finally:
        for task in tasks:
            task.cancel()
        listening.close()


class Generator:
    """The listeners binary, with its stdout read line by line as JSON."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def event(self, kind: str) -> dict[str, Any]:
        """The next line whose `event` is `kind` (others are skipped)."""
        assert self.process.stdout is not None
        while True:
            raw = await asyncio.wait_for(self.process.stdout.readline(), 10 * UNIT)
            assert raw, f"the generator ended before {kind!r}: {await self.errors()}"
            line: dict[str, Any] = json.loads(raw)
            if line["event"] == kind:
                return line

    async def command(self, **fields: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(fields).encode() + b"\n")
        await self.process.stdin.drain()

    async def errors(self) -> str:
        assert self.process.stderr is not None
        return (await self.process.stderr.read()).decode(errors="replace")

    async def close(self) -> dict[str, Any]:
        """Ask it to close everything; its result."""
        await self.command(cmd="close")
        result = (await self.event("result"))["result"]
        assert await asyncio.wait_for(self.process.wait(), 10 * UNIT) == 0
        return dict(result)


@asynccontextmanager
async def generator(port: int, connections: int = 1, **config: Any) -> AsyncIterator[Generator]:
    binary = listeners.ensure_built()
    settings = {
        "urls": [f"ws://127.0.0.1:{port}/ws?token=x"],
        "connections": connections,
        "offset": 0,
        "channel": "c",
        "localAddresses": ["127.0.0.1"],
        "parallel": 4,
        "retries": 0,
        "progressMs": 100,
        "handshakeTimeoutMs": int(3000 * UNIT),
        "deadlineMs": int(40_000 * UNIT),
        **config,
    }
    process = await asyncio.create_subprocess_exec(
        str(binary),
        json.dumps(settings),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield Generator(process)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def collected(gen: Generator, k: int) -> dict[str, Any]:
    await gen.command(cmd="collect", k=k, timeoutMs=int(3000 * UNIT))
    return await gen.event("collected")


async def test_a_subscription_and_its_messages_whole_cut_and_long() -> None:
    async def script(peer: Peer) -> None:
        await peer.subscribe()
        assert peer.request.startswith(b"GET /ws?token=x HTTP/1.1\r\n")
        assert b"\r\nHost: 127.0.0.1:" in peer.request
        await peer.send(frame(0x1, broadcast(0)))
        # Cut at every byte, then lengths that take 16 and 64 bits.
        for byte in frame(0x1, broadcast(1)):
            await peer.send(bytes([byte]))
        await peer.send(frame(0x1, broadcast(2, pad=300)))
        await peer.send(frame(0x1, broadcast(3, pad=70_000)))
        assert await peer.read_close() == 1000
        await peer.send(frame(0x8, struct.pack("!H", 1000)))

    async with server(script) as (port, problems), generator(port) as gen:
        ready = await gen.event("ready")
        assert ready["connected"] == 1
        assert ready["failures"] == 0
        assert ready["first_failure"] is None
        for k in range(4):
            got = await collected(gen, k)
            assert (got["k"], got["received"], got["connected"]) == (k, 1, 1)
            [latency] = got["latencies_ms"]
            assert 0 <= latency < 5000
        for k in (-1, 4096, 10**12):  # broadcasts it holds no place for: received by none
            await gen.command(cmd="collect", k=k, timeoutMs=50)
            got = await gen.event("collected")
            assert (got["k"], got["received"], got["latencies_ms"]) == (k, 0, [])
        result = await gen.close()
    assert not problems, problems
    assert result["duplicates"] == 0
    assert result["closes"] == {}  # its own close is not a close it was dealt


async def test_a_fragmented_message_a_repeat_and_frames_in_the_same_read_as_the_101() -> None:
    async def script(peer: Peer) -> None:
        await peer.accept(frame(0x1, text({"type": "welcome"})) + frame(0x9, b"hi"))
        assert await peer.read_frame() == (0x1, b'{"type":"subscribe","channel":"c"}')
        assert await peer.read_frame() == (0xA, b"hi")
        await peer.send(frame(0x1, text({"type": "subscribed", "channel": "c"})))
        whole = broadcast(0)
        await peer.send(frame(0x1, whole[:10], fin=False) + frame(0x0, whole[10:20], fin=False))
        await peer.send(frame(0x9, b"between") + frame(0x0, whole[20:]))
        assert await peer.read_frame() == (0xA, b"between")
        await peer.send(frame(0x1, whole))  # the same message again: a duplicate
        assert await peer.read_close() == 1000
        await peer.send(frame(0x8, struct.pack("!H", 1000)))

    async with server(script) as (port, problems), generator(port) as gen:
        assert (await gen.event("ready"))["connected"] == 1
        assert (await collected(gen, 0))["received"] == 1
        result = await gen.close()
    assert not problems, problems
    assert result["duplicates"] == 1


async def test_a_close_from_the_server_is_echoed_and_counted() -> None:
    go = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.subscribe()
        await go.wait()  # once the generator is ready: else it may be gone before it counts
        await peer.send(frame(0x8, struct.pack("!H", 4000) + b"bye"))
        assert await peer.read_close() == 4000
        # The client leaves closing the TCP connection to the server (RFC 6455, 7.1.1),
        # so that the server's side, not the client's address, waits in TIME_WAIT.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(peer.reader.read(1), 0.3 * UNIT)

    async with server(script) as (port, problems), generator(port) as gen:
        assert (await gen.event("ready"))["connected"] == 1
        go.set()

        async def nobody_connected() -> bool:
            got = await collected(gen, 0)
            return (got["received"], got["connected"]) == (0, 0)

        await async_wait_for(nobody_connected, what="the close to be echoed")
        result = await gen.close()
    assert not problems, problems
    assert result["closes"] == {"4000": 1}


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (frame(0x1, b'{"type":"x"}', mask=True), 1002),  # a masked frame from the server
        (frame(0x1, b'{"type":"x"}', rsv=4), 1002),  # a reserved bit
        (frame(0x2, b"\x00\x01"), 1003),  # binary
        (frame(0xB, b""), 1002),  # an unknown control opcode
        (frame(0x9, b"", fin=False), 1002),  # a fragmented ping
        (frame(0x0, b"more"), 1002),  # a continuation of nothing
        (frame(0x1, b'{"type":"message","data":"\xc3\x28"}'), 1007),  # not UTF-8
        (frame(0x1, b'{"type":"x","a":"\xed\xa0\x80"}'), 1007),  # a surrogate
        (frame(0x1, b"x" * (2**20 + 1)), 1009),  # over the 1 MiB it takes
        (frame(0x8, b"\x03"), 1002),  # a close with half a code
        (frame(0x8, struct.pack("!H", 1005)), 1002),  # a code no frame may carry
        (frame(0x8, struct.pack("!H", 1000) + b"\xff"), 1002),  # a reason not UTF-8
    ],
)
async def test_a_protocol_error_fails_the_connection_with_its_code(bad: bytes, code: int) -> None:
    go = asyncio.Event()

    async def script(peer: Peer) -> None:
        await peer.subscribe()
        await go.wait()  # once the generator is ready, so that it counts a close
        await peer.send(bad)
        assert await peer.read_close() == code

    async with server(script) as (port, problems), generator(port) as gen:
        assert (await gen.event("ready"))["connected"] == 1
        go.set()

        async def nobody_connected() -> bool:
            return (await collected(gen, 0))["connected"] == 0

        await async_wait_for(nobody_connected, what="the connection to fail")
        result = await gen.close()
    assert not problems, problems
    assert result["closes"] == {str(code): 1}


async def refuse(peer: Peer) -> None:
    await peer.read_request()
    await peer.send(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")


async def wrong_accept(peer: Peer) -> None:
    await peer.accept(accept=base64.b64encode(b"x" * 20).decode())


async def silent(peer: Peer) -> None:
    await peer.read_request()
    await asyncio.sleep(2 * UNIT)


async def hang_up(peer: Peer) -> None:
    await peer.read_request()


async def offer_an_extension(peer: Peer) -> None:
    key = await peer.read_request()
    right = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
    await peer.send(
        (
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {right}\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"
        ).encode()
    )


async def error_frame(peer: Peer) -> None:
    await peer.accept(frame(0x1, text({"type": "welcome"})))
    await peer.read_frame()
    await peer.send(frame(0x1, text({"type": "error", "code": "forbidden", "message": "no"})))


@pytest.mark.parametrize(
    ("script", "why"),
    [
        (refuse, "not a 101 response: HTTP/1.1 403 Forbidden"),
        (wrong_accept, "101 with a wrong Sec-WebSocket-Accept"),
        (silent, "no subscription within the handshake timeout"),
        (hang_up, "closed 1006 before subscribing"),
        (offer_an_extension, "101 with an extension, though none was offered"),
        (error_frame, "error forbidden"),
    ],
)
async def test_a_connection_that_is_not_subscribed_is_a_failure_that_says_why(
    script: Script, why: str
) -> None:
    async with server(script) as (port, _), generator(port, handshakeTimeoutMs=500) as gen:
        ready = await gen.event("ready")
        assert (ready["connected"], ready["failures"], ready["failed_attempts"]) == (0, 1, 1)
        assert ready["first_failure"].startswith(why), ready
        assert ready["first_round_failure"] == ready["first_failure"]
        await gen.close()


async def test_a_port_with_nobody_there_is_a_failure() -> None:
    async with server(hang_up) as (port, _):
        pass  # closed: nothing listens on the port any more
    async with generator(port) as gen:
        ready = await gen.event("ready")
        assert (ready["connected"], ready["failures"]) == (0, 1)
        assert "refused" in ready["first_failure"].lower()
        await gen.close()


async def test_those_that_failed_try_again_after_the_others() -> None:
    async def subscribe_then_stay(peer: Peer) -> None:
        await peer.subscribe()
        assert await peer.read_close() == 1000

    # The first attempt is refused, the other two and the retry subscribe.
    async with (
        server(refuse, subscribe_then_stay) as (port, problems),
        generator(port, connections=3, parallel=1, retries=2) as gen,
    ):
        ready = await gen.event("ready")
        assert (ready["connected"], ready["failures"]) == (3, 0)
        assert ready["first_round_failures"] == 1
        assert ready["first_round_failure"].startswith("not a 101 response")
        assert ready["failed_attempts"] == 1
        await gen.close()
    assert not problems, problems


async def test_a_config_it_cannot_use_is_refused_with_what_it_needs() -> None:
    binary = listeners.ensure_built()
    process = await asyncio.create_subprocess_exec(
        str(binary), json.dumps({"connections": 1}), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    assert process.returncode == 1
    line = json.loads(out)
    assert line["event"] == "failed"
    assert "urls" in line["error"]
