"""Message ids, history reads, and the hub's resume and gap filling, on memory://."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
import pytest

from service.broker import Broker, Position
from service.broker.history import MemoryHistory, new_epoch, read_after
from service.hub import Hub, Joined
from service.settings import Settings
from tests.helpers import async_wait_for


class Recorder:
    """A member that records frames, and which of them came as a backlog."""

    def __init__(self) -> None:
        self.frames: list[str] = []
        self.backlog: list[str] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)

    def deliver_backlog(self, frames: Sequence[str]) -> None:
        self.backlog.extend(frames)
        self.frames.extend(frames)

    def data(self) -> list[object]:
        return [orjson.loads(f).get("data") for f in self.frames]


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    settings = Settings.model_validate({"history_size": 5})
    async with Broker(settings, "test") as broker:
        yield broker


def test_ids_parse_only_when_they_are_ours() -> None:
    assert Position.parse("k3v9x2ma:42") == Position("k3v9x2ma", 42)
    assert str(Position("k3v9x2ma", 42)) == "k3v9x2ma:42"
    for text in ["42", "", ":1", "e:", "e:-1", "e:1.5", "e:²", "e:" + "9" * 20, "e: 1"]:
        assert Position.parse(text) is None, text


def test_a_position_covers_what_came_before_it_in_its_own_epoch_only() -> None:
    here = Position("a", 5)
    assert here.covers(Position("a", 5))
    assert here.covers(Position("a", 1))
    assert not here.covers(Position("a", 6))
    assert not here.covers(Position("b", 1))


def test_read_after_judges_recovery() -> None:
    entries = [(4, "f4"), (5, "f5")]
    # Starts right after `since` and reaches the top: complete.
    read = read_after("e", 5, entries, Position("e", 3))
    assert (read.recovered, read.complete, list(read.frames)) == (True, True, ["f4", "f5"])
    # Nothing missed.
    assert read_after("e", 5, [], Position("e", 5)).complete
    # Trimmed: history starts after a gap.
    assert not read_after("e", 5, entries, Position("e", 2)).recovered
    # Another epoch, a position from the future, no position at all.
    assert not read_after("e", 5, entries, Position("x", 3)).recovered
    assert not read_after("e", 5, [], Position("e", 9)).recovered
    assert not read_after("e", 5, entries, None).recovered


def test_memory_history_keeps_the_last_messages_and_expires_them() -> None:
    now = [0.0]
    history = MemoryHistory(size=3, ttl=10, meta_ttl=100, clock=lambda: now[0])
    ids = [history.publish("c", str(n).encode())[0] for n in range(5)]
    first = Position.parse(ids[0])
    assert first is not None
    assert [Position.parse(i) for i in ids] == [Position(first.epoch, n) for n in range(1, 6)]
    assert history.after("c", Position(first.epoch, 2), None).complete
    assert not history.after("c", Position(first.epoch, 1), None).recovered  # trimmed
    assert len(history.latest("c", 10).frames) == 3
    now[0] = 11.0  # the history expired; the ids carry on
    assert history.latest("c", 10).frames == []
    assert history.publish("c", b"6")[0] == f"{first.epoch}:6"
    now[0] = 200.0  # unused past meta_ttl: a new history, whose ids cannot be confused
    fresh = Position.parse(history.publish("c", b"7")[0])
    assert fresh is not None
    assert fresh.seq == 1
    assert fresh.epoch != first.epoch


async def test_resume_gives_what_was_missed_then_live(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    ids = [await broker.publish("news", str(n).encode()) for n in range(4)]
    member = Recorder()
    replies: list[Joined] = []
    joined = await hub.join("news", member, since=ids[1], on_joined=replies.append)
    assert replies == [joined] == [Joined(ids[1], True)]
    assert member.data() == [2, 3]
    assert member.backlog == member.frames
    await broker.publish("news", b"4")
    await async_wait_for(lambda: _has(member, 3), what="a live message")
    assert member.data() == [2, 3, 4]
    await hub.close()


async def test_resume_reports_what_history_cannot_give(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    ids = [await broker.publish("news", str(n).encode()) for n in range(8)]  # keeps 5
    for since in (ids[0], "not-ours", "otherepoch:3"):
        member = Recorder()
        joined = await hub.join("news", member, since=since)
        # The member starts live from the channel's current position, with nothing old.
        assert joined == Joined(ids[-1], False)
        assert member.frames == []
    assert (hub.stats.resumes_recovered, hub.stats.resumes_not_recovered) == (0, 3)
    await hub.close()


async def test_resume_races_a_busy_publisher_without_gap_or_duplicate(broker: Broker) -> None:
    # The member joins with a buffer while messages keep coming; the switch from history
    # to live must neither drop nor repeat one, wherever the race falls.
    settings = Settings.model_validate({"history_size": 10_000})
    async with Broker(settings, "test") as busy:
        hub = Hub(busy, linger=0)
        watcher = Recorder()
        await hub.join("race", watcher)
        stop = asyncio.Event()

        publisher = asyncio.create_task(_publish_until(stop, busy, "race", turns=1))
        members = []
        for _ in range(30):
            await async_wait_for(lambda: _has(watcher, 1), what="messages")
            since = orjson.loads(watcher.frames[len(watcher.frames) // 2])["id"]
            member = Recorder()
            await hub.join("race", member, since=since)
            members.append((since, member))
        stop.set()
        await publisher
        await async_wait_for(
            lambda: _drained(watcher, busy, "race"), what="the watcher to hear every message"
        )
        every = [orjson.loads(f)["id"] for f in watcher.frames]
        for since, member in members:
            got = [orjson.loads(f)["id"] for f in member.frames]
            assert got == every[every.index(since) + 1 :]
        await hub.close()


async def test_an_interruption_is_filled_from_history_once(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    member = Recorder()
    await hub.join("news", member)
    await broker.publish("news", b"0")
    await async_wait_for(lambda: _has(member, 1), what="the first message")
    # Stand in for a broken subscription: messages 1 and 2 never reach the worker live,
    # then the backend marks the interruption, then message 2 arrives live after all.
    backend = broker._broadcast  # type: ignore[attr-defined]
    await _publish_unheard(broker, b"1")
    missed_twice = await _publish_unheard(broker, b"2")
    _interrupt(hub, "news")
    await backend.publish("news", missed_twice)
    await broker.publish("news", b"3")
    await async_wait_for(lambda: _has(member, 4), what="the filled gap and a live message")
    assert member.data() == [0, 1, 2, 3]
    assert (hub.stats.gaps_filled, hub.stats.gaps_reported) == (1, 0)
    await hub.close()


async def test_an_interruption_history_does_not_cover_sends_a_gap(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    member = Recorder()
    await hub.join("news", member)
    for n in range(7):  # history keeps 5: two of these are gone
        await _publish_unheard(broker, str(n).encode())
    _interrupt(hub, "news")
    await async_wait_for(lambda: _has(member, 6), what="the notice and what history has")
    assert orjson.loads(member.frames[0]) == {"type": "gap", "channel": "news"}
    assert member.data()[1:] == [2, 3, 4, 5, 6]
    assert (hub.stats.gaps_filled, hub.stats.gaps_reported) == (0, 1)
    await hub.close()


def _interrupt(hub: Hub, channel: str) -> None:
    """What the Redis backend tells a channel once its subscription is back after a break."""
    hub._channels[channel].interrupted()


async def _publish_unheard(broker: Broker, data: bytes) -> str:
    """Number and keep a message without publishing it, as if the worker missed it."""
    store = broker._history._history  # type: ignore[attr-defined]
    _, frame = store.publish("news", data)
    return str(frame)


async def _has(member: Recorder, count: int) -> bool:
    return len(member.frames) >= count


async def _drained(watcher: Recorder, broker: Broker, channel: str) -> bool:
    last = orjson.loads(watcher.frames[-1])["id"]
    return last == str((await broker.history_latest(channel, 0)).position)


async def _publish_until(stop: asyncio.Event, broker: Broker, channel: str, turns: int) -> None:
    """Publish 0, 1, 2, ... to `channel`, `turns` turns of the event loop apart."""
    n = 0
    while not stop.is_set():
        await broker.publish(channel, str(n).encode())
        n += 1
        for _ in range(turns):
            await asyncio.sleep(0)


def test_read_after_needs_every_seq_up_to_the_top() -> None:
    # A hole in the middle (a message published by a worker with history off).
    read = read_after("e", 6, [(4, "f4"), (6, "f6")], Position("e", 3))
    assert read.recovered
    assert not read.complete


class Overwhelmable(Recorder):
    def __init__(self) -> None:
        super().__init__()
        self.overwhelmed_calls = 0

    def overwhelmed(self) -> None:
        self.overwhelmed_calls += 1


async def test_a_resume_that_overflows_its_buffer_closes_the_member(broker: Broker) -> None:
    # More live frames arrive during the history read than the member could queue: it
    # must not be switched to live with a hole; it is closed as a slow consumer instead.
    hub = Hub(broker, linger=0, catchup_frames=3)
    watcher = Recorder()
    await hub.join("news", watcher)
    since = await broker.publish("news", b"0")
    read_history = broker.history_after

    async def slow_read(channel: str, position: Position | None, limit: int | None = None) -> Any:
        for n in range(1, 6):
            await broker.publish("news", str(n).encode())
        await async_wait_for(lambda: _has(watcher, 6), what="the channel to hand them out")
        return await read_history(channel, position, limit)

    broker.history_after = slow_read  # type: ignore[method-assign]
    member = Overwhelmable()
    joined = await hub.join("news", member, since=since)
    assert joined.recovered is False
    assert member.overwhelmed_calls == 1
    assert member.frames == []
    assert hub.member_count("news") == 1  # the watcher only
    await hub.close()


async def test_redis_back_from_an_older_snapshot_does_not_swallow_new_messages(
    broker: Broker,
) -> None:
    # Same epoch, lower seq: ids are given out again. The worker must say `gap` and then
    # deliver the new messages, not skip them as already delivered.
    hub = Hub(broker, linger=0)
    member = Recorder()
    await hub.join("news", member)
    for n in range(5):
        await broker.publish("news", str(n).encode())
    await async_wait_for(lambda: _has(member, 5), what="five messages")
    store = broker._history._history  # type: ignore[attr-defined]
    state = store._channels["news"]
    state.seq = 2  # restored from a snapshot taken after message 2
    while state.entries and state.entries[-1][0] > 2:
        state.entries.pop()
    _interrupt(hub, "news")
    await broker.publish("news", b'"new"')
    await async_wait_for(lambda: _has(member, 7), what="the gap and the new message")
    assert orjson.loads(member.frames[5]) == {"type": "gap", "channel": "news"}
    assert member.data()[6] == "new"
    await hub.close()


async def test_a_channel_lagging_in_an_older_epoch_does_not_promote_a_resumed_member(
    broker: Broker,
) -> None:
    # The member resumed from the current history while the channel still hands out frames
    # of the history Redis lost: those must not reach it, and must not let it in early.
    hub = Hub(broker, linger=0)
    watcher = Recorder()
    await hub.join("news", watcher)
    ids = [await broker.publish("news", str(n).encode()) for n in range(3)]
    await async_wait_for(lambda: _has(watcher, 3), what="three messages")
    hub._channels["news"].position = Position("lost", 50)  # as if lagging behind a restart
    member = Recorder()
    assert (await hub.join("news", member, since=ids[0])).recovered is True
    assert member.data() == [1, 2]
    stale = '{"type":"message","channel":"news","id":"lost:51","data":"stale"}'
    await broker._broadcast.publish("news", stale)  # type: ignore[attr-defined]
    await broker.publish("news", b"3")
    await async_wait_for(lambda: _has(watcher, 5), what="the stale frame and a new one")
    assert member.data() == [1, 2, 3]
    await hub.close()


async def test_resumes_between_the_chunks_of_a_big_fan_out_miss_nothing() -> None:
    """A channel bigger than `fanout_chunk` gets each message over several loop turns;
    members resuming meanwhile, and everyone else, get every message exactly once."""
    settings = Settings.model_validate({"history_size": 10_000})
    async with Broker(settings, "test") as busy:
        read_history = busy.history_after
        turns = random.Random(7)

        async def read_then_dawdle(*args: Any, **kwargs: Any) -> Any:
            # As over a network: the reply comes back some turns of the loop after Redis
            # read it, and the channel may be mid-fan-out of a newer message by then.
            read = await read_history(*args, **kwargs)
            for _ in range(turns.randrange(30)):
                await asyncio.sleep(0)
            return read

        busy.history_after = read_then_dawdle  # type: ignore[method-assign]
        hub = Hub(busy, linger=0, fanout_chunk=3)
        crowd = [Recorder() for _ in range(40)]  # 14 chunks a message
        for member in crowd:
            await hub.join("big", member)
        stop = asyncio.Event()

        # Spaced so that the channel keeps up (a message's fan-out takes 14 turns): the
        # message in flight is then usually newer than what a resume's history read saw.
        publisher = asyncio.create_task(_publish_until(stop, busy, "big", turns=20))
        watcher = crowd[0]
        resumed = []
        for _ in range(40):
            await async_wait_for(lambda: _has(watcher, 2), what="messages")
            since = orjson.loads(watcher.frames[-2])["id"]
            member = Recorder()
            await hub.join("big", member, since=since)
            resumed.append((since, member))
        stop.set()
        await publisher
        await async_wait_for(lambda: _drained(watcher, busy, "big"), what="every message")
        # The watcher may be in an early chunk: the last message reaches the others in
        # the turns after it.
        last = orjson.loads(watcher.frames[-1])["id"]
        everyone = [*crowd, *(member for _, member in resumed)]
        await async_wait_for(
            lambda: all(m.frames and orjson.loads(m.frames[-1])["id"] == last for m in everyone),
            what="the last message to every member",
        )
        every = [orjson.loads(f)["id"] for f in watcher.frames]
        assert len(every) == len(set(every))
        for member in crowd:
            assert [orjson.loads(f)["id"] for f in member.frames] == every
        for since, member in resumed:
            got = [orjson.loads(f)["id"] for f in member.frames]
            assert got == every[every.index(since) + 1 :]
        await hub.close()


def test_epochs_are_eight_base32_characters_and_differ() -> None:
    epochs = {new_epoch() for _ in range(1000)}
    assert len(epochs) == 1000
    assert all(len(e) == 8 and set(e) <= set("0123456789abcdefghijklmnopqrstuv") for e in epochs)
    # All 32 symbols turn up in every position: the whole 40 bits are random.
    for position in range(8):
        assert len({e[position] for e in epochs}) == 32
