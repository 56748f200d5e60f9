"""The compose topology from real processes: redis-server, replicas of the worker, and
nginx with the shipped deploy/nginx.conf and its worker watcher (tests/nginx.py).

Workers are started the way docker-compose.yml starts them (`python -m service` with
the same settings, FORWARDED_ALLOW_IPS and all), each at its own loopback address on one
shared port, and nginx finds them by the name `worker` as it does in compose. Clients
connect through nginx only.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, async_playwright, expect

from service.client import Client, Lost, Subscribed
from tests.conftest import WorkerFactory
from tests.e2e.test_demo_browser import (
    CHROMIUM_ARGS,
    WAIT_MS,
    artifacts_dir,
    chromium,
    expect_chat_line,
    join,
    say,
)
from tests.e2e.test_resume import Publisher, Recorder
from tests.helpers import (
    UNIT,
    RedisServer,
    Worker,
    async_wait_for,
    free_port,
    redis_args,
    start_all,
    unique,
)
from tests.helpers import Client as ProtocolClient
from tests.nginx import Nginx, compose_worker_flags

pytestmark = pytest.mark.e2e


class Replicas:
    """The compose `worker` service: replicas at 127.0.0.2, .3, ... on one port."""

    def __init__(self, make_worker: WorkerFactory, args: list[str]) -> None:
        self.make_worker = make_worker
        self.args = args
        self.port = free_port()
        self.workers: list[Worker] = []

    def scale_up(self, count: int) -> list[Worker]:
        """Start replicas until there are `count`, side by side; the new ones."""
        new = [
            self.make_worker(*self.args, start=False, host=f"127.0.0.{n + 2}", port=self.port)
            for n in range(len(self.workers), count)
        ]
        start_all(new)
        self.workers += new
        return new

    def addresses(self) -> list[str]:
        return [worker.host for worker in self.workers]


@pytest.fixture
def replicas(make_worker: WorkerFactory, redis_server: RedisServer, prefix: str) -> Replicas:
    # Compose's workers, keeping 1000 messages of history instead of 100: the publisher
    # of the SIGTERM test does not pause while its client waits out a reconnect delay of
    # up to 0.25 s, in which it published up to about 160 messages here (some 550 a
    # second), past what the default history keeps. The resume then rightly reported a
    # loss (as test_resume.py's workers, which keep 1000 for the same reason, explain).
    flags = [*compose_worker_flags(), "--history-size", "1000"]
    return Replicas(make_worker, redis_args(redis_server, prefix, *flags))


@pytest.fixture
def topology(replicas: Replicas, tmp_path: Path) -> Iterator[tuple[Nginx, list[Worker]]]:
    replicas.scale_up(3)
    nginx = Nginx(tmp_path / "nginx", replicas.port, replicas.addresses()).start()
    try:
        yield nginx, replicas.workers
    finally:
        nginx.stop()


def worker_of(workers: list[Worker], worker_id: str | None) -> Worker:
    ids = {httpx.get(w.http + "/healthz", timeout=5).json()["worker"]: w for w in workers}
    return ids[worker_id]


def ids_of(workers: list[Worker]) -> set[str]:
    return {httpx.get(w.http + "/healthz", timeout=5).json()["worker"] for w in workers}


async def connect(nginx: Nginx, channel: str) -> tuple[ProtocolClient, str]:
    """A client through nginx, subscribed to `channel`; the worker it landed on."""
    client = await ProtocolClient.connect(nginx.ws + "/ws")
    worker = (await client.welcome())["worker"]
    await client.subscribe(channel)
    return client, worker


async def publish_through(nginx: Nginx, channel: str, count: int) -> list[str]:
    """Publish 0..count-1 over HTTP through nginx; their ids."""
    async with httpx.AsyncClient(base_url=nginx.http, timeout=10 * UNIT) as http:
        ids = []
        for n in range(count):
            response = await http.post(f"/api/channels/{channel}/messages", json={"data": n})
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
    return ids


async def test_clients_through_nginx_spread_over_the_workers_and_all_receive(
    topology: tuple[Nginx, list[Worker]],
) -> None:
    nginx, _ = topology
    channel = unique("lb")
    clients, landed = [], []
    for _ in range(12):
        client, worker = await connect(nginx, channel)
        clients.append(client)
        landed.append(worker)
    # least_conn hands each new long-lived connection to the least busy worker.
    assert sorted(landed.count(worker) for worker in set(landed)) == [4, 4, 4], landed
    ids = await publish_through(nginx, channel, 20)
    for client in clients:
        assert [(await client.recv(timeout=10))["id"] for _ in ids] == ids
    for client in clients:
        await client.close()


async def test_scaling_the_workers_reaches_new_ones_and_drops_gone_ones_without_a_restart(
    replicas: Replicas, tmp_path: Path
) -> None:
    """`docker compose up --scale worker=5`, then back to 3, on a running stack."""
    replicas.scale_up(3)
    nginx = Nginx(tmp_path / "nginx", replicas.port, replicas.addresses()).start()
    channel = unique("scale")
    clients: list[ProtocolClient] = []
    try:
        for _ in range(6):
            clients.append((await connect(nginx, channel))[0])

        # Up: Docker's DNS now lists five replicas; the watcher reloads nginx.
        before = nginx.serving_processes()
        new = replicas.scale_up(5)
        nginx.set_workers(replicas.addresses())
        await asyncio.to_thread(nginx.wait_reloaded, before, 1)
        new_ids = ids_of(new)
        landed: set[str] = set()
        for _ in range(10):
            if new_ids <= landed:
                break
            client, worker = await connect(nginx, channel)
            clients.append(client)
            landed.add(worker)
        assert new_ids <= landed, f"new connections never reached the new replicas: {landed}"
        # The clients from before the reload stay connected and served (nginx's old
        # processes keep them until worker_shutdown_timeout), the new ones too.
        ids = await publish_through(nginx, channel, 10)
        for client in clients:
            assert [(await client.recv(timeout=10))["id"] for _ in ids] == ids

        # Down: the two newest replicas stop (compose removes the highest-numbered) and
        # leave Docker's DNS; the watcher reloads nginx, which stops trying them.
        before = nginx.serving_processes()
        for worker in new:
            worker.stop()
        replicas.workers = replicas.workers[:3]
        nginx.set_workers(replicas.addresses())
        await asyncio.to_thread(nginx.wait_reloaded, before, 2)
        log_seen = len(nginx.log())
        remaining = ids_of(replicas.workers)
        for _ in range(6):
            client, worker = await connect(nginx, channel)
            clients.append(client)
            assert worker in remaining
        # Without the reload nginx would first try a gone replica, be refused and log it.
        assert "connect() failed" not in nginx.log()[log_seen:], nginx.log()[log_seen:]
    finally:
        for client in clients:
            await client.close()
        nginx.stop()


async def test_without_the_watcher_nginx_never_reaches_a_new_replica(
    replicas: Replicas, tmp_path: Path
) -> None:
    """The trap the watcher is for: nginx resolves `worker` only when it loads its config."""
    replicas.scale_up(1)
    nginx = Nginx(tmp_path / "nginx", replicas.port, replicas.addresses(), watch=False).start()
    channel = unique("nowatch")
    clients: list[ProtocolClient] = []
    try:
        [first] = ids_of(replicas.workers)
        replicas.scale_up(2)
        nginx.set_workers(replicas.addresses())
        for _ in range(4):
            client, worker = await connect(nginx, channel)
            clients.append(client)
            assert worker == first
    finally:
        for client in clients:
            await client.close()
        nginx.stop()


async def test_sigterm_of_a_worker_behind_nginx_loses_nothing(
    topology: tuple[Nginx, list[Worker]],
) -> None:
    nginx, workers = topology
    channel = unique("lbresume")
    recorder = Recorder()
    async with Client(nginx.ws + "/ws", open_timeout=5 * UNIT) as client:
        reading = asyncio.create_task(recorder.run(client))
        await client.subscribe(channel)
        victim = worker_of(workers, client.worker)
        victim_id = client.worker
        survivors = [w for w in workers if w is not victim]
        publisher = Publisher(survivors, channel)
        publishing = asyncio.create_task(publisher.run())
        await _wait(lambda: len(recorder.messages()) >= 30, "30 messages")
        victim.signal(signal.SIGTERM)
        await _wait(lambda: client.worker != victim_id, "a move to another worker")
        seen = len(recorder.messages())
        await _wait(lambda: len(recorder.messages()) >= seen + 50, "50 more messages")
        publisher.stop.set()
        await publishing
        end = await asyncio.to_thread(survivors[0].publish, channel, "end")
        await _wait(lambda: recorder.messages()[-1].id == end, "the end marker")
        await client.close()
        await reading
    received = [m.id for m in recorder.messages()]
    assert received == [*publisher.ids(), end], "lost, repeated or reordered messages"
    assert [e for e, _ in recorder.of(Lost)] == []
    resumed = [e for e, _ in recorder.of(Subscribed) if e.recovered is not None]
    assert [e.recovered for e in resumed] == [True]  # type: ignore[attr-defined]


async def test_the_demo_through_nginx_lands_two_tabs_on_two_workers(
    topology: tuple[Nginx, list[Worker]],
) -> None:
    executable = chromium()
    nginx, _ = topology
    channel = unique("demo")
    artifacts = artifacts_dir()
    async with _browser(executable) as browser_pages:
        page_a = await browser_pages(nginx.http + "/")
        page_b = await browser_pages(nginx.http + "/")
        for page in (page_a, page_b):
            await expect(page.locator("#state")).to_have_text("connected", timeout=WAIT_MS)
        one = await page_a.locator("#worker").inner_text()
        two = await page_b.locator("#worker").inner_text()
        assert one != two, "nginx sent both tabs to the same worker"
        await join(page_a, "ann", channel, one)
        await join(page_b, "bob", channel, two)
        await say(page_a, "hello through nginx")
        await expect_chat_line(page_b, "ann", "hello through nginx", via=one)
        await say(page_b, "hi ann")
        await expect_chat_line(page_a, "bob", "hi ann", via=two)
        await page_a.screenshot(path=artifacts / "nginx-demo-page-a.png")
        await page_b.screenshot(path=artifacts / "nginx-demo-page-b.png")
        await page_b.context.close()
        await expect(page_a.locator("#messages li.system").last).to_have_text(
            "bob left", timeout=WAIT_MS
        )
        await page_a.screenshot(path=artifacts / "nginx-demo-page-a-after-bob-left.png")


@contextlib.asynccontextmanager
async def _browser(executable: str) -> AsyncIterator[Callable[[str], Awaitable[Page]]]:
    errors: list[str] = []
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=3 * WAIT_MS
        )

        async def open_page(url: str) -> Page:
            # A context each: two users, not two tabs sharing state.
            context = await browser.new_context(viewport={"width": 900, "height": 760})
            context.set_default_timeout(WAIT_MS)
            page = await context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(url)
            return page

        try:
            yield open_page
        finally:
            await browser.close()
    assert errors == [], "the demo page raised JavaScript errors"


async def _wait(condition: object, what: str) -> None:
    async def check() -> bool:
        return bool(condition())  # type: ignore[operator]

    await async_wait_for(check, 30, what)
