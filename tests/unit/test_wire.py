"""Frame bytes built once per message are the bytes websockets itself would write, and
`ReadingProtocol` offers whole text messages to its reader, in order, or queues them."""

from __future__ import annotations

import pytest
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.protocol import State
from websockets.server import ServerProtocol

from service.wire import ReadingProtocol, WireFrames, text_frame


def written_by_websockets(text: str) -> bytes:
    """What an open server-side websockets protocol writes for `send_text(text)`."""
    protocol = ServerProtocol()
    protocol.state = State.OPEN
    protocol.send_text(text.encode())
    return b"".join(protocol.data_to_send())


# Every length encoding (7-bit, 16-bit, 64-bit) on both sides of its limits, and UTF-8.
@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_is_what_websockets_writes(length: int) -> None:
    text = "x" * length
    assert text_frame(text) == written_by_websockets(text)


def test_text_frame_encodes_utf8() -> None:
    text = '{"data":"héllo wörld ✓ 🎉"}'
    assert text_frame(text) == written_by_websockets(text)


def test_wire_frames_builds_once_per_string_object() -> None:
    frames = WireFrames()
    text = "".join(["{", '"a":1', "}"])  # not interned: a fresh object
    first = frames(text)
    assert frames(text) is first  # the same str again: reused
    equal = "".join(["{", '"a":1', "}"])
    assert equal is not text
    assert frames(equal) == first  # an equal but distinct str is rebuilt, same bytes
    assert frames("other") == text_frame("other")


class Taker:
    """A `TextReader` that takes what it is offered, or refuses it."""

    def __init__(self, takes: bool) -> None:
        self.takes = takes
        self.offered: list[str] = []

    def handle_text_now(self, text: str) -> bool:
        self.offered.append(text)
        return self.takes


async def reading_protocol_with(*frames: bytes, reader: Taker | None) -> ReadingProtocol:
    """A `ReadingProtocol` holding a whole text message made of `frames`, with `reader`."""
    config = Config(app=_app, ws=ReadingProtocol, lifespan="off")
    config.load()
    protocol = ReadingProtocol(config=config, server_state=ServerState(), app_state={})
    protocol.reader = reader
    # What uvicorn's text-frame handlers leave for `send_receive_event_to_app`.
    protocol.curr_msg_data_type = "text"
    protocol.frames = list(frames)
    # Already paused: a message queued by uvicorn's own path does not pause it again
    # (there is no transport here).
    protocol.read_paused = True
    return protocol


async def _app(scope: object, receive: object, send: object) -> None:
    """Never called: a protocol needs an app to be made."""


async def test_a_taken_text_message_bypasses_the_queue() -> None:
    reader = Taker(takes=True)
    protocol = await reading_protocol_with(b'{"type":', b'"ping"}', reader=reader)
    protocol.send_receive_event_to_app()
    assert reader.offered == ['{"type":"ping"}']  # the fragments, joined
    assert protocol.queue.empty()
    assert protocol.frames == []


async def test_a_refused_message_is_queued_as_uvicorn_does() -> None:
    reader = Taker(takes=False)
    protocol = await reading_protocol_with(b"hello", reader=reader)
    protocol.send_receive_event_to_app()
    assert reader.offered == ["hello"]
    assert protocol.queue.get_nowait() == {"type": "websocket.receive", "text": "hello"}


async def test_nothing_is_offered_past_a_queued_message() -> None:
    reader = Taker(takes=True)
    protocol = await reading_protocol_with(b"second", reader=reader)
    protocol.queue.put_nowait({"type": "websocket.receive", "text": "first"})
    protocol.send_receive_event_to_app()
    assert reader.offered == []
    assert [protocol.queue.get_nowait()["text"] for _ in range(2)] == ["first", "second"]


async def test_binary_messages_and_closed_connections_go_uvicorns_way() -> None:
    reader = Taker(takes=True)
    protocol = await reading_protocol_with(b"\x00\x01", reader=reader)
    protocol.curr_msg_data_type = "bytes"
    protocol.send_receive_event_to_app()
    assert protocol.queue.get_nowait() == {"type": "websocket.receive", "bytes": b"\x00\x01"}
    protocol = await reading_protocol_with(b"late", reader=reader)
    protocol.close_sent = True  # the app closed: uvicorn drops what comes after
    protocol.send_receive_event_to_app()
    assert reader.offered == []
    assert protocol.queue.empty()


async def test_without_a_reader_it_is_uvicorns_protocol() -> None:
    protocol = await reading_protocol_with(b"plain", reader=None)
    protocol.send_receive_event_to_app()
    assert protocol.queue.get_nowait() == {"type": "websocket.receive", "text": "plain"}
    assert isinstance(protocol, WebSocketsSansIOProtocol)
    assert "reader" not in vars(protocol)  # a slot: no room taken in the instance dict
