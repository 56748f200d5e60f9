"""The hub on broadcaster's memory:// backend: fan-out, one subscription per channel, linger."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.broker import Broker
from service.hub import Hub
from service.hub.fanout import Channel, FanOuts
from service.settings import Settings
from tests.helpers import async_wait_for


class Recorder:
    """A member that records what it is given."""

    def __init__(self) -> None:
        self.frames: list[str] = []

    def deliver(self, frame: str) -> None:
        self.frames.append(frame)


class Broken:
    def deliver(self, frame: str) -> None:
        raise RuntimeError("this member is broken")


@pytest.fixture
async def broker() -> AsyncIterator[Broker]:
    async with Broker(Settings.model_validate({}), "test") as broker:
        yield broker


def backend_channels(broker: Broker) -> set[str]:
    """Channels broadcaster's memory backend is subscribed to."""
    return set(broker._broadcast._backend._subscribed)  # type: ignore[attr-defined]


async def test_every_member_gets_the_same_frame_object(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    members = [Recorder() for _ in range(50)]
    for member in members:
        await hub.join("news", member)
    message_id = await broker.publish("news", b'{"n":1}')
    await async_wait_for(lambda: _all_have(members, 1), what="fan-out")
    first = members[0].frames[0]
    assert first == f'{{"type":"message","channel":"news","id":"{message_id}","data":{{"n":1}}}}'
    # Encoded once per worker: the very same str object goes to every member.
    assert all(member.frames[0] is first for member in members)
    await hub.close()


async def _all_have(members: list[Recorder], count: int) -> bool:
    return all(len(m.frames) == count for m in members)


async def test_one_backend_subscription_per_channel(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    await asyncio.gather(*(hub.join("a", Recorder()) for _ in range(20)))
    await asyncio.gather(*(hub.join("b", Recorder()) for _ in range(20)))
    assert backend_channels(broker) == {"a", "b"}
    assert hub.channel_count == 2
    assert hub.member_count("a") == 20
    await hub.close()
    assert backend_channels(broker) == set()


async def test_concurrent_first_joins_all_receive(broker: Broker) -> None:
    # broadcaster 0.3.1 loses a queue when two first subscribers race;
    # the hub's per-channel lock makes one subscription that every member shares.
    hub = Hub(broker, linger=0)
    members = [Recorder() for _ in range(200)]
    await asyncio.gather(*(hub.join("fresh", m) for m in members))
    await broker.publish("fresh", b"1")
    await async_wait_for(lambda: _all_have(members, 1), what="all 200 members to receive")
    await hub.close()


async def test_messages_keep_their_order(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    members = [Recorder() for _ in range(3)]
    for member in members:
        await hub.join("ordered", member)
    for n in range(100):
        await broker.publish("ordered", str(n).encode())
    await async_wait_for(lambda: _all_have(members, 100), what="100 messages")
    assert members[0].frames == members[1].frames == members[2].frames
    assert [f.rsplit(":", 1)[1] for f in members[0].frames] == [f"{n}}}" for n in range(100)]
    await hub.close()


async def test_a_broken_member_does_not_stop_the_fan_out(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    good_before, good_after = Recorder(), Recorder()
    await hub.join("c", good_before)
    await hub.join("c", Broken())
    await hub.join("c", good_after)
    await broker.publish("c", b"1")
    await broker.publish("c", b"2")
    await async_wait_for(lambda: _all_have([good_before, good_after], 2), what="both messages")
    await hub.close()


async def test_subscription_is_dropped_after_the_linger(broker: Broker) -> None:
    hub = Hub(broker, linger=0.05)
    member = Recorder()
    await hub.join("short", member)
    hub.leave("short", member)
    assert backend_channels(broker) == {"short"}  # still lingering

    async def dropped() -> bool:
        return backend_channels(broker) == set() and hub.channel_count == 0

    await async_wait_for(dropped, what="the subscription to be dropped")
    await hub.close()


async def test_rejoining_during_the_linger_keeps_the_subscription(broker: Broker) -> None:
    hub = Hub(broker, linger=0.2)
    first, second = Recorder(), Recorder()
    await hub.join("keep", first)
    hub.leave("keep", first)
    await hub.join("keep", second)
    await broker.publish("keep", b"1")
    await async_wait_for(lambda: _all_have([second], 1), what="delivery after rejoin")
    assert first.frames == []
    assert backend_channels(broker) == {"keep"}
    await hub.close()


async def test_leave_then_join_after_drop_resubscribes(broker: Broker) -> None:
    hub = Hub(broker, linger=0)
    first, second = Recorder(), Recorder()
    await hub.join("again", first)
    hub.leave("again", first)
    await async_wait_for(lambda: _true(hub.channel_count == 0), what="drop")
    await hub.join("again", second)
    await broker.publish("again", b"1")
    await async_wait_for(lambda: _all_have([second], 1), what="delivery after resubscribe")
    await hub.close()


async def _true(value: bool) -> bool:
    return value


async def test_members_that_leave_during_a_fan_out_in_chunks_are_not_served(
    broker: Broker,
) -> None:
    # A channel too big for one chunk gets a message over several turns of the loop. A
    # member that leaves before its chunk (an unsubscribe, a revoked token, or a resume
    # that will have the message from history) must not get it after all.
    hub = Hub(broker, linger=0, fanout_chunk=2)

    class Leaver(Recorder):
        """On its first frame, makes every member not served yet leave."""

        def deliver(self, frame: str) -> None:
            super().deliver(frame)
            for member in members:
                if not member.frames:
                    hub.leave("big", member)

    members = [Leaver() for _ in range(6)]
    for member in members:
        await hub.join("big", member)
    await broker.publish("big", b"1")
    await broker.publish("big", b"2")
    await async_wait_for(lambda: _true(max(len(m.frames) for m in members) == 2), what="two")
    marker = Recorder()
    await hub.join("big", marker)
    await broker.publish("big", b"3")
    await async_wait_for(lambda: _all_have([marker], 1), what="the third message")
    # The first served stays, and gets all three; the other of its chunk was served
    # before it acted (one chunk is one synchronous step), then left; the rest, none.
    assert sorted(len(m.frames) for m in members) == [0, 0, 0, 0, 1, 3]
    await hub.close()


async def test_a_fan_out_in_chunks_counts_as_busy_until_its_last_chunk(broker: Broker) -> None:
    # The worker's keepalive waits while one is under way (hold_keepalive_while).
    hub = Hub(broker, linger=0, fanout_chunk=2)
    busy_seen: list[bool] = []

    class Watcher(Recorder):
        def deliver(self, frame: str) -> None:
            super().deliver(frame)
            busy_seen.append(hub.fanouts.busy())

    members = [Watcher() for _ in range(5)]
    small = Watcher()
    for member in members:
        await hub.join("big", member)
    await hub.join("small", small)
    assert not hub.fanouts.busy()
    await broker.publish("small", b"1")  # one chunk: delivered in one step, never busy
    await async_wait_for(lambda: _all_have([small], 1), what="the small channel's message")
    assert busy_seen == [False]
    busy_seen.clear()
    await broker.publish("big", b"1")
    await async_wait_for(lambda: _all_have(members, 1), what="every chunk")
    # The first chunk goes out in the broker's read, in one step; busy from then until
    # the last chunk (which ends it).
    assert busy_seen == [False, False, True, True, True]
    await async_wait_for(lambda: _true(not hub.fanouts.busy()), what="the fan-out to end")
    assert hub.fanouts.under_way == 0
    await hub.close()


async def test_a_fan_out_stopped_halfway_is_not_busy_any_more() -> None:
    fanouts = FanOuts()

    async def no_history(channel: Channel) -> list[tuple[None, str]]:
        return []

    channel = Channel("big", chunk=2, catch_up=no_history, on_fanout=None, fanouts=fanouts)
    members = [Recorder() for _ in range(5)]
    channel.members.update(members)
    channel.message(None, "frame")  # the first chunk now, the rest in later turns
    assert sum(len(m.frames) for m in members) == 2
    assert fanouts.busy()
    drainer = channel.stop()  # the subscription ends (the channel is dropped)
    assert not fanouts.busy()
    assert drainer is not None
    with pytest.raises(asyncio.CancelledError):
        await drainer
    assert fanouts.under_way == 0
