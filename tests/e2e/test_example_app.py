"""The example app (examples/chat_app) on a real uvicorn and redis-server, in Chromium.

The app embeds the service (`Realtime` under `/rt`), signs users in with its own
cookie, stamps each chat message with its sender in a publish hook, and publishes
topic changes from a route of its own. Its page imports the client from the npm
package, which the example installs with npm (`npm ci` here when it is missing).
Every wait polls, bounded in units of `UNIT`. Screenshots go to $TEST_ARTIFACTS.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.e2e.test_demo_browser import CHROMIUM_ARGS, REPO, WAIT_MS, chromium
from tests.helpers import UNIT, Client, RedisServer, Worker, unique

with contextlib.suppress(ModuleNotFoundError):  # chromium() fails the test with the reason
    from playwright.async_api import Browser, Page, async_playwright, expect

pytestmark = pytest.mark.e2e

EXAMPLE = REPO / "examples" / "chat_app"


def npm_dependencies() -> None:
    """The example's node_modules, as its README installs them (from package-lock.json)."""
    if (EXAMPLE / "node_modules" / "broadcast-service-client" / "client.js").is_file():
        return
    if shutil.which("npm") is None:
        pytest.fail("npm is needed for examples/chat_app: scripts/bootstrap installs it")
    result = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120 * UNIT,
        check=False,
    )
    assert result.returncode == 0, f"npm ci failed:\n{result.stdout}\n{result.stderr}"


def example_app(workdir: Path, env: dict[str, str], port: int | None = None) -> Worker:
    """The example on uvicorn, as its README runs it (from an empty directory here)."""
    npm_dependencies()
    program = [sys.executable, "-m", "uvicorn", "--app-dir", str(EXAMPLE), "app:app"]
    return Worker(workdir, [], env, port=port, program=program)


def redis_env(redis_server: RedisServer) -> dict[str, str]:
    return {"BROADCAST_URL": redis_server.url, "REDIS_PREFIX": unique("chat") + ":"}


@pytest.fixture(scope="module")
def chat_app(
    redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Worker]:
    worker = example_app(tmp_path_factory.mktemp("chat_app"), redis_env(redis_server))
    worker.start()
    yield worker
    worker.stop()


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def sign_in_over_http(app: Worker, name: str) -> str:
    """The `session` cookie of a fresh sign-in as `name`."""
    response = httpx.post(f"{app.http}/login", json={"name": name}, timeout=5 * UNIT)
    assert response.status_code == 200, response.text
    return response.cookies["session"]


@contextlib.asynccontextmanager
async def chromium_browser(errors: list[str]) -> AsyncIterator[Browser]:
    """Debian's chromium, headless; no page may raise a JavaScript error."""
    executable = chromium()
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=3 * WAIT_MS
        )
        try:
            yield browser
        finally:
            await browser.close()
    assert errors == [], "the page raised JavaScript errors"


async def open_chat(browser: Browser, app: Worker, room: str, errors: list[str]) -> Page:
    """The chat page of `room` in a browser context of its own (a user of its own)."""
    context = await browser.new_context(viewport={"width": 760, "height": 560})
    context.set_default_timeout(WAIT_MS)
    page = await context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{app.http}/?room={room}")
    return page


async def sign_in(page: Page, name: str) -> None:
    """Sign in with the page's form; ready once subscribed (Send is enabled then)."""
    await page.fill("#name", name)
    await page.click("#login-button")
    await expect(page.locator("#user")).to_have_text(name, timeout=WAIT_MS)
    await expect(page.locator("#state")).to_have_text("open", timeout=WAIT_MS)
    await expect(page.locator("#send-button")).to_be_enabled(timeout=WAIT_MS)


async def say(page: Page, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send-button")


async def expect_chat(page: Page, lines: list[tuple[str, str]]) -> None:
    """The page shows these (sender, text) chat lines, in this order, and no others."""
    chat = page.locator("#messages li.chat")
    await expect(chat.locator(".user")).to_have_text([u for u, _ in lines], timeout=WAIT_MS)
    await expect(chat.locator(".text")).to_have_text([t for _, t in lines], timeout=WAIT_MS)


async def test_two_users_chat_see_refusals_and_the_apps_topic(chat_app: Worker) -> None:
    room = unique("r")
    errors: list[str] = []
    async with chromium_browser(errors) as browser:
        alice = await open_chat(browser, chat_app, room, errors)
        bob = await open_chat(browser, chat_app, room, errors)
        await sign_in(alice, "alice")
        await sign_in(bob, "bob")

        await say(alice, "hello bob")
        # Stamped with its sender by the app's publish hook, on the way through Redis.
        await expect_chat(bob, [("alice", "hello bob")])
        await say(bob, "hi alice")
        for page in (alice, bob):
            await expect_chat(page, [("alice", "hello bob"), ("bob", "hi alice")])
        await expect(alice.locator("#text")).to_have_value("")
        await alice.screenshot(path=artifacts_dir() / "example-chat.png")

        # The hook refuses an empty message with the app's own code; nothing is published
        # (bob's next message comes right after the last one, in the one channel's order).
        await say(alice, "   ")
        await expect(alice.locator("#error")).to_have_text(
            "empty_message: say something", timeout=WAIT_MS
        )
        await say(bob, "still here")
        await expect_chat(
            alice, [("alice", "hello bob"), ("bob", "hi alice"), ("bob", "still here")]
        )

        # The app's own route publishes the topic change; both pages show it.
        [session] = [c["value"] for c in await bob.context.cookies() if c["name"] == "session"]
        async with httpx.AsyncClient(cookies={"session": session}, timeout=5 * UNIT) as http:
            response = await http.post(
                f"{chat_app.http}/rooms/{room}/topic", json={"topic": "lunch on Friday"}
            )
        assert response.status_code == 200, response.text
        for page in (alice, bob):
            await expect(page.locator("#topic")).to_have_text("lunch on Friday", timeout=WAIT_MS)
            await expect(page.locator("#messages li.system")).to_have_text(
                ["bob set the topic: lunch on Friday"], timeout=WAIT_MS
            )
        await alice.screenshot(path=artifacts_dir() / "example-chat-topic.png")

        # Someone who comes later gets the topic and the backlog from the history route.
        carol = await open_chat(browser, chat_app, room, errors)
        await sign_in(carol, "carol")
        await expect(carol.locator("#topic")).to_have_text("lunch on Friday", timeout=WAIT_MS)
        await expect(carol.locator("#messages li")).to_have_text(
            [
                "alicehello bob",
                "bobhi alice",
                "bobstill here",
                "bob set the topic: lunch on Friday",
            ],
            timeout=WAIT_MS,
        )


async def test_a_page_not_signed_in_cannot_connect(chat_app: Worker) -> None:
    url = chat_app.ws + "/rt/ws"
    errors: list[str] = []
    async with chromium_browser(errors) as browser:
        page = await open_chat(browser, chat_app, unique("r"), errors)
        # Signed in, then out: the app forgets the session and the cookie goes.
        await sign_in(page, "erin")
        await page.click("#logout")
        await expect(page.locator("#login")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#chat")).to_be_hidden(timeout=WAIT_MS)
        assert [c for c in await page.context.cookies() if c["name"] == "session"] == []
        # The page's own origin, no session cookie: the handshake is refused, which a
        # browser reports as a connection that never opened (1006).
        outcome = await page.evaluate(
            """(url) => new Promise((resolve) => {
                const socket = new WebSocket(url);
                socket.onopen = () => resolve("open");
                socket.onclose = (event) => resolve(`closed ${event.code}`);
            })""",
            url,
        )
        assert outcome == "closed 1006"
    # What the browser does not show: a 403 from the app's `identify` dependency.
    with pytest.raises(InvalidStatus) as refused:
        await websockets.connect(url, open_timeout=5 * UNIT)
    assert refused.value.response.status_code == 403
    assert b"not signed in" in refused.value.response.body


async def test_the_history_route_returns_the_stamped_messages(chat_app: Worker) -> None:
    room = unique("r")
    channel = f"room:{room}"
    history_url = f"{chat_app.http}/rooms/{room}/history"
    assert httpx.get(history_url, timeout=5 * UNIT).status_code == 401  # not signed in

    session = sign_in_over_http(chat_app, "dave")
    dave = await Client.connect(
        chat_app.ws + "/rt/ws", additional_headers={"Cookie": f"session={session}"}
    )
    try:
        await dave.welcome()
        first = await dave.publish(channel, {"text": " first "})
        # The hook rebuilds the message: a page cannot pass itself off as someone else.
        second = await dave.publish(channel, {"text": "second", "user": "alice", "topic": "x"})
        await dave.send({"type": "publish", "channel": channel, "data": {"text": "x" * 501}})
        assert (await dave.recv_type("error"))["code"] == "message_too_long"
    finally:
        await dave.close()

    response = httpx.get(history_url, cookies={"session": session}, timeout=5 * UNIT)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "topic": "",
        "position": second["id"],
        "messages": [
            {"id": first["id"], "data": {"text": "first", "user": "dave"}},
            {"id": second["id"], "data": {"text": "second", "user": "dave"}},
        ],
    }
    latest = httpx.get(
        history_url, params={"limit": 1}, cookies={"session": session}, timeout=5 * UNIT
    ).json()
    assert [m["id"] for m in latest["messages"]] == [second["id"]]


async def test_after_the_app_restarts_the_page_asks_to_sign_in_again(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """The sessions were in the old process's memory: the new one refuses the page's
    WebSocket, which a browser cannot tell from a network failure; the page asks the
    app (`/me`) rather than letting the client retry forever."""
    env = redis_env(redis_server)
    first = example_app(tmp_path, env)
    second = example_app(tmp_path, env, port=first.port)
    errors: list[str] = []
    try:
        first.start()
        async with chromium_browser(errors) as browser:
            page = await open_chat(browser, first, unique("r"), errors)
            await sign_in(page, "frank")
            first.stop()
            second.start()
            # Within the client's backoff, which reaches a few seconds while it is down.
            await expect(page.locator("#login")).to_be_visible(timeout=3 * WAIT_MS)
            await expect(page.locator("#error")).to_have_text("signed out: sign in again")
            await sign_in(page, "frank")
            await say(page, "back again")
            await expect_chat(page, [("frank", "back again")])
    finally:
        first.stop()
        second.stop()
