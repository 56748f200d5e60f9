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

What a failed call says is true: each call remembers whether one of its attempts was
written and then failed without a reply (it timed out, or its connection was lost or
closed under it). Redis may have run such an attempt, so the call fails with
`Unanswered` (still of the kind its last error was: a timeout stays a `TimeoutError`).
Any other failure means Redis did not run it: no attempt reached Redis, or every one
that did got a reply saying it did not run (NOSCRIPT, an error reply).

`start` makes a call from synchronous code (the publishing session's read) and hands
its reply to a callback from inside the read that brought it: no task step on either
side (service/session.py). What its first write cannot settle (no connection yet, a
broken one, a script Redis lost) goes on as an awaited call would, in a task, and the
reply still goes out from inside its read; errors come from the task.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from service.broker.replies import ReplyTap

logger = logging.getLogger(__name__)

#: Gets a call's reply, or the exception it failed with (an error reply included).
OnReply = Callable[[Any], None]


class PipeClosed(RedisError):
    """The pipe was closed (the worker is shutting down): not retried."""


class Unanswered(RedisError):
    """A call failed after one of its attempts was written and got no reply: it may have run.

    Raised as a subclass that is also of its last error's kind (`TimeoutError`,
    `ConnectionError`, `PipeClosed`), which is its `__cause__`.
    """


class _UnansweredTimeout(Unanswered, RedisTimeoutError):
    """`Unanswered`, ended by a timeout."""


class _UnansweredLoss(Unanswered, RedisConnectionError):
    """`Unanswered`, ended by a connection error."""


class _UnansweredClose(Unanswered, PipeClosed):
    """`Unanswered`, ended by the pipe closing."""


def _unanswered(error: RedisError) -> Unanswered:
    kind: type[Unanswered] = Unanswered
    if isinstance(error, PipeClosed):
        kind = _UnansweredClose
    elif isinstance(error, RedisTimeoutError):
        kind = _UnansweredTimeout
    elif isinstance(error, RedisConnectionError):
        kind = _UnansweredLoss
    # The same words: what is new is said by the class.
    unanswered = kind(str(error))
    unanswered.__cause__ = error
    return unanswered


class _NoReply(Exception):
    """What a waiter gets when its call was written and then failed without a reply."""

    def __init__(self, error: RedisError) -> None:
        super().__init__(error)
        self.error = error


class _Call:
    """One call of the script across its attempts, and what is known of its outcome."""

    __slots__ = ("deadline", "on_reply", "parts", "unanswered")

    def __init__(
        self,
        parts: list[EncodableT],
        deadline: float,
        on_reply: OnReply | None = None,
        unanswered: bool = False,
    ) -> None:
        self.parts = parts
        self.deadline = deadline
        # A `start` call's: its reply goes there from inside its read.
        self.on_reply = on_reply
        # An attempt was written and failed without a reply: Redis may have run it.
        self.unanswered = unanswered

    def failed(self, error: Exception) -> Exception:
        """What the call fails with, when its last attempt failed with `error`."""
        if self.unanswered and isinstance(error, RedisError):
            return _unanswered(error)
        return error  # Redis did not run it (or a bug, which claims nothing)


class _Link:
    """One connection: calls in flight, in the order they were written."""

    def __init__(self, conn: AbstractConnection, timeout: float) -> None:
        self.conn = conn
        self._timeout = timeout
        # (when it was written, who waits for its reply), oldest first: replies come in
        # this order. A future (`send`) or a callback (`send_then`).
        self._waiting: deque[tuple[float, asyncio.Future[Any] | OnReply]] = deque()
        self.loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self.broken: RedisError | None = None
        # Replies are handed out from inside the read that brought them: no reader task.
        self._tap = ReplyTap(conn, self._reply, on_end=self._ended)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write one packed command; the future gets its reply.

        It raises the error reply, or `_NoReply` if the call fails without a reply.
        """
        future = self.loop.create_future()
        self._write(packed, future)
        return future

    def send_then(self, packed: bytes, on_reply: OnReply) -> None:
        """Write one packed command; `on_reply` gets its reply, or why there is none.

        That is an error reply as its exception, or `_NoReply` if the call fails without
        a reply. Called from inside the read that brings the reply (or from where the call
        fails). An exception it raises is logged: it must not end this connection.
        """
        self._write(packed, on_reply)

    def _write(self, packed: bytes, waiter: asyncio.Future[Any] | OnReply) -> None:
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
        self._waiting.append((self.loop.time(), waiter))
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self._check_every, self._check)

    @property
    def _check_every(self) -> float:
        return min(self._timeout / 4, 1.0)

    def _check(self) -> None:
        # One timer per connection instead of one per call: a call fails between
        # `timeout` and `timeout` + `_check_every` after it was written.
        self._watchdog = None
        if not self._waiting:
            return
        now = self.loop.time()
        if now - self._waiting[0][0] < self._timeout:
            self._watchdog = self.loop.call_later(self._check_every, self._check)
            return
        # No reply in time: the connection may be dead without a reset. Like redis-py,
        # stop using it. Calls that waited too long fail; the others are retried.
        timed_out = RedisTimeoutError(f"no reply from Redis within {self._timeout:g} s")
        while self._waiting and now - self._waiting[0][0] >= self._timeout:
            _, waiter = self._waiting.popleft()
            _settle(waiter, _NoReply(timed_out))
        self.close(RedisConnectionError("an earlier call on this connection timed out"))

    def _reply(self, reply: Any) -> None:
        if not self._waiting:
            raise RedisConnectionError("Redis sent a reply nobody asked for")
        _, waiter = self._waiting.popleft()
        _settle(waiter, reply)

    def _ended(self, reason: BaseException) -> None:
        if isinstance(reason, RedisError):
            self.close(reason)
        else:  # a reply hiredis could not parse
            self.close(RedisConnectionError(f"Redis connection lost: {reason!r}"))

    def close(self, error: RedisError) -> None:
        """Fail every call in flight with `error` (as `_NoReply`), and reset the connection."""
        if self.broken is not None:
            return
        self.broken = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            _, waiter = self._waiting.popleft()
            _settle(waiter, _NoReply(error))
        self._tap.end(error)


def _settle(waiter: asyncio.Future[Any] | OnReply, reply: Any) -> None:
    """Hand `reply` (an exception if the call failed) to whoever waits for it."""
    if isinstance(waiter, asyncio.Future):
        # A caller that was cancelled left its future behind: its reply still arrives
        # here, in its turn, and is dropped.
        if not waiter.done():
            if isinstance(reply, Exception):
                waiter.set_exception(reply)
            else:
                waiter.set_result(reply)
        return
    try:
        waiter(reply)
    except Exception:
        # Raised into the read, it would reset the connection under every other call.
        logger.exception("a callback for a Redis reply failed")


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
        # What is left of the retries once `start`'s own write was the first attempt.
        self._retry_after_start: Retry | None = retry
        retries = retry.get_retries()
        if retries == 0:
            self._retry_after_start = None
        elif retries > 0:  # (-1: for ever)
            self._retry_after_start = copy.copy(retry)
            self._retry_after_start.update_retries(retries - 1)
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._closed = False
        # Calls `start` handed to a task; held here, as the loop keeps only weak references.
        self._tasks: set[asyncio.Task[Any]] = set()

    async def __call__(self, keys: list[EncodableT], args: list[EncodableT]) -> Any:
        """Run the script (EVALSHA; EVAL once Redis says it does not have it).

        Fails with `Unanswered` if Redis may have run it (see the module's docstring).
        """
        deadline = asyncio.get_running_loop().time() + self._timeout
        return await self._call(_Call([len(keys), *keys, *args], deadline), self._retry)

    def start(self, keys: list[EncodableT], args: list[EncodableT], on_reply: OnReply) -> None:
        """Run the script without waiting: `on_reply` gets the reply, or the exception.

        The outcome is what `await pipe(keys, args)` would return or raise, and it comes
        later, never from inside this call. A reply is always handed over from inside the
        read that brought it: the publishing session's answer then goes out no later
        than a fan-out of the message from that worker's pub/sub read (service/hub.py).
        With the connection up, the EVALSHA is written now. If that attempt fails on the
        connection, the call is retried at once as `__call__` would, in a task, within
        the same deadline and with the attempt counted (and remembered as unanswered);
        if Redis lacks the script, EVAL follows. Without a usable connection, all of it
        runs in a task. Errors come from that task.
        """
        parts = [len(keys), *keys, *args]
        link = self._link
        if not self._closed and link is not None and link.broken is None:
            deadline = link.loop.time() + self._timeout
            packed = hiredis.pack_command((b"EVALSHA", self._sha, *parts))  # type: ignore[arg-type]
            try:
                # The call's state is made only if this attempt fails: not on the hot path.
                link.send_then(packed, partial(self._first_reply, parts, deadline, on_reply))
                return
            except RedisError:
                pass  # the link closed itself and nothing was written: the path below
        deadline = asyncio.get_running_loop().time() + self._timeout
        self._finish(_Call(parts, deadline, on_reply), self._retry, on_reply)

    def _first_reply(
        self, parts: list[EncodableT], deadline: float, on_reply: OnReply, reply: Any
    ) -> None:
        if not isinstance(reply, Exception):
            on_reply(reply)
            return
        # That attempt failed: the call goes on as `_call` would, knowing what it told.
        error: Exception = reply
        unanswered = isinstance(reply, _NoReply)
        if isinstance(reply, _NoReply):
            error = reply.error
        call = _Call(parts, deadline, on_reply, unanswered)
        if isinstance(error, NoScriptError):
            self._finish(call, None, on_reply)
        elif isinstance(error, RedisConnectionError) and self._retry_after_start is not None:
            self._finish(call, self._retry_after_start, on_reply)
        else:
            on_reply(call.failed(error))

    def _finish(self, call: _Call, retry: Retry | None, on_reply: OnReply) -> None:
        """The rest of a `start` call, in a task: replies still go out from their read."""
        task = asyncio.ensure_future(self._call_then(call, retry, on_reply))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _call_then(self, call: _Call, retry: Retry | None, on_reply: OnReply) -> None:
        try:
            await self._call(call, retry)
        except asyncio.CancelledError:
            # Only a worker that is stopping cancels tasks it did not make.
            on_reply(call.failed(PipeClosed("the call was cancelled: the worker is stopping")))
            raise
        except Exception as exc:
            on_reply(exc)  # already what the call fails with (`_call`)

    async def _call(self, call: _Call, retry: Retry | None) -> Any:
        """EVALSHA with `retry` (None: straight to EVAL), then EVAL if Redis lacks the script.

        With `call.on_reply`, the reply goes to it from inside its read, and this returns
        None. Fails with what the call fails with (`_Call.failed`).
        """
        try:
            if retry is not None:
                try:
                    return await retry.call_with_retry(
                        partial(self._attempt, b"EVALSHA", self._sha, call), _ignore
                    )
                except NoScriptError:
                    pass
            # New to this Redis (or its script cache was flushed): EVAL caches it again.
            return await self._retry.call_with_retry(
                partial(self._attempt, b"EVAL", self._script, call), _ignore
            )
        except RedisError as error:
            failure = call.failed(error)
        raise failure

    async def close(self) -> None:
        """Stop: calls in flight and later calls fail (`PipeClosed`), nothing reconnects."""
        # A connection attempt under way finds the pipe closed when it ends.
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            link.close(PipeClosed("the publish connection was closed"))
            await link.conn.disconnect(nowait=True)

    async def _attempt(self, command: bytes, script: bytes, call: _Call) -> Any:
        if self._closed:
            raise PipeClosed("the publish connection was closed")
        if asyncio.get_running_loop().time() >= call.deadline:
            raise RedisTimeoutError(f"Redis did not take the call within {self._timeout:g} s")
        link = self._link
        if link is None or link.broken is not None:
            try:
                async with asyncio.timeout_at(call.deadline):
                    link = await self._connect()
            except TimeoutError:
                message = f"no connection to Redis within {self._timeout:g} s"
                raise RedisTimeoutError(message) from None
        # hiredis's stub types the argument as a tuple of one item; it takes any number.
        packed = hiredis.pack_command((command, script, *call.parts))  # type: ignore[arg-type]
        on_reply = call.on_reply
        if on_reply is None:
            waiting = link.send(packed)
        else:
            # A reply goes to `on_reply` from inside its read; an error fails this attempt,
            # for the retry policy to judge.
            waiting = link.loop.create_future()
            link.send_then(packed, partial(_hand_over, waiting, on_reply))
        # Written: from here on, Redis may run it whether or not a reply comes back.
        try:
            return await waiting
        except _NoReply as lost:
            call.unanswered = True
            raise lost.error from None
        except asyncio.CancelledError:
            call.unanswered = True  # a reply that still comes is nobody's
            raise

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


def _hand_over(attempt: asyncio.Future[Any], on_reply: OnReply, reply: Any) -> None:
    """A reply to `on_reply` at once, an error to the attempt that waits for it."""
    if attempt.done():
        return  # its task was cancelled (the worker stops): the reply is nobody's now
    if isinstance(reply, Exception):
        attempt.set_exception(reply)
    else:
        attempt.set_result(None)
        on_reply(reply)


async def _ignore(error: Exception) -> None:
    """Nothing to undo between attempts: a broken link is replaced on the next one."""
