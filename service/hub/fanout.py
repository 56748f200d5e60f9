"""A channel's local members, and the fan-out of each of its messages to them.

The broker hands a channel its messages one at a time, with their positions, from
inside its read (`Channel.message`): the channel hands the SAME frame to every member
with a synchronous `deliver`, at once, and never awaits a client. Messages wait in the
channel's backlog only while something must: a fan-out to more members than one chunk
(a turn of the event loop between chunks, so one message to a huge channel does not
hold every other connection of the worker), or a catch-up from history after the
worker's subscription was interrupted. A task made for the occasion works the backlog
off in order, and the channel is live again once it is empty.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Protocol

from service.broker import Position

logger = logging.getLogger(__name__)

#: A message as the channel takes it: its position in history (None: not kept there,
#: as join, leave and gap frames) and its frame.
Message = tuple[Position | None, str]


class Member(Protocol):
    """What the hub needs of a connection."""

    def deliver(self, frame: str) -> None:
        """Queue `frame` for the client without waiting."""

    def deliver_backlog(self, frames: Sequence[str]) -> None:
        """Queue a resumed subscription's missed frames, even past the outbox limits."""

    def overwhelmed(self) -> None:
        """More frames came for the client than it may queue: close it as a slow consumer."""


class Recorder(Protocol):
    """Keeps every message the channel fans out (a member's stand-in while it resumes)."""

    def record(self, position: Position | None, frame: str) -> None:
        """Keep one message."""


#: In the backlog where the worker's subscription was interrupted.
_INTERRUPTED = None


class FanOuts:
    """How many of a worker's channels are delivering a message in chunks right now.

    Work that can wait (the keepalive's pings) waits while one is: a message to more
    members than a chunk takes the worker's turns until it reached them all.
    """

    __slots__ = ("under_way",)

    def __init__(self) -> None:
        self.under_way = 0

    def busy(self) -> bool:
        """True while a fan-out is being delivered in chunks."""
        return self.under_way > 0


@dataclass(slots=True)
class _FanOut:
    """A message being delivered in chunks: `members[served:]` have not had it yet."""

    frame: str
    members: tuple[Member, ...]
    served: int


@dataclass(frozen=True, slots=True)
class Horizon:
    """How far a pending member's history went, and the epoch it left behind (if any)."""

    last: Position
    stale_epoch: str | None

    def is_past(self, position: Position) -> bool:
        """True if the message at `position` is one the member has not had."""
        if position.epoch == self.last.epoch:
            return position.seq > self.last.seq
        # Another epoch: the old one the channel is still in, or one newer than both.
        return position.epoch != self.stale_epoch


class Channel:
    """One channel of the worker: its members, its position and its flow of messages."""

    __slots__ = (
        "_backlog",
        "_catch_up",
        "_chunk",
        "_drainer",
        "_fanout",
        "_fanouts",
        "_on_fanout",
        "drop_task",
        "failure",
        "lock",
        "members",
        "name",
        "pending",
        "position",
        "recorders",
        "stack",
    )

    def __init__(
        self,
        name: str,
        *,
        chunk: int,
        catch_up: Callable[[Channel], Awaitable[Sequence[Message]]],
        on_fanout: Callable[[int], None] | None,
        fanouts: FanOuts,
    ) -> None:
        self.name = name
        self._chunk = chunk
        # Reads what the worker missed after an interruption (`resume.catch_up`).
        self._catch_up = catch_up
        self._on_fanout = on_fanout
        # Counts this channel's chunked fan-out while there is one (`_set_fanout`).
        self._fanouts = fanouts
        self.members: set[Member] = set()
        # Resumed members whose history reached further than the channel has got yet:
        # each skips the messages up to its horizon, then becomes a plain member.
        self.pending: dict[Member, Horizon] = {}
        # Stand-ins of members whose history is being read: they keep what goes out.
        self.recorders: list[Recorder] = []
        # The last message fanned out (or, before any, where the subscription started);
        # None when unknown after a failed catch-up.
        self.position: Position | None = None
        self._backlog: deque[Message | None] | None = None
        self._drainer: asyncio.Task[None] | None = None
        # The fan-out under way while it is split over several turns of the event loop.
        self._fanout: _FanOut | None = None
        # The subscription's life (service.hub.hub): its lock, its broker subscription
        # (None: not subscribed), why opening it failed, the drop after the linger.
        self.lock = asyncio.Lock()
        self.stack: AsyncExitStack | None = None
        self.failure: str | None = None
        self.drop_task: asyncio.Task[None] | None = None

    @property
    def idle(self) -> bool:
        """True when nobody of this worker listens to the channel."""
        return not self.members and not self.pending and not self.recorders

    # -- from the broker (`ChannelSink`) ---------------------------------------------

    def message(self, position: Position | None, frame: str) -> None:
        """Fan a message out now, or queue it behind what is under way."""
        if self._backlog is not None:
            self._backlog.append((position, frame))
            return
        try:
            self._forward(position, frame)
        except Exception:
            # Raised into the broker's read, it would end every channel's subscription.
            logger.exception("fanning out a message of %r failed", self.name)

    def interrupted(self) -> None:
        """Messages may have been missed here: read them from history before going on."""
        self._fall_behind().append(_INTERRUPTED)

    def stop(self) -> asyncio.Task[None] | None:
        """Stop working the backlog off (the subscription ends); the task to await."""
        drainer, self._drainer, self._backlog = self._drainer, None, None
        self._set_fanout(None)
        if drainer is not None:
            drainer.cancel()
        return drainer

    # -- the fan-out ----------------------------------------------------------------

    def _forward(self, position: Position | None, frame: str) -> None:
        if position is not None:
            last = self.position
            if last is not None and last.covers(position):
                return  # already delivered from history by a catch-up
            self.position = position
            if self.pending:
                self._promote(position)
        for recorder in self.recorders:
            recorder.record(position, frame)
        members = tuple(self.members)  # a snapshot: delivering may close a member
        if self.pending and position is None:
            # Pending members have their history; what is not in history is news to them.
            members += tuple(self.pending)
        chunk = self._chunk
        if len(members) <= chunk:
            self._deliver(frame, members)
            return
        self._deliver(frame, members[:chunk])
        self._set_fanout(_FanOut(frame, members, chunk))
        self._fall_behind()

    def _set_fanout(self, fanout: _FanOut | None) -> None:
        """The chunked fan-out under way (None: none), counted in `fanouts` while it is."""
        if (fanout is None) != (self._fanout is None):
            self._fanouts.under_way += -1 if fanout is None else 1
        self._fanout = fanout

    def _promote(self, position: Position) -> None:
        """Make plain members of the resumed members for whom `position` is new."""
        for member, horizon in list(self.pending.items()):
            if horizon.is_past(position):
                del self.pending[member]
                self.members.add(member)

    def _deliver(self, frame: str, members: Sequence[Member]) -> None:
        for member in members:
            # One broken member must neither stop the fan-out nor the channel.
            try:
                member.deliver(frame)
            except Exception:
                logger.exception("delivery to a member of %r failed", self.name)
        if self._on_fanout is not None:
            self._on_fanout(len(members))  # per chunk: the counts add up

    # -- the backlog ----------------------------------------------------------------

    def _fall_behind(self) -> deque[Message | None]:
        """The backlog, made (with the task that works it off) if the channel was live."""
        backlog = self._backlog
        if backlog is None:
            backlog = self._backlog = deque()
            self._drainer = asyncio.create_task(self._drain(), name=f"backlog:{self.name}")
        return backlog

    async def _drain(self) -> None:
        backlog = self._backlog
        assert backlog is not None
        try:
            while True:
                fanout = self._fanout
                if fanout is not None:
                    await asyncio.sleep(0)  # let the worker's other connections run
                    end = fanout.served + self._chunk
                    # Not to those who left meanwhile (an unsubscribe, a revoked token):
                    # one that came back resuming has this message from history.
                    members, pending = self.members, self.pending
                    chunk = [
                        m
                        for m in fanout.members[fanout.served : end]
                        if m in members or m in pending
                    ]
                    self._deliver(fanout.frame, chunk)
                    fanout.served = end
                    if end >= len(fanout.members):
                        self._set_fanout(None)
                    continue
                if not backlog:
                    break
                item = backlog.popleft()
                try:
                    if item is _INTERRUPTED:
                        # Live messages queue behind the read; its messages go first.
                        backlog.extendleft(reversed(await self._catch_up(self)))
                    else:
                        self._forward(*item)
                except Exception:
                    logger.exception("fanning out a message of %r failed", self.name)
        finally:
            if self._backlog is backlog:
                # Caught up: the next message is fanned out from the broker's read again.
                self._backlog = self._drainer = None
                self._set_fanout(None)
