"""Who is connected, and which channels they may subscribe and publish to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

#: The claim that lists a token's channels: {"subscribe": [patterns], "publish": [patterns]}.
CHANNELS_CLAIM = "channels"


def matches_any(channel: str, patterns: tuple[str, ...]) -> bool:
    """True if `channel` matches one of `patterns`, where only `*` is a wildcard.

    `*` matches any run of characters; everything else matches itself (unlike fnmatch,
    whose `?` and `[...]` would let `user:4?` match `user:42`).
    """
    return _compiled(patterns).fullmatch(channel) is not None


@lru_cache(maxsize=1024)
def _compiled(patterns: tuple[str, ...]) -> re.Pattern[str]:
    # One regex per set of patterns (a token's, typically shared by its connections).
    alternatives = ["\\A(?!)"]  # matches nothing, for an empty tuple
    alternatives += [".*".join(map(re.escape, pattern.split("*"))) for pattern in patterns]
    return re.compile("|".join(f"(?:{a})" for a in alternatives))


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated (or anonymous) connection's identity and channel permissions."""

    subject: str | None  # the token's `sub`; None when anonymous
    subscribe: tuple[str, ...]
    publish: tuple[str, ...]
    expires_at: float | None = None  # the token's `exp` (Unix time); None: never

    def may_subscribe(self, channel: str) -> bool:
        """Whether this principal may subscribe to `channel`."""
        return matches_any(channel, self.subscribe)

    def may_publish(self, channel: str) -> bool:
        """Whether this principal may publish to `channel`."""
        return matches_any(channel, self.publish)

    @property
    def anonymous(self) -> bool:
        """No token was presented."""
        return self.subject is None


#: With auth off (development), everyone may do everything.
EVERYONE = Principal(subject=None, subscribe=("*",), publish=("*",))
