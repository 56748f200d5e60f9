"""The floor: the benchmark's work done by a worker with no framework at all.

`python -m bench --floor` runs this in place of the service's workers, so that the
service's figures can be read against what the topology itself costs on the machine.
It speaks just enough of protocol v1 for the load generator (`welcome`, `subscribe`,
`publish` and its acknowledgement, `message`) and does, per message, what the service
must do, with the service's own Redis script: a publish is numbered, kept in history
and published, and each worker writes every message it receives from Redis to its
local subscribers, the frame built once. Everything else is left out: no ASGI, no
task or queue per connection, no checks, limits or metrics, no reconnects; each step
is a callback of the event loop (uvloop), and hiredis parses Redis's replies.

Not a server to use: no authentication, no flow control, no compression, no history
reads (so not the `storm` scenario), and it trusts its clients (one unfragmented frame
per message). Of the settings it takes the port, worker id, Redis prefix, history and
timeout ones; of `BROADCAST_URL` only the host and port (the benchmark's own Redis).

    python -m bench.floor --port 8001 --worker-id w0   (BROADCAST_URL: the Redis)
"""

from __future__ import annotations

import asyncio
import sys
from collections import deque
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import urlsplit

import hiredis
import orjson
import uvloop
from redis.typing import EncodableT
from websockets.speedups import apply_mask
from websockets.utils import accept_key

from service.__main__ import parse_settings
from service.broker.redis_history import PUBLISH_SCRIPT, publish_call, publish_token_ttl
from service.protocol import frames
from service.protocol.codes import ErrorCode
from service.protocol.wire import text_frame
from service.settings import Settings

Reply = Callable[[Any], None]

_READY = b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
_UPGRADED = (
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-accept: %s\r\n\r\n"
)
_CLOSE, _PING, _PONG, _TEXT = 8, 9, 10, 1


class RedisConnection(asyncio.Protocol):
    """One Redis connection: commands written at once, replies handed out in order.

    On a pub/sub connection, `message` pushes go to `on_message` (channel, payload).
    """

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._replies: deque[Reply] = deque()
        self.on_message: Callable[[bytes, bytes], None] | None = None
        self._transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        """Parse what arrived; hand out each reply or message."""
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if self.on_message is not None and reply[0] == b"message":
                self.on_message(reply[1], reply[2])
            else:
                self._replies.popleft()(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        """The floor does not reconnect: the worker ends (see `serve`)."""
        if not self.lost.done():
            self.lost.set_result(None)

    def call(self, reply: Reply, *args: EncodableT) -> None:
        """Send one command; `reply` gets its reply (an exception for an error reply)."""
        assert self._transport is not None
        self._replies.append(reply)
        # hiredis's stub types the argument as a tuple of one item; it takes any number.
        self._transport.write(hiredis.pack_command(args))  # type: ignore[arg-type]


class Channel:
    """A channel's local subscribers, and who waits for its SUBSCRIBE to take effect."""

    __slots__ = ("members", "waiting")

    def __init__(self) -> None:
        self.members: set[asyncio.Transport] = set()
        self.waiting: list[Callable[[], None]] | None = []  # None: subscribed in Redis


class Floor:
    """One worker's state: its Redis connections and its channels."""

    def __init__(self, settings: Settings, pipe: RedisConnection, pubsub: RedisConnection) -> None:
        self.settings = settings
        self.welcome = text_frame(frames.welcome(settings.worker_id))
        self._pipe = pipe
        self._pubsub = pubsub
        pubsub.on_message = self.on_message
        self._channels: dict[bytes, Channel] = {}
        self._prefix = settings.redis_prefix
        self._sha = b""  # set by `load`
        self._token_ttl = publish_token_ttl(settings.broker_timeout)

    async def load(self) -> None:
        """Load the publish script into Redis (publishes call it by its SHA)."""
        loaded: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pipe.call(loaded.set_result, "SCRIPT", "LOAD", PUBLISH_SCRIPT)
        sha = await loaded
        if isinstance(sha, Exception):
            raise sha
        self._sha = sha

    def on_message(self, key: bytes, payload: bytes) -> None:
        """A message from Redis: its frame, built once, written to every local member."""
        channel = self._channels.get(key)
        if channel is not None:
            data = text_frame(payload.decode())
            for transport in channel.members:
                # A transport leaves `members` only when its connection is lost, after
                # it started closing: writing to it then would raise.
                if not transport.is_closing():
                    transport.write(data)

    def subscribe(self, name: str, transport: asyncio.Transport, done: Callable[[], None]) -> None:
        """Add a member; `done` runs once Redis delivers the channel's messages here."""
        key = (self._prefix + name).encode()
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = Channel()
            waiting = channel.waiting

            def subscribed(_: Any) -> None:
                channel.waiting = None
                for callback in waiting or ():
                    callback()

            self._pubsub.call(subscribed, "SUBSCRIBE", key)
        channel.members.add(transport)
        if channel.waiting is None:
            done()
        else:
            channel.waiting.append(done)

    def leave(self, transport: asyncio.Transport) -> None:
        """Remove a member from every channel (channels stay subscribed)."""
        for channel in self._channels.values():
            channel.members.discard(transport)

    def publish(self, name: str, data: bytes, done: Reply) -> None:
        """Run the service's publish script; `done` gets the message id or an error."""
        settings = self.settings
        keys, args = publish_call(
            name,
            data,
            prefix=self._prefix,
            pubsub_key=(self._prefix + name).encode(),
            publish_command=b"PUBLISH",
            size=settings.history_size,
            ttl=settings.history_ttl,
            meta_ttl=settings.history_meta_ttl,
            token_ttl=self._token_ttl,
        )
        self._pipe.call(done, "EVALSHA", self._sha, len(keys), *keys, *args)


class Client(asyncio.Protocol):
    """One client connection: the handshake (or /readyz), then WebSocket frames."""

    def __init__(self, floor: Floor) -> None:
        self._floor = floor
        self._buffer = b""
        self._open = False
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        # uvloop's transports are not subclasses of asyncio.Transport, only alike.
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Leave every channel."""
        if self._transport is not None:
            self._floor.leave(self._transport)

    def data_received(self, data: bytes) -> None:
        """Read the handshake, then whole frames."""
        transport = self._transport
        assert transport is not None
        buffer = self._buffer + data
        if not self._open:
            head, found, buffer = buffer.partition(b"\r\n\r\n")
            if not found:
                self._buffer = head
                return
            if not self._handshake(head, transport):
                return
        start = 0
        while len(buffer) - start >= 2:
            opcode = buffer[start] & 0x0F
            length = buffer[start + 1] & 0x7F
            at = start + 2
            if length >= 126:
                size = 2 if length == 126 else 8
                if len(buffer) < at + size:
                    break
                length = int.from_bytes(buffer[at : at + size], "big")
                at += size
            end = at + 4 + length
            if len(buffer) < end:
                break
            payload = apply_mask(buffer[at + 4 : end], buffer[at : at + 4])
            start = end
            self._frame(opcode, payload, transport)
        self._buffer = buffer[start:]

    def _handshake(self, head: bytes, transport: asyncio.Transport) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        path = lines[0].split(" ")[1] if " " in lines[0] else ""
        if path == "/ws" and "sec-websocket-key" in headers:
            transport.write(_UPGRADED % accept_key(headers["sec-websocket-key"]).encode())
            transport.write(self._floor.welcome)
            self._open = True
            return True
        transport.write(_READY if path == "/readyz" else _NOT_FOUND)
        transport.close()
        return False

    def _frame(self, opcode: int, payload: bytes, transport: asyncio.Transport) -> None:
        if opcode == _TEXT:
            self._command(orjson.loads(payload), transport)
        elif opcode == _PING:
            transport.write(bytes((0x80 | _PONG, len(payload))) + payload)
        elif opcode == _CLOSE:
            transport.write(bytes((0x80 | _CLOSE, min(len(payload), 2))) + payload[:2])
            transport.close()

    def _command(self, command: dict[str, Any], transport: asyncio.Transport) -> None:
        kind, channel, ref = command.get("type"), command.get("channel"), command.get("ref")
        if not isinstance(channel, str):
            return
        # Replies run from Redis's callbacks, maybe after the client left: writing to a
        # closed transport raises, and would take the Redis connection down with it.
        if kind == "subscribe":

            def subscribed() -> None:
                if not transport.is_closing():
                    transport.write(text_frame(frames.subscribed(channel, ref)))

            self._floor.subscribe(channel, transport, subscribed)
        elif kind == "publish":

            def published(message_id: Any) -> None:
                if isinstance(message_id, Exception):
                    # As the service answers: the generator counts it as refused.
                    reply = frames.error(ErrorCode.UNAVAILABLE, f"not published: {message_id}", ref)
                else:
                    reply = frames.published(channel, message_id.decode(), ref)
                if not transport.is_closing():
                    transport.write(text_frame(reply))

            self._floor.publish(channel, orjson.dumps(command.get("data")), published)


async def serve(settings: Settings) -> None:
    """Connect to Redis, listen, and run until Redis goes away."""
    url = urlsplit(settings.broadcast_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    loop = asyncio.get_running_loop()
    _, pipe = await loop.create_connection(RedisConnection, host, port)
    _, pubsub = await loop.create_connection(RedisConnection, host, port)
    floor = Floor(settings, pipe, pubsub)
    await floor.load()
    # uvicorn's backlog, so that `burst` meets the same accept queue.
    server = await loop.create_server(
        lambda: Client(floor), settings.host, settings.port, backlog=2048
    )
    print(f"floor worker {settings.worker_id} on {settings.host}:{settings.port}", flush=True)
    async with server:
        await asyncio.wait([pipe.lost, pubsub.lost], return_when=asyncio.FIRST_COMPLETED)
    sys.exit("Redis went away")


def main() -> None:
    """Run one floor worker with the service's flags and settings."""
    uvloop.run(serve(parse_settings(sys.argv[1:])))


if __name__ == "__main__":
    main()
