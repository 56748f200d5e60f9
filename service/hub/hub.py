"""The life of each channel's subscription: one per channel per worker, under a lock.

The first member's join subscribes the worker, under the channel's lock, so that
concurrent first joins make one subscription; the subscription is dropped `linger`
seconds after the last member left, unless someone joined again meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from contextlib import AsyncExitStack
from functools import partial

from service.broker import Broker, Position
from service.errors import BrokerUnavailable
from service.hub.fanout import Channel, FanOuts, Member
from service.hub.resume import HistoryStats, Joined, StandIn, catch_up, finish_resume

logger = logging.getLogger(__name__)


class Hub:
    """Routes each channel's messages from its one broker subscription to local members."""

    def __init__(
        self,
        broker: Broker,
        *,
        linger: float,
        catchup_frames: int = 1000,
        catchup_chars: int = 1 << 20,
        fanout_chunk: int = 1000,
        on_fanout: Callable[[int], None] | None = None,
    ) -> None:
        self._broker = broker
        self._linger = linger
        self._fanout_chunk = fanout_chunk
        # Bounds of the live messages kept for a member while it resumes.
        self._stand_in = (catchup_frames, catchup_chars)
        self._on_fanout = on_fanout
        self._channels: dict[str, Channel] = {}
        #: Channels delivering a message in chunks now (`busy`).
        self.fanouts = FanOuts()
        #: What the history reads achieved (metrics).
        self.stats = HistoryStats()
        self._catch_up = partial(catch_up, broker, self.stats)

    @property
    def channel_count(self) -> int:
        """Channels this worker holds a broker subscription for (or is making one)."""
        return len(self._channels)

    def member_count(self, name: str) -> int:
        """Local members of channel `name`."""
        channel = self._channels.get(name)
        return 0 if channel is None else len(channel.members) + len(channel.pending)

    async def join(
        self,
        name: str,
        member: Member,
        since: str | None = None,
        on_joined: Callable[[Joined], None] | None = None,
    ) -> Joined:
        """Add `member` to channel `name`, subscribing the worker first if needed.

        Returns once the worker's subscription is confirmed by Redis, so that a member is
        never told it is subscribed while the worker is deaf to the channel. Raises
        `BrokerUnavailable` when that does not happen in time; the member is then not added.
        With `since`, the member first gets what it missed (see `Joined`). `on_joined` is
        called just before the member's first frame can be queued (the place for a reply).
        """
        resume_from = None if since is None else Position.parse(since)
        channel = await self._subscribed(name)
        # From here on nothing awaits until the member (or its stand-in) is in.
        start = channel.position
        start_id = None if start is None else str(start)
        if resume_from is None:
            # Nothing to resume from: a plain join (which cannot recover an unknown id).
            joined = Joined(start_id, None if since is None else False)
            if since is not None:
                self.stats.resumes_not_recovered += 1
            if on_joined is not None:
                on_joined(joined)
            channel.members.add(member)
            return joined
        # Live messages first, kept by a stand-in; then history; then both.
        stand_in = StandIn(*self._stand_in)
        channel.recorders.append(stand_in)
        try:
            read = await self._broker.history_after(name, resume_from)
        except BaseException:
            channel.recorders.remove(stand_in)
            self._linger_if_idle(channel)
            raise
        channel.recorders.remove(stand_in)
        if self._channels.get(name) is not channel:
            raise BrokerUnavailable("the worker is shutting down: reconnect to another one")
        return finish_resume(
            channel, member, resume_from, start, stand_in, read, self.stats, on_joined
        )

    def leave(self, name: str, member: Member) -> None:
        """Remove `member` from channel `name`; never waits."""
        channel = self._channels.get(name)
        if channel is None:
            return
        channel.members.discard(member)
        channel.pending.pop(member, None)
        self._linger_if_idle(channel)

    async def close(self) -> None:
        """Drop every subscription (worker shutdown)."""
        for channel in list(self._channels.values()):
            if channel.drop_task is not None:
                channel.drop_task.cancel()
            # Under the lock, so that a join in the middle of opening it finishes first.
            async with channel.lock:
                self._forget(channel)
                await self._unsubscribe(channel)

    async def _subscribed(self, name: str) -> Channel:
        """Channel `name`, subscribed and confirmed, with no drop pending.

        The caller must add a member or a stand-in before it next awaits.
        """
        while True:
            channel = self._channels.get(name)
            if channel is None:
                channel = self._channels[name] = Channel(
                    name,
                    chunk=self._fanout_chunk,
                    catch_up=self._catch_up,
                    on_fanout=self._on_fanout,
                    fanouts=self.fanouts,
                )
            elif channel.stack is not None:
                # Already subscribed: instant, unless Redis is being reconnected to.
                await self._broker.wait_live(name)
            async with channel.lock:
                if channel.failure is not None:
                    raise BrokerUnavailable(channel.failure)
                if self._channels.get(name) is not channel:
                    continue  # dropped while we waited for the lock: use its successor
                if channel.stack is None:
                    try:
                        await self._subscribe(channel)
                    except BrokerUnavailable as exc:
                        channel.failure = exc.message
                        self._forget(channel)
                        raise
                    except BaseException:
                        if channel.idle:
                            self._forget(channel)
                        raise
                if channel.drop_task is not None:
                    channel.drop_task.cancel()
                    channel.drop_task = None
                return channel

    async def _subscribe(self, channel: Channel) -> None:
        stack = AsyncExitStack()
        await stack.enter_async_context(self._broker.subscribe(channel.name, channel))
        try:
            # Read after the subscription is confirmed: every later message arrives live.
            latest = (await self._broker.history_latest(channel.name, 0)).position
        except BaseException:
            await stack.aclose()
            raise
        last = channel.position
        if last is None or not last.covers(latest):
            # Unless a live message that came during the read is further on already.
            channel.position = latest
        channel.stack = stack

    async def _unsubscribe(self, channel: Channel) -> None:
        # The broker first: nothing may start the channel's backlog again once stopped.
        if channel.stack is not None:
            stack, channel.stack = channel.stack, None
            try:
                await stack.aclose()
            except Exception:
                logger.exception("unsubscribing from %r failed", channel.name)
        drainer = channel.stop()
        if drainer is not None:
            await asyncio.gather(drainer, return_exceptions=True)

    def _linger_if_idle(self, channel: Channel) -> None:
        if (
            channel.idle
            and channel.stack is not None
            and channel.drop_task is None
            and self._channels.get(channel.name) is channel
        ):
            channel.drop_task = asyncio.create_task(self._drop_later(channel))

    def _forget(self, channel: Channel) -> None:
        if self._channels.get(channel.name) is channel:
            del self._channels[channel.name]

    async def _drop_later(self, channel: Channel) -> None:
        await asyncio.sleep(self._linger)
        async with channel.lock:
            channel.drop_task = None
            if not channel.idle or self._channels.get(channel.name) is not channel:
                return
            self._forget(channel)
            await self._unsubscribe(channel)
