"""What a `Client` reports: its state, and the server's frames as frozen dataclasses.

Every event goes into one unbounded queue, in the order it happened; `Client.events()`
reads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal


class State(StrEnum):
    """The connection state of a client (equal to its string: `State.OPEN == "open"`)."""

    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class StateChanged:
    """The client entered `state`.

    `code` and `reason` say why a connection ended (`code` is None when an attempt to
    connect failed); `delay` is the wait, in seconds, before the next attempt when
    `state` is `reconnecting`.
    """

    state: State
    code: int | None = None
    reason: str = ""
    delay: float | None = None


@dataclass(frozen=True, slots=True)
class Welcome:
    """A connection was accepted by `worker`."""

    worker: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """The server confirmed a subscription.

    `recovered` is None on a subscribe without `since` (the first one), True when every
    message after `since` follows, False when some may be lost (a `Lost` event follows).
    `position` is the id of the last message before the ones this subscription delivers
    (None from a server that does not send it).
    """

    channel: str
    recovered: bool | None = None
    position: str | None = None


@dataclass(frozen=True, slots=True)
class Message:
    """A message published to a channel this client is subscribed to."""

    channel: str
    id: str
    data: Any


@dataclass(frozen=True, slots=True)
class Lost:
    """Messages of `channel` may have been missed: resync it from your source of truth.

    `not_recovered`: a resubscribe could not be resumed from the last message seen;
    `gap`: the server lost messages between the previous frame and this point.
    """

    channel: str
    reason: Literal["not_recovered", "gap"]


@dataclass(frozen=True, slots=True)
class Presence:
    """A subscriber that announced itself with `info` joined or left `channel`."""

    kind: Literal["join", "leave"]
    channel: str
    info: Any


@dataclass(frozen=True, slots=True)
class ServerError:
    """An `error` frame not tied to a publish (those raise `ClientError` instead).

    `channel` is the channel of the subscribe or unsubscribe that caused it, if any.
    """

    code: str
    message: str
    channel: str | None = None


Event = StateChanged | Welcome | Subscribed | Message | Lost | Presence | ServerError
