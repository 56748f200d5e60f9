"""WebSocket close codes and machine-readable error codes of protocol v1."""

from __future__ import annotations

from enum import IntEnum, StrEnum


class CloseCode(IntEnum):
    """Close codes the server uses (RFC 6455 section 7.4.1); never bare numbers in code."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013


class ErrorCode(StrEnum):
    """The `code` of an `error` frame (and of an HTTP error body)."""

    INVALID_JSON = "invalid_json"
    INVALID_FRAME = "invalid_frame"
    # HTTP only: a bad body, query parameter or header (the HTTP API's `invalid_frame`).
    INVALID_REQUEST = "invalid_request"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_CHANNEL = "invalid_channel"
    MESSAGE_TOO_LARGE = "message_too_large"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    ALREADY_SUBSCRIBED = "already_subscribed"
    NOT_SUBSCRIBED = "not_subscribed"
    FORBIDDEN = "forbidden"
    TOO_MANY_SUBSCRIPTIONS = "too_many_subscriptions"
    RATE_LIMITED = "rate_limited"
    INVALID_TOKEN = "invalid_token"
    UNAUTHORIZED = "unauthorized"
    UNAVAILABLE = "unavailable"
    OUTCOME_UNKNOWN = "outcome_unknown"
    INTERNAL = "internal"
