"""The publish connection (service/broker/redis_pipe.py) against a real redis-server.

Every test runs with both readers of the connection (service/broker/replies.py): the
fast tap, and the public reader the pipe falls back to.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.broker import Broker
from service.broker.redis_pipe import PipeClosed, ScriptPipe
from service.settings import Settings
from tests.helpers import UNIT, RedisProxy, RedisServer, async_wait_for, unique

# Returns its argument after incrementing a counter: the order and the number of runs
# show whether each caller got its own reply, and how often Redis ran the script.
_COUNT = "return {redis.call('INCR', KEYS[1]), ARGV[1]}"


@asynccontextmanager
async def counting_pipe(
    port: int, *, fast: bool, timeout: float = 5.0, retries: int = 2
) -> AsyncIterator[ScriptPipe]:
    """A pipe running `_COUNT` against the Redis (or proxy) on `port`, closed on exit."""
    pipe = ScriptPipe(
        _COUNT,
        lambda: Connection(
            port=port,
            protocol=2,
            client_name="pipe-test",
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        ),
        timeout=timeout,
        retry=Retry(NoBackoff(), retries, supported_errors=(RedisConnectionError,)),
        fast=fast,
    )
    try:
        yield pipe
    finally:
        await pipe.close()


async def counted(redis_server: RedisServer, key: str, count: int, what: str) -> None:
    """Until `_COUNT` has run `count` times on `key` (its replies may be held back)."""

    async def reached() -> bool:
        return await asyncio.to_thread(redis_server.client().get, key) == str(count).encode()

    await async_wait_for(reached, what=what)


async def test_concurrent_calls_share_one_connection_and_each_gets_its_own_reply(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("count")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        replies = await asyncio.gather(*(pipe(keys=[key], args=[n]) for n in range(500)))
        assert [arg for _, arg in replies] == [str(n).encode() for n in range(500)]
        assert sorted(count for count, _ in replies) == list(range(1, 501))
        assert len(redis_server.clients_named("pipe-test")) == 1


async def test_a_script_redis_does_not_have_is_sent_whole_and_cached_again(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("flushed")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        sha = hashlib.sha1(_COUNT.encode()).hexdigest()
        assert await pipe(keys=[key], args=["a"]) == [1, b"a"]
        assert redis_server.client().script_exists(sha) == [True]
        redis_server.client().script_flush()
        assert redis_server.client().script_exists(sha) == [False]
        assert await pipe(keys=[key], args=["b"]) == [2, b"b"]
        assert redis_server.client().script_exists(sha) == [True]


async def test_an_error_reply_fails_only_its_own_call(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("wrongtype")
    redis_server.client().set(key, "not a counter")
    good = unique("good")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        results = await asyncio.gather(
            pipe(keys=[good], args=["before"]),
            pipe(keys=[key], args=["bad"]),
            pipe(keys=[good], args=["after"]),
            return_exceptions=True,
        )
        assert results[0] == [1, b"before"]
        assert isinstance(results[1], ResponseError)
        assert "not an integer" in str(results[1])
        assert results[2] == [2, b"after"]


async def test_a_cancelled_call_leaves_its_reply_to_nobody(
    redis_server: RedisServer, fast: bool
) -> None:
    # Its reply still arrives, in its turn: it must not be handed to the next caller.
    key = unique("cancelled")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        await pipe(keys=[key], args=["connect"])
        cancelled = asyncio.create_task(pipe(keys=[key], args=["cancelled"]))
        await asyncio.sleep(0)  # written, not yet answered
        cancelled.cancel()
        assert await pipe(keys=[key], args=["next"]) == [3, b"next"]
        with pytest.raises(asyncio.CancelledError):
            await cancelled


async def test_a_frozen_redis_times_out_and_the_next_call_reconnects(
    own_redis: RedisServer, fast: bool
) -> None:
    key = unique("frozen")
    assert own_redis.process is not None
    async with counting_pipe(own_redis.port, timeout=0.5 * UNIT, fast=fast) as pipe:
        await pipe(keys=[key], args=["warm"])
        [before] = own_redis.clients_named("pipe-test")
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(RedisTimeoutError, match="no reply from Redis within"):
                await pipe(keys=[key], args=["frozen"])
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
        # The connection that did not answer in time is not used again.
        reply = await pipe(keys=[key], args=["thawed"])
        assert reply[1] == b"thawed"
        assert [c["id"] for c in own_redis.clients_named("pipe-test")] != [before["id"]]


async def test_callers_waiting_for_a_frozen_redis_give_up_together(
    own_redis: RedisServer, fast: bool
) -> None:
    # They share one connection attempt: twelve callers fail after one timeout, not
    # one after another (twelve timeouts).
    timeout = 0.5 * UNIT
    assert own_redis.process is not None
    async with counting_pipe(own_redis.port, timeout=timeout, fast=fast) as pipe:
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            results = await asyncio.gather(
                *(pipe(keys=[unique("k")], args=[n]) for n in range(12)), return_exceptions=True
            )
            took = time.monotonic() - started
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
    assert all(isinstance(r, RedisTimeoutError) for r in results), results
    assert took < 3 * timeout, took


async def test_a_closed_pipe_fails_its_calls_and_never_reconnects(
    own_redis: RedisServer, fast: bool
) -> None:
    key = unique("closed")
    assert own_redis.process is not None
    async with counting_pipe(own_redis.port, fast=fast) as pipe:
        await pipe(keys=[key], args=["connect"])
        os.kill(own_redis.process.pid, signal.SIGSTOP)
        try:
            in_flight = asyncio.create_task(pipe(keys=[key], args=["in flight"]))
            await asyncio.sleep(0)  # written, not answered
            await pipe.close()
            with pytest.raises(PipeClosed):
                await in_flight
            with pytest.raises(PipeClosed):
                await pipe(keys=[key], args=["after close"])
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)

    async def gone() -> bool:
        return not await asyncio.to_thread(own_redis.clients_named, "pipe-test")

    await async_wait_for(gone, what="the pipe's connection closed")


async def test_calls_in_flight_when_the_connection_breaks_are_retried(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("dropped")
    proxy = await RedisProxy(redis_server.port).start()
    try:
        async with counting_pipe(proxy.port, fast=fast) as pipe:
            await pipe(keys=[key], args=["connect"])
            proxy.arm(b"lost-reply")
            calls = [
                asyncio.create_task(pipe(keys=[key], args=["lost-reply"])),
                asyncio.create_task(pipe(keys=[key], args=["behind it"])),
            ]

            # Redis ran both; their replies are swallowed until the connection is cut.
            await counted(redis_server, key, 3, what="Redis ran both")
            proxy.cut()
            # Each is run again on a new connection (this script, unlike the publish
            # script, is not idempotent: the count shows the second run).
            replies = await asyncio.gather(*calls)
            assert [arg for _, arg in replies] == [b"lost-reply", b"behind it"]
            assert sorted(count for count, _ in replies) == [4, 5]
    finally:
        await proxy.close()


async def test_the_worker_publishes_through_its_own_named_connection(
    redis_server: RedisServer, prefix: str, fast: bool
) -> None:
    settings = Settings.model_validate(
        {
            "broadcast_url": f"redis://127.0.0.1:{redis_server.port}",
            "redis_prefix": prefix,
            "fast_adapters": fast,
        }
    )
    async with Broker(settings, "w9") as broker:
        first = await broker.publish("news", b"0")  # connects, and loads the script
        assert first.endswith(":1")
        # Written in the order they were made, answered in that order.
        ids = await asyncio.gather(*(broker.publish("news", b"%d" % n) for n in range(50)))
        assert [int(i.split(":")[1]) for i in ids] == list(range(2, 52))
        assert len(redis_server.publish_clients(prefix + "w9")) == 1
        # Each publish's token outlives every retry of it (two BROKER_TIMEOUTs and more).
        tokens = redis_server.client().keys(f"{prefix}pub:*")
        assert len(tokens) == 51
        assert all(redis_server.client().ttl(t) > 2 * settings.broker_timeout for t in tokens)

    async def closed() -> bool:
        return not await asyncio.to_thread(redis_server.publish_clients, prefix + "w9")

    await async_wait_for(closed, what="the publish connection closed on exit")


def the_read(fast: bool) -> str | None:
    """Where a reply is handed over from its read: no task with the tap (inside the
    event loop's read), the public reader's task otherwise (service/broker/replies.py)."""
    return None if fast else "redis-replies"


class Replies:
    """What `ScriptPipe.start` handed to its callback, and from where (a task's name)."""

    def __init__(self) -> None:
        self.replies: list[Any] = []
        self.handed_from: list[str | None] = []

    def __call__(self, reply: Any) -> None:
        self.replies.append(reply)
        task = asyncio.current_task()
        self.handed_from.append(None if task is None else task.get_name())

    async def wait(self, count: int) -> list[Any]:
        async def arrived() -> bool:
            return len(self.replies) >= count

        await async_wait_for(arrived, what=f"{count} replies")
        return self.replies


async def test_start_hands_each_reply_to_its_callback_from_inside_the_read(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("started")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        await pipe(keys=[key], args=["connect"])
        replies = Replies()
        for n in range(100):
            pipe.start([key], [n], replies)
        assert replies.replies == []  # never from inside `start`
        got = await replies.wait(100)
        assert got == [[n + 2, str(n).encode()] for n in range(100)]
        # No task step between the read and the reply.
        assert replies.handed_from == [the_read(fast)] * 100
        assert len(redis_server.clients_named("pipe-test")) == 1


async def test_start_without_a_connection_makes_one_and_replies_from_its_read(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("unconnected")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        replies = Replies()
        pipe.start([key], ["first"], replies)
        pipe.start([key], ["second"], replies)
        assert replies.replies == []
        assert await replies.wait(2) == [[1, b"first"], [2, b"second"]]
        # Connected in a task, yet each reply was handed over from inside its read.
        assert replies.handed_from == [the_read(fast)] * 2
        assert len(redis_server.clients_named("pipe-test")) == 1


async def test_start_sends_the_script_whole_when_redis_lost_it(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("started-flushed")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        await pipe(keys=[key], args=["a"])
        redis_server.client().script_flush()
        replies = Replies()
        pipe.start([key], ["b"], replies)
        assert await replies.wait(1) == [[2, b"b"]]
        sha = hashlib.sha1(_COUNT.encode()).hexdigest()
        assert redis_server.client().script_exists(sha) == [True]
        assert replies.handed_from == [the_read(fast)]  # the EVAL's reply too


async def test_start_hands_an_error_reply_over_without_running_the_call_again(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("started-wrongtype")
    redis_server.client().set(key, "not a counter")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        await pipe(keys=[unique("warm")], args=["connect"])
        replies = Replies()
        pipe.start([key], ["bad"], replies)
        [reply] = await replies.wait(1)
        assert isinstance(reply, ResponseError)
        assert "not an integer" in str(reply)


async def test_start_retries_calls_in_flight_when_the_connection_breaks(
    redis_server: RedisServer, fast: bool
) -> None:
    key = unique("started-dropped")
    proxy = await RedisProxy(redis_server.port).start()
    try:
        async with counting_pipe(proxy.port, fast=fast) as pipe:
            await pipe(keys=[key], args=["connect"])
            proxy.arm(b"lost-reply")
            replies = Replies()
            pipe.start([key], ["lost-reply"], replies)
            pipe.start([key], ["behind it"], replies)

            await counted(redis_server, key, 3, what="Redis ran both")
            proxy.cut()
            got = await replies.wait(2)
            assert [arg for _, arg in got] == [b"lost-reply", b"behind it"]
            assert sorted(count for count, _ in got) == [4, 5]  # run again, each once
            # Retried, still from the read.
            assert replies.handed_from == [the_read(fast)] * 2
    finally:
        await proxy.close()


async def test_start_counts_its_own_write_as_the_first_attempt(
    redis_server: RedisServer, fast: bool
) -> None:
    # With no retries allowed, a call whose connection breaks fails: the write `start`
    # made was its one attempt.
    key = unique("started-no-retry")
    proxy = await RedisProxy(redis_server.port).start()
    try:
        async with counting_pipe(proxy.port, retries=0, fast=fast) as pipe:
            await pipe(keys=[key], args=["connect"])
            proxy.arm(b"lost-reply")
            replies = Replies()
            pipe.start([key], ["lost-reply"], replies)

            await counted(redis_server, key, 2, what="Redis ran it")
            proxy.cut()
            [reply] = await replies.wait(1)
            assert isinstance(reply, RedisConnectionError)
            assert redis_server.client().get(key) == b"2"  # not run again
    finally:
        await proxy.close()


async def test_a_callback_that_raises_is_logged_and_the_connection_carries_on(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture, fast: bool
) -> None:
    key = unique("started-raises")

    def broken(reply: Any) -> None:
        raise RuntimeError("a bug in the caller")

    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        await pipe(keys=[key], args=["connect"])
        [before] = redis_server.clients_named("pipe-test")
        with caplog.at_level(logging.ERROR, logger="service.broker.redis_pipe"):
            pipe.start([key], ["raises"], broken)
            assert await pipe(keys=[key], args=["next"]) == [3, b"next"]
        assert "a callback for a Redis reply failed" in caplog.text
        assert [c["id"] for c in redis_server.clients_named("pipe-test")] == [before["id"]]


async def test_start_on_a_closed_pipe_reports_it_closed(
    redis_server: RedisServer, fast: bool
) -> None:
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        await pipe(keys=[unique("k")], args=["connect"])
    replies = Replies()
    pipe.start([unique("k")], ["after close"], replies)
    [reply] = await replies.wait(1)
    assert isinstance(reply, PipeClosed)


async def test_a_primary_demoted_to_replica_is_left_for_the_new_one(
    redis_server: RedisServer, own_redis: RedisServer, fast: bool
) -> None:
    # `own_redis` stands for a primary that a failover kept alive and turned into a
    # replica of the new one (`redis_server`): it answers the script with READONLY.
    own_redis.client().replicaof("127.0.0.1", redis_server.port)
    ports = iter([own_redis.port, redis_server.port])
    pipe = ScriptPipe(
        _COUNT,
        lambda: Connection(port=next(ports), protocol=2, socket_timeout=5),
        timeout=5,
        retry=Retry(NoBackoff(), 2, supported_errors=(RedisConnectionError,)),
        fast=fast,
    )
    key = unique("count")
    try:
        count, arg = await pipe(keys=[key], args=["x"])
    finally:
        await pipe.close()
    # Run once, on the new primary, by the retry on a new connection.
    assert (count, arg) == (1, b"x")
    assert redis_server.client().get(key) == b"1"
