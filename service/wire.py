"""The fan-out's shortcut to the socket: frames built once, written straight to uvicorn.

A server's WebSocket frames are not masked, so without compression the bytes of a text
frame are the same for every connection. `WireFrames` builds them once per message (the
fan-out hands every member the same `str`), and `DirectWriter` writes them to the
connection's transport, skipping the ASGI `send` coroutine and the task switch of a
queued write: about 40% of the server's CPU per delivery (docs/performance.md).

That reaches into uvicorn's websockets-sansio protocol (uvicorn is pinned to 0.54.x in
pyproject.toml). `DirectWriter.attach` gives up, and the connection uses plain ASGI,
for any other implementation, for per-message compression and for debug logging; and
`writable` checks, before every write, each condition under which uvicorn's own `send`
would do something other than write one text frame. tests/unit/test_wire.py and
tests/integration/test_direct_writes.py guard the attributes and the behaviour.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.frames import Frame, Opcode
from websockets.protocol import State

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def text_frame(text: str) -> bytes:
    """The bytes of one unmasked, uncompressed, unfragmented text frame of `text`."""
    # websockets' own serializer: the same bytes its protocol object would write.
    return Frame(Opcode.TEXT, text.encode()).serialize(mask=False, extensions=[])


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
    """Writes frame bytes to a websockets-sansio connection's transport, synchronously."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: WebSocketsSansIOProtocol) -> None:
        self._protocol = protocol

    @classmethod
    def attach(cls, send: object) -> DirectWriter | None:
        """A writer for the connection `send` belongs to, or None to stay with ASGI.

        Call after the handshake: the negotiated extensions decide.
        """
        protocol = _sansio_protocol(send)
        if protocol is None:
            return None
        try:
            conn = protocol.conn
            # Compressed frames differ per connection; debug mode logs every frame.
            if conn.extensions or conn.debug or not protocol.handshake_complete:
                return None
            protocol.transport.is_closing()
            protocol.writable.is_set()
        except AttributeError:
            return None  # a uvicorn or websockets whose insides have moved
        return cls(protocol)

    def writable(self) -> bool:
        """True if uvicorn's `send` of a text frame would now just write it.

        False while the transport is paused (the client reads slowly), and once the
        connection closes or is gone: the caller then queues, or uses ASGI `send`,
        which raises what uvicorn raises.
        """
        protocol = self._protocol
        conn = protocol.conn
        return (
            protocol.writable.is_set()
            and not protocol.disconnected
            and not protocol.close_sent
            and protocol.initial_response is None
            and conn.state is State.OPEN
            and not conn.writes
            and not protocol.transport.is_closing()
        )

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
    return protocol if type(protocol) is WebSocketsSansIOProtocol else None
