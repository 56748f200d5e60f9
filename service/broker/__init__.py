"""The only package that imports broadcaster and redis: publish, subscribe, health."""

from service.broker.broker import Broker, Readiness, Subscription, Unsubscribed

__all__ = ["Broker", "Readiness", "Subscription", "Unsubscribed"]
