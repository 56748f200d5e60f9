"""The Origin allow-list of browser WebSockets (cross-site WebSocket hijacking)."""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit


def origin_allowed(origin: str | None, host: str | None, allowed: Sequence[str]) -> bool:
    """Whether a WebSocket handshake with this `Origin` may proceed.

    No `Origin`: not a browser (browsers always send one), so nothing to hijack. Else the
    origin must be the service's own (its host is the request's `Host`) or listed.
    """
    if origin is None or "*" in allowed:
        return True
    if origin.rstrip("/") in {a.rstrip("/") for a in allowed}:
        return True
    parts = urlsplit(origin.lower())
    return parts.scheme in ("http", "https") and host is not None and parts.netloc == host.lower()
