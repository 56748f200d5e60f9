"""The only package that imports broadcaster and redis: publish, subscribe, history, health."""

from service.broker.broker import (
    Broker,
    HistoryRead,
    Position,
    Readiness,
    Replayed,
    Subscription,
    Unsubscribed,
)
from service.broker.history import position_of
from service.broker.redis_backend import SUBSCRIPTION_INTERRUPTED, check_redis_url

__all__ = [
    "SUBSCRIPTION_INTERRUPTED",
    "Broker",
    "HistoryRead",
    "Position",
    "Readiness",
    "Replayed",
    "Subscription",
    "Unsubscribed",
    "check_redis_url",
    "position_of",
]
