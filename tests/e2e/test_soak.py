"""Bounded soak: 3 workers, 300 clients, a steady publish rate, a Redis restart, a SIGTERM.

One channel, one publisher. The publisher POSTs `{"seq": n, "t": <monotonic time>}`
sequentially (each publish awaited, so acknowledged seqs are in order), round-robin
over the workers that are alive, at a steady rate for SOAK_SECONDS (default 60).
Message ids restart at 1 when Redis restarts without persistence, so messages are
told apart by `seq`, never by id.

Timeline (t = 0 when publishing starts, D = SOAK_SECONDS):

* D/3: Redis is killed (SIGKILL); publishing goes on and is refused (503);
* a few seconds later Redis is started again on the same port, empty; the workers
  reconnect by themselves and, history being lost with Redis, send each subscriber a
  `gap` frame;
* 2D/3: one worker is SIGTERMed; it closes its clients with 1012, which reconnect
  (jittered backoff, bounded attempts) to the two others and subscribe again with
  `since`; each should be answered `recovered: true` and get what was published while
  it was away; the publisher stops using the worker;
* D: publishing stops; then, polling with a deadline, every client should receive
  the last acknowledged message.

Clients resume like the service's own: each remembers the id of the last message it
received (before the first one, the `position` of its `subscribed` reply) and sends it
as `since` in every subscribe after a reconnection.

Each client keeps an event log in arrival order: messages (seq), `gap` frames,
disconnections (close code), `subscribed` replies (plain, `recovered: true` or
`recovered: false`). The accounting is exact: for every acknowledged seq a client did
not get, the stretch of its log where that message belonged (after the last received
seq below it, before the first received seq above it) must hold a notice: a `gap`, a
`recovered: false`, or a close that no resumed subscription followed. A close followed
by `recovered: true` excuses nothing: a seq missing across it is lost in the resume;
one missing with no notice and no close around it is a silent loss. Duplicates (a seq
twice at one client) and order violations (a seq not above the previous one) are
counted too. The report is printed (pytest -s) and written as JSON to
$TEST_ARTIFACTS (default test-artifacts/)/soak-report.json.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import json
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, WebSocketException

from tests.conftest import WorkerFactory
from tests.helpers import UNIT, RedisServer, Worker, redis_args, unique

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "300"))
RATE = float(os.environ.get("SOAK_RATE", "20"))  # publishes per second
WORKERS = 3
# How long Redis stays down.
OUTAGE_SECONDS = max(3.0, SOAK_SECONDS / 12)
# A client gives up after this many failed connection (or subscription) attempts in a row.
MAX_ATTEMPTS = 30
BACKOFF_CAP = 2.0
# Longer than the worker's BROKER_TIMEOUT (5 s), after which `subscribe` is answered anyway.
SUBSCRIBE_REPLY_TIMEOUT = 30 * UNIT

# Log entries: (kind, value, monotonic time). Kinds:
MSG = "msg"  # value: seq
GAP = "gap"
CLOSE = "close"  # value: close code received (1006 when none)
CONNECTED = "connected"  # value: the worker's port
SUBSCRIBED = "subscribed"  # a reply to a subscribe without `since`
RESUMED = "recovered"  # replies to a subscribe with `since`: `recovered: true`
NOT_RECOVERED = "not_recovered"  # `recovered: false`
REPLIES = {None: SUBSCRIBED, True: RESUMED, False: NOT_RECOVERED}  # by `recovered`
REFUSED = "refused"  # `subscribe` answered `unavailable`


class Pool:
    """The workers that are alive, as the publisher and reconnecting clients see them."""

    def __init__(self, workers: list[Worker]) -> None:
        self.alive = list(workers)
        self._turn = itertools.count()

    def next_for_publishing(self) -> Worker:
        return self.alive[next(self._turn) % len(self.alive)]

    def pick(self, rng: random.Random) -> Worker:
        return rng.choice(self.alive)


@dataclass
class Publisher:
    """Outcome of every publish attempt, by seq."""

    phase: str = "warm-up"
    attempted: int = 0
    acked: dict[int, str] = field(default_factory=dict)  # seq -> message id
    refused: set[int] = field(default_factory=set)  # 503 unavailable
    failed: dict[int, str] = field(default_factory=dict)  # no answer or another status
    by_phase: dict[str, Counter[str]] = field(default_factory=dict)
    slowest: float = 0.0

    @property
    def last_acked(self) -> int:
        return max(self.acked, default=0)

    def count(self, phase: str, outcome: str) -> None:
        self.by_phase.setdefault(phase, Counter())[outcome] += 1

    async def run(self, http: httpx.AsyncClient, pool: Pool, channel: str, until: float) -> None:
        loop = asyncio.get_running_loop()
        interval = 1 / RATE
        next_at = loop.time()
        seq = 0
        while loop.time() < until:
            seq += 1
            phase = self.phase
            worker = pool.next_for_publishing()
            self.attempted += 1
            started = loop.time()
            data = {"seq": seq, "t": time.monotonic()}
            try:
                response = await http.post(
                    f"{worker.http}/api/channels/{channel}/messages", json={"data": data}
                )
            except httpx.HTTPError as exc:
                self.failed[seq] = f"{worker.port}: {exc!r}"
                outcome = "failed"
            else:
                if response.status_code == 200:
                    self.acked[seq] = str(response.json()["id"])
                    outcome = "acknowledged"
                elif response.status_code == 503 and "unavailable" in response.text:
                    self.refused.add(seq)
                    outcome = "refused"
                else:
                    self.failed[seq] = f"{worker.port}: {response.status_code} {response.text}"
                    outcome = "failed"
            # Counted under the phase it was sent in, or "a -> b" if it ended in another
            # (a publish retried across the restart may be acknowledged by the new Redis).
            self.count(phase if phase == self.phase else f"{phase} -> {self.phase}", outcome)
            self.slowest = max(self.slowest, loop.time() - started)
            # A steady rate: the next slot, or at once if this publish took longer.
            next_at = max(next_at + interval, loop.time())
            await asyncio.sleep(next_at - loop.time())


class SoakClient:
    """A protocol v1 client subscribed to one channel that reconnects and logs everything."""

    def __init__(
        self,
        index: int,
        channel: str,
        pool: Pool,
        stop: asyncio.Event,
        rng: random.Random,
        latencies: list[float],
    ) -> None:
        self.index = index
        self.channel = channel
        self.pool = pool
        self.stop = stop
        self.rng = rng
        self.latencies = latencies
        self.log: list[tuple[str, int, float]] = []
        self.last_seq = 0
        # The id to resume from: of the last message, or the `position` before any.
        self.resume_from: str | None = None
        self.subscribed = False
        self.ws: ClientConnection | None = None
        self.worker_port = 0
        self.gave_up = ""
        # Protocol violations and hangs: each one fails the test.
        self.problems: list[str] = []
        self.connect_failures = 0
        self._refs = itertools.count(1)

    def record(self, kind: str, value: int = 0) -> None:
        self.log.append((kind, value, time.monotonic()))

    async def pause(self, seconds: float) -> None:
        """Wait `seconds`, or less if the test is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    def backoff(self, attempt: int) -> float:
        return min(BACKOFF_CAP, 0.05 * 2**attempt) * self.rng.uniform(0.5, 1.0)

    async def run(self, first: Worker) -> None:
        worker = first
        failures = 0
        while not self.stop.is_set():
            try:
                ws = await websockets.connect(
                    worker.ws + "/ws",
                    open_timeout=20 * UNIT,
                    close_timeout=5 * UNIT,
                    compression=None,
                    proxy=None,
                )
            except (OSError, TimeoutError, WebSocketException) as exc:
                failures += 1
                self.connect_failures += 1
                if failures >= MAX_ATTEMPTS:
                    self.gave_up = f"could not connect {failures} times: {exc!r}"
                    return
                await self.pause(self.backoff(failures))
                worker = self.pool.pick(self.rng)
                continue
            self.ws = ws
            try:
                if self.stop.is_set():
                    return
                self.worker_port = worker.port
                code = await self.serve(ws)
            finally:
                self.ws = None
                self.subscribed = False
                await ws.close()
            if code is None or self.stop.is_set():
                return  # gave up, or the test is over
            if code == 0:
                failures = 0  # it was subscribed: start the backoff again
            else:
                failures += 1
            # 1012 says "reconnect now": only a jitter, so that not all come at once.
            await self.pause(self.rng.uniform(0.0, 0.3) + self.backoff(failures))
            worker = self.pool.pick(self.rng)

    async def serve(self, ws: ClientConnection) -> int | None:
        """Serve one connection until it closes.

        Returns 0 if it was closed after being subscribed, 1 if before, None to stop.
        """
        was_subscribed = False
        try:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), 20 * UNIT))
            if welcome.get("type") != "welcome":
                self.problems.append(f"first frame is not welcome: {welcome}")
            self.record(CONNECTED, self.worker_port)
            resuming = self.resume_from is not None
            ref = await self.send_subscribe(ws)
            attempts = 1
            while True:
                if self.subscribed:
                    raw = await ws.recv()
                else:
                    try:
                        raw = await asyncio.wait_for(ws.recv(), SUBSCRIBE_REPLY_TIMEOUT)
                    except TimeoutError:
                        self.problems.append(
                            f"no reply to subscribe from worker {self.worker_port} "
                            f"within {SUBSCRIBE_REPLY_TIMEOUT:g} s"
                        )
                        return None
                frame = json.loads(raw)
                kind = frame.get("type")
                if kind == "message":
                    seq = frame["data"]["seq"]
                    self.latencies.append(time.monotonic() - frame["data"]["t"])
                    if not self.subscribed:
                        self.problems.append(f"message {seq} before `subscribed`")
                    self.record(MSG, seq)
                    self.last_seq = seq
                    self.resume_from = frame["id"]
                elif kind == "gap":
                    self.record(GAP)
                elif kind == "subscribed" and frame.get("ref") == ref:
                    recovered = frame.get("recovered")
                    if resuming != (recovered is not None):
                        self.problems.append(f"`recovered` {recovered} in {frame}")
                    self.record(REPLIES[recovered])
                    self.resume_from = frame.get("position", self.resume_from)
                    self.subscribed = was_subscribed = True
                elif kind == "error" and frame.get("ref") == ref and not self.subscribed:
                    if frame.get("code") != "unavailable":
                        self.problems.append(f"subscribe failed: {frame}")
                        return None
                    self.record(REFUSED)
                    if attempts >= MAX_ATTEMPTS:
                        self.gave_up = f"subscribe refused {attempts} times"
                        return None
                    await self.pause(self.backoff(attempts))
                    if self.stop.is_set():
                        return None
                    ref = await self.send_subscribe(ws)
                    attempts += 1
                elif kind in ("error", "subscribed", "welcome"):
                    self.problems.append(f"unexpected frame: {frame}")
        except ConnectionClosed as exc:
            if self.stop.is_set():
                return None
            self.record(CLOSE, exc.rcvd.code if exc.rcvd is not None else 1006)
            return 0 if was_subscribed else 1
        except TimeoutError:
            if self.stop.is_set():
                return None
            # No welcome in time: a client-side disconnection, recorded as one.
            self.problems.append(f"no welcome from worker {self.worker_port}")
            self.record(CLOSE, 0)
            return 1

    async def send_subscribe(self, ws: ClientConnection) -> int:
        ref = next(self._refs)
        command = {"type": "subscribe", "channel": self.channel, "ref": ref}
        if self.resume_from is not None:
            command["since"] = self.resume_from
        await ws.send(json.dumps(command))
        return ref


# -- the accounting -------------------------------------------------------------------


@dataclass
class ClientAccount:
    """What one client's log says about the acknowledged messages."""

    delivered: int = 0
    duplicates: int = 0
    order_violations: int = 0
    # Missing seqs by the kind of notice that covers them: GAP, NOT_RECOVERED or CLOSE.
    covered: Counter[str] = field(default_factory=Counter)
    # Missing seqs with no notice but a close followed by `recovered: true` around them.
    lost_in_resume: list[int] = field(default_factory=list)
    silent: list[int] = field(default_factory=list)
    # Runs of missing seqs covered by the same notice: (first, last, count, notice).
    runs: list[tuple[int, int, int, str]] = field(default_factory=list)


def account(log: list[tuple[str, int, float]], acked: list[int]) -> ClientAccount:
    """Check one client's log against the acknowledged seqs (sorted)."""
    result = ClientAccount()
    received = [(i, value) for i, (kind, value, _) in enumerate(log) if kind == MSG]
    result.delivered = len(received)
    counts = Counter(seq for _, seq in received)
    result.duplicates = sum(n - 1 for n in counts.values())
    result.order_violations = sum(1 for (_, a), (_, b) in itertools.pairwise(received) if b <= a)
    # Where a missing seq belongs: after the last log entry of a smaller seq, before the
    # first of a larger one (prefix maximum / suffix minimum of log positions by seq).
    by_seq = sorted((seq, i) for i, seq in received)
    seqs = [seq for seq, _ in by_seq]
    latest_below = list(itertools.accumulate((i for _, i in by_seq), max))
    earliest_above = list(itertools.accumulate((i for _, i in reversed(by_seq)), min))[::-1]
    closes = [i for i, (kind, _, _) in enumerate(log) if kind == CLOSE]
    # A close is a notice only if no resumed subscription followed it: after one, the
    # reply's `recovered` tells whether something was missed.
    notices = sorted(
        [i for i, (kind, _, _) in enumerate(log) if kind in (GAP, NOT_RECOVERED)]
        + [i for i in closes if reply_after(log, i) in (None, SUBSCRIBED)]
    )
    runs: list[list[int]] = []  # [first, last, count, index of the notice in the log]
    current: list[int] | None = None
    for seq in acked:
        if seq in counts:
            current = None
            continue
        k = bisect.bisect_left(seqs, seq)
        after = latest_below[k - 1] if k > 0 else -1
        before = earliest_above[k] if k < len(seqs) else len(log)
        low, high = min(after, before), max(after, before)
        # The first notice in the stretch, preferring a disconnection's (it covers all).
        found = notices[bisect.bisect_right(notices, low) : bisect.bisect_left(notices, high)]
        found.sort(key=lambda i: log[i][0] == GAP)
        closed = closes[bisect.bisect_right(closes, low) : bisect.bisect_left(closes, high)]
        if found:
            notice = found[0]
            result.covered[log[notice][0]] += 1
        elif closed:
            notice = closed[0]  # followed by `recovered: true`, which promised it
            result.lost_in_resume.append(seq)
        else:
            notice = -1
            result.silent.append(seq)
        if current is not None and current[3] == notice:
            current[1] = seq
            current[2] += 1
        else:
            current = [seq, seq, 1, notice]
            runs.append(current)
    result.runs = [(first, last, n, describe(log, notice)) for first, last, n, notice in runs]
    return result


def reply_after(log: list[tuple[str, int, float]], index: int) -> str | None:
    """The kind of the first `subscribed` reply after log[index], if any."""
    return next((kind for kind, _, _ in log[index + 1 :] if kind in REPLIES.values()), None)


def describe(log: list[tuple[str, int, float]], index: int) -> str:
    if index < 0:
        return "NONE (silent loss)"
    kind, value, _ = log[index]
    if kind != CLOSE:
        return kind
    if reply_after(log, index) == RESUMED:
        return f"close {value}, then recovered: true: LOST IN THE RESUME"
    return f"close {value}"


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(fraction * len(sorted_values)))]


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


# -- the test -------------------------------------------------------------------------


async def wait_until(condition: Any, timeout: float, what: str) -> None:
    """Poll a plain condition from async code, failing after `timeout` units."""
    deadline = time.monotonic() + timeout * UNIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout * UNIT:g} s waiting for {what}")
        await asyncio.sleep(0.05)


async def all_ready(http: httpx.AsyncClient, workers: list[Worker]) -> bool:
    for worker in workers:
        try:
            if (await http.get(worker.http + "/readyz")).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True


async def wait_ready(http: httpx.AsyncClient, workers: list[Worker], timeout: float) -> None:
    deadline = time.monotonic() + timeout * UNIT
    while not await all_ready(http, workers):
        if time.monotonic() > deadline:
            raise AssertionError(f"workers not ready again within {timeout * UNIT:g} s")
        await asyncio.sleep(0.1)


@dataclass
class Soak:
    """Everything the scenario sets up and observes."""

    workers: list[Worker]
    own_redis: RedisServer
    channel: str
    pool: Pool
    clients: list[SoakClient]
    tasks: list[asyncio.Task[None]]
    http: httpx.AsyncClient
    publisher: Publisher = field(default_factory=Publisher)
    timeline: dict[str, float] = field(default_factory=dict)
    victims_clients: list[SoakClient] = field(default_factory=list)
    # time.monotonic() when Redis was killed (the clients' logs use the same clock)
    killed_at: float = 0.0

    @property
    def victim(self) -> Worker:
        return self.workers[-1]

    async def run(self) -> None:
        """The timeline; each step waits (with a deadline) for what it needs."""
        loop = asyncio.get_running_loop()
        clients, publisher, victim = self.clients, self.publisher, self.victim
        await wait_until(
            lambda: all(c.subscribed for c in clients) or any(t.done() for t in self.tasks),
            60,
            "every client to subscribe",
        )
        assert all(c.subscribed for c in clients), "a client stopped before subscribing"
        t0 = loop.time()

        def mark(name: str) -> None:
            self.timeline[name] = round(loop.time() - t0, 2)

        async def until(fraction: float) -> None:
            # The schedule of the scenario (like the publisher's pacing), not a settling wait.
            await asyncio.sleep(max(0.0, t0 + fraction * SOAK_SECONDS - loop.time()))

        publishing = asyncio.create_task(
            publisher.run(self.http, self.pool, self.channel, t0 + SOAK_SECONDS)
        )
        try:
            await until(1 / 3)
            warm = publisher.last_acked
            await wait_until(
                lambda: warm > 0 and all(c.last_seq >= warm for c in clients),
                30,
                "every client to receive the warm-up",
            )
            mark("redis killed")
            self.killed_at = time.monotonic()
            await asyncio.to_thread(self.own_redis.kill)
            publisher.phase = "redis down"
            await until(1 / 3 + OUTAGE_SECONDS / SOAK_SECONDS)
            await wait_until(lambda: publisher.refused, 30, "a publish to be refused")

            publisher.phase = "redis back"
            mark("redis restarting")
            await asyncio.to_thread(self.own_redis.start)
            mark("redis restarted")
            await wait_ready(self.http, self.workers, 40)
            mark("workers ready")
            await wait_until(
                lambda: publisher.by_phase.get("redis back", Counter())["acknowledged"] > 0,
                30,
                "a publish acknowledged after the restart",
            )
            after_restart = publisher.last_acked
            await wait_until(
                lambda: all(c.last_seq >= after_restart for c in clients),
                30,
                "every client to receive messages again after the restart",
            )
            mark("clients live again")

            # One worker restarts: its clients move to the two others.
            await until(2 / 3)
            self.victims_clients = [
                c for c in clients if c.ws is not None and c.worker_port == victim.port
            ]
            self.pool.alive.remove(victim)
            publisher.phase = "worker down"
            mark("worker SIGTERMed")
            victim.signal(signal.SIGTERM)
            process = victim.process
            assert process is not None
            await wait_until(lambda: process.poll() is not None, 40, "the worker to exit")
            mark("worker exited")
            await wait_until(
                lambda: all(
                    c.subscribed and c.worker_port != victim.port for c in self.victims_clients
                ),
                40,
                "the worker's clients to subscribe again elsewhere",
            )
            mark("its clients resubscribed")
            await publishing
        finally:
            if not publishing.done():
                publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        mark("publishing stopped")
        last = publisher.last_acked
        # Bounded: whoever is not there in time shows up in the report and fails it.
        with contextlib.suppress(AssertionError):
            await wait_until(
                lambda: all(c.last_seq >= last or c.gave_up for c in clients),
                30,
                "every client to receive the last acknowledged message",
            )
        mark("drained")


@pytest.mark.timeout(SOAK_SECONDS + 120 * UNIT)
async def test_soak_with_a_redis_restart_and_a_worker_restart(
    make_worker: WorkerFactory,
    own_redis: RedisServer,
    prefix: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed = int(os.environ.get("SOAK_SEED") or random.randrange(2**32))
    rng = random.Random(seed)
    workers = [make_worker(*redis_args(own_redis, prefix), start=False) for _ in range(WORKERS)]
    for worker in workers:
        worker.start(wait_ready=False)
    for worker in workers:
        await asyncio.to_thread(worker.wait_ready, 30)
    channel = unique("soak")
    pool = Pool(workers)
    stop = asyncio.Event()
    latencies: list[float] = []
    clients = [
        SoakClient(i, channel, pool, stop, random.Random(rng.random()), latencies)
        for i in range(CLIENTS)
    ]
    tasks = [
        asyncio.create_task(c.run(workers[c.index % WORKERS]), name=f"client-{c.index}")
        for c in clients
    ]
    async with httpx.AsyncClient(timeout=5 * UNIT, trust_env=False) as http:
        soak = Soak(workers, own_redis, channel, pool, clients, tasks, http)
        scenario_error: Exception | None = None
        try:
            await soak.run()
        except Exception as exc:  # still report what happened
            scenario_error = exc
        finally:
            stop.set()
            await asyncio.gather(
                *(c.ws.close() for c in clients if c.ws is not None), return_exceptions=True
            )
            done, pending = await asyncio.wait(tasks, timeout=30 * UNIT)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    report = build_report(soak, latencies, seed)
    report["scenario_error"] = repr(scenario_error) if scenario_error else None
    report["client_task_errors"] = [
        f"{t.get_name()}: {t.exception()!r}"
        for t in done
        if not t.cancelled() and t.exception() is not None
    ]
    report["clients_not_stopped"] = len(pending)
    path = artifacts_dir() / "soak-report.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    with capsys.disabled():  # the report is this test's output: show it in every run
        print_report(report, path)

    if scenario_error is not None:
        raise scenario_error
    assert not report["client_task_errors"], report["client_task_errors"]
    assert report["clients_not_stopped"] == 0
    assert report["silent_losses"] == 0, report["silent_loss_examples"]
    assert report["lost_in_resume"] == 0, report["lost_in_resume_examples"]
    assert report["duplicates"] == 0
    assert report["order_violations"] == 0
    assert not report["client_problems"], report["client_problems"]
    assert not report["clients_gave_up"], report["clients_gave_up"]
    assert report["clients_without_last_message"] == 0
    # While Redis was down nothing was acknowledged; the scenario really happened.
    phases = report["publishes_by_phase"]
    assert phases["redis down"].get("acknowledged", 0) == 0, phases
    for phase in ("warm-up", "redis back", "worker down"):
        assert phases[phase].get("acknowledged", 0) > 0, phases
    assert report["refused"] > 0
    assert report["notices"]["gap"] >= CLIENTS
    assert report["clients_without_outage_notice"] == 0
    assert set(report["worker_log_tracebacks"].values()) == {0}
    assert set(report["deaf_detections"].values()) == {0}
    assert report["notices"]["close"].get("1012", 0) >= report["victims_clients"] > 0
    # Each of the worker's clients resumed once, elsewhere, and lost nothing.
    assert report["resumes"]["recovered"] == report["victims_clients"], report["resumes"]


def build_report(soak: Soak, latencies: list[float], seed: int) -> dict[str, Any]:
    publisher, clients, workers = soak.publisher, soak.clients, soak.workers
    acked = sorted(publisher.acked)
    last = publisher.last_acked
    accounts = [account(c.log, acked) for c in clients]
    delivered_seqs: set[int] = set()
    for client in clients:
        delivered_seqs.update(value for kind, value, _ in client.log if kind == MSG)
    kinds = Counter(kind for c in clients for kind, _, _ in c.log)
    closes = Counter(str(value) for c in clients for kind, value, _ in c.log if kind == CLOSE)
    runs: Counter[tuple[int, int, int, str]] = Counter()
    for result in accounts:
        runs.update(result.runs)
    silent = [
        {"client": c.index, "seqs": a.silent[:20], "count": len(a.silent)}
        for c, a in zip(clients, accounts, strict=True)
        if a.silent
    ]
    lost_in_resume = [
        {"client": c.index, "seqs": a.lost_in_resume[:20], "count": len(a.lost_in_resume)}
        for c, a in zip(clients, accounts, strict=True)
        if a.lost_in_resume
    ]
    missing = [a.covered.total() + len(a.lost_in_resume) + len(a.silent) for a in accounts]
    covered = (GAP, NOT_RECOVERED, CLOSE)
    ordered = sorted(latencies)
    logs = {w.port: str(w.log_path) for w in workers}
    return {
        "seed": seed,
        "soak_seconds": SOAK_SECONDS,
        "rate_per_second": RATE,
        "clients": len(clients),
        "workers": len(workers),
        "channel": soak.channel,
        "timeline_seconds": soak.timeline,
        "published": publisher.attempted,
        "acknowledged": len(publisher.acked),
        "refused": len(publisher.refused),
        "failed": len(publisher.failed),
        "failed_examples": dict(itertools.islice(publisher.failed.items(), 10)),
        "publishes_by_phase": {k: dict(v) for k, v in publisher.by_phase.items()},
        "slowest_publish_seconds": round(publisher.slowest, 3),
        "last_acknowledged_seq": last,
        "refused_but_delivered": sorted(publisher.refused & delivered_seqs),
        "failed_but_delivered": sorted(set(publisher.failed) & delivered_seqs),
        "delivered": sum(a.delivered for a in accounts),
        "expected_deliveries": len(acked) * len(clients),
        "missing": sum(missing),
        **{f"missing_covered_by_{k}": sum(a.covered[k] for a in accounts) for k in covered},
        # Missing although the client resumed across its close and was told `recovered: true`.
        "lost_in_resume": sum(len(a.lost_in_resume) for a in accounts),
        "lost_in_resume_examples": lost_in_resume[:20],
        "silent_losses": sum(len(a.silent) for a in accounts),
        "silent_loss_examples": silent[:20],
        "duplicates": sum(a.duplicates for a in accounts),
        "order_violations": sum(a.order_violations for a in accounts),
        "per_client_missing": {
            "clients_with_missing": sum(1 for n in missing if n),
            "max": max(missing, default=0),
            "median": sorted(missing)[len(missing) // 2] if missing else 0,
            **{f"by_{k}": Counter(a.covered[k] for a in accounts).most_common() for k in covered},
        },
        # For every message a client did not get, the notice it got instead: runs of
        # consecutive acknowledged seqs covered by one notice, with how many clients.
        "missing_runs": [
            {"first": f, "last": la, "count": n, "notice": notice, "clients": k}
            for (f, la, n, notice), k in sorted(runs.items())
        ],
        "notices": {"gap": kinds[GAP], "close": dict(closes)},
        "subscriptions": kinds[SUBSCRIBED],
        # Replies to the subscribes with `since`, after a reconnection.
        "resumes": {"recovered": kinds[RESUMED], "not_recovered": kinds[NOT_RECOVERED]},
        "subscribe_refusals": kinds[REFUSED],
        "connect_failures": sum(c.connect_failures for c in clients),
        "victim_worker": soak.victim.port,
        "victims_clients": len(soak.victims_clients),
        "clients_without_last_message": sum(1 for c in clients if c.last_seq < last),
        "clients_gave_up": {c.index: c.gave_up for c in clients if c.gave_up},
        "client_problems": {c.index: c.problems[:5] for c in clients if c.problems},
        "latency_ms": {
            "deliveries": len(ordered),
            "p50": round(1000 * percentile(ordered, 0.50), 2),
            "p99": round(1000 * percentile(ordered, 0.99), 2),
            "max": round(1000 * ordered[-1], 2) if ordered else None,
        },
        "worker_logs": logs,
        "worker_log_tracebacks": {
            port: w.log().count("Traceback") for port, w in zip(logs, workers, strict=True)
        },
        # A false canary alarm under load would rebuild a subscription for nothing.
        "deaf_detections": {
            w.port: w.metric("broadcast_redis_deaf_detections_total")
            for w in workers
            if w is not soak.victim
        },
        # Every client was subscribed when Redis died, and its history was lost with it:
        # each must have been told, by a `gap` or by a `recovered: false`.
        "clients_without_outage_notice": sum(
            not any(kind in (GAP, NOT_RECOVERED) and at >= soak.killed_at for kind, _, at in c.log)
            for c in soak.clients
        ),
        "per_client": [
            {
                "client": c.index,
                "delivered": a.delivered,
                **{f"missing_by_{k}": a.covered[k] for k in covered},
                "lost_in_resume": len(a.lost_in_resume),
                "silent": len(a.silent),
                "runs": a.runs,
            }
            for c, a in zip(clients, accounts, strict=True)
        ],
    }


def print_report(report: dict[str, Any], path: Path) -> None:
    short = {k: v for k, v in report.items() if k not in ("per_client", "missing_runs")}
    lines = ["", "=== soak report ==="]
    lines += [f"{key}: {json.dumps(value)}" for key, value in short.items()]
    lines.append("missing messages and the notice each client got instead:")
    for run in report["missing_runs"]:
        lines.append(
            f"  seqs {run['first']}-{run['last']} ({run['count']} acknowledged): "
            f"{run['notice']} at {run['clients']} clients"
        )
    lines.append(f"(full report: {path})")
    print("\n".join(lines))
