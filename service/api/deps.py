"""Dependencies shared by the routes: the runtime, and who may use the API."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, cast

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader
from starlette.requests import HTTPConnection

from service.auth import IdentitySource
from service.errors import ServiceError, Unauthorized
from service.runtime import Runtime

#: Where the lifespan leaves the runtime in the ASGI lifespan state, which the server
#: copies into every request's scope (and FastAPI merges with an including app's).
STATE_KEY = "broadcast_service.runtime"


class NotStarted(ServiceError):
    """A request reached the routes, but the lifespan that starts the service never ran."""

    def __init__(self) -> None:
        super().__init__(
            "the broadcast service was not started: its lifespan never ran. A sub-application "
            "mounted with app.mount() never gets one: include Realtime(settings).router with "
            "app.include_router() instead (README, 'Inside a FastAPI app')"
        )


def runtime_of(scope: Mapping[str, Any]) -> Runtime:
    """The running service of this request's app; `NotStarted` if it was never started."""
    state = scope.get("state")
    runtime = state.get(STATE_KEY) if state is not None else None
    if runtime is None:
        raise NotStarted
    return cast(Runtime, runtime)


def get_runtime(connection: HTTPConnection) -> Runtime:
    """The running worker's parts, set up by the lifespan."""
    return runtime_of(connection.scope)


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="One of API_KEYS.")


async def require_api_key(
    runtime: RuntimeDep, key: Annotated[str | None, Security(_api_key)]
) -> None:
    """Let the request through only with one of the configured API keys.

    Standalone, only with auth on (development runs open); embedded in an app that
    identifies its clients itself, always: the app's login must not be bypassed here.
    """
    required = runtime.settings.auth_enabled or runtime.identity is IdentitySource.APP
    if required and not runtime.api_keys.check(key):
        raise Unauthorized("missing or invalid X-API-Key header (one of API_KEYS)")
