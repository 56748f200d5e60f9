"""A client that stops reading is cut off with 1013; the others do not notice."""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx
import pytest

from tests.conftest import WorkerFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    Worker,
    redis_args,
    subscribed_client,
    tiny_buffer_socket,
    unique,
)

HEALTHY = 100
P99_BOUND = 0.25  # seconds; see docs/operations.md for the measured figures


def rss_bytes(worker: Worker) -> int:
    assert worker.process is not None
    with open(f"/proc/{worker.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.timeout(120)
async def test_healthy_clients_keep_their_latency_while_a_slow_one_is_cut_off(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # The slow client reads nothing, so it answers no ping and gets no pong: with either
    # side's default keepalive (a ping after 20 s, 20 s to answer) a test slower than
    # 40 s, as under load, would see the connection dropped for that, not its 1013.
    worker = make_worker(
        *redis_args(
            redis_server,
            prefix,
            "--outbox-max-messages",
            "100",
            "--outbox-max-bytes",
            "500000",
            "--ws-ping-interval",
            "300",
        ),
        # Its 1013 waits for it to read again, which it does only at the end.
        env={"WS_CLOSE_TIMEOUT": "300"},
    )
    channel = unique("mixed")
    # The slow client: a tiny receive buffer, and it never reads after subscribing.
    sock = tiny_buffer_socket(worker.port)
    slow = await subscribed_client(worker, channel, sock=sock, max_queue=1, ping_interval=None)
    healthy: list[Client] = []
    listeners: list[asyncio.Task[None]] = []
    try:
        for _ in range(HEALTHY):
            client = await subscribed_client(worker, channel)
            healthy.append(client)
        rss_before = rss_bytes(worker)
        latencies: list[float] = []
        counts = [0] * HEALTHY

        async def listen(index: int, client: Client) -> None:
            while True:
                frame = await client.recv(timeout=30)
                latencies.append(time.time() - frame["data"]["t"])
                counts[index] += 1

        listeners.extend(asyncio.create_task(listen(i, c)) for i, c in enumerate(healthy))
        padding = "x" * 4000
        published = 0
        cut_at = None
        async with httpx.AsyncClient(base_url=worker.http, timeout=10) as http:
            # A steady 100 messages/s (10,000 deliveries/s) until the slow client is cut
            # off, then as many again; bounded either way.
            for published in range(1, 3001):
                response = await http.post(
                    f"/api/channels/{channel}/messages",
                    json={"data": {"t": time.time(), "pad": padding}},
                )
                assert response.status_code == 200
                if cut_at is None and published % 20 == 0:
                    metrics = (await http.get("/metrics")).text
                    if "broadcast_slow_consumer_closes_total 1.0" in metrics:
                        cut_at = published
                if cut_at is not None and published >= 2 * cut_at:
                    break
                await asyncio.sleep(0.01)  # the publishing rate
        assert cut_at is not None, "the slow client was never cut off"

        deadline = time.monotonic() + 20 * UNIT
        while min(counts) < published:
            assert time.monotonic() < deadline, (min(counts), published)
            await asyncio.sleep(0.02)

        p50 = statistics.median(latencies)
        p99 = statistics.quantiles(latencies, n=100)[98]
        rss_growth = rss_bytes(worker) - rss_before
        print(
            f"\n{HEALTHY} healthy clients, {published} messages of 4 KB at ~100/s, slow client "
            f"cut after {cut_at}: delivery latency p50 {p50 * 1000:.1f} ms, p99 "
            f"{p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; worker RSS "
            f"{rss_growth / 1e6:+.1f} MB"
        )
        assert len(latencies) == HEALTHY * published
        assert p99 < P99_BOUND * UNIT
        # Bounded memory: the slow client's outbox (<= 0.5 MB) and buffers, not a backlog.
        assert rss_growth < 40_000_000
        # The worker's Redis subscription never fell behind because of the slow client.
        assert worker.metric("broadcast_redis_reconnects_total") == 0
        # Reading again, it finds what was in flight, then learns why it was cut off.
        assert await slow.close_code() == 1013
    finally:
        # Also when an assertion fails: clients left open would be reported unclosed by
        # GC during some later test, and fail that one too.
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        await asyncio.gather(*(client.close() for client in [slow, *healthy]))
        # The slow client's closing handshake may not finish (it read nothing): drop it.
        slow.connection.transport.abort()
