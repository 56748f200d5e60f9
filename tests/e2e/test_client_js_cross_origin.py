"""The browser client imported from another origin, as an app's page on its own domain
(or a dev server on :3000) imports it: the worker sends CORS headers for its static
files to ALLOWED_ORIGINS, the same origins that may open a WebSocket, and to no other.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import pytest

from tests.conftest import WorkerFactory
from tests.e2e.test_demo_browser import CHROMIUM_ARGS, WAIT_MS, chromium
from tests.helpers import RedisServer, redis_args, unique

with contextlib.suppress(ModuleNotFoundError):  # chromium() fails the test with the reason
    from playwright.async_api import async_playwright

pytestmark = pytest.mark.e2e

# In a page of the app's origin: import the client from the service, subscribe, publish
# once subscribed, and resolve with what came back (or the import's error).
ROUND_TRIP = """
async ({service, channel}) => {
  let BroadcastClient;
  try {
    ({ BroadcastClient } = await import(service + "/static/client.js"));
  } catch (error) {
    return {imported: false, error: String(error)};
  }
  const client = new BroadcastClient(service.replace("http", "ws") + "/ws");
  const got = new Promise((resolve) =>
    client.addEventListener("message", (e) => resolve(e.detail.data)));
  client.addEventListener("subscribed", () => client.publish(channel, "hi"), {once: true});
  client.subscribe(channel);
  client.connect();
  const data = await got;
  client.close();
  return {imported: true, data};
}
"""


async def test_the_client_module_loads_from_allowed_origins_only(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    executable = chromium()
    app = make_worker(*redis_args(redis_server, prefix))  # stands in for the app's origin
    origin = app.http
    service = make_worker(
        *redis_args(redis_server, prefix), env={"ALLOWED_ORIGINS": json.dumps([origin])}
    )
    closed = make_worker(*redis_args(redis_server, prefix))  # no ALLOWED_ORIGINS
    # The headers themselves, as a browser's preflight-free GET sees them.
    allowed = httpx.get(service.http + "/static/client.js", headers={"Origin": origin})
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == origin
    other = httpx.get(service.http + "/static/client.js", headers={"Origin": "http://evil"})
    assert "access-control-allow-origin" not in other.headers

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=3 * WAIT_MS
        )
        try:
            page = await browser.new_page()
            page.set_default_timeout(WAIT_MS)
            await page.goto(origin + "/healthz")
            result = await page.evaluate(
                ROUND_TRIP, {"service": service.http, "channel": unique("cors")}
            )
            assert result == {"imported": True, "data": "hi"}
            refused = await page.evaluate(
                ROUND_TRIP, {"service": closed.http, "channel": unique("cors")}
            )
            assert refused["imported"] is False
            assert "client.js" in refused["error"] or "import" in refused["error"]
        finally:
            await browser.close()
