"""The default: `python -m service` with no settings, one worker on memory://."""

from __future__ import annotations

import httpx

from tests.conftest import WorkerFactory
from tests.helpers import Client, seq_of


async def test_default_worker_on_memory_serves_everything(make_worker: WorkerFactory) -> None:
    worker = make_worker()  # no flags: BROADCAST_URL defaults to memory://
    assert httpx.get(worker.http + "/readyz").json()["ready"] is True
    assert "Broadcast demo chat" in httpx.get(worker.http + "/").text
    a, b = await Client.connect(worker.ws + "/ws"), await Client.connect(worker.ws + "/ws")
    for client in (a, b):
        await client.welcome()
        await client.subscribe("lobby")
    published = await a.publish("lobby", {"text": "on memory"})
    http_id = worker.publish("lobby", "over http")
    for client in (a, b):
        first, second = await client.recv(), await client.recv()
        assert (first["id"], first["data"]) == (published["id"], {"text": "on memory"})
        assert (second["id"], second["data"]) == (http_id, "over http")
    assert seq_of(http_id) == seq_of(published["id"]) + 1
    for client in (a, b):
        await client.close()
