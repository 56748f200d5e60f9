"""What a client remembers of one channel, and the resume rules of protocol v1.

Bookkeeping only, no I/O (docs/protocol.md, "Resuming"): resume from the last message
id, or before any message from the `position` of the last `subscribed` reply; report a
`Lost` event when a resubscribe could not be resumed.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from service.client.events import Lost, Subscribed


@dataclass
class Subscription:
    """A channel the client was asked to subscribe to, on every connection."""

    channel: str
    info: Any = None
    # Where to resume from: the last message id, or the last `subscribed` position.
    last_id: str | None = None
    # The last `subscribed` reply (None before the first one).
    last_reply: Subscribed | None = None
    # A subscribe was sent on the current connection (awaiting its reply, or confirmed).
    on_server: bool = False
    # Consecutive `unavailable` replies on the current connection.
    retries: int = 0
    waiters: list[asyncio.Future[Subscribed]] = field(default_factory=list)

    def subscribe_frame(self, ref: int) -> dict[str, Any]:
        """The `subscribe` command to send now, resuming when there is somewhere to resume."""
        frame: dict[str, Any] = {"type": "subscribe", "channel": self.channel, "ref": ref}
        if self.last_id is not None:
            frame["since"] = self.last_id
        if self.info is not None:
            frame["info"] = self.info
        return frame

    def saw_message(self, message_id: str) -> None:
        """A message of the channel arrived."""
        self.last_id = message_id

    def confirmed(self, reply: Subscribed) -> Lost | None:
        """Record a `subscribed` reply; the `Lost` event it implies, if any."""
        resubscribed = self.last_reply is not None
        self.last_reply = reply
        self.retries = 0
        if reply.position is not None:
            # Messages that follow come after it, whether or not `since` was honoured.
            self.last_id = reply.position
        # A resubscribe without `since` (no id known: a server that sends no position,
        # and no message came) cannot say what was missed, so it counts as not recovered.
        if reply.recovered is False or (resubscribed and reply.recovered is None):
            return Lost(self.channel, "not_recovered")
        return None

    def connection_ended(self) -> None:
        """The connection is gone, and the server's subscription with it."""
        self.on_server = False
        self.retries = 0

    def settle(self, result: Subscribed | BaseException) -> None:
        """Wake every `subscribe()` waiting for this channel's first reply."""
        for waiter in self.waiters:
            if not waiter.done():
                if isinstance(result, BaseException):
                    waiter.set_exception(result)
                else:
                    waiter.set_result(result)
        self.waiters.clear()
