"""Redis faults the broker must ride out without losing, duplicating or lying."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import redis.asyncio as aredis

from service.broker import Broker
from service.settings import Settings
from tests.conftest import WorkerFactory
from tests.helpers import (
    UNIT,
    Client,
    RedisProxy,
    RedisServer,
    redis_args,
    subscribed_client,
    unique,
    wait_for,
)


async def next_message(pubsub: aredis.client.PubSub) -> bytes:
    async with asyncio.timeout(5 * UNIT):
        while True:
            message = await pubsub.get_message(timeout=1)
            if message is not None and message["type"] == "message":
                return bytes(message["data"])


async def test_a_publish_whose_reply_is_lost_is_not_published_twice(
    redis_server: RedisServer, prefix: str
) -> None:
    # The connection breaks after Redis ran the publish script but before its reply
    # arrived: the retry must answer with the first id, not publish a second message.
    listener = aredis.Redis(port=redis_server.port)
    pubsub = listener.pubsub()
    await pubsub.subscribe(prefix + "news")
    proxy = await RedisProxy(redis_server.port).start()
    settings = Settings.model_validate({"broadcast_url": proxy.url, "redis_prefix": prefix})
    try:
        async with Broker(settings, "test") as broker:
            await broker.publish("warm-up", b"0")  # loads the script
            proxy.arm(b"EVALSHA")
            publishing = asyncio.create_task(broker.publish("news", b'"once"'))
            first = await next_message(pubsub)  # Redis ran it...
            proxy.cut()  # ...and the reply is lost with the connection
            message_id = await publishing
        assert f'"id":"{message_id}"'.encode() in first
        # Anything published twice would arrive before this marker.
        await listener.publish(prefix + "news", b"marker")
        assert await next_message(pubsub) == b"marker"
    finally:
        await proxy.close()
        await pubsub.aclose()
        await listener.aclose()


async def test_a_frozen_redis_is_noticed_and_survived(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    # health_check_interval does not notice a frozen Redis (SIGSTOP); the watchdog's
    # PING on the subscription connection does.
    worker = make_worker(
        *redis_args(
            own_redis,
            prefix,
            "--redis-ping-interval",
            "0.2",
            "--redis-ping-timeout",
            "0.5",
            "--broker-timeout",
            "1",
        )
    )
    channel = unique("frozen")
    client = await subscribed_client(worker, channel)
    assert own_redis.process is not None
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        frozen_at = time.monotonic()
        wait_for(lambda: worker.status("/readyz") == 503, what="not ready while frozen")
        noticed_after = time.monotonic() - frozen_at
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    assert noticed_after < 5 * UNIT
    wait_for(lambda: worker.status("/readyz") == 200, what="ready after SIGCONT")
    worker.publish(channel, "thawed")
    # Redis kept its data: the worker read what it may have missed from history.
    assert (await client.recv())["data"] == "thawed"
    assert worker.metric("broadcast_gaps_filled_total") == 1
    await client.close()


async def test_joining_a_held_channel_during_an_outage_is_refused(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    # "subscribed" must mean the worker hears the channel: while it cannot, a new
    # subscriber of a channel it already holds gets `unavailable`, not a silent promise.
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    channel = unique("held")
    holder = await subscribed_client(worker, channel)
    own_redis.kill()
    wait_for(lambda: worker.status("/readyz") == 503, what="not ready")
    late = await Client.connect(worker.ws + "/ws")
    await late.welcome()
    await late.send({"type": "subscribe", "channel": channel, "ref": "late"})
    error = await late.recv()
    assert (error["type"], error["code"], error["ref"]) == ("error", "unavailable", "late")
    own_redis.start()
    wait_for(lambda: worker.status("/readyz") == 200, what="ready again")
    assert (await late.subscribe(channel))["channel"] == channel
    for client in (holder, late):
        await client.close()


async def test_subscribers_queued_behind_a_failing_subscribe_fail_together(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    own_redis.kill()
    wait_for(lambda: worker.status("/readyz") == 503, what="not ready")
    channel = unique("storm")
    clients = [await Client.connect(worker.ws + "/ws") for _ in range(4)]
    for client in clients:
        await client.welcome()
    started = time.monotonic()
    for client in clients:
        await client.send({"type": "subscribe", "channel": channel})
    errors = await asyncio.gather(*(c.recv(timeout=10) for c in clients))
    elapsed = time.monotonic() - started
    assert [e["code"] for e in errors] == ["unavailable"] * 4
    # One timeout for all of them, not one after the other (that would be 4 s).
    assert elapsed < 2.5 * UNIT, elapsed
    for client in clients:
        await client.close()


async def test_a_deaf_subscription_is_detected_and_repaired(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # The subscription connection stays up and answers PINGs, but messages stop coming
    # (python-socketio issue #1581). The worker's canary notices, the worker turns not
    # ready, rebuilds its subscription and delivers from history what it did not hear.
    proxy = await RedisProxy(redis_server.port).start()
    # The proxy runs in this event loop: every blocking call to the worker (which may
    # need the proxy to answer) runs in a thread.
    try:
        worker = make_worker(
            "--broadcast-url",
            proxy.url,
            "--redis-prefix",
            prefix,
            "--canary-interval",
            "0.2",
            "--canary-timeout",
            "0.5",
            start=False,
        )
        worker.start(wait_ready=False)
        await asyncio.to_thread(worker.wait_ready)
        channel = unique("deaf")
        client = await subscribed_client(worker, channel)
        # The connections open now (its subscription among them) go deaf for good: only
        # a rebuilt subscription connection can make the worker hear again.
        proxy.deafen_open_connections()
        # Certainly missed over pub/sub: the worker hears nothing at this point.
        await asyncio.to_thread(worker.publish, channel, "while deaf")

        await asyncio.to_thread(
            wait_for,
            lambda: worker.metric("broadcast_redis_deaf_detections_total") >= 1,
            10,
            "the deafness to be detected",
        )
        # The rebuilt connection is verified at once, so the 503 is too short to poll for;
        # the worker says so in its log.
        assert "Redis subscription is deaf (own canary not heard back" in worker.log()
        await asyncio.to_thread(
            wait_for, lambda: worker.status("/readyz") == 200, 10, "ready after the rebuild"
        )
        for metric in ("broadcast_redis_deaf_detections_total", "broadcast_redis_reconnects_total"):
            assert await asyncio.to_thread(worker.metric, metric) == 1
        await asyncio.to_thread(worker.publish, channel, "heard again")
        assert (await client.recv())["data"] == "while deaf"
        assert (await client.recv())["data"] == "heard again"
        assert await asyncio.to_thread(worker.metric, "broadcast_gaps_filled_total") == 1
        await client.close()
    finally:
        await proxy.close()


async def test_the_canary_raises_no_false_alarm_across_a_reconnect(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # Frequent checks around a real reconnect. The races its guards close are too narrow
    # to hit on purpose here; tests/unit/test_canary.py drives each guard directly.
    worker = make_worker(
        *redis_args(redis_server, prefix, "--canary-interval", "0.05", "--canary-timeout", "1")
    )
    channel = unique("calm")
    client = await subscribed_client(worker, channel)
    checks = "broadcast_redis_canary_checks_total"
    wait_for(lambda: worker.metric(checks) >= 10, what="ten canary round trips")
    redis_server.kill_pubsub_of(worker.redis_name(prefix))
    wait_for(lambda: worker.metric("broadcast_redis_reconnects_total") >= 1, what="reconnect")
    before = worker.metric(checks)
    wait_for(lambda: worker.metric(checks) >= before + 10, what="ten more round trips")
    assert worker.metric("broadcast_redis_deaf_detections_total") == 0
    # Exactly one interruption (the kill), filled from history; then live messages.
    worker.publish(channel, "calm")
    assert (await client.recv())["data"] == "calm"
    assert worker.metric("broadcast_gaps_filled_total") == 1
    await client.close()
