"""Protocol sessions: `/ws` (protocol v1 commands) and `/ws/{channel}` (simple mode)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.websockets import WebSocket

from service.channels import validate_channel
from service.connection import Connection
from service.errors import BrokerUnavailable, ProtocolError, ServiceError
from service.hub import Joined
from service.protocol import frames
from service.protocol.codes import CloseCode, ErrorCode
from service.protocol.commands import (
    Command,
    Ping,
    Publish,
    Subscribe,
    Unsubscribe,
    encode_json_value,
    parse_command,
)
from service.runtime import Runtime

logger = logging.getLogger(__name__)

_BINARY_MESSAGE = "binary frames are not supported: send JSON text frames"


class _ChannelSession(Connection):
    """A connection that is a member of hub channels and publishes through the broker."""

    def __init__(self, websocket: WebSocket, runtime: Runtime) -> None:
        settings = runtime.settings
        super().__init__(
            websocket,
            max_messages=settings.outbox_max_messages,
            max_chars=settings.outbox_max_bytes,
            # uvicorn's keepalive drops a client that reads nothing by then anyway.
            close_timeout=settings.ws_ping_interval + settings.ws_ping_timeout,
            metrics=runtime.metrics,
        )
        self._rt = runtime
        # channel -> the `info` it announced itself with (None: no join/leave events)
        self._channels: dict[str, bytes | None] = {}
        self._left: list[tuple[str, bytes]] = []

    def send_error(self, error: ServiceError) -> None:
        """Queue an `error` frame for `error`."""
        self._rt.metrics.protocol_errors.labels(error.code.value).inc()
        self.deliver(frames.error(error.code, error.message, error.ref))

    async def handle_bytes(self, data: bytes) -> None:
        """Binary frames are answered with an error; the connection carries on."""
        self.send_error(ProtocolError(ErrorCode.BINARY_NOT_SUPPORTED, _BINARY_MESSAGE))

    async def _join(
        self,
        channel: str,
        info: bytes | None,
        since: str | None = None,
        on_joined: Callable[[Joined], None] | None = None,
    ) -> bool:
        await self._rt.hub.join(channel, self, since, on_joined)
        if self.closing:
            # Closed while the subscription was being made: release() already ran.
            self._rt.hub.leave(channel, self)
            return False
        self._channels[channel] = info
        return True

    def release(self) -> None:
        """Leave every channel (at once: the hub must stop delivering to us)."""
        for channel, info in self._channels.items():
            self._rt.hub.leave(channel, self)
            if info is not None:
                self._left.append((channel, info))
        self._channels.clear()

    async def _announce(self, kind: str, channel: str, info: bytes) -> None:
        try:
            await self._rt.broker.publish_event(channel, frames.presence_event(kind, channel, info))
        except BrokerUnavailable as exc:
            logger.info("%s event on %r not published: %s", kind, channel, exc.message)

    async def run(self) -> None:
        """Serve the connection, then announce the departures it owes."""
        await super().run()
        left, self._left = self._left, []
        for channel, info in left:
            await self._announce("leave", channel, info)


class Session(_ChannelSession):
    """`/ws`: a client speaking protocol v1 (subscribe, unsubscribe, publish, ping)."""

    async def handle_text(self, text: str) -> None:
        """Parse and execute one command; every failure becomes an `error` frame."""
        try:
            command = parse_command(text, self._rt.limits)
            await self._execute(command)
        except ServiceError as exc:
            self.send_error(exc)

    async def _execute(self, command: Command) -> None:
        match command:
            case Publish(channel, data, ref):
                try:
                    message_id = await self._rt.broker.publish(channel, data)
                except BrokerUnavailable as exc:
                    exc.ref = ref
                    raise
                self._rt.metrics.published.labels("ws").inc()
                self.deliver(frames.published(channel, message_id, ref))
            case Subscribe(channel, since, info, ref):
                if channel in self._channels:
                    raise ProtocolError(
                        ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}", ref=ref
                    )

                def reply(joined: Joined) -> None:
                    # Called by the hub just before the channel's first frame can be queued.
                    self.deliver(frames.subscribed(channel, ref, joined.recovered, joined.position))

                try:
                    if not await self._join(channel, info, since, reply):
                        return
                except BrokerUnavailable as exc:
                    exc.ref = ref
                    raise
                if info is not None:
                    await self._announce("join", channel, info)
            case Unsubscribe(channel, ref):
                if channel not in self._channels:
                    raise ProtocolError(
                        ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel!r}", ref=ref
                    )
                info = self._channels.pop(channel)
                self._rt.hub.leave(channel, self)
                self.deliver(frames.unsubscribed(channel, ref))
                if info is not None:
                    await self._announce("leave", channel, info)
            case Ping(ref):
                self.deliver(frames.pong(ref))


class SimpleSession(_ChannelSession):
    """`/ws/{channel}`: subscribed at once; each text frame is published as string data."""

    def __init__(self, websocket: WebSocket, runtime: Runtime, channel: str) -> None:
        super().__init__(websocket, runtime)
        self._channel = channel

    async def run(self) -> None:
        """Join the channel from the URL, then serve the connection."""
        try:
            validate_channel(self._channel, self._rt.limits.max_channel_length)
            await self._join(self._channel, None)
        except ProtocolError as exc:
            self.send_error(exc)
            self.close(CloseCode.POLICY_VIOLATION, "invalid channel name")
        except BrokerUnavailable as exc:
            self.send_error(exc)
            self.close(CloseCode.TRY_AGAIN_LATER, "broker unavailable, retry later")
        await super().run()

    async def handle_text(self, text: str) -> None:
        """Publish the frame's text to the channel."""
        try:
            data = encode_json_value(text, self._rt.limits, "message", None)
            await self._rt.broker.publish(self._channel, data)
        except ServiceError as exc:
            self.send_error(exc)
            return
        self._rt.metrics.published.labels("ws").inc()
