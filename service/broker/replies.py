"""Reading a redis-py connection's replies: the one module with redis-py's private names.

redis-py makes our two hot connections (the pub/sub reader's and the publish pipe's),
so that TLS, AUTH, the database and the client name mean what the URL says. Their
replies are read by one of two readers with one interface (`Replies`), chosen by
`reply_reader`:

* `ReplyTap`, the fast one: takes the transport's protocol over once the connection is
  made, feeds every read to hiredis and calls back with each reply from inside the
  read. Reading through redis-py's `read_response` costs a task step per read and
  several times more CPU per message (docs/performance.md, "Redis replies handled
  inside the read").
* `ReplyTask`, the public one: a task that reads with redis-py's public
  `read_response` and calls back with each reply from that task. It is used when the
  start-up check fails (one warning says why) or when the fast adapters are off.

The tap relies on these private names, and `tap_problem` checks each once per process
(with the redis-py version): `redis._parsers.base.BaseParser.parse_error` (redis-py's
exceptions for error replies; there is no public equivalent), a connection's
`_reader` (an `asyncio.StreamReader`) and `_writer` (an `asyncio.StreamWriter`), and
the stream reader's `_buffer`.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import logging
import math
import re
from collections.abc import Callable
from typing import Any, Protocol

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import BusyLoadingError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

logger = logging.getLogger(__name__)

#: The redis-py releases the tap was checked against: from the first, below the second.
#: Outside it the tap is not trusted; widen it only after tests/integration/test_reply_tap.py
#: passes on the new release.
TESTED_REDIS = ((8, 2), (8, 3))

OnReply = Callable[[Any], None]
OnEnd = Callable[[BaseException], None]


class Replies(Protocol):
    """Reads one connected redis-py connection: `on_reply(reply)` for each reply, in order.

    An error reply arrives as the exception redis-py raises for it (`NoScriptError`,
    `BusyLoadingError`, ...), as a reply: the connection goes on. If `on_reply` raises,
    that exception ends the connection. When the connection ends, `ended` gets the
    reason (a `RedisError`, or whatever `on_reply` raised) and `on_end` is called with
    it, once, at that moment; the connection is then closed (the tap resets it).
    """

    @property
    def ended(self) -> asyncio.Future[BaseException]:
        """Done once the connection ended, with the reason."""
        ...

    @property
    def last_heard(self) -> float:
        """Loop time of the last read: a watchdog tells a silent connection by it."""
        ...

    def write(self, data: bytes) -> None:
        """Write `data` without waiting (in order with earlier writes).

        Raises if the connection cannot take it; callers treat any exception as the
        end of the connection.
        """
        ...

    def end(self, reason: BaseException) -> None:
        """End the connection with `reason` (the first reason stays) and close it."""
        ...

    async def aclose(self) -> None:
        """End the connection (if not ended yet) and wait until nothing of it runs."""
        ...


def reply_reader(
    conn: AbstractConnection,
    on_reply: OnReply,
    *,
    on_end: OnEnd | None = None,
    fast: bool,
) -> Replies:
    """Read `conn`'s replies: with `ReplyTap` if `fast` and the check passes, else `ReplyTask`.

    Call right after `connect()`, before sending anything. The first call with `fast`
    decides for the process (`tap_problem`); if the check fails, it logs one warning.
    """
    if fast and not tap_problem(conn):
        return ReplyTap(conn, on_reply, on_end=on_end)
    return ReplyTask(conn, on_reply, on_end=on_end)


# What `tap_problem` found: None until the first connection was checked, then "" (the
# tap can be used) or why not.
_verdict: str | None = None


def tap_problem(conn: AbstractConnection) -> str:
    """Why `ReplyTap` cannot be used in this process ("" if it can).

    Checked once, on the first connected connection it is given (the streams exist only
    then), and cached; a failure is logged once, as a warning.
    """
    global _verdict
    if _verdict is None:
        if not conn.is_connected:
            raise RedisConnectionError("the Redis connection is not connected")
        _verdict = _library_problem() or _connection_problem(conn)
        if _verdict:
            logger.warning(
                "Redis replies are read through redis-py's public read_response, which is "
                "slower: redis-py is not as service/broker/replies.py expects (%s)",
                _verdict,
            )
    return _verdict


def _library_problem() -> str:
    """What is wrong with the installed redis-py for the tap, checked without a connection."""
    try:
        version = importlib.metadata.version("redis")
    except importlib.metadata.PackageNotFoundError:
        return "redis-py's version is unknown"
    match = re.match(r"(\d+)\.(\d+)", version)
    low, high = TESTED_REDIS
    if match is None or not low <= (int(match[1]), int(match[2])) < high:
        tested = ".".join(map(str, low)) + " to below " + ".".join(map(str, high))
        return f"redis-py {version} is outside the tested range {tested}"
    parse = _find_parse_error()
    if parse is None:
        return "redis._parsers.base.BaseParser.parse_error is missing"
    # Its classes are what the callers act on: LOADING is retried, NOSCRIPT sends the script.
    expected = {"LOADING x": BusyLoadingError, "NOSCRIPT x": NoScriptError, "ERR x": ResponseError}
    for message, kind in expected.items():
        try:
            made = parse(message)
        except Exception as exc:
            return f"BaseParser.parse_error({message!r}) raised {exc!r}"
        if type(made) is not kind:
            return f"BaseParser.parse_error({message!r}) made {made!r}, not a {kind.__name__}"
    return ""


def _connection_problem(conn: AbstractConnection) -> str:
    """What is wrong with a connected connection's streams for the tap."""
    reader = getattr(conn, "_reader", None)
    writer = getattr(conn, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader):
        return f"the connection's _reader is {type(reader).__name__}, not an asyncio.StreamReader"
    if not isinstance(writer, asyncio.StreamWriter):
        return f"the connection's _writer is {type(writer).__name__}, not an asyncio.StreamWriter"
    if not isinstance(getattr(reader, "_buffer", None), bytearray):
        return "the connection's StreamReader has no _buffer"
    # The tap passes flow control and the end on to this protocol, and swaps it out.
    if not isinstance(writer.transport.get_protocol(), asyncio.StreamReaderProtocol):
        return "the connection's transport is not read by an asyncio.StreamReaderProtocol"
    return ""


def _find_parse_error() -> Callable[[str], RedisError] | None:
    """redis-py's own maker of error-reply exceptions, or None if it moved."""
    try:
        module = importlib.import_module("redis._parsers.base")
    except ImportError:
        return None
    parse = getattr(getattr(module, "BaseParser", None), "parse_error", None)
    return parse if callable(parse) else None


# Looked up once: hiredis calls `reply_error` for each error reply.
_parse_error = _find_parse_error()


def reply_error(message: str) -> RedisError:
    """The redis-py exception for an error reply, as redis-py's own parsers make it.

    hiredis calls this for each error reply the tap reads. The classes matter: `LOADING`
    is a connection error (retried), `NOSCRIPT` makes the pipe send the whole script.
    redis-py has no public equivalent; `tap_problem` checks this one.
    """
    if _parse_error is None:
        raise RuntimeError("redis-py has no BaseParser.parse_error: use ReplyTask")
    return _parse_error(message)


class ReplyTap(asyncio.Protocol):
    """The fast `Replies`: hiredis parses each read, and `on_reply` runs inside the read.

    Writing is unchanged (redis-py's `StreamWriter`'s transport): flow control and the
    end of the connection are passed on to redis-py's stream protocol, so `drain()` and
    `disconnect()` keep working. Refuses a connection that has unread replies.
    """

    #: The transport's own `write`: no Python call of ours per write.
    write: Callable[[bytes], None]

    def __init__(
        self,
        conn: AbstractConnection,
        on_reply: OnReply,
        *,
        on_end: OnEnd | None = None,
    ) -> None:
        reader, writer = conn._reader, conn._writer
        if reader is None or writer is None:
            raise RedisConnectionError("the Redis connection is not connected")
        if getattr(reader, "_buffer", b""):
            raise RedisConnectionError("the Redis connection has unread replies")
        self._loop = asyncio.get_running_loop()
        self._on_reply = on_reply
        self._on_end = on_end
        self._parser = hiredis.Reader(replyError=reply_error)
        self.transport = writer.transport
        self.write = self.transport.write
        self._stream = self.transport.get_protocol()
        self.last_heard = self._loop.time()
        self.ended: asyncio.Future[BaseException] = self._loop.create_future()
        self.transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        """Parse what arrived; hand on every whole reply."""
        self.last_heard = self._loop.time()
        parser, on_reply = self._parser, self._on_reply
        try:
            parser.feed(data)
            while (reply := parser.gets()) is not False:
                on_reply(reply)
        except Exception as exc:  # a protocol error, or on_reply refused a reply
            self.end(exc)

    def eof_received(self) -> bool:
        """Redis closed its side: the connection is over (the transport closes it)."""
        self.end(RedisConnectionError("Redis closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: end, and let redis-py's stream protocol know too."""
        if exc is None:
            self._finish(RedisConnectionError("the connection was closed"))
        else:
            self._finish(RedisConnectionError(f"Redis connection lost: {exc!r}"))
        self._stream.connection_lost(exc)

    def pause_writing(self) -> None:
        """Passed on: redis-py's `drain()` waits on its own stream protocol."""
        self._stream.pause_writing()

    def resume_writing(self) -> None:
        """Passed on, like `pause_writing`."""
        self._stream.resume_writing()

    def end(self, reason: BaseException) -> None:
        """End the connection with `reason` (the first reason stays); reset it."""
        self._finish(reason)
        # A reset, not a graceful close: nothing still buffered may reach Redis later.
        self.transport.abort()

    async def aclose(self) -> None:
        """End the connection if it has not ended; nothing of the tap runs on its own."""
        if not self.ended.done():
            self.end(RedisConnectionError("the connection was closed"))

    def _finish(self, reason: BaseException) -> None:
        if self.ended.done():
            return
        self.ended.set_result(reason)
        if self._on_end is not None:
            self._on_end(reason)


class ReplyTask:
    """The public `Replies`: a task reads with redis-py's `read_response`; `on_reply` runs in it.

    redis-py raises an error reply instead of returning it; one is told from a failed
    read by being a `ResponseError` or having a `status_code` (redis-py gives every
    exception it makes of an error reply one), and is handed on like the tap does (so
    `LOADING`, a connection error, is a reply here too). Writes go out in order through
    `send_packed_command`, from a task started when a write finds none running. The end
    closes the connection rather than resetting it (there is no public reset), so bytes
    still buffered may yet reach Redis. Replies already buffered are read, not refused.
    """

    def __init__(
        self,
        conn: AbstractConnection,
        on_reply: OnReply,
        *,
        on_end: OnEnd | None = None,
    ) -> None:
        if not conn.is_connected:
            raise RedisConnectionError("the Redis connection is not connected")
        self._conn = conn
        self._on_reply = on_reply
        self._on_end = on_end
        self._loop = asyncio.get_running_loop()
        self.last_heard = self._loop.time()
        self.ended: asyncio.Future[BaseException] = self._loop.create_future()
        self._out: list[bytes] = []
        self._writer: asyncio.Task[None] | None = None
        self._reader = self._loop.create_task(self._read(), name="redis-replies")

    def write(self, data: bytes) -> None:
        """Queue `data` for the writer task (started if none runs)."""
        if self.ended.done():
            raise RedisConnectionError("the Redis connection has ended")
        self._out.append(data)
        if self._writer is None:
            self._writer = self._loop.create_task(self._flush(), name="redis-writes")

    def end(self, reason: BaseException) -> None:
        """End the connection with `reason` (the first reason stays); the reader closes it."""
        self._finish(reason)
        current = asyncio.current_task()
        for task in (self._reader, self._writer):
            if task is not None and task is not current:
                task.cancel()

    async def aclose(self) -> None:
        """End the connection (if not ended) and wait for the reader and writer tasks."""
        self.end(RedisConnectionError("the connection was closed"))
        current = asyncio.current_task()
        tasks = [t for t in (self._reader, self._writer) if t is not None and t is not current]
        if tasks:
            await asyncio.wait(tasks)
        # Also when the reader was cancelled before it ran (and so did not close it).
        await self._conn.disconnect(nowait=True)

    async def _read(self) -> None:
        conn, on_reply, loop = self._conn, self._on_reply, self._loop
        try:
            while not self.ended.done():
                try:
                    # No timeout (math.inf): a quiet pub/sub connection is the watchdog's
                    # to judge. disconnect_on_error=False: an error reply is not the end.
                    reply = await conn.read_response(
                        disable_decoding=True, timeout=math.inf, disconnect_on_error=False
                    )
                except RedisError as exc:
                    if not isinstance(exc, ResponseError) and exc.status_code is None:
                        raise  # the read failed: it is not a reply
                    reply = exc
                self.last_heard = loop.time()
                on_reply(reply)
        except asyncio.CancelledError:
            self._finish(RedisConnectionError("the connection was closed"))
            raise
        except Exception as exc:  # the connection failed, or on_reply refused a reply
            self._finish(exc)
        finally:
            await conn.disconnect(nowait=True)

    async def _flush(self) -> None:
        conn = self._conn
        try:
            while self._out and not self.ended.done():
                if not conn.is_connected:  # closed under us: sending would reconnect it
                    raise RedisConnectionError("the Redis connection was closed")
                out, self._out = self._out, []
                await conn.send_packed_command(out, check_health=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not isinstance(exc, RedisError):
                exc = RedisConnectionError(f"Redis connection unusable: {exc!r}")
            self.end(exc)
        finally:
            self._writer = None

    def _finish(self, reason: BaseException) -> None:
        if self.ended.done():
            return
        self.ended.set_result(reason)
        if self._on_end is not None:
            self._on_end(reason)
