"""Message ids, and what a read of a channel's history returns (whatever stores it).

An id is `<epoch>:<seq>`. `seq` counts the channel's messages; `epoch` names the
history they belong to and changes when that history was lost (Redis restarted without
persistence, or the channel's metadata expired), so that an id from before the loss is
never mistaken for a position in the new history: Centrifugo's offset and epoch, in one
opaque string because the protocol has one `since`.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from service.broker.randomness import base32_name
from service.protocol.frames import message_id_of, message_parts


@dataclass(frozen=True, slots=True)
class Position:
    """A point in a channel's stream: after message `seq` of history `epoch`."""

    epoch: str
    seq: int

    def __str__(self) -> str:
        return f"{self.epoch}:{self.seq}"

    @classmethod
    def parse(cls, text: str) -> Position | None:
        """The position an id names, or None if this service did not make it."""
        epoch, sep, seq = text.rpartition(":")
        # isdecimal, not isdigit: int() refuses superscripts that isdigit accepts.
        if not sep or not epoch or not seq.isdecimal() or len(seq) > 19:
            return None
        return cls(epoch, int(seq))

    def covers(self, other: Position) -> bool:
        """True if `other` is this position or before it in the same history."""
        return other.epoch == self.epoch and other.seq <= self.seq


class Replayed(str):
    """The id of the message an earlier publish with the same idempotency key published.

    The publish answered with it published nothing. A `str`, so that code that only
    wants the id need not care.
    """

    __slots__ = ()


def new_epoch() -> str:
    """A fresh epoch name: 8 random base-32 characters (40 bits), 0-9 and a-v."""
    # Every publish makes one (the script keeps it only for a channel's first message).
    return base32_name()


def position_of(frame: str, head: str) -> Position | None:
    """The position of a `message` frame of the channel whose frames start with `head`.

    None for other frames of the channel (join, leave, gap), which are not in history.
    """
    message_id = message_id_of(frame, head)
    return None if message_id is None else Position.parse(message_id)


@dataclass(frozen=True, slots=True)
class HistoryRead:
    """One atomic read of a channel's history.

    `position` is the channel's latest message when read (seq 0 before the first one).
    `frames` are `message` frames, oldest first. `recovered` (reads after a position
    only) is True when `frames` start right after that position: nothing between it and
    the first frame is missing. `complete` is True when, moreover, they reach `position`.
    """

    position: Position
    #: (seq, frame) of each message, oldest first; all in `position`'s epoch.
    entries: Sequence[tuple[int, str]]
    recovered: bool = False
    complete: bool = False

    @property
    def frames(self) -> list[str]:
        """The `message` frames, oldest first."""
        return [frame for _, frame in self.entries]

    def messages(self) -> list[tuple[Position, str]]:
        """Each message's position and frame, oldest first."""
        epoch = self.position.epoch
        return [(Position(epoch, seq), frame) for seq, frame in self.entries]

    def ids_and_data(self) -> list[tuple[str, Any]]:
        """Each message's id and published JSON value (parsed), oldest first."""
        parsed = [orjson.loads(frame) for _, frame in self.entries]
        return [(message["id"], message["data"]) for message in parsed]


def read_after(
    epoch: str, top: int, entries: Sequence[tuple[int, str]], since: Position | None
) -> HistoryRead:
    """Judge `entries` (seq, frame), read from the first seq after `since` onwards."""
    position = Position(epoch, top)
    if since is None or since.epoch != epoch or since.seq > top:
        return HistoryRead(position, entries)
    if since.seq == top:
        return HistoryRead(position, [], recovered=True, complete=True)
    recovered = bool(entries) and entries[0][0] == since.seq + 1
    # Every seq up to the top, none missing in between (a worker with history off, say).
    complete = recovered and entries[-1][0] == top and len(entries) == top - since.seq
    return HistoryRead(position, entries, recovered, complete)


class _MemoryChannel:
    __slots__ = ("entries", "epoch", "last_published", "last_used", "seq")

    def __init__(self, size: int, now: float) -> None:
        # Per channel, so that a channel forgotten and used again starts a new history
        # rather than repeating the ids of the old one.
        self.epoch = new_epoch()
        self.seq = 0
        self.entries: deque[tuple[int, str]] = deque(maxlen=size)
        self.last_published = now
        self.last_used = now


class MemoryHistory:
    """History of memory:// (one process): ids and kept frames per channel, in process.

    Epochs live in the process, so a restart starts every channel's history anew, as a
    Redis restart without persistence does. A channel unused for `meta_ttl` seconds is
    forgotten (checked whenever some channel is published to). A publish's idempotency
    key is remembered for `key_ttl` seconds, per channel (forgotten when a later
    publish with a key finds it expired).
    """

    def __init__(
        self,
        *,
        size: int,
        ttl: float,
        meta_ttl: float,
        key_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._size = size
        self._ttl = ttl
        self._meta_ttl = meta_ttl
        self._key_ttl = key_ttl
        self._clock = clock
        self._channels: dict[str, _MemoryChannel] = {}
        self._next_sweep = clock() + meta_ttl
        # (channel, idempotency key) -> (message id, when the key expires), in the order
        # they were made: with one TTL for all, the order in which they expire.
        self._keys: dict[tuple[str, str], tuple[str, float]] = {}

    def publish(self, channel: str, data: bytes, key: str | None = None) -> tuple[str, str | None]:
        """Assign the next id, keep the frame; return (id, frame).

        With `key`, a client's idempotency key already used on `channel` within
        `key_ttl`: nothing is published, and the answer is (the first id as `Replayed`,
        None).
        """
        if key is not None:
            replayed = self._replayed(channel, key)
            if replayed is not None:
                return replayed, None
        state = self._touch(channel)
        state.seq += 1
        state.last_published = state.last_used
        message_id = f"{state.epoch}:{state.seq}"
        head, tail = message_parts(channel, data)
        frame = (head + message_id.encode() + tail).decode()
        if self._size:
            state.entries.append((state.seq, frame))
        if key is not None:
            self._keys[channel, key] = (message_id, state.last_used + self._key_ttl)
        self._sweep()
        return message_id, frame

    def _replayed(self, channel: str, key: str) -> Replayed | None:
        """The id published under `key` on `channel`, while the key lasts."""
        keys, now = self._keys, self._clock()
        # Expired keys go first: the oldest are at the front.
        while keys:
            oldest = next(iter(keys))
            if keys[oldest][1] > now:
                break
            del keys[oldest]
        known = keys.get((channel, key))
        return None if known is None else Replayed(known[0])

    def after(self, channel: str, since: Position | None, limit: int | None) -> HistoryRead:
        """Messages after `since` (at most `limit`), judged as `read_after` does."""
        state = self._touch(channel)
        entries: list[tuple[int, str]] = []
        if since is not None and since.epoch == state.epoch:
            entries = [entry for entry in state.entries if entry[0] > since.seq]
            if limit is not None:
                entries = entries[:limit]
        return read_after(state.epoch, state.seq, entries, since)

    def latest(self, channel: str, limit: int) -> HistoryRead:
        """The channel's last `limit` messages, oldest first."""
        state = self._touch(channel)
        entries = list(state.entries)[-limit:] if limit else []
        return HistoryRead(Position(state.epoch, state.seq), entries)

    def _touch(self, channel: str) -> _MemoryChannel:
        now = self._clock()
        state = self._channels.get(channel)
        if state is None or now - state.last_used > self._meta_ttl:
            state = self._channels[channel] = _MemoryChannel(self._size, now)
        elif now - state.last_published > self._ttl:
            state.entries.clear()  # the history expired; the ids carry on
        state.last_used = now
        return state

    def _sweep(self) -> None:
        now = self._clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._meta_ttl
        stale = [name for name, s in self._channels.items() if now - s.last_used > self._meta_ttl]
        for name in stale:
            del self._channels[name]
