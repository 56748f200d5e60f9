"""Dependencies shared by the routes: the runtime, and who may use the API."""

from __future__ import annotations

import logging
from typing import Annotated, NoReturn, cast

from fastapi import Cookie, Depends, Header, Query, Security, WebSocket, WebSocketException
from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection

from service.auth import InvalidToken, Principal, origin_allowed
from service.errors import Unauthorized
from service.protocol.codes import CloseCode
from service.runtime import Runtime

logger = logging.getLogger(__name__)


def get_runtime(connection: HTTPConnection) -> Runtime:
    """The running worker's parts, set up by the app's lifespan."""
    return cast(Runtime, connection.app.state.runtime)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of API_KEYS.")


async def require_api_key(
    runtime: RuntimeDep, key: Annotated[str | None, Security(_api_key)]
) -> None:
    """Let the request through only with one of the configured API keys (auth on)."""
    if runtime.settings.auth_enabled and not runtime.api_keys.check(key):
        raise Unauthorized("missing or invalid X-API-Key header")


async def connection_principal(
    websocket: WebSocket,
    runtime: RuntimeDep,
    token: Annotated[str | None, Query(description="A JWT (browsers cannot set headers).")] = None,
    authorization: Annotated[str | None, Header()] = None,
    token_cookie: Annotated[str | None, Cookie(alias="token")] = None,
) -> Principal:
    """Who opens this WebSocket; refuses the handshake (HTTP 403) before `accept`.

    Checks the Origin first (cross-site WebSocket hijacking), then the token from the
    `Authorization: Bearer` header, the `token` query parameter or the `token` cookie.
    """
    settings = runtime.settings
    if not origin_allowed(
        websocket.headers.get("origin"), websocket.headers.get("host"), settings.allowed_origins
    ):
        _refuse("origin not allowed")
    bearer = None
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        # Other schemes are not ours: a browser resends cached Basic credentials to a site
        # behind nginx's auth_basic, on WebSocket handshakes too.
        if scheme.lower() == "bearer":
            bearer = value.strip() or None
    try:
        return runtime.authenticator.authenticate(bearer or token or token_cookie)
    except InvalidToken as exc:
        _refuse(exc.reason)


def _refuse(reason: str) -> NoReturn:
    # Raised before `accept`, this becomes an HTTP 403 answer to the handshake. The
    # reason is logged, never the token.
    logger.info("WebSocket refused: %s", reason)
    raise WebSocketException(code=CloseCode.POLICY_VIOLATION, reason=reason)
