"""The canary's decisions, driven through its interface (no Redis: pure logic)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from service.broker.canary import Canary
from tests.helpers import async_wait_for


class Harness:
    """Plays the backend: counts generations, echoes or drops nonces, records verdicts."""

    def __init__(self, *, receivers: int = 1, echo: bool = True) -> None:
        self.receivers = receivers
        self.echo = echo
        self.generation: int | None = 1
        self.on_publish: Callable[[], None] = lambda: None
        self.deaf: list[str] = []
        self.heard = 0
        self.canary = Canary(
            interval=60,
            timeout=0.05,
            publish=self.publish,
            generation=lambda: self.generation,
            on_deaf=self.record_deaf,
            on_heard=self.record_heard,
        )

    async def publish(self, nonce: bytes) -> int:
        self.on_publish()
        if self.echo:
            asyncio.get_running_loop().call_soon(self.canary.heard, nonce)
        return self.receivers

    async def record_deaf(self, reason: str) -> None:
        self.deaf.append(reason)

    def record_heard(self) -> None:
        self.heard += 1


async def test_an_echo_is_a_healthy_round_trip() -> None:
    harness = Harness()
    await harness.canary.check()
    assert (harness.deaf, harness.heard, harness.canary.checks) == ([], 1, 1)


async def test_no_echo_is_deafness() -> None:
    harness = Harness(echo=False)
    await harness.canary.check()
    assert harness.deaf == ["own canary not heard back within 0.05 s"]
    assert harness.heard == 0


async def test_no_receivers_is_deafness() -> None:
    harness = Harness(receivers=0, echo=False)
    await harness.canary.check()
    assert harness.deaf == ["Redis holds no subscription for this worker"]


@pytest.mark.parametrize("receivers", [0, 1])
async def test_a_reconnect_during_the_check_is_inconclusive(receivers: int) -> None:
    harness = Harness(receivers=receivers, echo=False)

    def reconnect() -> None:
        harness.generation = 2

    harness.on_publish = reconnect
    await harness.canary.check()
    assert (harness.deaf, harness.heard) == ([], 0)


async def test_no_check_while_not_connected() -> None:
    harness = Harness(echo=False)
    harness.generation = None
    published: list[bool] = []
    harness.on_publish = lambda: published.append(True)
    await harness.canary.check()
    assert (published, harness.deaf, harness.heard) == ([], [], 0)


async def test_a_stale_echo_does_not_count() -> None:
    harness = Harness(echo=False)
    harness.canary.heard(b"an old nonce")
    await harness.canary.check()
    assert len(harness.deaf) == 1


async def test_check_soon_runs_a_check_before_the_interval() -> None:
    harness = Harness()
    runner = asyncio.create_task(harness.canary.run())
    harness.canary.check_soon()
    try:
        await async_wait_for(lambda: _true(harness.heard > 0), what="an early check")
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)


async def _true(value: bool) -> bool:
    return value
