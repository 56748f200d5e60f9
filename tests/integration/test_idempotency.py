"""Publishes whose outcome is unknown say so, and idempotency keys make their retries safe.

Against a real redis-server of the test's own (frozen with SIGSTOP, killed, restarted),
real worker processes and real WebSocket clients:

* A publish Redis took but did not answer (frozen) is `outcome_unknown` (HTTP 504), not
  `unavailable`: Redis runs it once thawed. Retried with the same idempotency key, it
  is answered with that first id and delivered once.
* A publish that never reached Redis (killed; or frozen before the publish connection
  was made) is `unavailable` (HTTP 503), and indeed nothing is published later.
* Without faults: a key used again on a channel publishes nothing and gets the first
  id, on HTTP and WebSocket alike, on Redis and memory://; other channels are
  independent; keys expire; bad keys are refused with a clear error.
* The publish connection itself (`ScriptPipe`): which failures are `Unanswered`, with
  both readers of its connection (the tap and the public fallback, `fast`).
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import pytest
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.broker.redis_pipe import ScriptPipe, Unanswered
from service.client import Client as PythonClient
from tests.conftest import WorkerFactory
from tests.e2e.test_client_js_browser import browser_page, start_client, wait_count
from tests.helpers import (
    UNIT,
    Client,
    RedisProxy,
    RedisServer,
    Worker,
    async_wait_for,
    redis_args,
    subscribed_client,
    unique,
    wait_for,
)

KEY_HEADER = "Idempotency-Key"


@contextmanager
def frozen(server: RedisServer) -> Iterator[None]:
    """Redis stopped (SIGSTOP) inside the block, running again after it, whatever happens."""
    assert server.process is not None
    os.kill(server.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.process.pid, signal.SIGCONT)


async def post(
    worker: Worker, channel: str, data: Any, key: str | bytes | None = None
) -> httpx.Response:
    """POST a message over the HTTP API (with an Idempotency-Key header if `key`)."""
    headers = {} if key is None else {KEY_HEADER: key}
    async with httpx.AsyncClient(timeout=30 * UNIT) as http:
        return await http.post(
            f"{worker.http}/api/channels/{channel}/messages", json={"data": data}, headers=headers
        )


def key_in_redis(server: RedisServer, prefix: str, channel: str, key: str) -> str:
    """The id Redis keeps under a publish's idempotency key ('' if none)."""
    stored = server.client().get(f"{prefix}idem:{{{channel}}}:{key}")
    return "" if stored is None else stored.decode()


async def messages_until_marker(worker: Worker, client: Client, channel: str) -> list[Any]:
    """Every `message` frame `client` (subscribed to `channel` only) gets before a marker.

    Channel order is the same for everyone, so anything published (twice, say) before
    the marker arrives before it.
    """
    marker = unique("marker")
    await worker.publish_async(channel, marker)
    got: list[dict[str, Any]] = []
    while True:
        frame = await client.recv(timeout=10)
        if frame["type"] != "message":
            continue  # a `gap` after a Redis restart, say: not what is counted here
        if frame["data"] == marker:
            return got
        got.append(frame)


def wait_ready(worker: Worker) -> None:
    wait_for(lambda: worker.status("/readyz") == 200, what="ready")


# -- (a), (b): Redis took the publish and did not answer --------------------------------


async def test_an_http_publish_redis_froze_on_is_outcome_unknown_and_its_keyed_retry_is_the_first(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    channel = unique("frozen-http")
    subscriber = await subscribed_client(worker, channel)
    await worker.publish_async(channel, "warm-up")  # the publish connection is up
    assert (await subscriber.recv())["data"] == "warm-up"
    key = unique("key-")

    with frozen(own_redis):
        answer = await post(worker, channel, "once", key)
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"] == "outcome_unknown"
    assert "same idempotency key" in answer.json()["message"]
    assert answer.headers["retry-after"]

    # The script was in Redis's socket: thawed, Redis ran it (the defect: it was
    # answered 503 "nothing was published", and a retry published it a second time).
    first = wait_for(lambda: key_in_redis(own_redis, prefix, channel, key), what="the run")
    wait_ready(worker)
    retry = await post(worker, channel, "once", key)
    assert retry.status_code == 200, retry.text
    assert retry.json() == {"channel": channel, "id": first}
    assert retry.headers["idempotent-replayed"] == "true"
    [message] = await messages_until_marker(worker, subscriber, channel)
    assert (message["id"], message["data"]) == (first, "once")
    await subscriber.close()


async def test_a_websocket_publish_redis_froze_on_is_outcome_unknown_and_its_keyed_retry_too(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    channel = unique("frozen-ws")
    subscriber = await subscribed_client(worker, channel)
    publisher = await subscribed_client(worker)
    await publisher.publish(channel, "warm-up")
    assert (await subscriber.recv())["data"] == "warm-up"
    key = unique("key-")
    command = {"type": "publish", "channel": channel, "data": "once", "idempotency_key": key}

    with frozen(own_redis):
        await publisher.send({**command, "ref": "first"})
        error = await publisher.recv(timeout=10)
    assert (error["type"], error["code"], error["ref"]) == ("error", "outcome_unknown", "first")
    assert "same idempotency key" in error["message"]

    first = wait_for(lambda: key_in_redis(own_redis, prefix, channel, key), what="the run")
    wait_ready(worker)
    await publisher.send({**command, "ref": "retry"})
    assert await publisher.recv() == {
        "type": "published",
        "channel": channel,
        "id": first,
        "ref": "retry",
    }
    [message] = await messages_until_marker(worker, subscriber, channel)
    assert (message["id"], message["data"]) == (first, "once")
    for client in (subscriber, publisher):
        await client.close()


# -- (c): the publish never reached Redis -------------------------------------------------


async def test_a_publish_while_redis_is_down_is_unavailable_and_never_published(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    channel = unique("down")
    subscriber = await subscribed_client(worker, channel)
    publisher = await subscribed_client(worker)
    await publisher.publish(channel, "warm-up")  # the publish connection was up
    assert (await subscriber.recv())["data"] == "warm-up"

    own_redis.kill()
    wait_for(lambda: worker.status("/readyz") == 503, what="not ready while Redis is down")
    refused = await post(worker, channel, "lost?", "http-key")
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "unavailable"
    assert refused.headers["retry-after"]
    await publisher.send(
        {"type": "publish", "channel": channel, "data": "lost?", "idempotency_key": "ws-key"}
    )
    error = await publisher.recv(timeout=10)
    assert (error["type"], error["code"]) == ("error", "unavailable")

    own_redis.start()  # same port, empty
    wait_ready(worker)
    # Nothing of those publishes reached Redis, now or later: no key, no message, and
    # the same keys publish afresh.
    assert own_redis.client().keys(f"{prefix}idem:*") == []
    again = await post(worker, channel, "published", "http-key")
    assert again.status_code == 200, again.text
    assert "idempotent-replayed" not in again.headers
    delivered = await messages_until_marker(worker, subscriber, channel)
    assert [(m["id"], m["data"]) for m in delivered] == [(again.json()["id"], "published")]
    for client in (subscriber, publisher):
        await client.close()


async def test_a_publish_redis_froze_on_before_it_was_sent_is_unavailable(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    # No publish yet, so no publish connection: making one fails while Redis is frozen,
    # and the script was never sent. That is certain, frozen or not.
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    channel = unique("unsent")
    subscriber = await subscribed_client(worker, channel)
    with frozen(own_redis):
        refused = await post(worker, channel, "lost?", unique("key-"))
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "unavailable"
    wait_ready(worker)
    assert await messages_until_marker(worker, subscriber, channel) == []
    await subscriber.close()


# -- (d): keys without faults, on both backends -------------------------------------------


@pytest.fixture(scope="module")
def memory_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A memory:// worker shared by this module's tests (each uses channels of its own)."""
    worker = Worker(tmp_path_factory.mktemp("memory-worker"), [])
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(params=["redis", "memory"])
def any_worker(request: pytest.FixtureRequest) -> Worker:
    """The module's Redis worker (tests/integration/conftest.py), then the memory:// one."""
    worker: Worker = request.getfixturevalue(
        "worker" if request.param == "redis" else "memory_worker"
    )
    return worker


async def test_a_key_used_again_publishes_nothing_and_gets_the_first_id(any_worker: Worker) -> None:
    worker = any_worker
    channel = unique("dup")
    subscriber = await subscribed_client(worker, channel)
    publisher = await subscribed_client(worker)
    key = unique("key-")

    first = await post(worker, channel, "first", key)
    assert first.status_code == 200, first.text
    assert "idempotent-replayed" not in first.headers
    message_id = first.json()["id"]
    # Whatever the data: the key names the publish.
    second = await post(worker, channel, "second", key)
    assert (second.status_code, second.json()) == (200, {"channel": channel, "id": message_id})
    assert second.headers["idempotent-replayed"] == "true"
    # One key space per channel, whichever way the publish comes.
    await publisher.send(
        {"type": "publish", "channel": channel, "data": "third", "idempotency_key": key, "ref": 1}
    )
    assert (await publisher.recv())["id"] == message_id

    delivered = await messages_until_marker(worker, subscriber, channel)
    assert [(m["id"], m["data"]) for m in delivered] == [(message_id, "first")]
    for client in (subscriber, publisher):
        await client.close()


async def test_the_same_key_on_another_channel_is_another_publish(any_worker: Worker) -> None:
    worker = any_worker
    channels = [unique("a"), unique("b")]
    subscribers = [await subscribed_client(worker, channel) for channel in channels]
    publisher = await subscribed_client(worker)
    key = unique("key-")
    ids = []
    for n, channel in enumerate(channels):
        await publisher.send(
            {"type": "publish", "channel": channel, "data": n, "idempotency_key": key, "ref": n}
        )
        reply = await publisher.recv_type("published")
        ids.append(reply["id"])
    assert ids[0] != ids[1]
    for n, channel in enumerate(channels):
        delivered = await messages_until_marker(worker, subscribers[n], channel)
        assert [(m["id"], m["data"]) for m in delivered] == [(ids[n], n)]
    for client in (*subscribers, publisher):
        await client.close()


async def test_a_key_is_forgotten_after_idempotency_ttl_in_memory(
    make_worker: WorkerFactory,
) -> None:
    worker = make_worker("--idempotency-ttl", "1")
    channel = unique("expiry")
    subscriber = await subscribed_client(worker, channel)
    key = unique("key-")
    first = (await post(worker, channel, "first", key)).json()["id"]
    assert (await post(worker, channel, "again", key)).json()["id"] == first

    async def published_anew() -> str | None:
        # Each try before the key expired publishes nothing: it is answered `first`.
        answer = (await post(worker, channel, "after", key)).json()["id"]
        return None if answer == first else str(answer)

    second = await async_wait_for(published_anew, timeout=10, what="the key to expire")
    delivered = await messages_until_marker(worker, subscriber, channel)
    assert [(m["id"], m["data"]) for m in delivered] == [(first, "first"), (second, "after")]
    await subscriber.close()


async def test_redis_keeps_a_key_for_idempotency_ttl_and_forgets_it_after(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(redis_server, prefix, "--idempotency-ttl", "30"))
    channel = unique("expiry")
    subscriber = await subscribed_client(worker, channel)
    key = unique("key-")
    first = (await post(worker, channel, "first", key)).json()["id"]
    stored = f"{prefix}idem:{{{channel}}}:{key}"
    assert redis_server.client().get(stored) == first.encode()
    assert 25 < redis_server.client().ttl(stored) <= 30
    # Thirty seconds on: Redis expires the key as it does at the end of its TTL.
    redis_server.client().pexpire(stored, 1)
    wait_for(lambda: not redis_server.client().exists(stored), what="the key to expire")
    second = (await post(worker, channel, "after", key)).json()["id"]
    assert second != first
    delivered = await messages_until_marker(worker, subscriber, channel)
    assert [(m["id"], m["data"]) for m in delivered] == [(first, "first"), (second, "after")]
    await subscriber.close()


@pytest.mark.parametrize(
    "key",
    ["", "two words", "x" * 65, "caf\xe9".encode("latin-1"), "tab\there"],
    ids=["empty", "space", "too-long", "not-ascii", "tab"],
)
async def test_a_bad_idempotency_key_header_is_refused_and_nothing_published(
    worker: Worker, key: str | bytes
) -> None:
    channel = unique("badkey")
    subscriber = await subscribed_client(worker, channel)
    answer = await post(worker, channel, "refused", key)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"] == "invalid_request"
    assert "Idempotency-Key header must be 1 to 64 visible ASCII" in answer.json()["message"]
    assert await messages_until_marker(worker, subscriber, channel) == []
    await subscriber.close()


async def test_two_idempotency_key_headers_are_refused(worker: Worker) -> None:
    async with httpx.AsyncClient(timeout=10 * UNIT) as http:
        answer = await http.post(
            f"{worker.http}/api/channels/{unique('two')}/messages",
            json={"data": 1},
            headers=[(KEY_HEADER, "one"), (KEY_HEADER, "two")],
        )
    assert answer.status_code == 400, answer.text
    assert answer.json() == {
        "error": "invalid_request",
        "message": "more than one Idempotency-Key header",
    }


@pytest.mark.parametrize("key", [5, "", "two words", "x" * 65, "cl\u00e9", ["k"]])
async def test_a_bad_idempotency_key_field_is_refused_and_nothing_published(
    worker: Worker, key: object
) -> None:
    channel = unique("badkey")
    client = await subscribed_client(worker, channel)
    await client.send(
        {"type": "publish", "channel": channel, "data": 1, "idempotency_key": key, "ref": "k"}
    )
    error = await client.recv()
    assert (error["type"], error["code"], error["ref"]) == ("error", "invalid_frame", "k")
    assert error["message"].startswith("idempotency_key must be 1 to 64 visible ASCII")
    assert await messages_until_marker(worker, client, channel) == []
    await client.close()


# -- the shipped clients ------------------------------------------------------------------


async def test_the_python_client_sends_the_idempotency_key_it_is_given(worker: Worker) -> None:
    channel = unique("pyclient")
    subscriber = await subscribed_client(worker, channel)
    async with PythonClient(worker.ws + "/ws") as client:
        await client.wait_connected(10 * UNIT)
        first = await client.publish(channel, "first", idempotency_key="py-key")
        assert await client.publish(channel, "again", idempotency_key="py-key") == first
        other = await client.publish(channel, "no key")
    delivered = await messages_until_marker(worker, subscriber, channel)
    assert [(m["id"], m["data"]) for m in delivered] == [(first, "first"), (other, "no key")]
    await subscriber.close()


@pytest.mark.e2e
async def test_the_browser_client_sends_the_idempotency_key_it_is_given(worker: Worker) -> None:
    channel = unique("jsclient")
    subscriber = await subscribed_client(worker, channel)
    async with browser_page(worker, "idempotency-client-js.png") as page:
        await start_client(page, "pub", worker.ws + "/ws")
        await wait_count(page, "pub", "welcome", 1)
        ids = await page.evaluate(
            """async (channel) => {
              const client = clients.pub.client;
              const key = { idempotencyKey: "js-key" };
              return [
                await client.publish(channel, "first", key),
                await client.publish(channel, "again", key),
                await client.publish(channel, "no key"),
              ];
            }""",
            channel,
        )
    assert ids[0] == ids[1] != ids[2]
    delivered = await messages_until_marker(worker, subscriber, channel)
    assert [(m["id"], m["data"]) for m in delivered] == [(ids[0], "first"), (ids[2], "no key")]
    await subscriber.close()


# -- the publish connection: which failures may have run ----------------------------------

# Counts its runs: the count shows whether Redis ran a call whose reply was lost.
_COUNT = "return redis.call('INCR', KEYS[1])"


@asynccontextmanager
async def counting_pipe(
    port: int, *, fast: bool, timeout: float = 0.5 * UNIT
) -> AsyncIterator[ScriptPipe]:
    """A pipe running `_COUNT` against the Redis (or proxy) on `port`, closed on exit."""
    pipe = ScriptPipe(
        _COUNT,
        lambda: Connection(
            port=port,
            protocol=2,
            client_name="idempotency-test",
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
        ),
        timeout=timeout,
        retry=Retry(NoBackoff(), 2, supported_errors=(RedisConnectionError,)),
        fast=fast,
    )
    try:
        yield pipe
    finally:
        await pipe.close()


async def both_paths(pipe: ScriptPipe, key: str) -> list[Any]:
    """The outcome of one awaited call and one `start` call (exceptions included)."""
    started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    pipe.start([key], [], started.set_result)
    awaited = await asyncio.gather(pipe(keys=[key], args=[]), return_exceptions=True)
    return [awaited[0], await started]


async def test_calls_written_to_a_frozen_redis_are_unanswered_and_keep_their_kind(
    own_redis: RedisServer, fast: bool
) -> None:
    key = unique("frozen")
    async with counting_pipe(own_redis.port, fast=fast) as pipe:
        await pipe(keys=[key], args=[])  # connected
        with frozen(own_redis):
            outcomes = await both_paths(pipe, key)
    for outcome in outcomes:
        assert isinstance(outcome, Unanswered), outcome
        assert isinstance(outcome, RedisTimeoutError)
        assert "no reply from Redis within" in str(outcome)


async def test_calls_that_never_reached_redis_are_not_unanswered(
    own_redis: RedisServer, fast: bool
) -> None:
    # Killed before the pipe's first call: every attempt is refused a connection. (Killed
    # under a connection, a call written before the pipe heard of it may be unanswered.)
    own_redis.kill()
    async with counting_pipe(own_redis.port, fast=fast) as pipe:
        outcomes = await both_paths(pipe, unique("refused"))
    for outcome in outcomes:
        assert isinstance(outcome, RedisConnectionError), outcome
        assert not isinstance(outcome, Unanswered)


async def test_an_error_reply_is_not_unanswered(redis_server: RedisServer, fast: bool) -> None:
    key = unique("wrongtype")
    redis_server.client().set(key, "not a counter")
    async with counting_pipe(redis_server.port, fast=fast) as pipe:
        outcomes = await both_paths(pipe, key)
    for outcome in outcomes:
        assert isinstance(outcome, ResponseError), outcome
        assert not isinstance(outcome, Unanswered)


async def test_a_lost_reply_stays_unanswered_when_its_retries_cannot_connect(
    own_redis: RedisServer, fast: bool
) -> None:
    # Redis ran the call, its reply was lost with the connection, and the retries find
    # Redis frozen: the last error is a failed connection, but the call may have run
    # (it did: the count says so), and it says so.
    key = unique("lost")
    proxy = await RedisProxy(own_redis.port).start()
    try:
        # Long enough that the connection is cut before any reply is overdue.
        async with counting_pipe(proxy.port, fast=fast, timeout=2 * UNIT) as pipe:
            await pipe(keys=[key], args=[])
            proxy.arm(b"EVALSHA")
            started: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            pipe.start([key], [], started.set_result)
            awaited = asyncio.create_task(pipe(keys=[key], args=[]))

            def ran_both() -> bool:
                return own_redis.client().get(key) == b"3"

            await asyncio.to_thread(wait_for, ran_both, 10, "Redis ran both")
            with frozen(own_redis):
                proxy.cut()
                outcomes = [*await asyncio.gather(awaited, return_exceptions=True), await started]
    finally:
        await proxy.close()
    for outcome in outcomes:
        assert isinstance(outcome, Unanswered), outcome
