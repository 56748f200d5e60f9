"""The channel name grammar, enforced on every path (WebSocket, URL, HTTP).

A channel name is 1 to `max_length` characters from ``A-Z a-z 0-9 _ - . : @``.
``:`` is reserved as the namespace separator (``chat:lobby``); ``*`` and spaces
are never allowed so that names can be used in permission patterns and URLs as is.
"""

from __future__ import annotations

import re

from service.errors import ProtocolError, Ref
from service.protocol.codes import ErrorCode

_CHANNEL_RE = re.compile(r"[A-Za-z0-9_\-.:@]+")


def validate_channel(name: object, max_length: int, *, ref: Ref | None = None) -> str:
    """Return `name` if it is a valid channel name, else raise `ProtocolError`."""
    if not isinstance(name, str) or not name:
        raise ProtocolError(
            ErrorCode.INVALID_CHANNEL, "channel must be a non-empty string", ref=ref
        )
    if len(name) > max_length:
        raise ProtocolError(
            ErrorCode.INVALID_CHANNEL,
            f"channel name is {len(name)} characters long; the limit is {max_length}",
            ref=ref,
        )
    if _CHANNEL_RE.fullmatch(name) is None:
        raise ProtocolError(
            ErrorCode.INVALID_CHANNEL,
            "channel may contain only letters, digits and _ - . : @",
            ref=ref,
        )
    return name
