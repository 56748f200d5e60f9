"""Per worker: channel -> local members, with exactly one broker subscription per channel.

The subscription is made under a per-channel lock by the first member, and dropped
`linger` seconds after the last one left. Each channel has one pump task that reads
the broker subscription and hands the SAME frame to every member with a synchronous
`deliver` call: the fan-out never awaits a client.

The pump also keeps the channel's position (the last message it delivered). When the
worker's subscription was interrupted, it reads what it missed from history and
delivers that first, skipping the live copies that follow; and a member that resumes
`since` an id joins with a buffer, reads history, and is switched to live delivery in
one synchronous step, so that it sees every message once.

With Redis, a message that finds the pump idle (nothing queued, nothing under way) is
fanned out from inside the broker's read instead, by the same code: no task step per
message. Whatever finds the pump busy waits for it in the subscription's queue.

A channel with more local members than `fanout_chunk` gets each message in chunks,
with a turn of the event loop between them, so that one message to a huge channel does
not hold every other connection of the worker for long. The pump finishes a message
before it takes the next, so order holds; a resume that lands between two chunks is
handed the message in flight if the fan-out had not reached its stand-in yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Protocol

from service.broker import (
    SUBSCRIPTION_INTERRUPTED,
    Broker,
    Position,
    Subscription,
    Unsubscribed,
    position_of,
)
from service.errors import BrokerUnavailable
from service.protocol import frames

logger = logging.getLogger(__name__)


class Member(Protocol):
    """What the hub needs of a connection."""

    def deliver(self, frame: str) -> None:
        """Queue `frame` for the client without waiting."""

    def deliver_backlog(self, frames: Sequence[str]) -> None:
        """Queue a resumed subscription's missed frames, even past the outbox limits.

        They are bounded by the history size (and the hub's catch-up buffer), and a
        client that asked to resume would otherwise be closed as a slow consumer, resume
        again, and never catch up.
        """

    def overwhelmed(self) -> None:
        """More frames came for the client than it may queue: close it as a slow consumer."""


@dataclass(frozen=True, slots=True)
class Joined:
    """How a member joined: `position` is the id after which its messages start.

    `recovered` is None without `since`, else whether every message after `since`
    follows. `position` is None only while the worker does not know it.
    """

    position: str | None
    recovered: bool | None = None


class _Catchup:
    """Stands in for a resuming member while its history is read: buffers live frames."""

    def __init__(self, max_frames: int, max_chars: int) -> None:
        self.frames: list[str] = []
        self.overflowed = False
        self._frames_left = max_frames
        self._chars_left = max_chars

    def deliver(self, frame: str) -> None:
        self._frames_left -= 1
        self._chars_left -= len(frame)
        if self._frames_left < 0 or self._chars_left < 0:
            self.overflowed = True  # the member could not take this many either
            return
        self.frames.append(frame)

    def deliver_backlog(self, frames: Sequence[str]) -> None:
        for frame in frames:
            self.deliver(frame)

    def overwhelmed(self) -> None:
        self.overflowed = True


@dataclass(slots=True)
class _FanOut:
    """A message being delivered in chunks: `members[served:]` have not had it yet."""

    frame: str
    members: tuple[Member, ...]
    served: int = 0


class _Channel:
    __slots__ = (
        "drop_task",
        "failure",
        "fanout",
        "head",
        "lock",
        "members",
        "name",
        "pending",
        "position",
        "pump",
        "pumping",
        "stack",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        self.head = frames.message_head(name)
        # The last message the pump delivered (or, before any, where the subscription
        # started); None when unknown after a failed catch-up.
        self.position: Position | None = None
        # Set when opening the subscription failed: everyone who queued up behind that
        # attempt fails with it at once instead of each waiting a full timeout in turn.
        self.failure: str | None = None
        self.members: set[Member] = set()
        # Resumed members whose history reached further than the pump has got yet: each
        # skips the live copies up to its horizon, then becomes a plain member.
        self.pending: dict[Member, _Horizon] = {}
        self.lock = asyncio.Lock()
        self.stack: AsyncExitStack | None = None
        self.pump: asyncio.Task[None] | None = None
        # True while the pump handles a message (between `get` and the next `get`): a
        # message may then not be fanned out from the broker's read.
        self.pumping = False
        self.drop_task: asyncio.Task[None] | None = None
        # The fan-out under way while it is split over several turns of the event loop.
        self.fanout: _FanOut | None = None


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
        # Bounds of the buffer of live frames held for a member while it resumes.
        self._catchup = (catchup_frames, catchup_chars)
        self._on_fanout = on_fanout
        self._channels: dict[str, _Channel] = {}
        # Interruptions of the worker's subscription that history covered, and those it
        # did not (each sent the channel's members a `gap` frame).
        self.gaps_filled = 0
        self.gaps_reported = 0
        # Members that resumed with `since`, by whether history reached back.
        self.resumes_recovered = 0
        self.resumes_not_recovered = 0

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
        if resume_from is None:
            # Nothing to resume from: a plain join (which cannot recover an unknown id).
            recovered = None if since is None else False
            _, joined = await self._add(name, member, recovered, on_joined)
            if since is not None:
                self.resumes_not_recovered += 1
            return joined
        return await self._resume(name, member, resume_from, on_joined)

    async def _add(
        self,
        name: str,
        member: Member,
        recovered: bool | None,
        on_joined: Callable[[Joined], None] | None,
    ) -> tuple[_Channel, Joined]:
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
                position = None if channel.position is None else str(channel.position)
                joined = Joined(position, recovered)
                if on_joined is not None:
                    on_joined(joined)
                channel.members.add(member)
                return channel, joined

    async def _resume(
        self,
        name: str,
        member: Member,
        since: Position,
        on_joined: Callable[[Joined], None] | None,
    ) -> Joined:
        # Live first, into a buffer; then history; then both, without duplicates. Every
        # message the history read missed was published after it, so after the live
        # subscription was confirmed: it is in the buffer or still to come.
        catchup = _Catchup(*self._catchup)
        channel, start = await self._add(name, catchup, None, None)
        try:
            read = await self._broker.history_after(name, since)
        except BaseException:
            self.leave(name, catchup)
            raise
        if self._channels.get(name) is not channel:
            raise BrokerUnavailable("the worker is shutting down: reconnect to another one")
        # From here to the end nothing awaits: no frame can slip in between.
        channel.members.discard(catchup)
        fanout = channel.fanout
        if fanout is not None and catchup in fanout.members[fanout.served :]:
            # A chunked fan-out is under way and has not reached the stand-in: the member
            # takes that message from here, or it would get it from nowhere.
            catchup.deliver(fanout.frame)
        if catchup.overflowed:
            # Live frames were dropped while the history was read: the member cannot be
            # served without a hole. Closed as a slow consumer, it resumes again.
            self.resumes_not_recovered += 1
            member.overwhelmed()
            return Joined(start.position, False)
        live = catchup.frames
        horizon: Position | None = None
        if read.complete:
            self.resumes_recovered += 1
            history = read.frames
            horizon = read.position
            # Drop the live copies of what history already gave.
            live = [f for f in live if not _covered(read.position, f, channel.head)]
            joined = Joined(str(since), True)
        else:
            self.resumes_not_recovered += 1
            history = []
            joined = Joined(start.position, False)
        if on_joined is not None:
            on_joined(joined)
        member.deliver_backlog([*history, *live])
        last = channel.position
        if horizon is not None and (last is None or not last.covers(horizon)):
            # The read saw messages the pump has not handed out yet (their pub/sub copies
            # are still on the way): they must not reach this member twice. If the pump
            # is still in an older epoch (it has not caught up with a Redis restart),
            # that epoch's frames are behind the member too.
            stale = last.epoch if last is not None and last.epoch != horizon.epoch else None
            channel.pending[member] = _Horizon(horizon, stale)
        else:
            channel.members.add(member)
        return joined

    def leave(self, name: str, member: Member) -> None:
        """Remove `member` from channel `name`; never waits."""
        channel = self._channels.get(name)
        if channel is None:
            return
        channel.members.discard(member)
        channel.pending.pop(member, None)
        if (
            not channel.members
            and not channel.pending
            and channel.pump is not None
            and channel.drop_task is None
        ):
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
        subscription = await stack.enter_async_context(
            self._broker.subscribe(channel.name, partial(self._take, channel))
        )
        try:
            # Read after the subscription is confirmed: every later message arrives live.
            channel.position = (await self._broker.history_latest(channel.name, 0)).position
        except BaseException:
            await stack.aclose()
            raise
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
            if (
                channel.members
                or channel.pending
                or self._channels.get(channel.name) is not channel
            ):
                return
            self._forget(channel)
            await self._close(channel)

    async def _pump(self, channel: _Channel, subscription: Subscription) -> None:
        while True:
            try:
                event = await subscription.get()
            except Unsubscribed:
                return
            channel.pumping = True
            try:
                frame = event.message
                if frame == SUBSCRIPTION_INTERRUPTED:
                    for missed in await self._catch_up(channel):
                        await self._forward(channel, missed)
                else:
                    await self._forward(channel, frame)
            finally:
                channel.pumping = False

    def _take(self, channel: _Channel, frame: str) -> bool:
        """Fan `frame` out now, from inside the broker's read, if the pump is idle.

        False leaves it to the pump: while it handles a message (a catch-up, a fan-out in
        chunks), before it runs, for a channel too big for one chunk, and for the news
        of an interrupted subscription (the pump reads history for it).
        """
        if (
            frame == SUBSCRIPTION_INTERRUPTED
            or channel.pumping
            or channel.pump is None
            or len(channel.members) + len(channel.pending) > self._fanout_chunk
        ):
            return False
        try:
            in_history = self._advance(channel, frame)
            if in_history is not None:
                self._deliver(channel, frame, self._audience(channel, in_history))
        except Exception:
            # Raised into the broker's read, it would end every channel's subscription.
            logger.exception("fanning out a message of %r failed", channel.name)
        return True

    async def _forward(self, channel: _Channel, frame: str) -> None:
        in_history = self._advance(channel, frame)
        if in_history is not None:
            await self._fan_out(channel, frame, in_history=in_history)

    def _advance(self, channel: _Channel, frame: str) -> bool | None:
        """Move the channel's position to `frame`'s: is it in history? None: skip it."""
        position = position_of(frame, channel.head)
        if position is None:
            return False  # join, leave, gap: not in history
        last = channel.position
        if last is not None and last.covers(position):
            return None  # already delivered from history by a catch-up
        channel.position = position
        if channel.pending:
            self._promote(channel, position)
        return True

    def _promote(self, channel: _Channel, position: Position) -> None:
        """Make plain members of the resumed members for whom `position` is new."""
        for member, horizon in list(channel.pending.items()):
            if horizon.is_past(position):
                del channel.pending[member]
                channel.members.add(member)

    def _audience(self, channel: _Channel, in_history: bool) -> tuple[Member, ...]:
        """Who gets a message: a snapshot, as delivering may close a member (it leaves).

        Resumed members still waiting for the pump to pass their horizon get only the
        frames that are not in history (join, leave, gap).
        """
        members = tuple(channel.members)
        if channel.pending and not in_history:
            members += tuple(channel.pending)
        return members

    async def _fan_out(self, channel: _Channel, frame: str, *, in_history: bool) -> None:
        members = self._audience(channel, in_history)
        chunk = self._fanout_chunk
        if len(members) <= chunk:
            self._deliver(channel, frame, members)
        else:
            fanout = channel.fanout = _FanOut(frame, members)
            try:
                for start in range(0, len(members), chunk):
                    if start:
                        await asyncio.sleep(0)  # let the worker's other connections run
                    self._deliver(channel, frame, members[start : start + chunk])
                    fanout.served = start + chunk
            finally:
                channel.fanout = None

    def _deliver(self, channel: _Channel, frame: str, members: Sequence[Member]) -> None:
        for member in members:
            # One broken member must neither stop the fan-out nor end the pump.
            try:
                member.deliver(frame)
            except Exception:
                logger.exception("delivery to a member of %r failed", channel.name)
        if self._on_fanout is not None:
            self._on_fanout(len(members))  # per chunk: the counts add up

    async def _catch_up(self, channel: _Channel) -> Sequence[str]:
        """What the channel missed while the subscription was interrupted, from history.

        Live messages keep queueing behind this read; as the returned frames go out, the
        channel's position moves past them and the pump skips their live copies.
        """
        try:
            read = await self._broker.history_after(channel.name, channel.position)
        except BrokerUnavailable as exc:
            logger.warning("history of %r unreadable after an interruption: %s", channel.name, exc)
            self.gaps_reported += 1
            channel.position = None  # whatever comes next is new to the members
            return [frames.gap(channel.name)]
        if read.complete:
            self.gaps_filled += 1
            return read.frames
        self.gaps_reported += 1
        logger.info("history of %r does not cover an interruption: sending a gap", channel.name)
        last = channel.position
        if last is not None and not read.position.covers(last):
            # A new epoch (Redis lost its data), or the same one set back (Redis came
            # back from an older snapshot and gives out ids again): nothing to skip.
            channel.position = None
        # Whatever part of it history still has (it was trimmed) follows the notice.
        return [frames.gap(channel.name), *read.frames]


@dataclass(frozen=True, slots=True)
class _Horizon:
    """How far a pending member's history went, and the epoch it left behind (if any)."""

    last: Position
    stale_epoch: str | None

    def is_past(self, position: Position) -> bool:
        """True if the message at `position` is one the member has not had."""
        if position.epoch == self.last.epoch:
            return position.seq > self.last.seq
        # Another epoch: the old one the pump is still in, or one newer than both.
        return position.epoch != self.stale_epoch


def _covered(horizon: Position, frame: str, head: str) -> bool:
    position = position_of(frame, head)
    return position is not None and horizon.covers(position)
