"""Dependencies shared by the routes."""

from __future__ import annotations

from typing import cast

from starlette.requests import HTTPConnection

from service.runtime import Runtime


def get_runtime(connection: HTTPConnection) -> Runtime:
    """The running worker's parts, set up by the app's lifespan."""
    return cast(Runtime, connection.app.state.runtime)
