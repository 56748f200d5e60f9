"""A queue and an event for one connection that cost nothing while nobody waits on them.

uvicorn gives every WebSocket connection an `asyncio.Queue` for what it hands the app
and an `asyncio.Event` for whether the socket takes writes. They hold
`collections.deque`s from the start (four for the queue, its `join` event included, one
for the event), about 760 bytes each on CPython 3.11: 3.8 KB of an idle connection's
20 KB (docs/performance.md, "What changed, and what each part bought", no. 9). The
adapter's protocol swaps in these, which keep a deque or a list only while something is
queued or waited for, and offer the calls uvicorn and the adapter make: `put_nowait`,
`get`, `get_nowait` and `empty`; `set`, `clear`, `is_set` and `wait`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, Literal, TypeVar

T = TypeVar("T")


class _Sleepers:
    """Who waits on a queue or an event: a list made only when someone does."""

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] | None = None

    async def _sleep(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            self._waiters.remove(waiter)

    def _wake_all(self) -> None:
        # Every waiter is woken and looks again: one that is cancelled before it runs
        # then cannot strand what it was woken for while another waits.
        if self._waiters:
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_result(None)


class LeanQueue(_Sleepers, Generic[T]):
    """An unbounded first-in first-out queue: asyncio.Queue's calls that uvicorn makes."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        super().__init__()
        # A deque only while something is queued: uvicorn queues every message of a read
        # before it pauses reading, which can be tens of thousands of small ones.
        self._items: deque[T] | None = None

    def empty(self) -> bool:
        """True if nothing is queued."""
        return self._items is None

    def put_nowait(self, item: T) -> None:
        """Queue `item` and wake whoever waits in `get`."""
        if self._items is None:
            self._items = deque((item,))
        else:
            self._items.append(item)
        self._wake_all()

    def get_nowait(self) -> T:
        """The oldest item; `asyncio.QueueEmpty` if there is none."""
        if self._items is None:
            raise asyncio.QueueEmpty
        return self._take(self._items)

    async def get(self) -> T:
        """The oldest item, once there is one."""
        while self._items is None:
            await self._sleep()
        return self._take(self._items)

    def _take(self, items: deque[T]) -> T:
        item = items.popleft()
        if not items:
            self._items = None
        return item


class LeanEvent(_Sleepers):
    """A flag that can be waited for: asyncio.Event's calls that uvicorn makes."""

    __slots__ = ("_is_set",)

    def __init__(self, *, is_set: bool = False) -> None:
        super().__init__()
        self._is_set = is_set

    def is_set(self) -> bool:
        """True while the flag is up."""
        return self._is_set

    def set(self) -> None:
        """Raise the flag and wake everyone waiting for it."""
        if self._is_set:
            return
        self._is_set = True
        self._wake_all()

    def clear(self) -> None:
        """Lower the flag."""
        self._is_set = False

    async def wait(self) -> Literal[True]:
        """Return once the flag is up (at once if it is)."""
        if not self._is_set:
            await self._sleep()
        return True
