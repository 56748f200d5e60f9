"""Dependencies shared by the routes: the runtime, and who may use the API."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection

from service.errors import Unauthorized
from service.runtime import Runtime


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
