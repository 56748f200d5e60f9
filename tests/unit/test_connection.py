"""The outbox's limits, the room a resume's backlog gets above them (once at a time),
frames taken from inside the read in their turn, and a closed connection's memory
freed without the garbage collector."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import AsyncIterator, Callable
from types import SimpleNamespace
from typing import Any

import pytest

from service.connection import Connection
from service.metrics import Metrics
from service.outbox import OutboxLimits
from service.protocol.codes import CloseCode
from service.transport import Send, Transport
from tests.helpers import async_wait_for

Outbox = Callable[..., Connection]


class Handler:
    """Records each text message; holds those in `hold` until `finish`; or raises."""

    def __init__(self, *, hold: tuple[str, ...] = (), raises: bool = False) -> None:
        self.hold = hold
        self.raises = raises
        self.handled: list[str] = []
        self.held: asyncio.Future[None] | None = None

    def handle_text(self, text: str) -> asyncio.Future[None] | None:
        if self.raises:
            raise RuntimeError("a bug in a command")
        self.handled.append(text)
        if text in self.hold:
            self.held = asyncio.get_running_loop().create_future()
            return self.held
        return None

    def handle_bytes(self, data: bytes) -> None:
        pass

    def release(self) -> None:
        pass

    def finish(self) -> None:
        assert self.held is not None
        self.held.set_result(None)


def connect(
    websocket: Any,
    send: Send,
    handler: Handler | None = None,
    *,
    max_messages: int = 10,
    max_chars: int = 1000,
) -> Connection:
    """A connection whose frames go through ASGI `send` (no direct writes)."""
    return Connection(
        websocket,
        Transport(send),
        handler or Handler(),
        limits=OutboxLimits(max_messages, max_chars),
        close_timeout=1,
        metrics=Metrics(),
    )


@pytest.fixture
async def outbox() -> AsyncIterator[Outbox]:
    """Connections whose socket never takes a frame: everything stays queued."""
    made: list[Connection] = []

    async def never_sends(message: Any) -> None:
        await asyncio.Event().wait()

    def make(max_messages: int = 10, max_chars: int = 100) -> Connection:
        # Without uvicorn's own send there are no direct writes: frames queue, and the
        # writer started for them waits on `never_sends` for ever.
        websocket: Any = SimpleNamespace(scope={})
        connection = connect(websocket, never_sends, max_messages=max_messages, max_chars=max_chars)
        made.append(connection)
        return connection

    yield make
    for connection in made:
        if connection._writer is not None:
            connection._writer.cancel()
            await asyncio.gather(connection._writer, return_exceptions=True)


async def test_a_full_outbox_closes_the_connection(outbox: Outbox) -> None:
    connection = outbox(max_chars=100)
    connection.deliver("x" * 60)
    assert not connection.closing
    connection.deliver("x" * 60)
    assert connection.closing


async def test_a_backlog_past_the_limits_does_not_get_the_next_frame_refused(
    outbox: Outbox,
) -> None:
    connection = outbox(max_messages=10, max_chars=100)
    connection.deliver_backlog(["x" * 50] * 12)  # 600 characters, 12 frames
    connection.deliver("live")
    assert not connection.closing
    # The room is the backlog's size, not unlimited: the limits still apply on top.
    for _ in range(9):
        connection.deliver("y" * 10)
    assert not connection.closing
    connection.deliver("y" * 10)
    assert connection.closing


async def test_a_second_backlog_gets_no_room_of_its_own(outbox: Outbox) -> None:
    # A client that resumes again and again without reading must not raise the limits
    # each time: while one backlog's room is outstanding, the next must fit in it.
    connection = outbox(max_messages=10, max_chars=100)
    connection.deliver_backlog(["x" * 50] * 12)  # room: 22 frames, 700 characters
    connection.deliver_backlog(["y" * 50] * 2)  # fits in what is left of it
    assert not connection.closing
    connection.deliver_backlog(["z" * 50] * 12)
    assert connection.closing


async def test_a_connection_closed_with_its_writer_waiting_is_freed_by_refcount() -> None:
    # Its writer task, cancelled while it waited for the client, keeps the cancellation
    # and its traceback, which holds the connection's frames: a cycle while the
    # connection still held the task, freed only by a full garbage collection.
    async def never_sends(message: Any) -> None:
        await asyncio.Event().wait()

    async def close(code: int, reason: str) -> None:
        pass

    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    websocket: Any = SimpleNamespace(scope={}, receive=received.get, close=close)
    connection = connect(websocket, never_sends, max_messages=2)
    gc.collect()
    gc.disable()
    try:
        running = await reading(connection)
        connection.deliver("a")  # no direct writes: queued, a writer starts and waits
        await asyncio.sleep(0)
        assert connection._writer is not None
        for frame in "bcd":
            connection.deliver(frame)  # overflows: closed at once, the writer cancelled
        assert connection.closing
        await asyncio.wait_for(running, 5)
        freed = weakref.ref(connection)
        del connection, running
        assert freed() is None
    finally:
        gc.enable()


async def test_overwhelmed_closes_as_a_slow_consumer(outbox: Outbox) -> None:
    connection = outbox()
    connection.overwhelmed()
    assert connection.closing
    connection.deliver("after")  # ignored: closing


async def test_an_idle_connection_holds_no_writer_and_no_queue(outbox: Outbox) -> None:
    connection = outbox()
    assert connection._writer is None
    assert connection._outbox is None
    connection.deliver("x")
    assert connection._writer is not None  # started for the queued frame


async def test_a_second_stop_does_not_cancel_the_read_loop_again() -> None:
    """The client vanishes (the writer's send fails, the read loop is stopped), then the
    outbox overflows before the loop has noticed: run() must still end normally."""
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def gone(message: Any) -> None:
        raise OSError("client disconnected")  # what uvicorn's ClientDisconnected is

    async def close(code: int, reason: str) -> None:
        pass

    websocket: Any = SimpleNamespace(scope={}, receive=received.get, close=close)
    connection = connect(websocket, gone, max_messages=1)
    running = asyncio.create_task(connection.run())
    await asyncio.sleep(0)  # the read loop waits in receive()
    connection.deliver("x")  # queued (no direct writes): a writer starts
    await asyncio.sleep(0)  # its send fails: the client is gone, reading is stopped
    connection.overwhelmed()  # and a burst overflows the outbox
    await asyncio.wait_for(running, 5)  # returns, no CancelledError
    assert connection.closing


async def reading(connection: Connection) -> asyncio.Task[None]:
    """`connection.run()` in a task, once its read loop is waiting in `receive()`."""
    running = asyncio.create_task(connection.run())
    for _ in range(100):
        if connection._reader is not None:
            return running
        await asyncio.sleep(0)
    raise AssertionError("the read loop did not start")


async def test_frames_are_taken_from_the_read_only_while_nothing_is_under_way() -> None:
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    websocket: Any = SimpleNamespace(scope={}, receive=received.get)
    handler = Handler(hold=("first",))
    connection = connect(websocket, never_called, handler)
    assert not connection.handle_text_now("before the read loop")  # not reading yet
    running = await reading(connection)
    assert connection.handle_text_now("first")
    # Held: the next frame goes uvicorn's way, and the read loop waits for the first.
    assert not connection.handle_text_now("second")
    received.put_nowait({"type": "websocket.receive", "text": "second"})
    for _ in range(10):
        await asyncio.sleep(0)
    assert handler.handled == ["first"]
    handler.finish()

    async def handled() -> bool:
        return handler.handled == ["first", "second"]

    await async_wait_for(handled, what="the queued frame handled after the held one")
    assert connection.handle_text_now("third")
    assert handler.handled == ["first", "second", "third"]
    metrics = connection._metrics
    assert (metrics.received_in_read, metrics.received_queued) == (2, 1)
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)


async def test_a_frame_taken_from_the_read_that_raises_closes_with_1011(
    caplog: pytest.LogCaptureFixture,
) -> None:
    closed: list[tuple[int, str]] = []

    async def close(code: int, reason: str) -> None:
        closed.append((code, reason))

    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    websocket: Any = SimpleNamespace(scope={}, receive=received.get, close=close)
    connection = connect(websocket, never_called, Handler(raises=True))
    running = await reading(connection)
    assert connection.handle_text_now("boom")  # taken, and it failed
    await asyncio.wait_for(running, 5)
    assert closed == [(CloseCode.INTERNAL_ERROR, "internal error")]
    assert "connection task failed" in caplog.text


async def never_called(message: Any) -> None:
    raise AssertionError("nothing is sent here")


async def test_a_message_the_read_loop_holds_is_not_overtaken_from_the_read() -> None:
    # A is taken from inside the read and waits (for Redis); B goes uvicorn's way and the
    # read loop, holding it, waits for A. A's answer and the client's next message C come
    # in the same turn of the loop: C must wait behind B, not be taken from the read.
    received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    websocket: Any = SimpleNamespace(scope={}, receive=received.get)
    handler = Handler(hold=("A",))
    connection = connect(websocket, never_called, handler)
    running = await reading(connection)
    assert connection.handle_text_now("A")
    received.put_nowait({"type": "websocket.receive", "text": "B"})
    for _ in range(10):
        await asyncio.sleep(0)  # the read loop takes B, and waits for A
    handler.finish()
    assert not connection.handle_text_now("C")
    received.put_nowait({"type": "websocket.receive", "text": "C"})

    async def handled() -> bool:
        return handler.handled == ["A", "B", "C"]

    await async_wait_for(handled, what="A, B and C, in their order")
    running.cancel()
    await asyncio.gather(running, return_exceptions=True)
