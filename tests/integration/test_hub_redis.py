"""The hub on a real redis-server, whose reader hands each message to its channel from
inside the read that brought it: fanned out there while the channel is live, queued in
its backlog while a fan-out in chunks or a catch-up is under way. Bursts, channels fanned
out in chunks or at once with members resuming meanwhile, and a catch-up after the
pub/sub connection broke, each with every message once and in order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from service.broker import Broker
from service.hub import Hub
from service.settings import Settings
from tests.helpers import RedisServer, async_wait_for


class Recorder:
    """A member that records frames."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        # Per frame: the task that delivered it (None: from inside a read).
        self.tasks: list[str | None] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)
        task = asyncio.current_task()
        self.tasks.append(None if task is None else task.get_name())

    def deliver_backlog(self, frames: list[str]) -> None:
        self.frames.extend(frames)

    def overwhelmed(self) -> None:
        raise AssertionError("no member here is slow")

    def ids(self) -> list[str]:
        return [orjson.loads(frame)["id"] for frame in self.frames]


@pytest.fixture
async def broker(redis_server: RedisServer, prefix: str) -> AsyncIterator[Broker]:
    settings = Settings.model_validate(
        {"broadcast_url": redis_server.url, "redis_prefix": prefix, "history_size": 10_000}
    )
    async with Broker(settings, "hub-test") as broker:
        yield broker


async def test_a_burst_reaches_every_member_once_and_in_order(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    members = [Recorder() for _ in range(5)]
    for member in members:
        await hub.join("small", member)
    # Pipelined on the publish connection: they arrive in bursts, several per read.
    ids = await asyncio.gather(*(broker.publish("small", str(n).encode()) for n in range(300)))
    ordered = sorted(ids, key=lambda message_id: int(message_id.rsplit(":", 1)[1]))

    async def all_arrived() -> bool:
        return all(len(member.frames) == 300 for member in members)

    await async_wait_for(all_arrived, what="300 messages to each member")
    for member in members:
        assert member.ids() == ordered
    await hub.close()


async def test_a_live_channel_fans_out_from_inside_the_read(broker: Broker) -> None:
    hub = Hub(broker, linger=0, fanout_chunk=3)
    small, big = Recorder(), [Recorder() for _ in range(4)]
    await hub.join("small", small)
    for member in big:
        await hub.join("big", member)
    for n in range(10):
        await broker.publish("small", str(n).encode())
        await broker.publish("big", str(n).encode())

    async def all_arrived() -> bool:
        return len(small.frames) == 10 and all(len(m.frames) == 10 for m in big)

    await async_wait_for(all_arrived, what="10 messages to each member")
    # One at a time, each found the small channel live: no task step.
    assert small.tasks == [None] * 10
    # More members than a chunk holds: in chunks, the last ones by the backlog's task.
    for n in range(10):
        assert "backlog:big" in [m.tasks[n] for m in big]
    await hub.close()


# Big: each message is fanned out over several turns of the loop, and messages arriving
# meanwhile queue behind it. Small: a message that finds the channel live is fanned out
# from inside the Redis read.
@pytest.mark.parametrize(("chunk", "size"), [(3, 40), (1000, 5)], ids=["big", "small"])
async def test_members_resuming_meanwhile_get_every_message_once(
    broker: Broker, chunk: int, size: int
) -> None:
    read_history = broker.history_after
    turns = random.Random(11)

    async def read_then_dawdle(*args: Any, **kwargs: Any) -> Any:
        read = await read_history(*args, **kwargs)
        for _ in range(turns.randrange(30)):
            await asyncio.sleep(0)
        return read

    broker.history_after = read_then_dawdle  # type: ignore[method-assign]
    hub = Hub(broker, linger=0, fanout_chunk=chunk)
    crowd = [Recorder() for _ in range(size)]  # big: 14 chunks a message
    for member in crowd:
        await hub.join("big", member)
    stop = asyncio.Event()

    async def publish_until_stopped() -> None:
        n = 0
        while not stop.is_set():
            # Two at a time: the second arrives while the first is being fanned out.
            await asyncio.gather(
                broker.publish("big", str(n).encode()), broker.publish("big", b'"x"')
            )
            n += 1
            for _ in range(10):
                await asyncio.sleep(0)

    publisher = asyncio.create_task(publish_until_stopped())
    watcher = crowd[0]
    resumed = []
    for _ in range(30):

        async def heard_two() -> bool:
            return len(watcher.frames) >= 2

        await async_wait_for(heard_two, what="messages")
        since = watcher.ids()[-2]
        member = Recorder()
        await hub.join("big", member, since=since)
        resumed.append((since, member))
    stop.set()
    await publisher

    async def drained() -> bool:
        return watcher.ids()[-1] == str((await broker.history_latest("big", 0)).position)

    await async_wait_for(drained, what="every message")
    # The watcher may be in an early chunk: the last message reaches the others in the
    # turns after it.
    last = watcher.ids()[-1]
    everyone = [*crowd, *(member for _, member in resumed)]
    await async_wait_for(
        lambda: all(m.frames and m.ids()[-1] == last for m in everyone),
        what="the last message to every member",
    )
    every = watcher.ids()
    assert len(every) == len(set(every))
    assert every == sorted(every, key=lambda message_id: int(message_id.rsplit(":", 1)[1]))
    for member in crowd:
        assert member.ids() == every
    for since, member in resumed:
        assert member.ids() == every[every.index(since) + 1 :]
    await hub.close()


async def test_messages_that_arrive_during_a_catch_up_wait_behind_it(
    broker: Broker, redis_server: RedisServer, prefix: str
) -> None:
    # After the pub/sub connection breaks, the channel reads what was missed from history
    # while live messages keep arriving; those must queue behind the catch-up (out of
    # order, they would also make the caught-up ones look already delivered).
    read_history = broker.history_after

    async def read_slowly(*args: Any, **kwargs: Any) -> Any:
        read = await read_history(*args, **kwargs)
        await asyncio.sleep(0.05)  # live messages arrive meanwhile
        return read

    broker.history_after = read_slowly  # type: ignore[method-assign]
    hub = Hub(broker, linger=0)
    member = Recorder()
    await hub.join("small", member)
    stop = asyncio.Event()

    async def publish_until_stopped() -> None:
        n = 0
        while not stop.is_set():
            await broker.publish("small", str(n).encode())
            n += 1
            await asyncio.sleep(0.002)

    async def has(count: int) -> bool:
        return len(member.frames) >= count

    publisher = asyncio.create_task(publish_until_stopped())
    await async_wait_for(lambda: has(20), what="live messages")
    redis_server.kill_pubsub_of(prefix + "hub-test")
    later = len(member.frames) + 100
    await async_wait_for(lambda: has(later), what="messages after the break")
    stop.set()
    await publisher

    async def drained() -> bool:
        return member.ids()[-1] == str((await broker.history_latest("small", 0)).position)

    await async_wait_for(drained, what="every message")
    assert hub.stats.gaps_filled == 1
    assert [int(message_id.rsplit(":", 1)[1]) for message_id in member.ids()] == list(
        range(1, len(member.frames) + 1)
    )
    await hub.close()
