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
from service.protocol.codes import CloseCode
from tests.helpers import async_wait_for

Outbox = Callable[..., Connection]


@pytest.fixture
async def outbox() -> AsyncIterator[Outbox]:
    """Connections whose socket never takes a frame: everything stays queued."""
    made: list[Connection] = []

    async def never_sends(message: Any) -> None:
        await asyncio.Event().wait()

    def make(max_messages: int = 10, max_chars: int = 100) -> Connection:
        # Without uvicorn's own send there are no direct writes: frames queue, and the
        # writer started for them waits on `never_sends` for ever.
        websocket: Any = SimpleNamespace(scope={}, _send=never_sends)
        connection = Connection(
            websocket,
            max_messages=max_messages,
            max_chars=max_chars,
            close_timeout=1,
            metrics=Metrics(),
        )
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
    websocket: Any = SimpleNamespace(scope={}, _send=never_sends, receive=received.get, close=close)
    connection = Connection(
        websocket, max_messages=2, max_chars=1000, close_timeout=1, metrics=Metrics()
    )
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

    websocket: Any = SimpleNamespace(scope={}, _send=gone, receive=received.get, close=close)
    connection = Connection(
        websocket, max_messages=1, max_chars=1000, close_timeout=1, metrics=Metrics()
    )
    running = asyncio.create_task(connection.run())
    await asyncio.sleep(0)  # the read loop waits in receive()
    connection.deliver("x")  # queued (no direct writes): a writer starts
    await asyncio.sleep(0)  # its send fails: the client is gone, reading is stopped
    connection.overwhelmed()  # and a burst overflows the outbox
    await asyncio.wait_for(running, 5)  # returns, no CancelledError
    assert connection.closing


class Taking(Connection):
    """Takes every text frame from the read and holds it until `finish`; or raises."""

    def __init__(self, websocket: Any, *, raises: bool = False) -> None:
        super().__init__(
            websocket, max_messages=10, max_chars=1000, close_timeout=1, metrics=Metrics()
        )
        self.raises = raises
        self.taken: list[str] = []
        self.handled: list[str] = []

    def _handle_now(self, text: str) -> bool:
        if self.raises:
            raise RuntimeError("a bug in a command")
        self.taken.append(text)
        self._hold()
        return True

    def finish(self) -> None:
        self._release_hold()

    async def handle_text(self, text: str) -> None:
        self.handled.append(text)


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
    websocket: Any = SimpleNamespace(scope={}, _send=None, receive=received.get)
    connection = Taking(websocket)
    assert not connection.handle_text_now("before the read loop")  # not reading yet
    running = await reading(connection)
    assert connection.handle_text_now("first")
    # Held: the next frame goes uvicorn's way, and the read loop waits for the first.
    assert not connection.handle_text_now("second")
    received.put_nowait({"type": "websocket.receive", "text": "second"})
    for _ in range(10):
        await asyncio.sleep(0)
    assert connection.handled == []
    connection.finish()

    async def handled() -> bool:
        return connection.handled == ["second"]

    await async_wait_for(handled, what="the queued frame handled after the held one")
    assert connection.handle_text_now("third")
    assert connection.taken == ["first", "third"]
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
    websocket: Any = SimpleNamespace(scope={}, _send=None, receive=received.get, close=close)
    connection = Taking(websocket, raises=True)
    running = await reading(connection)
    assert connection.handle_text_now("boom")  # taken, and it failed
    await asyncio.wait_for(running, 5)
    assert closed == [(CloseCode.INTERNAL_ERROR, "internal error")]
    assert "connection task failed" in caplog.text
