"""The only package that imports broadcaster and redis: publish, subscribe, history, health."""

from service.broker.broker import Broker, HistoryRead, Position, Readiness, Replayed
from service.broker.redis_backend import check_redis_url
from service.broker.sink import ChannelSink

__all__ = [
    "Broker",
    "ChannelSink",
    "HistoryRead",
    "Position",
    "Readiness",
    "Replayed",
    "check_redis_url",
]
