"""The uvicorn adapter: the one module (and its probe) using uvicorn's and websockets' privates.

uvicorn's public interface is ASGI, which has no way to bound a request head, put a
deadline on a handshake, abort a socket, write a frame without a task step, or hand over a
message without a queue. This module subclasses uvicorn's httptools and websockets-sansio
protocols for those (tested ranges in pyproject.toml):

* `BoundedHttpProtocol`: the request head bounded in size (414, 431) and the request and
  the WebSocket upgrade in time (408, 503: HANDSHAKE_TIMEOUT).
* `ReadingProtocol`: answers, with the reason, an upgrade websockets refused; drops the
  socket of a closing client that never reads; keeps `takes_writes` (whether uvicorn's
  own `send` of a text frame would just write it) up to date; offers whole text
  messages, once websockets' own parser made them, to a `TextReader` from inside the read;
  waits on a lean queue and event instead of asyncio's (waitables.py), which hold
  3.8 KB per idle connection; and keeps uvicorn's keepalive pings on one grid of ticks
  per worker (ticks.py) instead of timers of each connection's own.
* `transport_for` hands each connection a `service.transport.Transport`: `DirectTransport`
  writes frames to the socket itself (docs/performance.md, "What changed, and what each
  part bought", nos. 1, 6 and 8), `BoundedTransport` only drops sockets, and the plain
  `Transport` is ASGI.

`adapter_problem` checks once per process that the installed uvicorn and websockets are
in range, have every name used here, and behave as relied on (service/adapters/
uvicorn_probe.py drives connections through both protocols). If not, `uvicorn_options`
runs uvicorn's own protocols and `transport_for` the plain `Transport`, and one warning
says why. FAST_ADAPTERS=false keeps the bounds but takes every frame and message through
ASGI.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import random
import socket
import struct
import weakref
from collections.abc import Callable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httptools
import uvicorn
from uvicorn._types import ASGISendEvent
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets import http11
from websockets.frames import Frame
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.version import version as websockets_version

from service.adapters.ticks import Ticks
from service.adapters.waitables import LeanEvent, LeanQueue
from service.protocol.wire import wire_frames
from service.transport import Send, TextReader, Transport

if TYPE_CHECKING:
    from service.outbox import Outbox
    from service.settings import Settings

logger = logging.getLogger(__name__)

#: The releases this module was written and tested against: [first, past the last).
UVICORN_RANGE = ((0, 55), (0, 56))
WEBSOCKETS_RANGE = ((17,), (18,))

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
# SO_LINGER on, for 0 seconds: close() resets the connection at once.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


# --- The WebSocket protocol ------------------------------------------------------------


class KeepaliveDue(enum.Enum):
    """What a connection's keepalive waits for on the grid of ticks."""

    PING = "the next ping"
    PONG = "the pong of the ping in flight"


def keepalive_tick(ping_interval: float) -> float:
    """The keepalive grid's tick: a 40th of the ping interval, at most half a second."""
    return min(0.5, ping_interval / 40)


_grids: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[float, Ticks]] = (
    weakref.WeakKeyDictionary()
)
#: Seconds a keepalive ping or pong deadline may wait, past its tick, while the worker
#: is busy (`hold_keepalive_while`).
KEEPALIVE_HOLD = 2.0
_holds: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Callable[[], bool]] = (
    weakref.WeakKeyDictionary()
)


def hold_keepalive_while(loop: asyncio.AbstractEventLoop, busy: Callable[[], bool] | None) -> None:
    """While `busy()`, the loop's keepalive waits, tick by tick, up to KEEPALIVE_HOLD seconds.

    The worker calls it with its hub's fan-outs: a message to tens of thousands of
    members then reaches them all before pings (a write and a pong to read each) take
    their share of the CPU. None: nothing holds the keepalive any more.
    """
    if busy is None:
        _holds.pop(loop, None)
    else:
        _holds[loop] = busy


def keepalive_grid(loop: asyncio.AbstractEventLoop, ping_interval: float) -> Ticks:
    """The grid the event loop's connections with this ping interval share."""
    tick = keepalive_tick(ping_interval)
    grids = _grids.setdefault(loop, {})
    grid = grids.get(tick)
    if grid is None:
        grid = grids[tick] = Ticks(tick)
    return grid


class ReadingProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, with the extras `transport_for` hands out.

    Text messages are offered to `reader` only while nothing waits in uvicorn's queue,
    so a message never overtakes one queued before it; `reader` refuses what it cannot
    finish in order. A message that is not valid UTF-8 goes uvicorn's way (close 1007).
    """

    # Slots, not entries in the instance's __dict__: idle connections are counted in
    # bytes (docs/performance.md, "What changed, and what each part bought", no. 2).
    __slots__ = (
        "_drop_timer",
        "_grid",
        "_handshake_timer",
        "_held_since",
        "_keepalive",
        "_keepalive_tick",
        "reader",
        "takes_writes",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's asyncio.Queue and asyncio.Event, which hold 3.8 KB of deques from
        # the start, swapped for ones that cost nothing until used (waitables.py).
        self.queue = LeanQueue()  # type: ignore[assignment]
        self.writable = LeanEvent(is_set=True)  # type: ignore[assignment]
        #: Set by the connection's transport while it reads (`set_reader`).
        self.reader: TextReader | None = None
        #: True while uvicorn's `send` of a text frame would just write it (`_recheck`),
        #: unless the transport is closing: that one is asked at each write.
        self.takes_writes = False
        #: Set while the app has yet to answer the upgrade (`handshake_deadline`).
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._drop_timer: asyncio.TimerHandle | None = None
        # The keepalive's place on the worker's grid, instead of uvicorn's timers.
        self._grid: Ticks | None = None
        self._keepalive: KeepaliveDue | None = None
        self._keepalive_tick = 0
        # When the keepalive due now was first held (`tick`); None: not held.
        self._held_since: float | None = None

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
        # write one text frame. They change only inside the methods below, so a delivery
        # reads one attribute (docs/performance.md, "What changed, and what each part
        # bought", no. 7).
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

    # The keepalive: uvicorn's pings and pong deadlines, on a grid shared by the worker's
    # connections (ticks.py) instead of timers of each connection's own.

    def schedule_ping(self) -> None:
        """As uvicorn's: the next ping is due one interval (less the last round trip) on."""
        assert self.ping_interval is not None
        delay = max(0.0, self.ping_interval - self.last_ping_rtt)
        self._wait_for(KeepaliveDue.PING, self.loop.time() + delay)

    def send_keepalive_ping(self) -> None:
        """As uvicorn's: a ping with a random payload, and a deadline for its pong."""
        if self.close_sent or self.transport.is_closing():
            return
        payload = self.pending_ping_payload = random.getrandbits(32).to_bytes(4, "big")
        self.ping_sent_at = self.loop.time()
        self.conn.send_ping(payload)
        self.transport.write(b"".join(self.conn.data_to_send()))
        if self.ping_timeout is not None:
            self._wait_for(KeepaliveDue.PONG, self.ping_sent_at + self.ping_timeout)
        else:
            self.schedule_ping()

    def handle_pong(self, event: Frame) -> None:
        """As uvicorn's: the pong of the ping in flight ends its wait; the next is due."""
        if self.pending_ping_payload is None or bytes(event.data) != self.pending_ping_payload:
            return  # unsolicited, or an earlier ping's
        self.last_ping_rtt = self.loop.time() - self.ping_sent_at
        self.pending_ping_payload = None
        if self._keepalive is KeepaliveDue.PONG:
            self.schedule_ping()

    def stop_keepalive(self) -> None:
        """As uvicorn's: nothing more is due (closing, or gone)."""
        super().stop_keepalive()
        if self._keepalive is not None and self._grid is not None:
            self._grid.discard(self._keepalive_tick, self)
        self._keepalive = None

    def tick(self) -> None:
        """The keepalive's tick has come: ping, or give up on the pong (close 1011).

        Unless the worker is busy (`hold_keepalive_while`): then the next tick, for up to
        KEEPALIVE_HOLD seconds.
        """
        due, self._keepalive = self._keepalive, None
        if due is None:
            return
        busy = _holds.get(self.loop)
        if busy is not None and busy():
            now = self.loop.time()
            since = now if self._held_since is None else self._held_since
            if now - since < KEEPALIVE_HOLD:
                assert self._grid is not None
                self._wait_for(due, now + self._grid.interval)
                self._held_since = since
                return
        if due is KeepaliveDue.PING:
            self.send_keepalive_ping()
        elif due is KeepaliveDue.PONG:
            self.keepalive_timeout()

    def _wait_for(self, due: KeepaliveDue, when: float) -> None:
        grid = self._grid
        if grid is None:
            assert self.ping_interval is not None
            grid = self._grid = keepalive_grid(self.loop, self.ping_interval)
        elif self._keepalive is not None:
            grid.discard(self._keepalive_tick, self)
        self._keepalive = due
        self._keepalive_tick = grid.add(when, self)
        self._held_since = None

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
            if self._handshake_timer is not None and self._answered():
                self._end_handshake_deadline()
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

    def handle_handshake_exception(self) -> None:
        """Answer a request websockets refused with the reason, and close.

        Instead of uvicorn's own answer, which says only "invalid request". websockets
        prepares a 414 or a 431 (a line too long, too many headers), and nothing for a
        request it cannot read (a body, a target that is not ASCII): that one gets a 400
        with the reason.
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

    def handshake_deadline(self, when: float) -> None:
        """Close the connection at `when` (event loop time) unless the app answered.

        `BoundedHttpProtocol` hands over what is left of the upgrade request's
        deadline: by then the app must have accepted (or refused) the WebSocket.
        """
        if not self._answered() and not self.transport.is_closing():
            self._handshake_timer = self.loop.call_at(when, self._handshake_expired)

    def _answered(self) -> bool:
        # uvicorn counts the handshake complete from the first part of a refusal the app
        # sends as an HTTP response (initial_response); the deadline waits for its end.
        return self.handshake_complete and (self.initial_response is None or self.close_sent)

    def _end_handshake_deadline(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    def _handshake_expired(self) -> None:
        """503 unless the app has begun an answer of its own, then close."""
        self._handshake_timer = None
        if self._answered() or self.transport.is_closing():
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


# --- The request head and the handshake: bounded in size and in time ------------------
#
# uvicorn bounds neither. Its httptools protocol takes a request head of any size and
# waits for it for ever (its keep-alive timer runs only between requests): every such
# connection held a file descriptor, outside MAX_CONNECTIONS.


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

    `uvicorn_options` makes uvicorn use it, with `handshake_timeout` bound.
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
        # Counted with the value's trailing blanks, which uvicorn strips before it
        # rebuilds the line: never less than what websockets then reads.
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


# --- What a connection gets: `service.transport.Transport` and its subclasses ---------


class BoundedTransport(Transport):
    """Every frame through ASGI, and the socket dropped when a closing client lingers."""

    __slots__ = ("_protocol",)

    def __init__(self, send: Send, protocol: ReadingProtocol) -> None:
        super().__init__(send)
        self._protocol = protocol

    def drop_within(self, delay: float) -> None:
        """Abort the socket unless the connection is gone within `delay` seconds."""
        self._protocol.drop_within(delay)


class DirectTransport(BoundedTransport):
    """Frames written to the connection's socket, messages taken from inside its read."""

    __slots__ = ()

    def write_now(self, frame: str) -> bool:
        """Write `frame` if uvicorn's `send` would now just write it; else False."""
        # Once per member per message: attribute reads only, the bytes built by the
        # first member (docs/performance.md, "What changed, and what each part bought",
        # nos. 1 and 7).
        protocol = self._protocol
        if protocol.takes_writes and not protocol.transport.is_closing():
            frames = wire_frames
            protocol.transport.write(frames.wire if frame is frames.text else frames.build(frame))
            return True
        return False

    async def send_from(self, outbox: Outbox) -> int:
        """Send the outbox's frames in order until it is empty; how many were sent.

        Everything queued goes in one write once the socket takes writes; while the
        client does not read, the frames wait in the outbox. Otherwise (closing, gone, a
        pong not yet flushed) one frame at a time through uvicorn's `send`, which
        raises what it raises: it does not wait there, so nothing overtakes the frame.
        """
        protocol = self._protocol
        sent = 0
        while outbox:
            if protocol.takes_writes and not protocol.transport.is_closing():
                frames = outbox.take_all()
                protocol.transport.write(b"".join(map(wire_frames, frames)))
                sent += len(frames)
            elif not protocol.writable.is_set() and not protocol.disconnected:
                await protocol.writable.wait()  # set again on resume or on loss
            else:
                await self._asgi_send({"type": "websocket.send", "text": outbox.pop()})
                sent += 1
        return sent

    def set_reader(self, reader: TextReader | None) -> None:
        """Offer the client's text messages to `reader` from inside the read."""
        self._protocol.reader = reader


def transport_for(send: Send, *, fast: bool) -> Transport:
    """How the connection that `send` belongs to writes its frames; call after `accept`.

    `DirectTransport` when `fast`, the check passed, `send` is a bound method of a
    `ReadingProtocol` and the connection has neither compression (frames differ per
    connection) nor debug logging (websockets logs every frame); `BoundedTransport`
    when it is ours but not fast; the plain `Transport` otherwise. With ours, the
    handshake's request and response, which uvicorn keeps for the connection's whole
    life but nothing reads after `accept`, are let go (docs/performance.md, "What
    changed, and what each part bought", no. 2).
    """
    protocol = getattr(send, "__self__", None)
    if not isinstance(protocol, ReadingProtocol) or not adapter_ready():
        return Transport(send)
    if protocol.handshake_complete:
        # websockets' parser holds on to the request too (a local of its generator):
        # emptied, its headers go with uvicorn's references.
        if protocol.request is not None:
            protocol.request.headers.clear()
        protocol.request = None  # type: ignore[assignment]
        protocol.response = None  # type: ignore[assignment]
        conn = protocol.conn
        if fast and not conn.extensions and not conn.debug:
            return DirectTransport(send, protocol)
    return BoundedTransport(send, protocol)


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The `ws` and `http` options of uvicorn, and what goes with them, for a worker.

    `ReadingProtocol` and `BoundedHttpProtocol` (with HANDSHAKE_TIMEOUT) if the
    installed uvicorn passes the check; otherwise uvicorn's own websockets-sansio and
    h11. h11's public `h11_max_incomplete_event_size` bounds the head there (a 400, not
    a 431 or 414), and it is set either way for a run with `http=h11` (bench/worker.py).
    """
    options: dict[str, Any] = {"h11_max_incomplete_event_size": MAX_HEAD_BYTES}
    if adapter_ready():
        options["ws"] = ReadingProtocol
        options["http"] = functools.partial(
            BoundedHttpProtocol, handshake_timeout=settings.handshake_timeout
        )
    else:
        options["ws"] = "websockets-sansio"
        options["http"] = "h11"
    return options


# --- The start-up check ----------------------------------------------------------------

# Every method of uvicorn's and websockets' that this module extends or calls; the
# attributes set in their constructors are checked on the probe's objects.
RELIED_ON: dict[type, tuple[str, ...]] = {
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
    WebSocketsSansIOProtocol: (
        "connection_made",
        "connection_lost",
        "data_received",
        "pause_writing",
        "resume_writing",
        "shutdown",
        "keepalive_timeout",
        "start_keepalive",
        "stop_keepalive",
        "schedule_ping",
        "send_keepalive_ping",
        "handle_pong",
        "send",
        "send_receive_event_to_app",
        "handle_handshake_exception",
    ),
    ServerProtocol: ("data_to_send", "reject"),
}


def adapter_ready() -> bool:
    """True if this module's protocols may run; if not, says why once per process."""
    problem = adapter_problem()
    if problem is None:
        return True
    _warn_once(problem)
    return False


@functools.cache
def _warn_once(problem: str) -> None:
    logger.warning(
        "uvicorn adapter off: this uvicorn lacks what service/adapters/uvicorn.py relies "
        "on (%s). Running uvicorn's own websockets-sansio and h11 protocols, every frame "
        "through ASGI: HANDSHAKE_TIMEOUT and the 414/431 limits are off (h11 answers 400 "
        "to a request head over %d bytes), and the socket of a closing client that "
        "does not read stays open",
        problem,
        MAX_HEAD_BYTES,
    )


@functools.cache
def adapter_problem() -> str | None:
    """Why this module's protocols cannot run on the installed uvicorn; None if they can.

    Checked once per process: the versions, every name relied on, and one connection
    at a time driven through both protocols (service/adapters/uvicorn_probe.py).
    """
    problem = _version_problem("uvicorn", uvicorn.__version__, UVICORN_RANGE)
    problem = problem or _version_problem("websockets", websockets_version, WEBSOCKETS_RANGE)
    if problem is not None:
        return problem
    missing = [
        f"{cls.__name__}.{name}"
        for cls, names in RELIED_ON.items()
        for name in names
        if not callable(getattr(cls, name, None))
    ]
    if missing:
        return "no " + ", ".join(missing)
    # Imported here: it drives this module's own classes.
    from service.adapters.uvicorn_probe import probe_problem

    return probe_problem()


def _version_problem(
    name: str, version: str, tested: tuple[tuple[int, ...], tuple[int, ...]]
) -> str | None:
    first, past = tested
    numbers = _release(version)
    if first <= numbers < past:
        return None
    return (
        f"{name} {version}, outside the tested >={'.'.join(map(str, first))}, "
        f"<{'.'.join(map(str, past))}"
    )


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version: "0.55.1rc1" -> (0, 55, 1)."""
    numbers: list[int] = []
    for part in version.split("."):
        digits = part[: len(part) - len(part.lstrip("0123456789"))]
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) < len(part):
            break
    return tuple(numbers)
