"""The behavioural half of service/adapters/uvicorn.py's start-up check.

Having the names is not enough: what uvicorn does in them changes between releases
(docs/performance.md, "uvicorn 0.55"). `probe_problem` drives one connection at a time
through both protocols, in an event loop of its own in a thread of its own, with a
stand-in transport, and says what went otherwise than the adapter relies on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
from typing import Any, cast

from uvicorn.config import Config
from uvicorn.server import ServerState

from service.adapters.uvicorn import (
    BoundedHttpProtocol,
    DirectTransport,
    KeepaliveDue,
    ReadingProtocol,
)
from service.adapters.waitables import LeanEvent, LeanQueue
from service.outbox import Outbox, OutboxLimits
from service.protocol.wire import text_frame
from service.transport import Send

# The attributes uvicorn's and websockets' constructors set that the adapter reads or
# writes, by the object that holds them.
HTTP_FIELDS = ("parser", "transport", "loop", "cycle", "pipeline", "server_state", "client")
CYCLE_FIELDS = ("response_complete", "response_started")
WS_FIELDS = (
    "conn",
    "transport",
    "loop",
    "client",
    "queue",
    "frames",
    "curr_msg_data_type",
    "handshake_complete",
    "close_sent",
    "disconnected",
    "initial_response",
    "writable",
    "ping_interval",
    "ping_timeout",
    "ping_timer",
    "pending_ping_payload",
    "ping_sent_at",
    "last_ping_rtt",
)
ACCEPTED_FIELDS = ("request", "response")  # set once the request is read
CONN_FIELDS = ("state", "writes", "extensions", "debug", "handshake_exc")

#: A WebSocket upgrade of the path `%s`, without its final CRLF.
PROBE_UPGRADE = (
    b"GET %s HTTP/1.1\r\nHost: probe\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
# Client frames, masked with zeros: the text "probe", and a close with 1000.
_PROBE_TEXT = b"\x81\x85\0\0\0\0probe"
_CLOSE = b"\x88\x82\0\0\0\0\x03\xe8"


def probe_problem() -> str | None:
    """What went otherwise than the adapter relies on, driving connections; None if nothing."""
    # A thread: the caller may be inside an event loop of its own.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(_run_quietly).result()
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"
    return None


def _run_quietly() -> None:
    """Drive the connections; what they log (an accept, a refusal) is not the server's."""
    thread = threading.get_ident()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "service.adapters.uvicorn")]

    def not_from_the_probe(record: logging.LogRecord) -> bool:
        return record.thread != thread

    for each in loggers:
        each.addFilter(not_from_the_probe)
    try:
        asyncio.run(drive_connections())
    finally:
        for each in loggers:
            each.removeFilter(not_from_the_probe)


class Unfit(Exception):
    """The installed uvicorn did not behave as the adapter needs."""


def _expect(condition: bool, what: str) -> None:
    if not condition:
        raise Unfit(what)


def _has(obj: object, owner: str, names: tuple[str, ...]) -> None:
    missing = [f"{owner}.{name}" for name in names if not hasattr(obj, name)]
    _expect(not missing, "no " + ", ".join(missing))


async def _probe_app(scope: Any, receive: Any, send: Any) -> None:
    """HTTP: 204. WebSocket: /open is accepted, any other path held; both until gone."""
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif scope["type"] == "websocket":
        if scope["path"] == "/open":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass


class ProbeTransport(asyncio.Transport):
    """What the probe's connections write, and whether they closed."""

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

    def abort(self) -> None:
        """Mark closed."""
        self.closing = True

    def can_write_eof(self) -> bool:
        """No half-close here."""
        return False

    def get_write_buffer_size(self) -> int:
        """Everything is written at once."""
        return 0

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


class _Taker:
    """A `TextReader` that takes every message."""

    def __init__(self) -> None:
        self.taken: list[str] = []

    def handle_text_now(self, text: str) -> bool:
        self.taken.append(text)
        return True


async def drive_connections() -> None:
    """The probe's connections; raises `Unfit` (or what uvicorn raised) at the first surprise."""
    config = Config(
        app=_probe_app, ws=ReadingProtocol, lifespan="off", log_config=None, proxy_headers=False
    )
    config.load()
    state = ServerState()
    transports: list[ProbeTransport] = []

    def connect() -> tuple[BoundedHttpProtocol, ProbeTransport]:
        protocol = BoundedHttpProtocol(
            config=config, server_state=state, app_state={}, handshake_timeout=60.0
        )
        protocol.access_log = False  # not a request to log
        transport = ProbeTransport(protocol)
        transports.append(transport)
        protocol.connection_made(transport)
        _has(protocol, "HttpToolsProtocol", HTTP_FIELDS)
        _expect(protocol._deadline is not None, "no deadline on a new connection")
        return protocol, transport

    def upgrade(path: bytes, extra: bytes = b"") -> ReadingProtocol:
        http, transport = connect()
        http.data_received(PROBE_UPGRADE % path + extra + b"\r\n")
        ws = transport.get_protocol()
        _expect(isinstance(ws, ReadingProtocol), "the upgrade did not switch protocols")
        assert isinstance(ws, ReadingProtocol)
        _has(ws, "WebSocketsSansIOProtocol", WS_FIELDS)
        _has(ws.conn, "ServerProtocol", CONN_FIELDS)
        return ws

    try:
        # A request answered within its deadline, the next one cut short at it (408).
        http, transport = connect()
        http.data_received(b"GET / HTTP/1.1\r\nHost: probe\r\n\r\n")
        _expect(http._deadline is None, "the deadline outlived a whole request")
        await asyncio.gather(*list(state.tasks))
        _expect(transport.written.startswith(b"HTTP/1.1 204"), "the request went unanswered")
        _has(http.cycle, "RequestResponseCycle", CYCLE_FIELDS)
        http.data_received(b"GET / HT")
        _expect(http._deadline is not None, "no deadline for a kept-alive connection's request")
        transport.written.clear()
        http._expired()
        _expect(transport.written.startswith(b"HTTP/1.1 408"), "no 408 at the deadline")
        _expect(transport.closing, "not closed at the deadline")

        # An upgrade the app does not answer: its deadline handed over, 503 at it.
        ws = upgrade(b"/held")
        written = ws.transport
        assert isinstance(written, ProbeTransport)
        _expect(ws._handshake_timer is not None, "the upgrade's deadline was not handed over")
        written.written.clear()
        ws._handshake_expired()
        _expect(written.written.startswith(b"HTTP/1.1 503"), "no 503 at the upgrade's deadline")

        # An upgrade websockets refuses (it has a body): answered once, with the reason.
        ws = upgrade(b"/held", b"Content-Length: 3\r\n")
        written = ws.transport
        assert isinstance(written, ProbeTransport)
        answer = bytes(written.written)
        _expect(answer.startswith(b"HTTP/1.1 400 "), "a refused upgrade got no 400")
        _expect(answer.count(b"HTTP/1.1 ") == 1, "a refused upgrade was answered twice")
        _expect(b"unsupported request body" in answer, "a refused upgrade was not told why")
        _expect(written.closing and ws.close_sent, "a refused upgrade was not closed")

        # An accepted WebSocket: messages offered from the read, frames written directly
        # unless paused (then they wait in the outbox), none once it closes.
        ws = upgrade(b"/open")
        for _ in range(100):
            if ws.handshake_complete:
                break
            await asyncio.sleep(0)
        written = ws.transport
        assert isinstance(written, ProbeTransport)
        _expect(written.written.startswith(b"HTTP/1.1 101"), "the upgrade was not accepted")
        _has(ws, "WebSocketsSansIOProtocol", ACCEPTED_FIELDS)
        _expect(
            isinstance(ws.queue, LeanQueue) and isinstance(ws.writable, LeanEvent),
            "uvicorn replaced the connection's queue or event after its constructor",
        )
        _expect(ws.takes_writes, "an open connection took no writes")
        # The keepalive on the grid: a ping when its tick comes, the next one due once
        # its pong is in.
        _expect(ws._keepalive is KeepaliveDue.PING, "no ping due once accepted")
        _expect(ws.ping_timer is None, "uvicorn's own ping timer runs too")
        written.written.clear()
        ws.tick()
        payload = ws.pending_ping_payload
        _expect(
            payload is not None and written.written == b"\x89\x04" + payload,
            "the ping's tick sent no ping",
        )
        assert payload is not None
        _expect(ws._keepalive is KeepaliveDue.PONG, "no deadline for the pong")
        ws.data_received(b"\x8a\x84\0\0\0\0" + payload)
        _expect(ws._keepalive is KeepaliveDue.PING, "the pong did not make the next ping due")
        direct = DirectTransport(cast(Send, ws.send), ws)
        reader = _Taker()
        direct.set_reader(reader)
        ws.data_received(_PROBE_TEXT)
        _expect(reader.taken == ["probe"], "a text message was not offered from the read")
        written.written.clear()
        _expect(direct.write_now("probe"), "an open connection refused a direct write")
        _expect(written.written == text_frame("probe"), "a direct write wrote something else")
        ws.pause_writing()
        _expect(not direct.write_now("paused"), "a paused connection took a direct write")
        outbox = Outbox(OutboxLimits(max_messages=10, max_chars=100))
        outbox.put("a")
        outbox.put("b")
        sending = asyncio.ensure_future(direct.send_from(outbox))
        await asyncio.sleep(0)
        _expect(not sending.done() and len(outbox) == 2, "frames left while paused")
        ws.resume_writing()
        sent = await sending
        _expect(sent == 2, "the outbox was not sent whole")
        _expect(written.written.endswith(text_frame("a") + text_frame("b")), "not in order")
        ws.data_received(_CLOSE)
        _expect(not ws.takes_writes, "a closing connection took writes")

        # A connection that ends leaves the keepalive grid (uvicorn's `connection_lost`
        # calls `stop_keepalive`): nothing of it stays referenced until its tick.
        ended = upgrade(b"/open")
        for _ in range(100):
            if ended.handshake_complete:
                break
            await asyncio.sleep(0)
        _expect(ended._keepalive is KeepaliveDue.PING, "no ping due once accepted")
        transports.remove(cast(ProbeTransport, ended.transport))
        ended.connection_lost(None)
        _expect(ended._keepalive is None, "a connection that ended stayed on the keepalive grid")
    finally:
        # Every connection ends, so that every app returns by itself: one cancelled
        # instead would be logged as a failing app.
        for transport in transports:
            with contextlib.suppress(Exception):
                transport.get_protocol().connection_lost(None)
        await asyncio.gather(*list(state.tasks), return_exceptions=True)
