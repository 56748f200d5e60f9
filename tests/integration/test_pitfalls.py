"""Regression tests for the traps of this stack (uvicorn, broadcaster, redis-py) that this
code touches.

Each test names its trap. Workers here are started per test, since several tests
break a worker's Redis connections on purpose.
"""

from __future__ import annotations

import asyncio
import signal

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import WorkerFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisServer,
    redis_args,
    subscribed_client,
    tiny_buffer_socket,
    unique,
    wait_for,
)


async def drain(client: Client) -> None:
    """Read until the connection closes (bounded: each read times out)."""
    while True:
        await client.recv(timeout=10)


async def test_first_subscription_of_a_process_delivers(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # broadcaster 0.3.1's Redis backend with redis-py 8 can deliver nothing after the
    # first subscription of a process. A fresh worker: its very first channel must work.
    worker = make_worker(*redis_args(redis_server, prefix))
    first, second = unique("first"), unique("second")
    client = await subscribed_client(worker, first)
    worker.publish(first, "one")
    assert (await client.recv())["data"] == "one"
    await client.subscribe(second)
    worker.publish(second, "two")
    worker.publish(first, "three")
    assert [(await client.recv())["data"] for _ in range(2)] == ["two", "three"]
    await client.close()


async def test_reader_survives_its_connection_being_killed(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # broadcaster's listener ends on a Redis disconnect and subscribers hang forever
    # (upstream issue #144). Ours reconnects, re-subscribes by itself, and delivers from
    # history what was published meanwhile, before newer messages and only once.
    worker = make_worker(*redis_args(redis_server, prefix))
    channel, other = unique("kill"), unique("kill")
    client = await subscribed_client(worker, channel)
    await client.subscribe(other)
    name = worker.redis_name(prefix)
    pubsub = redis_server.kill_pubsub_of(name)
    # Published while the worker may not be listening: it must arrive all the same.
    worker.publish(channel, "during")
    wait_for(lambda: worker.metric("broadcast_redis_reconnects_total") >= 1, what="reconnect")
    wait_for(lambda: worker.status("/readyz") == 200, what="ready again")
    [again] = redis_server.pubsub_clients(name)
    assert again["id"] != pubsub["id"]
    assert again["sub"] == "3"  # two channels and the worker's canary
    worker.publish(channel, "after the kill")
    assert [(await client.recv())["data"] for _ in range(2)] == ["during", "after the kill"]
    await client.alive()  # and nothing else: no duplicate, no gap
    assert worker.metric("broadcast_gaps_filled_total") == 2  # both channels were live
    assert worker.metric("broadcast_gaps_total") == 0
    await client.close()


async def test_non_utf8_payload_does_not_end_the_reader(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # The other way broadcaster's listener dies: a payload that is not UTF-8.
    worker = make_worker(*redis_args(redis_server, prefix))
    channel = unique("bytes")
    client = await subscribed_client(worker, channel)
    assert redis_server.client().publish(prefix + channel, b"\xff\xfe\x00garbage") == 1
    worker.publish(channel, "fine")
    assert (await client.recv())["data"] == "fine"
    assert worker.metric("broadcast_redis_dropped_payloads_total") == 1
    await client.close()


def test_publish_rides_out_a_dropped_command_connection(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # Redis.from_url() builds a client with no retries: the first command after a
    # dropped connection would fail. Ours retries connection errors, on the pool's
    # connections and on the publish connection alike.
    worker = make_worker(*redis_args(redis_server, prefix))
    channel = unique("retry")
    worker.publish(channel, "warm up the connections")
    history = f"{worker.http}/api/channels/{channel}/history"
    assert httpx.get(history, timeout=5 * UNIT).status_code == 200  # a pool connection
    name = worker.redis_name(prefix)
    commands = [c for c in redis_server.clients_named(name) if "P" not in c["flags"]]
    [publishing] = redis_server.publish_clients(name)
    assert commands
    for connection in [*commands, publishing]:
        redis_server.client().client_kill_filter(_id=connection["id"])
    worker.publish(channel, "after the drop")  # asserts 200
    assert httpx.get(history, timeout=5 * UNIT).status_code == 200
    assert [c["id"] for c in redis_server.publish_clients(name)] != [publishing["id"]]


async def test_per_message_deflate_is_off_by_default(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix))
    client = await Client.connect(worker.ws + "/ws", compression="deflate")
    assert client.connection.response is not None
    assert "Sec-WebSocket-Extensions" not in client.connection.response.headers
    await client.close()


async def test_a_client_that_only_listens_survives_server_pings(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # uvicorn's websockets-sansio stops reading after each message until the app calls
    # receive(): a handler that only sends never sees the pongs and is closed with 1011.
    worker = make_worker(
        *redis_args(redis_server, prefix, "--ws-ping-interval", "0.1", "--ws-ping-timeout", "0.3")
    )
    channel = unique("idle")
    client = await subscribed_client(worker, channel)
    # Twenty ping intervals of silence from the client's application.
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.connection.wait_closed(), 2.0 * UNIT)
    worker.publish(channel, "still connected")
    assert (await client.recv())["data"] == "still connected"
    await client.close()


async def test_prefixes_keep_deployments_apart(
    make_worker: WorkerFactory, redis_server: RedisServer
) -> None:
    # Pub/sub ignores the database number: /0 and /1 would hear each other. Prefixes don't.
    url_db1 = redis_server.url.rsplit("/", 1)[0] + "/1"
    blue = make_worker("--broadcast-url", redis_server.url, "--redis-prefix", unique("blue") + ":")
    green = make_worker("--broadcast-url", url_db1, "--redis-prefix", unique("green") + ":")
    channel = "shared-name"
    listener = await subscribed_client(green, channel)
    blue.publish(channel, "blue only")
    green.publish(channel, "green only")
    assert (await listener.recv())["data"] == "green only"
    with pytest.raises(TimeoutError):
        await listener.recv(timeout=0.3)
    await listener.close()


async def test_one_pubsub_connection_per_worker_and_no_patterns(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # The pool caps at 100 connections: never one PubSub per client. And PSUBSCRIBE
    # makes every PUBLISH slower, so it is never used.
    worker = make_worker(*redis_args(redis_server, prefix))
    channels = [unique("c") for _ in range(20)]
    clients = [await subscribed_client(worker, channels[n % 20]) for n in range(60)]
    name = worker.redis_name(prefix)
    [pubsub] = redis_server.pubsub_clients(name)
    assert (pubsub["sub"], pubsub["psub"]) == ("21", "0")  # 20 channels and the canary
    assert len(redis_server.clients_named(name)) <= 3
    for client in clients:
        await client.close()


async def test_slow_consumer_is_closed_with_1013_and_nobody_waits(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # Redis disconnects a subscriber that reads too slowly, and broadcaster's queues are
    # unbounded: one client that stops reading must cost neither.
    worker = make_worker(
        *redis_args(
            redis_server, prefix, "--outbox-max-messages", "20", "--outbox-max-bytes", "200000"
        )
    )
    channel = unique("slow")
    # A small receive buffer makes the client's side fill up quickly.
    sock = tiny_buffer_socket(worker.port)
    slow = await subscribed_client(worker, channel, sock=sock, max_queue=1)
    healthy = await subscribed_client(worker, channel)
    received: list[int] = []

    async def read_healthy() -> None:
        while True:
            received.append((await healthy.recv(timeout=10))["data"]["n"])

    reader = asyncio.create_task(read_healthy())
    padding = "x" * 8000
    sent = 0
    async with httpx.AsyncClient(base_url=worker.http) as http:
        # The slow client reads nothing from here on; publish until it is cut off.
        for sent in range(1, 3001):
            response = await http.post(
                f"/api/channels/{channel}/messages", json={"data": {"n": sent, "pad": padding}}
            )
            assert response.status_code == 200
            if (
                sent % 25 == 0
                and "broadcast_slow_consumer_closes_total 1.0" in (await http.get("/metrics")).text
            ):
                break
        else:
            pytest.fail("the slow client was never closed")

    async def healthy_has_all() -> bool:
        return len(received) >= sent

    deadline = asyncio.get_running_loop().time() + 10 * UNIT
    while not await healthy_has_all():
        assert asyncio.get_running_loop().time() < deadline, (len(received), sent)
        await asyncio.sleep(0.02)
    reader.cancel()
    assert received == list(range(1, sent + 1))
    # The slow client, reading again, finds what was in flight and then the 1013.
    with pytest.raises(ConnectionClosed) as info:
        await drain(slow)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 1013
    # The worker's Redis subscription never fell behind or broke meanwhile.
    assert worker.metric("broadcast_redis_reconnects_total") == 0
    assert worker.status("/readyz") == 200
    await healthy.close()


async def test_sigterm_closes_clients_with_1012_and_exits(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # On SIGTERM uvicorn closes every WebSocket with 1012, then waits for the app's
    # tasks forever unless timeout_graceful_shutdown is set: the worker must exit.
    worker = make_worker(*redis_args(redis_server, prefix, "--shutdown-timeout", "3"))
    channel = unique("bye")
    clients = [await subscribed_client(worker, channel) for _ in range(5)]
    worker.signal(signal.SIGTERM)
    for client in clients:
        with pytest.raises(ConnectionClosed) as info:
            await drain(client)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == 1012
    assert worker.process is not None
    # uvicorn re-raises the captured SIGTERM once it has shut down cleanly.
    assert await asyncio.to_thread(worker.process.wait, 10 * UNIT) in (0, -signal.SIGTERM)
    assert "Traceback" not in worker.log()
    assert "Application shutdown complete" in worker.log()
