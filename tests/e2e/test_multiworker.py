"""Several real worker processes sharing one real Redis."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import WorkersFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    Worker,
    free_port,
    hermetic_environment,
    redis_args,
    seq_of,
    subscribed_client,
    unique,
    wait_for,
)

pytestmark = pytest.mark.e2e

# Publishers here go as fast as they can from one connection; the limit has its own tests.
UNLIMITED = ("--publish-rate", "100000", "--publish-burst", "100000")


async def collect(client: Client, count: int) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = []
    while len(messages) < count:
        frame = await client.recv(timeout=20)
        if frame["type"] == "message":
            messages.append(frame)
    return messages


async def test_every_subscriber_on_every_worker_gets_everything_once_in_one_order(
    make_workers: WorkersFactory, redis_server: RedisServer, prefix: str
) -> None:
    workers = make_workers(3, *redis_args(redis_server, prefix, *UNLIMITED))
    channel = unique("orders")
    subscribers: list[Client] = []
    for worker in workers:
        for _ in range(4):
            client = await subscribed_client(worker, channel)
            subscribers.append(client)
    per_publisher = 150
    collectors = [asyncio.create_task(collect(c, 2 * per_publisher)) for c in subscribers]

    async def publish_over_websocket() -> list[str]:
        publisher = await Client.connect(workers[0].ws + "/ws")
        await publisher.welcome()
        ids = []
        for n in range(per_publisher):
            ids.append((await publisher.publish(channel, {"ws": n}))["id"])
        await publisher.close()
        return ids

    async def publish_over_http() -> list[str]:
        ids = []
        async with httpx.AsyncClient(base_url=workers[1].http) as http:
            for n in range(per_publisher):
                response = await http.post(
                    f"/api/channels/{channel}/messages", json={"data": {"http": n}}
                )
                assert response.status_code == 200
                ids.append(response.json()["id"])
        return ids

    ws_ids, http_ids = await asyncio.gather(publish_over_websocket(), publish_over_http())
    received = await asyncio.gather(*collectors)

    acked = set(ws_ids) | set(http_ids)
    assert len(acked) == 2 * per_publisher
    reference = [m["id"] for m in received[0]]
    for messages in received:
        ids = [m["id"] for m in messages]
        assert len(ids) == len(set(ids)), "a message arrived twice"
        assert set(ids) == acked, "a message is missing"
        assert ids == reference, "subscribers disagree on the order"
    # The order is the order of the ids Redis gave out.
    assert [seq_of(i) for i in reference] == list(range(1, 2 * per_publisher + 1))
    # Each publisher's own messages keep the order it published them in.
    ws_seen = [m["data"]["ws"] for m in received[0] if "ws" in m["data"]]
    http_seen = [m["data"]["http"] for m in received[0] if "http" in m["data"]]
    assert ws_seen == list(range(per_publisher))
    assert http_seen == list(range(per_publisher))
    for client in subscribers:
        await client.close()


async def test_a_burst_of_clients_on_a_fresh_channel_all_receive(
    make_workers: WorkersFactory, redis_server: RedisServer, prefix: str
) -> None:
    workers = make_workers(3, *redis_args(redis_server, prefix, *UNLIMITED))
    channel = unique("burst")
    per_worker = 200

    async def join(worker: Worker) -> Client:
        client = await Client.connect(worker.ws + "/ws", open_timeout=30 * UNIT)
        await client.welcome()
        await client.send({"type": "subscribe", "channel": channel})
        assert (await client.recv(timeout=30))["type"] == "subscribed"
        return client

    clients = await asyncio.gather(*(join(w) for w in workers for _ in range(per_worker)))
    message_id = workers[2].publish(channel, "to all 600")
    frames = await asyncio.gather(*(c.recv(timeout=20) for c in clients))
    assert all(f["id"] == message_id and f["data"] == "to all 600" for f in frames)
    # One Redis subscription per worker, whatever the number of clients.
    assert redis_server.client().pubsub_numsub(prefix + channel)[0][1] == 3
    for worker in workers:
        assert worker.metric("broadcast_connections") == per_worker

    await asyncio.gather(*(c.close() for c in clients))
    # Everyone is released: connections, then (after the linger) the subscriptions.
    for worker in workers:
        wait_for(lambda w=worker: w.metric("broadcast_connections") == 0, what="release")
    wait_for(
        lambda: redis_server.client().pubsub_numsub(prefix + channel)[0][1] == 0,
        what="the workers to unsubscribe",
    )


async def test_workers_flag_runs_a_shared_multi_process_server(
    redis_server: RedisServer, prefix: str, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "workers2.log"
    env = hermetic_environment()
    with log.open("wb") as out:
        parent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--workers",
                "2",
                "--port",
                str(port),
                *redis_args(redis_server, prefix),
            ],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(base + "/readyz").status_code == 200, 30, "workers")
        # One ready process already answers /readyz: wait until both have started, or
        # every connection below lands on the first one (seen in CI on a busy machine).
        wait_for(lambda: log.read_text().count("ready to serve") == 2, 30, "both worker processes")
        # Connect until both worker processes have answered.
        by_worker: dict[str, Client] = {}
        spare: list[Client] = []
        for _ in range(100):
            client = await Client.connect(f"ws://127.0.0.1:{port}/ws")
            worker_id = (await client.welcome())["worker"]
            if worker_id in by_worker:
                spare.append(client)
            else:
                by_worker[worker_id] = client
            if len(by_worker) == 2:
                break
        assert len(by_worker) == 2, log.read_text()
        channel = unique("two")
        for client in by_worker.values():
            await client.subscribe(channel)
        first, second = by_worker.values()
        published = await first.publish(channel, "across processes")
        for client in (first, second):
            frame = await client.recv()
            assert (frame["id"], frame["data"]) == (published["id"], "across processes")
        pids = [int(re.sub(r".*:", "", w)) for w in by_worker]
        for client in [*by_worker.values(), *spare]:
            await client.close()
    finally:
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=30 * UNIT)
    assert parent.returncode == 0, log.read_text()
    for pid in pids:
        assert not _alive(pid), f"worker process {pid} outlived its parent"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
