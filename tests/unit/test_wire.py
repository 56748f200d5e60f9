"""Frame bytes built once per message are the bytes websockets itself would write.
`ReadingProtocol` keeps `takes_writes` down whenever uvicorn's `send` would do more than
write a frame, and offers its reader, in order, only the whole text messages that
websockets' own parser made of what the client sent; what it refuses is queued.
`transport_for` hands a connection the transport that fits (service/adapters/uvicorn.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask
from websockets.uri import parse_uri

from service.adapters.uvicorn import (
    BoundedTransport,
    DirectTransport,
    ReadingProtocol,
    transport_for,
)
from service.adapters.waitables import LeanEvent, LeanQueue
from service.outbox import Outbox, OutboxLimits
from service.protocol.wire import WireFrames, text_frame
from service.transport import Send, TextReader, Transport


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
    # Slots: no room taken in the instance dict.
    assert "reader" not in vars(protocol)
    assert "takes_writes" not in vars(protocol)


class FakeTransport:
    """Just enough of a transport for uvicorn's protocol: records what is written."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        assert not self.closing, "written after close"
        self.written += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        addresses = {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}
        return addresses.get(name, default)


_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


_PING = b"\x89\x80abcd"  # a masked, empty ping


def client_frames(*texts: str, close: bool = False) -> bytes:
    """Masked frames as a client sends them: texts, then maybe a close frame."""
    client = ClientProtocol(parse_uri("ws://test/ws"))
    client.state = State.OPEN
    for text in texts:
        client.send_text(text.encode())
    if close:
        client.send_close(1000)
    return b"".join(client.data_to_send())


async def open_protocol(
    reader: TextReader | None = None, **config: Any
) -> tuple[ReadingProtocol, FakeTransport]:
    """A `ReadingProtocol` past a real handshake, its app accepting and then waiting."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await asyncio.Event().wait()  # cancelled when the test's loop ends

    loaded = Config(app=app, ws=ReadingProtocol, lifespan="off", **config)
    loaded.load()
    protocol = ReadingProtocol(config=loaded, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    protocol.reader = reader
    protocol.data_received(_UPGRADE)
    for _ in range(100):
        if protocol.handshake_complete:
            break
        await asyncio.sleep(0)
    assert protocol.handshake_complete
    assert transport.written.startswith(b"HTTP/1.1 101")
    return protocol, transport


def direct(protocol: ReadingProtocol) -> DirectTransport:
    """What a connection on `protocol` gets after `accept` (fast adapters on)."""
    transport = transport_for(cast(Send, protocol.send), fast=True)
    assert isinstance(transport, DirectTransport)
    return transport


def writable(protocol: ReadingProtocol) -> bool:
    """Whether `DirectTransport.write_now` would write now."""
    return protocol.takes_writes and not protocol.transport.is_closing()


async def test_writes_are_taken_once_accepted_and_not_while_paused() -> None:
    protocol, transport = await open_protocol()
    writer = direct(protocol)
    assert protocol.takes_writes
    assert writable(protocol)
    protocol.pause_writing()
    assert not protocol.takes_writes
    assert not writer.write_now("held")
    protocol.resume_writing()
    before = len(transport.written)
    assert writer.write_now("sent")
    assert bytes(transport.written[before:]) == text_frame("sent")
    transport.closing = True  # closed under uvicorn (a write error): asked at each write
    assert not writable(protocol)
    assert not writer.write_now("late")


async def test_a_close_frame_in_the_same_read_stops_writes_before_the_reply() -> None:
    seen: list[bool] = []

    class Recorder:
        def handle_text_now(self, text: str) -> bool:
            seen.append(protocol.takes_writes)
            return True

    protocol, transport = await open_protocol(Recorder())
    protocol.data_received(client_frames("first"))
    assert seen == [True]
    # A ping first: websockets parses all three, and the message is offered after the
    # close frame was parsed (and the pong queued): a reply written now would follow it.
    protocol.data_received(_PING + client_frames("last", close=True))
    assert seen == [True, False]
    assert not protocol.takes_writes
    assert transport.closing


async def test_a_close_frame_alone_stops_writes() -> None:
    protocol, transport = await open_protocol()
    protocol.data_received(client_frames(close=True))
    assert not protocol.takes_writes
    assert transport.closing


@pytest.mark.parametrize("how", ["asgi close", "lost", "shutdown", "keepalive timeout"])
async def test_every_way_of_closing_stops_writes(how: str) -> None:
    protocol, _ = await open_protocol(ws_ping_interval=20, ws_ping_timeout=20)
    assert protocol.takes_writes
    if how == "asgi close":
        await protocol.send({"type": "websocket.close", "code": 1000, "reason": ""})
    elif how == "lost":
        protocol.connection_lost(None)
    elif how == "shutdown":
        protocol.shutdown()
    else:
        protocol.keepalive_timeout()
    assert not protocol.takes_writes


async def test_an_unflushed_pong_stops_writes_until_uvicorn_flushes_it() -> None:
    protocol, _ = await open_protocol()
    protocol.conn.receive_data(_PING)  # a pong is queued
    protocol._recheck()
    assert not protocol.takes_writes
    protocol.handle_events()  # uvicorn writes the pong
    protocol._recheck()
    assert protocol.takes_writes


async def test_only_the_reading_protocol_gets_a_direct_writer() -> None:
    protocol, _ = await open_protocol()
    assert isinstance(transport_for(cast(Send, protocol.send), fast=True), DirectTransport)
    plain = WebSocketsSansIOProtocol(
        config=protocol.config, server_state=ServerState(), app_state={}
    )
    assert type(transport_for(cast(Send, plain.send), fast=True)) is Transport


async def test_without_fast_adapters_the_reading_protocol_only_bounds() -> None:
    protocol, _ = await open_protocol()
    bounded = transport_for(cast(Send, protocol.send), fast=False)
    assert type(bounded) is BoundedTransport
    assert not bounded.write_now("never direct")
    bounded.set_reader(Offers())
    assert protocol.reader is None  # messages go through receive()
    bounded.drop_within(3600)
    assert protocol._drop_timer is not None
    protocol.connection_lost(None)
    assert protocol._drop_timer is None


async def test_compression_and_debug_logging_keep_frames_on_asgi() -> None:
    protocol, _ = await open_protocol()
    protocol.conn.debug = True  # websockets logs every frame
    assert type(transport_for(cast(Send, protocol.send), fast=True)) is BoundedTransport


async def test_the_handshake_is_let_go_once_accepted() -> None:
    # uvicorn keeps the request and the response, headers and all, for the connection's
    # whole life; they are read only until `accept`.
    protocol, _ = await open_protocol()
    request = protocol.request
    assert request is not None
    assert len(request.headers) > 0
    transport_for(cast(Send, protocol.send), fast=True)
    assert protocol.request is None
    assert protocol.response is None
    # websockets' parser holds the request for ever too: its headers are emptied.
    assert len(request.headers) == 0
    # The app's copy in the ASGI scope, which the service reads, is another list.
    assert (b"Host", b"test") in protocol.scope["headers"]
    transport_for(cast(Send, protocol.send), fast=True)  # a second call is harmless


async def test_the_connection_waits_on_lean_queue_and_event() -> None:
    # uvicorn's asyncio.Queue and asyncio.Event hold 3.8 KB of deques per connection;
    # the protocol's stand-ins hold none while idle (service/adapters/waitables.py).
    protocol, _ = await open_protocol()
    assert isinstance(protocol.queue, LeanQueue)
    assert isinstance(protocol.writable, LeanEvent)
    assert protocol.writable.is_set()
    protocol.pause_writing()
    assert not protocol.writable.is_set()
    assert not protocol.takes_writes
    protocol.resume_writing()
    assert protocol.writable.is_set()
    assert protocol.takes_writes


async def test_a_direct_transport_sets_the_reader() -> None:
    reader = Offers()
    protocol, _ = await open_protocol()
    writer = direct(protocol)
    writer.set_reader(reader)
    protocol.data_received(client_frames("to the reader"))
    assert reader.offered == ["to the reader"]
    writer.set_reader(None)
    protocol.data_received(client_frames("queued"))
    assert queued_texts(protocol) == ["queued"]


def outbox_of(*frames: str) -> Outbox:
    outbox = Outbox(OutboxLimits(max_messages=100, max_chars=10_000))
    for frame in frames:
        assert outbox.put(frame)
    return outbox


async def test_an_outbox_goes_in_one_write_once_the_client_reads_again() -> None:
    protocol, transport = await open_protocol()
    writer = direct(protocol)
    protocol.pause_writing()
    outbox = outbox_of("a", "b")
    sending = asyncio.ensure_future(writer.send_from(outbox))
    await asyncio.sleep(0.01)
    # Still queued, and counted, while the client does not read.
    assert not sending.done()
    assert len(outbox) == 2
    assert outbox.put("c")  # a frame that comes while it waits goes in order
    before = len(transport.written)
    writes = transport.writes
    protocol.resume_writing()
    assert await sending == 3
    assert not outbox
    assert bytes(transport.written[before:]) == b"".join(map(text_frame, "abc"))
    assert transport.writes == writes + 1


async def test_an_outbox_of_a_closed_connection_raises_what_asgi_raises() -> None:
    protocol, _ = await open_protocol()
    writer = direct(protocol)
    await protocol.send({"type": "websocket.close", "code": 1000, "reason": ""})
    with pytest.raises(RuntimeError, match=r"websocket\.close"):
        await writer.send_from(outbox_of("late"))


async def test_the_public_transport_sends_each_frame_through_asgi() -> None:
    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    public = Transport(send)
    assert not public.write_now("never direct")
    public.drop_within(1.0)  # nothing to drop with
    public.set_reader(Offers())  # nothing to read with
    outbox = outbox_of("a", "b")
    assert await public.send_from(outbox) == 2
    assert not outbox
    assert sent == [{"type": "websocket.send", "text": t} for t in ("a", "b")]


class Offers:
    """A `TextReader` that takes each message unless told to refuse it."""

    def __init__(self, refuse: tuple[str, ...] = ()) -> None:
        self.refuse = refuse
        self.offered: list[str] = []

    def handle_text_now(self, text: str) -> bool:
        self.offered.append(text)
        return text not in self.refuse


def parsed_by_websockets(protocol: ReadingProtocol) -> list[bytes]:
    """Record what websockets' parser is given from now on."""
    given: list[bytes] = []
    receive = protocol.conn.receive_data

    def recording(data: bytes | bytearray) -> None:
        given.append(bytes(data))
        receive(data)

    protocol.conn.receive_data = recording  # type: ignore[method-assign]
    return given


def queued_texts(protocol: ReadingProtocol) -> list[str]:
    texts = []
    while not protocol.queue.empty():
        texts.append(protocol.queue.get_nowait()["text"])
    return texts


def close_code(written: bytearray) -> int:
    """The code of the close frame that ends what was written (unmasked, short)."""
    head = written.rfind(b"\x88")
    assert head >= 0, "no close frame"
    return int.from_bytes(written[head + 2 : head + 4], "big")


async def test_every_byte_goes_through_websockets_parser() -> None:
    reader = Offers()
    protocol, _ = await open_protocol(reader)
    given = parsed_by_websockets(protocol)
    texts = ["a", "é" * 100, "x" * 5000]  # 7-bit and 16-bit lengths, UTF-8
    data = client_frames(*texts)
    protocol.data_received(data)
    assert reader.offered == texts
    assert given == [data]
    assert protocol.queue.empty()


async def test_a_refused_message_and_those_after_it_queue_in_order() -> None:
    reader = Offers(refuse=("b",))
    protocol, _ = await open_protocol(reader)
    protocol.data_received(client_frames("a", "b", "c"))
    assert reader.offered == ["a", "b"]  # "c" is not offered past the queued "b"
    protocol.data_received(client_frames("d"))
    assert reader.offered == ["a", "b"]
    assert queued_texts(protocol) == ["b", "c", "d"]


@pytest.mark.parametrize("cut", [1, 2, 3, 5, 9])
async def test_a_frame_split_across_reads_is_offered_once(cut: int) -> None:
    reader = Offers()
    protocol, _ = await open_protocol(reader)
    given = parsed_by_websockets(protocol)
    data = client_frames("split me")
    protocol.data_received(data[:cut])
    assert reader.offered == []
    protocol.data_received(data[cut:])
    assert reader.offered == ["split me"]
    whole = client_frames("whole")
    protocol.data_received(whole)
    assert reader.offered == ["split me", "whole"]
    assert given == [data[:cut], data[cut:], whole]


async def test_a_text_frame_inside_a_fragmented_message_fails_the_connection() -> None:
    # RFC 6455 5.4: between a first fragment (FIN clear) and its continuation, only
    # control frames may come. A whole text frame there must close with 1002, in
    # whichever reads the three arrive, and nothing of it may reach the reader.
    reader = Offers()
    protocol, transport = await open_protocol(reader)
    client = ClientProtocol(parse_uri("ws://test/ws"))
    client.state = State.OPEN
    client.send_text(b'{"type":"publish","channel":"c","data":"tru', fin=False)
    first = b"".join(client.data_to_send())
    middle = client_frames('{"type":"publish","channel":"c","data":"injected"}')
    client.send_continuation(b'ncated"}', fin=True)
    last = b"".join(client.data_to_send())
    for data in (first, middle, last):
        if transport.closing:
            break  # a real transport reads nothing more once it closed
        protocol.data_received(data)
    assert reader.offered == []
    assert protocol.queue.get_nowait()["type"] == "websocket.disconnect"  # and no text
    assert protocol.queue.empty()
    assert close_code(transport.written) == 1002
    assert transport.closing


async def test_a_payload_that_looks_like_a_frame_is_not_read_as_one() -> None:
    reader = Offers()
    protocol, _ = await open_protocol(reader)
    # Masked so that the payload's bytes read as a whole masked text frame of 2 bytes.
    mask = bytes([ord("s") ^ 0x81, ord("p") ^ 0x82, 0, 0])
    payload = apply_mask(b"split me", mask)
    assert payload[:2] == b"\x81\x82"
    protocol.data_received(b"\x81\x88" + mask)  # the header alone: websockets waits
    protocol.data_received(payload)
    assert reader.offered == ["split me"]


async def test_fragments_pings_and_long_frames_are_websockets_work() -> None:
    reader = Offers()
    protocol, transport = await open_protocol(reader)
    client = ClientProtocol(parse_uri("ws://test/ws"))
    client.state = State.OPEN
    client.send_text(b"frag", fin=False)
    client.send_continuation(b"mented", fin=True)
    client.send_ping(b"p")
    client.send_text(b"y" * 70000)  # a 64-bit length
    client.send_text(b"after")
    before = len(transport.written)
    protocol.data_received(b"".join(client.data_to_send()))
    assert reader.offered == ["fragmented", "y" * 70000, "after"]
    assert transport.written[before:].startswith(b"\x8a\x01p")  # the pong
    assert protocol.queue.empty()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (client_frames("ok")[:2] + b"\0\0\0\0" + b"\xff\xfe", 1007),  # not UTF-8
        (b"\x81\x02hi", 1002),  # not masked
        (b"\x91\x80abcd", 1002),  # a reserved bit
        (client_frames("x" * 11), 1009),  # over ws_max_size
    ],
)
async def test_what_websockets_refuses_closes_as_before(frame: bytes, code: int) -> None:
    reader = Offers()
    protocol, transport = await open_protocol(reader, ws_max_size=10)
    protocol.data_received(client_frames("first"))
    # In one read with the bad frame, a message before it is dropped with the connection
    # (as uvicorn does): the parser fails the whole read.
    protocol.data_received(frame + client_frames("never"))
    assert reader.offered == ["first"]
    assert close_code(transport.written) == code
    assert transport.closing
