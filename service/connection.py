"""One WebSocket connection: a read loop, a bounded outbox, and a writer when needed.

The read loop runs in the endpoint's own task for the connection's whole life. It is
what keeps uvicorn's websockets-sansio implementation reading the socket (it stops
after each message until the app calls `receive()`), so pings get answered and a
vanished client is noticed at once (PITFALLS.md).

`deliver` never waits. It writes a frame to the socket at once when nothing is queued
before it and the socket takes it without waiting (service/wire.py): most deliveries
cost no queue and no task switch. Otherwise the frame goes into the outbox, and a
writer task, started for the occasion and gone once the outbox is empty, sends what
has queued up in one write as soon as the client reads again. A full outbox closes
the connection with 1013. An idle connection holds no task but the endpoint's, and no
queue: memory per connection is what bounds a worker (docs/performance.md).

The other way, a session may take a message from inside uvicorn's read
(`handle_text_now`, service/wire.py) when it can act on it at once and nothing else is
under way: a publish is sent to Redis and answered from inside the read of Redis's
reply. Until it is answered, later messages wait in uvicorn's queue, and the read loop
takes them in order once it is: one command at a time, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketDisconnected

from service.metrics import Metrics
from service.protocol.codes import CloseCode
from service.wire import DirectWriter, Send, forget_handshake, reading_protocol, wire_frames

logger = logging.getLogger(__name__)


class Connection:
    """Transport half of a session: outbox, writer, read loop and closing."""

    def __init__(
        self,
        websocket: WebSocket,
        *,
        max_messages: int,
        max_chars: int,
        close_timeout: float,
        metrics: Metrics,
    ) -> None:
        self._ws = websocket
        # How long a closing connection may take, from the moment the close starts: its
        # last frames and the close frame wait that long for a client that reads slowly
        # (so that one that reads again learns why it was cut off), then the socket is
        # dropped. Without it, a client that never reads would hold it for ever.
        self._close_timeout = close_timeout
        self._max_messages = max_messages
        self._max_chars = max_chars
        self._metrics = metrics
        # Made when a frame has to wait, dropped once drained (an empty deque is 600 bytes).
        self._outbox: deque[str] | None = None
        self._outbox_chars = 0
        # Room granted above the limits to one resume's backlog, until the outbox drains
        # (0 and 0: no grant outstanding).
        self._extra_messages = 0
        self._extra_chars = 0
        self._closing: tuple[CloseCode, str] | None = None
        self._client_gone = False
        self._writer: asyncio.Task[None] | None = None
        # The ASGI `send` the endpoint got: uvicorn's own (service/api/ws.py).
        self._send: Send = websocket._send
        self._direct = DirectWriter.attach(self._send)
        forget_handshake(self._send)
        # True while the writer holds a frame it took from the outbox but has not yet
        # handed to the socket: nothing may be written directly before it.
        self._sending = False
        # The task running the read loop while it runs, and whether the loop must end
        # (the connection is closing: see `_stop_reading`).
        self._reader: asyncio.Task[None] | None = None
        self._stop = False
        self._stop_cancelled = False
        # The protocol that offers us messages from inside its read, if uvicorn runs ours.
        self._reading = reading_protocol(self._send)
        # True while the read loop handles a message, and while a command taken from the
        # read is unfinished (`_hold`); the loop's wait for the latter, made when needed.
        self._busy = False
        self._held = False
        self._held_done: asyncio.Future[None] | None = None

    @property
    def closing(self) -> bool:
        """True once the connection is being closed (or the client left)."""
        return self._closing is not None or self._client_gone

    def deliver(self, frame: str) -> None:
        """Send or queue `frame` without waiting; a full outbox closes with 1013."""
        if self._closing is not None:
            return
        direct = self._direct
        if (
            direct is not None
            and not self._outbox
            and not self._sending
            and direct.write_now(frame)
        ):
            # Nothing queued before it and the socket took it: no queue, no task.
            self._metrics.frames_direct += 1
            return
        size = len(frame)
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        if (
            len(outbox) >= self._max_messages + self._extra_messages
            or self._outbox_chars + size > self._max_chars + self._extra_chars
        ):
            self.overwhelmed()
            return
        outbox.append(frame)
        self._outbox_chars += size
        self._start_writer()

    def deliver_backlog(self, frames: Sequence[str]) -> None:
        """Queue frames a resumed subscription missed, even past the outbox limits.

        The limits grow by the backlog until the outbox has drained, so that the frames
        queued behind it are not what closes the client. One backlog at a time: while a
        grant is outstanding, another backlog must fit in the limits as they stand, or
        the client is closed as a slow consumer. Otherwise a client that resumes again
        and again without reading would queue without bound.
        """
        if self._closing is not None or not frames:
            return
        chars = sum(map(len, frames))
        outbox = self._outbox
        if outbox is None:
            outbox = self._outbox = deque()
        if not (self._extra_messages or self._extra_chars):
            self._extra_messages, self._extra_chars = len(frames), chars
        elif (
            len(outbox) + len(frames) > self._max_messages + self._extra_messages
            or self._outbox_chars + chars > self._max_chars + self._extra_chars
        ):
            self.overwhelmed()
            return
        outbox.extend(frames)
        self._outbox_chars += chars
        self._start_writer()

    def overwhelmed(self) -> None:
        """Close as a slow consumer: more frames came than the client may queue."""
        self._metrics.slow_consumers.inc()
        self.close(CloseCode.TRY_AGAIN_LATER, "slow consumer: outbox full", flush=False)

    def close(self, code: CloseCode, reason: str, *, flush: bool = True) -> None:
        """Close with `code` after the queued frames (or at once, dropping them)."""
        if self._closing is not None:
            return
        self._closing = (code, reason)
        self._drop_within(self._close_timeout)
        if not flush:
            self._outbox = None
            self._outbox_chars = 0
            if self._writer is not None:
                # It may be parked on a paused transport; nobody waits for this client.
                self._writer.cancel()
            self._stop_reading()
        elif self._writer is None:
            self._stop_reading()  # nothing to flush
        # Otherwise the writer stops the reading once it has sent what was queued.
        self.release()

    def release(self) -> None:
        """Let go of everything shared (channel memberships); called once closing starts."""

    async def handle_text(self, text: str) -> None:
        """Handle one text frame from the client."""

    def handle_text_now(self, text: str) -> bool:
        """Handle one text frame from inside uvicorn's read, if it can be; else False.

        Only while nothing else is under way (the read loop's command, one taken from the
        read before, a close): anything else would overtake it. False leaves the frame
        to uvicorn's queue and `handle_text`, in order.
        """
        if (
            self._reader is None
            or self._busy
            or self._held
            or self._closing is not None
            or self._stop
        ):
            return False
        try:
            taken = self._handle_now(text)
        except Exception:
            # As when a command raises in the read loop: logged, closed with 1011.
            logger.exception("connection task failed")
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            return True
        if taken:
            self._metrics.received_in_read += 1
        return taken

    def _handle_now(self, text: str) -> bool:
        """What a session handles without waiting; False leaves `text` to `handle_text`."""
        return False

    def _hold(self) -> None:
        """A command taken from the read goes on after it returned: the read loop waits."""
        self._held = True

    def _release_hold(self) -> None:
        """That command is finished: the read loop may take the next message."""
        self._held = False
        waiter, self._held_done = self._held_done, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def handle_bytes(self, data: bytes) -> None:
        """Handle one binary frame from the client."""

    async def run(self) -> None:
        """Serve the connection until the client leaves or it is closed."""
        self._metrics.connections.inc()
        try:
            # The read loop, here rather than in a method of its own: every frame that
            # waits as long as the connection lives costs each idle connection memory.
            task = asyncio.current_task()
            assert task is not None
            self._reader = task
            if self._reading is not None:
                self._reading.reader = self
            try:
                while not self._stop:
                    message = await self._ws.receive()
                    if message["type"] == "websocket.disconnect":
                        self._client_gone = True
                        break
                    self._metrics.received_queued += 1
                    self._busy = True
                    if self._held:
                        # The command taken from the read before this message goes first.
                        self._held_done = asyncio.get_running_loop().create_future()
                        await self._held_done
                    text = message.get("text")
                    if text is not None:
                        await self.handle_text(text)
                    else:
                        await self.handle_bytes(message.get("bytes") or b"")
                    self._busy = False
            except asyncio.CancelledError:
                if not self._stop_cancelled or task.cancelling() > 1:
                    raise  # not (only) ours: uvicorn's, or the server shutting down
                task.uncancel()  # our own stop: the connection is closing
            finally:
                self._reader = None
                if self._reading is not None:
                    self._reading.reader = None  # and no cycle left between the two
        except Exception:
            logger.exception("connection task failed")
            self._closing = self._closing or (CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            # Let go of the task once it is done: its exception's traceback holds this
            # connection's frames, a cycle only the garbage collector would break.
            writer, self._writer = self._writer, None
            if writer is not None:
                [result] = await _cancel(writer)
                if isinstance(result, Exception):
                    logger.error("connection task failed", exc_info=result)
                    self._closing = self._closing or (CloseCode.INTERNAL_ERROR, "internal error")
            self._metrics.connections.dec()
            self.release()
        # However it ended (a close of ours, the client's, uvicorn's on shutdown or on a
        # protocol error), what is left of the connection goes within the deadline.
        self._drop_within(self._close_timeout)
        if self._closing is not None and not self._client_gone:
            code, reason = self._closing
            # If the client is gone or not reading, give up: the socket is dropped.
            with contextlib.suppress(TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
                async with asyncio.timeout(self._close_timeout):
                    await self._ws.close(code, reason)

    def _drop_within(self, delay: float) -> None:
        """Drop the socket unless the connection is gone within `delay` seconds.

        uvicorn closes a socket only once its buffered frames are sent, which a client
        that never reads never lets happen. Only uvicorn's protocol as `ReadingProtocol`
        can drop it: with any other, the connection lasts as long as uvicorn keeps it.
        """
        if self._reading is not None:
            self._reading.drop_within(delay)

    def _stop_reading(self) -> None:
        """End the read loop: the connection is closing (sent, or given up on)."""
        if self._stop:
            # Once only: a second cancellation (the client vanished, then the outbox
            # overflowed) would look like uvicorn's and escape run().
            return
        self._stop = True
        reader = self._reader
        if reader is not None and reader is not asyncio.current_task():
            # It waits in receive() (or in a command): wake it. From inside the loop's
            # own task the flag is enough, it is checked before the next receive.
            self._stop_cancelled = True
            reader.cancel()

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_loop())

    async def _write_loop(self) -> None:
        try:
            await self._drain()
        except (WebSocketDisconnect, WebSocketDisconnected, OSError):
            # OSError: uvicorn's ClientDisconnected, from its own send.
            self._client_gone = True
        except RuntimeError as exc:
            # uvicorn closed the connection itself (a frame over the size limit: 1009)
            # before the reader saw it, and refuses later sends with a RuntimeError
            # ("Unexpected ASGI message 'websocket.send', after sending 'websocket.close'").
            if "websocket.close" not in str(exc):
                self._stop_reading()
                raise  # logged by run(), which closes with 1011
            self._client_gone = True
        except Exception:
            self._stop_reading()
            raise
        else:
            if self._closing is None:
                self._writer = None  # idle again: the next queued frame starts another
                return
        # Closing and flushed, or the client is gone: the read loop ends too.
        self._stop_reading()

    async def _drain(self) -> None:
        direct = self._direct
        while outbox := self._outbox:
            if direct is not None and direct.writable():
                # Everything queued, in one write.
                data = b"".join(map(wire_frames, outbox))
                self._metrics.frames_queued += len(outbox)
                self._outbox = None
                self._outbox_chars = 0
                direct.write(data)
            elif direct is not None and direct.paused():
                # Frames stay queued (and counted) until the client reads again.
                await direct.wait_writable()
            else:
                await self._send_one(outbox)
        self._extra_messages = self._extra_chars = 0  # drained: back to the limits

    async def _send_one(self, outbox: deque[str]) -> None:
        """Send the outbox's first frame through ASGI (the path without direct writes)."""
        frame = outbox.popleft()
        self._outbox_chars -= len(frame)
        if not outbox:
            self._outbox = None
        self._sending = True
        try:
            await self._send({"type": "websocket.send", "text": frame})
        finally:
            self._sending = False
        self._metrics.frames_queued += 1


async def _cancel(*tasks: asyncio.Task[None]) -> list[BaseException | None]:
    """Cancel `tasks` and return their outcomes.

    Cancels again until each is done: on Python 3.11 an `asyncio.wait_for` inside a task
    (redis-py uses them) can swallow a cancellation that lands as its inner call finishes.
    """
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        await asyncio.wait(pending, timeout=1.0)
    return [None if t.cancelled() else t.exception() for t in tasks]
