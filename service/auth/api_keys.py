"""API keys of the HTTP API, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from pydantic import SecretStr


class ApiKeys:
    """The keys the HTTP API accepts; several may be valid at once, for rotation."""

    def __init__(self, keys: Sequence[SecretStr]) -> None:
        self._keys = [key.get_secret_value().encode() for key in keys]

    def check(self, presented: str | None) -> bool:
        """Whether `presented` is one of the keys, in time independent of which and where.

        Every key is compared, and each comparison is constant-time, so the time taken
        says nothing about how much of a key was right.
        """
        if presented is None:
            return False
        candidate = presented.encode()
        found = False
        for key in self._keys:
            found |= hmac.compare_digest(candidate, key)
        return found
