"""History for the hub: members that resume `since` an id, and the worker's own gaps.

A member that resumes joins through a stand-in that keeps the live messages while the
history is read; then, in one synchronous step, it gets the history and those live
messages without duplicates and becomes a member. Every message the history read missed
was published after it, so after the subscription was confirmed: the stand-in has it,
or it is still to come.

When the worker's own subscription was interrupted, the channel reads what it missed
from history before the live messages that queued behind (`catch_up`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.broker import Broker, HistoryRead, Position
from service.errors import BrokerUnavailable
from service.hub.fanout import Channel, Horizon, Member, Message
from service.protocol import frames

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Joined:
    """How a member joined: `position` is the id after which its messages start.

    `recovered` is None without `since`, else whether every message after `since`
    follows. `position` is None only while the worker does not know it.
    """

    position: str | None
    recovered: bool | None = None


class HistoryStats:
    """What the history reads of this worker's hub achieved (exported as metrics)."""

    __slots__ = ("gaps_filled", "gaps_reported", "resumes_not_recovered", "resumes_recovered")

    def __init__(self) -> None:
        # Interruptions of the worker's subscription that history covered, and those it
        # did not (each sent the channel's members a `gap` frame).
        self.gaps_filled = 0
        self.gaps_reported = 0
        # Members that resumed with `since`, by whether history reached back.
        self.resumes_recovered = 0
        self.resumes_not_recovered = 0


class StandIn:
    """Stands in for a resuming member while its history is read: keeps live messages."""

    __slots__ = ("_chars_left", "_frames_left", "messages", "overflowed")

    def __init__(self, max_frames: int, max_chars: int) -> None:
        self.messages: list[Message] = []
        self.overflowed = False
        self._frames_left = max_frames
        self._chars_left = max_chars

    def record(self, position: Position | None, frame: str) -> None:
        """Keep a live message, unless the member could not have taken this many either."""
        self._frames_left -= 1
        self._chars_left -= len(frame)
        if self._frames_left < 0 or self._chars_left < 0:
            self.overflowed = True
            return
        self.messages.append((position, frame))


def finish_resume(
    channel: Channel,
    member: Member,
    since: Position,
    start: Position | None,
    stand_in: StandIn,
    read: HistoryRead,
    stats: HistoryStats,
    on_joined: Callable[[Joined], None] | None,
) -> Joined:
    """Give `member` its history and the live messages kept meanwhile, and let it in.

    Synchronous from start to end: no message can slip in between. `start` is where the
    channel was when the stand-in joined.
    """
    start_id = None if start is None else str(start)
    if stand_in.overflowed:
        # Live frames were dropped while the history was read: the member cannot be
        # served without a hole. Closed as a slow consumer, it resumes again.
        stats.resumes_not_recovered += 1
        member.overwhelmed()
        return Joined(start_id, False)
    live = stand_in.messages
    horizon: Position | None = None
    if read.complete:
        stats.resumes_recovered += 1
        history = read.frames
        horizon = read.position
        # Drop the live copies of what history already gave.
        live = [(p, f) for p, f in live if p is None or not horizon.covers(p)]
        joined = Joined(str(since), True)
    else:
        stats.resumes_not_recovered += 1
        history = []
        joined = Joined(start_id, False)
    if on_joined is not None:
        on_joined(joined)
    member.deliver_backlog([*history, *(frame for _, frame in live)])
    last = channel.position
    if horizon is not None and (last is None or not last.covers(horizon)):
        # The read saw messages the channel has not fanned out yet (their pub/sub copies
        # are still on the way): they must not reach this member twice. If the channel
        # is still in an older epoch (it has not caught up with a Redis restart), that
        # epoch's messages are behind the member too.
        stale = last.epoch if last is not None and last.epoch != horizon.epoch else None
        channel.pending[member] = Horizon(horizon, stale)
    else:
        channel.members.add(member)
    return joined


async def catch_up(broker: Broker, stats: HistoryStats, channel: Channel) -> Sequence[Message]:
    """What the channel missed while the subscription was interrupted, from history.

    Live messages keep queueing behind this read; as the returned messages go out, the
    channel's position moves past them and their live copies are skipped.
    """
    try:
        read = await broker.history_after(channel.name, channel.position)
    except Exception as exc:
        # Whatever the failure, the members are told, rather than left with a hole.
        if not isinstance(exc, BrokerUnavailable):
            logger.exception("reading the history of %r after an interruption failed", channel.name)
        logger.warning("history of %r unreadable after an interruption: %s", channel.name, exc)
        stats.gaps_reported += 1
        channel.position = None  # whatever comes next is new to the members
        return [(None, frames.gap(channel.name))]
    if read.complete:
        stats.gaps_filled += 1
        return read.messages()
    stats.gaps_reported += 1
    logger.info("history of %r does not cover an interruption: sending a gap", channel.name)
    last = channel.position
    if last is not None and not read.position.covers(last):
        # A new epoch (Redis lost its data, or another server took over after a
        # failover), or the same one set back (Redis came back from an older snapshot
        # and gives out ids again): nothing to skip.
        channel.position = None
        if read.position.epoch != last.epoch:
            # Every message of the new epoch is news to the members: from its start.
            try:
                read = await broker.history_after(channel.name, Position(read.position.epoch, 0))
            except Exception as exc:
                logger.warning("history of %r unreadable after a new epoch: %s", channel.name, exc)
                return [(None, frames.gap(channel.name))]
    # Whatever part of it history still has (it was trimmed) follows the notice.
    return [(None, frames.gap(channel.name)), *read.messages()]
