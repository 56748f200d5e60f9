"""Keepalive pings on a grid shared by a worker's connections (service/adapters/ticks.py).

The adapter's protocol keeps uvicorn's keepalive (a ping every WS_PING_INTERVAL, close
1011 without its pong within WS_PING_TIMEOUT) but puts the deadlines on a grid of ticks,
one event-loop timer per tick, instead of two timers per connection.
"""

from __future__ import annotations

import asyncio
import gc
import math
import weakref
from typing import Any

import pytest
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from service.adapters import uvicorn as adapter
from service.adapters.ticks import Ticks
from service.adapters.uvicorn import (
    KeepaliveDue,
    ReadingProtocol,
    hold_keepalive_while,
    keepalive_grid,
    keepalive_tick,
)
from tests.helpers import async_wait_for
from tests.unit.test_wire import close_code, open_protocol


class Member:
    def __init__(self, name: str, told: list[str]) -> None:
        self.name = name
        self.told = told

    def tick(self) -> None:
        self.told.append(self.name)


async def test_members_due_in_one_tick_are_told_together_and_never_early() -> None:
    loop = asyncio.get_running_loop()
    ticks = Ticks(0.05)
    told: list[str] = []
    # Two deadlines inside one tick (the grid's ticks are multiples of 0.05 s).
    base = math.ceil(loop.time() / 0.05) * 0.05 + 0.05
    first = ticks.add(base + 0.01, Member("a", told))
    assert ticks.add(base + 0.02, Member("b", told)) == first
    ticks.add(base + 0.2, Member("c", told))
    await async_wait_for(lambda: len(told) >= 2, 2, "the first tick")
    assert sorted(told) == ["a", "b"]
    assert loop.time() >= base + 0.02
    await async_wait_for(lambda: len(told) >= 3, 2, "the later tick")
    assert told[2] == "c"
    assert loop.time() >= base + 0.2
    assert ticks.pending() == 0


async def test_a_discarded_member_is_not_told_and_a_failing_one_stops_no_other() -> None:
    loop = asyncio.get_running_loop()
    reported: list[object] = []
    loop.set_exception_handler(lambda _, context: reported.append(context["exception"]))
    ticks = Ticks(0.02)
    told: list[str] = []
    gone = Member("gone", told)

    class Broken:
        def tick(self) -> None:
            raise RuntimeError("broken")

    when = loop.time() + 0.01
    tick = ticks.add(when, gone)
    ticks.add(when, Broken())
    ticks.add(when, Member("kept", told))
    ticks.discard(tick, gone)
    ticks.discard(tick + 100, gone)  # not due then: nothing
    await async_wait_for(lambda: ticks.pending() == 0, 2, "the tick")
    assert told == ["kept"]
    assert [str(exc) for exc in reported] == ["broken"]


def pong_for(written: bytearray) -> bytes:
    """The masked pong a client answers the last ping in `written` with."""
    head = written.rfind(b"\x89\x04")
    assert head >= 0, "no ping written"
    client = ClientProtocol(parse_uri("ws://test/ws"))
    client.state = State.OPEN
    client.send_pong(bytes(written[head + 2 : head + 6]))
    return b"".join(client.data_to_send())


async def ticked(protocol: ReadingProtocol, due: KeepaliveDue | None) -> None:
    """Wait until the protocol's keepalive waits for `due` (None: nothing)."""
    await async_wait_for(lambda: protocol._keepalive is due, 2, f"waiting for {due}")


async def test_pings_pongs_and_a_missing_pong_close_1011() -> None:
    protocol, transport = await open_protocol(ws_ping_interval=0.2, ws_ping_timeout=0.2)
    assert protocol._keepalive is KeepaliveDue.PING
    assert protocol.ping_timer is None  # not uvicorn's own timer
    await ticked(protocol, KeepaliveDue.PONG)
    assert protocol.pending_ping_payload is not None
    protocol.data_received(pong_for(transport.written))
    assert protocol._keepalive is KeepaliveDue.PING
    assert protocol.pending_ping_payload is None
    # The next ping, left unanswered: closed with 1011 once the timeout has passed.
    await ticked(protocol, KeepaliveDue.PONG)
    pinged = protocol.ping_sent_at
    await ticked(protocol, None)
    assert transport.closing
    assert close_code(transport.written) == 1011
    assert asyncio.get_running_loop().time() - pinged >= 0.2


async def test_a_stale_pong_leaves_the_deadline_and_the_round_trip_shortens_the_wait() -> None:
    protocol, transport = await open_protocol(ws_ping_interval=30, ws_ping_timeout=30)
    protocol.tick()  # a ping
    stale = pong_for(transport.written)
    tick = protocol._keepalive_tick
    protocol.tick()  # timed out: closed, so use a fresh connection for the rest
    protocol, transport = await open_protocol(ws_ping_interval=30, ws_ping_timeout=30)
    protocol.tick()
    tick = protocol._keepalive_tick
    protocol.data_received(stale)  # another ping's payload
    assert protocol._keepalive is KeepaliveDue.PONG
    assert protocol._keepalive_tick == tick
    protocol.last_ping_rtt = 10.0
    protocol.data_received(pong_for(transport.written))
    assert protocol._keepalive is KeepaliveDue.PING
    # Due one interval less the last round trip on (uvicorn's rule), within a tick.
    due = protocol._keepalive_tick * keepalive_tick(30)
    now = asyncio.get_running_loop().time()
    assert now + 30 - protocol.last_ping_rtt - 0.01 <= due <= now + 30 + keepalive_tick(30)


async def test_without_a_ping_timeout_pings_go_on_and_a_pong_adds_none() -> None:
    protocol, transport = await open_protocol(ws_ping_interval=30, ws_ping_timeout=None)
    protocol.tick()
    assert transport.written.count(b"\x89\x04") == 1
    assert protocol._keepalive is KeepaliveDue.PING  # the next, not a deadline
    grid = keepalive_grid(asyncio.get_running_loop(), 30)
    waiting = grid.pending()
    protocol.data_received(pong_for(transport.written))
    assert protocol._keepalive is KeepaliveDue.PING
    assert grid.pending() == waiting


async def test_a_closing_connection_is_not_pinged_and_leaves_the_grid() -> None:
    protocol, transport = await open_protocol(ws_ping_interval=0.2, ws_ping_timeout=0.2)
    grid = keepalive_grid(asyncio.get_running_loop(), 0.2)
    assert grid.pending() == 1
    transport.closing = True
    written = len(transport.written)
    await ticked(protocol, None)  # its tick came
    assert len(transport.written) == written  # and sent no ping
    assert grid.pending() == 0
    other, _ = await open_protocol(ws_ping_interval=0.2, ws_ping_timeout=0.2)
    assert grid.pending() == 1
    other.shutdown()  # a server shutting down (close 1012)
    assert other._keepalive is None
    assert grid.pending() == 0


def test_a_grid_does_not_keep_its_event_loop_alive() -> None:
    async def one_connection() -> weakref.ref[asyncio.AbstractEventLoop]:
        protocol, _ = await open_protocol(ws_ping_interval=30, ws_ping_timeout=30)
        loop = asyncio.get_running_loop()
        other = asyncio.new_event_loop()
        assert keepalive_grid(loop, 30) is not keepalive_grid(other, 30)  # one per loop
        other.close()
        protocol.connection_lost(None)
        return weakref.ref(loop)

    loop = asyncio.run(one_connection())
    gc.collect()
    assert loop() is None


async def test_a_connection_that_ends_leaves_nothing_on_the_grid() -> None:
    protocol, _ = await open_protocol(ws_ping_interval=30, ws_ping_timeout=30)
    grid = keepalive_grid(asyncio.get_running_loop(), 30)
    assert grid.interval == keepalive_tick(30) == 0.5
    assert grid.pending() == 1
    protocol.connection_lost(None)
    assert grid.pending() == 0
    assert protocol._keepalive is None


async def test_connections_share_one_grid_and_its_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    # uvicorn's keepalive made a loop timer per connection for each ping and each pong.
    loop = asyncio.get_running_loop()
    grid = keepalive_grid(loop, 40)
    timers: list[float] = []
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        timers.append(when)
        return call_at(when, callback, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", counted)
    protocols = [
        (await open_protocol(ws_ping_interval=40, ws_ping_timeout=40))[0] for _ in range(50)
    ]
    assert grid.pending() == 50
    assert 1 <= len(timers) <= 2  # their pings fall due within a tick or two
    for protocol in protocols:
        protocol.connection_lost(None)
    assert grid.pending() == 0


async def test_while_the_worker_is_busy_a_ping_waits_tick_by_tick_until_it_is_not() -> None:
    loop = asyncio.get_running_loop()
    busy = True
    hold_keepalive_while(loop, lambda: busy)
    try:
        protocol, transport = await open_protocol(ws_ping_interval=0.2, ws_ping_timeout=0.2)
        first = protocol._keepalive_tick
        await async_wait_for(
            lambda: protocol._keepalive_tick >= first + 3, 2, "the ping to be held a few ticks"
        )
        assert b"\x89\x04" not in transport.written
        assert protocol._keepalive is KeepaliveDue.PING
        assert keepalive_grid(loop, 0.2).pending() == 1  # moved on, not copied
        busy = False
        await ticked(protocol, KeepaliveDue.PONG)  # pinged at the next tick
        assert transport.written.count(b"\x89\x04") == 1
        protocol.data_received(pong_for(transport.written))
        assert protocol._held_since is None
    finally:
        hold_keepalive_while(loop, None)


async def test_a_worker_busy_for_ever_holds_a_ping_and_a_pong_deadline_only_so_long(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(adapter, "KEEPALIVE_HOLD", 0.1)
    loop = asyncio.get_running_loop()
    hold_keepalive_while(loop, lambda: True)
    try:
        opened = loop.time()
        protocol, transport = await open_protocol(ws_ping_interval=0.2, ws_ping_timeout=0.2)
        await ticked(protocol, KeepaliveDue.PONG)
        pinged = protocol.ping_sent_at
        assert pinged - opened >= 0.2 + 0.1 - 0.01  # its interval, then held 0.1 s
        await ticked(protocol, None)
        assert close_code(transport.written) == 1011
        assert loop.time() - pinged >= 0.2 + 0.1 - 0.01  # the timeout, then held too
    finally:
        hold_keepalive_while(loop, None)
