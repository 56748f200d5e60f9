"""`Broker`: publish and subscribe through broadcaster, whichever backend is configured.

broadcaster stays the pub/sub seam: every subscription goes through
`Broadcast.subscribe`, backed by our `RedisBackend` for redis:// and rediss:// and by
broadcaster's own `MemoryBackend` for memory://. Publishing a message also needs the id
the backend assigned, which `Broadcast.publish` does not return, so that one call goes
to the backend directly (or to a local counter for memory://).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from broadcaster import Broadcast
from broadcaster._backends.memory import MemoryBackend
from broadcaster._base import Subscriber, Unsubscribed

from service.broker.redis_backend import RedisBackend
from service.errors import BrokerUnavailable
from service.protocol.frames import message_parts
from service.settings import Settings

__all__ = ["Broker", "Readiness", "Subscription", "Unsubscribed"]

_READINESS_PING_TIMEOUT = 2.0

Subscription = Subscriber


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether this worker can publish and receive, and why not."""

    ready: bool
    reason: str = ""


class Broker:
    """The worker's connection to the pub/sub backend."""

    def __init__(self, settings: Settings, worker_id: str) -> None:
        self._redis: RedisBackend | None = None
        if settings.backend_scheme == "memory":
            self._broadcast = Broadcast(backend=MemoryBackend(settings.broadcast_url))
        else:
            self._redis = RedisBackend(
                settings.broadcast_url,
                prefix=settings.redis_prefix,
                client_name=f"{settings.redis_prefix}{worker_id}",
                timeout=settings.broker_timeout,
                ping_interval=settings.redis_ping_interval,
                ping_timeout=settings.redis_ping_timeout,
                retry_max_delay=settings.redis_retry_max_delay,
                canary_interval=settings.canary_interval,
                canary_timeout=settings.canary_timeout,
            )
            self._broadcast = Broadcast(backend=self._redis)
        # memory:// only: one process, so a local counter per channel gives the ids.
        self._counters: dict[str, itertools.count[int]] = {}

    @property
    def redis(self) -> RedisBackend | None:
        """The Redis backend, for metrics; None with memory://."""
        return self._redis

    async def __aenter__(self) -> Broker:
        await self._broadcast.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._broadcast.disconnect()

    async def publish(self, channel: str, data: bytes) -> str:
        """Publish `data` (JSON) to `channel` as a `message` frame; return its id."""
        head, tail = message_parts(channel, data)
        if self._redis is not None:
            return await self._redis.publish_message(channel, head, tail)
        counter = self._counters.setdefault(channel, itertools.count(1))
        message_id = str(next(counter))
        await self._broadcast.publish(channel, (head + message_id.encode() + tail).decode())
        return message_id

    async def publish_event(self, channel: str, frame: str) -> None:
        """Publish a ready frame that carries no id (join/leave)."""
        await self._broadcast.publish(channel, frame)

    @asynccontextmanager
    async def subscribe(self, channel: str) -> AsyncIterator[Subscription]:
        """Subscribe to `channel` until the block exits; Redis has confirmed it on entry."""
        async with self._broadcast.subscribe(channel) as subscriber:
            if self._redis is not None:
                await self._redis.wait_subscribed(channel)
            yield subscriber

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
