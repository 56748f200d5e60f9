"""How a connection writes its frames: through the ASGI `send`, with any server.

`Transport` is the public path. A server adapter may hand out a subclass that does the
same faster or with bounds the ASGI interface has no words for (service/adapters/
uvicorn.py `transport_for`); a connection calls these methods and never asks which one
it got.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from service.outbox import Outbox

#: The ASGI `send` callable of a connection.
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class TextReader(Protocol):
    """What takes a client's whole text messages from inside the server's read."""

    def handle_text_now(self, text: str) -> bool:
        """Handle `text` now, from inside the read; False leaves it to `receive()`."""
        ...


class Transport:
    """The public path: every frame through the ASGI `send`, one at a time."""

    __slots__ = ("_asgi_send",)

    def __init__(self, send: Send) -> None:
        self._asgi_send = send

    def write_now(self, frame: str) -> bool:
        """Write `frame` at once if the socket takes it without waiting; False: queue it.

        The public path cannot write without awaiting `send`, so it never does.
        """
        return False

    async def send_from(self, outbox: Outbox) -> int:
        """Send the outbox's frames in order until it is empty; how many were sent.

        A frame leaves the outbox only as it is handed to `send`, so what waits for a
        client that does not read stays counted against the outbox's limits. Raises what
        `send` raises for a client that is gone or a connection that is closed.
        """
        send = self._asgi_send
        sent = 0
        while outbox:
            await send({"type": "websocket.send", "text": outbox.pop()})
            sent += 1
        return sent

    def drop_within(self, delay: float) -> None:
        """Abort the socket unless the connection is gone within `delay` seconds.

        ASGI has no way to abort a socket: the public path leaves it to the server.
        """

    def set_reader(self, reader: TextReader | None) -> None:
        """Offer the client's text messages to `reader` from inside the read (None: stop).

        ASGI hands messages only to `receive()`: the public path ignores this.
        """
