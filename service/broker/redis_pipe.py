"""A dedicated Redis connection for the publish script: commands pipelined, replies in C.

Every publish is one script call. Through redis-py's command path (pool checkout, the
retry wrapper, a timeout per read, a parser that awaits each line of the reply) one call
costs this process about 200 µs more CPU than it needs on the benchmark's machine kind
(docs/performance.md). Here a call packs its command, writes it behind those already in
flight and waits for its reply; one reader task feeds whatever arrives to hiredis and
hands the replies out in order. redis-py still makes the connection (TLS, AUTH,
database, client name), so the URL means the same as elsewhere.

What the pooled path promised still holds:

* Connection errors are retried, with redis-py's `Retry` (safe because the publish
  script is idempotent: its token). Nothing is retried once the call's deadline
  (`timeout` after it was made) has passed, so a call gives up within about twice
  `timeout`: a last attempt may wait up to `timeout` for its reply.
* A call that gets no reply within `timeout` of being written fails, and the
  connection is dropped (reset, so that nothing still buffered on it reaches Redis
  later), as redis-py drops one that timed out. The other calls on it are retried.
* Concurrent calls share one connection attempt: while Redis does not answer, they all
  fail after one connect timeout, not one after another.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any

import hiredis
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

#: Bytes asked of a Redis socket per read (here and by the pub/sub reader): whatever
#: has arrived, several replies or messages at once when they come in bursts.
READ_SIZE = 1 << 16


class PipeClosed(RedisError):
    """The pipe was closed (the worker is shutting down): not retried."""


def reply_error(message: str) -> RedisError:
    """The redis-py exception for an error reply, as redis-py's own parsers make it.

    hiredis calls this for each error reply. The classes matter: `LOADING` is a
    connection error (retried), `NOSCRIPT` makes the pipe send the whole script.
    """
    error: RedisError = BaseParser.parse_error(message)  # type: ignore[no-untyped-call]
    return error


def streams(conn: AbstractConnection) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The asyncio streams of a connected redis-py connection.

    They are private attributes of redis-py's asyncio connection (pinned to 8.1 in
    pyproject.toml for this reason); a connection without them is not connected.
    """
    reader, writer = conn._reader, conn._writer
    if reader is None or writer is None:
        raise RedisConnectionError("the Redis connection is not connected")
    return reader, writer


class _Link:
    """One connection: calls in flight, in the order they were written."""

    def __init__(self, conn: AbstractConnection, timeout: float) -> None:
        self.conn = conn
        self._reader, self._writer = streams(conn)
        self._timeout = timeout
        # (when it was written, its future), oldest first: replies come in this order.
        self._waiting: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._parser = hiredis.Reader(replyError=reply_error)
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self.broken: RedisError | None = None
        self._task = asyncio.create_task(self._read(), name="redis-publish-reader")

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply (or the error reply)."""
        if self.broken is not None:
            raise self.broken
        try:
            # No drain: every call waits for its reply, so what is buffered here is
            # bounded by the publishes in flight.
            self._writer.write(packed)
        except Exception as exc:  # uvloop raises RuntimeError on a closing transport
            error = RedisConnectionError(f"Redis connection unusable: {exc!r}")
            self.close(error)
            raise error from exc
        future = self._loop.create_future()
        self._waiting.append((self._loop.time(), future))
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._check_every, self._check)
        return future

    @property
    def _check_every(self) -> float:
        return min(self._timeout / 4, 1.0)

    def _check(self) -> None:
        # One timer per connection instead of one per call: a call fails between
        # `timeout` and `timeout` + `_check_every` after it was written.
        self._watchdog = None
        if not self._waiting:
            return
        now = self._loop.time()
        if now - self._waiting[0][0] < self._timeout:
            self._watchdog = self._loop.call_later(self._check_every, self._check)
            return
        # No reply in time: the connection may be dead without a reset. Like redis-py,
        # stop using it. Calls that waited too long fail; the others are retried.
        timed_out = RedisTimeoutError(f"no reply from Redis within {self._timeout:g} s")
        while self._waiting and now - self._waiting[0][0] >= self._timeout:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(timed_out)
        self.close(RedisConnectionError("an earlier call on this connection timed out"))

    async def _read(self) -> None:
        reader, parser, waiting = self._reader, self._parser, self._waiting
        try:
            while data := await reader.read(READ_SIZE):
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    _, future = waiting.popleft()
                    # A caller that was cancelled left its future behind: its reply still
                    # arrives here, in its turn, and is dropped.
                    if not future.done():
                        if isinstance(reply, Exception):
                            future.set_exception(reply)
                        else:
                            future.set_result(reply)
            error: RedisError = RedisConnectionError("Redis closed the connection")
        except asyncio.CancelledError:
            error = RedisConnectionError("the connection was closed")
        except IndexError:
            error = RedisConnectionError("Redis sent a reply nobody asked for")
        except Exception as exc:  # a reset socket, a protocol error: the link is done
            error = RedisConnectionError(f"Redis connection lost: {exc!r}")
        self.close(error)
        await self.conn.disconnect(nowait=True)

    def close(self, error: RedisError) -> None:
        """Fail every call in flight with `error`, and reset the connection."""
        if self.broken is not None:
            return
        self.broken = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
        # A reset, not a graceful close: commands still buffered here must not reach
        # Redis after they were retried on another connection.
        self._writer.transport.abort()
        if self._task is not asyncio.current_task():
            self._task.cancel()


class ScriptPipe:
    """Runs one Lua script over a dedicated, pipelined connection (made on first use)."""

    def __init__(
        self,
        script: str,
        connection: Callable[[], AbstractConnection],
        *,
        timeout: float,
        retry: Retry,
    ) -> None:
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()
        self._connection = connection
        self._timeout = timeout
        self._retry = retry
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._closed = False

    async def __call__(self, keys: list[EncodableT], args: list[EncodableT]) -> Any:
        """Run the script (EVALSHA; EVAL once Redis says it does not have it)."""
        call = [len(keys), *keys, *args]
        deadline = asyncio.get_running_loop().time() + self._timeout
        try:
            return await self._retry.call_with_retry(
                lambda: self._attempt(b"EVALSHA", self._sha, call, deadline), _ignore
            )
        except NoScriptError:
            # New to this Redis (or its script cache was flushed): EVAL caches it again.
            return await self._retry.call_with_retry(
                lambda: self._attempt(b"EVAL", self._script, call, deadline), _ignore
            )

    async def close(self) -> None:
        """Stop: calls in flight and later calls fail (`PipeClosed`), nothing reconnects."""
        # A connection attempt under way finds the pipe closed when it ends.
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            link.close(PipeClosed("the publish connection was closed"))
            await link.conn.disconnect(nowait=True)

    async def _attempt(
        self, command: bytes, script: bytes, call: list[EncodableT], deadline: float
    ) -> Any:
        if self._closed:
            raise PipeClosed("the publish connection was closed")
        if asyncio.get_running_loop().time() >= deadline:
            raise RedisTimeoutError(f"Redis did not take the call within {self._timeout:g} s")
        link = self._link
        if link is None or link.broken is not None:
            try:
                async with asyncio.timeout_at(deadline):
                    link = await self._connect()
            except TimeoutError:
                message = f"no connection to Redis within {self._timeout:g} s"
                raise RedisTimeoutError(message) from None
        # hiredis's stub types the argument as a tuple of one item; it takes any number.
        packed = hiredis.pack_command((command, script, *call))  # type: ignore[arg-type]
        return await link.send(packed)

    async def _connect(self) -> _Link:
        # Every caller waits for the same attempt (shielded: one caller giving up does
        # not cancel it for the others), and gets its error if it fails.
        if self._connecting is None:
            self._connecting = asyncio.create_task(self._make_link(), name="redis-publish-connect")
            self._connecting.add_done_callback(self._connected)
        return await asyncio.shield(self._connecting)

    def _connected(self, task: asyncio.Task[_Link]) -> None:
        self._connecting = None
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have given up

    async def _make_link(self) -> _Link:
        conn = self._connection()
        try:
            # Bounded by the connection's own connect and socket timeouts.
            await conn.connect()  # type: ignore[no-untyped-call]
            if self._closed:
                raise PipeClosed("the publish connection was closed")
            link = _Link(conn, self._timeout)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._link = link
        return link


async def _ignore(error: Exception) -> None:
    """Nothing to undo between attempts: a broken link is replaced on the next one."""
