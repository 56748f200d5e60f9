"""What the routes need of a running worker, built by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from service.auth import ApiKeys, Authenticator
from service.broker import Broker
from service.hub import Hub
from service.limits import ConnectionSlots
from service.metrics import Metrics
from service.outbox import OutboxLimits
from service.protocol.commands import Limits
from service.settings import Settings


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
