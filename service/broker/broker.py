"""`Broker`: publish, subscribe and read history, whichever backend is configured.

broadcaster stays the pub/sub seam: every subscription goes through
`Broadcast.subscribe`, backed by our `RedisBackend` for redis:// and rediss:// and by
broadcaster's own `MemoryBackend` for memory://. Publishing a message also numbers it
and keeps it in the channel's history, which `Broadcast.publish` cannot do, so that
call goes to the history store (`RedisHistory`, or `MemoryHistory` for memory://).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Protocol

from broadcaster import Broadcast, Event
from broadcaster._backends.memory import MemoryBackend
from broadcaster._base import Subscriber, Unsubscribed

from service.broker.history import HistoryRead, MemoryHistory, Position, Replayed
from service.broker.redis_backend import RedisBackend
from service.broker.redis_history import Published, RedisHistory, publish_token_ttl
from service.errors import BrokerUnavailable
from service.settings import Settings

__all__ = [
    "Broker",
    "HistoryRead",
    "Position",
    "Readiness",
    "Replayed",
    "Subscription",
    "Unsubscribed",
]

_READINESS_PING_TIMEOUT = 2.0

Subscription = Subscriber

#: Takes a message from inside the Redis read; False: queue it for the subscription.
#: It must not raise: the read it runs in serves every channel of the worker.
Taker = Callable[[str], bool]


class _HistoryStore(Protocol):
    async def publish(self, channel: str, data: bytes, key: str | None = None) -> str: ...

    def publish_now(
        self, channel: str, data: bytes, done: Published, key: str | None = None
    ) -> None: ...

    async def after(
        self, channel: str, since: Position | None, limit: int | None
    ) -> HistoryRead: ...

    async def latest(self, channel: str, limit: int) -> HistoryRead: ...


class _MemoryStore:
    """memory://: history in this process, messages through broadcaster's MemoryBackend."""

    def __init__(self, broadcast: Broadcast, settings: Settings) -> None:
        self._broadcast = broadcast
        self._history = MemoryHistory(
            size=settings.history_size,
            ttl=settings.history_ttl,
            meta_ttl=settings.history_meta_ttl,
            key_ttl=settings.idempotency_ttl,
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(self, channel: str, data: bytes, key: str | None = None) -> str:
        message_id, frame = self._history.publish(channel, data, key)
        if frame is not None:  # None: a replay under `key`, published before
            await self._broadcast.publish(channel, frame)
        return message_id

    def publish_now(
        self, channel: str, data: bytes, done: Published, key: str | None = None
    ) -> None:
        # broadcaster's publish is a coroutine, even in memory: a task, held until done.
        task = asyncio.ensure_future(self._publish_then(channel, data, done, key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish_then(
        self, channel: str, data: bytes, done: Published, key: str | None
    ) -> None:
        # `done` in the task's own step, as an awaiting caller would go on.
        try:
            message_id = await self.publish(channel, data, key)
        except asyncio.CancelledError:
            done(BrokerUnavailable("the publish was cancelled: the worker is stopping"))
            raise
        except Exception as exc:
            done(exc)
        else:
            done(message_id)

    async def after(self, channel: str, since: Position | None, limit: int | None) -> HistoryRead:
        return self._history.after(channel, since, limit)

    async def latest(self, channel: str, limit: int) -> HistoryRead:
        return self._history.latest(channel, limit)


class _Broadcast(Broadcast):
    """broadcaster's `Broadcast`, which the Redis reader can hand messages to directly.

    broadcaster passes each message from the backend to a listener task, which puts it
    into each subscriber's queue: a task step per message. `dispatch` does the same
    `put` from inside the reader's read, and hands the message straight to a subscriber
    that takes messages at once (`takers`) when nothing waits in its queue: no task step
    at all. It reads broadcaster's subscriber sets and a subscriber's queue, internals
    that pin broadcaster to 0.3.1 (pyproject.toml).
    """

    def __init__(self, *, backend: RedisBackend) -> None:
        super().__init__(backend=backend)
        #: A subscriber's queue -> what takes its messages at once (see `Taker`).
        self.takers: dict[asyncio.Queue[Event | None], Taker] = {}

    def dispatch(self, event: Event) -> bool:
        """Hand `event` to its channel's subscribers; False if there are none (yet)."""
        queues = self._subscribers.get(event.channel)
        if not queues:
            return False
        takers = self.takers
        for queue in queues:
            # Only with nothing queued before it: a message never overtakes another.
            if takers and queue.empty():
                take = takers.get(queue)
                if take is not None and take(event.message):
                    continue
            queue.put_nowait(event)  # unbounded (broadcaster's): never raises QueueFull
        return True


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether this worker can publish and receive, and why not."""

    ready: bool
    reason: str = ""


class Broker:
    """The worker's connection to the pub/sub backend."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self._redis: RedisBackend | None = None
        self._history: _HistoryStore
        if settings.backend_scheme == "memory":
            self._broadcast = Broadcast(backend=MemoryBackend(settings.broadcast_url))
            self._history = _MemoryStore(self._broadcast, settings)
        else:
            self._redis = RedisBackend(
                settings.broadcast_url,
                prefix=settings.redis_prefix,
                client_name=f"{settings.redis_prefix}{worker_id}",
                timeout=settings.broker_timeout,
                max_connections=settings.redis_max_connections,
                ping_interval=settings.redis_ping_interval,
                ping_timeout=settings.redis_ping_timeout,
                retry_max_delay=settings.redis_retry_max_delay,
                canary_interval=settings.canary_interval,
                canary_timeout=settings.canary_timeout,
            )
            self._history = RedisHistory(
                self._redis.client,
                pipe=self._redis.script_pipe,
                pubsub_key=self._redis.key,
                prefix=settings.redis_prefix,
                size=settings.history_size,
                ttl=settings.history_ttl,
                meta_ttl=settings.history_meta_ttl,
                token_ttl=publish_token_ttl(settings.broker_timeout),
                key_ttl=settings.idempotency_ttl,
            )
            self._broadcast = _Broadcast(backend=self._redis)
            self._redis.dispatch = self._broadcast.dispatch

    @property
    def redis(self) -> RedisBackend | None:
        """The Redis backend, for metrics; None with memory://."""
        return self._redis

    async def __aenter__(self) -> Broker:
        await self._broadcast.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._broadcast.disconnect()

    async def publish(self, channel: str, data: bytes, key: str | None = None) -> str:
        """Publish `data` (JSON) to `channel` as a `message` frame, keep it; return its id.

        `key`, a client's idempotency key: a publish to `channel` with a key used there
        within IDEMPOTENCY_TTL publishes nothing and returns the first id, as `Replayed`.
        Raises `BrokerUnavailable` when nothing was published, and its subclass
        `OutcomeUnknown` when Redis may have published it (retry with a key then).
        """
        return await self._history.publish(channel, data, key)

    def publish_now(
        self, channel: str, data: bytes, done: Published, key: str | None = None
    ) -> None:
        """`publish` from synchronous code: `done` gets the id, or what `publish` raises.

        `done` is called later, never from inside this call; with Redis, from inside the
        read of the script's reply when the publish connection is up.
        """
        self._history.publish_now(channel, data, done, key)

    async def history_after(
        self, channel: str, since: Position | None, limit: int | None = None
    ) -> HistoryRead:
        """The channel's messages after `since` (all kept, or the first `limit`)."""
        return await self._history.after(channel, since, limit)

    async def history_latest(self, channel: str, limit: int) -> HistoryRead:
        """The channel's last `limit` messages, oldest first (0: just its position)."""
        return await self._history.latest(channel, limit)

    async def publish_event(self, channel: str, frame: str) -> None:
        """Publish a ready frame that carries no id (join/leave)."""
        await self._broadcast.publish(channel, frame)

    @asynccontextmanager
    async def subscribe(
        self, channel: str, take: Taker | None = None
    ) -> AsyncIterator[Subscription]:
        """Subscribe to `channel` until the block exits; Redis has confirmed it on entry.

        With `take`, a message that arrives while nothing waits in the subscription's
        queue is offered to it first, from inside the Redis read (Redis only); what it
        refuses is queued.
        """
        async with self._broadcast.subscribe(channel) as subscriber:
            if self._redis is not None:
                await self._redis.wait_subscribed(channel)
            broadcast = self._broadcast
            if take is None or not isinstance(broadcast, _Broadcast):
                yield subscriber
                return
            queue = subscriber._queue  # broadcaster 0.3.1's Subscriber
            broadcast.takers[queue] = take
            try:
                yield subscriber
            finally:
                del broadcast.takers[queue]

    async def wait_live(self, channel: str) -> None:
        """Wait until this worker's subscription to `channel` is confirmed (normally at once).

        Raises `BrokerUnavailable` if Redis does not confirm it in time (an outage).
        """
        if self._redis is not None:
            await self._redis.wait_subscribed(channel)

    async def readiness(self) -> Readiness:
        """Ready when Redis answers and every subscription of this worker is confirmed."""
        if self._redis is None:
            return Readiness(True)
        # The reader's own state first: it answers at once, even while Redis is frozen.
        if not self._redis.subscriptions_alive():
            return Readiness(False, self._redis.problem())
        try:
            async with asyncio.timeout(_READINESS_PING_TIMEOUT):
                await self._redis.ping()
        except TimeoutError:
            return Readiness(False, "Redis did not answer PING in time")
        except BrokerUnavailable as exc:
            return Readiness(False, exc.message)
        return Readiness(True)
