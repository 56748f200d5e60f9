"""`Client`: protocol v1 over one connection at a time, reconnecting and resuming.

One background task owns the connection: it fetches the token, connects (rotating
through the URLs), reads frames and turns them into events, and after a loss waits as
`backoff` says and connects again. The public methods send on the current connection
and wait for the reply that echoes their `ref`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.frames import CloseCode
from websockets.uri import parse_uri

from service.client.backoff import backoff, retry_delay, should_reconnect
from service.client.channel import Subscription
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
from service.client.tokens import Token, auth_headers, fetch_token, refused

logger = logging.getLogger(__name__)

_UNAVAILABLE = "unavailable"
# The reason reported when the server refused the handshake (HTTP 403) for good.
_REFUSED = "handshake refused"
# At most this much of a refusal's body goes into the reason.
_MAX_REASON = 500

_T = TypeVar("_T")


def _refusal_reason(exc: BaseException) -> str:
    """`exc` (a refused handshake), with the reason the server gave in the body, if any."""
    response = getattr(exc, "response", None)
    body = getattr(response, "body", None) or b""
    reason = body.decode("utf-8", "replace").strip()
    with contextlib.suppress(ValueError, AttributeError):
        reason = str(json.loads(reason)["message"])  # the service's {"error", "message"}
    if reason:
        return f"{exc}: {reason[:_MAX_REASON]}"
    return (
        f"{exc} (no reason given; the server's log says why: a missing, expired or "
        "invalid token, a `channels` claim that is not an object, or a foreign Origin)"
    )


def _dumps(value: Any) -> str:
    # allow_nan=False: NaN is not JSON, and the server would refuse the whole frame.
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


class _EventStream:
    """Async iterator over the event queue; ends (for every reader) once the client closed."""

    def __init__(self, queue: asyncio.Queue[Event | None]) -> None:
        self._queue = queue

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> Event:
        event = await self._queue.get()
        if event is None:
            self._queue.put_nowait(None)  # leave the end mark for the next reader
            raise StopAsyncIteration
        return event


class Client:
    """A protocol v1 client that reconnects, resubscribes with `since` and reports losses.

    `urls` is one WebSocket URL or a list, tried in turn on each reconnect. Use it as
    `async with Client(url) as client:`; entering starts connecting in the background,
    leaving closes the connection and stops reconnecting. `token` is a JWT, or a
    function (possibly async) that returns one: it is called before every connection
    attempt, and the token goes out as `Authorization: Bearer <token>`.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        token: Token = None,
        min_delay: float = 0.25,
        max_delay: float = 10.0,
        open_timeout: float = 5.0,
    ) -> None:
        self._urls = [urls] if isinstance(urls, str) else list(urls)
        if not self._urls:
            raise ValueError("Client needs at least one URL")
        for url in self._urls:
            parse_uri(url)  # a malformed URL is a bug to report now, not a reason to retry
        self._token = token
        self._min_delay = min_delay
        self._max_delay = max_delay
        self._open_timeout = open_timeout
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._state = State.CLOSED
        self._worker: str | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._done = False
        self._closing = False
        self._ws: ClientConnection | None = None
        # The current connection received `welcome`: commands may be sent on it.
        self._open = False
        self._channels: dict[str, Subscription] = {}
        # One counter for the client's life: a late reply can never match a new command.
        self._refs = itertools.count(1)
        self._subscribes: dict[int, str] = {}
        self._unsubscribes: dict[int, tuple[str, asyncio.Future[None]]] = {}
        self._publishes: dict[int, asyncio.Future[str]] = {}
        self._refreshes: dict[int, asyncio.Future[float | None]] = {}
        self._retries: set[asyncio.Task[None]] = set()
        # Retries since the last `welcome`, and the last close code among them.
        self._attempt = 0
        self._cause: int | None = None

    # -- public API -------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The current state: connecting, open, reconnecting or closed."""
        return self._state

    @property
    def worker(self) -> str | None:
        """The worker id from the last `welcome` (None before the first one)."""
        return self._worker

    def events(self) -> AsyncIterator[Event]:
        """Every event, in order; the iteration ends after the client closed."""
        return _EventStream(self._events)

    def start(self) -> None:
        """Start connecting in the background (what entering `async with` does)."""
        if self._task is not None or self._done:
            raise RuntimeError("a Client can be started only once")
        self._set_state(State.CONNECTING)
        self._task = asyncio.create_task(self._run(), name="service.client")

    async def close(self) -> None:
        """Close the connection with 1000 and stop reconnecting (what leaving `async with` does)."""
        task = self._task
        if task is not None and not task.done():
            if not self._closing:
                # Once: a second cancel would interrupt the goodbye (close 1000) in _serve.
                self._closing = True
                task.cancel()
            await asyncio.wait({task})
        if not self._done:
            self._finish(CloseCode.NORMAL_CLOSURE, "closed by the client")
        if task is not None and not task.cancelled() and (error := task.exception()) is not None:
            raise error

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # The documented signature takes a timeout (like asyncio.wait_for), hence the noqa.
    async def wait_connected(self, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Wait until a connection has received `welcome` (TimeoutError after `timeout` s)."""
        async with asyncio.timeout(timeout):
            while not self._open:
                if self._done:
                    raise NotConnected("the client is closed")
                await self._changed.wait()

    async def subscribe(self, channel: str, info: Any = None) -> Subscribed:
        """Subscribe to `channel` now and after every reconnect.

        Waits for the first `subscribed` reply (on this or a later connection) and
        returns it. `info` is announced to the channel's subscribers (`join`, `leave`).
        On a channel already subscribed, only replaces the `info` sent on the next
        resubscribe. Raises `ClientError` on an error reply (`unavailable` is retried,
        not raised), `ConnectionLost` if the client closes before the reply.
        """
        if self._done:
            raise NotConnected("the client is closed")
        _dumps(info)  # what JSON cannot carry fails here, not in the background
        waiter: asyncio.Future[Subscribed] = asyncio.get_running_loop().create_future()
        sub = self._channels.get(channel)
        if sub is not None:
            # Already remembered (as in the browser client): only the `info` sent with
            # the next resubscribe changes; the server is not asked twice.
            sub.info = info
            if sub.last_reply is not None:
                return sub.last_reply
            sub.waiters.append(waiter)
            return await waiter
        sub = Subscription(channel, info)
        sub.waiters.append(waiter)
        self._channels[channel] = sub
        if self._open and self._ws is not None:
            await self._send_subscribe(self._ws, sub)
        return await waiter

    async def unsubscribe(self, channel: str) -> None:
        """Stop receiving `channel` and forget it (nothing happens for an unknown one)."""
        sub = self._channels.pop(channel, None)
        if sub is None:
            return
        sub.settle(ClientError("not_subscribed", f"unsubscribed from {channel!r}"))
        ws = self._ws
        if ws is None or not sub.on_server:
            return
        ref = next(self._refs)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsubscribes[ref] = (channel, done)
        try:
            await ws.send(_dumps({"type": "unsubscribe", "channel": channel, "ref": ref}))
        except ConnectionClosed:
            self._unsubscribes.pop(ref, None)
            return  # the server dropped the subscription with the connection
        await done

    async def publish(self, channel: str, data: Any, *, idempotency_key: str | None = None) -> str:
        """Publish `data` to `channel`; the id Redis gave the message.

        Raises `ClientError` on an error reply, `ConnectionLost` when the connection
        closes before the reply (it may or may not have been published), and
        `NotConnected` at once when there is no open connection: nothing is queued.
        Nothing is retried here. To retry after `ConnectionLost` or the error
        `outcome_unknown` (it may have been published), give an `idempotency_key` (up
        to 64 visible ASCII characters, a UUID say) and the same one again: a publish
        to the channel with a key used there within the server's IDEMPOTENCY_TTL
        publishes nothing and gets the first id.
        """
        frame = {"type": "publish", "channel": channel, "data": data}
        if idempotency_key is not None:
            frame["idempotency_key"] = idempotency_key
        return await self._request(self._publishes, frame)

    async def refresh(self, token: str | None = None) -> float | None:
        """Replace the connection's token before it expires; the new token's `exp`.

        Without `token`, sends what the next connection attempt would: the provider's
        answer (it is called), or the fixed token. A fixed token is replaced by the
        refreshed one for later connections. Raises `ClientError` on an error reply
        (`invalid_token`: invalid, expired, or for another `sub`), `ConnectionLost` and
        `NotConnected` as `publish` does. None: the server does not check tokens.
        """
        if not self._open:
            raise NotConnected()
        fresh = token or await fetch_token(self._token)
        if fresh is None:
            raise ValueError("refresh() needs a token: the client was given none")
        expires = await self._request(self._refreshes, {"type": "refresh", "token": fresh})
        if not callable(self._token):
            self._token = fresh  # a reconnect must not go back to the old token
        return expires

    async def _request(self, replies: dict[int, asyncio.Future[_T]], frame: dict[str, Any]) -> _T:
        """Send `frame` with a new `ref` and wait for the reply that `replies` receives."""
        ws = self._ws
        if ws is None or not self._open:
            raise NotConnected()
        ref = next(self._refs)
        text = _dumps({**frame, "ref": ref})
        reply: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        # Registered before sending: the reply may be read while send() is still awaiting.
        replies[ref] = reply
        try:
            await ws.send(text)
        except ConnectionClosed:
            replies.pop(ref, None)
            if reply.done() and not reply.cancelled():
                reply.exception()  # failed by the reader already: mark it retrieved
            raise ConnectionLost() from None
        try:
            return await reply
        finally:
            replies.pop(ref, None)

    # -- the background task ----------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._connect_loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.exception("service.client failed")
            self._finish(None, f"client failure: {exc!r}")
            raise

    async def _connect_loop(self) -> None:
        for index in itertools.count():
            url = self._urls[index % len(self._urls)]
            if index > 0:
                self._set_state(State.CONNECTING)  # start() reported the first attempt
            code: int | None
            provider = callable(self._token)
            try:
                token = await fetch_token(self._token)
            except Exception as exc:
                # Like a network failure: the provider's backend may be back next time.
                code, reason = None, f"token provider failed: {exc!r}"
                logger.warning("service.client: %s", reason)
            else:
                code, reason = await self._attempt_once(url, token, provider)
                if not should_reconnect(code, reason, fresh_token=provider):
                    self._finish(code, reason)
                    return
                # As in the browser client, which cannot tell a broken connection (1006)
                # from a failed attempt: neither changes the cause.
                if code is not None and code != CloseCode.ABNORMAL_CLOSURE:
                    self._cause = code
            delay = retry_delay(
                self._attempt, self._cause, min_delay=self._min_delay, max_delay=self._max_delay
            )
            self._attempt += 1
            self._set_state(State.RECONNECTING, code, reason, delay)
            await asyncio.sleep(delay)

    async def _attempt_once(
        self, url: str, token: str | None, provider: bool
    ) -> tuple[int | None, str]:
        """Connect to `url` and serve the connection; how it ended (None: attempt failed)."""
        try:
            ws = await connect(
                url,
                additional_headers=auth_headers(token),
                open_timeout=self._open_timeout,
                close_timeout=self._open_timeout,
                # The server bounds its frames; refusing one would end the client.
                max_size=None,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            reason = f"cannot connect to {url}: {exc}"
            logger.debug("%s", reason)
            if refused(exc) and not provider:
                # The same token (or none) would be refused again: stop, as after 1008.
                return CloseCode.POLICY_VIOLATION, f"{_REFUSED}: {_refusal_reason(exc)}"
            return None, reason
        return await self._serve(ws)

    async def _serve(self, ws: ClientConnection) -> tuple[int, str]:
        """Read `ws` until it closes; how it closed (1006 when no close frame came)."""
        self._ws = ws
        # A server that accepts but never says `welcome` is no better than one that does
        # not answer: the attempt fails after open_timeout, and the next URL gets its turn.
        welcome_by = asyncio.get_running_loop().time() + self._open_timeout
        try:
            while True:
                if self._open:
                    raw = await ws.recv()
                else:
                    try:
                        # Cancelling recv() loses nothing (websockets guarantees it).
                        async with asyncio.timeout_at(welcome_by):
                            raw = await ws.recv()
                    except TimeoutError:
                        return CloseCode.ABNORMAL_CLOSURE, "no welcome in time"
                await self._on_frame(ws, raw)
        except ConnectionClosed as closed:
            if closed.rcvd is None:
                return CloseCode.ABNORMAL_CLOSURE, str(closed)
            return closed.rcvd.code, closed.rcvd.reason
        finally:
            self._connection_ended()
            retries, self._retries = self._retries, set()
            for task in retries:
                task.cancel()
            await asyncio.gather(*retries, return_exceptions=True)
            # Closed by close() (cancelled): say goodbye with 1000; else a no-op.
            await ws.close()

    def _connection_ended(self) -> None:
        self._ws = None
        self._open = False
        for reply in self._publishes.values():
            if not reply.done():
                reply.set_exception(ConnectionLost())
        self._publishes.clear()
        for refreshed in self._refreshes.values():
            if not refreshed.done():
                refreshed.set_exception(ConnectionLost())
        self._refreshes.clear()
        for _, done in self._unsubscribes.values():
            if not done.done():
                done.set_result(None)
        self._unsubscribes.clear()
        self._subscribes.clear()
        for sub in self._channels.values():
            sub.connection_ended()

    def _finish(self, code: int | None, reason: str) -> None:
        self._done = True
        for sub in self._channels.values():
            sub.settle(ConnectionLost("the client closed before the reply"))
        self._set_state(State.CLOSED, code, reason)
        self._events.put_nowait(None)

    def _emit(self, event: Event) -> None:
        self._events.put_nowait(event)

    def _notify(self) -> None:
        # Wakes every wait_connected(): each waits on the event current when it looked.
        self._changed.set()
        self._changed = asyncio.Event()

    def _set_state(
        self, state: State, code: int | None = None, reason: str = "", delay: float | None = None
    ) -> None:
        self._state = state
        self._emit(StateChanged(state, code, reason, delay))
        self._notify()

    # -- frames -------------------------------------------------------------------------

    async def _send_subscribe(self, ws: ClientConnection, sub: Subscription) -> None:
        if sub.on_server:
            return
        ref = next(self._refs)
        self._subscribes[ref] = sub.channel
        sub.on_server = True
        # A closed connection is noticed by the reader, which resubscribes on the next.
        with contextlib.suppress(ConnectionClosed):
            await ws.send(_dumps(sub.subscribe_frame(ref)))

    async def _retry_subscribe(self, ws: ClientConnection, sub: Subscription, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._ws is ws and self._channels.get(sub.channel) is sub:
            await self._send_subscribe(ws, sub)

    async def _on_frame(self, ws: ClientConnection, raw: str | bytes) -> None:
        try:
            frame = json.loads(raw)
        except ValueError:
            logger.warning("service.client ignored a frame that is not JSON: %.100r", raw)
            return
        if not isinstance(frame, dict):
            return
        ref = frame.get("ref")
        ref = ref if isinstance(ref, int) and not isinstance(ref, bool) else None
        kind = frame.get("type")
        if kind == "welcome":
            await self._on_welcome(ws, str(frame.get("worker", "")))
        elif kind == "error":
            self._on_error(ws, frame, ref)
        elif kind == "refreshed":
            self._on_refreshed(frame, ref)
        elif (channel := _str_or_none(frame.get("channel"))) is None:
            return  # every other frame we know names its channel; ignore what we do not
        elif kind == "message":
            sub = self._channels.get(channel)
            message_id = str(frame.get("id"))
            if sub is not None:
                sub.saw_message(message_id)
            self._emit(Message(channel, message_id, frame.get("data")))
        elif kind == "subscribed":
            self._on_subscribed(channel, frame, ref)
        elif kind == "published":
            reply = self._publishes.pop(ref, None) if ref is not None else None
            if reply is not None and not reply.done():
                reply.set_result(str(frame.get("id")))
        elif kind == "unsubscribed":
            pending = self._unsubscribes.pop(ref, None) if ref is not None else None
            if pending is not None and not pending[1].done():
                pending[1].set_result(None)
        elif kind == "gap":
            self._emit(Lost(channel, "gap"))
        elif kind == "join" or kind == "leave":
            self._emit(Presence(kind, channel, frame.get("info")))

    async def _on_welcome(self, ws: ClientConnection, worker: str) -> None:
        self._worker = worker
        self._attempt = 0
        self._cause = None
        self._open = True
        self._emit(Welcome(worker))
        self._set_state(State.OPEN)
        for sub in list(self._channels.values()):
            await self._send_subscribe(ws, sub)

    def _on_refreshed(self, frame: dict[str, Any], ref: int | None) -> None:
        reply = self._refreshes.pop(ref, None) if ref is not None else None
        expires = frame.get("expires")
        if isinstance(expires, bool) or not isinstance(expires, int | float):
            expires = None  # null: the server does not check tokens
        if reply is not None and not reply.done():
            reply.set_result(None if expires is None else float(expires))

    def _on_subscribed(self, channel: str, frame: dict[str, Any], ref: int | None) -> None:
        if ref is not None:
            self._subscribes.pop(ref, None)
        recovered = frame.get("recovered")
        event = Subscribed(
            channel,
            recovered if isinstance(recovered, bool) else None,
            _str_or_none(frame.get("position")),
        )
        self._emit(event)
        sub = self._channels.get(channel)
        if sub is None:
            return  # unsubscribed while the subscribe was on its way
        if (lost := sub.confirmed(event)) is not None:
            self._emit(lost)
        sub.settle(event)

    def _on_error(self, ws: ClientConnection, frame: dict[str, Any], ref: int | None) -> None:
        code, message = str(frame.get("code", "")), str(frame.get("message", ""))
        if ref is not None and (reply := self._publishes.pop(ref, None)) is not None:
            if not reply.done():
                reply.set_exception(ClientError(code, message))
            return
        if ref is not None and (refreshed := self._refreshes.pop(ref, None)) is not None:
            if not refreshed.done():
                refreshed.set_exception(ClientError(code, message))
            return
        if ref is not None and ref in self._unsubscribes:
            left, done = self._unsubscribes.pop(ref)
            if not done.done():
                done.set_result(None)
            self._emit(ServerError(code, message, left))
            return
        channel = self._subscribes.pop(ref) if ref in self._subscribes else None
        if channel is None:
            self._emit(ServerError(code, message, _str_or_none(frame.get("channel"))))
            return
        self._emit(ServerError(code, message, channel))
        sub = self._channels.get(channel)
        if sub is None:
            return
        sub.on_server = False
        if code == _UNAVAILABLE:
            delay = backoff(sub.retries, self._min_delay, self._max_delay)
            sub.retries += 1
            task = asyncio.create_task(self._retry_subscribe(ws, sub, delay))
            self._retries.add(task)
            task.add_done_callback(self._retries.discard)
        else:
            del self._channels[channel]
            sub.settle(ClientError(code, message))
