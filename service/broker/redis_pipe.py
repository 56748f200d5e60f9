"""A dedicated Redis connection for the publish script: commands pipelined, replies in C.

Every publish is one script call. Through redis-py's command path (pool checkout, the
retry wrapper, a timeout per read, a parser that awaits each line of the reply) one call
costs this process about 200 µs more CPU than it needs on the benchmark's machine kind
(docs/performance.md). Here a call packs its command, writes it behind those already in
flight and waits for its reply; each read of the connection goes straight to hiredis
(`ReplyTap`), and the replies are handed out in order from inside that read. redis-py
still makes the connection (TLS, AUTH, database, client name), so the URL means the
same as elsewhere.

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
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from service.broker.replies import ReplyTap


class PipeClosed(RedisError):
    """The pipe was closed (the worker is shutting down): not retried."""


class _Link:
    """One connection: calls in flight, in the order they were written."""

    def __init__(self, conn: AbstractConnection, timeout: float) -> None:
        self.conn = conn
        self._timeout = timeout
        # (when it was written, its future), oldest first: replies come in this order.
        self._waiting: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self.broken: RedisError | None = None
        # Replies are handed out from inside the read that brought them: no reader task.
        self._tap = ReplyTap(conn, self._reply, on_end=self._ended)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply (or the error reply)."""
        if self.broken is not None:
            raise self.broken
        try:
            # No drain: every call waits for its reply, so what is buffered here is
            # bounded by the publishes in flight.
            self._tap.transport.write(packed)
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

    def _reply(self, reply: Any) -> None:
        if not self._waiting:
            raise RedisConnectionError("Redis sent a reply nobody asked for")
        _, future = self._waiting.popleft()
        # A caller that was cancelled left its future behind: its reply still arrives
        # here, in its turn, and is dropped.
        if not future.done():
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _ended(self, reason: BaseException) -> None:
        if isinstance(reason, RedisError):
            self.close(reason)
        else:  # a reply hiredis could not parse
            self.close(RedisConnectionError(f"Redis connection lost: {reason!r}"))

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
        self._tap.end(error)


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
        stale, self._link = self._link, None
        if stale is not None:
            # Already reset (`_Link.close`); this lets redis-py's side of it go too.
            await stale.conn.disconnect(nowait=True)
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
