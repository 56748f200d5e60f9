"""WebSocket endpoints: `/ws` (protocol v1) and `/ws/{channel}` (simple mode).

Served by a small ASGI app in front of the FastAPI app rather than as FastAPI routes:
the middleware, routing and dependency machinery (exit stacks, exception wrappers,
solved parameters) would stay alive for as long as a WebSocket does, and an idle
connection's every byte counts (docs/performance.md, "What changed, and what each part
bought", no. 2). The checks are the same: the Origin, then a token from the
`Authorization: Bearer` header, the `token` query parameter or the `token` cookie; a
refusal closes before `accept`, which is an HTTP 403. Anything else, the lifespan
included, goes to the FastAPI app.
"""

from __future__ import annotations

import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers, QueryParams
from starlette.requests import cookie_parser
from starlette.responses import JSONResponse
from starlette.websockets import WebSocket

from service.adapters.uvicorn import transport_for
from service.auth import InvalidToken, Principal, origin_allowed
from service.protocol import frames
from service.protocol.codes import CloseCode, ErrorCode
from service.runtime import Runtime
from service.session import Session, SimpleSession

logger = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]


class HandshakeRefused(Exception):
    """The WebSocket may not be opened; `reason` goes into the log and the close."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class WebSocketEndpoints:
    """ASGI app: serves `/ws` and `/ws/{channel}`; everything else goes on to `app`."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        """Serve the two WebSocket endpoints, pass anything else on."""
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        channel = path[4:] if path.startswith("/ws/") else None
        if path != "/ws" and not (channel and "/" not in channel):
            await self.app(scope, receive, send)  # FastAPI answers: no such route
            return
        # One frame for the whole connection (it waits as long as the connection lives):
        # the handshake, then the session.
        runtime: Runtime = self.app.state.runtime
        websocket = WebSocket(scope, receive, send)
        try:
            principal = principal_of(websocket, runtime)
        except HandshakeRefused as exc:
            # Answered before `accept`: an HTTP 403 whose body says why, for clients that
            # can read it (a browser cannot). The reason is logged, never the token.
            logger.info("WebSocket refused: %s", exc.reason)
            await _refuse(websocket, exc.reason)
            return
        if not await _take_slot(websocket, runtime):
            return
        try:
            # uvicorn's own `send`, which the adapter may write through directly.
            transport = transport_for(send, fast=runtime.settings.fast_adapters)
            if channel is None:
                # Protocol v1: the client subscribes, unsubscribes and publishes.
                session: Session | SimpleSession = Session(websocket, transport, runtime, principal)
                session.deliver(frames.welcome(runtime.worker_id))
            else:
                # Simple mode: subscribed to `channel`; each text frame is published to it.
                session = SimpleSession(websocket, transport, runtime, principal, channel)
            await session.run()
        finally:
            runtime.slots.release()


async def _refuse(websocket: WebSocket, reason: str) -> None:
    """Answer the handshake with 403 and `{"error": "forbidden", "message": reason}`.

    A server without ASGI's denial responses gets a close before `accept` instead,
    which it answers with a bare 403.
    """
    if "websocket.http.response" not in websocket.scope.get("extensions", {}):
        await websocket.close(CloseCode.POLICY_VIOLATION, reason)
        return
    body = {"error": ErrorCode.FORBIDDEN.value, "message": f"WebSocket refused: {reason}"}
    await websocket.send_denial_response(JSONResponse(body, status_code=403))


def _route_path(scope: Scope) -> str:
    """The path below the app's mount point (`root_path`), as Starlette's routing sees it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    # `/w` is not the mount point of `/ws`: only a whole path segment is stripped.
    return path[len(root) :] if path[len(root)] == "/" else path


def principal_of(websocket: WebSocket, runtime: Runtime) -> Principal:
    """Who opens this WebSocket; raises `HandshakeRefused` if nobody may.

    Checks the Origin first (cross-site WebSocket hijacking), then the token from the
    `Authorization: Bearer` header, the `token` query parameter or the `token` cookie.
    """
    settings = runtime.settings
    # Parsed here, not through `websocket.headers` and friends, which would keep their
    # parsed copies for the connection's whole life.
    scope = websocket.scope
    headers = Headers(scope=scope)
    if not origin_allowed(headers.get("origin"), headers.get("host"), settings.allowed_origins):
        raise HandshakeRefused("origin not allowed")
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


async def _take_slot(websocket: WebSocket, runtime: Runtime) -> bool:
    """Accept the connection; if the worker is full, close it at once with 1013."""
    await websocket.accept()
    if runtime.slots.acquire():
        return True
    runtime.metrics.refused_connections.inc()
    await websocket.close(CloseCode.TRY_AGAIN_LATER, "worker full: retry later")
    return False
