"""Per worker: channel -> local members, with exactly one broker subscription per channel.

The subscription is made under a per-channel lock by the first member, and dropped
`linger` seconds after the last one left. Each channel has one pump task that reads
the broker subscription and hands the SAME frame to every member with a synchronous
`deliver` call: the fan-out never awaits a client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Protocol

from service.broker import Broker, Subscription, Unsubscribed
from service.errors import BrokerUnavailable

logger = logging.getLogger(__name__)


class Member(Protocol):
    """What the hub needs of a connection."""

    def deliver(self, frame: str) -> None:
        """Queue `frame` for the client without waiting."""


class _Channel:
    __slots__ = ("drop_task", "failure", "lock", "members", "name", "pump", "stack")

    def __init__(self, name: str) -> None:
        self.name = name
        # Set when opening the subscription failed: everyone who queued up behind that
        # attempt fails with it at once instead of each waiting a full timeout in turn.
        self.failure: str | None = None
        self.members: set[Member] = set()
        self.lock = asyncio.Lock()
        self.stack: AsyncExitStack | None = None
        self.pump: asyncio.Task[None] | None = None
        self.drop_task: asyncio.Task[None] | None = None


class Hub:
    """Routes each channel's messages from its one broker subscription to local members."""

    def __init__(
        self,
        broker: Broker,
        *,
        linger: float,
        on_fanout: Callable[[int], None] | None = None,
    ) -> None:
        self._broker = broker
        self._linger = linger
        self._on_fanout = on_fanout
        self._channels: dict[str, _Channel] = {}

    @property
    def channel_count(self) -> int:
        """Channels this worker holds a broker subscription for (or is making one)."""
        return len(self._channels)

    def member_count(self, name: str) -> int:
        """Local members of channel `name`."""
        channel = self._channels.get(name)
        return 0 if channel is None else len(channel.members)

    async def join(self, name: str, member: Member) -> None:
        """Add `member` to channel `name`, subscribing the worker first if needed.

        Returns once the worker's subscription is confirmed by Redis, so that a member is
        never told it is subscribed while the worker is deaf to the channel. Raises
        `BrokerUnavailable` when that does not happen in time; the member is then not added.
        """
        while True:
            channel = self._channels.get(name)
            if channel is None:
                channel = self._channels[name] = _Channel(name)
            elif channel.pump is not None:
                # Already subscribed: instant, unless Redis is being reconnected to.
                await self._broker.wait_live(name)
            async with channel.lock:
                if channel.failure is not None:
                    raise BrokerUnavailable(channel.failure)
                if self._channels.get(name) is not channel:
                    continue  # dropped while we waited for the lock: use its successor
                if channel.pump is None:
                    try:
                        await self._open(channel)
                    except BrokerUnavailable as exc:
                        channel.failure = exc.message
                        self._forget(channel)
                        raise
                    except BaseException:
                        if not channel.members:
                            self._forget(channel)
                        raise
                if channel.drop_task is not None:
                    channel.drop_task.cancel()
                    channel.drop_task = None
                channel.members.add(member)
                return

    def leave(self, name: str, member: Member) -> None:
        """Remove `member` from channel `name`; never waits."""
        channel = self._channels.get(name)
        if channel is None:
            return
        channel.members.discard(member)
        if not channel.members and channel.pump is not None and channel.drop_task is None:
            channel.drop_task = asyncio.create_task(self._drop_later(channel))

    async def close(self) -> None:
        """Drop every subscription (worker shutdown)."""
        for channel in list(self._channels.values()):
            if channel.drop_task is not None:
                channel.drop_task.cancel()
            # Under the lock, so that a join in the middle of opening it finishes first.
            async with channel.lock:
                self._forget(channel)
                await self._close(channel)

    async def _open(self, channel: _Channel) -> None:
        stack = AsyncExitStack()
        subscription = await stack.enter_async_context(self._broker.subscribe(channel.name))
        channel.stack = stack
        channel.pump = asyncio.create_task(
            self._pump(channel, subscription), name=f"pump:{channel.name}"
        )

    async def _close(self, channel: _Channel) -> None:
        if channel.pump is not None:
            channel.pump.cancel()
            await asyncio.gather(channel.pump, return_exceptions=True)
            channel.pump = None
        if channel.stack is not None:
            stack, channel.stack = channel.stack, None
            try:
                await stack.aclose()
            except Exception:
                logger.exception("unsubscribing from %r failed", channel.name)

    def _forget(self, channel: _Channel) -> None:
        if self._channels.get(channel.name) is channel:
            del self._channels[channel.name]

    async def _drop_later(self, channel: _Channel) -> None:
        await asyncio.sleep(self._linger)
        async with channel.lock:
            channel.drop_task = None
            if channel.members or self._channels.get(channel.name) is not channel:
                return
            self._forget(channel)
            await self._close(channel)

    async def _pump(self, channel: _Channel, subscription: Subscription) -> None:
        while True:
            try:
                event = await subscription.get()
            except Unsubscribed:
                return
            frame = event.message
            # A snapshot: delivering may close a slow member, which leaves the channel.
            members = tuple(channel.members)
            for member in members:
                # One broken member must neither stop the fan-out nor end the pump.
                try:
                    member.deliver(frame)
                except Exception:
                    logger.exception("delivery to a member of %r failed", channel.name)
            if self._on_fanout is not None:
                self._on_fanout(len(members))
