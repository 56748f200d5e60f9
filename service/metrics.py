"""Prometheus metrics of one worker, in a registry of its own (one per app).

Labels are bounded: never a channel name or a client id.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from service.broker import Broker
    from service.hub import Hub


class Metrics:
    """The worker's counters and gauges."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.connections = Gauge(
            "broadcast_connections",
            "Open WebSocket connections on this worker.",
            registry=self.registry,
        )
        # Plain counts on the hot path, exported at scrape time (`_Counts`): a message
        # would pay a Counter's lock several times (docs/performance.md, "What changed,
        # and what each part bought", no. 5).
        self.published_ws = 0
        self.published_http = 0
        self.published_app = 0  # `Realtime.publish`, from the embedding app's own code
        self.deliveries = 0
        self.frames_direct = 0
        self.frames_queued = 0
        self.received_in_read = 0
        self.received_queued = 0
        self.registry.register(_Counts(self))
        self.slow_consumers = Counter(
            "broadcast_slow_consumer_closes",
            "Connections closed with 1013 because their outbox was full.",
            registry=self.registry,
        )
        self.refused_connections = Counter(
            "broadcast_refused_connections",
            "WebSocket connections closed with 1013 at once because the worker was full.",
            registry=self.registry,
        )
        self.protocol_errors = Counter(
            "broadcast_protocol_errors",
            "Error frames sent, by code.",
            ["code"],
            registry=self.registry,
        )

    def delivered(self, count: int) -> None:
        """Count frames the fan-out handed to local connections."""
        self.deliveries += count

    def watch(self, hub: Hub, broker: Broker) -> None:
        """Also export state read from the hub and the broker at scrape time."""
        self.registry.register(_StateCollector(hub, broker))


class _Counts(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics
        yield _labelled(
            "broadcast_messages_published",
            "Messages published through this worker.",
            "via",
            {
                "ws": metrics.published_ws,
                "http": metrics.published_http,
                "app": metrics.published_app,
            },
        )
        yield CounterMetricFamily(
            "broadcast_deliveries",
            "Frames handed to local connections by the fan-out.",
            value=metrics.deliveries,
        )
        yield _labelled(
            "broadcast_frames_written",
            "Frames written to clients: `direct` at once by the fan-out, `queued` after "
            "waiting in the connection's outbox (slow reader, compression, backlog).",
            "path",
            {"direct": metrics.frames_direct, "queued": metrics.frames_queued},
        )
        yield _labelled(
            "broadcast_frames_received",
            "Frames received from clients: `read` handled from inside the socket's read, "
            "`queued` through uvicorn's queue and the connection's read loop.",
            "path",
            {"read": metrics.received_in_read, "queued": metrics.received_queued},
        )


def _labelled(name: str, documentation: str, label: str, counts: dict[str, int]) -> Metric:
    """A counter family with one sample per value of its one label."""
    family = CounterMetricFamily(name, documentation, labels=[label])
    for value, count in counts.items():
        family.add_metric([value], count)
    return family


class _StateCollector(Collector):
    def __init__(self, hub: Hub, broker: Broker) -> None:
        self._hub = hub
        self._broker = broker

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "broadcast_channels",
            "Channels this worker is subscribed to.",
            value=self._hub.channel_count,
        )
        hub = self._hub
        yield CounterMetricFamily(
            "broadcast_gaps_filled",
            "Interruptions of the worker's subscription to a channel that history covered.",
            value=hub.stats.gaps_filled,
        )
        yield CounterMetricFamily(
            "broadcast_gaps",
            "Interruptions history did not cover: the channel's subscribers got a `gap` frame.",
            value=hub.stats.gaps_reported,
        )
        resumes = CounterMetricFamily(
            "broadcast_resumes",
            "Subscriptions with `since`, by whether history reached back.",
            labels=["recovered"],
        )
        resumes.add_metric(["true"], hub.stats.resumes_recovered)
        resumes.add_metric(["false"], hub.stats.resumes_not_recovered)
        yield resumes
        redis = self._broker.redis
        if redis is None:
            return
        yield GaugeMetricFamily(
            "broadcast_redis_subscriptions_alive",
            "1 when the pub/sub connection is up and every subscription is confirmed.",
            value=1 if redis.subscriptions_alive() else 0,
        )
        yield CounterMetricFamily(
            "broadcast_redis_reconnects",
            "Attempts to rebuild the pub/sub connection.",
            value=redis.reconnects,
        )
        yield CounterMetricFamily(
            "broadcast_redis_canary_checks",
            "Round trips of the worker's own canary through Redis that came back.",
            value=redis.canary_checks,
        )
        yield CounterMetricFamily(
            "broadcast_redis_deaf_detections",
            "Times the worker did not hear its own canary and rebuilt its subscription.",
            value=redis.deaf_detections,
        )
        yield CounterMetricFamily(
            "broadcast_redis_dropped_payloads",
            "Non-UTF-8 payloads skipped by the reader.",
            value=redis.dropped_payloads,
        )
