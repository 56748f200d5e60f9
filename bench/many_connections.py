"""`python -m bench.many_connections`: very many WebSocket connections, measured.

    python -m bench.many_connections --connections 100000 --workers 7 --loadgens 6

Starts its own redis-server and `--workers` service workers (bench/servers.py), and
`--loadgens` load generators (bench/loadgen/listeners.c, built by bench/listeners.py)
that open the connections from several loopback source addresses (127.0.0.2,
127.0.0.3, ...) and subscribe every one of them to one channel. Then it measures:

- the workers' memory per connection: their resident memory with every connection
  subscribed and idle, minus the same workers' right after they started, over the
  connections;
- what the idle connections cost the workers' CPU (their keepalive pings);
- one-to-all delivery: a message published over the HTTP API carries its send time
  (CLOCK_MONOTONIC, which the generators read too), and every connection's
  receipt is timed against it: p50, p99, max, and how many received it; repeated
  `--broadcasts` times, `--interval` seconds apart.

It prints progress while connecting and a table at the end, and writes results.json
to `--out`. Everything it starts is stopped by PID on the way out, also on failure,
Ctrl-C, SIGTERM or `--deadline`. docs/capacity.md has a run at 100,000 connections.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from bench import listeners
from bench.servers import Servers, cpu_seconds, rss_bytes

# Open files a worker or a load generator needs besides its connections: a worker's
# Redis connections (REDIS_MAX_CONNECTIONS, 50, plus two), its listening socket, logs,
# epoll and pipes; a generator's stdio and epoll. Generous, so that the last connection never
# meets EMFILE.
FD_RESERVE = 300
# Connections per source address. One address has 28,232 ephemeral ports on this
# kernel (net.ipv4.ip_local_port_range); far below it, a `bind` to port 0 stays cheap.
PER_ADDRESS = 5000
_TICKS = os.sysconf("SC_CLK_TCK")
# What the table checks each run against (docs/capacity.md, "100,000 connections").
GOAL_BYTES_PER_CONNECTION = 16 * 1024
GOAL_P99_MS = 1500.0


class Stop(Exception):
    """The run cannot go on: the deadline passed, or a process failed."""


@dataclass(frozen=True)
class Plan:
    """How the connections are shared out over workers, load generators and addresses."""

    connections: int
    workers: int
    per_worker: int
    # (first connection's global index, how many, its source addresses) per generator.
    loadgens: list[tuple[int, int, list[str]]]

    @property
    def addresses(self) -> list[str]:
        """Every source address used, in order."""
        return [a for _, _, addresses in self.loadgens for a in addresses]


def plan(connections: int, workers: int, loadgens: int, per_address: int, fd_limit: int) -> Plan:
    """Share `connections` out; ValueError saying what to change if a limit is in the way.

    Connection i goes to worker i mod `workers` (the generators keep that global
    numbering), and each generator takes a contiguous block with its own source
    addresses, at most `per_address` connections on each.
    """
    if min(connections, workers, loadgens, per_address) < 1:
        raise ValueError("connections, workers, loadgens and per-address must be positive")
    room = fd_limit - FD_RESERVE
    per_worker = math.ceil(connections / workers)
    if per_worker > room:
        raise ValueError(
            f"{per_worker} connections per worker is over the open-file limit of {fd_limit} "
            f"(less {FD_RESERVE} for the rest): use --workers {math.ceil(connections / room)} "
            "or more"
        )
    if math.ceil(connections / loadgens) > room:
        raise ValueError(
            f"{math.ceil(connections / loadgens)} connections per load generator is over the "
            f"open-file limit of {fd_limit}: use --loadgens {math.ceil(connections / room)} "
            "or more"
        )
    shares: list[tuple[int, int, list[str]]] = []
    offset, next_address = 0, 2
    for n in range(loadgens):
        count = connections // loadgens + (1 if n < connections % loadgens else 0)
        needed = max(1, math.ceil(count / per_address))
        addresses = [f"127.0.0.{next_address + i}" for i in range(needed)]
        next_address += needed
        shares.append((offset, count, addresses))
        offset += count
    if next_address - 1 > 254:
        raise ValueError(
            f"{next_address - 2} source addresses do not fit in 127.0.0.2-127.0.0.254: "
            "raise --per-address"
        )
    return Plan(connections, workers, per_worker, shares)


def percentile(ordered: list[float], q: float) -> float | None:
    """The `q` quantile of sorted values, as the load generator computes its own."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))]


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.many_connections",
        description="Open very many WebSocket connections on one channel; measure the "
        "workers' memory per connection and the time one message takes to reach them all.",
    )
    parser.add_argument(
        "--connections", type=int, default=100_000, help="WebSocket connections (default 100000)"
    )
    parser.add_argument("--workers", type=int, default=7, help="service workers (default 7)")
    parser.add_argument(
        "--loadgens", type=int, default=6, help="load generator processes (default 6)"
    )
    parser.add_argument(
        "--per-address",
        type=int,
        default=PER_ADDRESS,
        help=f"connections per loopback source address (default {PER_ADDRESS})",
    )
    parser.add_argument(
        "--parallel",
        type=int,
        default=64,
        help="handshakes in flight per load generator (default 64)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=3,
        help="rounds in which connections that failed try again, as clients do (default 3)",
    )
    parser.add_argument("--broadcasts", type=int, default=5, help="one-to-all messages (default 5)")
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        help="seconds from one message's last report to the next publish (default 2)",
    )
    parser.add_argument(
        "--receive-timeout",
        type=float,
        default=30.0,
        help="seconds every connection has to receive a message (default 30)",
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=20.0,
        help="seconds over which the idle connections' CPU is measured: one ping interval "
        "(default 20)",
    )
    parser.add_argument(
        "--progress", type=float, default=3.0, help="seconds between progress lines"
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=900.0,
        help="seconds the whole run may take; then everything is stopped (default 900)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a worker setting (repeatable); MAX_CONNECTIONS is set from the plan",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="output folder (default bench/results/<time>)"
    )
    args = parser.parse_args(argv)
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set takes NAME=VALUE, not {item!r}")
    try:
        args.plan = plan(
            args.connections, args.workers, args.loadgens, args.per_address, _fd_limit()
        )
    except ValueError as exc:
        parser.error(str(exc))
    return args


def _fd_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return hard if hard != resource.RLIM_INFINITY else 1 << 20


def _raise_fd_limit() -> None:
    # Children inherit the soft limit: every worker and generator gets the hard one.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


@dataclass
class Generator:
    """One load generator process, its stdout read by a thread into `events`."""

    index: int
    popen: subprocess.Popen[bytes]
    events: queue.Queue[tuple[int, dict[str, Any]]]
    connected: int = 0
    failed: int = 0
    ready: dict[str, Any] | None = None
    result: dict[str, Any] | None = None
    reader: threading.Thread | None = field(default=None, repr=False)

    def start_reading(self) -> None:
        """Hand every JSON line to `events`, then an `exit` event at the end."""

        def read() -> None:
            assert self.popen.stdout is not None
            for raw in self.popen.stdout:
                try:
                    self.events.put((self.index, json.loads(raw)))
                except ValueError:
                    continue
            self.events.put((self.index, {"event": "exit"}))

        self.reader = threading.Thread(target=read, name=f"loadgen-{self.index}", daemon=True)
        self.reader.start()

    def send(self, command: dict[str, Any]) -> None:
        """One command line on its stdin."""
        assert self.popen.stdin is not None
        self.popen.stdin.write(json.dumps(command).encode() + b"\n")
        self.popen.stdin.flush()

    def stop(self) -> None:
        """Kill it if it is still running (its own deadline would end it too)."""
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait(timeout=10)


class Run:
    """One run: the servers, the generators, and the deadline every wait obeys."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.plan: Plan = args.plan
        self.out = out
        self.deadline: float = time.monotonic() + float(args.deadline)
        self.events: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
        self.generators: list[Generator] = []
        self.channel = f"many-{uuid.uuid4().hex[:8]}"
        self.settings = {
            # Room for the plan's share and a few more (e.g. a reconnect).
            "MAX_CONNECTIONS": str(self.plan.per_worker + 100),
            **dict(item.split("=", 1) for item in args.set),
        }

    def left(self) -> float:
        """Seconds left before the deadline; Stop if none."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise Stop(f"the deadline of {self.args.deadline:.0f} s passed")
        return remaining

    def next_event(self, timeout: float) -> tuple[int, dict[str, Any]] | None:
        """The next line of any generator, or None after `timeout` seconds."""
        try:
            return self.events.get(timeout=max(0.01, min(timeout, self.left())))
        except queue.Empty:
            return None

    def start_generators(self, urls: list[str]) -> None:
        """Start every load generator; they start connecting at once."""
        binary = listeners.ensure_built()
        for n, (offset, count, addresses) in enumerate(self.plan.loadgens):
            config = {
                "urls": urls,
                "connections": count,
                "offset": offset,
                "channel": self.channel,
                "localAddresses": addresses,
                "parallel": self.args.parallel,
                "retries": self.args.retries,
                "progressMs": 1000,
                # Its own end, should this process die without stopping it.
                "deadlineMs": int((self.left() + 30) * 1000),
            }
            with open(self.out / f"loadgen-{n}.log", "ab") as log:
                popen = subprocess.Popen(
                    [str(binary), json.dumps(config)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                )
            generator = Generator(n, popen, self.events)
            self.generators.append(generator)
            generator.start_reading()

    def handle(self, event: tuple[int, dict[str, Any]]) -> dict[str, Any]:
        """Note progress and results; Stop on a generator's failure or early exit."""
        index, line = event
        generator = self.generators[index]
        kind = line["event"]
        if kind in ("progress", "ready"):
            generator.connected = int(line["connected"])
            generator.failed = int(line.get("failed", line.get("failures", 0)))
            if kind == "ready":
                generator.ready = line
        elif kind == "result":
            generator.result = line["result"]
        elif kind == "failed":
            raise Stop(f"load generator {index} failed: {line['error']}")
        elif kind == "exit" and generator.result is None:
            raise Stop(
                f"load generator {index} exited with {generator.popen.wait(timeout=10)}: "
                f"see {self.out / f'loadgen-{index}.log'}"
            )
        return line

    def stop(self, servers: Servers | None) -> None:
        """Stop the generators, then every worker at once, then Redis: by PID."""
        for generator in self.generators:
            generator.stop()
        if servers is None:
            return
        # All at once: each takes up to SHUTDOWN_TIMEOUT to close its connections.
        for worker in servers.workers:
            if worker.popen.poll() is None:
                worker.popen.terminate()
        end = time.monotonic() + 20
        while time.monotonic() < end and any(w.popen.poll() is None for w in servers.workers):
            time.sleep(0.1)
        servers.stop()  # SIGKILL for any that did not end; then Redis


def _worker_cpu(servers: Servers) -> float:
    return sum(servers.worker_cpu_seconds())


def _cpu_if_running(pid: int) -> float | None:
    """The process's CPU seconds so far; None if it has ended (`check_alive` says why)."""
    try:
        return cpu_seconds(pid)
    except OSError:
        return None


def _machine_busy_seconds() -> float:
    # CPU seconds every core has spent not idle since boot (/proc/stat's first line).
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / _TICKS


@dataclass
class Window:
    """CPU over a stretch of the run: the workers', and the other processes' on the machine.

    This machine is shared: what other jobs took is what the run's processes could not
    have, so each figure of latency comes with it.
    """

    run: Run
    servers: Servers
    started: float = 0.0
    workers: float = 0.0
    loadgens: dict[int, float] = field(default_factory=dict)
    ours: float = 0.0
    busy: float = 0.0

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.workers, self.loadgens, self.ours, self.busy = self._read()

    def _read(self) -> tuple[float, dict[int, float], float, float]:
        workers = _worker_cpu(self.servers)
        loadgens: dict[int, float] = {}
        for generator in self.run.generators:
            cpu = _cpu_if_running(generator.popen.pid) if generator.popen.poll() is None else None
            if cpu is not None:
                loadgens[generator.popen.pid] = cpu
        redis = (_cpu_if_running(p.pid) for p in self.servers.redis_processes)
        ours = workers + sum(loadgens.values()) + sum(cpu for cpu in redis if cpu is not None)
        return workers, loadgens, ours, _machine_busy_seconds()

    def end(self) -> dict[str, float]:
        """CPU seconds since the start: the workers', the generators', and others' cores."""
        workers, loadgens, ours, busy = self._read()
        elapsed = max(time.monotonic() - self.started, 1e-9)
        return {
            "worker_cpu_s": workers - self.workers,
            # Of the generators running at both ends of the window.
            "loadgen_cpu_s": sum(
                cpu - self.loadgens[pid] for pid, cpu in loadgens.items() if pid in self.loadgens
            ),
            "window_s": elapsed,
            "other_processes_cores": max(0.0, (busy - self.busy) - (ours - self.ours)) / elapsed,
        }


def _settled_rss(servers: Servers, run: Run) -> list[int]:
    """The workers' resident memory once it stops moving (within 0.5% for a second)."""
    previous = [rss_bytes(w.pid) for w in servers.workers]
    end = time.monotonic() + min(15.0, run.left())
    while time.monotonic() < end:
        time.sleep(1.0)
        now = [rss_bytes(w.pid) for w in servers.workers]
        if abs(sum(now) - sum(previous)) <= 0.005 * sum(previous):
            return now
        previous = now
    return previous


def _idle_cpu(run: Run, servers: Servers, connected: int) -> dict[str, Any]:
    """What the open, idle connections cost the workers: their keepalive pings mostly."""
    seconds = min(run.args.idle_seconds, run.left())
    window = Window(run, servers)
    # A measuring window, not a wait for anything: the CPU used over it is the figure.
    time.sleep(seconds)
    figures = window.end()
    cpu, elapsed = figures["worker_cpu_s"], figures["window_s"]
    return {
        "idle_seconds": elapsed,
        "worker_cores_idle": cpu / elapsed,
        "worker_cpu_us_per_connection_s": cpu / elapsed / connected * 1e6 if connected else None,
        "idle_other_processes_cores": figures["other_processes_cores"],
    }


def _connect(run: Run, servers: Servers) -> dict[str, Any]:
    """Start the generators and wait, printing progress, until every one is ready."""
    window = Window(run, servers)
    started = time.monotonic()
    run.start_generators(servers.ws_urls())
    total = run.plan.connections
    next_print = started + run.args.progress
    last = 0
    while any(g.ready is None for g in run.generators):
        event = run.next_event(max(0.0, next_print - time.monotonic()))
        if event is not None:
            run.handle(event)
        if time.monotonic() >= next_print:
            servers.check_alive()
            connected = sum(g.connected for g in run.generators)
            failed = sum(g.failed for g in run.generators)
            elapsed = time.monotonic() - started
            lately = (connected - last) / run.args.progress
            print(
                f"  connecting: {connected:,}/{total:,} subscribed after {elapsed:.0f} s "
                f"({connected / elapsed:,.0f}/s, lately {lately:,.0f}/s), {failed:,} failed, "
                f"workers' RSS {servers.worker_rss() / 2**20:,.0f} MiB",
                flush=True,
            )
            next_print += run.args.progress
            last = connected
    ready = [g.ready for g in run.generators if g.ready is not None]
    connected = sum(int(r["connected"]) for r in ready)
    connect_s = max(float(r["connect_ms"]) for r in ready) / 1000
    figures = window.end()
    cpu = figures["worker_cpu_s"]
    failures = sum(int(r["failures"]) for r in ready)
    first = next((r["first_failure"] for r in ready if r["first_failure"]), None)
    retried = sum(int(r["first_round_failures"]) for r in ready)
    why = next((r["first_round_failure"] for r in ready if r["first_round_failure"]), None)
    print(
        f"  connected: {connected:,}/{total:,} in {connect_s:.1f} s; {retried:,} needed "
        f"another try"
        + (f" (first: {why})" if why else "")
        + f", {failures} never made it"
        + (f" (first: {first})" if first else ""),
        flush=True,
    )
    return {
        "connected": connected,
        "connect_failures": failures,
        "first_failure": first,
        "retried": retried,
        "first_retry_reason": why,
        "failed_attempts": sum(int(r["failed_attempts"]) for r in ready),
        "connect_s": connect_s,
        "connects_per_s": connected / connect_s if connect_s else None,
        "worker_cpu_s_connecting": cpu,
        "worker_cpu_us_per_connect": cpu / connected * 1e6 if connected else None,
        "connect_other_processes_cores": figures["other_processes_cores"],
        "loadgen_rss_mb": [r["loadgen"]["rss_mb"] for r in ready],
    }


def _broadcast(run: Run, servers: Servers, http: httpx.Client, k: int) -> dict[str, Any]:
    """Publish message `k` over HTTP and time its arrival at every connection."""
    window = Window(run, servers)
    sent = time.monotonic()
    response = http.post(
        f"http://127.0.0.1:{servers.ports[k % len(servers.ports)]}"
        f"/api/channels/{run.channel}/messages",
        json={"data": {"k": k, "t": sent * 1000}},
    )
    publish_ms = (time.monotonic() - sent) * 1000
    if response.status_code != 200:
        raise Stop(f"publish {k} answered {response.status_code}: {response.text}")
    for generator in run.generators:
        generator.send({"cmd": "collect", "k": k, "timeoutMs": run.args.receive_timeout * 1000})
    latencies: list[float] = []
    received, still_connected, answered = 0, 0, 0
    end = time.monotonic() + run.args.receive_timeout + 30
    while answered < len(run.generators):
        if time.monotonic() > end:
            raise Stop(f"the load generators did not report broadcast {k}")
        event = run.next_event(end - time.monotonic())
        if event is None:
            continue
        line = run.handle(event)
        if line["event"] == "collected" and line["k"] == k:
            answered += 1
            received += int(line["received"])
            still_connected += int(line["connected"])
            latencies.extend(line["latencies_ms"])
    figures = window.end()
    cpu = figures["worker_cpu_s"]
    latencies.sort()
    return {
        "k": k,
        "expected": run.plan.connections,
        "received": received,
        "connected": still_connected,
        "p50_ms": percentile(latencies, 0.5),
        "p90_ms": percentile(latencies, 0.9),
        "p99_ms": percentile(latencies, 0.99),
        "max_ms": latencies[-1] if latencies else None,
        "publish_ms": publish_ms,
        # Over the time from the publish to the last report: the deliveries, and the
        # little else the workers did meanwhile (pings, the canary).
        "worker_cpu_s": cpu,
        "worker_cpu_us_per_delivery": cpu / received * 1e6 if received else None,
        # The same window: receiving, timing and then reporting every receipt.
        "loadgen_cpu_s": figures["loadgen_cpu_s"],
        "other_processes_cores": figures["other_processes_cores"],
    }


def _close(run: Run) -> dict[str, Any]:
    """Ask every generator to close its connections and report; their totals."""
    for generator in run.generators:
        if generator.popen.poll() is None:
            generator.send({"cmd": "close"})
    while any(g.result is None for g in run.generators):
        event = run.next_event(min(30.0, run.left()))
        if event is None:
            raise Stop("the load generators did not close in 30 s")
        run.handle(event)
    closes: dict[str, int] = {}
    duplicates = 0
    for generator in run.generators:
        assert generator.result is not None
        duplicates += int(generator.result["duplicates"])
        for code, n in generator.result["closes"].items():
            closes[code] = closes.get(code, 0) + int(n)
    return {"duplicates": duplicates, "unexpected_closes": closes}


def measure(run: Run, servers: Servers) -> dict[str, Any]:
    """The run proper, once the servers are up: every figure of results.json."""
    args, plan_ = run.args, run.plan
    idle_rss = [rss_bytes(w.pid) for w in servers.workers]
    result: dict[str, Any] = {
        "connections": plan_.connections,
        "workers": plan_.workers,
        "loadgens": len(plan_.loadgens),
        "connections_per_worker": plan_.per_worker,
        "source_addresses": plan_.addresses,
        "channel": run.channel,
    }
    result.update(_connect(run, servers))
    loaded_rss = _settled_rss(servers, run)
    grown = sum(loaded_rss) - sum(idle_rss)
    connected = result["connected"]
    result.update(
        {
            "worker_rss_idle_bytes": sum(idle_rss),
            "worker_rss_loaded_bytes": sum(loaded_rss),
            "worker_rss_each": [
                {"idle": a, "loaded": b} for a, b in zip(idle_rss, loaded_rss, strict=True)
            ],
            "bytes_per_connection": grown / connected if connected else None,
            "kib_per_connection": grown / connected / 1024 if connected else None,
        }
    )
    print(
        f"  workers' RSS: {sum(idle_rss) / 2**20:,.0f} MiB idle, "
        f"{sum(loaded_rss) / 2**20:,.0f} MiB with {connected:,} connections",
        flush=True,
    )
    result.update(_idle_cpu(run, servers, connected))
    broadcasts = []
    with httpx.Client(timeout=30) as http:
        next_at = time.monotonic()
        for k in range(args.broadcasts):
            # Pacing, not waiting for anything: `interval` s from one message's last
            # report to the next publish, so that no message shares the cores with the
            # one before it (a one-to-all here takes about as long as the interval).
            time.sleep(max(0.0, min(next_at - time.monotonic(), run.left())))
            servers.check_alive()
            row = _broadcast(run, servers, http, k)
            next_at = time.monotonic() + args.interval
            broadcasts.append(row)
            timings = (
                f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, "
                f"max {row['max_ms']:.0f} ms"
                if row["received"]
                else "no timings"
            )
            print(
                f"  broadcast {k + 1}/{args.broadcasts}: {row['received']:,} received, {timings}",
                flush=True,
            )
    result["broadcasts"] = broadcasts
    result.update(_close(run))
    result["all_connected"] = connected == plan_.connections
    result["all_received"] = all(b["received"] == plan_.connections for b in broadcasts)
    p99s = [b["p99_ms"] for b in broadcasts if b["p99_ms"] is not None]
    result["worst_p99_ms"] = max(p99s) if p99s else None
    return result


def table(result: dict[str, Any]) -> str:
    """The printed summary: the run's shape, memory, and one row per broadcast."""
    per_conn = result.get("bytes_per_connection")
    lines = [
        f"{result['connections']:,} connections: {result['workers']} workers "
        f"({result['connections_per_worker']:,} each at most), {result['loadgens']} load "
        f"generators, {len(result['source_addresses'])} source addresses",
        f"connected         {result['connected']:,}/{result['connections']:,} in "
        f"{result['connect_s']:.1f} s ({result['connects_per_s'] or 0:,.0f}/s), "
        f"{result['retried']:,} retried, {result['connect_failures']} failed; worker CPU "
        f"{result['worker_cpu_us_per_connect'] or 0:,.0f} us per connect; other processes "
        f"{result['connect_other_processes_cores']:.2f} cores",
        f"worker memory     {result['worker_rss_idle_bytes'] / 2**20:,.0f} MiB idle -> "
        f"{result['worker_rss_loaded_bytes'] / 2**20:,.0f} MiB loaded: "
        + (
            f"{per_conn:,.0f} bytes ({per_conn / 1024:.1f} KiB) per connection "
            f"(goal <= {GOAL_BYTES_PER_CONNECTION // 1024} KiB: "
            f"{'met' if per_conn <= GOAL_BYTES_PER_CONNECTION else 'NOT met'})"
            if per_conn is not None
            else "no connections"
        ),
        f"idle CPU          {result['worker_cores_idle']:.2f} cores for the workers with every "
        f"connection open and idle ({result['worker_cpu_us_per_connection_s'] or 0:.2f} us "
        "per connection per second: WebSocket pings, Redis watchdog); other processes "
        f"{result['idle_other_processes_cores']:.2f} cores",
        "",
        "broadcast  received           p50 ms   p99 ms   max ms  publish ms  worker CPU s  "
        "us/delivery  loadgen CPU s  other cores",
    ]
    for b in result["broadcasts"]:

        def ms(value: float | None) -> str:
            return "-" if value is None else f"{value:,.0f}"

        lines.append(
            f"{b['k'] + 1:<9}  {b['received']:>7,}/{b['expected']:<7,}  {ms(b['p50_ms']):>7}  "
            f"{ms(b['p99_ms']):>7}  {ms(b['max_ms']):>7}  {b['publish_ms']:>10.1f}  "
            f"{b['worker_cpu_s']:>12.2f}  {b['worker_cpu_us_per_delivery'] or 0:>11.1f}  "
            f"{b['loadgen_cpu_s']:>13.2f}  {b['other_processes_cores']:>11.2f}"
        )
    worst = result.get("worst_p99_ms")
    if worst is not None:
        verdict = "met" if worst < GOAL_P99_MS else "NOT met"
        lines.append(f"worst p99 {worst:,.0f} ms (goal < {GOAL_P99_MS:,.0f} ms: {verdict})")
    lines.append(
        "(worker and loadgen CPU s: over the publish to the last report, idle CPU "
        "and the reports included; other "
        "cores: what processes outside this run used meanwhile, of the machine's "
        f"{os.cpu_count()})"
    )
    lines.append(
        f"all received: {'yes' if result['all_received'] else 'NO'}; duplicates "
        f"{result['duplicates']}; unexpected closes {result['unexpected_closes'] or 'none'}"
    )
    return "\n".join(lines)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # SIGTERM unwinds like Ctrl-C, so that every `finally` stops what it started.
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    """Run once; exit status 1 unless every connection subscribed and got every message."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out: Path = args.out or Path(__file__).resolve().parent / "results" / f"many-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    _raise_fd_limit()
    signal.signal(signal.SIGTERM, _interrupt)
    run = Run(args, out)
    print(
        f"{args.connections:,} connections, {args.workers} workers, {args.loadgens} load "
        f"generators, {len(run.plan.addresses)} source addresses; deadline "
        f"{args.deadline:.0f} s; output {out}",
        flush=True,
    )
    started = time.monotonic()
    servers: Servers | None = None
    document: dict[str, Any] = {
        "tool": "bench.many_connections",
        "command": " ".join(["python -m bench.many_connections", *argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "open_files_limit": _fd_limit(),
        },
        "settings": run.settings,
        "channel": run.channel,
        "goals": {"bytes_per_connection": GOAL_BYTES_PER_CONNECTION, "p99_ms": GOAL_P99_MS},
    }
    status = 1
    try:
        servers = Servers(out / "servers", args.workers, run.settings)
        servers.__enter__()
        document.update(measure(run, servers))
        status = 0 if document["all_connected"] and document["all_received"] else 1
    except (Stop, RuntimeError, OSError, httpx.HTTPError) as exc:
        # RuntimeError: a server that did not start or exited (bench/servers.py).
        document["error"] = str(exc)
        print(f"STOPPED: {exc}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        document["error"] = "interrupted"
        print("interrupted: stopping everything", file=sys.stderr, flush=True)
        status = 130
    finally:
        run.stop(servers)
        document["wall_s"] = time.monotonic() - started
        (out / "results.json").write_text(json.dumps(document, indent=1))
    if "broadcasts" in document:
        print()
        print(table(document))
    print(f"\nresults: {out / 'results.json'}", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
