"""The compose topology from real processes: redis-server, three workers, and nginx with
the shipped deploy/nginx.conf (only its addresses substituted).

Workers are started the way docker-compose.yml starts them (`python -m service` with
the same settings, FORWARDED_ALLOW_IPS and all). Clients connect through nginx only.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from playwright.async_api import Page, async_playwright, expect

from service.client import Client, Lost, Subscribed
from tests.conftest import WorkersFactory
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
    Nginx,
    RedisServer,
    Worker,
    async_wait_for,
    redis_args,
    unique,
)
from tests.helpers import Client as ProtocolClient

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]


def compose_settings() -> list[str]:
    """The workers' environment in docker-compose.yml, as flags; Redis's address aside."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    environment = compose["services"]["worker"]["environment"]
    flags = []
    for name, value in environment.items():
        if name != "BROADCAST_URL":  # the test's own redis-server instead of `redis`
            flags += ["--" + name.lower().replace("_", "-"), str(value)]
    return flags


@pytest.fixture
def topology(
    make_workers: WorkersFactory, redis_server: RedisServer, prefix: str, tmp_path: Path
) -> Iterator[tuple[Nginx, list[Worker]]]:
    workers = make_workers(3, *redis_args(redis_server, prefix, *compose_settings()))
    nginx = Nginx(tmp_path / "nginx", workers).start()
    try:
        yield nginx, workers
    finally:
        nginx.stop()


def worker_of(workers: list[Worker], worker_id: str | None) -> Worker:
    ids = {httpx.get(w.http + "/healthz", timeout=5).json()["worker"]: w for w in workers}
    return ids[worker_id]


async def test_clients_through_nginx_spread_over_the_workers_and_all_receive(
    topology: tuple[Nginx, list[Worker]],
) -> None:
    nginx, _ = topology
    channel = unique("lb")
    clients, landed = [], []
    for _ in range(12):
        client = await ProtocolClient.connect(nginx.ws + "/ws")
        landed.append((await client.welcome())["worker"])
        await client.subscribe(channel)
        clients.append(client)
    # least_conn hands each new long-lived connection to the least busy worker.
    assert sorted(landed.count(worker) for worker in set(landed)) == [4, 4, 4], landed
    async with httpx.AsyncClient(base_url=nginx.http, timeout=10 * UNIT) as http:
        ids = []
        for n in range(20):
            response = await http.post(f"/api/channels/{channel}/messages", json={"data": n})
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
    for client in clients:
        assert [(await client.recv(timeout=10))["id"] for _ in ids] == ids
    for client in clients:
        await client.close()


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
