"""The Redis backend in-process against a real redis-server.

Backends are built with both readers of the pub/sub connection (`fast`): the tap and
the public reader it falls back to (service/broker/replies.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.broker import pubsub_link
from service.broker.history import Position
from service.broker.redis_backend import RedisBackend
from service.protocol.frames import message_head
from tests.helpers import UNIT, RedisServer, async_wait_for, unique


def new_backend(server: RedisServer, prefix: str, *, fast: bool, **watchdog: float) -> RedisBackend:
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
        fast=fast,
        **timings,
    )


@pytest.fixture
async def backend(
    redis_server: RedisServer, prefix: str, fast: bool
) -> AsyncIterator[RedisBackend]:
    backend = new_backend(redis_server, prefix, fast=fast)
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
    [link] = backend._links.values()
    assert link._pending == {}


async def test_a_second_subscribe_to_a_live_channel_stays_confirmed(
    backend: RedisBackend,
) -> None:
    # broadcaster asks the backend again when two first subscribers race: the second
    # must not wait for a confirmation that never comes.
    channel = unique("twice")
    await backend.subscribe(channel)
    await backend.wait_subscribed(channel)
    await backend.subscribe(channel)
    async with asyncio.timeout(1 * UNIT):
        await backend.wait_subscribed(channel)
    assert backend.subscriptions_alive(), backend.problem()


class Recorded:
    """A `ChannelSink` that keeps what it is handed (service/broker/sink.py)."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.interruptions = 0

    def message(self, position: Position | None, frame: str) -> None:
        self.frames.append(frame)

    def interrupted(self) -> None:
        self.interruptions += 1


async def test_messages_read_in_bursts_and_in_pieces_arrive_whole_and_in_order(
    backend: RedisBackend, redis_server: RedisServer, prefix: str
) -> None:
    # The reader parses whatever one read returns: many messages at once (a pipeline of
    # PUBLISHes), or part of one (a message larger than a read).
    channel = await _subscribed(backend, unique("burst"))
    other = await _subscribed(backend, unique("other"))
    received, elsewhere = Recorded(), Recorded()
    backend.attach(channel, received)
    backend.attach(other, elsewhere)
    big = "x" * 300_000
    sent = [f"m{n}" for n in range(2000)] + [big, "after"]
    _publish_pipelined(redis_server, prefix + channel, sent)
    await async_wait_for(lambda: len(received.frames) >= len(sent), 10, what="every message")
    assert received.frames == sent
    assert elsewhere.frames == []  # each message to its own channel's sink only
    assert received.interruptions == elsewhere.interruptions == 0


async def test_each_message_reaches_its_sink_with_its_position(
    backend: RedisBackend, redis_server: RedisServer, prefix: str
) -> None:
    # The reader hands each message over with its position in history (the id the
    # publish script spliced in), or None for what history does not keep (join, leave):
    # nobody downstream parses frames for it. A sink attached before SUBSCRIBE gets the
    # first message; a stale detach (a subscription being closed while its successor
    # opens) leaves the successor's sink in place.
    channel = unique("position")
    sink, stale = Positions(), Positions()
    backend.attach(channel, stale)
    backend.attach(channel, sink)
    backend.detach(channel, stale)  # not the one attached: nothing happens
    await _subscribed(backend, channel)
    head = message_head(channel)
    sent = [f'{head}e1:{n}","data":{n}}}' for n in range(1, 4)]
    sent.insert(1, f'{{"type":"join","channel":"{channel}","info":{{}}}}')
    _publish_pipelined(redis_server, prefix + channel, sent)
    await async_wait_for(lambda: len(sink.got) == len(sent), 10, what="every message")
    assert sink.got == [
        (Position("e1", 1), sent[0]),
        (None, sent[1]),
        (Position("e1", 2), sent[2]),
        (Position("e1", 3), sent[3]),
    ]
    assert stale.got == []
    backend.detach(channel, sink)
    redis_server.client().publish(prefix + channel, sent[0])
    redis_server.client().publish(prefix + channel, "after")  # read after the one above
    other = await _subscribed(backend, unique("position"))
    late = Positions()
    backend.attach(other, late)
    redis_server.client().publish(prefix + other, "marker")
    await async_wait_for(lambda: late.got == [(None, "marker")], what="the marker")
    assert len(sink.got) == len(sent)  # detached: nothing more


class Positions:
    """A `ChannelSink` that keeps each message with its position."""

    def __init__(self) -> None:
        self.got: list[tuple[Position | None, str]] = []

    def message(self, position: Position | None, frame: str) -> None:
        self.got.append((position, frame))

    def interrupted(self) -> None:
        raise AssertionError("no interruption here")


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
    redis_server: RedisServer, prefix: str, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    # With four idle workers on two cores, the PING's answer sometimes came in while the
    # watchdog was still sending it; the watchdog then slept until the end of the whole
    # timeout counted from that answer, woke to "no reply for 4.0 s" and rebuilt a
    # healthy connection (five times in 30 s). Here every send lets the answer in.
    backend = new_backend(redis_server, prefix, fast=fast, ping_interval=0.2, ping_timeout=0.5)
    make = pubsub_link.own_connection

    def answered_while_sending(*args: Any, **kwargs: Any) -> Any:
        conn = make(*args, **kwargs)
        send = conn.send_command

        async def send_command(*command: Any, **options: Any) -> None:
            await send(*command, **options)
            await asyncio.sleep(0.05)  # the answer arrives before the sender goes on

        conn.send_command = send_command  # type: ignore[method-assign]
        return conn

    monkeypatch.setattr(pubsub_link, "own_connection", answered_while_sending)
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


async def test_the_backend_reads_with_the_reader_it_was_asked_for_and_leaves_none(
    redis_server: RedisServer, prefix: str, fast: bool
) -> None:
    # fast=False: the public reader, a task of its own (service/broker/replies.py); the
    # tap runs inside the reads. Either way nothing of it outlives the backend.
    backend = new_backend(redis_server, prefix, fast=fast)
    await backend.connect()
    try:
        await backend.subscribe(unique("which"))
        await async_wait_for(lambda: alive(backend), what="connected and confirmed")
        pipe = backend.script_pipe("return 1")
        assert await pipe(keys=[], args=[]) == 1
        readers = [t for t in asyncio.all_tasks() if t.get_name() == "redis-replies"]
        assert len(readers) == (0 if fast else 2)  # the pub/sub and the publish connections
    finally:
        await backend.disconnect()
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("redis-")] == []
