"""Protocol sessions: `/ws` (protocol v1 commands) and `/ws/{channel}` (simple mode)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from functools import partial

from starlette.websockets import WebSocket

from service.auth import InvalidToken, Principal
from service.channels import validate_channel
from service.connection import Connection
from service.errors import BrokerUnavailable, ProtocolError, Ref, ServiceError
from service.hub import Joined
from service.limits import PublishLimiter, TokenBucket
from service.protocol import frames
from service.protocol.codes import CloseCode, ErrorCode
from service.protocol.commands import (
    Command,
    Ping,
    Publish,
    Refresh,
    Subscribe,
    Unsubscribe,
    encode_json_value,
    parse_command,
)
from service.runtime import Runtime

logger = logging.getLogger(__name__)

_BINARY_MESSAGE = "binary frames are not supported: send JSON text frames"
# A token lives minutes or hours; nobody needs more refreshes than this.
_REFRESH_RATE = 0.2  # per second
_REFRESH_BURST = 10


class _ChannelSession(Connection):
    """A connection that is a member of hub channels and publishes through the broker."""

    def __init__(self, websocket: WebSocket, runtime: Runtime, principal: Principal) -> None:
        settings = runtime.settings
        super().__init__(
            websocket,
            max_messages=settings.outbox_max_messages,
            max_chars=settings.outbox_max_bytes,
            close_timeout=settings.ws_close_timeout,
            metrics=runtime.metrics,
        )
        self._rt = runtime
        self._principal = principal
        # Made on first use: most connections never publish nor refresh, and an idle
        # connection's every byte counts (docs/performance.md).
        self._publishes: PublishLimiter | None = None
        self._refreshes: TokenBucket | None = None
        self._expiry: asyncio.TimerHandle | None = None
        # channel -> the `info` it announced itself with (None: no join/leave events)
        self._channels: dict[str, bytes | None] = {}
        self._left: list[tuple[str, bytes]] = []

    def send_error(self, error: ServiceError) -> None:
        """Queue an `error` frame for `error` (nothing once the connection is closing)."""
        if self.closing:
            return
        self._rt.metrics.protocol_errors.labels(error.code.value).inc()
        self.deliver(frames.error(error.code, error.message, error.ref))

    async def handle_bytes(self, data: bytes) -> None:
        """Binary frames are answered with an error; the connection carries on."""
        self.send_error(ProtocolError(ErrorCode.BINARY_NOT_SUPPORTED, _BINARY_MESSAGE))

    def _may_publish(self, channel: str, ref: Ref | None) -> None:
        """Raise unless this connection may publish to `channel` now."""
        if not self._principal.may_publish(channel):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"not allowed to publish to {channel!r}", ref=ref
            )
        if self._publishes is None:
            settings = self._rt.settings
            self._publishes = PublishLimiter(settings.publish_rate, settings.publish_burst)
        if self._publishes.allow():
            return
        error = ProtocolError(
            ErrorCode.RATE_LIMITED,
            f"more than {self._rt.settings.publish_rate:g} publishes per second: slow down",
            ref=ref,
        )
        if self._publishes.abusive():
            # Refused again and again without slowing down: not a client that listens.
            self.send_error(error)
            self.close(CloseCode.POLICY_VIOLATION, "publish rate limit exceeded repeatedly")
        raise error

    def _may_subscribe(self, channel: str, ref: Ref | None) -> None:
        """Raise unless this connection may subscribe to `channel`."""
        if not self._principal.may_subscribe(channel):
            raise ProtocolError(
                ErrorCode.FORBIDDEN, f"not allowed to subscribe to {channel!r}", ref=ref
            )
        if len(self._channels) >= self._rt.settings.max_subscriptions:
            raise ProtocolError(
                ErrorCode.TOO_MANY_SUBSCRIPTIONS,
                f"at most {self._rt.settings.max_subscriptions} subscriptions per connection",
                ref=ref,
            )

    def _watch_expiry(self) -> None:
        """Close the connection with 1008 when its token expires (unless refreshed)."""
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        expires_at = self._principal.expires_at
        if expires_at is not None:
            # The token was accepted with the leeway; it lapses with it too.
            delay = expires_at + self._rt.settings.jwt_leeway - time.time()
            self._expiry = asyncio.get_running_loop().call_later(
                max(0.0, delay), self.close, CloseCode.POLICY_VIOLATION, "token expired"
            )

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

    def _publish_now(
        self, channel: str, data: bytes, ref: Ref | None, *, ack: bool, key: str | None = None
    ) -> None:
        """Publish from inside the read; the next message waits until Redis answered."""
        self._hold()
        self._rt.broker.publish_now(channel, data, partial(self._published, channel, ref, ack), key)

    def _published(
        self, channel: str, ref: Ref | None, ack: bool, outcome: str | Exception
    ) -> None:
        # What `handle_text` does after its `await` of the publish.
        self._release_hold()
        if isinstance(outcome, str):
            self._rt.metrics.published_ws += 1
            if ack and not self.closing:
                self.deliver(frames.published(channel, outcome, ref))
        elif isinstance(outcome, BrokerUnavailable):  # `OutcomeUnknown` too: its own code
            outcome.ref = ref
            self.send_error(outcome)
        else:
            # As for a command that raised in the read loop: logged, closed with 1011.
            logger.error("publishing failed", exc_info=outcome)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _announce(self, kind: str, channel: str, info: bytes) -> None:
        try:
            await self._rt.broker.publish_event(channel, frames.presence_event(kind, channel, info))
        except BrokerUnavailable as exc:
            logger.info("%s event on %r not published: %s", kind, channel, exc.message)

    async def run(self) -> None:
        """Serve the connection, then announce the departures it owes."""
        self._watch_expiry()
        try:
            await super().run()
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
        left, self._left = self._left, []
        for channel, info in left:
            await self._announce("leave", channel, info)


class Session(_ChannelSession):
    """`/ws`: a client speaking protocol v1 (subscribe, unsubscribe, publish, ping)."""

    def _handle_now(self, text: str) -> bool:
        """Publish and ping from inside the read; the other commands need the read loop."""
        try:
            command = parse_command(text, self._rt.limits)
            match command:
                case Publish(channel, data, ref, key):
                    self._may_publish(channel, ref)
                    self._publish_now(channel, data, ref, ack=True, key=key)
                case Ping(ref):
                    self.deliver(frames.pong(ref))
                case _:
                    return False  # parsed again by `handle_text`: rare, and cheap
        except ServiceError as exc:
            self.send_error(exc)
        return True

    async def handle_text(self, text: str) -> None:
        """Parse and execute one command; every failure becomes an `error` frame."""
        try:
            command = parse_command(text, self._rt.limits)
            await self._execute(command)
        except ServiceError as exc:
            self.send_error(exc)

    async def _execute(self, command: Command) -> None:
        match command:
            case Publish(channel, data, ref, key):
                self._may_publish(channel, ref)
                try:
                    message_id = await self._rt.broker.publish(channel, data, key)
                except BrokerUnavailable as exc:
                    exc.ref = ref
                    raise
                self._rt.metrics.published_ws += 1
                self.deliver(frames.published(channel, message_id, ref))
            case Subscribe(channel, since, info, ref):
                if channel in self._channels:
                    raise ProtocolError(
                        ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}", ref=ref
                    )
                self._may_subscribe(channel, ref)

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
            case Refresh(token, ref):
                await self._refresh(token, ref)

    async def _refresh(self, token: str, ref: Ref | None) -> None:
        if self._refreshes is None:
            # Verifying a token costs far more than any other command.
            self._refreshes = TokenBucket(_REFRESH_RATE, _REFRESH_BURST)
        if not self._refreshes.take():
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many refreshes", ref=ref)
        if self._principal.anonymous and self._rt.authenticator.enabled:
            # No subject can match: refused without spending a verification on it.
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN, "connect with a token to refresh one", ref=ref
            )
        try:
            principal = self._rt.authenticator.authenticate(token)
        except InvalidToken as exc:
            raise ProtocolError(ErrorCode.INVALID_TOKEN, exc.reason, ref=ref) from None
        if principal.subject != self._principal.subject:
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN, "the new token is for another subject", ref=ref
            )
        self._principal = principal
        self._watch_expiry()
        self.deliver(frames.refreshed(principal.expires_at, ref))
        # Permissions the new token no longer grants end now, or refreshing would keep
        # a revoked subscription alive for as long as the client stays connected.
        for channel in [c for c in self._channels if not principal.may_subscribe(c)]:
            info = self._channels.pop(channel)
            self._rt.hub.leave(channel, self)
            self.deliver(frames.unsubscribed(channel, None))
            if info is not None:
                await self._announce("leave", channel, info)


class SimpleSession(_ChannelSession):
    """`/ws/{channel}`: subscribed at once; each text frame is published as string data."""

    def __init__(
        self, websocket: WebSocket, runtime: Runtime, principal: Principal, channel: str
    ) -> None:
        super().__init__(websocket, runtime, principal)
        self._channel = channel

    async def run(self) -> None:
        """Join the channel from the URL, then serve the connection."""
        try:
            validate_channel(self._channel, self._rt.limits.max_channel_length)
            self._may_subscribe(self._channel, None)
            await self._join(self._channel, None)
        except ProtocolError as exc:
            self.send_error(exc)
            forbidden = exc.code is ErrorCode.FORBIDDEN
            self.close(
                CloseCode.POLICY_VIOLATION,
                "forbidden channel" if forbidden else "invalid channel name",
            )
        except BrokerUnavailable as exc:
            self.send_error(exc)
            self.close(CloseCode.TRY_AGAIN_LATER, "broker unavailable, retry later")
        await super().run()

    def _handle_now(self, text: str) -> bool:
        """Publish the frame's text from inside the read."""
        try:
            data = encode_json_value(text, self._rt.limits, "message", None)
            self._may_publish(self._channel, None)
            self._publish_now(self._channel, data, None, ack=False)
        except ServiceError as exc:
            self.send_error(exc)
        return True

    async def handle_text(self, text: str) -> None:
        """Publish the frame's text to the channel."""
        try:
            data = encode_json_value(text, self._rt.limits, "message", None)
            self._may_publish(self._channel, None)
            await self._rt.broker.publish(self._channel, data)
        except ServiceError as exc:
            self.send_error(exc)
            return
        self._rt.metrics.published_ws += 1
