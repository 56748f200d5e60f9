"""What is risky about valid settings: a worker says it at start, `service check` lists it."""

from __future__ import annotations

from service.auth import IdentitySource
from service.settings import Settings

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def open_doors(settings: Settings, identity: IdentitySource = IdentitySource.TOKEN) -> list[str]:
    """What a worker warns about when it starts: auth off, or half of it missing.

    Embedded in an app that identifies WebSocket clients itself (`IdentitySource.APP`),
    only the HTTP API still depends on these settings.
    """
    if identity is IdentitySource.APP:
        doors = []
        if not settings.api_keys:
            doors.append(
                "no API_KEYS set: the router's HTTP API (publish, history) refuses every "
                "request; the app's own code publishes with Realtime.publish"
            )
        if "*" in settings.allowed_origins:
            doors.append(
                'ALLOWED_ORIGINS=["*"] with the app\'s own identify: pages of any site may '
                "open WebSockets with the visitor's cookies; list your sites' origins instead"
            )
        return doors
    if not settings.auth_enabled:
        return [
            "AUTH IS OFF: no JWT_SECRET, JWT_PUBLIC_KEY_FILE or API_KEYS is set, so anyone "
            "may subscribe and publish to any channel, over WebSocket and HTTP. Fine for "
            "development; set them before exposing this service (docs/security.md)."
        ]
    doors = []
    if not settings.api_keys:
        doors.append("no API_KEYS set: the HTTP API (publish, history) refuses every request")
    if not settings.jwt_enabled:
        doors.append(
            "no JWT_SECRET or JWT_PUBLIC_KEY_FILE set: WebSocket clients get only the "
            "ANONYMOUS_* channels, and tokens are refused"
        )
    return doors


def risks(settings: Settings) -> list[str]:
    """`open_doors`, and what else `python -m service check` points out."""
    found = open_doors(settings)
    if "*" in settings.allowed_origins:
        found.append(
            'ALLOWED_ORIGINS=["*"]: pages of any site may open WebSockets here with the '
            "visitor's cookies (a `token` cookie included); list your sites' origins instead"
        )
    if settings.auth_enabled and settings.anonymous_publish:
        found.append(
            f"ANONYMOUS_PUBLISH={settings.anonymous_publish}: anyone, with no token, may "
            "publish to these channels"
        )
    if settings.auth_enabled and "*" in settings.anonymous_subscribe:
        found.append(
            'ANONYMOUS_SUBSCRIBE contains "*": anyone, with no token, may read every channel'
        )
    if not settings.auth_enabled and settings.host not in _LOOPBACK:
        found.append(
            f"HOST={settings.host} with auth off: other machines may reach this open service"
        )
    return found
