"""The uvicorn adapter's start-up check, and the way back to uvicorn's own protocols.

`BoundedHttpProtocol` and `ReadingProtocol` extend uvicorn's non-public protocol classes.
At start-up `uvicorn_options` checks that the installed uvicorn still has what they rely
on and behaves as they expect, and picks them; otherwise uvicorn's own protocols (h11 with
its public head limit), with `transport_for` on ASGI, saying why in one line.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import pickle
import weakref
from collections.abc import Iterator
from typing import Any, cast

import pytest
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState

from service.__main__ import uvicorn_options
from service.adapters import uvicorn as adapter
from service.adapters.uvicorn import (
    MAX_HEAD_BYTES,
    MAX_LINE_BYTES,
    BoundedHttpProtocol,
    ReadingProtocol,
    adapter_problem,
    transport_for,
)
from service.adapters.uvicorn_probe import PROBE_UPGRADE, ProbeTransport
from service.settings import Settings
from service.transport import Send, Transport

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


def warnings_of_adapter(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "service.adapters.uvicorn" and record.levelno >= logging.WARNING
    ]


@pytest.fixture
def fresh_check() -> Iterator[None]:
    """The check runs anew in the test, and again for the tests after it."""
    adapter_problem.cache_clear()
    adapter._warn_once.cache_clear()
    yield
    adapter_problem.cache_clear()
    adapter._warn_once.cache_clear()


def test_the_installed_uvicorn_has_what_the_adapter_relies_on(fresh_check: None) -> None:
    assert adapter_problem() is None


def test_with_it_the_worker_runs_the_bounded_protocol(caplog: pytest.LogCaptureFixture) -> None:
    options = uvicorn_options(Settings.model_validate({"handshake_timeout": 3.5}))
    http = options["http"]
    assert isinstance(http, functools.partial)
    assert http.func is BoundedHttpProtocol
    assert http.keywords == {"handshake_timeout": 3.5}
    assert options["h11_max_incomplete_event_size"] == MAX_HEAD_BYTES
    assert options["ws"] is ReadingProtocol
    assert warnings_of_adapter(caplog) == []
    # uvicorn's process manager pickles the config for every worker process.
    assert pickle.loads(pickle.dumps(http)).keywords == {"handshake_timeout": 3.5}
    assert pickle.loads(pickle.dumps(options["ws"])) is ReadingProtocol


def test_without_fast_adapters_the_protocols_stay(caplog: pytest.LogCaptureFixture) -> None:
    # FAST_ADAPTERS=false turns off speed (`transport_for`), not the bounds.
    options = uvicorn_options(Settings.model_validate({"fast_adapters": False}))
    assert options["ws"] is ReadingProtocol
    assert cast(functools.partial[Any], options["http"]).func is BoundedHttpProtocol
    assert warnings_of_adapter(caplog) == []


async def test_uvicorn_makes_the_protocol_from_the_option() -> None:
    options = adapter.uvicorn_options(Settings.model_validate({"handshake_timeout": 2.0}))
    config = Config(app=_app, lifespan="off", log_config=None, **options)
    config.load()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}
    )
    assert isinstance(protocol, BoundedHttpProtocol)
    assert protocol.handshake_timeout == 2.0
    assert config.ws_protocol_class is ReadingProtocol


async def _app(scope: Any, receive: Any, send: Any) -> None:
    """Never called."""


def _does_not_upgrade(self: HttpToolsProtocol) -> None:
    """An uvicorn whose upgrade works otherwise than the adapter expects."""


def _data_received_as_054(self: WebSocketsSansIOProtocol, data: bytes) -> None:
    """uvicorn 0.54's: a request websockets refused was neither answered nor closed."""
    self.conn.receive_data(data)
    self.handle_events()


@pytest.mark.parametrize(
    ("break_uvicorn", "named"),
    [
        # A method the adapter extends is gone.
        (lambda mp: mp.delattr(HttpToolsProtocol, "on_message_begin"), "on_message_begin"),
        # It is there but does something else: the deadline is not handed over.
        (
            lambda mp: mp.setattr(HttpToolsProtocol, "handle_websocket_upgrade", _does_not_upgrade),
            "the upgrade did not switch protocols",
        ),
        # A refused handshake is not handed to the method the adapter extends.
        (
            lambda mp: mp.setattr(WebSocketsSansIOProtocol, "data_received", _data_received_as_054),
            "a refused upgrade got no 400",
        ),
        # An attribute set in a constructor is gone.
        (
            lambda mp: mp.setattr(HttpToolsProtocol, "__init__", _without_pipeline),
            "HttpToolsProtocol.pipeline",
        ),
        # A release the adapter was not tested with.
        (lambda mp: mp.setattr(uvicorn, "__version__", "0.56.0"), "uvicorn 0.56.0, outside"),
        (lambda mp: mp.setattr(uvicorn, "__version__", "0.54.0"), "uvicorn 0.54.0, outside"),
    ],
    ids=["missing", "changed", "refusal", "attribute", "newer", "older"],
)
async def test_without_it_the_worker_falls_back_to_uvicorns_h11_and_says_why_once(
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    fresh_check: None,
    break_uvicorn: Any,
    named: str,
) -> None:
    break_uvicorn(monkeypatch)
    problem = adapter_problem()
    assert problem is not None
    assert named in problem
    caplog.clear()
    options = uvicorn_options(Settings())
    assert options["http"] == "h11"
    assert options["h11_max_incomplete_event_size"] == MAX_HEAD_BYTES
    assert options["ws"] == "websockets-sansio"
    # A connection on the adapter's protocol all the same (as a test makes one) gets
    # the public path: nothing of what failed the check is touched.
    protocol = ReadingProtocol(config=_loaded_config(), server_state=ServerState(), app_state={})
    assert type(transport_for(cast(Send, protocol.send), fast=True)) is Transport
    assert uvicorn_options(Settings())["ws"] == "websockets-sansio"
    [warning] = warnings_of_adapter(caplog)
    assert named in warning
    assert "HANDSHAKE_TIMEOUT" in warning


def _without_pipeline(self: HttpToolsProtocol, *args: Any, **kwargs: Any) -> None:
    """uvicorn's constructor, then one attribute the adapter reads taken away."""
    _http_init(self, *args, **kwargs)
    del self.pipeline


_http_init = HttpToolsProtocol.__init__


def _loaded_config() -> Config:
    config = Config(app=_app, ws=ReadingProtocol, lifespan="off", log_config=None)
    config.load()
    return config


def test_the_fallback_is_a_protocol_uvicorn_loads(
    monkeypatch: pytest.MonkeyPatch, fresh_check: None
) -> None:
    monkeypatch.delattr(HttpToolsProtocol, "on_message_begin")
    config = Config(
        app=_app, lifespan="off", log_config=None, **adapter.uvicorn_options(Settings())
    )
    config.load()
    assert config.http_protocol_class.__name__ == "H11Protocol"
    assert config.ws_protocol_class is WebSocketsSansIOProtocol


class FakeTransport:
    """Records what a protocol writes and whether it closed."""

    def __init__(self) -> None:
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5), "sockname": ("127.0.0.1", 8000)}.get(name, default)


async def _until_gone(scope: Any, receive: Any, send: Any) -> None:
    """A WebSocket app that answers nothing, until the client is gone."""
    while (await receive())["type"] != "websocket.disconnect":
        pass


async def reading_protocol() -> tuple[ReadingProtocol, FakeTransport]:
    config = Config(app=_until_gone, ws=ReadingProtocol, lifespan="off", log_config=None)
    config.load()
    protocol = ReadingProtocol(config=config, server_state=ServerState(), app_state={})
    transport = FakeTransport()
    protocol.connection_made(transport)  # type: ignore[arg-type]
    return protocol, transport


# What reaches the WebSocket protocol from uvicorn's h11 (the fallback), which lets
# longer lines through than websockets takes; or a request websockets cannot read at all.
@pytest.mark.parametrize(
    ("extra", "status"),
    [
        (b"X-Big: " + b"a" * MAX_LINE_BYTES + b"\r\n", 431),
        (b"".join(b"X-%d: v\r\n" % n for n in range(200)), 431),
        (b"Content-Length: 3\r\n", 400),
    ],
    ids=["header line", "header fields", "a body"],
)
async def test_what_websockets_refuses_is_answered_and_closed(extra: bytes, status: int) -> None:
    protocol, transport = await reading_protocol()
    protocol.data_received(UPGRADE + extra + b"\r\n")
    assert transport.written.startswith(b"HTTP/1.1 %d " % status), transport.written[:200]
    assert b"Connection: close" in transport.written
    assert transport.closed
    assert protocol.close_sent  # and uvicorn's `shutdown` only closes it
    # Answered once (uvicorn 0.55 answers these itself unless the adapter does), and why.
    assert transport.written.count(b"HTTP/1.1 ") == 1
    assert b"Failed to open a WebSocket connection: " in transport.written
    assert b"invalid request." not in transport.written  # all that uvicorn's own 400 says


async def test_a_handshake_deadline_passes_only_before_the_accept() -> None:
    protocol, transport = await reading_protocol()
    protocol.data_received(UPGRADE + b"\r\n")  # the app's task starts, and waits
    protocol.handshake_deadline(protocol.loop.time() + 3600)
    assert protocol._handshake_timer is not None
    protocol._handshake_expired()
    assert transport.written.startswith(b"HTTP/1.1 503 ")
    assert transport.closed
    protocol.connection_lost(None)
    await asyncio.gather(*protocol.tasks)

    protocol, transport = await reading_protocol()
    protocol.data_received(UPGRADE + b"\r\n")
    protocol.handshake_deadline(protocol.loop.time() + 3600)
    await protocol.send({"type": "websocket.accept"})
    assert transport.written.startswith(b"HTTP/1.1 101 ")
    assert protocol._handshake_timer is None  # accepted: no deadline any more
    protocol._handshake_expired()
    assert not transport.closed
    protocol.connection_lost(None)
    await asyncio.gather(*protocol.tasks)


async def test_a_handshake_deadline_closes_a_refusal_the_app_began_and_never_finished() -> None:
    # uvicorn (0.55) counts the handshake complete from the refusal's first part; the
    # deadline waits for its end.
    protocol, transport = await reading_protocol()
    protocol.data_received(UPGRADE + b"\r\n")
    protocol.handshake_deadline(protocol.loop.time() + 3600)
    await protocol.send({"type": "websocket.http.response.start", "status": 403, "headers": []})
    assert protocol.handshake_complete
    assert protocol._handshake_timer is not None
    protocol._handshake_expired()
    assert not transport.written.startswith(b"HTTP/1.1 503")  # the app's answer was begun
    assert transport.closed
    protocol.connection_lost(None)
    await asyncio.gather(*protocol.tasks)

    protocol, transport = await reading_protocol()
    protocol.data_received(UPGRADE + b"\r\n")
    protocol.handshake_deadline(protocol.loop.time() + 3600)
    await protocol.send({"type": "websocket.http.response.start", "status": 403, "headers": []})
    await protocol.send({"type": "websocket.http.response.body", "body": b"no"})
    assert transport.written.startswith(b"HTTP/1.1 403 ")
    assert protocol._handshake_timer is None  # answered: no deadline any more
    protocol.connection_lost(None)
    await asyncio.gather(*protocol.tasks)


async def test_the_http_protocol_is_freed_by_refcount_once_it_upgraded() -> None:
    # Its parser holds it in a cycle: left alone after the upgrade, each WebSocket's
    # HTTP protocol waited for the garbage collector (idle memory per connection).
    config = Config(app=_until_gone, ws=ReadingProtocol, lifespan="off", log_config=None)
    config.load()
    state = ServerState()
    http = BoundedHttpProtocol(
        config=config, server_state=state, app_state={}, handshake_timeout=60.0
    )
    transport = ProbeTransport(http)
    http.connection_made(transport)
    gc.collect()
    gc.disable()
    try:
        http.data_received(PROBE_UPGRADE % b"/ws" + b"\r\n")
        ws = transport.get_protocol()
        assert isinstance(ws, ReadingProtocol)
        freed = weakref.ref(http)
        del http
        assert freed() is None
    finally:
        gc.enable()
        ws.connection_lost(None)
        await asyncio.gather(*list(state.tasks), return_exceptions=True)
