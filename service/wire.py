"""Shortcuts to and from uvicorn's socket: frames written straight out, messages read in.

A server's WebSocket frames are not masked, so without compression the bytes of a text
frame are the same for every connection. `WireFrames` builds them once per message (the
fan-out hands every member the same `str`), and `DirectWriter` writes them to the
connection's transport, skipping the ASGI `send` coroutine and the task switch of a
queued write: about 40% of the server's CPU per delivery (docs/performance.md).

Both reach into uvicorn's websockets-sansio protocol (uvicorn is pinned to 0.54.x in
pyproject.toml), as the subclass `ReadingProtocol`, which uvicorn runs as its `ws`
class (`service.__main__`):

* It keeps `takes_writes`: whether uvicorn's own `send` would now do nothing but write
  one text frame, asked again in every method that can change the answer, so that a
  delivery reads one attribute (and asks the transport whether it is closing).
  `DirectWriter.attach` gives up, and the connection uses plain ASGI, for any other
  implementation, for per-message compression and for debug logging.
* A connection may take a text message from inside the read (`TextReader`) instead of
  through uvicorn's queue and `receive()`: a task step and two changes of the socket's
  epoll registration less per message. Whole, final, masked text frames are read
  without websockets' generator-based parser while it waits for a frame start; what
  the connection does not take goes uvicorn's way, behind whatever is queued already,
  and anything else from that point on goes to websockets.

tests/unit/test_wire.py, tests/integration/test_direct_writes.py and
tests/integration/test_reads_now.py guard the attributes and the behaviour.
"""

from __future__ import annotations

import struct
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, Protocol

from uvicorn._types import ASGISendEvent
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.speedups import apply_mask
from websockets.streams import StreamReader

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class TextReader(Protocol):
    """What a `ReadingProtocol` hands text messages to."""

    def handle_text_now(self, text: str) -> bool:
        """Handle `text` now, from inside the read; False leaves it to `receive()`."""
        ...


class ReadingProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, with text messages offered to `reader` first.

    Offered only while nothing waits in uvicorn's queue, so a message never overtakes
    one queued before it; `reader` refuses what it cannot finish in order (a command
    under way in its task). A message that is not valid UTF-8 goes uvicorn's way, which
    closes with 1007.

    It also keeps `takes_writes` up to date for `DirectWriter`.
    """

    # Slots, not entries in the instance's __dict__: idle connections are counted in
    # bytes (docs/performance.md).
    __slots__ = ("reader", "takes_writes")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set by the connection once it reads (`Connection`), cleared when it stops.
        self.reader: TextReader | None = None
        #: True while uvicorn's `send` of a text frame would just write it (`_recheck`),
        #: unless the transport is closing: that one is asked at each write.
        self.takes_writes = False

    def _recheck(self) -> None:
        # Every condition under which uvicorn's own `send` would do something other than
        # write one text frame: paused by the client's reading, closing or closed,
        # before the handshake, or with websockets' output not yet flushed. They change
        # only inside the methods below, so the fan-out reads one attribute instead of
        # asking them all at each delivery (docs/performance.md).
        conn = self.conn
        self.takes_writes = (
            self.handshake_complete
            and self.writable.is_set()
            and not self.disconnected
            and not self.close_sent
            and self.initial_response is None
            and conn.state is State.OPEN
            and not conn.writes
        )

    def data_received(self, data: bytes) -> None:
        """Read: whole text frames straight to `reader`, the rest as uvicorn reads it."""
        rest = self._read_now(data)
        if rest:
            try:
                super().data_received(rest)
            finally:
                # A close frame, a parser error or a ping may change the answer. What
                # `_read_now` took changes nothing uvicorn's `send` asks.
                self._recheck()

    def _read_now(self, data: bytes) -> bytes:
        """Hand the whole, final, masked text frames at the start of `data` to `reader`.

        Returns the rest, from the first frame that is anything else (a control frame, a
        fragment, a partial frame, invalid UTF-8, too big), for websockets to parse: it
        raises what it would have raised. Only while websockets' parser waits for the
        start of a frame, and for uvicorn's queue and reading exactly as they would be.
        This saves websockets' generator-based parser per message (docs/performance.md).
        """
        reader, conn = self.reader, self.conn
        if (
            reader is None
            or self.close_sent
            or self.read_paused
            or not self.queue.empty()
            or conn.state is not State.OPEN
            or conn.extensions
            or conn.debug
            or not _at_frame_start(conn)
        ):
            return data
        # websockets' limit for a message's first frame: the smaller one that is set.
        limit, fragment = conn.max_message_size, conn.max_fragment_size
        if fragment is not None and (limit is None or fragment < limit):
            limit = fragment
        start, end = 0, len(data)
        # A frame: FIN and opcode 1 (no reserved bits), the mask bit and a 7-bit length
        # or 126 and 16 bits (RFC 6455, 5.2); then 4 bytes of mask and the payload.
        while end - start >= 6 and data[start] == _FIN_TEXT and data[start + 1] & 0x80:
            length = data[start + 1] & 0x7F
            at = start + 2
            if length == 126:
                length = int.from_bytes(data[at : at + 2], "big")
                at += 2
            elif length == 127:
                break  # 64 KiB or more: rare, websockets' way
            stop = at + 4 + length
            if stop > end or (limit is not None and length > limit):
                break
            payload = apply_mask(data[at + 4 : stop], data[at : at + 4])
            try:
                text = payload.decode()
            except UnicodeDecodeError:
                break  # websockets' way: uvicorn closes with 1007
            start = stop
            if not reader.handle_text_now(text):
                # Queued as uvicorn queues it (which pauses reading): what follows it
                # queues behind it.
                self.curr_msg_data_type = "text"
                self.frames = [payload]
                super().send_receive_event_to_app()
                break
        return data[start:] if start else data

    def connection_lost(self, exc: Exception | None) -> None:
        """As uvicorn's: the connection is gone."""
        try:
            super().connection_lost(exc)
        finally:
            self._recheck()

    def pause_writing(self) -> None:
        """As uvicorn's: the client reads slowly (called from inside a write)."""
        super().pause_writing()
        self._recheck()

    def resume_writing(self) -> None:
        """As uvicorn's: the client caught up."""
        super().resume_writing()
        self._recheck()

    def shutdown(self) -> None:
        """As uvicorn's: the server shuts down (close 1012)."""
        try:
            super().shutdown()
        finally:
            self._recheck()

    def keepalive_timeout(self) -> None:
        """As uvicorn's: no pong in time (close 1011)."""
        try:
            super().keepalive_timeout()
        finally:
            self._recheck()

    async def send(self, message: ASGISendEvent) -> None:
        """The ASGI `send`, after which `takes_writes` is asked again (accept, close)."""
        try:
            await super().send(message)
        finally:
            self._recheck()

    def send_receive_event_to_app(self) -> None:
        """Offer a whole text message to `reader`; otherwise queue it, as uvicorn does."""
        reader = self.reader
        if (
            reader is not None
            and self.curr_msg_data_type == "text"
            and not self.close_sent
            and self.queue.empty()
        ):
            frames = self.frames
            data = frames[0] if len(frames) == 1 else b"".join(frames)
            try:
                text = data.decode()
            except UnicodeDecodeError:
                pass
            else:
                # The read in progress may have parsed a close frame after this one, or
                # a ping whose pong is not flushed yet: a reply written now must see it.
                self._recheck()
                if reader.handle_text_now(text):
                    self.frames = []
                    return
        super().send_receive_event_to_app()


# websockets' parser is a generator: `ServerProtocol.parse`, which runs `Protocol.parse`,
# which waits in `StreamReader.at_eof` for the first byte of each frame (websockets 17).
_AT_EOF = StreamReader.at_eof.__code__


def _at_frame_start(conn: ServerProtocol) -> bool:
    """True if websockets' parser waits for the first byte of a frame."""
    handshake = conn.parser
    frames = getattr(handshake, "gi_yieldfrom", None)
    waiting = getattr(frames, "gi_yieldfrom", None)
    # It waits there only with nothing buffered (`at_eof` returns while there is).
    return waiting is not None and waiting.gi_code is _AT_EOF


def reading_protocol(send: object) -> ReadingProtocol | None:
    """The `ReadingProtocol` whose bound method `send` is, else None."""
    protocol = _sansio_protocol(send)
    return protocol if isinstance(protocol, ReadingProtocol) else None


# A final text frame's first byte (FIN and opcode 1), then the payload length in 7 bits,
# or 126 and 16 bits, or 127 and 64 bits (RFC 6455, 5.2).
_HEAD_7 = struct.Struct("!BB")
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")
_FIN_TEXT = 0x81


def text_frame(text: str) -> bytes:
    """The bytes of one unmasked, uncompressed, unfragmented text frame of `text`.

    The bytes websockets' own serializer writes (tests/unit/test_wire.py), without its
    checks and buffer: this runs once per message per worker.
    """
    data = text.encode()
    length = len(data)
    if length < 126:
        return _HEAD_7.pack(_FIN_TEXT, length) + data
    if length < 65536:
        return _HEAD_16.pack(_FIN_TEXT, 126, length) + data
    return _HEAD_64.pack(_FIN_TEXT, 127, length) + data


class WireFrames:
    """Text -> frame bytes, built once for a run of calls with the same `str` object.

    The fan-out delivers one `str` to every member of a channel: the first member's
    call builds the bytes, the others reuse them. Identity, not equality: comparing
    would cost as much as a small frame's encoding.
    """

    __slots__ = ("_text", "_wire")

    def __init__(self) -> None:
        self._text: str | None = None
        self._wire = b""

    def __call__(self, text: str) -> bytes:
        """The frame bytes of `text`."""
        if text is not self._text:
            self._wire = text_frame(text)
            self._text = text  # held, so no other string can take its identity
        return self._wire


#: One per process: the event loop runs one fan-out at a time.
wire_frames = WireFrames()


class DirectWriter:
    """Writes frame bytes to a `ReadingProtocol` connection's transport, synchronously."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: ReadingProtocol) -> None:
        self._protocol = protocol

    @classmethod
    def attach(cls, send: object) -> DirectWriter | None:
        """A writer for the connection `send` belongs to, or None to stay with ASGI.

        Call after the handshake: the negotiated extensions decide. Only uvicorn's
        protocol as `ReadingProtocol` runs it keeps `takes_writes`: with any other
        (wsproto, uvicorn's own websockets-sansio) every frame goes through ASGI.
        """
        protocol = reading_protocol(send)
        if protocol is None:
            return None
        conn = protocol.conn
        # Compressed frames differ per connection; debug mode logs every frame.
        if conn.extensions or conn.debug or not protocol.handshake_complete:
            return None
        return cls(protocol)

    def writable(self) -> bool:
        """True if uvicorn's `send` of a text frame would now just write it.

        False while the transport is paused (the client reads slowly), and once the
        connection closes or is gone: the caller then queues, or uses ASGI `send`,
        which raises what uvicorn raises.
        """
        protocol = self._protocol
        return protocol.takes_writes and not protocol.transport.is_closing()

    def write_now(self, text: str) -> bool:
        """Write the frame of `text` if `writable()`; False if it was not written."""
        # One call per delivery: `writable()`, `wire_frames` and `write` inlined (the
        # fan-out's loop runs this once per member).
        protocol = self._protocol
        if protocol.takes_writes and not protocol.transport.is_closing():
            frames = wire_frames
            if text is not frames._text:
                frames._wire = text_frame(text)
                frames._text = text
            protocol.transport.write(frames._wire)
            return True
        return False

    def paused(self) -> bool:
        """True while the transport waits for the client to read (and it is still there)."""
        protocol = self._protocol
        return not protocol.writable.is_set() and not protocol.disconnected

    async def wait_writable(self) -> None:
        """Until the transport takes writes again (or the connection is lost)."""
        await self._protocol.writable.wait()

    def write(self, data: bytes) -> None:
        """Write whole frames; only after `writable()` said True in the same step."""
        self._protocol.transport.write(data)


def forget_handshake(send: object) -> None:
    """Let go of the handshake's request and response that uvicorn keeps.

    uvicorn's websockets-sansio protocol holds both, headers and all (about 3 KB), for
    the connection's whole life, though it reads them only until `accept` (0.54.x):
    dropping them takes a seventh off an idle connection's memory. Call after `accept`;
    does nothing with any other implementation.
    """
    protocol = _sansio_protocol(send)
    if protocol is not None and protocol.handshake_complete:
        protocol.request = None  # type: ignore[assignment]
        protocol.response = None  # type: ignore[assignment]


def _sansio_protocol(send: object) -> WebSocketsSansIOProtocol | None:
    """The websockets-sansio protocol object whose bound method `send` is, else None.

    None for another implementation (wsproto, legacy websockets), or a wrapped `send`.
    """
    protocol = getattr(send, "__self__", None)
    if type(protocol) in (WebSocketsSansIOProtocol, ReadingProtocol):
        return protocol
    return None
