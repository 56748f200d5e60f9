"""Clients that stop reading hold a bounded amount of a worker, and not for long.

What such a client can cost: whatever is queued for it (bounded by the outbox limits,
which a resume may exceed once, not again and again), and its socket, which a close it
never takes holds only until `WS_CLOSE_TIMEOUT` (or the keepalive) drops it.
"""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import WorkerFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    Worker,
    async_wait_for,
    redis_args,
    subscribed_client,
    tiny_buffer_socket,
    unique,
)
from tests.integration.test_slow_consumers import rss_bytes

SLOW = "broadcast_slow_consumer_closes_total"
CONNECTIONS = "broadcast_connections"
_TCP_ESTABLISHED = 1


def tcp_state(sock: socket.socket) -> int:
    """The kernel's state of `sock` (`tcpi_state`, the first byte of TCP_INFO)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]


async def stuck_client(worker: Worker, *channels: str) -> tuple[Client, socket.socket]:
    """A client that reads nothing once subscribed: a 4 KB receive buffer, no pings."""
    sock = tiny_buffer_socket(worker.port)
    client = await subscribed_client(worker, *channels, sock=sock, max_queue=1, ping_interval=None)
    return client, sock


async def position_of(worker: Worker, channel: str) -> str:
    """The channel's position now: a resume `since` it gets every later message."""
    client = await subscribed_client(worker)
    position = str((await client.subscribe(channel))["position"])
    await client.close()
    return position


async def publish_many(worker: Worker, channel: str, count: int, size: int) -> None:
    async with httpx.AsyncClient(base_url=worker.http, timeout=10 * UNIT) as http:
        for n in range(count):
            response = await http.post(
                f"/api/channels/{channel}/messages", json={"data": {"n": n, "pad": "x" * size}}
            )
            assert response.status_code == 200, response.text


async def dropped(worker: Worker, sock: socket.socket, timeout: float) -> None:
    """Wait until the worker reset the connection and no longer counts it."""
    await async_wait_for(
        lambda: tcp_state(sock) != _TCP_ESTABLISHED and worker.metric(CONNECTIONS) == 0,
        timeout,
        "the worker to drop the connection",
    )


@pytest.mark.timeout(120)
async def test_resuming_again_and_again_without_reading_is_cut_off(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # Each resume's backlog is 100 messages of 30 KB (3 MB). Before, each one raised the
    # outbox's limits again until the client read, which it never does: the worker grew
    # by hundreds of megabytes and never cut it off.
    worker = make_worker(*redis_args(redis_server, prefix, "--ws-ping-interval", "300"))
    channel = unique("churn")
    since = await position_of(worker, channel)
    await publish_many(worker, channel, 100, 30_000)
    client, sock = await stuck_client(worker)
    rss_before = rss_bytes(worker)
    resumes = 0
    try:
        deadline = time.monotonic() + 30 * UNIT
        while worker.metric(SLOW) == 0 and resumes < 300:
            assert time.monotonic() < deadline, f"not cut off after {resumes} resumes"
            try:
                await client.send({"type": "subscribe", "channel": channel, "since": since})
                await client.send({"type": "unsubscribe", "channel": channel})
            except ConnectionClosed:
                break
            resumes += 1
            if resumes % 5 == 0:
                await asyncio.sleep(0.05)  # let the worker take them, then look again
        await async_wait_for(lambda: worker.metric(SLOW) == 1, 10, "the 1013")
        growth = rss_bytes(worker) - rss_before
        print(f"\ncut off after {resumes} resumes sent; worker RSS {growth / 1e6:+.1f} MB")
        # One backlog granted past the limits (and one more in the socket's buffers),
        # not one per resume.
        assert growth < 60_000_000
    finally:
        client.connection.transport.abort()
        sock.close()


@pytest.mark.timeout(60)
async def test_a_client_cut_off_that_never_reads_is_dropped_after_the_close_timeout(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # Its 1013 close frame waits behind frames it never reads: without a deadline the
    # socket stayed open, and counted, for as long as the client kept it.
    worker = make_worker(
        *redis_args(
            redis_server, prefix, "--outbox-max-messages", "20", "--ws-ping-interval", "300"
        ),
        env={"WS_CLOSE_TIMEOUT": "1"},
    )
    channel = unique("cut")
    client, sock = await stuck_client(worker, channel)
    try:
        async with httpx.AsyncClient(base_url=worker.http, timeout=10 * UNIT) as http:
            # 30 KB each: past the kernel's buffers (up to 4 MB) after a few hundred.
            for n in range(1000):
                response = await http.post(
                    f"/api/channels/{channel}/messages",
                    json={"data": {"n": n, "pad": "x" * 30_000}},
                )
                assert response.status_code == 200
                if n % 10 == 0 and worker.metric(SLOW) == 1:
                    break
        assert worker.metric(SLOW) == 1
        cut = time.monotonic()
        await dropped(worker, sock, 10)
        print(f"\ndropped {time.monotonic() - cut:.1f} s after the 1013 (WS_CLOSE_TIMEOUT=1)")
    finally:
        client.connection.transport.abort()
        sock.close()


@pytest.mark.timeout(60)
async def test_a_client_that_never_reads_its_backlog_is_dropped_by_the_keepalive(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # A resume's backlog (6 MB, more than the kernel buffers) is queued past the outbox
    # limits, so no 1013 comes. The keepalive's close frame waits behind it: before, the
    # socket stayed open and counted for as long as the client kept it.
    worker = make_worker(
        *redis_args(
            redis_server,
            prefix,
            *("--max-data-bytes", "60000", "--max-frame-bytes", "65536"),
            *("--ws-ping-interval", "1", "--ws-ping-timeout", "1"),
        ),
        env={"WS_CLOSE_TIMEOUT": "300"},  # the keepalive, not the close deadline, drops it
    )
    channel = unique("backlog")
    since = await position_of(worker, channel)
    await publish_many(worker, channel, 100, 59_000)
    client, sock = await stuck_client(worker)
    try:
        await client.send({"type": "subscribe", "channel": channel, "since": since})
        sent = time.monotonic()
        await dropped(worker, sock, 15)
        print(f"\ndropped {time.monotonic() - sent:.1f} s after the resume (ping 1 s + 1 s)")
        assert worker.metric(SLOW) == 0
    finally:
        client.connection.transport.abort()
        sock.close()
