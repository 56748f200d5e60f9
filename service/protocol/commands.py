"""Client commands of protocol v1 as typed values, and the parser that builds them.

The parser reports every problem as a `ProtocolError` whose code names it, and echoes
the command's `ref` whenever the frame got far enough to have a usable one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from service.channels import validate_channel
from service.errors import ProtocolError, Ref
from service.protocol.codes import ErrorCode

MAX_REF_LENGTH = 128
MAX_IDEMPOTENCY_KEY_LENGTH = 64
# Visible ASCII, no spaces: a key fits an HTTP header as is, and a Redis key name.
_IDEMPOTENCY_KEY = re.compile(f"[!-~]{{1,{MAX_IDEMPOTENCY_KEY_LENGTH}}}")


@dataclass(frozen=True, slots=True)
class Limits:
    """The size limits a command is checked against."""

    max_channel_length: int
    max_data_bytes: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Subscribe to `channel`; `info` (JSON bytes) announces the client with join/leave."""

    channel: str
    since: str | None = None
    info: bytes | None = None
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Stop receiving `channel`."""

    channel: str
    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish `data` (already encoded as compact JSON) to `channel`.

    `idempotency_key`: a publish to `channel` with a key used there before (within
    IDEMPOTENCY_TTL) publishes nothing and is answered with the first id.
    """

    channel: str
    data: bytes
    ref: Ref | None = None
    idempotency_key: str | None = None


@dataclass(frozen=True, slots=True)
class Ping:
    """Application-level ping; answered by `pong`."""

    ref: Ref | None = None


@dataclass(frozen=True, slots=True)
class Refresh:
    """`refresh`: replace the connection's token before it expires."""

    token: str
    ref: Ref | None = None


Command = Subscribe | Unsubscribe | Publish | Ping | Refresh


def encode_json_value(value: object, limits: Limits, what: str, ref: Ref | None) -> bytes:
    """Encode a client-supplied JSON value compactly, enforcing the data size limit."""
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"{what} cannot be encoded as JSON: {exc}", ref=ref
        ) from None
    if len(encoded) > limits.max_data_bytes:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE,
            f"{what} is {len(encoded)} bytes of JSON; the limit is {limits.max_data_bytes}",
            ref=ref,
        )
    return encoded


def validate_idempotency_key(
    value: object, ref: Ref | None = None, what: str = "idempotency_key"
) -> str:
    """`value` if it is a usable idempotency key, else `ProtocolError` (`invalid_frame`)."""
    if isinstance(value, str) and _IDEMPOTENCY_KEY.fullmatch(value):
        return value
    raise ProtocolError(
        ErrorCode.INVALID_FRAME,
        f"{what} must be 1 to {MAX_IDEMPOTENCY_KEY_LENGTH} visible ASCII characters "
        "(letters, digits, punctuation; no spaces), such as a UUID",
        ref=ref,
    )


def _parse_ref(frame: dict[str, object]) -> Ref | None:
    ref = frame.get("ref")
    if ref is None:
        return None
    # bool is an int subclass, but `true` is not a usable reference.
    if isinstance(ref, bool) or not isinstance(ref, (str, int)):
        raise ProtocolError(ErrorCode.INVALID_FRAME, "ref must be a string or an integer")
    if isinstance(ref, str) and len(ref) > MAX_REF_LENGTH:
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, f"ref is longer than {MAX_REF_LENGTH} characters"
        )
    return ref


def parse_command(text: str | bytes, limits: Limits) -> Command:
    """Parse one text frame into a command, or raise `ProtocolError`."""
    try:
        frame = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise ProtocolError(
            ErrorCode.INVALID_FRAME, 'a frame must be a JSON object with a "type" field'
        )
    ref = _parse_ref(frame)
    kind = frame.get("type")
    if kind == "publish":
        channel = validate_channel(frame.get("channel"), limits.max_channel_length, ref=ref)
        if "data" not in frame:
            raise ProtocolError(
                ErrorCode.INVALID_FRAME, 'publish needs a "data" field (any JSON value)', ref=ref
            )
        data = encode_json_value(frame["data"], limits, "data", ref)
        key = frame.get("idempotency_key")
        if key is not None:
            key = validate_idempotency_key(key, ref)
        return Publish(channel, data, ref, key)
    if kind == "subscribe":
        channel = validate_channel(frame.get("channel"), limits.max_channel_length, ref=ref)
        since = frame.get("since")
        if since is not None and not isinstance(since, str):
            raise ProtocolError(
                ErrorCode.INVALID_FRAME, "since must be a message id (a string)", ref=ref
            )
        info = None
        if frame.get("info") is not None:
            info = encode_json_value(frame["info"], limits, "info", ref)
        return Subscribe(channel, since, info, ref)
    if kind == "unsubscribe":
        channel = validate_channel(frame.get("channel"), limits.max_channel_length, ref=ref)
        return Unsubscribe(channel, ref)
    if kind == "ping":
        return Ping(ref)
    if kind == "refresh":
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise ProtocolError(ErrorCode.INVALID_FRAME, "refresh needs a token", ref=ref)
        return Refresh(token, ref)
    if kind is None:
        raise ProtocolError(ErrorCode.UNKNOWN_TYPE, 'frame has no "type" field', ref=ref)
    raise ProtocolError(
        ErrorCode.UNKNOWN_TYPE,
        f"unknown type {kind!r}; expected subscribe, unsubscribe, publish, ping or refresh",
        ref=ref,
    )
