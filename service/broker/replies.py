"""Reading a redis-py connection ourselves: each reply parsed in C and handed on at once.

redis-py makes our two hot connections (the pub/sub reader's and the publish pipe's),
so that TLS, AUTH, the database and the client name mean what the URL says. Reading
them through the asyncio `StreamReader` redis-py leaves behind costs a task step per
read and the stream's own bookkeeping; `ReplyTap` instead takes the transport's
protocol over once the connection is made, feeds every read to hiredis and calls back
with each reply from inside the read. Writing is unchanged (redis-py's `StreamWriter`):
flow control and the end of the connection are passed on to redis-py's stream
protocol, so `drain()` and `disconnect()` keep working.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError


def reply_error(message: str) -> RedisError:
    """The redis-py exception for an error reply, as redis-py's own parsers make it.

    hiredis calls this for each error reply. The classes matter: `LOADING` is a
    connection error (retried), `NOSCRIPT` makes the pipe send the whole script.
    """
    error: RedisError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


class ReplyTap(asyncio.Protocol):
    """Reads a connected redis-py connection: `on_reply(reply)` for each reply, in order.

    An error reply arrives as its redis-py exception (`reply_error`). If `on_reply`
    raises, the connection is reset and that exception ends it. When the connection
    ends, `ended` gets the reason (a `RedisError`, or whatever `on_reply` raised) and
    `on_end` is called with it, once, at that moment.

    Attach right after `connect()`, before sending anything: redis-py has then read
    every reply of its handshake, so nothing is left unread behind the tap.
    """

    def __init__(
        self,
        conn: AbstractConnection,
        on_reply: Callable[[Any], None],
        *,
        on_end: Callable[[BaseException], None] | None = None,
    ) -> None:
        # Private attributes of redis-py's asyncio connection (pinned to 8.2 in
        # pyproject.toml for this reason); a connection without them is not connected.
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
        self._stream = self.transport.get_protocol()
        #: Loop time of the last read: a watchdog tells a silent connection by it.
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

    def _finish(self, reason: BaseException) -> None:
        if self.ended.done():
            return
        self.ended.set_result(reason)
        if self._on_end is not None:
            self._on_end(reason)
