"""HTTP API: publish (`POST /api/channels/{channel}/messages`) and read history."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, NotRequired, ParamSpec, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, JsonValue
from starlette.requests import ClientDisconnect
from typing_extensions import TypedDict

from service.api.deps import RuntimeDep, require_api_key
from service.api.errors import ErrorRoute
from service.broker import Replayed
from service.channels import validate_channel
from service.errors import ProtocolError
from service.protocol.codes import ErrorCode
from service.protocol.commands import encode_json_value, validate_idempotency_key


class ErrorBody(BaseModel):
    """The body of every error answer of the HTTP API."""

    error: str = Field(description="Machine-readable code (docs/protocol.md, Error codes).")
    message: str = Field(description="What is wrong, for people.")


class Published(BaseModel):
    """The answer to a publish."""

    channel: str
    id: str = Field(description="The message's id (the first publish's, when replayed).")


class HistoryMessage(BaseModel):
    """One kept message."""

    id: str
    data: JsonValue = Field(description="The published JSON value.")


class History(TypedDict):
    """The answer to a history read."""

    channel: str
    position: str
    messages: list[HistoryMessage]
    recovered: NotRequired[bool]


_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}


def _error(description: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    answer: dict[str, Any] = {"model": ErrorBody, "description": description}
    if headers:
        answer["headers"] = headers
    return answer


# The statuses each route really answers (tests/integration/test_openapi.py checks them).
_UNAUTHORIZED = _error(
    "`unauthorized`: auth is on and the `X-API-Key` header is missing or not one of API_KEYS.",
    {"WWW-Authenticate": {"schema": {"type": "string"}}},
)
_UNAVAILABLE = _error(
    "`unavailable`: Redis could not be reached; nothing was done. Retry later.", _RETRY_AFTER
)

# Backends only: every route needs one of API_KEYS (when auth is on).
router = APIRouter(
    prefix="/api",
    route_class=ErrorRoute,
    dependencies=[Depends(require_api_key)],
    responses={401: _UNAUTHORIZED, 503: _UNAVAILABLE},
)

#: How many messages a history read returns, unless asked for fewer; and at most.
DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000

P = ParamSpec("P")
T = TypeVar("T")

_KEY_HEADER = "idempotency-key"
# On the answer to a publish whose Idempotency-Key was used before: nothing was published.
_REPLAYED = {"Idempotent-Replayed": "true"}

_BODY_SCHEMA: dict[str, Any] = {
    "parameters": [
        {
            "name": "Idempotency-Key",
            "in": "header",
            "required": False,
            "description": (
                "Up to 64 visible ASCII characters (a UUID, say). A publish to the same "
                "channel with a key used there within IDEMPOTENCY_TTL publishes nothing and "
                "is answered with the first id (and `Idempotent-Replayed: true`): retry an "
                "`outcome_unknown` (504) with the same key. A bad one is a 400 `invalid_request`."
            ),
            "schema": {"type": "string", "minLength": 1, "maxLength": 64},
        }
    ],
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["data"],
                    "properties": {"data": {"description": "Any JSON value."}},
                }
            }
        },
    },
}


@router.post(
    "/channels/{channel}/messages",
    openapi_extra=_BODY_SCHEMA,
    responses={
        200: {
            "model": Published,
            "description": "Published (or replayed: see `Idempotency-Key`).",
            "headers": {
                "Idempotent-Replayed": {
                    "description": "`true` when the key was used before: nothing was published.",
                    "schema": {"type": "string", "enum": ["true"]},
                }
            },
        },
        400: _error(
            "`invalid_json` (the body is not JSON), `invalid_request` (not an object with "
            "`data`, a bad or repeated `Idempotency-Key` header, a body cut short) or "
            "`invalid_channel`."
        ),
        413: _error("`message_too_large`: the body or its `data` is over the limit."),
        504: _error(
            "`outcome_unknown`: Redis did not answer in time; it may have been published. "
            "Retry with the same `Idempotency-Key`.",
            _RETRY_AFTER,
        ),
    },
)
async def publish(channel: str, request: Request, runtime: RuntimeDep) -> Response:
    """Publish `data` to `channel`; returns the message id.

    With an `Idempotency-Key` header, a retry with the same key is published at most once.
    """
    limits = runtime.limits
    validate_channel(channel, limits.max_channel_length)
    key = request.headers.get(_KEY_HEADER)
    if key is not None:
        if len(request.headers.getlist(_KEY_HEADER)) > 1:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, "more than one Idempotency-Key header")
        key = _as_http(validate_idempotency_key, key, what="the Idempotency-Key header")
    body = await _read_body(request, runtime.settings.max_frame_bytes)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or "data" not in payload:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST, 'body must be a JSON object with a "data" field'
        )
    data = _as_http(encode_json_value, payload["data"], limits, "data", None)
    message_id = await runtime.broker.publish(channel, data, key)
    runtime.metrics.published_http += 1
    answer = orjson.dumps({"channel": channel, "id": message_id})
    replayed = key is not None and isinstance(message_id, Replayed)
    return Response(answer, media_type="application/json", headers=_REPLAYED if replayed else None)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE, f"body is {declared} bytes; the limit is {limit}"
        )
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ProtocolError(
                    ErrorCode.MESSAGE_TOO_LARGE, f"body is over the limit of {limit} bytes"
                )
            chunks.append(chunk)
    except ClientDisconnect:
        # Gone before the body was whole (or cut at HANDSHAKE_TIMEOUT): a bad request,
        # not a failure of the worker's, whose answer nobody reads.
        raise ProtocolError(ErrorCode.INVALID_REQUEST, "the body did not arrive whole") from None
    return b"".join(chunks)


@router.get(
    "/channels/{channel}/history",
    responses={
        200: {"model": History, "description": "The messages, oldest first."},
        400: _error("`invalid_request` (a bad `limit`) or `invalid_channel`."),
    },
)
async def history(
    channel: str,
    runtime: RuntimeDep,
    since: Annotated[
        str | None, Query(description="A message id: read the messages after it.")
    ] = None,
    limit: Annotated[
        int,
        Query(ge=1, le=MAX_HISTORY_LIMIT, description="How many messages at most."),
    ] = DEFAULT_HISTORY_LIMIT,
) -> Response:
    """The channel's kept messages, oldest first: the latest `limit`, or those after `since`.

    `position` is the id of the channel's latest message; with `since`, `recovered` says
    whether the messages start right after it (false: history does not reach back).
    """
    validate_channel(channel, runtime.limits.max_channel_length)
    read = await runtime.broker.history(channel, limit, since)
    body: dict[str, Any] = {"channel": channel}
    if since is not None:
        body["recovered"] = read.recovered
    body["position"] = str(read.position)
    body["messages"] = [{"id": id_, "data": data} for id_, data in read.ids_and_data()]
    return Response(orjson.dumps(body), media_type="application/json")


def _as_http(check: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """Run a check shared with the WebSocket; its `invalid_frame` is `invalid_request` here."""
    try:
        return check(*args, **kwargs)
    except ProtocolError as exc:
        if exc.code is ErrorCode.INVALID_FRAME:
            raise ProtocolError(ErrorCode.INVALID_REQUEST, exc.message) from None
        raise


def drop_validation_errors_from_openapi(app: FastAPI) -> None:
    """Keep FastAPI from documenting a 422 no route answers (app.py makes them 400s)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        schema = build()
        for path in schema.get("paths", {}).values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
