"""A connection's frames that wait for the client to read, bounded in count and size."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutboxLimits:
    """How much may wait for one client (OUTBOX_MAX_MESSAGES, OUTBOX_MAX_BYTES)."""

    max_messages: int
    max_chars: int


class Outbox:
    """Frames queued for one client, oldest first, within `OutboxLimits`.

    Made only when a frame has to wait and dropped once drained, so an idle connection
    holds none. A resume's backlog may go past the limits (`put_backlog`): the room it
    gets lasts as long as this outbox.
    """

    __slots__ = ("_chars", "_extra_chars", "_extra_messages", "_frames", "_limits")

    def __init__(self, limits: OutboxLimits) -> None:
        self._limits = limits
        self._frames: deque[str] = deque()
        self._chars = 0
        # Room granted above the limits to one backlog (0 and 0: none granted).
        self._extra_messages = 0
        self._extra_chars = 0

    def __len__(self) -> int:
        return len(self._frames)

    def __bool__(self) -> bool:
        return bool(self._frames)

    def put(self, frame: str) -> bool:
        """Queue `frame`; False, queueing nothing, if it does not fit."""
        size = len(frame)
        limits = self._limits
        if (
            len(self._frames) >= limits.max_messages + self._extra_messages
            or self._chars + size > limits.max_chars + self._extra_chars
        ):
            return False
        self._frames.append(frame)
        self._chars += size
        return True

    def put_backlog(self, frames: Sequence[str]) -> bool:
        """Queue a resumed subscription's missed frames, even past the limits.

        The limits grow by the backlog for as long as this outbox lives, so that the
        frames queued behind it are not what closes the client. One backlog at a time:
        while a grant stands, another must fit in the limits as they are (False, nothing
        queued, otherwise), or a client that resumes again and again without reading
        would queue without bound.
        """
        chars = sum(map(len, frames))
        limits = self._limits
        if not (self._extra_messages or self._extra_chars):
            self._extra_messages, self._extra_chars = len(frames), chars
        elif (
            len(self._frames) + len(frames) > limits.max_messages + self._extra_messages
            or self._chars + chars > limits.max_chars + self._extra_chars
        ):
            return False
        self._frames.extend(frames)
        self._chars += chars
        return True

    def pop(self) -> str:
        """Take the first frame."""
        frame = self._frames.popleft()
        self._chars -= len(frame)
        return frame

    def take_all(self) -> list[str]:
        """Take every frame, in order."""
        frames = list(self._frames)
        self._frames.clear()
        self._chars = 0
        return frames
