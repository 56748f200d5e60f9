"""Direct writes (service/adapters/uvicorn.py `DirectTransport`): the fan-out writes to
the socket itself when it can, queues when it cannot, and every client sees every frame
once, in order, either way.

A benchmark only ever sees the direct branch; these tests drive the others on purpose.
"""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import WorkerFactory
from tests.helpers import (
    RedisServer,
    Worker,
    redis_args,
    subscribed_client,
    tiny_buffer_socket,
    unique,
    wait_for,
)


def frames_written(worker: Worker) -> tuple[float, float]:
    """(direct, queued) from the worker's metrics."""
    name = "broadcast_frames_written_total"
    return worker.metric(name + '{path="direct"}'), worker.metric(name + '{path="queued"}')


async def publish(worker: Worker, channel: str, count: int, size: int = 0) -> list[str]:
    async with httpx.AsyncClient(base_url=worker.http, timeout=10) as http:
        ids = []
        for n in range(count):
            data = {"n": n, "pad": "x" * size}
            response = await http.post(f"/api/channels/{channel}/messages", json={"data": data})
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
    return ids


async def test_a_reader_that_keeps_up_gets_direct_writes(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix))
    channel = unique("direct")
    clients = [await subscribed_client(worker, channel) for _ in range(3)]
    direct_before, queued_before = frames_written(worker)
    ids = await publish(worker, channel, 20)
    for client in clients:
        assert [(await client.recv())["id"] for _ in ids] == ids
    direct, queued = frames_written(worker)
    assert direct - direct_before == 60
    assert queued == queued_before
    for client in clients:
        await client.close()


async def test_a_paused_socket_queues_and_the_writer_sends_the_rest_in_order(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    """A client that stops reading pauses the transport; frames queue behind it and
    come out in order once it reads again, none lost, none twice."""
    worker = make_worker(*redis_args(redis_server, prefix, "--outbox-max-bytes", "16000000"))
    channel = unique("paused")
    # websockets stops reading past max_queue, so the kernel buffers fill up.
    slow = await subscribed_client(
        worker, channel, sock=tiny_buffer_socket(worker.port), max_queue=1
    )
    direct_before, _ = frames_written(worker)  # welcome and subscribed
    # 8 MB: past the kernel's send buffer (it grows up to 4 MB) and the transport's.
    ids = await publish(worker, channel, 400, size=20_000)
    direct, queued = frames_written(worker)
    assert direct > direct_before, "the first frames went straight to the socket"
    assert queued == 0, "nothing is written from the outbox while the client is stalled"
    # More keep coming while it drains: none may overtake the queued ones.
    publishing = asyncio.create_task(publish(worker, channel, 200, size=2000))
    received = [(await slow.recv(timeout=10))["id"] for _ in ids]
    ids += await publishing
    received += [(await slow.recv(timeout=10))["id"] for _ in ids[len(received) :]]
    assert received == ids
    direct, queued = frames_written(worker)
    assert queued > 0, "the frames behind the stall were written by the writer"
    assert direct - direct_before + queued == len(ids)
    await slow.alive()  # and nothing more: no frame twice
    # Once drained, direct writes resume.
    more = await publish(worker, channel, 5)
    assert [(await slow.recv())["id"] for _ in more] == more
    wait_for(lambda: frames_written(worker)[0] >= direct + 5, 5, "direct writes again")
    await slow.close()


async def test_with_compression_every_frame_goes_through_asgi(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    """Compressed frames differ per connection: no shared bytes, no direct writes."""
    worker = make_worker(*redis_args(redis_server, prefix, "--ws-per-message-deflate"))
    channel = unique("deflate")
    client = await subscribed_client(worker, channel, compression="deflate")
    assert client.connection.protocol.extensions, "deflate was not negotiated"
    ids = await publish(worker, channel, 10)
    assert [(await client.recv())["id"] for _ in ids] == ids
    direct, queued = frames_written(worker)
    assert direct == 0
    assert queued >= 10 + 2  # welcome and subscribed too
    await client.close()


async def test_frames_from_the_fan_out_and_replies_interleave_in_order(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    """A client publishing and pinging while messages arrive sees each reply after
    everything queued before it."""
    worker = make_worker(*redis_args(redis_server, prefix))
    channel = unique("mix")
    client = await subscribed_client(worker, channel)
    publishing = asyncio.create_task(publish(worker, channel, 50))
    for n in range(20):
        await client.send({"type": "ping", "ref": n})
    ids = await publishing
    frames = [await client.recv() for _ in range(len(ids) + 20)]
    assert [f["id"] for f in frames if f["type"] == "message"] == ids
    assert [f["ref"] for f in frames if f["type"] == "pong"] == list(range(20))
    await client.close()
