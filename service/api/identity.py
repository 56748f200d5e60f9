"""Who opens a WebSocket: from its token (JWT), or from the app's own FastAPI dependency.

Either way the Origin is checked first (service/api/ws.py), so that a page of another
site cannot open a WebSocket with the visitor's cookies.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from weakref import WeakKeyDictionary

from fastapi import Depends
from fastapi.routing import APIWebSocketRoute
from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from starlette.websockets import WebSocket

from service.auth import InvalidToken, Principal
from service.runtime import Runtime

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class HandshakeRefused(Exception):
    """The WebSocket may not be opened: answered with `status` and `{"error", "message"}`."""

    def __init__(self, reason: str, *, status: int = 403, code: str = "forbidden") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.code = code


#: Turns a handshake into the connection's identity; None: the handshake was answered
#: already (the app's dependency refused it itself).
Identify = Callable[[Scope, Receive, Send, Runtime], Awaitable[Principal | None]]


async def token_identity(scope: Scope, receive: Receive, send: Send, runtime: Runtime) -> Principal:
    """The identity in the client's token (the settings' anonymous one without a token).

    The token comes from the `Authorization: Bearer` header, the `token` query
    parameter or the `token` cookie.
    """
    # Parsed here, not through `websocket.headers` and friends, which would keep their
    # parsed copies for the connection's whole life.
    headers = Headers(scope=scope)
    bearer = None
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        # Other schemes are not ours: a browser resends cached Basic credentials to a site
        # behind nginx's auth_basic, on WebSocket handshakes too.
        if scheme.lower() == "bearer":
            bearer = value.strip() or None
    cookies: dict[str, str] = {}
    for header in headers.getlist("cookie"):  # a client may split them over several
        cookies.update(cookie_parser(header))
    token = bearer or QueryParams(scope["query_string"]).get("token") or cookies.get("token")
    try:
        return runtime.authenticator.authenticate(token)
    except InvalidToken as exc:
        raise HandshakeRefused(exc.reason) from None


_RESULT = "broadcast_service.identity"


class DependencyIdentity:
    """The app's FastAPI dependency, solved once per handshake by FastAPI itself.

    The dependency may use anything FastAPI gives a WebSocket endpoint (`Cookie`,
    `Header`, `Depends` on the app's database session, ...), and the app's
    `dependency_overrides` apply to it. It returns a `Principal`, or None to refuse
    with 403; it may also raise `WebSocketException`, which the app's own exception
    handlers answer. Its `yield` dependencies end with the handshake, not with the
    connection: a database session is not held while a client stays connected.
    """

    def __init__(self, dependency: Callable[..., Any]) -> None:
        # `Depends` as the default, not in the annotation: annotations are strings here
        # (PEP 563), and FastAPI could not find the local `dependency` from one.
        async def endpoint(
            websocket: WebSocket,
            principal: Principal | None = Depends(dependency),  # noqa: B008
        ) -> None:
            websocket.scope[_RESULT] = (principal,)

        self._endpoint = endpoint
        # One route per app that includes the router, for that app's overrides.
        self._routes: WeakKeyDictionary[Any, APIWebSocketRoute] = WeakKeyDictionary()
        self._name = getattr(dependency, "__qualname__", repr(dependency))

    def _route(self, app: Any) -> APIWebSocketRoute:
        route = self._routes.get(app)
        if route is None:
            overrides = app if hasattr(app, "dependency_overrides") else None
            route = APIWebSocketRoute("/", self._endpoint, dependency_overrides_provider=overrides)
            self._routes[app] = route
        return route

    async def __call__(
        self, scope: Scope, receive: Receive, send: Send, runtime: Runtime
    ) -> Principal | None:
        """The dependency's `Principal`; None if the app answered the handshake itself."""
        await self._route(scope["app"]).handle(scope, receive, send)
        solved = scope.pop(_RESULT, None)
        if solved is None:
            return None  # it raised, and the app's exception handler answered
        principal = solved[0]
        if principal is None:
            raise HandshakeRefused("not signed in")
        if not isinstance(principal, Principal):
            logger.error(
                "identify dependency %s returned %s: return a service.Principal or None",
                self._name,
                type(principal).__name__,
            )
            refusal = "the app could not identify the client"
            raise HandshakeRefused(refusal, status=500, code="internal")
        return principal
