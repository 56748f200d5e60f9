"""The README's browser snippet, as written, in a real headless Chromium on a worker's
page: it connects, subscribes, publishes once subscribed, and receives its own message.
"""

from __future__ import annotations

import contextlib
import re

import pytest

from tests.conftest import WorkerFactory
from tests.e2e.test_demo_browser import CHROMIUM_ARGS, REPO, WAIT_MS, chromium
from tests.helpers import UNIT, RedisServer, async_wait_for, redis_args

with contextlib.suppress(ModuleNotFoundError):  # chromium() fails the test with the reason
    from playwright.async_api import ConsoleMessage, async_playwright

pytestmark = pytest.mark.e2e


def readme_snippet() -> str:
    """The one `<script type="module">` block of README.md, without its tags."""
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```html\n(.*?)```", readme, re.S)
    assert len(blocks) == 1, "README.md should hold exactly one html snippet"
    script = re.fullmatch(r'\s*<script type="module">\n(.*)</script>\s*', blocks[0], re.S)
    assert script is not None, blocks[0]
    return script.group(1)


async def test_the_readme_browser_snippet_receives_its_own_message(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    executable = chromium()
    worker = make_worker(*redis_args(redis_server, prefix))
    logged: list[list[object]] = []
    errors: list[str] = []

    async def keep(message: ConsoleMessage) -> None:
        logged.append([await arg.json_value() for arg in message.args])

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=3 * WAIT_MS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(WAIT_MS)
            page.on("console", keep)
            page.on("pageerror", lambda error: errors.append(str(error)))
            # A page of the worker's origin, as an app served beside it would be.
            await page.goto(worker.http + "/healthz")
            await page.add_script_tag(content=readme_snippet(), type="module")
            await async_wait_for(
                lambda: ["news", {"text": "hello"}] in logged,
                timeout=10 * UNIT,
                what="the snippet's own message, logged by its message handler",
            )
            # Published once: a second copy would come before this marker (one channel,
            # one order).
            worker.publish("news", "marker")
            await async_wait_for(
                lambda: ["news", "marker"] in logged, timeout=10 * UNIT, what="the marker"
            )
            assert logged.count(["news", {"text": "hello"}]) == 1
            assert ["open"] in logged  # the state handler
            assert errors == []
        finally:
            await browser.close()
