"""HTTP API: publish (`POST /api/channels/{channel}/messages`) and read history."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect

from service.api.deps import RuntimeDep, require_api_key
from service.broker import HistoryRead, Position, Replayed
from service.channels import validate_channel
from service.errors import ProtocolError
from service.protocol.codes import ErrorCode
from service.protocol.commands import encode_json_value, validate_idempotency_key

# Backends only: every route needs one of API_KEYS (when auth is on).
router = APIRouter(prefix="/api", dependencies=[Depends(require_api_key)])

_DEFAULT_HISTORY_LIMIT = 100
_MAX_HISTORY_LIMIT = 1000

_KEY_HEADER = "idempotency-key"
# On the answer to a publish whose Idempotency-Key was used before: nothing was published.
_REPLAYED = {"Idempotent-Replayed": "true"}

_PUBLISHED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"channel": {"type": "string"}, "id": {"type": "string"}},
}
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
                "`outcome_unknown` (504) with the same key."
            ),
            "schema": {"type": "string", "maxLength": 64},
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
    responses={200: {"content": {"application/json": {"schema": _PUBLISHED_SCHEMA}}}},
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
            raise ProtocolError(ErrorCode.INVALID_FRAME, "more than one Idempotency-Key header")
        key = validate_idempotency_key(key, what="the Idempotency-Key header")
    body = await _read_body(request, runtime.settings.max_frame_bytes)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"body is not valid JSON: {exc}") from None
    if not isinstance(payload, dict) or "data" not in payload:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, 'body must be a JSON object with a "data" field'
        )
    data = encode_json_value(payload["data"], limits, "data", None)
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
        raise ProtocolError(ErrorCode.INVALID_FRAME, "the body did not arrive whole") from None
    return b"".join(chunks)


@router.get("/channels/{channel}/history")
async def history(
    channel: str,
    runtime: RuntimeDep,
    since: str | None = None,
    limit: str | None = None,
) -> Response:
    """The channel's kept messages, oldest first: the latest `limit`, or those after `since`.

    `position` is the id of the channel's latest message; with `since`, `recovered` says
    whether the messages start right after it (false: history does not reach back).
    """
    validate_channel(channel, runtime.limits.max_channel_length)
    count = _parse_limit(limit)
    broker = runtime.broker
    body: dict[str, Any] = {"channel": channel}
    read: HistoryRead
    if since is None:
        read = await broker.history_latest(channel, count)
    else:
        read = await broker.history_after(channel, Position.parse(since), count)
        body["recovered"] = read.recovered
    body["position"] = str(read.position)
    # Kept frames are whole `message` frames: hand back their id and data only.
    body["messages"] = [_id_and_data(frame) for frame in read.frames]
    return Response(orjson.dumps(body), media_type="application/json")


def _parse_limit(text: str | None) -> int:
    if text is None:
        return _DEFAULT_HISTORY_LIMIT
    if not (text.isdecimal() and len(text) <= 4 and 1 <= int(text) <= _MAX_HISTORY_LIMIT):
        raise ProtocolError(
            ErrorCode.INVALID_FRAME,
            f"limit must be an integer from 1 to {_MAX_HISTORY_LIMIT}, got {text!r}",
        )
    return int(text)


def _id_and_data(frame: str) -> dict[str, Any]:
    message = orjson.loads(frame)
    return {"id": message["id"], "data": message["data"]}
