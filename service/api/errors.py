"""The HTTP answer to each of the service's errors, given by the routes themselves.

A route class rather than the app's exception handlers: the routes are also included
into apps that are not ours (`Realtime.router`), whose handlers know nothing of these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from service.api.deps import NotStarted
from service.errors import (
    BrokerUnavailable,
    OutcomeUnknown,
    ProtocolError,
    ServiceError,
    Unauthorized,
)
from service.protocol.codes import ErrorCode

logger = logging.getLogger(__name__)

# Seconds a client should wait before trying again after a 503 or 504.
_RETRY_AFTER_SECONDS = "1"


class ErrorRoute(APIRoute):
    """An `APIRoute` that answers the service's errors with their status and `ErrorBody`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, with our errors turned into answers."""
        handle = super().get_route_handler()

        async def answering(request: Request) -> Response:
            try:
                return await handle(request)
            except ServiceError as exc:
                return error_response(exc)
            except RequestValidationError as exc:
                # A query parameter FastAPI could not parse (`limit=abc`): a 400 like any
                # bad request, not FastAPI's 422.
                message = validation_error_message(exc.errors())
                return error_json(ErrorCode.INVALID_REQUEST.value, message, 400)

        return answering


def error_response(exc: ServiceError) -> JSONResponse:
    """The HTTP answer to `exc`."""
    match exc:
        case ProtocolError():
            status = 413 if exc.code is ErrorCode.MESSAGE_TOO_LARGE else 400
            # `invalid_frame` is the WebSocket's word; over HTTP it is `invalid_request`.
            code = ErrorCode.INVALID_REQUEST if exc.code is ErrorCode.INVALID_FRAME else exc.code
            return error_json(code.value, exc.message, status)
        case Unauthorized():
            return error_json(exc.code.value, exc.message, 401, {"WWW-Authenticate": "X-API-Key"})
        case OutcomeUnknown():
            # 504, not 503: Redis (the upstream) took the publish and did not answer in
            # time, so unlike a 503 this does not say that nothing was done; the message
            # says how to retry safely.
            return error_json(exc.code.value, exc.message, 504)
        case BrokerUnavailable():
            return error_json(exc.code.value, f"{exc.message}; retry later", 503)
        case NotStarted():
            logger.error("%s", exc.message)
            return error_json(exc.code.value, exc.message, 500)
    return error_json(exc.wire_code(), exc.message, 500)


def validation_error_message(errors: Sequence[Any]) -> str:
    """One line for FastAPI's validation errors, such as a `limit` that is not a number."""
    parts = []
    for error in errors:
        location = [str(part) for part in error.get("loc", ())]
        if len(location) > 1 and location[0] in ("query", "header", "path", "cookie"):
            where = f"{location[0]} parameter {' '.join(location[1:])}"
        else:
            where = " ".join(location) or "request"
        text = f"{where}: {error.get('msg', 'invalid')}"
        if "input" in error and isinstance(error["input"], str | int | float):
            given = repr(error["input"])
            text += f", got {given if len(given) <= 40 else given[:37] + '...'}"
        parts.append(text)
    return "; ".join(parts) or "invalid request"


def error_json(
    code: str, message: str, status: int, headers: dict[str, str] | None = None
) -> JSONResponse:
    """`{"error": code, "message": message}` with `status`; a 503 or 504 says when to retry."""
    if status in (503, 504):
        headers = {**(headers or {}), "Retry-After": _RETRY_AFTER_SECONDS}
    return JSONResponse({"error": code, "message": message}, status_code=status, headers=headers)
