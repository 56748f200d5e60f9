"""History in Redis: what a publish keeps, reading it over HTTP, resuming with `since`."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import WorkerFactory
from tests.helpers import (
    RedisServer,
    Worker,
    redis_args,
    seq_of,
    subscribed_client,
    unique,
    wait_for,
)


def history(worker: Worker, channel: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{worker.http}/api/channels/{channel}/history", params=params, timeout=10)


def publish_many(worker: Worker, channel: str, count: int, data: Any = None) -> list[str]:
    """Publish `count` messages (`data`, or 0, 1, 2, ...) over HTTP; their ids."""
    with httpx.Client(base_url=worker.http, timeout=10) as http:
        url = f"/api/channels/{channel}/messages"
        return [
            str(http.post(url, json={"data": n if data is None else data}).json()["id"])
            for n in range(count)
        ]


async def test_a_publish_keeps_the_message_in_a_trimmed_expiring_stream(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix, "--history-size", "10"))
    channel = unique("kept")
    ids = publish_many(worker, channel, 250)
    assert [seq_of(i) for i in ids] == list(range(1, 251))
    redis = redis_server.client()
    # Hash-tagged by channel: both keys live in one Redis Cluster slot.
    stream, meta = f"{prefix}history:{{{channel}}}", f"{prefix}meta:{{{channel}}}"
    # Trimmed approximately: whole nodes of 100 entries go, so 10 to 110 remain.
    assert 10 <= redis.xlen(stream) <= 110
    last_id, fields = redis.xrevrange(stream, count=1)[0]
    assert last_id == b"250-0"
    assert fields[b"f"].decode() == (
        f'{{"type":"message","channel":"{channel}","id":"{ids[-1]}","data":249}}'
    )
    assert 0 < redis.ttl(stream) <= 300  # HISTORY_TTL
    assert 300 < redis.ttl(meta) <= 604_800  # HISTORY_META_TTL
    assert redis.hget(meta, "seq") == b"250"
    assert ids[0].startswith(redis.hget(meta, "epoch").decode() + ":")


async def test_history_over_http(worker: Worker) -> None:
    channel = unique("read")
    ids = publish_many(worker, channel, 5)
    body = history(worker, channel).json()
    assert body == {
        "channel": channel,
        "position": ids[-1],
        "messages": [{"id": i, "data": n} for n, i in enumerate(ids)],
    }
    assert [m["id"] for m in history(worker, channel, limit=2).json()["messages"]] == ids[3:]
    # Paging forwards from an id.
    page = history(worker, channel, since=ids[1], limit=2).json()
    assert (page["recovered"], [m["id"] for m in page["messages"]]) == (True, ids[2:4])
    page = history(worker, channel, since=ids[3], limit=2).json()
    assert (page["recovered"], [m["id"] for m in page["messages"]]) == (True, ids[4:])
    page = history(worker, channel, since=ids[4]).json()
    assert (page["recovered"], page["messages"], page["position"]) == (True, [], ids[-1])
    # Ids this service did not give, or from another epoch: history cannot reach back.
    for since in ("17", "nope:1", "x" + ids[0]):
        page = history(worker, channel, since=since).json()
        assert (page["recovered"], page["messages"]) == (False, []), since
    # A channel with no message yet has a position all the same: "before the first".
    fresh = history(worker, unique("fresh")).json()
    assert fresh["messages"] == []
    assert fresh["position"].endswith(":0")


async def test_history_over_http_refuses_bad_requests(worker: Worker) -> None:
    for params in ({"limit": "0"}, {"limit": "1001"}, {"limit": "ten"}, {"limit": "-1"}):
        response = history(worker, "news", **params)
        assert response.status_code == 400, params
        assert response.json()["error"] == "invalid_request"
        assert "limit" in response.json()["message"]
    response = history(worker, "bad channel!")
    assert (response.status_code, response.json()["error"]) == (400, "invalid_channel")


async def test_history_over_http_during_an_outage_is_503(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    own_redis.kill()
    wait_for(lambda: worker.status("/readyz") == 503, what="not ready")
    response = history(worker, "news")
    assert (response.status_code, response.json()["error"]) == (503, "unavailable")
    assert response.headers["retry-after"]


async def test_subscribe_since_gives_the_missed_messages_then_live_ones(worker: Worker) -> None:
    channel = unique("resume")
    first = await subscribed_client(worker)
    reply = await first.subscribe(channel)
    position = reply["position"]
    await first.close()
    missed = publish_many(worker, channel, 3)
    again = await subscribed_client(worker)
    reply = await again.subscribe(channel, since=position, ref="r")
    assert reply == {
        "type": "subscribed",
        "channel": channel,
        "position": position,
        "recovered": True,
        "ref": "r",
    }
    assert [(await again.recv())["id"] for _ in missed] == missed
    live = worker.publish(channel, "live")
    assert (await again.recv())["id"] == live
    await again.alive()  # nothing more: no duplicate
    # Resuming from the latest id: nothing missed, still recovered.
    latest = await subscribed_client(worker)
    reply = await latest.subscribe(channel, since=live)
    assert (reply["recovered"], reply["position"]) == (True, live)
    await latest.alive()
    for client in (again, latest):
        await client.close()


async def test_since_older_than_history_is_not_recovered(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix, "--history-size", "3"))
    channel = unique("trimmed")
    ids = publish_many(worker, channel, 250)  # the first node of 100 entries is trimmed
    client = await subscribed_client(worker)
    reply = await client.subscribe(channel, since=ids[0])
    # Told to resync; live delivery starts after the latest message.
    assert (reply["recovered"], reply["position"]) == (False, ids[-1])
    live = worker.publish(channel, "live")
    assert (await client.recv())["id"] == live
    # Within what is kept, the same channel recovers.
    reply = await client.subscribe(unique("other"), since="nope:1")
    assert reply["recovered"] is False
    again = await subscribed_client(worker)
    reply = await again.subscribe(channel, since=ids[-2])
    assert reply["recovered"] is True
    assert [(await again.recv())["id"] for _ in range(2)] == [ids[-1], live]
    for c in (client, again):
        await c.close()


async def test_history_off_recovers_only_when_nothing_was_missed(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix, "--history-size", "0"))
    channel = unique("off")
    ids = publish_many(worker, channel, 2)
    assert not redis_server.client().exists(f"{prefix}history:{{{channel}}}")
    client = await subscribed_client(worker)
    assert (await client.subscribe(channel, since=ids[1]))["recovered"] is True
    other = await subscribed_client(worker)
    assert (await other.subscribe(channel, since=ids[0]))["recovered"] is False
    for c in (client, other):
        await c.close()


async def test_a_redis_restart_starts_a_new_epoch_and_old_ids_do_not_recover(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix))
    channel = unique("epoch")
    before = publish_many(worker, channel, 3)
    own_redis.kill()
    own_redis.start()  # same port, no data: the history is gone
    wait_for(lambda: worker.status("/readyz") == 200, what="ready again")
    after = worker.publish(channel, "new history")
    assert after.rpartition(":")[0] != before[0].rpartition(":")[0]
    assert seq_of(after) == 1
    client = await subscribed_client(worker)
    reply = await client.subscribe(channel, since=before[-1])
    # Never a silent gap: the old id names a history that no longer exists.
    assert (reply["recovered"], reply["position"]) == (False, after)
    await client.close()


# The races below are about the switch from history to live, not about how much history
# is kept: a resume from further back than HISTORY_SIZE is rightly not recovered, and
# how far behind a resume starts depends on how fast the publisher goes. Deep history
# takes that out of the test.
_RACE_ARGS = ("--history-size", "100000", "--publish-rate", "100000", "--publish-burst", "100000")


async def test_resuming_while_messages_pour_in_neither_drops_nor_repeats(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix), *_RACE_ARGS)
    await _resumes_race_a_publisher(worker)


async def test_resumes_race_a_publisher_on_a_channel_fanned_out_in_chunks(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    """The same with every message handed out two members per turn of the event loop,
    against real Redis. (The unit test of chunked fan-outs forces a resume between two
    chunks; here it happens when it happens.)"""
    worker = make_worker(*redis_args(redis_server, prefix, "--fanout-chunk", "2"), *_RACE_ARGS)
    await _resumes_race_a_publisher(worker, crowd=6)


async def _resumes_race_a_publisher(worker: Worker, crowd: int = 0) -> None:
    # The switch from history to live races the publisher; wherever it falls, each
    # resumed subscription must be exactly the tail of the full stream.
    channel = unique("race")
    watcher = await subscribed_client(worker, channel)
    others = [await subscribed_client(worker, channel) for _ in range(crowd)]
    publisher = await subscribed_client(worker)
    stop = asyncio.Event()

    async def publish_until_stopped() -> int:
        n = 0
        while not stop.is_set():
            # In bursts of 20, each burst acknowledged before the next.
            for _ in range(20):
                await publisher.send({"type": "publish", "channel": channel, "data": n})
                n += 1
            for _ in range(20):
                await publisher.recv_type("published")
        return n

    async def resume(since: str) -> tuple[str, list[str]]:
        client = await subscribed_client(worker)
        reply = await client.subscribe(channel, since=since)
        assert reply["recovered"] is True, reply
        received: list[str] = []
        while not received or received[-1] != "end":
            frame = await client.recv()
            received.append(frame["id"] if frame["data"] != "end" else "end")
        await client.close()
        return since, received[:-1]

    seen: list[str] = []
    task = asyncio.create_task(publish_until_stopped())
    resumes = []
    while len(resumes) < 20:
        seen.append((await watcher.recv())["id"])
        if len(seen) % 5 == 0:
            resumes.append(asyncio.create_task(resume(seen[len(seen) // 2])))
    stop.set()
    sent = await task
    end = worker.publish(channel, "end")
    while seen[-1] != end:
        seen.append((await watcher.recv(timeout=10))["id"])
    every = seen[:-1]
    assert len(every) == sent
    for since, received in await asyncio.gather(*resumes):
        assert received == every[every.index(since) + 1 :]
    for other in others:
        received = [(await other.recv(timeout=10))["id"] for _ in range(len(seen))]
        assert received == seen
    for client in (watcher, publisher, *others):
        await client.close()


async def test_a_backlog_larger_than_the_outbox_is_delivered_and_live_messages_follow(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # 40 kept messages of ~1 KB against a 10 KB outbox: the resume must not be what
    # closes the client as a slow consumer (it would resume again, and again).
    worker = make_worker(
        *redis_args(redis_server, prefix, "--outbox-max-bytes", "10000", "--max-data-bytes", "2000")
    )
    channel = unique("big")
    first = await subscribed_client(worker)
    position = (await first.subscribe(channel))["position"]
    await first.close()
    ids = publish_many(worker, channel, 40, "x" * 1000)
    client = await subscribed_client(worker)
    assert (await client.subscribe(channel, since=position))["recovered"] is True
    live = worker.publish(channel, "live")  # queued behind the backlog, past the limit
    received = [(await client.recv())["id"] for _ in range(41)]
    assert received == [*ids, live]
    await client.alive()
    assert worker.metric("broadcast_slow_consumer_closes_total") == 0
    await client.close()


async def test_reading_an_unknown_channel_leaves_only_a_short_lived_key(
    worker: Worker, redis_server: RedisServer
) -> None:
    channel = unique("nobody")
    assert history(worker, channel).json()["messages"] == []
    prefix = worker.args[worker.args.index("--redis-prefix") + 1]
    ttl = redis_server.client().ttl(f"{prefix}meta:{{{channel}}}")
    assert 0 < ttl <= 300  # HISTORY_TTL, not the week a published channel's ids live


async def test_a_limit_with_thousands_of_digits_is_a_400(worker: Worker) -> None:
    response = history(worker, "news", limit="9" * 5000)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


async def test_a_storm_of_resumes_waits_for_pool_connections_instead_of_failing(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    """100 clients resume at once through 3 command connections: all are served.

    redis-py's default pool refuses a command at once ("Too many connections") when all
    its connections are busy; the benchmark's reconnect storm lost a third of its
    resumes to that. The blocking pool makes them wait for a free connection instead.
    """
    worker = make_worker(*redis_args(redis_server, prefix, "--redis-max-connections", "3"))
    channel = unique("storm")
    first = await subscribed_client(worker)
    position = (await first.subscribe(channel))["position"]
    await first.close()
    missed = publish_many(worker, channel, 5)
    clients = [await subscribed_client(worker) for _ in range(100)]
    for client in clients:
        await client.send({"type": "subscribe", "channel": channel, "since": position})
    replies = [await client.recv() for client in clients]
    assert [r for r in replies if r.get("type") != "subscribed"] == []
    assert all(r["recovered"] for r in replies)
    for client in clients:
        assert [(await client.recv())["id"] for _ in missed] == missed
    commands = [
        c for c in redis_server.clients_named(worker.redis_name(prefix)) if "P" not in c["flags"]
    ]
    assert 1 <= len(commands) <= 3, commands
    for client in clients:
        await client.close()
