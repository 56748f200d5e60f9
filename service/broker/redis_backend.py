"""A broadcaster backend for Redis pub/sub that never dies and never loses a subscription.

broadcaster 0.3.1's own Redis backend has known traps (tests/integration/test_pitfalls.py): with
redis-py 8 it can deliver nothing after the first subscription (its listener waits
on a signal sent before SUBSCRIBE is recorded), its listener ends for good on a
disconnect or a non-UTF-8 payload, and it builds its client without retries.

This backend keeps broadcaster's `BroadcastBackend` interface, but:

* `subscribe`/`unsubscribe` only change a *wanted* set (and send the command when a
  connection is up); they never raise, so broadcaster's bookkeeping stays consistent.
* One reader task owns a dedicated pub/sub connection (not a pool connection). It
  reconnects with jittered exponential backoff and re-subscribes everything wanted;
  it catches every error, so it cannot end while the backend is open. The messages
  themselves are parsed and handed on from inside each read (`reply_reader`), to the
  channel's `ChannelSink` with their position: broadcaster's listener gets none.
* A watchdog pings the pub/sub connection when it is silent and rebuilds it when no
  reply comes in time, which `health_check_interval` does not do for a frozen Redis.
* After a reconnect, each channel that was live is told `interrupted()` once it is
  confirmed again, so the hub can fill the gap from history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any

from broadcaster import BroadcastBackend, Event
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig

from service.broker.canary import Canary
from service.broker.history import position_of
from service.broker.redis_pipe import ScriptPipe
from service.broker.redis_url import connection_pool
from service.broker.replies import Replies, reply_reader
from service.broker.sink import ChannelSink
from service.errors import BrokerUnavailable
from service.protocol.frames import message_head

logger = logging.getLogger(__name__)

# Log the first non-UTF-8 payload, then one in this many.
_DROPPED_PAYLOAD_LOG_EVERY = 1000
_FIRST_RETRY_DELAY = 0.05


def check_redis_url(url: str) -> None:
    """Raise ValueError if redis-py cannot build a connection from `url` (connects nothing).

    Settings checks the scheme, host, port and database; the query string is redis-py's
    to interpret, and it rejects a bad value when parsing the URL and an unknown
    parameter only when it builds a connection.
    """
    try:
        connection_pool(url).make_connection()  # type: ignore[no-untyped-call]
    except (TypeError, ValueError, RedisError) as exc:
        raise ValueError(f"BROADCAST_URL is not usable by redis-py: {exc}") from None


class RedisBackend(BroadcastBackend):
    """broadcaster backend over one self-healing Redis pub/sub connection per worker."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        client_name: str,
        timeout: float,
        max_connections: int,
        ping_interval: float,
        ping_timeout: float,
        retry_max_delay: float,
        canary_interval: float,
        canary_timeout: float,
        fast: bool = True,
    ) -> None:
        # BroadcastBackend.__init__ only raises NotImplementedError: not called on purpose.
        self._prefix = prefix
        self._client_name = client_name
        self._timeout = timeout
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._retry_max_delay = retry_max_delay
        # Read the pub/sub and publish connections with `ReplyTap` when its start-up check
        # passes (service/broker/replies.py); False: redis-py's public reads only.
        self._fast = fast
        # Redis.from_url builds a client with no retries. The Retry must be
        # redis.asyncio.retry.Retry: the sync class accepts async commands but never retries
        # them (test_publish_rides_out_a_dropped_command_connection). Retry only on
        # connection errors: a timed-out script may still run later, and running it twice
        # would publish the message twice.
        # A blocking pool: redis-py's default pool raises "Too many connections" at once
        # when every connection is busy, which failed resumes in a reconnect storm
        # (docs/performance.md, "What changed, and what each part bought", no. 3;
        # test_a_storm_of_resumes_waits_for_pool_connections_instead_of_failing).
        self._retry = Retry(
            ExponentialWithJitterBackoff(base=_FIRST_RETRY_DELAY, cap=0.5),
            retries=3,
            supported_errors=(RedisConnectionError,),
        )
        pool = connection_pool(
            url,
            max_connections=max_connections,
            timeout=timeout,
            # Named so that operators (and tests) can tell our connections apart in CLIENT LIST.
            client_name=client_name,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=self._retry,
        )
        self._client: Redis = Redis(connection_pool=pool)
        self._pipes: list[ScriptPipe] = []
        # channel name -> (its frames' head, what takes its messages): `attach`
        self._sinks: dict[str, tuple[str, ChannelSink]] = {}
        # channel name -> set once Redis confirmed our latest SUBSCRIBE to it
        self._wanted: dict[str, asyncio.Event] = {}
        # prefixed channel (bytes, as Redis sends it) -> channel name
        self._names: dict[bytes, str] = {}
        # channel name -> SUBSCRIBE commands sent on the current connection, not yet confirmed
        self._pending: dict[str, int] = {}
        # Channels wanted when the current connection was made and not yet re-confirmed on
        # it: while any is left, the worker is deaf to them (readiness is false). A channel
        # subscribed later is not counted: its subscriber waits for it, nobody else does.
        self._resubscribing: set[str] = set()
        # Channels that were live when the connection broke: told `interrupted()` once the
        # channel is confirmed again.
        self._gaps: set[str] = set()
        self._conn: AbstractConnection | None = None
        self._generation = 0
        self._reader: asyncio.Task[None] | None = None
        # `#` is never part of a channel name, so no client can subscribe to or spoof it;
        # the random part keeps it this process's own even if workers share a WORKER_ID.
        self._canary_key = f"{client_name}#canary:{os.urandom(6).hex()}".encode()
        self._canary = Canary(
            interval=canary_interval,
            timeout=canary_timeout,
            publish=lambda nonce: self._client.publish(self._canary_key, nonce),
            generation=self._canary_generation,
            on_deaf=self._deafened,
            on_heard=self._heard_canary,
        )
        self._canary_task: asyncio.Task[None] | None = None
        self._canary_subscribed = False
        self._deaf: str | None = None
        self.deaf_detections = 0
        self.reconnects = 0
        self.dropped_payloads = 0
        self.last_error = "not connected yet"

    # -- broadcaster's interface ------------------------------------------------------

    async def connect(self) -> None:
        """Start the reader; it connects (and keeps reconnecting) in the background."""
        self._reader = asyncio.create_task(self._run_reader(), name="redis-pubsub-reader")
        self._canary_task = asyncio.create_task(self._canary.run(), name="redis-canary")

    async def disconnect(self) -> None:
        """Stop the reader and the canary and close both connections."""
        tasks = [t for t in (self._reader, self._canary_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pipe in self._pipes:
            await pipe.close()
        await self._client.aclose(close_connection_pool=True)

    async def subscribe(self, channel: str) -> None:
        """Want `channel`; sent now if connected, else when the reader reconnects."""
        key = self.key(channel)
        self._wanted[channel] = asyncio.Event()
        self._names[key] = channel
        await self._command("SUBSCRIBE", key, channel=channel)

    async def unsubscribe(self, channel: str) -> None:
        """Stop wanting `channel`."""
        if self._wanted.pop(channel, None) is None:
            return
        self._resubscribing.discard(channel)
        self._gaps.discard(channel)
        key = self.key(channel)
        self._names.pop(key, None)
        await self._command("UNSUBSCRIBE", key)

    async def publish(self, channel: str, message: Any) -> None:
        """PUBLISH a ready frame (used for join/leave events, which carry no id)."""
        try:
            await self._client.publish(self.key(channel), message)
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis did not accept the event: {exc}") from exc

    async def next_published(self) -> Event:
        """Never returns: messages go to each channel's sink from inside the read."""
        await asyncio.Future()
        raise AssertionError("unreachable")

    def attach(self, channel: str, sink: ChannelSink) -> None:
        """Hand `channel`'s messages to `sink`, from inside the read, with their positions."""
        self._sinks[channel] = (message_head(channel), sink)

    def detach(self, channel: str, sink: ChannelSink) -> None:
        """Stop handing `channel`'s messages to `sink` (if it is still the one attached)."""
        attached = self._sinks.get(channel)
        if attached is not None and attached[1] is sink:
            del self._sinks[channel]

    # -- what the broker adds ---------------------------------------------------------

    @property
    def client(self) -> Redis:
        """The client for commands (not pub/sub), shared with the history store."""
        return self._client

    def script_pipe(self, script: str) -> ScriptPipe:
        """A runner of `script` on a connection of its own, for the hot path (publishes).

        Retried like the pool's commands (connection errors only); closed with the backend.
        """
        # Named apart from the pool's connections, so that CLIENT LIST tells them apart.
        name = f"{self._client_name}:publish"
        pipe = ScriptPipe(
            script,
            lambda: self._new_connection(client_name=name),
            timeout=self._timeout,
            retry=self._retry,
            fast=self._fast,
        )
        self._pipes.append(pipe)
        return pipe

    def key(self, channel: str) -> bytes:
        """The Redis pub/sub channel of `channel`."""
        return (self._prefix + channel).encode()

    async def wait_subscribed(self, channel: str) -> None:
        """Return once Redis confirmed the subscription to `channel` (at once if not wanted)."""
        confirmed = self._wanted.get(channel)
        if confirmed is None or confirmed.is_set():
            return
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self._timeout):
                await confirmed.wait()
        except TimeoutError:
            raise BrokerUnavailable(
                f"Redis did not confirm the subscription within {self._timeout:g} s "
                f"({self.problem() or 'no reply'})"
            ) from None

    def subscriptions_alive(self) -> bool:
        """True when connected, re-subscribed after connecting, and not found deaf."""
        return self._conn is not None and not self._resubscribing and self._deaf is None

    @property
    def canary_checks(self) -> int:
        """Canary round trips that came back."""
        return self._canary.checks

    def problem(self) -> str:
        """Why `subscriptions_alive()` is false, for operators ("" when it is true)."""
        if self._conn is None:
            return f"pub/sub connection down: {self.last_error}"
        if self._resubscribing:
            return f"re-subscribing {len(self._resubscribing)} channels"
        return self._deaf or ""

    async def _deafened(self, reason: str) -> None:
        self.deaf_detections += 1
        self._deaf = f"deaf: {reason}"
        logger.warning("Redis subscription is deaf (%s): rebuilding it", reason)
        conn = self._conn
        if conn is not None:
            # The reader's pending read fails on the closed connection; it reconnects,
            # re-subscribes, and marks the interruption, as after any other break.
            await conn.disconnect(nowait=True)

    def _canary_generation(self) -> int | None:
        # Checking before Redis confirmed the canary's own SUBSCRIBE would read a
        # reconnect as deafness ("0 receivers").
        if self._conn is None or not self._canary_subscribed:
            return None
        return self._generation

    def _heard_canary(self) -> None:
        if self._deaf is not None:
            logger.warning("Redis subscription hears again (%s)", self._deaf)
            self._deaf = None

    async def ping(self) -> None:
        """One PING on the command connection; raises BrokerUnavailable."""
        try:
            await self._client.ping()
        except RedisError as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from exc

    # -- the reader ---------------------------------------------------------------------

    async def _command(self, *args: bytes | str, channel: str | None = None) -> None:
        conn = self._conn
        # Only write on a live connection: `send_command` would otherwise reconnect it
        # from this task, behind the reader's back.
        if conn is None or not conn.is_connected:
            return
        if channel is not None:
            self._pending[channel] = self._pending.get(channel, 0) + 1
        try:
            await conn.send_command(*args, check_health=False)
        except Exception as exc:
            # Whatever broke (redis-py can even raise AttributeError when the reader tears
            # the connection down mid-write), the reader reconnects and re-subscribes all
            # wanted channels; raising here would corrupt broadcaster's bookkeeping.
            logger.debug("pub/sub command %s not sent: %r", args[0], exc)

    def _new_connection(self, client_name: str | None = None) -> AbstractConnection:
        pool = self._client.connection_pool
        # A connection of our own, outside the pool, with no retries of its own: its user
        # (the pub/sub reader, a script pipe) decides when and how often to reconnect, and
        # reads its replies itself (`reply_reader`). RESP2, because redis-py 8 speaks RESP3
        # by default and then routes pub/sub messages through a push handler that formats a
        # debug line for each one; in RESP2 they are plain replies.
        kwargs = {
            **pool.connection_kwargs,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            # Cluster maintenance notifications need RESP3, which this connection does not speak.
            "maint_notifications_config": MaintNotificationsConfig(enabled=False),
            "maint_notifications_pool_handler": None,
        }
        if client_name is not None:
            kwargs["client_name"] = client_name
        return pool.connection_class(**kwargs)

    async def _run_reader(self) -> None:
        delay = _FIRST_RETRY_DELAY
        failures = 0
        while True:
            conn: AbstractConnection | None = None
            replies: Replies | None = None
            try:
                conn = self._new_connection()
                await conn.connect()  # type: ignore[no-untyped-call]
                # Before anything is sent: every reply from here on goes to `_reply`.
                replies = reply_reader(conn, self._reply, fast=self._fast)
                # From here on `subscribe` sends on this connection itself; everything wanted
                # before this point is in the snapshot below (no await in between).
                self._conn = conn
                self._generation += 1
                self._canary_subscribed = False
                self._pending = dict.fromkeys(self._wanted, 1)
                self._resubscribing = set(self._wanted)
                keys = [self.key(channel) for channel in self._wanted]
                await conn.send_command("SUBSCRIBE", self._canary_key, *keys, check_health=False)
                if failures:
                    logger.warning("Redis pub/sub connection restored after %d failures", failures)
                delay, failures = _FIRST_RETRY_DELAY, 0
                self.last_error = ""
                await self._watch(conn, replies)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must outlive any error
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log = logger.warning if failures == 1 or failures % 20 == 0 else logger.debug
                log(
                    "Redis pub/sub connection failed (attempt %d, retrying in %.2f s): %s",
                    failures,
                    delay,
                    self.last_error,
                )
            finally:
                self._conn = None
                for channel, confirmed in self._wanted.items():
                    if confirmed.is_set():
                        self._gaps.add(channel)
                    confirmed.clear()
                if replies is not None:
                    await replies.aclose()  # the public reader's task ends with it
                if conn is not None:
                    await conn.disconnect(nowait=True)
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._retry_max_delay)

    async def _watch(self, conn: AbstractConnection, replies: Replies) -> None:
        """Until the connection ends: ping it when silent, end it when a ping goes unheard.

        Messages do not pass through here: the reader `reply_reader` chose hands each
        reply to `_reply` (with the tap, from inside the read: no task step and no timeout
        per read; docs/performance.md, "What changed, and what each part bought", no. 5).
        """
        loop = asyncio.get_running_loop()
        pinged_at: float | None = None  # last_heard when the pending PING went out
        while not replies.ended.done():
            silent = loop.time() - replies.last_heard
            if silent >= self._ping_interval + self._ping_timeout:
                raise TimeoutError(f"no reply from Redis for {silent:.1f} s")
            if silent >= self._ping_interval and pinged_at != replies.last_heard:
                pinged_at = replies.last_heard
                await conn.send_command("PING", check_health=False)
            # Wake when the connection ends, or at the next mark of the silence as it is
            # now, not as it was before the send: its answer may have come meanwhile (on
            # a busy machine it did, and the next wake found the connection "silent" for
            # the whole timeout). A ping `ping_interval` after the last reply, the end
            # `ping_timeout` after that while the ping is unanswered.
            mark = self._ping_interval
            if pinged_at == replies.last_heard:
                mark += self._ping_timeout
            await asyncio.wait([replies.ended], timeout=replies.last_heard + mark - loop.time())
        raise replies.ended.result()

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, Exception):  # an error reply (reply_error made it)
            raise reply
        if isinstance(reply, list) and len(reply) == 3:
            self._handle(reply[0], reply[1], reply[2])

    def _handle(self, kind: bytes, key: bytes, data: Any) -> None:
        if key == self._canary_key:
            if kind == b"message":
                self._canary.heard(data)
            elif kind == b"subscribe":
                self._canary_subscribed = True
                if self._deaf is not None:
                    self._canary.check_soon()  # rebuilt after deafness: verify it now
            return
        if kind == b"message":
            channel = self._names.get(key)
            attached = None if channel is None else self._sinks.get(channel)
            if attached is None:
                return  # unsubscribed meanwhile
            try:
                text = data.decode()
            except UnicodeDecodeError:
                # Not one of our frames (someone else published on our prefix); skipping it
                # must not end the reader (broadcaster issue #144's other trigger).
                self.dropped_payloads += 1
                if self.dropped_payloads % _DROPPED_PAYLOAD_LOG_EVERY == 1:
                    logger.warning(
                        "dropped a non-UTF-8 payload on channel %r (%d so far): something "
                        "other than this service publishes under prefix %r",
                        channel,
                        self.dropped_payloads,
                        self._prefix,
                    )
                return
            head, sink = attached
            sink.message(position_of(text, head), text)
        elif kind == b"subscribe":
            # Count acks per channel even if it is no longer wanted: an ack from before an
            # unsubscribe must not confirm a later subscribe that Redis has not yet seen.
            channel = key.decode(errors="replace").removeprefix(self._prefix)
            left = self._pending.get(channel, 1) - 1
            if left > 0:
                self._pending[channel] = left
                return
            self._pending.pop(channel, None)
            self._resubscribing.discard(channel)
            confirmed = self._wanted.get(channel)
            if confirmed is None:
                return
            confirmed.set()
            if channel in self._gaps:
                # Messages published while the connection was down never reached us.
                self._gaps.discard(channel)
                attached = self._sinks.get(channel)
                if attached is not None:
                    attached[1].interrupted()
