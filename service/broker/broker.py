"""`Broker`: publish, subscribe and read history, whichever backend is configured.

broadcaster stays the pub/sub seam, through its public names only: every subscription
goes through `Broadcast.subscribe`, backed by our `RedisBackend` for redis:// and
rediss:// and by broadcaster's own memory backend for memory://. Each channel's
messages go to one `ChannelSink` with their position: with Redis straight from the read
of the pub/sub connection (broadcaster's listener would add a task step and a queue per
message), with memory:// from broadcaster's subscriber.

Publishing a message also numbers it and keeps it in the channel's history, which
`Broadcast.publish` cannot do, so that call goes to the history store (`RedisHistory`,
or `MemoryHistory` for memory://).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Protocol, cast

from broadcaster import Broadcast, Event

from service.broker.history import HistoryRead, MemoryHistory, Position, Replayed, position_of
from service.broker.redis_backend import RedisBackend
from service.broker.redis_history import Published, RedisHistory, publish_token_ttl
from service.broker.redis_pipe import settle
from service.broker.sink import ChannelSink
from service.errors import BrokerUnavailable
from service.protocol.frames import message_head
from service.settings import Settings

__all__ = [
    "Broker",
    "ChannelSink",
    "HistoryRead",
    "Position",
    "Readiness",
    "Replayed",
]

_READINESS_PING_TIMEOUT = 2.0


class _HistoryStore(Protocol):
    def publish_now(
        self, channel: str, data: bytes, done: Published, key: str | None = None
    ) -> None: ...

    async def after(
        self, channel: str, since: Position | None, limit: int | None
    ) -> HistoryRead: ...

    async def latest(self, channel: str, limit: int) -> HistoryRead: ...


class _MemoryStore:
    """memory://: history in this process, messages through broadcaster's memory backend."""

    def __init__(self, broadcast: Broadcast, settings: Settings) -> None:
        self._broadcast = broadcast
        self._history = MemoryHistory(
            size=settings.history_size,
            ttl=settings.history_ttl,
            meta_ttl=settings.history_meta_ttl,
            key_ttl=settings.idempotency_ttl,
        )
        self._tasks: set[asyncio.Task[None]] = set()

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
            message_id, frame = self._history.publish(channel, data, key)
            if frame is not None:  # None: a replay under `key`, published before
                await self._broadcast.publish(channel, frame)
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
            self._broadcast = Broadcast(settings.broadcast_url)
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
                fast=settings.fast_adapters,
            )
            self._history = RedisHistory(
                self._redis.client,
                pipe=self._redis.script_pipe,
                pubsub_key=self._redis.key,
                publish_command=self._redis.publish_command,
                prefix=settings.redis_prefix,
                size=settings.history_size,
                ttl=settings.history_ttl,
                meta_ttl=settings.history_meta_ttl,
                token_ttl=publish_token_ttl(settings.broker_timeout),
                key_ttl=settings.idempotency_ttl,
            )
            self._broadcast = Broadcast(backend=self._redis)

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
        # `publish_now`, waited for: one way to publish.
        done: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._history.publish_now(channel, data, partial(settle, done), key)
        return await done

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

    async def history(self, channel: str, limit: int, since: str | None) -> HistoryRead:
        """What a reader asked for: the last `limit` messages, or the first after `since`.

        `since` is a message id as clients hold it; one this service did not make reads
        everything kept, not recovered.
        """
        if since is None:
            return await self.history_latest(channel, limit)
        return await self.history_after(channel, Position.parse(since), limit)

    async def history_latest(self, channel: str, limit: int) -> HistoryRead:
        """The channel's last `limit` messages, oldest first (0: just its position)."""
        return await self._history.latest(channel, limit)

    async def publish_event(self, channel: str, frame: str) -> None:
        """Publish a ready frame that carries no id (join/leave)."""
        await self._broadcast.publish(channel, frame)

    @asynccontextmanager
    async def subscribe(self, channel: str, sink: ChannelSink) -> AsyncIterator[None]:
        """Hand `channel`'s messages to `sink` until the block exits.

        Redis has confirmed the subscription on entry. With Redis, `sink` is called from
        inside the read of the pub/sub connection, which serves every channel of the
        worker: it must not raise, nor wait.
        """
        redis = self._redis
        if redis is not None:
            # Before SUBSCRIBE goes out: the first message may follow its confirmation
            # in the same read.
            redis.attach(channel, sink)
            try:
                async with self._broadcast.subscribe(channel):
                    await redis.wait_subscribed(channel)
                    yield
            finally:
                redis.detach(channel, sink)
            return
        async with self._broadcast.subscribe(channel) as subscriber:
            # broadcaster 0.3.1 annotates its `__aiter__` as maybe returning None.
            events = cast("AsyncIterable[Event | None]", subscriber)
            reader = asyncio.create_task(_relay(events, channel, sink))
            try:
                yield
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)

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


async def _relay(subscriber: AsyncIterable[Event | None], channel: str, sink: ChannelSink) -> None:
    """memory://: broadcaster's subscriber's messages to `sink`, as the Redis read does."""
    head = message_head(channel)
    async for event in subscriber:
        if event is not None:
            frame = event.message
            sink.message(position_of(frame, head), frame)
