"""What the routes need of a running worker, and the context that starts and stops it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from service.adapters.uvicorn import adapter_ready, hold_keepalive_while
from service.auth import ApiKeys, Authenticator, IdentitySource
from service.broker import Broker
from service.hooks import Hooks
from service.hub import Hub
from service.limits import ConnectionSlots
from service.metrics import Metrics
from service.outbox import OutboxLimits
from service.protocol.commands import Limits
from service.risks import open_doors
from service.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Runtime:
    """The worker's settings and long-lived parts."""

    settings: Settings
    broker: Broker
    hub: Hub
    metrics: Metrics
    worker_id: str
    limits: Limits
    outbox_limits: OutboxLimits
    authenticator: Authenticator
    api_keys: ApiKeys
    slots: ConnectionSlots
    #: The app's connect, subscribe and publish hooks (none: nothing is asked).
    hooks: Hooks
    #: Who says who a client is: its token, or the embedding app.
    identity: IdentitySource


@asynccontextmanager
async def running(
    settings: Settings, metrics: Metrics, hooks: Hooks, identity: IdentitySource
) -> AsyncIterator[Runtime]:
    """Connect to the backend, start the hub, and stop both on the way out."""
    worker_id = settings.resolved_worker_id()
    async with Broker(settings, worker_id) as broker, hooks:
        hub = Hub(
            broker,
            linger=settings.channel_linger,
            catchup_frames=settings.outbox_max_messages,
            catchup_chars=settings.outbox_max_bytes,
            fanout_chunk=settings.fanout_chunk,
            on_fanout=metrics.delivered,
        )
        metrics.watch(hub, broker)
        runtime = Runtime(
            settings=settings,
            broker=broker,
            hub=hub,
            metrics=metrics,
            worker_id=worker_id,
            limits=Limits(settings.max_channel_length, settings.max_data_bytes),
            outbox_limits=OutboxLimits(settings.outbox_max_messages, settings.outbox_max_bytes),
            authenticator=Authenticator(settings),
            api_keys=ApiKeys(settings.api_keys),
            slots=ConnectionSlots(settings.max_connections),
            hooks=hooks,
            identity=identity,
        )
        for door in open_doors(settings, identity):
            logger.warning("%s", door)
        if settings.fast_adapters:
            adapter_ready()  # checked now rather than at the first connection
        else:
            logger.info("FAST_ADAPTERS=false: public API paths only (slower, same behaviour)")
        logger.info(
            "worker %s ready to serve, backend %s, prefix %r",
            worker_id,
            settings.redacted_url(),
            settings.redis_prefix,
        )
        # A one-to-all reaches every member before the keepalive's pings take their turns.
        loop = asyncio.get_running_loop()
        hold_keepalive_while(loop, hub.fanouts.busy)
        try:
            yield runtime
        finally:
            hold_keepalive_while(loop, None)
            await hub.close()
