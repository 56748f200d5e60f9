"""The service's exceptions, each knowing what the client is told.

ServiceError
 ├── ProtocolError        -> `error` frame with its code (HTTP 400/413; its `invalid_frame`
 │                          is `invalid_request` over HTTP); connection carries on
 ├── Unauthorized         -> HTTP 401 (the HTTP API's key)
 ├── Refused              -> `error` frame with the app's own code (a hook said no); at the
 │                          handshake, HTTP 403 with it
 ├── HookUnavailable      -> `error` frame `unavailable` / HTTP 503: the app's hook did not
 │                          answer; nothing was done
 └── BrokerUnavailable    -> `error` frame `unavailable` / HTTP 503: nothing was done; retry later
      └── OutcomeUnknown  -> `error` frame `outcome_unknown` / HTTP 504: a publish may or may
                             not have been published; retry it with the same idempotency key
"""

from __future__ import annotations

import re

from service.protocol.codes import ErrorCode

Ref = str | int


class ServiceError(Exception):
    """Base of every error the service raises on purpose."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, ref: Ref | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.ref = ref

    def wire_code(self) -> str:
        """The `code` the client is told."""
        return self.code.value


class ProtocolError(ServiceError):
    """A client sent something the protocol does not accept."""

    def __init__(self, code: ErrorCode, message: str, *, ref: Ref | None = None) -> None:
        super().__init__(message, ref=ref)
        self.code = code


class Unauthorized(ServiceError):
    """The HTTP API was called without a valid API key (HTTP 401)."""

    code = ErrorCode.UNAUTHORIZED


_APP_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")
_RESERVED_CODES = frozenset(code.value for code in ErrorCode) - {ErrorCode.FORBIDDEN.value}


class Refused(ServiceError):
    """Raised by the app's hook to say no; the client sees `code` and `message`.

    `code` is the app's own (lower-case letters, digits and `_`, up to 40), such as
    `"banned_word"`; metrics count every refusal under `forbidden`.
    """

    code = ErrorCode.FORBIDDEN

    def __init__(self, message: str, code: str = "forbidden") -> None:
        if not _APP_CODE.fullmatch(code):
            raise ValueError(
                f"Refused code {code!r}: use 1 to 40 lower-case letters, digits and _, "
                "starting with a letter"
            )
        if code in _RESERVED_CODES:
            # Clients act on these (they retry `unavailable`, for one): not a refusal's.
            raise ValueError(f"Refused code {code!r} is the service's own: choose another")
        super().__init__(message)
        self.app_code = code

    def wire_code(self) -> str:
        """The app's own code."""
        return self.app_code


class HookUnavailable(ServiceError):
    """The app's hook failed or did not answer in time: what was asked was not done."""

    code = ErrorCode.UNAVAILABLE


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
