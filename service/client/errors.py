"""Exceptions raised by `Client` methods.

    ClientError(code, message)      an `error` reply of the server (`code` as on the wire)
     ├── NotConnected               "not_connected": no open connection (nothing is queued)
     └── ConnectionLost             "connection_lost": the connection closed before the
                                    reply (a publish may or may not have happened)

The codes of the two subclasses are the ones the browser client uses, so that code
written against either reads the same.
"""

from __future__ import annotations


class ClientError(Exception):
    """A command failed; `code` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NotConnected(ClientError):
    """The client has no open connection (or is closed): the command was not sent."""

    def __init__(self, message: str = "not connected") -> None:
        super().__init__("not_connected", message)


class ConnectionLost(ClientError):
    """The connection closed before the server replied to the command."""

    def __init__(self, message: str = "the connection closed before the reply") -> None:
        super().__init__("connection_lost", message)
