"""The benchmark's scenarios, and how each one is measured.

Each scenario is one run of the load generator against fresh servers. Around its
measured phase the runner reads the servers' CPU counters (all workers plus Redis,
from /proc), so the CPU figures cover exactly the traffic that was measured.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import loadgen
from bench.servers import Servers


@dataclass(frozen=True)
class Scenario:
    """One scenario: what the load generator does (`kind`) and with how many clients."""

    name: str
    kind: str  # fanout, max, idle, burst, storm (bench/loadgen/loadgen.mjs)
    description: str
    subscribers: int
    channels: int = 1
    publishers: int = 1
    rate: float = 0.0  # publishes per second over all channels (fanout, storm)
    window: int = 8  # messages in flight (max)
    duration: float = 10.0  # seconds of the measured phase
    warmup: float = 2.0
    payload: int = 64  # bytes of padding in each message's data


# The scenarios of issue 7: what users compare us with, on the same machine kind.
FULL = [
    Scenario(
        "fanout-50k",
        "fanout",
        "1 channel, 1000 subscribers, 50 publishes/s: 50,000 deliveries/s",
        subscribers=1000,
        rate=50,
        duration=20,
    ),
    Scenario(
        "fanout-max",
        "max",
        "1 channel, 1000 subscribers, publishing as fast as deliveries keep up",
        subscribers=1000,
        duration=10,
    ),
    Scenario(
        "channels",
        "fanout",
        "100 channels of 10 subscribers, 1000 publishes/s from 10 publishers",
        subscribers=1000,
        channels=100,
        publishers=10,
        rate=1000,
        duration=20,
    ),
    # Not a target of its own: `channels` minus this is what receiving and delivering
    # cost (docs/performance.md, "What bounds the rest").
    Scenario(
        "publish",
        "fanout",
        "the publishing path alone: 100 channels nobody subscribes to, 1000 publishes/s",
        subscribers=0,
        channels=100,
        publishers=10,
        rate=1000,
        duration=20,
    ),
    Scenario(
        "idle",
        "idle",
        "5000 idle connections, each subscribed to one of 50 channels",
        subscribers=5000,
        channels=50,
    ),
    Scenario(
        "burst",
        "burst",
        "1000 clients connecting and subscribing at once",
        subscribers=1000,
        channels=10,
    ),
    Scenario(
        "storm",
        "storm",
        "1000 subscribers of 10 channels drop at once and resume with `since`",
        subscribers=1000,
        channels=10,
        publishers=2,
        rate=100,
        duration=6,
    ),
]


def smoke(scenario: Scenario) -> Scenario:
    """A small version of `scenario`, for CI: seconds, not minutes."""
    return replace(
        scenario,
        description=f"smoke version of: {scenario.description}",
        subscribers=(
            max(scenario.channels * 2, min(scenario.subscribers // 20, 100))
            if scenario.subscribers
            else 0
        ),
        rate=min(scenario.rate, 50),
        duration=min(scenario.duration, 2.0),
        warmup=0.5,
    )


@dataclass
class Measurement:
    """What the runner measured around one scenario, and the generator's own result."""

    scenario: Scenario
    workers: int
    result: dict[str, Any]
    server_cpu_s: float = 0.0
    worker_cpu_s: float = 0.0
    redis_cpu_s: float = 0.0
    wall_s: float = 0.0
    worker_rss_before: int = 0
    worker_rss_loaded: int = 0
    # Each worker's share of `worker_cpu_s`, in worker order.
    worker_cpu_each: list[float] = field(default_factory=list)
    #: Each Redis process's CPU seconds over the measurement ("redis", or port:role).
    redis_cpu_each: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The figures of the report table."""
        r = self.result
        out: dict[str, Any] = {"scenario": self.scenario.name, "kind": self.scenario.kind}
        deliveries = r.get("deliveries")
        if deliveries:
            out["deliveries_per_s"] = r["deliveries_per_s"]
            out["cpu_s_per_100k"] = self.server_cpu_s / deliveries * 100_000
            out["worker_cpu_s_per_100k"] = self.worker_cpu_s / deliveries * 100_000
            out["redis_cpu_s_per_100k"] = self.redis_cpu_s / deliveries * 100_000
            out["loadgen_cores"] = r["loadgen_cpu_s"] / r["seconds"]
        published = r.get("published")
        if published and self.scenario.kind == "fanout":
            out["cpu_us_per_publish"] = self.server_cpu_s / published * 1e6
            out["worker_cpu_us_per_publish"] = self.worker_cpu_s / published * 1e6
            out["redis_cpu_us_per_publish"] = self.redis_cpu_s / published * 1e6
        if "latency" in r and r["latency"]["samples"]:
            for q in ("p50_ms", "p99_ms", "max_ms"):
                out[q] = r["latency"][q]
        for key in ("lost", "duplicates"):
            if key in r:
                out[key] = r[key]
        if self.scenario.kind == "idle":
            grown = self.worker_rss_loaded - self.worker_rss_before
            out["kb_per_connection"] = grown / r["connections"] / 1024
        if self.scenario.kind == "burst":
            out["all_subscribed_ms"] = r["all_subscribed_ms"]
            out["failures"] = r["failures"]
        if self.scenario.kind == "storm":
            out["all_resubscribed_ms"] = r["all_resubscribed_ms"]
            out["recovered"] = f"{r['recovered']}/{r['clients']}"
        closes = {**r.get("closes", {})}
        if closes:
            out["closes"] = closes
        return out


def run(
    scenario: Scenario,
    workers: int,
    worker_env: dict[str, str],
    workdir: Path,
    uvicorn_overrides: dict[str, str] | None = None,
    *,
    floor: bool = False,
    compare: Path | None = None,
    redis: str = "single",
) -> Measurement:
    """Start fresh servers, drive them through `scenario`, stop them; the measurement.

    With `floor`, the workers are bench/floor.py's, not the service's; with `compare`,
    every second one is the service of that checkout; with `redis="cluster"`, Redis is a
    local Redis Cluster, and its CPU is all of its nodes'.
    """
    servers_of = Servers(
        workdir,
        workers,
        worker_env,
        uvicorn_overrides,
        floor=floor,
        compare=compare,
        redis=redis,
    )
    with servers_of as servers:
        measurement = Measurement(scenario, workers, {})
        marks: dict[str, tuple[float, float, float]] = {}
        each: dict[str, list[float]] = {}
        redis_each: dict[str, dict[str, float]] = {}

        def mark(name: str) -> None:
            servers.check_alive()
            # Each process read once: the workers' figures then add up to their total.
            each[name] = servers.worker_cpu_seconds()
            redis_each[name] = servers.redis_cpu_each()
            redis_cpu = sum(redis_each[name].values())
            marks[name] = (time.monotonic(), sum(each[name]) + redis_cpu, redis_cpu)

        def ready() -> None:
            measurement.worker_rss_loaded = servers.worker_rss()
            mark("start")

        measurement.worker_rss_before = servers.worker_rss()
        config = {
            "kind": scenario.kind,
            "urls": servers.ws_urls(),
            "subscribers": scenario.subscribers,
            "channels": scenario.channels,
            "publishers": scenario.publishers,
            "rate": scenario.rate,
            "window": scenario.window,
            "duration": scenario.duration,
            "warmup": scenario.warmup,
            "payload": scenario.payload,
            "channelPrefix": f"bench-{uuid.uuid4().hex[:8]}-",
            "deflate": True,  # offered, as browsers do; the workers decide
        }
        timeout = 120 + 3 * (scenario.duration + scenario.warmup)
        measurement.result = loadgen.run(
            config,
            on_ready=ready,
            on_drained=lambda: mark("end"),
            timeout=timeout,
            log=workdir / "loadgen.log",
        )
        if "start" in marks and "end" in marks:
            (t0, cpu0, redis0), (t1, cpu1, redis1) = marks["start"], marks["end"]
            measurement.wall_s = t1 - t0
            measurement.server_cpu_s = cpu1 - cpu0
            measurement.redis_cpu_s = redis1 - redis0
            measurement.worker_cpu_s = measurement.server_cpu_s - measurement.redis_cpu_s
            measurement.worker_cpu_each = [
                end - start for start, end in zip(each["start"], each["end"], strict=True)
            ]
            measurement.redis_cpu_each = {
                name: cpu - redis_each["start"].get(name, 0.0)
                for name, cpu in redis_each["end"].items()
            }
        servers.check_alive()
        return measurement
