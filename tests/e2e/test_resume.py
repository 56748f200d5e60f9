"""A client that loses its worker (or its worker's Redis subscription) misses nothing.

Three real workers and Redis; a publisher that never stops, acknowledged message by
message; a `service.client.Client` subscribed on one worker. Then its worker is
SIGKILLed, or SIGTERMed, or loses its Redis subscription connection. The client must
end up holding every acknowledged message exactly once, in order, and must not have
been told it lost anything.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field

import httpx
import pytest

from service.client import Client, Event, Lost, Message, State, StateChanged, Subscribed
from tests.conftest import WorkersFactory
from tests.helpers import UNIT, RedisServer, Worker, async_wait_for, redis_args, unique

pytestmark = pytest.mark.e2e

WARMUP = 50  # messages the client receives before the fault
AFTER = 150  # and after its recovery, before the publisher stops


@dataclass
class Publisher:
    """Publishes 0, 1, 2, ... over HTTP, one at a time, until stopped."""

    targets: list[Worker]
    channel: str
    acked: list[tuple[str, float]] = field(default_factory=list)  # (id, when acknowledged)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        n = 0
        async with httpx.AsyncClient(timeout=10 * UNIT) as http:
            while not self.stop.is_set():
                target = self.targets[n % len(self.targets)]
                url = f"{target.http}/api/channels/{self.channel}/messages"
                response = await http.post(url, json={"data": n})
                assert response.status_code == 200, response.text
                self.acked.append((response.json()["id"], time.monotonic()))
                n += 1

    def ids(self) -> list[str]:
        return [message_id for message_id, _ in self.acked]


@dataclass
class Recorder:
    """Reads a client's events as they come, keeping when each arrived."""

    events: list[tuple[Event, float]] = field(default_factory=list)

    async def run(self, client: Client) -> None:
        async for event in client.events():
            self.events.append((event, time.monotonic()))

    def messages(self) -> list[Message]:
        return [e for e, _ in self.events if isinstance(e, Message)]

    def of(self, kind: type) -> list[tuple[Event, float]]:
        return [(e, t) for e, t in self.events if isinstance(e, kind)]


@pytest.fixture
def workers(make_workers: WorkersFactory, redis_server: RedisServer, prefix: str) -> list[Worker]:
    # The publisher does not pause for the fault: while the client waits out its first
    # reconnect delay (0.125-0.25 s) it can publish more than the default 100 messages of
    # history (Redis trims the stream back to about 100 once it nears 200), and the
    # resume then rightly reports a loss. History must cover the gap for "misses
    # nothing" to be the expectation (test_history.py has a resume older than history).
    return make_workers(3, *redis_args(redis_server, prefix), "--history-size", "1000")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["sigkill", "sigterm", "redis-subscription-killed"])
async def test_a_client_misses_nothing_across_a_fault(
    workers: list[Worker], redis_server: RedisServer, prefix: str, fault: str
) -> None:
    victim, *others = workers
    channel = unique("resume")
    # The victim's subscription connection can only be killed while it is alive: then the
    # client stays on it, and the victim publishes too.
    publisher = Publisher(others if fault != "redis-subscription-killed" else workers, channel)
    recorder = Recorder()
    async with Client([w.ws + "/ws" for w in workers], open_timeout=5 * UNIT) as client:
        reading = asyncio.create_task(recorder.run(client))
        await client.subscribe(channel)
        victim_id = client.worker
        publishing = asyncio.create_task(publisher.run())
        await _wait_for_messages(recorder, WARMUP)

        faulted_at = time.monotonic()
        if fault == "sigkill":
            victim.signal(signal.SIGKILL)
        elif fault == "sigterm":
            victim.signal(signal.SIGTERM)
        else:
            await asyncio.to_thread(redis_server.kill_pubsub_of, victim.redis_name(prefix))
            await async_wait_for(
                lambda: asyncio.to_thread(victim.metric, "broadcast_redis_reconnects_total"),
                what="the victim to rebuild its subscription",
            )
        await _wait_for_messages(recorder, len(recorder.messages()) + AFTER)

        publisher.stop.set()
        await publishing
        end = await asyncio.to_thread(others[0].publish, channel, "end")
        await async_wait_for(
            _async(lambda: recorder.messages()[-1].id == end), 30, "the end marker"
        )
        await client.close()
        await reading

    received = [m.id for m in recorder.messages()]
    expected = [*publisher.ids(), end]
    assert len(received) == len(set(received)), "a message arrived twice"
    assert received == expected, _first_difference(received, expected)
    assert recorder.of(Lost) == [], "the client was told it lost messages"
    print(f"{fault}: {len(expected)} messages, all received once, in order")

    if fault == "redis-subscription-killed":
        # Same connection throughout; the worker filled its own gap from history.
        assert [e.state for e, _ in recorder.of(StateChanged)][-1] == State.CLOSED
        assert victim.metric("broadcast_gaps_filled_total") == 1
        return
    # The client moved to another worker and resumed there with `since`.
    assert client.worker != victim_id
    resumed = [(e, t) for e, t in recorder.of(Subscribed) if e.recovered is not None]
    assert [e.recovered for e, _ in resumed] == [True]
    resumed_at = resumed[0][1]
    # Messages acknowledged while the client had no subscription came from history.
    away = [i for i, t in publisher.acked if faulted_at < t < resumed_at]
    print(f"{fault}: {len(away)} messages published while the client was away")
    assert away, "the fault was too short to test anything"


async def _wait_for_messages(recorder: Recorder, count: int) -> None:
    await async_wait_for(_async(lambda: len(recorder.messages()) >= count), 30, f"{count} messages")


def _async(condition: object) -> object:
    async def check() -> bool:
        return bool(condition())  # type: ignore[operator]

    return check


def _first_difference(received: list[str], expected: list[str]) -> str:
    for index, (got, want) in enumerate(zip(received, expected, strict=False)):
        if got != want:
            return f"first difference at {index}: got {got}, expected {want}"
    return f"lengths differ: got {len(received)}, expected {len(expected)}"
