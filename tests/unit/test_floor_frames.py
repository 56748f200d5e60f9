"""bench/floor.py's reading of a client: the handshake and masked frames, in any pieces."""

from __future__ import annotations

import os
from typing import Any, cast

import orjson
import pytest
from websockets.frames import Frame, Opcode

from bench.floor import Client, Floor


class Transport:
    """What the client protocol writes, and whether it closed."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Recorder:
    """Stands in for the worker's Redis side: records the commands the client parsed."""

    welcome = b"<welcome>"

    def __init__(self) -> None:
        self.commands: list[tuple[str, str, Any]] = []

    def subscribe(self, name: str, transport: object, done: Any) -> None:
        self.commands.append(("subscribe", name, None))

    def publish(self, name: str, data: bytes, done: Any) -> None:
        self.commands.append(("publish", name, orjson.loads(data)))

    def leave(self, transport: object) -> None:
        pass


HANDSHAKE = (
    b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


def client_frame(payload: bytes, opcode: Opcode = Opcode.TEXT) -> bytes:
    """A masked frame, as a client sends it."""
    return Frame(opcode, payload).serialize(mask=True, extensions=[])


def connect() -> tuple[Client, Transport, Recorder]:
    floor = Recorder()
    client = Client(cast(Floor, floor))
    transport = Transport()
    client.connection_made(cast(Any, transport))
    return client, transport, floor


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_frames_of_every_length_arrive_whole_in_any_pieces(piece: int) -> None:
    client, transport, floor = connect()
    commands = [
        {"type": "subscribe", "channel": "a"},
        {"type": "publish", "channel": "b", "data": {"p": "x" * 200}},  # 16-bit length
        {"type": "publish", "channel": "c", "data": {"p": "y" * 70_000}},  # 64-bit length
    ]
    stream = HANDSHAKE + b"".join(client_frame(orjson.dumps(c)) for c in commands)
    for start in range(0, len(stream), piece):
        client.data_received(stream[start : start + piece])
    # The RFC 6455 example key, and the welcome right after the 101.
    assert transport.written[0].startswith(b"HTTP/1.1 101 ")
    assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in transport.written[0]
    assert transport.written[1] == b"<welcome>"
    assert floor.commands == [
        ("subscribe", "a", None),
        ("publish", "b", {"p": "x" * 200}),
        ("publish", "c", {"p": "y" * 70_000}),
    ]


def test_a_close_frame_is_answered_and_closes() -> None:
    client, transport, _ = connect()
    client.data_received(HANDSHAKE + client_frame(b"\x03\xe8", Opcode.CLOSE))
    assert transport.written[-1] == b"\x88\x02\x03\xe8"
    assert transport.closed


def test_readyz_answers_and_anything_else_is_not_found() -> None:
    client, transport, _ = connect()
    client.data_received(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.written == [transport.written[0]]
    assert transport.written[0].startswith(b"HTTP/1.1 200 ")
    assert transport.closed
    client, transport, _ = connect()
    client.data_received(b"GET /" + os.urandom(4).hex().encode() + b" HTTP/1.1\r\n\r\n")
    assert transport.written[0].startswith(b"HTTP/1.1 404 ")
