"""Who is connected, and which channels they may subscribe and publish to."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

#: The claim that lists a token's channels: {"subscribe": [patterns], "publish": [patterns]}.
CHANNELS_CLAIM = "channels"


def matches_any(channel: str, patterns: tuple[str, ...]) -> bool:
    """True if `channel` matches one of `patterns`, where only `*` is a wildcard.

    `*` matches any run of characters but a newline; everything else matches itself
    (unlike fnmatch, whose `?` and `[...]` would let `user:4?` match `user:42`). Without
    backtracking: patterns come from tokens, and a regex with several `.*` took seconds
    on a 128-character channel name, with the worker's event loop stalled.
    """
    return _compiled(patterns).matches(channel)


@dataclass(frozen=True, slots=True)
class _Glob:
    """A line of a pattern with at least one `*`: `prefix*middle[0]*...*middle[-1]*suffix`."""

    prefix: str
    middle: tuple[str, ...]  # the non-empty parts between two `*`
    suffix: str

    def fits(self, line: str) -> bool:
        """Whether `line`, which holds no newline, matches."""
        start, end = len(self.prefix), len(line) - len(self.suffix)
        if end < start or not line.startswith(self.prefix) or not line.endswith(self.suffix):
            return False
        # Each middle part at its leftmost place after the one before: a later place
        # would only leave less room for the parts after it, so no choice is undone and
        # each search starts where the last one ended.
        for part in self.middle:
            found = line.find(part, start, end)
            if found < 0:
                return False
            start = found + len(part)
        return True


@dataclass(frozen=True, slots=True)
class _Patterns:
    """A set of patterns, prepared for matching."""

    exact: frozenset[str]  # the patterns without a `*`
    # The patterns with a `*` and no newline: `prefix*` ones (`*` alone is a prefix of
    # ""), `*suffix` ones, and the others.
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    globs: tuple[_Glob, ...]
    # Patterns with a `*` and a newline, line by line (a line without a `*` as a string).
    multiline: tuple[tuple[_Glob | str, ...], ...]

    def matches(self, channel: str) -> bool:
        """Whether `channel` matches one of the patterns."""
        if channel in self.exact:
            return True
        if "\n" in channel:
            return self._matches_lines(channel.split("\n"))
        if channel.startswith(self.prefixes) or channel.endswith(self.suffixes):
            return True
        # A loop, not any() over a generator, which costs more than a match here.
        for glob in self.globs:  # noqa: SIM110
            if glob.fits(channel):
                return True
        return False

    def _matches_lines(self, lines: list[str]) -> bool:
        # `*` stops at a newline, as the regex `.*` it once was did (channel names hold
        # none, but the meaning of patterns stays exactly as it was): so each newline of
        # the channel is one of the pattern's, and their lines must match one for one.
        return any(
            len(pattern) == len(lines)
            and all(
                line == part if isinstance(part, str) else part.fits(line)
                for part, line in zip(pattern, lines, strict=True)
            )
            for pattern in self.multiline
        )


@lru_cache(maxsize=1024)
def _compiled(patterns: tuple[str, ...]) -> _Patterns:
    # Prepared once per set of patterns (a token's, typically shared by its connections).
    globs = [_glob(p) for p in patterns if "*" in p and "\n" not in p]
    return _Patterns(
        exact=frozenset(p for p in patterns if "*" not in p),
        prefixes=tuple(g.prefix for g in globs if not g.middle and not g.suffix),
        suffixes=tuple(g.suffix for g in globs if not g.middle and not g.prefix and g.suffix),
        globs=tuple(g for g in globs if g.middle or (g.prefix and g.suffix)),
        multiline=tuple(
            tuple(_glob(line) if "*" in line else line for line in p.split("\n"))
            for p in patterns
            if "*" in p and "\n" in p
        ),
    )


def _glob(line: str) -> _Glob:
    prefix, *middle, suffix = line.split("*")
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


#: With auth off (development), everyone may do everything.
EVERYONE = Principal(subject=None, subscribe=("*",), publish=("*",))
