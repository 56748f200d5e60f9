"""An asyncio client of the service: reconnects, resubscribes with `since`, reports losses.

It needs only `websockets` and imports nothing of the server, so it can be used on its
own. See docs/clients.md.

    async with Client("ws://127.0.0.1:8000/ws") as client:
        await client.subscribe("chat:lobby")
        async for event in client.events():
            ...
"""

from __future__ import annotations

from service.client.backoff import backoff, retry_delay, should_reconnect
from service.client.client import Client
from service.client.errors import ClientError, ConnectionLost, NotConnected
from service.client.events import (
    Event,
    Lost,
    Message,
    Presence,
    ServerError,
    State,
    StateChanged,
    Subscribed,
    Welcome,
)
from service.client.tokens import TokenProvider

__all__ = [
    "Client",
    "ClientError",
    "ConnectionLost",
    "Event",
    "Lost",
    "Message",
    "NotConnected",
    "Presence",
    "ServerError",
    "State",
    "StateChanged",
    "Subscribed",
    "TokenProvider",
    "Welcome",
    "backoff",
    "retry_delay",
    "should_reconnect",
]
