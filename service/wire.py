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
  epoll registration less per message. Every byte the client sends goes through
  websockets' own parser first (fragments, control frames, UTF-8 and size checks, the
  failures RFC 6455 asks for); only the whole messages it hands uvicorn are offered,
  and what the connection does not take goes uvicorn's way, behind whatever is queued.

tests/unit/test_wire.py, tests/integration/test_direct_writes.py and
tests/integration/test_reads_now.py guard the attributes and the behaviour.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, Protocol

import httptools
from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets import http11
from websockets.protocol import State

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

logger = logging.getLogger(__name__)


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
    __slots__ = ("_drop_timer", "_handshake_timer", "reader", "takes_writes")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Set by the connection once it reads (`Connection`), cleared when it stops.
        self.reader: TextReader | None = None
        #: True while uvicorn's `send` of a text frame would just write it (`_recheck`),
        #: unless the transport is closing: that one is asked at each write.
        self.takes_writes = False
        #: Set while the app has yet to answer the upgrade (`handshake_deadline`).
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._drop_timer: asyncio.TimerHandle | None = None

    def drop_within(self, delay: float) -> None:
        """Abort the socket unless the connection is gone within `delay` seconds.

        uvicorn only ever closes a socket gracefully, which waits for its buffered
        frames to be sent: a client that never reads would hold it (and them) for ever.
        A deadline set earlier stays.
        """
        if self._drop_timer is None and not self.disconnected:
            self._drop_timer = self.loop.call_later(delay, self._drop)

    def _drop(self) -> None:
        """Abort the socket, and let the kernel discard what it still holds for it too."""
        self._drop_timer = None
        if self.disconnected:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: a reset, instead of the kernel retrying the unsent bytes of an
            # orphaned socket for minutes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        # connection_lost follows, which tells the app (websocket.disconnect).
        self.transport.abort()

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
        """As uvicorn's: websockets parses every byte the client sends."""
        try:
            super().data_received(data)
            if not self.handshake_initiated and self.conn.handshake_exc is not None:
                # websockets refused the request; uvicorn never looks (0.54), so its
                # answer would wait, and the socket stay open, for ever.
                self._refuse_handshake()
        finally:
            # A close frame, a parser error or a ping may change the answer.
            self._recheck()

    def connection_lost(self, exc: Exception | None) -> None:
        """As uvicorn's: the connection is gone."""
        self._end_handshake_deadline()
        if self._drop_timer is not None:
            self._drop_timer.cancel()
            self._drop_timer = None
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
        """As uvicorn's: no pong in time (close 1011); dropped at once if it reads nothing.

        uvicorn sends the close frame and closes gracefully, and tells the app only once
        the socket is gone: with frames stuck in the buffer that is never. A client that
        has not answered a ping for the whole timeout is owed nothing more.
        """
        try:
            super().keepalive_timeout()
            if self.transport.get_write_buffer_size():
                self._drop()
        finally:
            self._recheck()

    async def send(self, message: ASGISendEvent) -> None:
        """The ASGI `send`, after which `takes_writes` is asked again (accept, close)."""
        try:
            await super().send(message)
        finally:
            if self._handshake_timer is not None and self.handshake_complete:
                self._end_handshake_deadline()  # accepted (or refused) in time
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

    def handshake_deadline(self, when: float) -> None:
        """Close the connection at `when` (event loop time) unless the app answered.

        `BoundedHttpProtocol` hands over what is left of the upgrade request's
        deadline: by then the app must have accepted (or refused) the WebSocket.
        """
        if not self.handshake_complete and not self.transport.is_closing():
            self._handshake_timer = self.loop.call_at(when, self._handshake_expired)

    def _end_handshake_deadline(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _handshake_expired(self) -> None:
        """503 unless the app has begun an answer of its own, then close."""
        self._handshake_timer = None
        if self.handshake_complete or self.transport.is_closing():
            return
        if self.initial_response is None:
            # The request came whole: the server is late, not the client (so not 408).
            # Written as is: websockets' `send_response` would log it and change state.
            refusal = self.conn.reject(
                HTTPStatus.SERVICE_UNAVAILABLE,
                "The WebSocket handshake was not answered in time.\n",
            )
            self.transport.write(refusal.serialize())
        logger.debug("%s - WebSocket handshake timed out", _peer(self.client))
        # An `accept` after this finds the transport closing and sends nothing (uvicorn),
        # and the app then receives the disconnect.
        self.transport.close()

    def _refuse_handshake(self) -> None:
        """Send what websockets answers to a request it refused, and close.

        websockets prepares a 414 or a 431 (a line too long, too many headers), and
        nothing for a request it cannot read (a body, a target that is not ASCII): that
        one gets a 400 with the reason.
        """
        conn = self.conn
        exc = conn.handshake_exc
        reason = f"{exc}: {exc.__cause__}" if exc is not None and exc.__cause__ else str(exc)
        answer = b"".join(conn.data_to_send())
        if not answer:
            answer = conn.reject(
                HTTPStatus.BAD_REQUEST, f"Failed to open a WebSocket connection: {reason}.\n"
            ).serialize()
        logger.info("%s - WebSocket handshake refused: %s", _peer(self.client), reason)
        # As uvicorn marks a handshake it answers itself: nothing more to send, no app.
        self.handshake_complete = True
        self.close_sent = True
        self._end_handshake_deadline()
        self.transport.write(answer)
        self.transport.close()


def reading_protocol(send: object) -> ReadingProtocol | None:
    """The `ReadingProtocol` whose bound method `send` is, else None."""
    protocol = _sansio_protocol(send)
    return protocol if isinstance(protocol, ReadingProtocol) else None


# --- The request head and the handshake: bounded in size and in time ----------------
#
# uvicorn 0.54 bounds neither. Its httptools protocol takes a request head of any size
# and waits for it for ever (its keep-alive timer runs only between requests); and when
# websockets' parser refuses an upgrade (a line over 8 KiB, more than 128 headers, a
# body), its websockets-sansio protocol neither sends the answer websockets prepared nor
# closes. Every such connection held a file descriptor, outside MAX_CONNECTIONS.

#: The longest request line or header line, CRLF included, and the most header fields:
#: websockets' own limits, so that every upgrade the worker lets through websockets takes.
MAX_LINE_BYTES: int = http11.MAX_LINE_LENGTH
MAX_HEADERS: int = http11.MAX_NUM_HEADERS
#: The largest request head in all: what one connection may hold in memory for up to
#: HANDSHAKE_TIMEOUT (MAX_HEADERS lines of MAX_LINE_BYTES would be 1 MiB).
MAX_HEAD_BYTES = 65_536
#: Seconds a refused client may go on sending after the answer: closing with its bytes
#: still unread would reset the connection, and the answer could be lost on the way.
REFUSAL_LINGER = 2.0
# What follows the target in the request line that uvicorn hands websockets.
_VERSION_AND_CRLF = len(b" HTTP/1.1\r\n")


class _OverLimit(Exception):
    """Raised from a parser callback: it stops httptools where the head went over."""


class _StoppableParser:
    """uvicorn's httptools parser, which `_OverLimit` stops without uvicorn's 400.

    httptools wraps what a callback raises in `HttpParserCallbackError`, which uvicorn
    answers with "400 Invalid HTTP request" and a warning; the protocol answers ours.
    """

    __slots__ = ("_parser",)

    def __init__(self, parser: httptools.HttpRequestParser) -> None:
        self._parser = parser

    def feed_data(self, data: bytes) -> None:
        """Parse `data`, as httptools does; stopped quietly by `_OverLimit`."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _OverLimit):
                raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._parser, name)


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the request head bounded and a deadline for it.

    * Size: a request line over MAX_LINE_BYTES is answered 414 URI Too Long (only its
      target can make it long: a token in the query string); a header line over
      MAX_LINE_BYTES, more than MAX_HEADERS fields or a head over MAX_HEAD_BYTES, 431
      Request Header Fields Too Large. Counted as the bytes arrive, so that a head
      never grows past the limit in memory. The line lengths are those of the request
      uvicorn rebuilds for websockets on an upgrade, so websockets never refuses one.
    * Time: a request must have arrived whole (head and body) within
      `handshake_timeout` seconds of the connection's opening, or of its first byte on
      a kept-alive connection, and a WebSocket upgrade must also be accepted by then
      (`ReadingProtocol.handshake_deadline`). Else 408 Request Timeout and the
      connection is closed (only closed if a response has begun). Between requests,
      uvicorn's keep-alive timeout closes an idle connection.

    `http_options` makes uvicorn use it, with `handshake_timeout` bound.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        handshake_timeout: float,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.parser = _StoppableParser(self.parser)  # type: ignore[assignment]
        self.handshake_timeout = handshake_timeout
        self._deadline: asyncio.TimerHandle | None = None
        self._deadline_at = 0.0
        #: The answer to a head over a limit, once one is.
        self._refusal: tuple[HTTPStatus, str] | None = None
        # The head under way: whether what arrives now is head (from the connection's
        # start and the end of a request to the end of the next head), its bytes in
        # whole lines and the target so far, its fields, and the line in progress.
        self._in_head = True
        self._head_bytes = 0
        self._target_bytes = 0
        self._fields = 0
        self._line_bytes = 0
        #: Heads received whole so far.
        self._heads = 0
        # The last request's cycle when this one began: until its head is whole, the
        # connection's cycle is still that one (`_may_answer`).
        self._cycle_before: RequestResponseCycle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """As uvicorn's; the first request's deadline starts now."""
        super().connection_made(transport)
        self._arm(self.loop.time() + self.handshake_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        """As uvicorn's; no deadline any more."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """As uvicorn's, counting the head's bytes; a head over a limit is refused."""
        if self._refusal is not None:
            return  # answered: what the client still sends is dropped (`_refuse`)
        in_head, heads = self._in_head, self._heads
        super().data_received(data)
        if self._refusal is None and in_head and heads == self._heads:
            # The line in progress, which httptools holds until it ends. Counted only
            # for a read that is all head: one that ends a body and begins the next
            # head (pipelining) leaves the count to the next read.
            end = data.rfind(b"\n")
            self._line_bytes = len(data) - end - 1 if end >= 0 else self._line_bytes + len(data)
            if self._line_bytes > MAX_LINE_BYTES:
                self._refusal = _too_large(f"a header line is over {MAX_LINE_BYTES} bytes")
            elif self._head_bytes + self._line_bytes > MAX_HEAD_BYTES:
                self._refusal = _too_large(f"the request head is over {MAX_HEAD_BYTES} bytes")
        if self._refusal is not None and not self.transport.is_closing():
            self._refuse()

    def on_message_begin(self) -> None:
        """As uvicorn's; a request begins, and with it its deadline on a kept-alive one."""
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = self._target_bytes = self._fields = 0
        self._cycle_before = self.cycle
        if self._deadline is None:
            self._arm(self.loop.time() + self.handshake_timeout)

    def on_url(self, url: bytes) -> None:
        """As uvicorn's (called for every piece of the target as it arrives), bounded."""
        self._target_bytes += len(url)
        self._head_bytes += len(url)
        method = self.parser.get_method()
        if len(method) + 1 + self._target_bytes + _VERSION_AND_CRLF > MAX_LINE_BYTES:
            self._stop(
                HTTPStatus.REQUEST_URI_TOO_LONG,
                f"the request line is over {MAX_LINE_BYTES} bytes (its query string included)",
            )
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """As uvicorn's, bounded: the line as uvicorn rebuilds it, the fields, the head."""
        line = len(name) + len(value) + 4  # b"name: value\r\n"
        self._head_bytes += line
        self._fields += 1
        self._line_bytes = 0
        if line > MAX_LINE_BYTES:
            self._stop(*_too_large(f"a header line is over {MAX_LINE_BYTES} bytes"))
        if self._fields > MAX_HEADERS:
            self._stop(*_too_large(f"more than {MAX_HEADERS} header fields"))
        if self._head_bytes > MAX_HEAD_BYTES:
            self._stop(*_too_large(f"the request head is over {MAX_HEAD_BYTES} bytes"))
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """As uvicorn's: the head is whole (the app starts, or the upgrade follows)."""
        self._in_head = False
        self._heads += 1
        self._line_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """As uvicorn's: the request has arrived whole, so its deadline is met.

        An upgrade's too, here: the WebSocket protocol takes over what is left of it.
        """
        self._disarm()
        self._in_head = True
        self._line_bytes = 0
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        """As uvicorn's, then the WebSocket protocol gets the rest of the deadline."""
        super().handle_websocket_upgrade()
        protocol = self.transport.get_protocol()
        if isinstance(protocol, ReadingProtocol):
            protocol.handshake_deadline(self._deadline_at)
        # This protocol is done with the connection, and its parser holds it in a cycle
        # that only the garbage collector would break: let both go now.
        self.parser = None  # type: ignore[assignment]

    def _stop(self, status: HTTPStatus, reason: str) -> None:
        """Stop httptools here: `data_received` answers once it has returned."""
        self._refusal = (status, reason)
        raise _OverLimit

    def _refuse(self) -> None:
        """Answer `_refusal`, shut the writing side and close after `REFUSAL_LINGER`."""
        assert self._refusal is not None
        status, reason = self._refusal
        logger.info("%s - request refused: %d %s", _peer(self.client), status, reason)
        transport = self.transport
        if self._may_answer():
            transport.write(_plain_response(status, reason, self.server_state.default_headers))
        self._disarm()
        if transport.can_write_eof():
            # The client sees the answer and the end at once; reading goes on (and drops
            # what comes) until it closes, which closes this side too, or the linger ends.
            transport.write_eof()
            self._arm(self.loop.time() + REFUSAL_LINGER)
        else:
            transport.close()

    def _arm(self, when: float) -> None:
        self._deadline_at = when
        self._deadline = self.loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        """The deadline has passed: 408 if nothing of a response is out, and close."""
        self._deadline = None
        transport = self.transport
        if transport.is_closing():
            return
        if self._refusal is None and self._may_answer():
            logger.debug("%s - request timed out", _peer(self.client))
            transport.write(
                _plain_response(
                    HTTPStatus.REQUEST_TIMEOUT,
                    f"the request did not arrive whole within {self.handshake_timeout:g} s",
                    self.server_state.default_headers,
                )
            )
        transport.close()

    def _may_answer(self) -> bool:
        """True if no response is under way on the connection, nor due before ours."""
        cycle = self.cycle
        if cycle is None:
            return True
        if cycle is self._cycle_before:
            # The head is not whole: the cycle is the last request's, which must be done.
            return cycle.response_complete
        return not cycle.response_started and not self.pipeline


def _too_large(reason: str) -> tuple[HTTPStatus, str]:
    return HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, reason


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "-"


def _plain_response(
    status: HTTPStatus, reason: str, default_headers: list[tuple[bytes, bytes]]
) -> bytes:
    """A whole `Connection: close` response with `reason` as its text body."""
    body = f"{status.value} {status.phrase}: {reason}.\n".encode()
    lines = [f"HTTP/1.1 {status.value} {status.phrase}".encode()]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [
        b"content-type: text/plain; charset=utf-8",
        b"content-length: %d" % len(body),
        b"connection: close",
    ]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def http_options(handshake_timeout: float) -> dict[str, Any]:
    """The `http` option of uvicorn, and the options that go with it, for `uvicorn_options`.

    `BoundedHttpProtocol` with `handshake_timeout`, if the installed uvicorn has what it
    relies on (`adapter_problem`). Otherwise uvicorn's own h11 protocol, whose public
    `h11_max_incomplete_event_size` bounds the head (a 400, not a 431 or 414) but which
    has no deadline: one warning says so. ReadingProtocol answers what websockets
    refuses either way.
    """
    # Only h11 reads it (uvicorn 0.54): set for the fallback, and for a run with
    # `http=h11` (bench/worker.py).
    options: dict[str, Any] = {"h11_max_incomplete_event_size": MAX_HEAD_BYTES}
    problem = adapter_problem()
    if problem is None:
        options["http"] = functools.partial(
            BoundedHttpProtocol, handshake_timeout=handshake_timeout
        )
    else:
        options["http"] = "h11"
        logger.warning(
            "HANDSHAKE_TIMEOUT and the 414/431 limits are off: this uvicorn lacks what "
            "service.wire.BoundedHttpProtocol relies on (%s); running uvicorn's h11 "
            "protocol, which answers 400 to a request head over %d bytes",
            problem,
            MAX_HEAD_BYTES,
        )
    return options


# Every method of uvicorn's that the adapters extend or call.
_RELIED_ON: dict[type, tuple[str, ...]] = {
    HttpToolsProtocol: (
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_url",
        "on_header",
        "on_headers_complete",
        "on_message_complete",
        "handle_websocket_upgrade",
    ),
    WebSocketsSansIOProtocol: ("data_received", "connection_lost", "send"),
}


def adapter_problem() -> str | None:
    """Why `BoundedHttpProtocol` cannot run on the installed uvicorn; None if it can.

    It extends uvicorn's non-public protocol classes (0.54.x): the methods it extends
    must be there, and one connection at a time is driven through them, in an event
    loop of its own in a thread of its own, with a stand-in transport: a request
    answered within its deadline, the next one cut short (408 at its deadline), and
    an upgrade whose deadline `ReadingProtocol` takes over (503 at it).
    """
    missing = [
        f"{cls.__name__}.{name}"
        for cls, names in _RELIED_ON.items()
        for name in names
        if not callable(getattr(cls, name, None))
    ]
    if missing:
        return "no " + ", ".join(missing)
    # A thread: the caller may be inside an event loop of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, _drive_connections()).result()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


class _Unfit(Exception):
    """The installed uvicorn did not behave as `BoundedHttpProtocol` needs."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise _Unfit(what)


async def _probe_app(scope: Any, receive: Any, send: Any) -> None:
    """Answers an HTTP request with 204; holds a WebSocket handshake until it is gone."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif scope["type"] == "websocket":
        while (await receive())["type"] != "websocket.disconnect":
            pass


class _ProbeTransport(asyncio.Transport):
    """What `adapter_problem`'s connections write, and whether they closed."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Keep `data`."""
        self.written += data

    def is_closing(self) -> bool:
        """Whether `close` was called."""
        return self.closing

    def close(self) -> None:
        """Mark closed."""
        self.closing = True

    def can_write_eof(self) -> bool:
        """No half-close here."""
        return False

    def get_protocol(self) -> asyncio.BaseProtocol:
        """The protocol now reading."""
        return self.protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        """Switch protocols (an upgrade)."""
        self.protocol = protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """A made-up peer, no socket."""
        return {"peername": ("127.0.0.1", 1), "sockname": ("127.0.0.1", 2)}.get(name, default)

    def pause_reading(self) -> None:
        """Nothing to pause."""

    def resume_reading(self) -> None:
        """Nothing to resume."""


_PROBE_UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: probe\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def _drive_connections() -> None:
    """`adapter_problem`'s connections; raises what went otherwise than expected."""
    config = Config(
        app=_probe_app, ws=ReadingProtocol, lifespan="off", log_config=None, proxy_headers=False
    )
    config.load()
    state = ServerState()
    transports: list[_ProbeTransport] = []

    def connect() -> tuple[BoundedHttpProtocol, _ProbeTransport]:
        protocol = BoundedHttpProtocol(
            config=config, server_state=state, app_state={}, handshake_timeout=60.0
        )
        protocol.access_log = False  # not a request to log
        transport = _ProbeTransport(protocol)
        transports.append(transport)
        protocol.connection_made(transport)
        _expect(protocol._deadline is not None, "no deadline on a new connection")
        return protocol, transport

    try:
        http, transport = connect()
        http.data_received(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n")
        _expect(http._deadline is None, "the deadline outlived a whole request")
        await asyncio.gather(*list(state.tasks))
        _expect(transport.written.startswith(b"HTTP/1.1 204"), "the request went unanswered")
        http.data_received(b"GET / HT")
        _expect(http._deadline is not None, "no deadline for a kept-alive connection's request")
        transport.written.clear()
        http._expired()
        _expect(transport.written.startswith(b"HTTP/1.1 408"), "no 408 at the deadline")
        _expect(transport.closing, "not closed at the deadline")

        http, transport = connect()
        http.data_received(_PROBE_UPGRADE)
        ws = transport.get_protocol()
        _expect(isinstance(ws, ReadingProtocol), "the upgrade did not switch protocols")
        assert isinstance(ws, ReadingProtocol)
        _expect(ws._handshake_timer is not None, "the upgrade's deadline was not handed over")
        transport.written.clear()
        ws._handshake_expired()
        _expect(transport.written.startswith(b"HTTP/1.1 503"), "no 503 at the upgrade's deadline")
    finally:
        # Every connection ends, so that every app returns by itself: one cancelled
        # instead would be logged as a failing app.
        for transport in transports:
            with contextlib.suppress(Exception):
                transport.get_protocol().connection_lost(None)
        await asyncio.gather(*list(state.tasks), return_exceptions=True)


# A final text frame's first byte (FIN and opcode 1), then the payload length in 7 bits,
# or 126 and 16 bits, or 127 and 64 bits (RFC 6455, 5.2).
_HEAD_7 = struct.Struct("!BB")
_HEAD_16 = struct.Struct("!BBH")
_HEAD_64 = struct.Struct("!BBQ")
_FIN_TEXT = 0x81
# SO_LINGER on, for 0 seconds: close() resets the connection at once.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


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
