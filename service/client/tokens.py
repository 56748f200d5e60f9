"""Where the client's token comes from, and what a refused handshake means for it.

No I/O of its own: a token is a fixed string or a provider (a function, possibly
async) that the client calls before every connection attempt, so that it can hand out
a fresh token each time. See docs/clients.md, "Tokens".
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from websockets.exceptions import InvalidStatus

TokenProvider = Callable[[], str | Awaitable[str]]
Token = str | TokenProvider | None

# The service answers a refused handshake (bad or expired token, origin) with 403.
REFUSED_STATUS = 403


async def fetch_token(token: Token) -> str | None:
    """The token to send now: the fixed one, or the provider's answer (None: no token)."""
    if token is None or isinstance(token, str):
        return token or None
    value = token()
    if inspect.isawaitable(value):
        value = await value
    if not isinstance(value, str):
        raise TypeError(f"the token provider returned {type(value).__name__}, not a str")
    return value or None


def auth_headers(token: str | None) -> dict[str, str] | None:
    """The handshake headers that carry `token` (None: nothing to add)."""
    return None if token is None else {"Authorization": f"Bearer {token}"}


def refused(exc: BaseException) -> bool:
    """Whether a failed connection attempt was a handshake the server refused (HTTP 403)."""
    return isinstance(exc, InvalidStatus) and exc.response.status_code == REFUSED_STATUS
