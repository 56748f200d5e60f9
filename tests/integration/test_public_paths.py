"""FAST_ADAPTERS=false: a worker takes the public paths only (every frame through ASGI
`send` and `receive()`), and serves clients as with the fast adapters: the same frames,
in the same order. The suite's `--public-paths` run (scripts/test) runs the publishing,
fan-out, slow-consumer and resume tests this way too."""

from __future__ import annotations

from tests.conftest import WorkerFactory
from tests.helpers import RedisServer, Worker, redis_args, subscribed_client, unique


def counts(worker: Worker, name: str, *paths: str) -> list[float]:
    """The samples of a metric labelled by `path`."""
    return [worker.metric(f'{name}{{path="{path}"}}') for path in paths]


async def test_with_fast_adapters_off_every_frame_goes_through_asgi(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix), env={"FAST_ADAPTERS": "false"})
    channel = unique("public")
    listeners = [await subscribed_client(worker, channel) for _ in range(3)]
    publisher = await subscribed_client(worker)
    ids = []
    for n in range(20):
        reply = await publisher.publish(channel, {"n": n}, ref=n)
        assert reply == {"type": "published", "channel": channel, "id": reply["id"], "ref": n}
        ids.append(reply["id"])
    for listener in listeners:
        got = [await listener.recv() for _ in ids]
        assert [frame["id"] for frame in got] == ids
        assert [frame["data"] for frame in got] == [{"n": n} for n in range(20)]
    direct, queued = counts(worker, "broadcast_frames_written_total", "direct", "queued")
    in_read, through_loop = counts(worker, "broadcast_frames_received_total", "read", "queued")
    assert direct == 0
    assert queued >= 3 * 20 + 20  # the messages, and the publisher's replies
    assert in_read == 0
    assert through_loop >= 20
    for client in [*listeners, publisher]:
        await client.close()
