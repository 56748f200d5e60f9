"""A worker across a Redis restart: not ready, refuses publishes, then recovers by itself."""

from __future__ import annotations

import httpx

from tests.conftest import WorkerFactory
from tests.helpers import RedisServer, redis_args, subscribed_client, unique, wait_for


async def test_redis_restart_is_survived_without_silent_loss(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix))
    channel = unique("outage")
    client = await subscribed_client(worker, channel)

    own_redis.kill()
    wait_for(lambda: worker.status("/readyz") == 503, what="not ready while Redis is down")
    refused = httpx.post(
        f"{worker.http}/api/channels/{channel}/messages", json={"data": "lost?"}, timeout=30
    )
    assert refused.status_code == 503
    assert refused.headers["retry-after"]
    assert refused.json()["error"] == "unavailable"
    await client.send({"type": "publish", "channel": channel, "data": "lost?", "ref": "w"})
    error = await client.recv(timeout=30)
    assert (error["type"], error["code"], error["ref"]) == ("error", "unavailable", "w")

    own_redis.start()  # same port, empty
    wait_for(lambda: worker.status("/readyz") == 200, what="ready again after the restart")
    worker.publish(channel, "after the restart")
    # Told that messages may have been missed, then live again.
    assert await client.recv() == {"type": "gap", "channel": channel}
    frame = await client.recv()
    assert frame["data"] == "after the restart"
    await client.close()
