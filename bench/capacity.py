r"""`scripts/capacity`: how many workers, Redis shards, memory and network a load needs.

    scripts/capacity --connections 100000 --channels 1000 \
        --subscribers-per-channel 100 --messages-per-second 200

Arithmetic on the figures measured on this project's machine kind (2 cores), stated
once, in `MEASURED` below, with the command that measured each; docs/capacity.md
quotes them in its table "Measured figures" (tests/unit/test_capacity.py checks that
the two agree) and says how to read the result. CPU is planned at `HEADROOM` of a core
per worker and per Redis shard, so that a burst, a reconnect storm or a slower day of
the machine still fits.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace

# Share of one core a worker or a Redis shard is planned to use: the rest absorbs
# bursts, reconnect storms and the machine's speed changing by 10-20% between days.
HEADROOM = 0.6


@dataclass(frozen=True)
class Figure:
    """One measured figure the model rests on, and where it comes from."""

    name: str
    value: float
    unit: str
    what: str
    command: str


# Every figure the model uses, measured on 2026-12-06 (memory and idle CPU again on
# 2026-12-07, after the service's changes to them) on a 2-core machine shared with
# other jobs; of two runs, the worse figure (docs/capacity.md, "Measured figures", has
# the same table, both runs and where each figure comes from).
MEASURED: dict[str, Figure] = {
    f.name: f
    for f in (
        Figure(
            "delivery_cpu_us",
            15.7,
            "us",
            "worker CPU per delivery (one message to one connection), in a big fan-out",
            "scripts/bench --scenarios fanout-max",
        ),
        Figure(
            "publish_cpu_us",
            238.0,
            "us",
            "worker CPU per publish, on the worker the client published through",
            "scripts/bench --scenarios publish",
        ),
        Figure(
            "receive_cpu_us",
            112.0,
            "us",
            "worker CPU per message it receives from Redis, before its deliveries "
            "(channels' worker CPU per publish, less publish_cpu_us, less 10 deliveries)",
            "scripts/bench --scenarios channels,publish,fanout-max",
        ),
        Figure(
            "redis_publish_cpu_us",
            118.0,
            "us",
            "Redis CPU per publish (the publish script, and the message to one worker)",
            "scripts/bench --scenarios channels",
        ),
        Figure(
            "cluster_shard_publish_cpu_us",
            217.0,
            "us",
            "a Redis Cluster primary's CPU per publish to its shard: the publish script, "
            "the message to its subscribed workers, and the stream to its replica",
            "scripts/bench --redis cluster --scenarios publish",
        ),
        Figure(
            "cluster_publish_cpu_us",
            380.0,
            "us",
            "worker CPU per publish on a Redis Cluster (a publish connection per primary)",
            "scripts/bench --redis cluster --scenarios publish",
        ),
        Figure(
            "idle_cpu_us_per_connection_s",
            2.27,
            "us",
            "worker CPU per open idle connection per second: its keepalive ping every "
            "WS_PING_INTERVAL (20 s) and the pong",
            "python -m bench.many_connections --connections 14300 --workers 1 --loadgens 1 "
            "--idle-seconds 20",
        ),
        Figure(
            "connection_bytes",
            13_366.0,
            "bytes",
            "worker resident memory per idle subscribed connection",
            "scripts/bench --scenarios idle",
        ),
        Figure(
            "worker_base_bytes",
            77_269_285.0,
            "bytes",
            "worker resident memory with no connection",
            "python -m bench.many_connections --connections 100000 --workers 7 --loadgens 6",
        ),
        Figure(
            "worker_connections",
            14_286.0,
            "connections",
            "connections one worker held, subscribed, in the 100,000-connection run",
            "python -m bench.many_connections --connections 100000 --workers 7 --loadgens 6",
        ),
    )
}

# A `message` frame as clients receive it (docs/protocol.md), around `data`: what each
# delivery puts on the wire besides the message itself, for a 20-character channel name.
_FRAME_AROUND_DATA = len('{"type":"message","channel":"","id":"k3v9x2ma:1000000","data":}') + 20
# A WebSocket frame header of a server frame up to 64 KiB: 2 or 4 bytes.
_WS_HEADER = 4


@dataclass(frozen=True)
class Ceilings:
    """What one worker and one Redis shard are planned to carry (CPU at `headroom`)."""

    headroom: float
    worker_connections: int
    worker_deliveries_per_s: float
    worker_publishes_per_s: float
    worker_received_per_s: float
    connection_bytes: float
    worker_base_bytes: float
    redis_publishes_per_s: float
    cluster_shard_publishes_per_s: float
    cluster_worker_publishes_per_s: float
    # Not a ceiling but a standing cost: the share of a core each open connection takes.
    idle_cpu_us_per_connection_s: float


def ceilings(headroom: float = HEADROOM) -> Ceilings:
    """The per-unit ceilings, from `MEASURED` and `headroom` (a share of one core)."""
    m = {name: figure.value for name, figure in MEASURED.items()}
    return Ceilings(
        headroom=headroom,
        worker_connections=int(m["worker_connections"]),
        worker_deliveries_per_s=headroom * 1e6 / m["delivery_cpu_us"],
        worker_publishes_per_s=headroom * 1e6 / m["publish_cpu_us"],
        worker_received_per_s=headroom * 1e6 / m["receive_cpu_us"],
        connection_bytes=m["connection_bytes"],
        worker_base_bytes=m["worker_base_bytes"],
        redis_publishes_per_s=headroom * 1e6 / m["redis_publish_cpu_us"],
        cluster_shard_publishes_per_s=headroom * 1e6 / m["cluster_shard_publish_cpu_us"],
        cluster_worker_publishes_per_s=headroom * 1e6 / m["cluster_publish_cpu_us"],
        idle_cpu_us_per_connection_s=m["idle_cpu_us_per_connection_s"],
    )


@dataclass(frozen=True)
class Load:
    """What the deployment must carry."""

    connections: int
    channels: int
    subscribers_per_channel: int
    messages_per_second: float  # over all channels
    message_bytes: int = 100  # the `data` of one message, as JSON


@dataclass(frozen=True)
class Sizing:
    """The answer: how many of each, and why."""

    workers: int
    workers_for_connections: int
    workers_for_cpu: int
    worker_cpu_share: float  # of one core, per worker, at that many workers
    workers_per_channel: float  # workers holding a channel's subscribers, on average
    redis_shards: int
    worker_memory_bytes: float  # each
    total_worker_memory_bytes: float
    redis_history_bytes: float
    deliveries_per_s: float
    client_egress_bits_per_s: float  # workers to clients
    redis_egress_bits_per_s: float  # Redis to workers
    publish_ingress_bits_per_s: float  # publishers to workers, and workers to Redis
    limit: str  # what decided the number of workers
    warnings: tuple[str, ...] = ()


def workers_per_channel(workers: int, subscribers: int) -> float:
    """How many of `workers` hold at least one of a channel's `subscribers`, on average.

    The load balancer places each connection on any worker (least connections), so a
    channel's subscribers land as if independently and evenly: each worker misses all
    of them with probability (1 - 1/workers)^subscribers.
    """
    if workers <= 0 or subscribers <= 0:
        return 0.0
    return workers * (1 - (1 - 1 / workers) ** subscribers)


def _cpu_share(load: Load, workers: int, c: Ceilings) -> float:
    # Each worker's share of a core: its deliveries, the publishes it takes in, and the
    # messages of every channel it holds a subscriber of, each against its ceiling (a
    # ceiling is `headroom` of a core), plus what its open connections cost standing.
    rate = load.messages_per_second
    deliveries = rate * load.subscribers_per_channel / workers
    publishes = rate / workers
    received = rate * workers_per_channel(workers, load.subscribers_per_channel) / workers
    standing = load.connections / workers * c.idle_cpu_us_per_connection_s / 1e6
    return standing + c.headroom * (
        deliveries / c.worker_deliveries_per_s
        + publishes / c.worker_publishes_per_s
        + received / c.worker_received_per_s
    )


def workers_for_cpu(load: Load, c: Ceilings, max_workers: int = 100_000) -> int | None:
    """The fewest workers that each stay under `c.headroom` of a core; None if none do.

    A worker's share only falls as workers are added (fewer deliveries, publishes and
    channels each), so the answer is found by bisection.
    """
    if _cpu_share(load, max_workers, c) > c.headroom:
        return None
    low, high = 1, max_workers
    while low < high:
        middle = (low + high) // 2
        if _cpu_share(load, middle, c) <= c.headroom:
            high = middle
        else:
            low = middle + 1
    return low


def size(load: Load, c: Ceilings | None = None, max_workers: int = 100_000) -> Sizing:
    """Size a deployment for `load` with the ceilings `c` (default: `ceilings()`).

    One Redis (or a Sentinel group) while its core carries the publishes; else a Redis
    Cluster of at least three primaries, whose workers spend more per publish.
    """
    c = c or ceilings()
    warnings: list[str] = []
    rate = load.messages_per_second
    shards = 1
    if rate > c.redis_publishes_per_s:
        shards = max(3, math.ceil(rate / c.cluster_shard_publishes_per_s))
        c = replace(c, worker_publishes_per_s=c.cluster_worker_publishes_per_s)
    for_connections = max(1, math.ceil(load.connections / c.worker_connections))
    for_cpu = workers_for_cpu(load, c, max_workers)
    if for_cpu is None:
        warnings.append(
            f"no number of workers up to {max_workers:,} keeps each under "
            f"{c.headroom:.0%} of a core: every worker receives the messages of every "
            "channel its clients use, so split the channels over separate deployments"
        )
        for_cpu = max_workers
    workers = max(for_connections, for_cpu)
    share = _cpu_share(load, workers, c)
    spread = workers_per_channel(workers, load.subscribers_per_channel)
    worker_memory = c.worker_base_bytes + load.connections / workers * c.connection_bytes
    frame = load.message_bytes + _FRAME_AROUND_DATA
    deliveries = rate * load.subscribers_per_channel
    # docs/protocol.md: ~4.8 KB per channel with history, then ~1.25x each kept frame
    # (HISTORY_SIZE, 100 by default, per channel that has had at least that many).
    history = load.channels * (4_800 + 100 * 1.25 * frame)
    return Sizing(
        workers=workers,
        workers_for_connections=for_connections,
        workers_for_cpu=for_cpu,
        worker_cpu_share=share,
        workers_per_channel=spread,
        redis_shards=shards,
        worker_memory_bytes=worker_memory,
        total_worker_memory_bytes=worker_memory * workers,
        redis_history_bytes=history,
        deliveries_per_s=deliveries,
        client_egress_bits_per_s=deliveries * (frame + _WS_HEADER) * 8,
        redis_egress_bits_per_s=rate * spread * frame * 8,
        publish_ingress_bits_per_s=rate * frame * 8,
        limit="CPU (deliveries, publishes, messages received)"
        if for_cpu > for_connections
        else "connections per worker",
        warnings=tuple(warnings),
    )


def _bits(value: float) -> str:
    for unit, scale in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,.0f} bit/s"


def _bytes(value: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return f"{value / scale:,.1f} {unit}"
    return f"{value:,.0f} B"


def report(load: Load, sizing: Sizing, c: Ceilings) -> str:
    """The printed answer, with the ceilings it used."""
    lines = [
        f"load: {load.connections:,} connections, {load.channels:,} "
        f"channel{'' if load.channels == 1 else 's'} of "
        f"{load.subscribers_per_channel:,} subscribers, {load.messages_per_second:,g} "
        f"messages/s of {load.message_bytes:,} bytes: "
        f"{sizing.deliveries_per_s:,.0f} deliveries/s",
        "",
        f"workers        {sizing.workers:,} (for connections: "
        f"{sizing.workers_for_connections:,}, for CPU: {sizing.workers_for_cpu:,}; "
        f"decided by {sizing.limit}); each at "
        f"{sizing.worker_cpu_share:.0%} of a core, a channel's subscribers on "
        f"{sizing.workers_per_channel:,.1f} of them on average",
        f"Redis shards   {sizing.redis_shards:,} "
        + (
            "(one Redis, or a Sentinel group, carries the publishes)"
            if sizing.redis_shards == 1
            else "(a Redis Cluster: primaries, each with its replica, for the publishes)"
        ),
        f"memory         {_bytes(sizing.worker_memory_bytes)} per worker, "
        f"{_bytes(sizing.total_worker_memory_bytes)} in all (idle connections; add what "
        "slow clients queue, up to OUTBOX_MAX_BYTES each); Redis history about "
        f"{_bytes(sizing.redis_history_bytes)}",
        f"network        workers to clients {_bits(sizing.client_egress_bits_per_s)}, "
        f"Redis to workers {_bits(sizing.redis_egress_bits_per_s)}, publishes in "
        f"{_bits(sizing.publish_ingress_bits_per_s)} (frames only, before TCP/IP)",
        *(f"WARNING        {w}" for w in sizing.warnings),
        "",
        f"ceilings used (CPU planned at {c.headroom:.0%} of a core; docs/capacity.md):",
        f"  per worker: {c.worker_connections:,} connections, "
        f"{c.worker_deliveries_per_s:,.0f} deliveries/s, {c.worker_publishes_per_s:,.0f} "
        f"publishes/s, {c.worker_received_per_s:,.0f} messages received/s, "
        f"{c.connection_bytes:,.0f} bytes per connection + "
        f"{_bytes(c.worker_base_bytes)}, {c.idle_cpu_us_per_connection_s:g} us of CPU per "
        "open connection per second",
        f"  per Redis: {c.redis_publishes_per_s:,.0f} publishes/s; per Redis Cluster "
        f"shard: {c.cluster_shard_publishes_per_s:,.0f} publishes/s (its workers at "
        f"{c.cluster_worker_publishes_per_s:,.0f} publishes/s)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="scripts/capacity",
        description="Size a deployment: workers, Redis shards, memory and network for a "
        "load, from the figures measured in docs/capacity.md.",
    )
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--channels", type=int, required=True)
    parser.add_argument("--subscribers-per-channel", type=int, required=True)
    parser.add_argument(
        "--messages-per-second", type=float, required=True, help="over all channels"
    )
    parser.add_argument(
        "--message-bytes", type=int, default=100, help="a message's data as JSON (default 100)"
    )
    parser.add_argument(
        "--headroom",
        type=float,
        default=HEADROOM,
        help=f"share of a core to plan each worker and shard at (default {HEADROOM})",
    )
    args = parser.parse_args(argv)
    if min(args.connections, args.channels, args.subscribers_per_channel) < 0:
        parser.error("counts cannot be negative")
    if args.messages_per_second < 0 or args.message_bytes < 0:
        parser.error("rates and sizes cannot be negative")
    if not 0 < args.headroom <= 1:
        parser.error("--headroom is a share of one core: above 0, at most 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the sizing of the load on the command line."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    load = Load(
        args.connections,
        args.channels,
        args.subscribers_per_channel,
        args.messages_per_second,
        args.message_bytes,
    )
    c = ceilings(args.headroom)
    print(report(load, size(load, c), c))
    return 0


if __name__ == "__main__":
    sys.exit(main())
