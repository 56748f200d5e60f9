"""A dedicated Redis connection for the publish script: commands pipelined, replies in C.

Every publish is one script call. redis-py's command path (pool checkout, the retry
wrapper, a timeout per read, a parser that awaits each line of the reply) costs several
times the CPU the call needs (docs/performance.md, "What changed, and what each part
bought", no. 4). Here a call packs its command, writes it behind those already in
flight and waits for its reply; the connection's replies are read by the reader
`reply_reader` chose (service/broker/replies.py: hiredis from inside each read, or
redis-py's public `read_response` in a task) and handed out in order as they come.
redis-py still makes the connection (TLS, AUTH, database, client name), so the URL
means the same as elsewhere.

What the pooled path promised still holds:

* Connection errors are retried, with redis-py's `Retry` (safe because the publish
  script is idempotent: its token). Nothing is retried once the call's deadline
  (`timeout` after it was made) has passed, so a call gives up within about twice
  `timeout`: a last attempt may wait up to `timeout` for its reply.
* A call that gets no reply within `timeout` of being written fails, and the
  connection is dropped (reset by the tap, so that nothing still buffered on it reaches
  Redis later; closed by the public reader), as redis-py drops one that timed out. The
  other calls on it are retried.
* Concurrent calls share one connection attempt: while Redis does not answer, they all
  fail after one connect timeout, not one after another.

What a failed call says is true: each call remembers whether one of its attempts was
written and then failed without a reply (it timed out, or its connection was lost or
closed under it). Redis may have run such an attempt, so the call fails with
`Unanswered` (still of the kind its last error was: a timeout stays a `TimeoutError`).
Any other failure means Redis did not run it: no attempt reached Redis, or every one
that did got a reply saying it did not run (NOSCRIPT, an error reply).

The script gets one more ARGV than its caller gives: the run id of the server it runs
on (`INFO server`, read once per connection), so that it can tell when another server
(a replica promoted by a failover, a restarted one, a cluster node a slot moved to)
took over its data.

There is one path: `start` makes a call from synchronous code (the publishing
session's read) and hands its outcome to a callback; with the tap, from inside the read
that brought the reply, so no task step on either side (service/session.py). Awaiting
`pipe(keys=..., args=...)` is `start` with a future as its callback. What the first
write cannot settle (no connection yet, a broken one, a script Redis lost) goes on in a
task, and the reply still goes out from inside its read.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import re
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

import hiredis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ReadOnlyError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.typing import EncodableT

from service.broker.replies import reply_reader

logger = logging.getLogger(__name__)

#: Gets a call's reply, or the exception it failed with (an error reply included).
OnReply = Callable[[Any], None]
#: Asked with a call's parts (`[len(keys), *keys, *args]`), its `OnReply` and what it is
#: about to fail with; True: it took the call over (and will answer `OnReply` itself).
Redirect = Callable[[list[EncodableT], OnReply, Exception], bool]


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


#: Gets what failed an attempt: an error reply (its exception) or `_NoReply`, and when
#: the attempt was written.
_OnError = Callable[[Exception, float], None]


class _Call:
    """One call of the script across its attempts, once its first attempt did not settle it."""

    __slots__ = ("deadline", "on_reply", "parts", "unanswered")

    def __init__(
        self, parts: list[EncodableT], deadline: float, on_reply: OnReply, unanswered: bool = False
    ) -> None:
        self.parts = parts
        self.deadline = deadline
        # Gets the reply from inside its read, or what the call fails with.
        self.on_reply = on_reply
        # An attempt was written and failed without a reply: Redis may have run it.
        self.unanswered = unanswered

    def failed(self, error: Exception) -> Exception:
        """What the call fails with, when its last attempt failed with `error`."""
        if self.unanswered and isinstance(error, RedisError):
            return _unanswered(error)
        return error  # Redis did not run it (or a bug, which claims nothing)


class _Link:
    """One connection: commands in flight, in the order they were written."""

    def __init__(
        self, conn: AbstractConnection, timeout: float, *, fast: bool, server: bytes
    ) -> None:
        self.conn = conn
        #: The run id of the Redis server this connection reached.
        self.server = server
        self._timeout = timeout
        # One timer per connection instead of one per call: a call fails between
        # `timeout` and `timeout` + this after it was written.
        self._check_every = min(timeout / 4, 1.0)
        # (when it was written, who gets its reply, who gets its failure), oldest first:
        # replies come in this order.
        self._waiting: deque[tuple[float, OnReply, _OnError]] = deque()
        self.loop = asyncio.get_running_loop()
        self._watchdog: asyncio.TimerHandle | None = None
        self.broken: RedisError | None = None
        self.replies = reply_reader(conn, self._reply, on_end=self._ended, fast=fast)
        self._write = self.replies.write

    def send(self, packed: bytes, on_reply: OnReply, on_error: _OnError) -> None:
        """Write one packed command; `on_reply` gets its reply, `on_error` why there is none.

        `on_error(error, written_at)` gets an error reply as its exception, or `_NoReply`
        if the command fails without a reply. Both are called from inside the read that
        brings the reply (or from where the command fails), never from inside this call;
        an exception they raise is logged: it must not end this connection. Raises
        `RedisError` (nothing written) if the connection is unusable.
        """
        if self.broken is not None:
            raise self.broken
        try:
            # No drain: every command waits for its reply, so what is buffered here is
            # bounded by the publishes in flight.
            self._write(packed)
        except Exception as exc:  # uvloop raises RuntimeError on a closing transport
            error = RedisConnectionError(f"Redis connection unusable: {exc!r}")
            self.close(error)
            raise error from exc
        self._waiting.append((self.loop.time(), on_reply, on_error))
        if self._watchdog is None:
            self._watchdog = self.loop.call_later(self._check_every, self._check)

    def _check(self) -> None:
        self._watchdog = None
        if not self._waiting:
            return
        now = self.loop.time()
        if now - self._waiting[0][0] < self._timeout:
            self._watchdog = self.loop.call_later(self._check_every, self._check)
            return
        # No reply in time: the connection may be dead without a reset. Like redis-py,
        # stop using it. Commands that waited too long fail; the others are retried.
        timed_out = RedisTimeoutError(f"no reply from Redis within {self._timeout:g} s")
        while self._waiting and now - self._waiting[0][0] >= self._timeout:
            written_at, _, on_error = self._waiting.popleft()
            _call_back(on_error, _NoReply(timed_out), written_at)
        self.close(RedisConnectionError("an earlier call on this connection timed out"))

    def _reply(self, reply: Any) -> None:
        try:
            written_at, on_reply, on_error = self._waiting.popleft()
        except IndexError:
            raise RedisConnectionError("Redis sent a reply nobody asked for") from None
        demoted = None
        if isinstance(reply, ReadOnlyError):
            # The server became a replica (a failover that kept it alive): this call did
            # not run. The connection goes, so that the retry asks the Sentinels anew.
            demoted = RedisConnectionError("Redis answered READONLY: reconnecting to the primary")
            reply = demoted
        # What a callback raises is logged: raised into the read, it would end the
        # connection under every other call.
        try:
            if isinstance(reply, Exception):  # an error reply
                on_error(reply, written_at)
            else:
                on_reply(reply)
        except Exception:
            logger.exception("a callback for a Redis reply failed")
        if demoted is not None:
            self.close(demoted)

    def _ended(self, reason: BaseException) -> None:
        if isinstance(reason, RedisError):
            self.close(reason)
        else:  # a reply hiredis could not parse
            self.close(RedisConnectionError(f"Redis connection lost: {reason!r}"))

    def close(self, error: RedisError) -> None:
        """Fail every command in flight with `error` (as `_NoReply`); end the connection."""
        if self.broken is not None:
            return
        self.broken = error
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._waiting:
            written_at, _, on_error = self._waiting.popleft()
            _call_back(on_error, _NoReply(error), written_at)
        self.replies.end(error)


def _call_back(callback: Callable[..., None], *outcome: Any) -> None:
    """`callback(*outcome)`; what it raises is logged (it must not end a read or a task)."""
    try:
        callback(*outcome)
    except Exception:
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
        fast: bool = True,
        redirect: Redirect | None = None,
    ) -> None:
        """`fast`: read the connection with `ReplyTap` if its check passes (replies.py).

        `redirect`: asked before a call fails (service/broker/routed_pipe.py).
        """
        self._redirect = redirect
        self._script = script.encode()
        self._sha = hashlib.sha1(self._script).hexdigest().encode()
        self._connection = connection
        self._timeout = timeout
        self._retry = retry
        self._fast = fast
        # What is left of the retries once the first attempt (written by `start`) failed.
        self._retry_after_first: Retry | None = retry
        retries = retry.get_retries()
        if retries == 0:
            self._retry_after_first = None
        elif retries > 0:  # (-1: for ever)
            self._retry_after_first = copy.copy(retry)
            self._retry_after_first.update_retries(retries - 1)
        self._link: _Link | None = None
        self._connecting: asyncio.Task[_Link] | None = None
        self._closed = False
        # Calls that went on in a task; held here, as the loop keeps only weak references.
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self, keys: list[EncodableT], args: list[EncodableT]) -> Any:
        """Run the script and return its reply: `start` with a future as its callback.

        Raises what `start` hands over instead of a reply. A caller that stops waiting
        (cancelled) does not stop the call: Redis may run it anyway once it is written,
        and its outcome is dropped.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.start(keys, args, partial(settle, future))
        return await future

    def start(self, keys: list[EncodableT], args: list[EncodableT], on_reply: OnReply) -> None:
        """Run the script (EVALSHA; EVAL once Redis says it lacks it) without waiting.

        `on_reply` gets the reply, or the exception the call fails with (`Unanswered` if
        Redis may have run it: see the module's docstring); later, never from inside this
        call. A reply is always handed over from the read that brought it (with the tap,
        from inside the event loop's read; the public reader's from its task), so no task
        step stands between Redis's answer and the publisher's. With the connection up, the EVALSHA
        is written now, and its reply goes straight to `on_reply`. If that attempt fails
        on the connection, the call is retried in a task within the same deadline, the
        attempt counted (and remembered as unanswered); if Redis lacks the script, EVAL
        follows. Without a usable connection, all of it runs in a task.
        """
        parts = [len(keys), *keys, *args]
        link = self._link
        if link is not None and link.broken is None:
            # hiredis's stub types the argument as a tuple of one item; it takes any number.
            command = (b"EVALSHA", self._sha, *parts, link.server)
            packed = hiredis.pack_command(command)  # type: ignore[arg-type]
            try:
                # The call's state is made only if this attempt fails: not on the hot path.
                link.send(packed, on_reply, partial(self._first_failed, parts, on_reply))
                return
            except RedisError:
                pass  # the link closed itself and nothing was written: the path below
        deadline = asyncio.get_running_loop().time() + self._timeout
        self._go_on(_Call(parts, deadline, on_reply), self._retry)

    def _first_failed(
        self, parts: list[EncodableT], on_reply: OnReply, failure: Exception, written_at: float
    ) -> None:
        # The call goes on as one made without a connection would, knowing what it told.
        error = failure.error if isinstance(failure, _NoReply) else failure
        call = _Call(parts, written_at + self._timeout, on_reply, isinstance(failure, _NoReply))
        if isinstance(error, NoScriptError):
            self._go_on(call, None)
        elif isinstance(error, RedisConnectionError) and self._retry_after_first is not None:
            self._go_on(call, self._retry_after_first)
        else:
            self._give_up(call, call.failed(error), on_reply)

    def _go_on(self, call: _Call, retry: Retry | None) -> None:
        """The rest of a call, in a task: its reply still goes out from inside its read."""
        task = asyncio.ensure_future(self._run(call, retry))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, call: _Call, retry: Retry | None) -> None:
        """The rest of a call: its reply goes to `call.on_reply` from inside its read.

        What the call fails with (`_Call.failed`) goes to it from here.
        """
        try:
            await self._attempts(call, retry)
            return
        except asyncio.CancelledError:
            # Only `close`, or a worker that is stopping, cancels these tasks.
            closed = PipeClosed("the call was cancelled: the pipe is closing")
            _call_back(call.on_reply, call.failed(closed))
            raise
        except RedisError as error:
            failure = call.failed(error)
        except Exception as exc:  # a bug: it claims nothing about the call
            failure = exc
        self._give_up(call, failure, partial(_call_back, call.on_reply))

    def _give_up(self, call: _Call, failure: Exception, fail: OnReply) -> None:
        """Fail `call` with `failure` through `fail`, unless `redirect` takes the call over."""
        if self._redirect is not None and self._redirect(call.parts, call.on_reply, failure):
            return
        fail(failure)

    async def _attempts(self, call: _Call, retry: Retry | None) -> None:
        """EVALSHA with `retry` (None: straight to EVAL), then EVAL if Redis lacks the script."""
        if retry is not None:
            try:
                await retry.call_with_retry(
                    partial(self._attempt, b"EVALSHA", self._sha, call), _ignore
                )
                return
            except NoScriptError:
                pass
        # New to this Redis (or its script cache was flushed): EVAL caches it again.
        await self._retry.call_with_retry(
            partial(self._attempt, b"EVAL", self._script, call), _ignore
        )

    async def close(self) -> None:
        """Stop: calls in flight and later calls fail (`PipeClosed`), nothing reconnects."""
        self._closed = True
        link, self._link = self._link, None
        if link is not None:
            link.close(PipeClosed("the publish connection was closed"))
        # Calls waiting in a task (for a connection, a backoff, a reply) fail now.
        tasks = [*self._tasks, *([self._connecting] if self._connecting is not None else [])]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if link is not None:
            await link.replies.aclose()
            await link.conn.disconnect(nowait=True)

    async def _attempt(self, command: bytes, script: bytes, call: _Call) -> None:
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
        whole = (command, script, *call.parts, link.server)
        packed = hiredis.pack_command(whole)  # type: ignore[arg-type]
        # A reply goes to `on_reply` from inside its read; a failure fails this attempt,
        # for the retry policy to judge.
        attempt: asyncio.Future[None] = link.loop.create_future()
        link.send(packed, partial(_hand_over, attempt, call.on_reply), partial(_fail, attempt))
        # Written: from here on, Redis may run it whether or not a reply comes back.
        try:
            await attempt
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
            # Already ended (`_Link.close`); this lets redis-py's side of it go too.
            await stale.replies.aclose()
            await stale.conn.disconnect(nowait=True)
        conn = self._connection()
        try:
            # Bounded by the connection's own connect and socket timeouts.
            await conn.connect()  # type: ignore[no-untyped-call]
            server = await _server_id(conn)
            if self._closed:
                raise PipeClosed("the publish connection was closed")
            link = _Link(conn, self._timeout, fast=self._fast, server=server)
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        self._link = link
        return link


_RUN_ID = re.compile(rb"^run_id:([0-9a-f]+)\r?$", re.MULTILINE)
#: What a server that does not tell its run id is called (a proxy may hide INFO): one
#: name for all, so no change of server is seen through it.
UNKNOWN_SERVER = b"unknown"


async def _server_id(conn: AbstractConnection) -> bytes:
    """The run id of the server `conn` reached, from `INFO server` (before any call)."""
    await conn.send_command("INFO", "server")
    info = await conn.read_response()
    found = _RUN_ID.search(info if isinstance(info, bytes) else str(info).encode())
    if found is None:
        logger.warning("Redis did not tell its run id (INFO server): failovers go unnoticed")
        return UNKNOWN_SERVER
    return found.group(1)


def settle(future: asyncio.Future[Any], reply: Any) -> None:
    """A callback's outcome into `future`: a reply as its result, an exception raised.

    What awaits a call made with a callback (`__call__`, `Broker.publish`) gives it this.
    """
    # A caller that was cancelled left its future behind: its outcome is dropped.
    if future.done():
        return
    if isinstance(reply, Exception):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _hand_over(attempt: asyncio.Future[None], on_reply: OnReply, reply: Any) -> None:
    """A retried call's reply: to `on_reply` at once, and its attempt is done."""
    if attempt.done():
        return  # its task was cancelled (the pipe closes): the reply is nobody's now
    attempt.set_result(None)
    on_reply(reply)


def _fail(attempt: asyncio.Future[None], error: Exception, written_at: float) -> None:
    """A retried call's failed attempt: to the task, for the retry policy to judge."""
    if not attempt.done():
        attempt.set_exception(error)


async def _ignore(error: Exception) -> None:
    """Nothing to undo between attempts: a broken link is replaced on the next one."""
