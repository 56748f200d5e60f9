"""The demo chat page (service/static/index.html) in a real headless Chromium.

Two pages, each on its own worker process, chat with each other through the test's
redis-server. Every wait is one of Playwright's auto-waiting expectations, bounded in
units of `UNIT`. Screenshots go to $TEST_ARTIFACTS (default: test-artifacts/).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest

from tests.conftest import WorkersFactory
from tests.helpers import UNIT, RedisServer, Worker, redis_args, unique

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ModuleNotFoundError as exc:  # fail this test below, not the whole collection
    PLAYWRIGHT_MISSING: ModuleNotFoundError | None = exc
else:
    PLAYWRIGHT_MISSING = None

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
# Debian's chromium, not a browser downloaded by `playwright install`. Without the
# background-networking flags it phones home, and those connections are refused in CI.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 10_000 * UNIT  # Playwright counts in milliseconds


def chromium() -> str:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(
            "chromium is not installed (.ci/run installs it: apt-get install chromium)",
            pytrace=False,
        )
    if PLAYWRIGHT_MISSING is not None:
        pytest.fail(
            f"playwright is not installed (.ci/run installs it): {PLAYWRIGHT_MISSING}",
            pytrace=False,
        )
    return binary


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("demo-browser-*.png"):
        stale.unlink()
    return directory


def healthz_worker(worker: Worker) -> str:
    response = httpx.get(worker.http + "/healthz", timeout=5 * UNIT)
    assert response.status_code == 200, response.text
    return str(response.json()["worker"])


async def open_page(browser: Browser, worker: Worker, errors: list[str]) -> Page:
    """A page in a browser context of its own (like a second user) showing the demo."""
    context = await browser.new_context(viewport={"width": 900, "height": 760})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    page.on("pageerror", lambda error: errors.append(f"{worker.http}: {error}"))
    await page.goto(worker.http + "/")
    return page


async def join(page: Page, name: str, channel: str, worker: str) -> None:
    """Join `channel` as `name` from a page connected to `worker`."""
    await page.fill("#name", name)
    await page.fill("#channel", channel)
    await page.click("#join")
    # The page enables the input when the `subscribed` frame arrives.
    await expect(page.locator("#text")).to_be_enabled(timeout=WAIT_MS)
    await expect(page.locator("#send")).to_be_enabled(timeout=WAIT_MS)
    await expect(page.locator("#messages li").first).to_have_text(
        f"joined #{channel} as {name}", timeout=WAIT_MS
    )
    # The page announced itself (`info`), and hears its own join through Redis.
    await expect(page.locator("#messages li.system").last).to_have_text(
        f"{name} joined (on {worker})", timeout=WAIT_MS
    )


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")
    await expect(page.locator("#text")).to_have_value("", timeout=WAIT_MS)


async def expect_chat_line(page: Page, name: str, text: str, via: str) -> None:
    """`page` lists `name`'s message `text`, sent from a page on worker `via`."""
    line = page.locator("#messages li:not(.system)").filter(has_text=text)
    await expect(line).to_have_count(1, timeout=WAIT_MS)
    await expect(line.locator(".who")).to_have_text(f"{name}:", timeout=WAIT_MS)
    await expect(line.locator(".worker")).to_have_text(f"via {via}", timeout=WAIT_MS)


def line_pattern(name: str, text: str, via: str) -> re.Pattern[str]:
    """The text of a chat line: "ann: hi via w1"."""
    return re.compile(rf"^{re.escape(name)}: {re.escape(text)}\s*via {re.escape(via)}$")


async def test_demo_page_chats_across_two_workers(
    make_workers: WorkersFactory, redis_server: RedisServer, prefix: str
) -> None:
    executable = chromium()
    workers = make_workers(2, *redis_args(redis_server, prefix))
    one, two = (healthz_worker(w) for w in workers)
    assert one != two
    channel = unique("demo")
    artifacts = artifacts_dir()
    errors: list[str] = []

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=3 * WAIT_MS
        )
        pages: dict[str, Page] = {}
        try:
            pages["a"] = page_a = await open_page(browser, workers[0], errors)
            pages["b"] = page_b = await open_page(browser, workers[1], errors)

            # Each page shows the worker it is connected to (from the `welcome` frame).
            await expect(page_a.locator("#worker")).to_have_text(one, timeout=WAIT_MS)
            await expect(page_b.locator("#worker")).to_have_text(two, timeout=WAIT_MS)
            for page in (page_a, page_b):
                await expect(page.locator("#state")).to_have_text("connected", timeout=WAIT_MS)

            await join(page_a, "ann", channel, one)
            await join(page_b, "bob", channel, two)
            await expect(page_a.locator("#messages li.system").last).to_have_text(
                f"bob joined (on {two})", timeout=WAIT_MS
            )

            # Across workers, in both directions, through Redis.
            await say(page_a, "hello from ann")
            await expect_chat_line(page_b, "ann", "hello from ann", via=one)
            await say(page_b, "hi ann, bob here")
            await expect_chat_line(page_a, "bob", "hi ann, bob here", via=two)

            # Bob's view: his join, then both messages (his own comes back through Redis).
            await expect(page_b.locator("#messages li")).to_have_text(
                [
                    f"joined #{channel} as bob",
                    f"bob joined (on {two})",
                    line_pattern("ann", "hello from ann", one),
                    line_pattern("bob", "hi ann, bob here", two),
                ],
                timeout=WAIT_MS,
            )
            for name, page in pages.items():
                await page.screenshot(path=artifacts / f"demo-browser-page-{name}.png")

            await page_b.context.close()
            await expect(page_a.locator("#messages li.system").last).to_have_text(
                "bob left", timeout=WAIT_MS
            )
            await page_a.screenshot(path=artifacts / "demo-browser-page-a-after-bob-left.png")
            # The conversation as ann saw it, in order.
            await expect(page_a.locator("#messages li")).to_have_text(
                [
                    f"joined #{channel} as ann",
                    f"ann joined (on {one})",
                    f"bob joined (on {two})",
                    line_pattern("ann", "hello from ann", one),
                    line_pattern("bob", "hi ann, bob here", two),
                    "bob left",
                ],
                timeout=WAIT_MS,
            )
            # A message that is not chat (a backend publishing over HTTP) is shown raw.
            workers[1].publish(channel, {"from": "a backend"})
            await expect(page_a.locator("#messages li").last).to_have_text(
                '{"from":"a backend"}', timeout=WAIT_MS
            )
        except BaseException:
            # What each page looked like when the test failed (CI keeps the artifacts).
            for name, page in pages.items():
                if not page.is_closed():
                    with contextlib.suppress(Exception):
                        await page.screenshot(
                            path=artifacts / f"demo-browser-failed-page-{name}.png", timeout=WAIT_MS
                        )
            raise
        finally:
            await browser.close()

    assert errors == [], "the demo page raised JavaScript errors"
