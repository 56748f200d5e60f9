"""Many connections' keepalive deadlines on one grid, with one event-loop timer per tick.

uvicorn gives each connection a timer of its own for its next ping and another for its
pong's deadline. Each `call_later` makes a timer handle, a copy of the context and a
bound method: a few microseconds, a libuv timer in a heap of all of them, and objects
that live the whole ping interval, long enough for the garbage collector to move them
to its oldest generation. At 15,000 connections per worker that fed a full collection
(about half a second of stopped event loop) every ten seconds or so. Here a deadline is
an entry in the set of its tick, and each tick that has entries is one timer: what is
due is handled in one turn of the loop, at most one tick late, and an entry is no object
of its own (docs/performance.md, "What changed, and what each part bought", no. 10).
"""

from __future__ import annotations

import asyncio
import math
from typing import Protocol


class Ticked(Protocol):
    """What is waiting on a `Ticks`: told when its tick comes."""

    def tick(self) -> None:
        """Its deadline has come (at most one tick late)."""
        ...


class Ticks:
    """A grid of `interval`-second ticks on an event loop, each with the members due at it."""

    # No reference to the loop: a grid is kept per loop, and must not keep its loop alive.
    __slots__ = ("_due", "_interval")

    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._due: dict[int, set[Ticked]] = {}

    @property
    def interval(self) -> float:
        """Seconds between ticks: how late a member may be told."""
        return self._interval

    def add(self, when: float, member: Ticked) -> int:
        """Tell `member` at the first tick at or after `when` (loop time); that tick.

        Called from inside the running event loop, whose ticks these are.
        """
        tick = math.ceil(when / self._interval)
        due = self._due.get(tick)
        if due is None:
            due = self._due[tick] = set()
            asyncio.get_running_loop().call_at(tick * self._interval, self._fire, tick)
        due.add(member)
        return tick

    def discard(self, tick: int, member: Ticked) -> None:
        """Do not tell `member` at `tick` (nothing if it was not due then)."""
        due = self._due.get(tick)
        if due is not None:
            due.discard(member)

    def pending(self) -> int:
        """Members still waiting, over every tick."""
        return sum(map(len, self._due.values()))

    def _fire(self, tick: int) -> None:
        for member in self._due.pop(tick, ()):
            try:
                member.tick()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:
                # As the loop reports a callback of its own that raised: the others due
                # at this tick still run.
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "a keepalive tick failed", "exception": exc, "protocol": member}
                )
