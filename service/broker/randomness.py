"""Random names made in batches: one `getrandom` and one encoding per batch, not per use.

Every publish needs two random strings (a candidate epoch and an idempotency token,
service/broker/redis_history.py). Made one at a time, each is a system call and, for
the epoch, a base-32 encoding in pure Python; a batch costs about the same as one name
(docs/performance.md, "What changed, and what each part bought", no. 7).

Neither name is a secret, only unpredictable enough not to collide; each is still 40 or
96 bits straight from the OS. A child process made by `fork` starts with empty batches,
so that it never hands out its parent's names.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

#: Names made per batch.
BATCH = 256


class Batches:
    """Hands out names from batches that `make(count)` returns, making more when empty."""

    __slots__ = ("_left", "_make")

    def __init__(self, make: Callable[[int], list[str]]) -> None:
        self._make = make
        self._left: list[str] = []
        os.register_at_fork(after_in_child=self._left.clear)

    def __call__(self) -> str:
        """The next unused name."""
        left = self._left
        if not left:
            left.extend(self._make(BATCH))
        return left.pop()


def _base32_names(count: int) -> list[str]:
    # 5 random bytes are exactly 8 base-32 characters: one encoding, then slices.
    text = base64.b32hexencode(os.urandom(5 * count)).decode().lower()
    return [text[start : start + 8] for start in range(0, 8 * count, 8)]


def _hex_names(count: int) -> list[str]:
    text = os.urandom(12 * count).hex()
    return [text[start : start + 24] for start in range(0, 24 * count, 24)]


#: 8 random base-32 characters (40 bits), 0-9 and a-v.
base32_name = Batches(_base32_names)
#: 24 random hex digits (96 bits).
hex_name = Batches(_hex_names)
