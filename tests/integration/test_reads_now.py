"""Commands taken from inside uvicorn's read (service/adapters/uvicorn.py
`ReadingProtocol`): a message is handled there when nothing else is under way on the
connection, and every reply still comes in the order of the commands.

A benchmark only ever sees the publish path; these tests drive the others on purpose.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.exceptions import ConnectionClosed

from tests.conftest import WorkerFactory
from tests.helpers import (
    Client,
    RedisServer,
    Worker,
    async_wait_for,
    redis_args,
    subscribed_client,
    unique,
    wait_for,
)

READ = 'broadcast_frames_received_total{path="read"}'
QUEUED = 'broadcast_frames_received_total{path="queued"}'


async def test_publishes_and_pings_are_taken_from_the_read(worker: Worker) -> None:
    channel = unique("read")
    client = await subscribed_client(worker, channel)
    read, queued = worker.metric(READ), worker.metric(QUEUED)
    for n in range(5):
        assert (await client.publish(channel, n, ref=n))["ref"] == n
        assert (await client.recv_type("message"))["data"] == n
        await client.send({"type": "ping", "ref": n})
        assert await client.recv_type("pong") == {"type": "pong", "ref": n}
    assert worker.metric(READ) - read == 10
    assert worker.metric(QUEUED) == queued
    # A subscribe too: what it waits for (Redis, the hub) runs in a task of its own.
    await client.subscribe(unique("read"))
    assert worker.metric(READ) - read == 11
    assert worker.metric(QUEUED) == queued
    await client.close()


async def test_commands_sent_together_are_answered_in_their_order(worker: Worker) -> None:
    # The first publish is taken from the read; everything behind it waits in uvicorn's
    # queue until Redis has answered it, then goes through the read loop in order.
    first, second = unique("together"), unique("together")
    client = await subscribed_client(worker)
    commands = [
        {"type": "publish", "channel": first, "data": 1, "ref": "p1"},
        {"type": "subscribe", "channel": second, "ref": "s"},
        {"type": "publish", "channel": first, "data": 2, "ref": "p2"},
        {"type": "ping", "ref": "ping"},
        {"type": "publish", "channel": "", "data": 3, "ref": "bad"},
        {"type": "unsubscribe", "channel": second, "ref": "u"},
        {"type": "publish", "channel": first, "data": 4, "ref": "p4"},
    ]
    for _ in range(20):
        # All in one go, so that they arrive while the first is still in flight.
        await asyncio.gather(*(client.send(command) for command in commands))
        replies = [await client.recv() for _ in commands]
        assert [(r["type"], r.get("ref")) for r in replies] == [
            ("published", "p1"),
            ("subscribed", "s"),
            ("published", "p2"),
            ("pong", "ping"),
            ("error", "bad"),
            ("unsubscribed", "u"),
            ("published", "p4"),
        ]
        ids = [r["id"] for r in replies if r["type"] == "published"]
        assert ids == sorted(ids, key=lambda i: int(i.rpartition(":")[2]))
    await client.close()


async def test_a_publish_from_the_read_rides_out_a_dropped_publish_connection(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix))
    channel = unique("dropped")
    subscriber = await subscribed_client(worker, channel)
    publisher = await subscribed_client(worker)
    await publisher.publish(channel, "before")  # the publish connection is up
    assert (await subscriber.recv_type("message"))["data"] == "before"
    read = worker.metric(READ)
    for n in range(3):
        [conn] = redis_server.publish_clients(worker.redis_name(prefix))
        redis_server.client().client_kill_filter(_id=conn["id"])
        # Sent at once: it may meet the dead connection before the worker has noticed.
        reply = await publisher.publish(channel, n, ref=n)
        assert (reply["type"], reply["ref"]) == ("published", n)
        message = await subscriber.recv_type("message")
        assert (message["data"], message["id"]) == (n, reply["id"])
    assert worker.metric(READ) - read == 3
    await asyncio.sleep(0)
    with pytest.raises(TimeoutError):
        await subscriber.recv(timeout=0.3)  # and nothing twice
    await publisher.close()
    await subscriber.close()


async def test_a_publish_from_the_read_loads_the_script_redis_lost(
    worker: Worker, redis_server: RedisServer
) -> None:
    channel = unique("flushed")
    client = await subscribed_client(worker)
    first = await client.publish(channel, 1)
    redis_server.client().script_flush()
    second = await client.publish(channel, 2, ref="after-flush")
    assert second["ref"] == "after-flush"
    assert int(second["id"].rpartition(":")[2]) == int(first["id"].rpartition(":")[2]) + 1
    await client.close()


async def test_simple_mode_publishes_from_the_read(worker: Worker) -> None:
    channel = unique("simple")
    subscriber = await subscribed_client(worker, channel)
    simple = await Client.connect(worker.ws + f"/ws/{channel}")
    read = worker.metric(READ)
    for n in range(3):
        await simple.send(f"hello {n}")
        assert (await subscriber.recv_type("message"))["data"] == f"hello {n}"
    assert worker.metric(READ) - read == 3
    await simple.close()
    await subscriber.close()


async def test_a_client_gone_before_its_publish_is_answered_leaves_no_trace(
    worker: Worker,
) -> None:
    channel = unique("gone")
    subscriber = await subscribed_client(worker, channel)
    for n in range(10):
        publisher = await subscribed_client(worker)
        await publisher.send({"type": "publish", "channel": channel, "data": n})
        publisher.connection.transport.abort()
        # The message was taken: it is published, whoever asked for it.
        assert (await subscriber.recv_type("message"))["data"] == n
    wait_for(lambda: worker.metric("broadcast_connections") == 1, what="the publishers gone")
    assert "Traceback" not in worker.log()
    await subscriber.close()


async def test_a_text_frame_that_is_not_utf8_still_closes_with_1007(worker: Worker) -> None:
    client = await subscribed_client(worker)
    connection = client.connection
    async with connection.send_context():
        connection.protocol.send_text(b"\xff\xfe not utf-8")
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert connection.close_code == 1007


async def test_a_flood_of_publishes_waits_in_the_queue_without_losing_one(
    worker: Worker,
) -> None:
    # A client that does not wait for replies: one publish is in flight at a time, the
    # rest wait in uvicorn's queue (which stops reading the socket meanwhile).
    channel = unique("flood")
    subscriber = await subscribed_client(worker, channel)
    publisher = await subscribed_client(worker)
    frames = [json.dumps({"type": "publish", "channel": channel, "data": n}) for n in range(300)]
    await asyncio.gather(*(publisher.send(frame) for frame in frames))
    replies = [await publisher.recv() for _ in frames]
    assert {r["type"] for r in replies} == {"published"}
    assert [(await subscriber.recv_type("message"))["data"] for _ in frames] == list(range(300))

    async def all_counted() -> bool:
        return worker.metric('broadcast_messages_published_total{via="ws"}') >= 300

    await async_wait_for(all_counted, what="every publish counted")
    await publisher.close()
    await subscriber.close()
