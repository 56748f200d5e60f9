"""Redis Sentinel: three workers on `redis+sentinel://`, a primary SIGKILLed under load.

A real group (tests/sentinel.py: a primary, a replica, three Sentinels) and real
workers. What must hold through a failover: every subscriber gets every message once
and in order, or a `gap` frame where it may have lost some; a client that resumes on
another worker afterwards is never told `recovered: true` wrongly (ids given out again
by the promoted replica would make that possible: a new epoch starts instead).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import WorkersFactory
from tests.failover import (
    Reader,
    check_every_reader,
    check_resume,
    epoch,
    publish_until_acked,
)
from tests.helpers import (
    UNIT,
    Client,
    Worker,
    subscribed_client,
    unique,
    wait_for,
)
from tests.sentinel import SentinelGroup


@pytest.fixture
def group(tmp_path: Path) -> Iterator[SentinelGroup]:
    sentinels = SentinelGroup(tmp_path / "sentinel")
    sentinels.start()
    yield sentinels
    sentinels.stop()


def sentinel_workers(
    make_workers: WorkersFactory, group: SentinelGroup, prefix: str
) -> list[Worker]:
    return make_workers(
        3,
        *("--broadcast-url", group.url, "--redis-prefix", prefix),
        *("--broker-timeout", "2", "--canary-interval", "1"),
    )


async def test_three_workers_deliver_in_one_order(
    group: SentinelGroup, make_workers: WorkersFactory, prefix: str
) -> None:
    workers = sentinel_workers(make_workers, group, prefix)
    channel = unique("news")
    subscribers = [await subscribed_client(w, channel) for w in workers for _ in range(2)]
    try:

        async def publish_from(worker: Worker) -> None:
            for n in range(20):
                await worker.publish_async(channel, f"{worker.port}-{n}")

        await asyncio.gather(*(publish_from(worker) for worker in workers))
        orders = []
        for client in subscribers:
            orders.append([(await client.recv_type("message"))["id"] for _ in range(60)])
        assert all(order == orders[0] for order in orders)
        assert len(set(orders[0])) == 60
    finally:
        for client in subscribers:
            await client.close()


async def test_a_failover_under_a_steady_publisher_is_never_silent(
    group: SentinelGroup, make_workers: WorkersFactory, prefix: str
) -> None:
    workers = sentinel_workers(make_workers, group, prefix)
    channel = unique("news")
    readers = [Reader(await subscribed_client(w, channel)) for w in workers]
    resumer = await subscribed_client(workers[0], channel)
    acked: list[int] = []
    ids: dict[int, str] = {}
    old_primary = group.primary_port()
    try:
        async with httpx.AsyncClient(timeout=5 * UNIT) as http:
            for n in range(20):
                ids[n] = await publish_until_acked(http, workers[n % 3], channel, n)
                acked.append(n)
            # The resumer leaves, holding the id of the last message it got.
            for _ in range(20):
                last_seen = (await resumer.recv_type("message"))["id"]
            await resumer.close()

            group.primary.kill()  # SIGKILL, mid-stream
            n = 20
            while group.primary_port() == old_primary or len(acked) < 50:
                ids[n] = await publish_until_acked(http, workers[n % 3], channel, n)
                acked.append(n)
                n += 1
                await asyncio.sleep(0.02)
        assert group.primary_port() == group.replica.port

        await check_every_reader(readers, acked)
        # The promoted replica numbered the messages after the failover in a new epoch.
        assert epoch(ids[acked[-1]]) != epoch(ids[0])

        # The client that left comes back on another worker, from the id it held.
        await check_resume(workers[2], channel, last_seen, ids, acked)
    finally:
        for reader in readers:
            await reader.stop()


async def test_ids_the_promoted_replica_never_saw_do_not_fool_a_resume(
    group: SentinelGroup, make_workers: WorkersFactory, prefix: str
) -> None:
    workers = sentinel_workers(make_workers, group, prefix)
    channel = unique("news")
    async with httpx.AsyncClient(timeout=5 * UNIT) as http:
        for n in range(5):
            await publish_until_acked(http, workers[0], channel, n)
        wait_for(group.replica_caught_up, what="the replica to have the first messages")
        client = await subscribed_client(workers[0], channel)
        # The replica misses the next three: frozen while they are published (for less
        # than the Sentinels' down-after time, so that it can still be promoted).
        os.kill(group.replica.pid(), signal.SIGSTOP)
        try:
            for n in range(5, 8):
                await publish_until_acked(http, workers[0], channel, n)
            held = ""
            for _ in range(3):
                held = (await client.recv_type("message"))["id"]
            group.primary.kill()
        finally:
            os.kill(group.replica.pid(), signal.SIGCONT)
        await client.close()
        # The promoted replica numbers what comes next; without a new epoch it would give
        # out the three ids it never saw again, to other messages.
        for n in range(8, 18):
            await publish_until_acked(http, workers[n % 3], channel, n)
    back = await Client.connect(workers[1].ws + "/ws")
    try:
        await back.welcome()
        await back.send({"type": "subscribe", "channel": channel, "since": held})
        subscribed = await back.recv_type("subscribed", timeout=10)
        assert subscribed["recovered"] is False
    finally:
        await back.close()
