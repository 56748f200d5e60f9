"""The only package that imports broadcaster and redis: publish, subscribe, health."""

from service.broker.broker import Broker, Readiness, Subscription, Unsubscribed
from service.broker.redis_backend import check_redis_url

__all__ = ["Broker", "Readiness", "Subscription", "Unsubscribed", "check_redis_url"]
