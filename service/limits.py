"""Abuse limits that need state: a token bucket, and the worker's connection slots."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take()` spends one if it can."""

    __slots__ = ("_burst", "_clock", "_rate", "_stamp", "_tokens")

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    def take(self) -> bool:
        """Spend a token; False (and nothing spent) when none is left."""
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class PublishLimiter:
    """Publishes of one connection: a bucket for publishes, and one for refusals.

    A client over the rate gets `rate_limited` errors; one that keeps going regardless
    (as many refusals again as its burst, without slowing to the rate) is abusive.
    """

    __slots__ = ("_publishes", "_refusals")

    def __init__(self, rate: float, burst: int) -> None:
        self._publishes = TokenBucket(rate, burst)
        self._refusals = TokenBucket(rate, burst)

    def allow(self) -> bool:
        """Whether this publish may go ahead."""
        return self._publishes.take()

    def abusive(self) -> bool:
        """Count a refusal; True once refusals outrun the rate by a whole burst."""
        return not self._refusals.take()


class ConnectionSlots:
    """How many WebSocket connections this worker serves, against `MAX_CONNECTIONS`."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def acquire(self) -> bool:
        """Take a slot; False when the worker is full."""
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def release(self) -> None:
        """Give a slot back."""
        self.used -= 1
