"""One WebSocket connection: its state, its outbox and writer, and its read loop.

The read loop runs in the endpoint's own task for the connection's whole life: uvicorn
reads the socket only while the app asks for messages, so without it pings would go
unanswered and a vanished client unnoticed.

Each message the client sends goes to the handler (the session) once, by one call,
`handle_text`: from the read loop, or from inside uvicorn's read when the transport
offers it (`handle_text_now`) while the read loop waits with nothing in hand and no
command is under way. A command that must wait returns what to wait for; until it is
done the next message waits in uvicorn's queue, so commands run one at a time, in order.

`deliver` never waits. A frame goes to the transport at once when no writer is busy and
the socket takes it without waiting; otherwise into the outbox, which a writer task,
made for the occasion and gone once the outbox is empty, sends when the client reads
again. A full outbox closes the connection with 1013.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from collections.abc import Awaitable, Sequence
from typing import Protocol

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from service.metrics import Metrics
from service.outbox import Outbox, OutboxLimits
from service.protocol.codes import CloseCode
from service.transport import Transport

logger = logging.getLogger(__name__)


class State(enum.Enum):
    """Where a connection is in its life; it only ever moves down this list."""

    #: Reading commands and delivering frames.
    OPEN = "open"
    #: A close has begun: the queued frames go out, nothing new is taken or queued.
    CLOSING = "closing"
    #: Flushed (or given up on): the read loop ends, then the close frame is sent.
    CLOSED = "closed"
    #: The client left or the socket broke: nothing more is sent.
    GONE = "gone"


class Handler(Protocol):
    """What a connection hands the client's messages to: the session."""

    def handle_text(self, text: str) -> Awaitable[None] | None:
        """Act on a text message; return what to wait for before the next one, if any."""

    def handle_bytes(self, data: bytes) -> Awaitable[None] | None:
        """Act on a binary message, as `handle_text`."""

    def release(self) -> None:
        """Let go of everything shared; called once the close begins, and again at the end."""


class Connection:
    """A WebSocket connection's life, outbox, writer and read loop."""

    __slots__ = (
        "__weakref__",
        "_close",
        "_close_timeout",
        "_handler",
        "_limits",
        "_metrics",
        "_outbox",
        "_reader",
        "_receiving",
        "_state",
        "_stop_cancelled",
        "_transport",
        "_work",
        "_writer",
        "_ws",
    )

    def __init__(
        self,
        websocket: WebSocket,
        transport: Transport,
        handler: Handler,
        *,
        limits: OutboxLimits,
        close_timeout: float,
        metrics: Metrics,
    ) -> None:
        self._ws = websocket
        self._transport = transport
        self._handler: Handler | None = handler
        self._limits = limits
        # A closing connection's last frames and the close frame wait this long for a
        # client that reads slowly, then the socket is dropped: a client that never
        # reads would otherwise hold it for ever.
        self._close_timeout = close_timeout
        self._metrics = metrics
        self._state = State.OPEN
        self._close: tuple[CloseCode, str] | None = None
        # Made when a frame has to wait, dropped once drained: idle connections hold none.
        self._outbox: Outbox | None = None
        self._writer: asyncio.Task[None] | None = None
        # The task running the read loop, while it runs; whether we cancelled it.
        self._reader: asyncio.Task[None] | None = None
        # True while the read loop waits in receive() with nothing in hand: only then may
        # a message be taken from inside the read (one it holds must go first).
        self._receiving = False
        self._stop_cancelled = False
        # The command under way, if one had to wait: the next message waits for it.
        self._work: asyncio.Future[None] | None = None

    @property
    def state(self) -> State:
        """Where the connection is in its life."""
        return self._state

    @property
    def closing(self) -> bool:
        """True once the connection is being closed (or the client left)."""
        return self._state is not State.OPEN

    # -- out ------------------------------------------------------------------------

    def deliver(self, frame: str) -> None:
        """Send or queue `frame` without waiting; a full outbox closes with 1013."""
        if self._state is not State.OPEN:
            return
        if self._writer is None and self._transport.write_now(frame):
            self._metrics.frames_direct += 1
            return
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = Outbox(self._limits)
        if not outbox.put(frame):
            self.overwhelmed()
            return
        self._start_writer()

    def deliver_backlog(self, frames: Sequence[str]) -> None:
        """Queue frames a resumed subscription missed, even past the outbox limits.

        Bounded by history (and the hub's catch-up buffer): a client that asked to
        resume would otherwise be closed as a slow consumer, resume again, and never
        catch up. One backlog at a time (`Outbox.put_backlog`).
        """
        if self._state is not State.OPEN or not frames:
            return
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = Outbox(self._limits)
        if not outbox.put_backlog(frames):
            self.overwhelmed()
            return
        self._start_writer()

    def overwhelmed(self) -> None:
        """Close as a slow consumer: more frames came than the client may queue."""
        self._metrics.slow_consumers.inc()
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer: outbox full", flush=False)

    def close(self, code: CloseCode, reason: str, *, flush: bool = True) -> None:
        """Close with `code` after the queued frames (or at once, dropping them)."""
        if self._state is not State.OPEN:
            return
        self._close = (code, reason)
        self._transport.drop_within(self._close_timeout)
        if not flush:
            self._outbox = None
            if self._writer is not None:
                # It may be parked on a paused transport; nobody waits for this client.
                self._writer.cancel()
            self._end(State.CLOSED)
        elif self._writer is None:
            self._end(State.CLOSED)  # nothing to flush
        else:
            self._state = State.CLOSING  # the writer ends it once flushed
        if self._handler is not None:
            self._handler.release()

    def _end(self, state: State) -> None:
        """Move to CLOSED or GONE and end the read loop."""
        if self._state is not State.GONE:
            self._state = state
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task() and not self._stop_cancelled:
            # It waits in receive() (or for a command): wake it. Once only, or a second
            # cancellation would look like uvicorn's and escape run(). From inside the
            # loop's own task the state is enough: it is checked before the next receive.
            self._stop_cancelled = True
            reader.cancel()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            while outbox := self._outbox:
                self._metrics.frames_queued += await self._transport.send_from(outbox)
                if self._outbox is outbox and not outbox:
                    self._outbox = None
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            # OSError: uvicorn's ClientDisconnected, from its own send.
            self._end(State.GONE)
        except RuntimeError as exc:
            # uvicorn closed the connection itself (a frame over the size limit: 1009)
            # before the reader saw it, and refuses later sends with a RuntimeError
            # ("Unexpected ASGI message 'websocket.send', after sending 'websocket.close'").
            if "websocket.close" not in str(exc):
                self._end(State.CLOSED)
                raise  # logged by run(), which closes with 1011
            self._end(State.GONE)
        except Exception:
            self._end(State.CLOSED)
            raise
        else:
            if self._state is State.OPEN:
                self._writer = None  # idle again: the next queued frame starts another
                return
            self._end(State.CLOSED)  # closing and flushed: the read loop ends too

    # -- in -------------------------------------------------------------------------

    def handle_text_now(self, text: str) -> bool:
        """Take a text message from inside uvicorn's read, unless something is under way.

        False leaves it to uvicorn's queue and the read loop, behind the command under
        way, so that messages are handled in order.
        """
        if not self._receiving or self._state is not State.OPEN:
            return False
        work = self._work
        if work is not None:
            if not work.done():
                return False
            # Finished within this turn of the loop (a publish answered from inside the
            # Redis read): its outcome is `_work_done`'s, which runs soon.
            self._work = None
        self._metrics.received_in_read += 1
        self._take(text)
        return True

    def _take(self, message: str | bytes) -> None:
        """Hand one message to the handler; wait for what it returns before the next."""
        handler = self._handler
        if handler is None:
            return
        try:
            if isinstance(message, str):
                work = handler.handle_text(message)
            else:
                work = handler.handle_bytes(message)
        except Exception:
            logger.exception("connection task failed")
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return
        if work is not None:
            self._work = future = asyncio.ensure_future(work)
            future.add_done_callback(self._work_done)

    async def _finish_work(self) -> None:
        """Wait for the command under way, if any (its outcome: `_work_done`)."""
        if (work := self._work) is not None:
            with contextlib.suppress(Exception):
                await work
            if self._work is work:
                self._work = None

    def _work_done(self, future: asyncio.Future[None]) -> None:
        if self._work is future:
            self._work = None
        if not future.cancelled() and (exc := future.exception()) is not None:
            logger.error("connection task failed", exc_info=exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def run(self) -> None:
        """Serve the connection until the client leaves or it is closed."""
        self._metrics.connections.inc()
        try:
            task = asyncio.current_task()
            assert task is not None
            self._reader = task
            self._transport.set_reader(self)
            try:
                while self._state in (State.OPEN, State.CLOSING):
                    self._receiving = True
                    try:
                        message = await self._ws.receive()
                    finally:
                        self._receiving = False
                    if message["type"] == "websocket.disconnect":
                        self._end(State.GONE)
                        break
                    # A command taken from inside the read before this message goes first.
                    await self._finish_work()
                    if self._state is not State.OPEN:
                        continue  # closing: read only to notice the client leave
                    self._metrics.received_queued += 1
                    text = message.get("text")
                    self._take(text if text is not None else message.get("bytes") or b"")
                    await self._finish_work()
            except asyncio.CancelledError:
                if not self._stop_cancelled or task.cancelling() > 1:
                    raise  # not (only) ours: uvicorn's, or the server shutting down
                task.uncancel()  # our own stop: the connection is closing
            finally:
                self._reader = None
                self._transport.set_reader(None)  # and no cycle left between the two
        except Exception:
            logger.exception("connection task failed")
            self._close = self._close or (CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            # Let go of the tasks once they are done: an exception's traceback would hold
            # this connection's frames, a cycle only the garbage collector would break.
            # Before anything awaits: a second cancellation (shutdown) must not skip it.
            # CLOSED first, so that a command still under way sees the connection closing.
            if self._state is not State.GONE:
                self._state = State.CLOSED
            self._metrics.connections.dec()
            handler, self._handler = self._handler, None  # it holds us: no cycle outlives run
            if handler is not None:
                handler.release()
            tasks = [t for t in (self._writer, self._work) if t is not None]
            self._writer = self._work = None
            for result in await _cancel(*tasks):
                if isinstance(result, Exception):
                    logger.error("connection task failed", exc_info=result)
                    self._close = self._close or (CloseCode.INTERNAL_ERROR, "internal error")
        # However it ended (a close of ours, the client's, uvicorn's on shutdown or on a
        # protocol error), what is left of the connection goes within the deadline.
        self._transport.drop_within(self._close_timeout)
        if self._close is not None and self._state is not State.GONE:
            code, reason = self._close
            # If the client is gone or not reading, give up: the socket is dropped.
            with contextlib.suppress(TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
                async with asyncio.timeout(self._close_timeout):
                    await self._ws.close(code, reason)


async def _cancel(*tasks: asyncio.Future[None]) -> list[BaseException | None]:
    """Cancel `tasks` and return their outcomes.

    Cancels again until each is done: on Python 3.11 an `asyncio.wait_for` inside a task
    (redis-py uses them) can swallow a cancellation that lands as its inner call finishes.
    """
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
    return [None if t.cancelled() else t.exception() for t in tasks]
