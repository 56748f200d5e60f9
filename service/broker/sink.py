"""What the broker hands a channel's messages to (the hub's channel)."""

from __future__ import annotations

from typing import Protocol

from service.broker.history import Position


class ChannelSink(Protocol):
    """Takes one channel's messages, in order, from inside the broker's read.

    The read serves every channel of the worker: neither method may raise or wait.
    """

    def message(self, position: Position | None, frame: str) -> None:
        """A message, with its position in the channel's history (None: not kept there)."""

    def interrupted(self) -> None:
        """Messages published since the last one may never have reached this worker."""
