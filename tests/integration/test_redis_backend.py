"""The Redis backend in-process against a real redis-server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from broadcaster import Event

from service.broker.redis_backend import RedisBackend
from tests.helpers import UNIT, RedisServer, async_wait_for, unique


def new_backend(server: RedisServer, prefix: str, **watchdog: float) -> RedisBackend:
    """A backend on `server`, with the pub/sub watchdog's timings overridable."""
    timings = {"ping_interval": 1.0, "ping_timeout": 3.0, **watchdog}
    return RedisBackend(
        server.url,
        prefix=prefix,
        client_name=prefix + "test",
        timeout=5,
        max_connections=10,
        retry_max_delay=1,
        canary_interval=60,
        canary_timeout=3,
        **timings,
    )


@pytest.fixture
async def backend(redis_server: RedisServer, prefix: str) -> AsyncIterator[RedisBackend]:
    backend = new_backend(redis_server, prefix)
    await backend.connect()
    yield backend
    await backend.disconnect()


async def alive(backend: RedisBackend) -> bool:
    return backend.subscriptions_alive()


async def test_a_new_subscription_does_not_make_the_worker_unready(
    backend: RedisBackend,
) -> None:
    # Readiness is about the worker being deaf after a reconnect, not about one client
    # waiting for its own SUBSCRIBE: a busy worker must not flap to 503.
    await backend.subscribe(unique("a"))
    await async_wait_for(lambda: alive(backend), what="connected and confirmed")
    channel = unique("b")
    await backend.subscribe(channel)
    assert backend.subscriptions_alive()
    await backend.wait_subscribed(channel)


async def test_resubscribe_after_reconnect_confirms_each_channel_once(
    backend: RedisBackend, redis_server: RedisServer, prefix: str
) -> None:
    channels = [unique("c") for _ in range(3)]
    for channel in channels:
        await backend.subscribe(channel)
    for channel in channels:
        await backend.wait_subscribed(channel)
    redis_server.kill_pubsub_of(prefix + "test")
    await async_wait_for(lambda: _reconnected(backend), what="a reconnect")
    await async_wait_for(lambda: alive(backend), what="every channel re-confirmed")
    assert redis_server.client().pubsub_numsub(*(prefix + c for c in channels)) == [
        ((prefix + c).encode(), 1) for c in channels
    ]


async def _reconnected(backend: RedisBackend) -> bool:
    return backend.reconnects >= 1


async def test_an_old_ack_does_not_confirm_a_newer_subscribe(backend: RedisBackend) -> None:
    # subscribe, unsubscribe, subscribe in a row: the first ack must not count for the
    # second SUBSCRIBE (the subscriber would think itself live while Redis is not).
    channel = unique("again")
    await backend.subscribe(channel)
    await backend.wait_subscribed(channel)
    await backend.unsubscribe(channel)
    await backend.subscribe(channel)
    await backend.unsubscribe(channel)
    await backend.subscribe(channel)
    await backend.wait_subscribed(channel)
    assert backend._pending == {}


async def test_messages_read_in_bursts_and_in_pieces_arrive_whole_and_in_order(
    backend: RedisBackend, redis_server: RedisServer, prefix: str
) -> None:
    # The reader parses whatever one read returns: many messages at once (a pipeline of
    # PUBLISHes), or part of one (a message larger than a read).
    channel = await _subscribed(backend, unique("burst"))
    big = "x" * 300_000
    sent = [f"m{n}" for n in range(2000)] + [big, "after"]
    _publish_pipelined(redis_server, prefix + channel, sent)
    async with asyncio.timeout(10 * UNIT):
        received = [(await backend.next_published()) for _ in sent]
    assert [event.channel for event in received] == [channel] * len(sent)
    assert [event.message for event in received] == sent


async def test_dispatched_messages_never_overtake_those_left_for_the_listener(
    backend: RedisBackend, redis_server: RedisServer, prefix: str
) -> None:
    # The broker's dispatch hands messages to the subscribers from inside the read. One
    # it refuses (nobody subscribed yet) waits for broadcaster's listener, and so does
    # every message after it until the listener has taken it: the order holds.
    channel = await _subscribed(backend, unique("dispatch"))
    offered: list[str] = []
    dispatched: list[str] = []

    def dispatch(event: Event) -> bool:
        offered.append(event.message)
        if len(offered) == 1:
            return False
        dispatched.append(event.message)
        return True

    backend.dispatch = dispatch
    sent = [f"m{n}" for n in range(10)]
    _publish_pipelined(redis_server, prefix + channel, sent)
    async with asyncio.timeout(10 * UNIT):
        received = [(await backend.next_published()).message for _ in sent]
    assert received == sent
    assert offered == ["m0"]
    assert dispatched == []
    # With nothing left waiting, the next message is dispatched at once.
    redis_server.client().publish(prefix + channel, "later")

    async def dispatched_later() -> bool:
        return dispatched == ["later"]

    await async_wait_for(dispatched_later, what="the dispatch")


async def _subscribed(backend: RedisBackend, channel: str) -> str:
    """`channel`, once the backend's subscription to it is confirmed."""
    await backend.subscribe(channel)
    await backend.wait_subscribed(channel)
    return channel


def _publish_pipelined(redis_server: RedisServer, key: str, texts: list[str]) -> None:
    """PUBLISH every text to `key` in one pipeline: they reach the reader in bursts."""
    with redis_server.client().pipeline(transaction=False) as pipe:
        for text in texts:
            pipe.publish(key, text)
        pipe.execute()


async def test_a_ping_answered_while_it_is_being_sent_is_not_taken_for_silence(
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With four idle workers on two cores, the PING's answer sometimes came in while the
    # watchdog was still sending it; the watchdog then slept until the end of the whole
    # timeout counted from that answer, woke to "no reply for 4.0 s" and rebuilt a
    # healthy connection (five times in 30 s). Here every send lets the answer in.
    backend = new_backend(redis_server, prefix, ping_interval=0.2, ping_timeout=0.5)
    make = backend._new_connection

    def answered_while_sending(*args: Any, **kwargs: Any) -> Any:
        conn = make(*args, **kwargs)
        send = conn.send_command

        async def send_command(*command: Any, **options: Any) -> None:
            await send(*command, **options)
            await asyncio.sleep(0.05)  # the answer arrives before the sender goes on

        conn.send_command = send_command  # type: ignore[method-assign]
        return conn

    monkeypatch.setattr(backend, "_new_connection", answered_while_sending)
    await backend.connect()
    try:
        await backend.subscribe(unique("quiet"))
        await async_wait_for(lambda: alive(backend), what="connected and confirmed")
        reconnects = backend.reconnects
        # Twelve ping intervals, each answered at once: the connection must stay.
        watching = asyncio.ensure_future(asyncio.sleep(2.4 * UNIT))
        while not watching.done():
            assert backend.reconnects == reconnects, backend.last_error
            await asyncio.sleep(0.05)
        assert backend.reconnects == reconnects, backend.last_error
    finally:
        await backend.disconnect()
