"""Who is connected, and which channels they may subscribe and publish to."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

#: The claim that lists a token's channels: {"subscribe": [patterns], "publish": [patterns]}.
CHANNELS_CLAIM = "channels"


def matches_any(channel: str, patterns: tuple[str, ...]) -> bool:
    """True if `channel` matches one of `patterns`, where only `*` is a wildcard.

    `*` matches any run of characters; everything else matches itself (unlike fnmatch,
    whose `?` and `[...]` would let `user:4?` match `user:42`). Without backtracking:
    patterns come from tokens, and a regex with several `.*` took seconds on a
    128-character channel name, with the worker's event loop stalled.
    """
    return _compiled(patterns).matches(channel)


@dataclass(frozen=True, slots=True)
class _Glob:
    """A pattern with at least one `*`: `prefix*middle[0]*...*middle[-1]*suffix`."""

    prefix: str
    middle: tuple[str, ...]  # the non-empty parts between two `*`
    suffix: str

    def fits(self, channel: str) -> bool:
        """Whether `channel` matches."""
        start, end = len(self.prefix), len(channel) - len(self.suffix)
        if end < start or not channel.startswith(self.prefix) or not channel.endswith(self.suffix):
            return False
        # Each middle part at its leftmost place after the one before: a later place
        # would only leave less room for the parts after it, so no choice is undone and
        # each search starts where the last one ended.
        for part in self.middle:
            found = channel.find(part, start, end)
            if found < 0:
                return False
            start = found + len(part)
        return True


@dataclass(frozen=True, slots=True)
class _Patterns:
    """A set of patterns, prepared for matching."""

    exact: frozenset[str]  # the patterns without a `*`
    # The patterns with a `*`: `prefix*` ones (`*` alone is a prefix of ""), `*suffix`
    # ones, and the others.
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    globs: tuple[_Glob, ...]

    def matches(self, channel: str) -> bool:
        """Whether `channel` matches one of the patterns."""
        if channel in self.exact:
            return True
        if channel.startswith(self.prefixes) or channel.endswith(self.suffixes):
            return True
        # A loop, not any() over a generator, which costs more than a match here.
        for glob in self.globs:  # noqa: SIM110
            if glob.fits(channel):
                return True
        return False


@lru_cache(maxsize=1024)
def _compiled(patterns: tuple[str, ...]) -> _Patterns:
    # Prepared once per set of patterns (a token's, typically shared by its connections).
    globs = [_glob(p) for p in patterns if "*" in p]
    return _Patterns(
        exact=frozenset(p for p in patterns if "*" not in p),
        prefixes=tuple(g.prefix for g in globs if not g.middle and not g.suffix),
        suffixes=tuple(g.suffix for g in globs if not g.middle and not g.prefix and g.suffix),
        globs=tuple(g for g in globs if g.middle or (g.prefix and g.suffix)),
    )


def _glob(pattern: str) -> _Glob:
    prefix, *middle, suffix = pattern.split("*")
    return _Glob(prefix, tuple(part for part in middle if part), suffix)


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


class IdentitySource(Enum):
    """Who says who a WebSocket client is."""

    #: The service, from the client's JWT (or the settings' anonymous permissions).
    TOKEN = "token"
    #: The app the service is embedded in, with its own dependency (`Realtime(identify=)`).
    APP = "app"


#: With auth off (development), everyone may do everything.
EVERYONE = Principal(subject=None, subscribe=("*",), publish=("*",))
