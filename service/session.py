"""Protocol sessions: `/ws` (protocol v1 commands) and `/ws/{channel}` (simple mode).

A session speaks the protocol over one `Connection`: each client message reaches
`handle_text` once, and each command has one method. What must wait (a publish for
Redis's answer, a subscribe for Redis's confirmation) is returned to the connection,
which takes the next message once it is done.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any

import orjson
from starlette.websockets import WebSocket

from service.auth import IdentitySource, InvalidToken, Principal
from service.channels import validate_channel
from service.connection import Connection
from service.errors import (
    BrokerUnavailable,
    HookUnavailable,
    ProtocolError,
    Ref,
    Refused,
    ServiceError,
)
from service.hooks import PublishHook, ask
from service.hub import Joined
from service.limits import PublishLimiter, TokenBucket
from service.protocol import frames
from service.protocol.codes import CloseCode, ErrorCode
from service.protocol.commands import (
    Ping,
    Publish,
    Refresh,
    Subscribe,
    Unsubscribe,
    encode_json_value,
    parse_command,
)
from service.runtime import Runtime
from service.transport import Transport

logger = logging.getLogger(__name__)

_BINARY_MESSAGE = "binary frames are not supported: send JSON text frames"
# A token lives minutes or hours; nobody needs more refreshes than this.
_REFRESH_RATE = 0.2  # per second
_REFRESH_BURST = 10


class _ChannelSession:
    """A client's channel memberships and publishes, over one connection."""

    __slots__ = (
        "_asked_subscribes",
        "_channels",
        "_expiry",
        "_left",
        "_principal",
        "_publishes",
        "_refreshes",
        "_rt",
        "connection",
    )

    def __init__(
        self, websocket: WebSocket, transport: Transport, runtime: Runtime, principal: Principal
    ) -> None:
        settings = runtime.settings
        #: The hub's member for this client: it delivers the channels' frames.
        self.connection = Connection(
            websocket,
            transport,
            self,
            limits=runtime.outbox_limits,
            close_timeout=settings.ws_close_timeout,
            metrics=runtime.metrics,
        )
        self._rt = runtime
        self._principal = principal
        # Made on first use: most connections never publish nor refresh, and memory per
        # idle connection is what bounds a worker (docs/performance.md, "What bounds the rest").
        self._publishes: PublishLimiter | None = None
        self._refreshes: TokenBucket | None = None
        self._asked_subscribes: TokenBucket | None = None
        self._expiry: asyncio.TimerHandle | None = None
        # channel -> the `info` it announced itself with (None: no join/leave events)
        self._channels: dict[str, bytes | None] = {}
        self._left: list[tuple[str, bytes]] = []

    def deliver(self, frame: str) -> None:
        """Send `frame` to the client (see `Connection.deliver`)."""
        self.connection.deliver(frame)

    def close(self, code: CloseCode, reason: str) -> None:
        """Close the connection once what is queued has gone out."""
        self.connection.close(code, reason)

    def send_error(self, error: ServiceError) -> None:
        """Queue an `error` frame for `error` (nothing once the connection is closing)."""
        if self.connection.closing:
            return
        self._rt.metrics.protocol_errors.labels(error.code.value).inc()
        self.connection.deliver(frames.error(error.wire_code(), error.message, error.ref))

    def handle_text(self, text: str) -> Awaitable[None] | None:
        """Act on one text message (the subclass's commands)."""
        raise NotImplementedError

    def handle_bytes(self, data: bytes) -> None:
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

    async def _ask_subscribe(self, channel: str, ref: Ref | None) -> None:
        """Ask the app's subscribe hook, if one covers `channel`; raise if it says no.

        Each call costs the app a call (an HTTP request, standalone): as many per second
        as publishes.
        """
        hook = self._rt.hooks.subscribe_hook(channel)
        if hook is None:
            return
        if self._asked_subscribes is None:
            settings = self._rt.settings
            self._asked_subscribes = TokenBucket(settings.publish_rate, settings.publish_burst)
        if not self._asked_subscribes.take():
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                f"more than {self._rt.settings.publish_rate:g} subscribes per second to "
                "channels the app is asked about: slow down",
                ref=ref,
            )
        await ask(self._rt.hooks, "subscribe", hook, (self._principal, channel), ref)

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
        connection = self.connection
        await self._rt.hub.join(channel, connection, since, on_joined)
        if connection.closing:
            # Closed while the subscription was being made: release() already ran.
            self._rt.hub.leave(channel, connection)
            return False
        self._channels[channel] = info
        return True

    def _leave(self, channel: str, ref: Ref | None) -> Coroutine[Any, Any, None] | None:
        """Leave `channel` and say so; the leave event to announce, if any."""
        info = self._channels.pop(channel)
        self._rt.hub.leave(channel, self.connection)
        self.connection.deliver(frames.unsubscribed(channel, ref))
        return None if info is None else self._announce("leave", channel, info)

    def release(self) -> None:
        """Leave every channel (at once: the hub must stop delivering to us)."""
        for channel, info in self._channels.items():
            self._rt.hub.leave(channel, self.connection)
            if info is not None:
                self._left.append((channel, info))
        self._channels.clear()

    def _publish(
        self, channel: str, data: bytes, ref: Ref | None, key: str | None, *, ack: bool
    ) -> Awaitable[None]:
        """Publish; what is returned is done once Redis answered (the next waits)."""
        self._may_publish(channel, ref)
        hook = self._rt.hooks.publish_hook(channel)
        if hook is not None:
            return self._answering(self._publish_hooked(hook, channel, data, ref, key, ack))
        return self._publish_now(channel, data, ref, key, ack)

    async def _publish_hooked(
        self,
        hook: PublishHook,
        channel: str,
        data: bytes,
        ref: Ref | None,
        key: str | None,
        ack: bool,
    ) -> None:
        # The hook sees the data as JSON values and may hand back others, checked anew.
        args = (self._principal, channel, orjson.loads(data))
        value = await ask(self._rt.hooks, "publish", hook, args, ref)
        try:
            data = encode_json_value(value, self._rt.limits, "data", ref)
        except ProtocolError as exc:
            # Not the client's fault: it is told the hook failed, the app's log says why.
            logger.error("the app's publish hook returned unusable data: %s", exc.message)
            raise HookUnavailable("the app's publish hook failed: retry later", ref=ref) from None
        await self._publish_now(channel, data, ref, key, ack)

    def _publish_now(
        self, channel: str, data: bytes, ref: Ref | None, key: str | None, ack: bool
    ) -> asyncio.Future[None]:
        done = asyncio.get_running_loop().create_future()
        self._rt.broker.publish_now(
            channel, data, partial(self._published, done, channel, ref, ack), key
        )
        return done

    def _published(
        self,
        done: asyncio.Future[None],
        channel: str,
        ref: Ref | None,
        ack: bool,
        outcome: str | Exception,
    ) -> None:
        if not done.done():  # cancelled if the connection ended meanwhile
            done.set_result(None)
        if isinstance(outcome, str):
            self._rt.metrics.published_ws += 1
            if ack:
                self.connection.deliver(frames.published(channel, outcome, ref))
        elif isinstance(outcome, BrokerUnavailable):  # `OutcomeUnknown` too: its own code
            outcome.ref = ref
            self.send_error(outcome)
        else:
            logger.error("publishing failed", exc_info=outcome)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")

    async def _announce(self, kind: str, channel: str, info: bytes) -> None:
        try:
            await self._rt.broker.publish_event(channel, frames.presence_event(kind, channel, info))
        except BrokerUnavailable as exc:
            logger.info("%s event on %r not published: %s", kind, channel, exc.message)

    async def _answering(self, command: Awaitable[None]) -> None:
        """Await a command; what it raises of ours becomes an `error` frame."""
        try:
            await command
        except ServiceError as exc:
            self.send_error(exc)

    async def run(self) -> None:
        """Serve the connection, then announce the departures it owes."""
        self._watch_expiry()
        try:
            await self.connection.run()
        finally:
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None
        left, self._left = self._left, []
        for channel, info in left:
            await self._announce("leave", channel, info)


class Session(_ChannelSession):
    """`/ws`: a client speaking protocol v1 (subscribe, unsubscribe, publish, ping, refresh)."""

    __slots__ = ()

    def handle_text(self, text: str) -> Awaitable[None] | None:
        """Parse one command and run it; every failure becomes an `error` frame."""
        try:
            match parse_command(text, self._rt.limits):
                case Publish(channel, data, ref, key):
                    return self._publish(channel, data, ref, key, ack=True)
                case Ping(ref):
                    self.connection.deliver(frames.pong(ref))
                case Subscribe(channel, since, info, ref):
                    return self._answering(self._subscribe(channel, since, info, ref))
                case Unsubscribe(channel, ref):
                    return self._unsubscribe(channel, ref)
                case Refresh(token, ref):
                    return self._answering(self._refresh(token, ref))
        except ServiceError as exc:
            self.send_error(exc)
        return None

    async def _subscribe(
        self, channel: str, since: str | None, info: bytes | None, ref: Ref | None
    ) -> None:
        if channel in self._channels:
            raise ProtocolError(
                ErrorCode.ALREADY_SUBSCRIBED, f"already subscribed to {channel!r}", ref=ref
            )
        self._may_subscribe(channel, ref)
        await self._ask_subscribe(channel, ref)

        def reply(joined: Joined) -> None:
            # Called by the hub just before the channel's first frame can be queued.
            self.connection.deliver(
                frames.subscribed(channel, ref, joined.recovered, joined.position)
            )

        try:
            if not await self._join(channel, info, since, reply):
                return
        except BrokerUnavailable as exc:
            exc.ref = ref
            raise
        if info is not None:
            await self._announce("join", channel, info)

    def _unsubscribe(self, channel: str, ref: Ref | None) -> Awaitable[None] | None:
        if channel not in self._channels:
            raise ProtocolError(ErrorCode.NOT_SUBSCRIBED, f"not subscribed to {channel!r}", ref=ref)
        return self._leave(channel, ref)

    async def _refresh(self, token: str, ref: Ref | None) -> None:
        if self._rt.identity is IdentitySource.APP:
            # The app said who this is; a token must not replace that (with JWTs off,
            # any token would pass as "everyone").
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN,
                "the app identifies clients itself, not by token: reconnect instead",
                ref=ref,
            )
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
        self.connection.deliver(frames.refreshed(principal.expires_at, ref))
        # Permissions the new token no longer grants end now, or refreshing would keep
        # a revoked subscription alive for as long as the client stays connected.
        for channel in [c for c in self._channels if not principal.may_subscribe(c)]:
            announce = self._leave(channel, None)
            if announce is not None:
                await announce


class SimpleSession(_ChannelSession):
    """`/ws/{channel}`: subscribed at once; each text frame is published as string data."""

    __slots__ = ("_channel",)

    def __init__(
        self,
        websocket: WebSocket,
        transport: Transport,
        runtime: Runtime,
        principal: Principal,
        channel: str,
    ) -> None:
        super().__init__(websocket, transport, runtime, principal)
        self._channel = channel

    async def run(self) -> None:
        """Join the channel from the URL, then serve the connection."""
        try:
            validate_channel(self._channel, self._rt.limits.max_channel_length)
            self._may_subscribe(self._channel, None)
            await self._ask_subscribe(self._channel, None)
            await self._join(self._channel, None)
        except (ProtocolError, Refused) as exc:
            self.send_error(exc)
            forbidden = exc.code is ErrorCode.FORBIDDEN
            self.close(
                CloseCode.POLICY_VIOLATION,
                "forbidden channel" if forbidden else "invalid channel name",
            )
        except BrokerUnavailable as exc:
            self.send_error(exc)
            self.close(CloseCode.TRY_AGAIN_LATER, "broker unavailable, retry later")
        except HookUnavailable as exc:
            self.send_error(exc)
            self.close(CloseCode.TRY_AGAIN_LATER, "the app's hook is unavailable, retry later")
        await super().run()

    def handle_text(self, text: str) -> Awaitable[None] | None:
        """Publish the frame's text to the channel."""
        try:
            data = encode_json_value(text, self._rt.limits, "message", None)
            return self._publish(self._channel, data, None, None, ack=False)
        except ServiceError as exc:
            self.send_error(exc)
        return None
