"""WebSocket endpoints: `/ws` (protocol v1) and `/ws/{channel}` (simple mode).

`serve` is the one way a WebSocket is served: the Origin, then who the client is (its
token, or the app's own dependency), a connection slot (a full worker closes with
1013), the app's connect hook, then the session. A refusal before `accept` is an HTTP
answer (403, or 503 when a hook is unavailable) whose body says why.

Standalone, `WebSocketEndpoints` calls it in front of the FastAPI app rather than as
a route: the middleware, routing and dependency machinery would stay alive for as long
as a WebSocket does, and an idle connection's every byte counts (docs/performance.md,
"What changed, and what each part bought", no. 2). Embedded, `websocket_routes` makes
plain Starlette routes of it for `Realtime.router`.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import Headers
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket

from service.adapters.uvicorn import transport_for
from service.api.deps import NotStarted, runtime_of
from service.api.errors import error_json
from service.api.identity import HandshakeRefused, Identify, Receive, Scope, Send
from service.auth import Principal, origin_allowed
from service.errors import HookUnavailable, Refused
from service.hooks import ask
from service.protocol import frames
from service.protocol.codes import CloseCode
from service.runtime import Runtime
from service.session import Session, SimpleSession

logger = logging.getLogger(__name__)


async def serve(
    scope: Scope, receive: Receive, send: Send, channel: str | None, identify: Identify
) -> None:
    """Serve one WebSocket: `channel` None for protocol v1, else simple mode on it."""
    websocket = WebSocket(scope, receive, send)
    try:
        runtime = runtime_of(scope)
        principal = await _identify(scope, receive, send, runtime, identify)
    except NotStarted as exc:
        logger.error("%s", exc.message)
        await _refuse(websocket, 500, exc.code.value, exc.message)
        return
    except HandshakeRefused as exc:
        await _refuse_handshake(websocket, exc)
        return
    if principal is None:
        return  # the app's dependency answered the handshake itself
    # A slot before the connect hook: a full worker does not call the app's backend.
    if not runtime.slots.acquire():
        runtime.metrics.refused_connections.inc()
        await websocket.accept()
        await websocket.close(CloseCode.TRY_AGAIN_LATER, "worker full: retry later")
        return
    try:
        try:
            await _ask_connect(runtime, principal)
        except HandshakeRefused as exc:
            await _refuse_handshake(websocket, exc)
            return
        await websocket.accept()
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


async def _identify(
    scope: Scope, receive: Receive, send: Send, runtime: Runtime, identify: Identify
) -> Principal | None:
    """The client's `Principal` (None: answered already), or `HandshakeRefused`."""
    # Parsed here, not through `websocket.headers`, which would keep its parsed copy
    # for the connection's whole life.
    headers = Headers(scope=scope)
    allowed = runtime.settings.allowed_origins
    # Before anything that reads cookies: cross-site WebSocket hijacking.
    if not origin_allowed(headers.get("origin"), headers.get("host"), allowed):
        raise HandshakeRefused("origin not allowed")
    return await identify(scope, receive, send, runtime)


async def _ask_connect(runtime: Runtime, principal: Principal) -> None:
    """The app's connect hook, if any; `HandshakeRefused` if it says no or fails."""
    hook = runtime.hooks.connect_hook()
    if hook is None:
        return
    try:
        await ask(runtime.hooks, "connect", hook, (principal,))
    except Refused as exc:
        raise HandshakeRefused(exc.message, code=exc.wire_code()) from None
    except HookUnavailable as exc:
        raise HandshakeRefused(exc.message, status=503, code=exc.wire_code()) from None


async def _refuse_handshake(websocket: WebSocket, refusal: HandshakeRefused) -> None:
    # The reason is logged, never the token.
    logger.info("WebSocket refused: %s", refusal.reason)
    message = f"WebSocket refused: {refusal.reason}"
    await _refuse(websocket, refusal.status, refusal.code, message)


async def _refuse(websocket: WebSocket, status: int, code: str, message: str) -> None:
    """Answer the handshake with `status` and `{"error": code, "message": message}`.

    A server without ASGI's denial responses gets a close before `accept` instead,
    which it answers with a bare 403.
    """
    if "websocket.http.response" not in websocket.scope.get("extensions", {}):
        # A close reason holds 123 bytes.
        reason = message.encode()[:123].decode(errors="ignore")
        await websocket.close(CloseCode.POLICY_VIOLATION, reason)
        return
    await websocket.send_denial_response(error_json(code, message, status))


class WebSocketEndpoints:
    """ASGI app: serves `/ws` and `/ws/{channel}`; everything else goes on to `app`."""

    def __init__(self, app: FastAPI, identify: Identify) -> None:
        self.app = app
        self._identify = identify

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
        # One frame for the whole connection (it waits as long as the connection lives).
        await serve(scope, receive, send, channel, self._identify)


class _Endpoint:
    """An ASGI endpoint for a Starlette `WebSocketRoute`: `/ws`, or `/ws/{channel}`.

    A class: Starlette would take a function for a session function.
    """

    def __init__(self, identify: Identify) -> None:
        self._identify = identify

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        channel = scope["path_params"].get("channel")
        await serve(scope, receive, send, channel, self._identify)


def websocket_routes(identify: Identify) -> list[WebSocketRoute]:
    """`/ws` and `/ws/{channel}` as routes, for a router an app includes.

    Plain Starlette routes: dependencies given to `include_router` do not reach them
    (the app's `identify` is where a WebSocket is checked).
    """
    endpoint = _Endpoint(identify)
    return [
        WebSocketRoute("/ws", endpoint, name="broadcast_ws"),
        WebSocketRoute("/ws/{channel}", endpoint, name="broadcast_ws_channel"),
    ]


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
