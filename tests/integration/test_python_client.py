"""service.client against real workers and real Redis, and against tiny scripted servers.

The real-worker tests check what a user sees (round trips, error replies, reconnecting
to another worker after SIGTERM or SIGKILL, resubscribing with `since`, tokens: sent,
refreshed, renewed after they expire, refused). The scripted
`websockets` servers close with a chosen code or send a chosen frame, and record when
each connection came and what it sent: that is how the backoff policy and the resume
bookkeeping are checked exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from service.client import (
    Client,
    ClientError,
    ConnectionLost,
    Event,
    Lost,
    Message,
    NotConnected,
    Presence,
    ServerError,
    State,
    StateChanged,
    Subscribed,
    Welcome,
)
from tests.conftest import WorkerFactory
from tests.helpers import UNIT, RedisServer, Worker, async_wait_for, free_port, redis_args, unique

# -- helpers ---------------------------------------------------------------------------


class Recorder:
    """Reads a client's events in the background into a list that tests poll."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.events: list[Event] = []
        self.ended = False
        self._task = asyncio.create_task(self._collect(client))

    async def _collect(self, client: Client) -> None:
        async for event in client.events():
            self.events.append(event)
        self.ended = True

    async def connected(self) -> Client:
        """The client, once it is connected."""
        await self.client.wait_connected(10 * UNIT)
        return self.client

    async def wait(
        self, match: Callable[[Event], bool], *, after: int = 0, timeout: float = 10.0
    ) -> Event:
        """The first event from index `after` on that `match`es, once it has come."""

        async def found() -> Event | None:
            return next((e for e in self.events[after:] if match(e)), None)

        event: Event = await async_wait_for(found, timeout, what=f"event, got {self.events}")
        return event

    async def wait_state(
        self, state: State, *, after: int = 0, timeout: float = 10.0
    ) -> StateChanged:
        event = await self.wait(
            lambda e: isinstance(e, StateChanged) and e.state == state, after=after, timeout=timeout
        )
        assert isinstance(event, StateChanged)
        return event

    async def messages(self, channel: str, count: int, timeout: float = 10.0) -> list[Any]:
        """The `data` of the first `count` messages of `channel`, once they have come."""

        async def enough() -> list[Any] | None:
            found = [e.data for e in self.events if isinstance(e, Message) and e.channel == channel]
            return found[:count] if len(found) >= count else None

        result: list[Any] = await async_wait_for(enough, timeout, what=f"{count} messages")
        return result

    def of(self, kind: type[Any]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def running(client: Client) -> AsyncIterator[Recorder]:
    """`async with client`, recording its events; checks that closing left no task behind."""
    before = asyncio.all_tasks()
    async with client:
        recorder = Recorder(client)
        try:
            yield recorder
        finally:
            await client.close()
            # The event stream ends once the client is closed: the recorder stops by itself.
            await async_wait_for(_true_when(lambda: recorder.ended), 5, what="end of events")
            await recorder.stop()
    assert asyncio.all_tasks() - before == set()


def _true_when(condition: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return condition()

    return check


def ws_url(worker: Worker) -> str:
    return worker.ws + "/ws"


Script = Callable[[int, ServerConnection, "FakeServer"], Awaitable[None]]


@dataclass
class FakeServer:
    """A scripted WebSocket server: `script(n, ws, server)` serves the n-th connection."""

    script: Script
    attempts: list[float] = field(default_factory=list)
    received: list[list[dict[str, Any]]] = field(default_factory=list)
    port: int = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def handler(self, ws: ServerConnection) -> None:
        index = len(self.attempts)
        self.attempts.append(time.monotonic())
        self.received.append([])
        with contextlib.suppress(ConnectionClosed):
            await self.script(index, ws, self)

    async def recv(self, ws: ServerConnection, index: int) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5 * UNIT))
        self.received[index].append(frame)
        return frame


@contextlib.asynccontextmanager
async def fake_server(script: Script) -> AsyncIterator[FakeServer]:
    fake = FakeServer(script)
    async with serve(fake.handler, "127.0.0.1", 0) as server:
        fake.port = server.sockets[0].getsockname()[1]
        yield fake


async def send(ws: ServerConnection, frame: dict[str, Any]) -> None:
    await ws.send(json.dumps(frame))


async def welcome(ws: ServerConnection, index: int) -> None:
    await send(ws, {"type": "welcome", "worker": f"fake:{index}", "protocol": 1})


def closing_with(code: int, *, then_stay: bool = True) -> Script:
    """Welcome, close with `code`; a later connection (when `then_stay`) stays open."""

    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        if index == 0 or not then_stay:
            await ws.close(code, "scripted")
        else:
            await ws.wait_closed()

    return script


async def publish_http(worker: Worker, channel: str, data: Any) -> str:
    return await asyncio.to_thread(worker.publish, channel, data)


# -- against a real worker -------------------------------------------------------------


async def test_subscribe_publish_and_receive(worker: Worker) -> None:
    channel = unique("py")
    async with running(Client(ws_url(worker))) as events:
        client = await events.connected()
        assert client.state == State.OPEN
        assert client.worker
        subscribed = await client.subscribe(channel)
        assert subscribed.channel == channel
        assert subscribed.recovered is None  # a first subscribe has no `since`
        first = await client.publish(channel, {"text": "hi"})
        second = await publish_http(worker, channel, [1, 2])
        assert first != second
        await events.messages(channel, 2)
        assert [(m.id, m.data) for m in events.of(Message)] == [
            (first, {"text": "hi"}),
            (second, [1, 2]),
        ]
        kinds = [type(e) for e in events.events]
        assert kinds[:3] == [StateChanged, Welcome, StateChanged]
        assert [e.state for e in events.of(StateChanged)] == [State.CONNECTING, State.OPEN]
    assert client.state == State.CLOSED
    assert events.of(StateChanged)[-1] == StateChanged(State.CLOSED, 1000, "closed by the client")


async def test_concurrent_publishes_get_their_own_ids(worker: Worker) -> None:
    channel = unique("many")
    async with running(Client(ws_url(worker))) as events:
        # Subscribing before the connection is up waits for it, then subscribes.
        client = events.client
        await asyncio.wait_for(client.subscribe(channel), 10 * UNIT)
        ids = await asyncio.gather(*(client.publish(channel, n) for n in range(30)))
        assert len(set(ids)) == 30
        await events.messages(channel, 30)
        # Each reply was matched to its own command by `ref`.
        assert {m.id: m.data for m in events.of(Message)} == dict(zip(ids, range(30), strict=True))


async def test_presence_events(worker: Worker) -> None:
    channel = unique("room")
    async with running(Client(ws_url(worker))) as watcher_events:
        watcher = await watcher_events.connected()
        await watcher.subscribe(channel)
        async with running(Client(ws_url(worker))) as visitor_events:
            visitor = await visitor_events.connected()
            await visitor.subscribe(channel, info={"name": "ann"})
            await watcher_events.wait(lambda e: isinstance(e, Presence) and e.kind == "join")
        left = await watcher_events.wait(lambda e: isinstance(e, Presence) and e.kind == "leave")
        assert left == Presence("leave", channel, {"name": "ann"})


async def test_error_replies_raise_client_error_with_the_code(worker: Worker) -> None:
    channel = unique("err")
    async with running(Client(ws_url(worker))) as events:
        client = await events.connected()
        with pytest.raises(ClientError) as bad_publish:
            await client.publish("white space", 1)
        assert bad_publish.value.code == "invalid_channel"
        with pytest.raises(ClientError) as too_large:
            await client.publish(channel, "x" * 1200)  # over --max-data-bytes 1000
        assert too_large.value.code == "message_too_large"
        with pytest.raises(ClientError) as bad_subscribe:
            await client.subscribe("white space")
        assert bad_subscribe.value.code == "invalid_channel"
        # A refused subscribe is forgotten (and reported as an event), not retried.
        error = await events.wait(lambda e: isinstance(e, ServerError))
        assert isinstance(error, ServerError)
        assert (error.code, error.channel) == ("invalid_channel", "white space")
        # Subscribing again is not an error: the server is not asked twice.
        first = await client.subscribe(channel)
        assert await client.subscribe(channel, info="new info") is first
        # The connection carries on.
        message_id = await client.publish(channel, "still fine")
        await events.messages(channel, 1)
        assert events.of(Message)[0].id == message_id
        assert client.state == State.OPEN


async def test_unsubscribe_stops_delivery_and_forgets(worker: Worker) -> None:
    gone, kept = unique("gone"), unique("kept")
    async with running(Client(ws_url(worker))) as events:
        client = await events.connected()
        await client.subscribe(gone)
        await client.subscribe(kept)
        await client.unsubscribe(gone)
        await client.unsubscribe(gone)  # unknown now: nothing happens
        await client.publish(gone, "not for us")
        await client.publish(kept, "for us")
        assert await events.messages(kept, 1) == ["for us"]
        assert [m.channel for m in events.of(Message)] == [kept]
        await client.subscribe(gone)  # forgotten, so it may be subscribed again


async def test_publish_without_a_connection_raises_not_connected() -> None:
    client = Client(f"ws://127.0.0.1:{free_port()}/ws", min_delay=0.05, max_delay=0.2)
    with pytest.raises(NotConnected) as before_start:
        await client.publish("c", 1)
    assert before_start.value.code == "not_connected"
    async with running(client) as events:
        await events.wait_state(State.RECONNECTING)
        with pytest.raises(NotConnected):
            await client.publish("c", 1)
        with pytest.raises(TimeoutError):
            await client.wait_connected(0.1)
        failed = events.of(StateChanged)[1]
        assert failed.code is None  # a connection attempt failed: no close code
        assert "cannot connect" in failed.reason
    with pytest.raises(NotConnected):
        await client.publish("c", 1)
    with pytest.raises(NotConnected):
        await client.subscribe("c")
    with pytest.raises(NotConnected):
        await client.wait_connected(1)


async def test_a_subscribe_still_waiting_when_the_client_closes_fails() -> None:
    client = Client(f"ws://127.0.0.1:{free_port()}/ws", min_delay=0.05, max_delay=0.2)
    async with running(client) as events:
        waiting = asyncio.create_task(client.subscribe("c"))
        await events.wait_state(State.RECONNECTING)
        assert not waiting.done()  # remembered; it goes out once a connection is up
    with pytest.raises(ConnectionLost):
        await waiting


async def test_user_close_stops_for_good(worker: Worker) -> None:
    client = Client(ws_url(worker))
    async with running(client) as events:
        await events.connected()
    assert client.state == State.CLOSED
    # Closed with 1000 by us, and no reconnect: the last event is the final state.
    assert events.events[-1] == StateChanged(State.CLOSED, 1000, "closed by the client")
    assert len(events.of(Welcome)) == 1
    await client.close()  # closing again is harmless
    with pytest.raises(RuntimeError):
        client.start()


async def test_a_1008_close_from_the_worker_is_final(worker: Worker) -> None:
    # Simple mode refuses a bad channel name with an error frame and 1008.
    client = Client(f"{worker.ws}/ws/bad%20name", min_delay=0.01)
    async with running(client) as events:
        closed = await events.wait_state(State.CLOSED)
        assert closed.code == 1008
        assert events.of(ServerError)[0].code == "invalid_channel"
        assert State.RECONNECTING not in [e.state for e in events.of(StateChanged)]
        with pytest.raises(NotConnected):
            await client.wait_connected(1)


# -- against several workers: reconnect and resubscribe -----------------------------------


async def _two_workers(
    make_worker: WorkerFactory, server: RedisServer, prefix: str
) -> list[Worker]:
    args = redis_args(server, prefix, "--shutdown-timeout", "2")
    first, second = make_worker(*args, start=False), make_worker(*args, start=False)
    for worker in (first, second):
        worker.start(wait_ready=False)
    for worker in (first, second):
        await asyncio.to_thread(worker.wait_ready)
    return [first, second]


@pytest.mark.parametrize(
    ("signum", "code"), [(signal.SIGTERM, 1012), (signal.SIGKILL, 1006)], ids=["sigterm", "sigkill"]
)
async def test_reconnects_to_the_next_worker_and_resubscribes_with_since(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str, signum: int, code: int
) -> None:
    channel = unique("move")
    first, second = await _two_workers(make_worker, redis_server, prefix)
    async with running(Client([ws_url(first), ws_url(second)])) as events:
        client = await events.connected()
        first_worker = client.worker
        subscribed = await client.subscribe(channel)
        assert subscribed.recovered is None
        before = await client.publish(channel, "before")
        await events.messages(channel, 1)

        mark = len(events.events)
        first.signal(signum)
        lost = await events.wait_state(State.RECONNECTING, after=mark, timeout=20)
        assert lost.code == code
        assert lost.delay is not None
        if code == 1012:
            assert 0.0 <= lost.delay <= 0.25  # the worker is restarting: go elsewhere now
        else:
            assert 0.125 <= lost.delay <= 0.25
        await events.wait_state(State.OPEN, after=mark, timeout=20)
        assert client.worker != first_worker
        # Resubscribed with `since` (the server answers `recovered` only to that): the
        # last id seen, `before`, or the position the server gave after it.
        again = await events.wait(lambda e: isinstance(e, Subscribed), after=mark)
        assert isinstance(again, Subscribed)
        assert again.channel == channel
        assert again.recovered is not None
        if again.recovered is False:
            assert Lost(channel, "not_recovered") in events.events[mark:]

        after = await client.publish(channel, "after")
        assert await events.messages(channel, 2) == ["before", "after"]
        assert [m.id for m in events.of(Message)] == [before, after]
    assert [e.worker for e in events.of(Welcome)] == [first_worker, client.worker]
    assert [e.state for e in events.of(StateChanged)] == [
        State.CONNECTING,
        State.OPEN,
        State.RECONNECTING,
        State.CONNECTING,
        State.OPEN,
        State.CLOSED,
    ]


# -- against scripted servers: the reconnect policy -------------------------------------


async def test_1012_retries_at_once() -> None:
    async with fake_server(closing_with(1012)) as fake, running(Client(fake.url)) as events:
        await events.wait(lambda e: isinstance(e, Welcome) and e.worker == "fake:1")
        retry = events.of(StateChanged)[2]
        assert (retry.state, retry.code) == (State.RECONNECTING, 1012)
        assert retry.delay is not None
        assert 0.0 <= retry.delay <= 0.25
        assert fake.attempts[1] - fake.attempts[0] < 1.0 * UNIT


async def test_1013_waits_at_least_half_a_second() -> None:
    async with fake_server(closing_with(1013)) as fake, running(Client(fake.url)) as events:
        await events.wait(lambda e: isinstance(e, Welcome) and e.worker == "fake:1")
        retry = events.of(StateChanged)[2]
        assert (retry.state, retry.code) == (State.RECONNECTING, 1013)
        assert retry.delay is not None
        assert 0.5 <= retry.delay <= 1.0
        assert fake.attempts[1] - fake.attempts[0] >= 0.5


async def test_backoff_grows_while_attempts_fail_and_restarts_after_welcome() -> None:
    # Five connections that close before any welcome, then one that welcomes and closes,
    # then one that stays.
    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        if index < 5:
            await ws.close(1011, "not yet")
        elif index == 5:
            await welcome(ws, index)
            await ws.close(1011, "once more")
        else:
            await welcome(ws, index)
            await ws.wait_closed()

    async with fake_server(script) as fake:
        client = Client(fake.url, min_delay=0.01, max_delay=0.1)
        async with running(client) as events:
            await events.wait(lambda e: isinstance(e, Welcome) and e.worker == "fake:6")
            delays = [e.delay for e in events.of(StateChanged) if e.state == State.RECONNECTING]
            assert len(delays) == 6
            ceilings = [0.01, 0.02, 0.04, 0.08, 0.1, 0.01]  # the count restarts after welcome
            for delay, ceiling in zip(delays, ceilings, strict=True):
                assert delay is not None
                assert ceiling / 2 <= delay <= ceiling
            gaps = [b - a for a, b in zip(fake.attempts, fake.attempts[1:], strict=False)]
            for gap, delay in zip(gaps, delays, strict=True):
                assert delay is not None
                assert gap >= delay


@pytest.mark.parametrize("code", [1001, 1005, 1006, 1011, 1012, 1013, 1014])
async def test_codes_that_reconnect(code: int) -> None:
    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        if index > 0:
            await ws.wait_closed()
        elif code == 1006:
            ws.transport.abort()  # no close frame at all
        elif code == 1005:
            await ws.close(None)  # a close frame without a code
        else:
            await ws.close(code)

    async with fake_server(script) as fake, running(Client(fake.url, min_delay=0.01)) as events:
        await events.wait(lambda e: isinstance(e, Welcome) and e.worker == "fake:1")
        assert events.of(StateChanged)[2].code == code


@pytest.mark.parametrize("code", [1000, 1002, 1008, 1009, 4000])
async def test_codes_that_stop(code: int) -> None:
    async with fake_server(closing_with(code)) as fake:
        client = Client(fake.url, min_delay=0.01)
        async with running(client) as events:
            closed = await events.wait_state(State.CLOSED)
            assert (closed.code, closed.reason) == (code, "scripted")
            assert client.state == State.CLOSED
            # The client's task has ended (so no later attempt can come): the event
            # stream is over and only one connection was ever made.
            await async_wait_for(_true_when(lambda: events.ended), 5, what="end of events")
            assert len(fake.attempts) == 1
            assert [e.state for e in events.of(StateChanged)] == [
                State.CONNECTING,
                State.OPEN,
                State.CLOSED,
            ]


async def test_a_server_that_never_says_welcome_is_left_for_the_next_url() -> None:
    async def mute(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await ws.wait_closed()

    async def welcoming(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        await ws.wait_closed()

    async with (
        fake_server(mute) as silent,
        fake_server(welcoming) as good,
        running(Client([silent.url, good.url], open_timeout=0.3)) as events,
    ):
        await events.wait(lambda e: isinstance(e, Welcome))
        dropped = events.of(StateChanged)[1]
        assert (dropped.state, dropped.code, dropped.reason) == (
            State.RECONNECTING,
            1006,
            "no welcome in time",
        )
        assert events.client.state == State.OPEN
        assert len(silent.attempts) == 1


async def test_urls_rotate_on_each_reconnect() -> None:
    script = closing_with(1012, then_stay=False)
    async with (
        fake_server(script) as a,
        fake_server(script) as b,
        running(Client([a.url, b.url])) as events,
    ):
        await async_wait_for(_true_when(lambda: len(a.attempts) >= 2 and len(b.attempts) >= 2), 10)
    merged = sorted([(t, "a") for t in a.attempts] + [(t, "b") for t in b.attempts])
    assert [name for _, name in merged][:4] == ["a", "b", "a", "b"]
    assert events.of(Welcome)[:2] == [Welcome("fake:0"), Welcome("fake:0")]


# -- against scripted servers: resume bookkeeping and replies ----------------------------


async def test_resubscribes_with_the_last_message_id_and_reports_what_was_not_recovered() -> None:
    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        frames = [await server.recv(ws, index) for _ in range(2)]
        for frame in frames:
            channel = frame["channel"]
            if index == 0:
                reply = {"type": "subscribed", "channel": channel, "position": "e:5"}
            else:
                recovered = channel == "read"
                reply = {"type": "subscribed", "channel": channel, "position": frame["since"]}
                reply["recovered"] = recovered
            await send(ws, {**reply, "ref": frame["ref"]})
        if index == 0:
            await send(ws, {"type": "message", "channel": "read", "id": "e:6", "data": 6})
            await ws.close(1012)
        else:
            await ws.wait_closed()

    async with fake_server(script) as fake, running(Client(fake.url)) as events:
        client = await events.connected()
        first = await asyncio.gather(client.subscribe("read"), client.subscribe("quiet"))
        assert first == [Subscribed("read", None, "e:5"), Subscribed("quiet", None, "e:5")]
        await events.wait(lambda e: isinstance(e, Welcome) and e.worker == "fake:1")
        await events.wait(lambda e: isinstance(e, Lost))
    # The channel that saw a message resumes after it; the other after the position.
    since = {frame["channel"]: frame.get("since") for frame in fake.received[1]}
    assert since == {"read": "e:6", "quiet": "e:5"}
    assert "since" not in fake.received[0][0]
    assert events.of(Lost) == [Lost("quiet", "not_recovered")]
    assert Subscribed("read", True, "e:6") in events.events


async def test_resubscribe_without_any_known_id_counts_as_not_recovered() -> None:
    # A server that sends no position: after a reconnect nothing says what was missed.
    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        frame = await server.recv(ws, index)
        await send(ws, {"type": "subscribed", "channel": frame["channel"], "ref": frame["ref"]})
        if index == 0:
            await ws.close(1001)
        else:
            await ws.wait_closed()

    async with fake_server(script) as fake, running(Client(fake.url, min_delay=0.01)) as events:
        client = await events.connected()
        await client.subscribe("c")
        await events.wait(lambda e: isinstance(e, Lost))
    assert "since" not in fake.received[1][0]
    assert events.of(Lost) == [Lost("c", "not_recovered")]


async def test_a_gap_frame_is_reported_in_place_and_messages_pass_as_they_come() -> None:
    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        frame = await server.recv(ws, index)
        await send(ws, {"type": "subscribed", "channel": "c", "ref": frame["ref"]})
        # Out of order and repeated on purpose: the client must not hide server bugs.
        for frame in [
            {"type": "message", "channel": "c", "id": "2", "data": "b"},
            {"type": "gap", "channel": "c"},
            {"type": "message", "channel": "c", "id": "1", "data": "a"},
            {"type": "message", "channel": "c", "id": "1", "data": "a"},
            {"type": "mystery", "channel": "c"},  # unknown frames are ignored
        ]:
            await send(ws, frame)
        await ws.wait_closed()

    async with fake_server(script) as fake, running(Client(fake.url)) as events:
        client = await events.connected()
        await client.subscribe("c")
        await events.messages("c", 3)
        seen = [e for e in events.events if isinstance(e, Message | Lost)]
        assert seen == [
            Message("c", "2", "b"),
            Lost("c", "gap"),
            Message("c", "1", "a"),
            Message("c", "1", "a"),
        ]
    assert len(fake.attempts) == 1


async def test_unavailable_subscribe_is_retried_on_the_same_connection() -> None:
    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        for attempt in range(3):
            frame = await server.recv(ws, index)
            if attempt < 2:
                error = {"type": "error", "code": "unavailable", "message": "redis is down"}
                await send(ws, {**error, "ref": frame["ref"]})
            else:
                await send(ws, {"type": "subscribed", "channel": "c", "ref": frame["ref"]})
        await ws.wait_closed()

    async with fake_server(script) as fake, running(Client(fake.url, min_delay=0.2)) as events:
        client = await events.connected()
        started = time.monotonic()
        assert await client.subscribe("c") == Subscribed("c")
        # Two retries: at least 0.1 s, then at least 0.2 s (jitter halves at most).
        assert time.monotonic() - started >= 0.3
        assert [e.code for e in events.of(ServerError)] == ["unavailable", "unavailable"]
    assert len(fake.attempts) == 1
    assert [f["type"] for f in fake.received[0]] == ["subscribe"] * 3
    assert len({f["ref"] for f in fake.received[0]}) == 3


async def test_publish_fails_with_connection_lost_when_the_connection_closes_first() -> None:
    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        await welcome(ws, index)
        if index == 0:
            await server.recv(ws, index)
            await ws.close(1011)
        else:
            await ws.wait_closed()

    async with fake_server(script) as fake, running(Client(fake.url, min_delay=0.01)) as events:
        client = await events.connected()
        with pytest.raises(ConnectionLost) as lost:
            await client.publish("c", {"n": 1})
        assert lost.value.code == "connection_lost"
        await client.wait_connected(10 * UNIT)  # and it reconnects
    assert fake.received[0][0]["data"] == {"n": 1}


# -- tokens: against a worker with auth on ------------------------------------------------

# HS256 needs 32 bytes at least; API keys 16 characters.
JWT_SECRET = "python-client-tests-jwt-secret-0123456789abcdefghij"
API_KEY = "python-client-tests-api-key"


def make_token(
    sub: str = "ann", ttl: float = 60.0, *, patterns: tuple[str, ...] = ("tok*",), key: str = ""
) -> str:
    """A JWT the auth worker accepts (unless `ttl` <= 0 or `key` is another secret)."""
    claims = {
        "sub": sub,
        "exp": int(time.time() + ttl),
        "channels": {"subscribe": list(patterns), "publish": list(patterns)},
    }
    return jwt.encode(claims, key or JWT_SECRET, algorithm="HS256")


def exp_of(token: str) -> float:
    return float(jwt.decode(token, options={"verify_signature": False})["exp"])


@pytest.fixture(scope="module")
def auth_worker(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    """A worker with auth on: tokens signed with JWT_SECRET, no leeway; HTTP with API_KEY."""
    worker = Worker(
        tmp_path_factory.mktemp("auth-worker"),
        redis_args(
            redis_server,
            unique("a") + ":",
            "--jwt-secret",
            JWT_SECRET,
            # Tokens lapse on the dot, so that a test can wait for one to expire.
            "--jwt-leeway",
            "0",
            "--api-keys",
            json.dumps([API_KEY]),
        ),
    )
    worker.start()
    yield worker
    worker.stop()


async def publish_with_key(worker: Worker, channel: str, data: Any) -> str:
    """Publish over the HTTP API as a backend does, with the API key."""
    return await worker.publish_async(channel, data, API_KEY)


def refusals(worker: Worker, reason: str) -> int:
    """How many handshakes the worker has refused for `reason` so far (from its log)."""
    return worker.log().count(f"WebSocket refused: {reason}")


async def test_a_token_opens_the_connection_and_its_claim_applies(auth_worker: Worker) -> None:
    channel = unique("tok")
    async with running(Client(ws_url(auth_worker), token=make_token())) as events:
        client = await events.connected()
        await client.subscribe(channel)
        sent = await publish_with_key(auth_worker, channel, "hi")
        own = await client.publish(channel, "me too")
        assert await events.messages(channel, 2) == ["hi", "me too"]
        assert [m.id for m in events.of(Message)] == [sent, own]
        with pytest.raises(ClientError) as forbidden:
            await client.subscribe(unique("other"))  # not in the token's `channels`
        assert forbidden.value.code == "forbidden"
        assert client.state == State.OPEN


async def test_refresh_returns_the_new_expiry_and_refusals_raise(auth_worker: Worker) -> None:
    fresh = make_token(ttl=600)
    async with running(Client(ws_url(auth_worker), token=make_token())) as events:
        client = await events.connected()
        assert await client.refresh(fresh) == exp_of(fresh)
        bad = {
            "another subject": make_token("bob"),
            "another key": make_token(key="another-secret-" + "y" * 40),
            "expired": make_token(ttl=-60),
            "not a JWT": "not.a.jwt",
        }
        for what, token in bad.items():
            with pytest.raises(ClientError) as refused:
                await client.refresh(token)
            assert refused.value.code == "invalid_token", what
        # Refusals leave the connection as it was.
        channel = unique("tok")
        await client.subscribe(channel)
        await client.publish(channel, "still open")
        assert client.state == State.OPEN
        # Without an argument: the fixed token, which is now the refreshed one.
        assert await client.refresh() == exp_of(fresh)
    assert len(events.of(Welcome)) == 1
    with pytest.raises(NotConnected):
        await client.refresh(fresh)


async def test_refresh_without_a_token_asks_the_provider(auth_worker: Worker) -> None:
    issued: list[str] = []

    async def provider() -> str:
        issued.append(make_token(ttl=60 + 100 * len(issued)))
        return issued[-1]

    async with running(Client(ws_url(auth_worker), token=provider)) as events:
        client = await events.connected()
        assert len(issued) == 1
        assert await client.refresh() == exp_of(issued[1])
    assert len(issued) == 2


async def test_an_expired_token_is_renewed_by_reconnecting_and_resuming(
    auth_worker: Worker,
) -> None:
    channel = unique("tok")
    calls = 0
    away: list[str] = []

    async def provider() -> str:
        nonlocal calls
        calls += 1
        if calls == 2:
            # Called for the reconnect: the client is between connections, so these can
            # reach it only by resuming with `since`.
            away.extend([await publish_with_key(auth_worker, channel, n) for n in (1, 2)])
        # The first token lapses in 1 to 2 s (`exp` is in whole seconds).
        return make_token(ttl=2 if calls == 1 else 60)

    client = Client(ws_url(auth_worker), token=provider, min_delay=0.05)
    async with running(client) as events:
        await events.connected()
        await client.subscribe(channel)
        before = await publish_with_key(auth_worker, channel, 0)
        await events.messages(channel, 1)
        expired = await events.wait_state(State.RECONNECTING)
        assert (expired.code, expired.reason) == (1008, "token expired")
        await events.wait(lambda e: isinstance(e, Subscribed) and e.recovered is not None)
        after = await publish_with_key(auth_worker, channel, 3)
        assert await events.messages(channel, 4) == [0, 1, 2, 3]
        assert [m.id for m in events.of(Message)] == [before, *away, after]
        assert [s.recovered for s in events.of(Subscribed)] == [None, True]
        assert events.of(Lost) == []
        assert [e.state for e in events.of(StateChanged)] == [
            State.CONNECTING,
            State.OPEN,
            State.RECONNECTING,
            State.CONNECTING,
            State.OPEN,
        ]
    assert calls == 2


async def test_a_fixed_token_that_expires_ends_the_client(auth_worker: Worker) -> None:
    async with running(Client(ws_url(auth_worker), token=make_token(ttl=2))) as events:
        await events.connected()
        closed = await events.wait_state(State.CLOSED)
        assert (closed.code, closed.reason) == (1008, "token expired")
        assert [e.state for e in events.of(StateChanged)] == [
            State.CONNECTING,
            State.OPEN,
            State.CLOSED,
        ]


@pytest.mark.parametrize(
    ("token", "reason"),
    [(make_token(ttl=-60), "token expired"), (None, "token required")],
    ids=["expired", "none"],
)
async def test_a_refused_handshake_without_a_provider_is_final(
    auth_worker: Worker, token: str | None, reason: str
) -> None:
    already = refusals(auth_worker, reason)
    client = Client(ws_url(auth_worker), token=token, min_delay=0.01)
    async with running(client) as events:
        closed = await events.wait_state(State.CLOSED)
        assert closed.code == 1008
        assert "HTTP 403" in closed.reason
        await async_wait_for(_true_when(lambda: events.ended), 5, what="end of events")
        assert [e.state for e in events.of(StateChanged)] == [State.CONNECTING, State.CLOSED]
        with pytest.raises(NotConnected):
            await client.wait_connected(1)
    assert refusals(auth_worker, reason) == already + 1  # one attempt, no retry loop


async def test_a_refused_handshake_with_a_provider_is_retried(auth_worker: Worker) -> None:
    tokens = iter([make_token(ttl=-60), make_token()])
    client = Client(ws_url(auth_worker), token=lambda: next(tokens), min_delay=0.01)
    async with running(client) as events:
        await events.connected()
        states = events.of(StateChanged)
        assert [e.state for e in states] == [
            State.CONNECTING,
            State.RECONNECTING,
            State.CONNECTING,
            State.OPEN,
        ]
        assert states[1].code is None  # a failed attempt, retried with backoff
        assert "HTTP 403" in states[1].reason


async def test_the_provider_is_called_before_every_attempt_and_sent_as_a_bearer() -> None:
    seen: list[str | None] = []

    async def script(index: int, ws: ServerConnection, server: FakeServer) -> None:
        assert ws.request is not None
        seen.append(ws.request.headers.get("Authorization"))
        await closing_with(1012)(index, ws, server)

    count = itertools.count(1)

    async def provider() -> str:
        await asyncio.sleep(0)  # an async provider is awaited
        return f"token-{next(count)}"

    async with fake_server(script) as fake, running(Client(fake.url, token=provider)) as events:
        await events.wait(lambda e: isinstance(e, Welcome) and e.worker == "fake:1")
    assert seen == ["Bearer token-1", "Bearer token-2"]


async def test_a_failing_provider_is_a_failed_attempt() -> None:
    calls = itertools.count()

    def provider() -> str:
        if next(calls) == 0:
            raise RuntimeError("the auth backend is down")
        return "good"

    async with (
        fake_server(closing_with(1000)) as fake,
        running(Client(fake.url, token=provider, min_delay=0.01)) as events,
    ):
        await events.wait_state(State.CLOSED)
        failed = events.of(StateChanged)[1]
        assert (failed.state, failed.code) == (State.RECONNECTING, None)
        assert "the auth backend is down" in failed.reason
        assert len(fake.attempts) == 1
