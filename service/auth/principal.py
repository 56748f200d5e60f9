"""Who is connected, and which channels they may subscribe and publish to."""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

#: The claim that lists a token's channels: {"subscribe": [patterns], "publish": [patterns]}.
CHANNELS_CLAIM = "channels"


def matches_any(channel: str, patterns: tuple[str, ...]) -> bool:
    """True if `channel` matches one of `patterns` (`*` matches any run of characters).

    Channel names cannot contain `*`, `?` or `[`, so a pattern's wildcards never collide
    with a name's own characters.
    """
    return any(fnmatchcase(channel, pattern) for pattern in patterns)


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
