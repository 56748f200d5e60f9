"""What the failover tests (Sentinel, Cluster) share: a subscriber's record, a patient publisher.

What must hold through a failover: every subscriber gets every message once and in
order, or a `gap` frame where it may have lost some.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.helpers import UNIT, Client, Worker, async_wait_for

# The worker gives up on Redis after BROKER_TIMEOUT; a failover takes the nodes' failure
# detection (1 s in these tests) and an election: publishes are retried for this long.
PUBLISH_DEADLINE = 30.0


def epoch(message_id: str) -> str:
    return message_id.rpartition(":")[0]


class Reader:
    """A subscriber's frames, read as they come: ("message", counter, id) or ("gap",)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.items: list[tuple[Any, ...]] = []
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            frame = await self.client.recv(timeout=60)
            if frame["type"] == "message":
                self.items.append(("message", frame["data"], frame["id"]))
            elif frame["type"] == "gap":
                self.items.append(("gap",))

    def counters(self) -> list[int]:
        return [item[1] for item in self.items if item[0] == "message"]

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()


async def publish_until_acked(http: httpx.AsyncClient, worker: Worker, channel: str, n: int) -> str:
    """Publish counter `n` with an idempotency key, retrying what says to; its id."""
    url = f"{worker.http}/api/channels/{channel}/messages"
    deadline = asyncio.get_running_loop().time() + PUBLISH_DEADLINE * UNIT
    while True:
        try:
            response = await http.post(
                url, json={"data": n}, headers={"Idempotency-Key": f"{channel}-{n}"}
            )
            if response.status_code == 200:
                return str(response.json()["id"])
            assert response.status_code in (503, 504), response.text
        except httpx.TransportError:
            pass
        assert asyncio.get_running_loop().time() < deadline, f"publish {n} never taken"
        await asyncio.sleep(0.05)


def check_told_where_it_lost(name: str, reader: Reader, acked: list[int]) -> None:
    """Every acknowledged counter once and in order, except where a `gap` says otherwise.

    Between two `gap` frames (and before the first, after the last) the counters a
    subscriber got are increasing, with every acknowledged one between them present.
    """
    segments: list[list[int]] = [[]]
    for item in reader.items:
        if item[0] == "gap":
            segments.append([])
        else:
            segments[-1].append(item[1])
    for segment in segments:
        assert segment == sorted(set(segment)), f"{name}: out of order or twice: {segment}"
        if segment:
            expected = [n for n in acked if segment[0] <= n <= segment[-1]]
            missing = sorted(set(expected) - set(segment))
            assert not missing, f"{name}: lost {missing} with no gap frame"
    # Subscribed before the first publish, and read until the last one came.
    assert segments[0][:1] == [acked[0]], f"{name}: the first messages lost with no gap frame"
    assert segments[-1][-1:] == [acked[-1]], f"{name}: the last message missing"


async def check_every_reader(readers: list[Reader], acked: list[int]) -> None:
    """Each reader got the last acknowledged message, and lost nothing without a `gap`."""
    last = acked[-1]
    for index, reader in enumerate(readers):
        await async_wait_for(
            lambda reader=reader: last in reader.counters(),  # type: ignore[misc]
            timeout=20,
            what=f"message {last} at the subscriber on worker {index}: got {reader.items}",
        )
    for index, reader in enumerate(readers):
        check_told_where_it_lost(f"subscriber on worker {index}", reader, acked)


async def check_resume(
    worker: Worker, channel: str, since: str, ids: dict[int, str], acked: list[int]
) -> None:
    """A client resuming from `since` on `worker` is told it lost some, or gets all after it."""
    back = await Client.connect(worker.ws + "/ws")
    try:
        await back.welcome()
        await back.send({"type": "subscribe", "channel": channel, "since": since})
        subscribed = await back.recv_type("subscribed", timeout=10)
        if subscribed["recovered"]:
            # Told that nothing is missing: then every later message must come.
            held = int(next(k for k, v in ids.items() if v == since))
            last = acked[-1]
            got = [(await back.recv_type("message"))["data"] for _ in range(last - held)]
            assert got == list(range(held + 1, last + 1))
        else:
            # Not recovered: where its messages start now is said all the same.
            assert subscribed["position"]
    finally:
        await back.close()
