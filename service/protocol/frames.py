"""Server frames of protocol v1, encoded to the text sent on the wire.

`message` frames are built by the broker around an id only Redis knows, so this
module gives their two halves; every other frame is a small JSON object.
"""

from __future__ import annotations

from typing import Any

import orjson

from service.errors import Ref

PROTOCOL_VERSION = 1


def _encode(frame: dict[str, Any], ref: Ref | None) -> str:
    if ref is not None:
        frame["ref"] = ref
    return orjson.dumps(frame).decode()


def message_parts(channel: str, data: bytes) -> tuple[bytes, bytes]:
    """The text before and after the message id of a `message` frame.

    The id is assigned in Redis; splicing it between these halves means the frame is
    encoded once, by the publisher, and forwarded byte for byte by every worker.
    """
    return message_head(channel).encode(), b'","data":' + data + b"}"


def message_head(channel: str) -> str:
    """The text every `message` frame of `channel` starts with, up to its id."""
    return '{"type":"message","channel":' + orjson.dumps(channel).decode() + ',"id":"'


def message_id_of(frame: str, head: str) -> str | None:
    """The id of a `message` frame starting with `head` (see `message_head`), else None.

    Reads the id where the encoder put it instead of parsing the frame: it runs once per
    message on every worker.
    """
    if not frame.startswith(head):
        return None
    start = len(head)
    end = frame.find('"', start)
    return None if end < 0 else frame[start:end]


def presence_event(kind: str, channel: str, info: bytes) -> str:
    """A `join` or `leave` frame announcing a subscriber that gave `info`."""
    return (
        '{"type":"'
        + kind
        + '","channel":'
        + orjson.dumps(channel).decode()
        + ',"info":'
        + info.decode()
        + "}"
    )


def gap(channel: str) -> str:
    """Messages of `channel` may be missing between the previous frame and this one."""
    return _encode({"type": "gap", "channel": channel}, None)


def welcome(worker: str) -> str:
    """First frame on `/ws`: which worker the client reached and the protocol version."""
    return _encode({"type": "welcome", "worker": worker, "protocol": PROTOCOL_VERSION}, None)


def subscribed(
    channel: str, ref: Ref | None, recovered: bool | None = None, position: str | None = None
) -> str:
    """Reply to `subscribe`: `position` is the id after which its messages start."""
    frame: dict[str, Any] = {"type": "subscribed", "channel": channel}
    if position is not None:
        frame["position"] = position
    if recovered is not None:
        frame["recovered"] = recovered
    return _encode(frame, ref)


def unsubscribed(channel: str, ref: Ref | None) -> str:
    """Reply to `unsubscribe`."""
    return _encode({"type": "unsubscribed", "channel": channel}, ref)


def published(channel: str, message_id: str, ref: Ref | None) -> str:
    """Reply to `publish`: the id Redis gave the message."""
    return _encode({"type": "published", "channel": channel, "id": message_id}, ref)


def refreshed(expires: float | None, ref: Ref | None) -> str:
    """Reply to `refresh`: the new token's expiry (Unix time)."""
    return _encode({"type": "refreshed", "expires": expires}, ref)


def pong(ref: Ref | None) -> str:
    """Reply to `ping`."""
    return _encode({"type": "pong"}, ref)


def error(code: str, message: str, ref: Ref | None = None) -> str:
    """An `error` frame (`code`: an `ErrorCode`, or an app's own from a hook)."""
    return _encode({"type": "error", "code": str(code), "message": message}, ref)
