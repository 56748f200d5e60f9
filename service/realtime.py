"""`Realtime`: the broadcast service as a part of an existing FastAPI app.

    realtime = Realtime(Settings(broadcast_url="redis://127.0.0.1:6379/0"))
    app = FastAPI()
    app.include_router(realtime.router, prefix="/rt")  # its lifespan comes along

    @app.post("/orders")
    async def order(...):
        message_id = await realtime.publish("orders", {"id": 42})

The router holds the WebSocket endpoints (`/ws`, `/ws/{channel}`) and the HTTP API
(`/api/...`); FastAPI runs its lifespan with the including app's. The standalone
service (`create_app`) is built on the same class.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter
from pydantic import JsonValue

from service.api import http
from service.api.deps import STATE_KEY
from service.api.identity import DependencyIdentity, Identify, token_identity
from service.api.ws import websocket_routes
from service.auth import IdentitySource
from service.broker import Readiness
from service.channels import validate_channel
from service.hooks import NO_HOOKS, Hooks
from service.hooks_proxy import ProxyHooks
from service.metrics import Metrics
from service.protocol.commands import encode_json_value, validate_idempotency_key
from service.runtime import Runtime, running
from service.settings import Settings


@dataclass(frozen=True, slots=True)
class Message:
    """One kept message: its id and the published JSON value."""

    id: str
    data: JsonValue


@dataclass(frozen=True, slots=True)
class History:
    """A read of a channel's history, oldest message first.

    `position`: the id of the channel's latest message. `recovered` (reads with `since`
    only): whether `messages` start right after `since`, with nothing missing between.
    """

    channel: str
    position: str
    messages: list[Message]
    recovered: bool | None = None


_RUNNING = "broadcast_service_realtime"


class Realtime:
    """The service's router, lifespan and in-process publish, for one FastAPI app.

    `identify`: a FastAPI dependency that returns the connecting client's `Principal`
    (who it is and which channels it may subscribe and publish to) or None to refuse
    it; instead of the JWT checks of the settings. `hooks`: the app's say on connects,
    subscribes and publishes (`Hooks`); by default the settings' HOOK_* URLs, if any.
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        identify: Callable[..., Any] | None = None,
        hooks: Hooks | None = None,
    ) -> None:
        self.settings = settings if settings is not None else Settings()
        #: The Prometheus metrics of this service (`metrics.registry`).
        self.metrics = Metrics()
        self._identity = IdentitySource.TOKEN if identify is None else IdentitySource.APP
        self.identify: Identify = (
            token_identity if identify is None else DependencyIdentity(identify)
        )
        if hooks is None:
            configured = ProxyHooks.configured(self.settings)
            hooks = ProxyHooks(self.settings) if configured else NO_HOOKS
        self._hooks = hooks
        self._runtime: Runtime | None = None
        #: Include it in the app: `app.include_router(realtime.router, prefix="/rt")`.
        self.router = APIRouter(lifespan=self.lifespan)
        self.router.routes.extend(websocket_routes(self.identify))
        self.router.include_router(http.router)

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[dict[str, Any]]:
        """Connect to Redis and serve until the block exits.

        Included routers bring it along by themselves; call it only to run the service
        without the router (`async with realtime.lifespan(): ...`).
        """
        if self._runtime is not None:
            raise RuntimeError("this Realtime is running already: one lifespan at a time")
        # The routes find the runtime under one key of the lifespan state: a second
        # Realtime in the same app would take the first one's place there.
        state = getattr(app, "state", None)
        if state is not None:
            if getattr(state, _RUNNING, None) is not None:
                raise RuntimeError(
                    "one Realtime per app: this app includes the routers of two; include "
                    "one, and publish to any channel through it"
                )
            setattr(state, _RUNNING, self)
        try:
            async with self._running() as lifespan_state:
                yield lifespan_state
        finally:
            if state is not None:
                delattr(state, _RUNNING)

    @asynccontextmanager
    async def _running(self) -> AsyncIterator[dict[str, Any]]:
        async with running(self.settings, self.metrics, self._hooks, self._identity) as runtime:
            self._runtime = runtime
            try:
                # The routes find it in the lifespan state that the server hands them.
                yield {STATE_KEY: runtime}
            finally:
                self._runtime = None

    @property
    def runtime(self) -> Runtime:
        """The running service's parts; RuntimeError before the lifespan started it."""
        if self._runtime is None:
            raise RuntimeError(
                "the broadcast service is not running: include realtime.router in your app "
                "(its lifespan starts it), or enter `async with realtime.lifespan():`"
            )
        return self._runtime

    async def readiness(self) -> Readiness:
        """Whether Redis answers and the subscriptions are alive (`ready`, else `reason`).

        For the app's own readiness probe, as the standalone service's `/readyz`.
        """
        return await self.runtime.broker.readiness()

    async def publish(
        self, channel: str, data: JsonValue, *, idempotency_key: str | None = None
    ) -> str:
        """Publish `data` to `channel` from the app itself; returns the message id.

        No hook is asked: the app is trusted. Raises `ProtocolError` for a bad channel
        name or data over MAX_DATA_BYTES, `BrokerUnavailable` when Redis cannot be
        reached (nothing was published), and its subclass `OutcomeUnknown` when it may
        have been: retry with the same `idempotency_key` to publish at most once.
        """
        runtime = self.runtime
        validate_channel(channel, runtime.limits.max_channel_length)
        encoded = encode_json_value(data, runtime.limits, "data", None)
        key = None
        if idempotency_key is not None:
            key = validate_idempotency_key(idempotency_key, what="idempotency_key")
        message_id = await runtime.broker.publish(channel, encoded, key)
        runtime.metrics.published_app += 1
        return str(message_id)

    async def history(
        self, channel: str, *, limit: int = http.DEFAULT_HISTORY_LIMIT, since: str | None = None
    ) -> History:
        """The channel's kept messages: the latest `limit`, or the first `limit` after `since`.

        `limit` is 1 to 1000 (ValueError otherwise). A `since` that is not a message id
        of this channel is no error: `recovered` is then false.
        """
        runtime = self.runtime
        validate_channel(channel, runtime.limits.max_channel_length)
        if not 1 <= limit <= http.MAX_HISTORY_LIMIT:
            raise ValueError(f"limit must be 1 to {http.MAX_HISTORY_LIMIT}, got {limit}")
        read = await runtime.broker.history(channel, limit, since)
        messages = [Message(id_, data) for id_, data in read.ids_and_data()]
        recovered = None if since is None else read.recovered
        return History(channel, str(read.position), messages, recovered)
