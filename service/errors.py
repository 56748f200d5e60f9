"""The service's exceptions, each knowing what the client is told.

ServiceError
 ├── ProtocolError        -> `error` frame with its code (HTTP 400/413; its `invalid_frame`
 │                          is `invalid_request` over HTTP); connection carries on
 ├── Unauthorized         -> HTTP 401 (the HTTP API's key)
 └── BrokerUnavailable    -> `error` frame `unavailable` / HTTP 503: nothing was done; retry later
      └── OutcomeUnknown  -> `error` frame `outcome_unknown` / HTTP 504: a publish may or may
                             not have been published; retry it with the same idempotency key
"""

from __future__ import annotations

from service.protocol.codes import ErrorCode

Ref = str | int


class ServiceError(Exception):
    """Base of every error the service raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, ref: Ref | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.ref = ref


class ProtocolError(ServiceError):
    """A client sent something the protocol does not accept."""

    def __init__(self, code: ErrorCode, message: str, *, ref: Ref | None = None) -> None:
        super().__init__(message, ref=ref)
        self.code = code


class Unauthorized(ServiceError):
    """The HTTP API was called without a valid API key (HTTP 401)."""

    code = ErrorCode.UNAUTHORIZED


class BrokerUnavailable(ServiceError):
    """Redis could not be reached or did not answer in time: what was asked was not done."""

    code = ErrorCode.UNAVAILABLE


class OutcomeUnknown(BrokerUnavailable):
    """A publish reached Redis but its answer did not come back: it may have been published.

    A `BrokerUnavailable`, so that whoever handles an outage handles this too; what the
    client is told differs (`outcome_unknown`, HTTP 504): retrying blindly could publish
    twice, retrying with the same idempotency key cannot.
    """

    code = ErrorCode.OUTCOME_UNKNOWN
