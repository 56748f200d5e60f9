"""Redis Cluster: three workers on `redis-cluster://`, sharded pub/sub, failover, migration.

A real cluster (bench/redis_cluster.py: three primaries, three replicas, on loopback
ports) and real workers. Every channel runs on sharded pub/sub: its subscriptions live
on the primary that owns its slot, and nothing goes through classic pub/sub. Through a
primary SIGKILLed under a steady publisher, and through its slot moved to another
primary, every subscriber gets every message once and in order or a `gap` frame where
it may have lost some, and a client resumes on any worker afterwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.redis_cluster import ClusterTls, LocalCluster
from tests.conftest import WorkerFactory, WorkersFactory
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
    async_wait_for,
    self_signed_certificate,
    start_all,
    subscribed_client,
    unique,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[LocalCluster]:
    with LocalCluster(tmp_path / "cluster") as nodes:
        yield nodes


def cluster_workers(
    make_workers: WorkersFactory, cluster: LocalCluster, prefix: str
) -> list[Worker]:
    return make_workers(
        3,
        *("--broadcast-url", cluster.url, "--redis-prefix", prefix),
        *("--broker-timeout", "2", "--canary-interval", "1"),
    )


def slot_of(cluster: LocalCluster, prefix: str, channel: str) -> int:
    """The slot of `channel`'s pub/sub channel and keys (its hash tag is the channel)."""
    return cluster.keyslot(f"{prefix}{{{channel}}}")


def shard_subscribers(cluster: LocalCluster, port: int, key: str) -> int:
    _, count = cluster.client(port).execute_command("PUBSUB", "SHARDNUMSUB", key)
    return int(count)


async def ready(worker: Worker) -> bool:
    async with httpx.AsyncClient(timeout=2 * UNIT) as http:
        return (await http.get(f"{worker.http}/readyz")).status_code == 200


async def test_three_workers_deliver_every_channel_in_one_order_over_sharded_pubsub(
    cluster: LocalCluster, make_workers: WorkersFactory, prefix: str
) -> None:
    workers = cluster_workers(make_workers, cluster, prefix)
    # Channels on every shard.
    channels: list[str] = []
    owners: set[int] = set()
    while len(owners) < 3 or len(channels) < 6:
        channel = unique("news")
        channels.append(channel)
        owners.add(cluster.owner(slot_of(cluster, prefix, channel)))
    subscribers = {
        channel: [await subscribed_client(w, channel) for w in workers] for channel in channels
    }
    try:
        for channel in channels:
            key = f"{prefix}{{{channel}}}"
            owner = cluster.owner(slot_of(cluster, prefix, channel))
            # One sharded subscription per worker, on the owner; none classic anywhere.
            assert shard_subscribers(cluster, owner, key) == 3
            for port in cluster.primaries():
                assert cluster.client(port).pubsub_numsub(key) == [(key.encode(), 0)]

        async def publish_from(worker: Worker, channel: str) -> None:
            for n in range(10):
                await worker.publish_async(channel, f"{worker.port}-{n}")

        await asyncio.gather(*(publish_from(w, c) for w in workers for c in channels))
        for channel, clients in subscribers.items():
            orders = [[(await c.recv_type("message"))["id"] for _ in range(30)] for c in clients]
            assert all(order == orders[0] for order in orders), channel
            assert len(set(orders[0])) == 30
        # Presence: a subscriber joining on one worker is announced on the others.
        channel = channels[0]
        joiner = await Client.connect(workers[2].ws + "/ws")
        try:
            await joiner.welcome()
            await joiner.send({"type": "subscribe", "channel": channel, "info": {"name": "ann"}})
            await joiner.recv_type("subscribed")
            for client in subscribers[channel][:2]:
                joined = await client.recv_type("join")
                assert (joined["channel"], joined["info"]) == (channel, {"name": "ann"})
        finally:
            await joiner.close()
        # History and readiness work across the shards.
        async with httpx.AsyncClient(timeout=5 * UNIT) as http:
            for channel in channels:
                url = f"{workers[1].http}/api/channels/{channel}/history?limit=100"
                response = await http.get(url)
                assert response.status_code == 200, response.text
                assert len(response.json()["messages"]) == 30
        for worker in workers:
            assert await ready(worker)
    finally:
        for clients in subscribers.values():
            for client in clients:
                await client.close()


async def test_a_primary_killed_under_a_steady_publisher_is_never_silent(
    cluster: LocalCluster, make_workers: WorkersFactory, prefix: str
) -> None:
    workers = cluster_workers(make_workers, cluster, prefix)
    channel = unique("news")
    old_primary = cluster.owner(slot_of(cluster, prefix, channel))
    readers = [Reader(await subscribed_client(w, channel)) for w in workers]
    resumer = await subscribed_client(workers[0], channel)
    acked: list[int] = []
    ids: dict[int, str] = {}
    try:
        async with httpx.AsyncClient(timeout=5 * UNIT) as http:
            for n in range(20):
                ids[n] = await publish_until_acked(http, workers[n % 3], channel, n)
                acked.append(n)
            for _ in range(20):
                last_seen = (await resumer.recv_type("message"))["id"]
            await resumer.close()

            cluster.kill(old_primary)  # SIGKILL, mid-stream
            promoted = asyncio.ensure_future(
                asyncio.to_thread(cluster.wait_promoted, old_primary, 30 * UNIT)
            )
            n = 20
            while not promoted.done() or len(acked) < 50:
                ids[n] = await publish_until_acked(http, workers[n % 3], channel, n)
                acked.append(n)
                n += 1
                await asyncio.sleep(0.02)
            new_primary = await promoted
        assert cluster.owner(slot_of(cluster, prefix, channel)) == new_primary

        await check_every_reader(readers, acked)
        for worker in workers:
            await async_wait_for(lambda worker=worker: ready(worker), timeout=20, what="ready")

        # The client that left comes back on another worker, from the id it held.
        await check_resume(workers[2], channel, last_seen, ids, acked)
    finally:
        for reader in readers:
            await reader.stop()


async def test_a_slot_moved_to_another_primary_takes_its_subscriptions_along(
    cluster: LocalCluster, make_workers: WorkersFactory, prefix: str
) -> None:
    workers = cluster_workers(make_workers, cluster, prefix)
    channel = unique("news")
    slot = slot_of(cluster, prefix, channel)
    source = cluster.owner(slot)
    target = next(port for port in cluster.primaries() if port != source)
    key = f"{prefix}{{{channel}}}"
    # Workers 0 and 1 carry the traffic; worker 2 stays out of it, so that it still
    # believes the slot is on its old owner when its first client comes.
    readers = [Reader(await subscribed_client(w, channel)) for w in workers[:2]]
    acked: list[int] = []
    ids: dict[int, str] = {}
    try:
        async with httpx.AsyncClient(timeout=5 * UNIT) as http:
            for n in range(10):
                ids[n] = await publish_until_acked(http, workers[n % 2], channel, n)
                acked.append(n)
            moved = asyncio.ensure_future(
                asyncio.to_thread(cluster.migrate_slot, slot, target, 30 * UNIT)
            )
            n = 10
            while not moved.done() or len(acked) < 40:
                ids[n] = await publish_until_acked(http, workers[n % 2], channel, n)
                acked.append(n)
                n += 1
                await asyncio.sleep(0.02)
            await moved
            assert cluster.owner(slot) == target
            # Each worker subscribed again where the slot lives now.
            await async_wait_for(
                lambda: asyncio.to_thread(lambda: shard_subscribers(cluster, target, key) == 2),
                timeout=20,
                what="two sharded subscriptions on the new owner",
            )
            # The stale worker's publish is answered MOVED, and goes to the new owner at
            # the first try.
            url = f"{workers[2].http}/api/channels/{channel}/messages"
            response = await http.post(url, json={"data": n})
            assert response.status_code == 200, response.text
            ids[n] = response.json()["id"]
            acked.append(n)
            n += 1
            # Its SSUBSCRIBE too: it learns the slots anew.
            late = await subscribed_client(workers[2], channel)
            for more in range(n, n + 5):
                ids[more] = await publish_until_acked(http, workers[more % 2], channel, more)
                acked.append(more)
        assert [(await late.recv_type("message"))["data"] for _ in range(5)] == acked[-5:]
        await late.close()
        await check_every_reader(readers, acked)
        # The new owner is another server: nothing in Redis tells a move from a failover,
        # so the channel's ids start a new epoch there, and a resume from before the move
        # is told so.
        assert epoch(ids[acked[-1]]) != epoch(ids[0])
        back = await Client.connect(workers[2].ws + "/ws")
        try:
            await back.welcome()
            await back.send({"type": "subscribe", "channel": channel, "since": ids[5]})
            assert (await back.recv_type("subscribed", timeout=10))["recovered"] is False
        finally:
            await back.close()
    finally:
        for reader in readers:
            await reader.stop()


async def test_the_other_shards_go_on_while_one_fails_over(
    tmp_path: Path, make_workers: WorkersFactory, prefix: str
) -> None:
    # As deploy/compose.cluster.yml and the Kubernetes values run it: a shard without a
    # primary stops only its own channels.
    with LocalCluster(tmp_path / "cluster", full_coverage=False) as cluster:
        workers = cluster_workers(make_workers, cluster, prefix)
        channel = unique("news")
        dying = cluster.owner(slot_of(cluster, prefix, channel))
        other = unique("elsewhere")
        while cluster.owner(slot_of(cluster, prefix, other)) == dying:
            other = unique("elsewhere")
        subscriber = await subscribed_client(workers[1], other)
        try:
            cluster.kill(dying)
            async with httpx.AsyncClient(timeout=5 * UNIT) as http:
                # Before the replica takes over (it needs the node timeout and an election),
                # the other shard's channel is published at the first try, and delivered.
                for n in range(5):
                    url = f"{workers[n % 3].http}/api/channels/{other}/messages"
                    response = await http.post(url, json={"data": n})
                    assert response.status_code == 200, response.text
                assert cluster.owner(slot_of(cluster, prefix, channel)) == dying
                got = [(await subscriber.recv_type("message"))["data"] for _ in range(5)]
                assert got == list(range(5))
                await asyncio.to_thread(cluster.wait_promoted, dying, 30 * UNIT)
                await publish_until_acked(http, workers[0], channel, 0)
        finally:
            await subscriber.close()


async def test_a_cluster_that_requires_a_password(
    tmp_path: Path, make_workers: WorkersFactory, prefix: str
) -> None:
    # The URL's password reaches every connection: the client's, and the workers' own
    # pub/sub and publish connections to each node.
    with LocalCluster(tmp_path / "cluster", password="s3cret-pw") as cluster:
        assert cluster.url.startswith("redis-cluster://:s3cret-pw@")
        workers = cluster_workers(make_workers, cluster, prefix)
        channel = unique("news")
        subscribers = [await subscribed_client(w, channel) for w in workers]
        try:
            await workers[0].publish_async(channel, "hello")
            for client in subscribers:
                assert (await client.recv_type("message"))["data"] == "hello"
            for worker in workers:
                assert await ready(worker)
                assert "s3cret-pw" not in worker.log()
        finally:
            for client in subscribers:
                await client.close()


async def test_a_cluster_over_tls(tmp_path: Path, make_worker: WorkerFactory, prefix: str) -> None:
    # rediss-cluster://: the nodes listen on TLS only (no plain port), so every
    # connection a worker makes (the cluster client's, and its own pub/sub and publish
    # connections to each primary) must be TLS, and must trust the nodes' certificate:
    # a private authority is given to the workers as OpenSSL's SSL_CERT_FILE.
    cert, key = self_signed_certificate(tmp_path)
    tls = ClusterTls(cert_file=cert, key_file=key, ca_file=cert)
    with LocalCluster(tmp_path / "cluster", tls=tls) as cluster:
        assert cluster.url.startswith("rediss-cluster://127.0.0.1:")
        workers = [
            make_worker(
                *("--broadcast-url", cluster.url, "--redis-prefix", prefix),
                *("--broker-timeout", "2", "--canary-interval", "1"),
                env={"SSL_CERT_FILE": str(cert)},
                start=False,
            )
            for _ in range(3)
        ]
        start_all(workers)
        # Channels on every primary, each with a subscriber on every worker.
        channels: dict[int, str] = {}
        while len(channels) < len(cluster.primaries()):
            channel = unique("tls")
            channels.setdefault(cluster.owner(slot_of(cluster, prefix, channel)), channel)
        subscribers = [
            (channel, await subscribed_client(worker, channel))
            for channel in channels.values()
            for worker in workers
        ]
        try:
            for port, channel in channels.items():
                assert shard_subscribers(cluster, port, f"{prefix}{{{channel}}}") == 3
            for n, channel in enumerate(channels.values()):
                await workers[n % 3].publish_async(channel, f"over tls {n}")
            for channel, client in subscribers:
                message = await client.recv_type("message")
                assert message["channel"] == channel
                assert message["data"] == f"over tls {list(channels.values()).index(channel)}"
            for worker in workers:
                assert await ready(worker)
        finally:
            for _, client in subscribers:
                await client.close()
