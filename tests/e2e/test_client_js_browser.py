"""The browser client (service/static/client.js) in a real headless Chromium.

* Against three real workers sharing the test's redis-server: the worker the page is on
  is SIGKILLed while a backend publishes over HTTP, and the page still holds every
  acknowledged message exactly once, in order, without a `lost` event.
* Against a scripted WebSocket server of the test's own, which closes with the code a
  test picks or answers commands as a test needs: the reconnect policy (which close
  codes reconnect, and after how long) and the protocol details (`ref` matching,
  `unavailable` retries, `lost`, resubscribing with `since`).
* Against a worker with auth on: the `token` option (a string, or a provider the test
  exposes to the page), `refresh()`, and renewing a token that expired by reconnecting.

The page imports `/static/client.js` from a worker, as an application would; each
client records its events in `window.clients[name].events`. Every wait polls a
condition, bounded in units of `UNIT`. Screenshots go to $TEST_ARTIFACTS.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.conftest import WorkerFactory, WorkersFactory
from tests.e2e.test_demo_browser import CHROMIUM_ARGS, REPO, WAIT_MS, chromium, healthz_worker
from tests.helpers import UNIT, RedisServer, Worker, async_wait_for, free_port, redis_args, unique

with contextlib.suppress(ModuleNotFoundError):  # chromium() fails the test with the reason
    from playwright.async_api import Page, async_playwright

pytestmark = pytest.mark.e2e

EVENTS = ["state", "welcome", "subscribed", "message", "lost", "join", "leave", "error"]

# Loaded into a page of a worker's origin, so that `import("/static/client.js")` gets
# the module from the worker. Events are kept whole; the page shows all but messages.
HARNESS = """
async ({name, urls, channels, options, types}) => {
  const { BroadcastClient } = await import("/static/client.js");
  window.clients ??= {};
  // `tokenFrom`: a function the test exposed to the page, made the token provider.
  const { tokenFrom, ...rest } = options;
  if (tokenFrom) rest.token = () => window[tokenFrom](name);
  const client = new BroadcastClient(urls, rest);
  const events = [];
  const counter = document.createElement("div");
  const log = document.createElement("pre");
  document.body.append(counter, log);
  let messages = 0;
  for (const type of types) {
    client.addEventListener(type, ({detail}) => {
      events.push({type, ...detail});
      if (type === "message") {
        counter.textContent = `${name}: ${++messages} messages, last ${detail.id}`;
      } else {
        log.append(`${name} ${type} ${JSON.stringify(detail)}\\n`);
      }
    });
  }
  window.clients[name] = {client, events};
  for (const channel of channels) client.subscribe(channel);
  client.connect();
}
"""

COUNT = "([name, type]) => clients[name].events.filter((e) => e.type === type).length"


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("TEST_ARTIFACTS") or REPO / "test-artifacts")
    directory.mkdir(parents=True, exist_ok=True)
    return directory


@contextlib.asynccontextmanager
async def browser_page(origin: Worker, screenshot: str) -> AsyncIterator[Page]:
    """A Chromium page on `origin`'s origin, blank but for what HARNESS writes into it.

    Its screenshot is saved as `screenshot` when the test ends, passed or failed.
    """
    executable = chromium()
    errors: list[str] = []
    path = artifacts_dir() / screenshot
    path.unlink(missing_ok=True)
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=executable, args=CHROMIUM_ARGS, timeout=3 * WAIT_MS
        )
        try:
            page = await browser.new_page(viewport={"width": 1000, "height": 900})
            page.set_default_timeout(WAIT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            await page.goto(origin.http + "/healthz")
            await page.evaluate(
                "() => { document.body.replaceChildren(); document.body.style.font = '12px mono'; }"
            )
            try:
                yield page
            finally:
                with contextlib.suppress(Exception):
                    await page.screenshot(path=path, timeout=WAIT_MS)
        finally:
            await browser.close()
    assert errors == [], "client.js raised JavaScript errors"


async def start_client(
    page: Page,
    name: str,
    urls: str | list[str],
    channels: tuple[str, ...] = (),
    **options: Any,
) -> None:
    """A BroadcastClient named `name` in `page`, subscribed to `channels`, connecting."""
    args = {"name": name, "urls": urls, "channels": list(channels), "options": options}
    await page.evaluate(HARNESS, {**args, "types": EVENTS})


async def events(page: Page, name: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The events client `name` has emitted so far (of type `kind`), oldest first."""
    found: list[dict[str, Any]] = await page.evaluate(
        "([name, kind]) => clients[name].events.filter((e) => !kind || e.type === kind)",
        [name, kind],
    )
    return found


async def wait_count(page: Page, name: str, kind: str, at_least: int, timeout: float = 1) -> None:
    """Until client `name` has emitted `at_least` events of type `kind`."""
    await page.wait_for_function(
        f"([name, type, n]) => ({COUNT})([name, type]) >= n",
        arg=[name, kind, at_least],
        timeout=timeout * WAIT_MS,
    )


def states(found: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """(state, code) of each `state` event."""
    return [(e["state"], e.get("code")) for e in found if e["type"] == "state"]


class Publisher(threading.Thread):
    """A backend publishing 0, 1, 2, ... over HTTP, one at a time, until stopped.

    One request at a time, so the order of the acknowledgements is the publish order.
    """

    def __init__(self, worker: Worker, channel: str, limit: int = 3000) -> None:
        super().__init__(daemon=True)
        self.worker = worker
        self.url = f"{worker.http}/api/channels/{channel}/messages"
        self.limit = limit
        self.acked: list[tuple[str, int]] = []  # (id, data)
        self.failures: list[str] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5 * UNIT) as http:
            for n in range(self.limit):
                if self._stop_event.is_set():
                    return
                response = http.post(self.url, json={"data": n})
                if response.status_code == 200:
                    self.acked.append((str(response.json()["id"]), n))
                else:
                    self.failures.append(f"{n}: {response.status_code} {response.text}")
                # A pace, not a wait: about 100 messages a second, so that the outage
                # of a failover stays well within the history kept (HISTORY_SIZE).
                self._stop_event.wait(0.01)

    def stop(self) -> list[tuple[str, int]]:
        self._stop_event.set()
        self.join(timeout=10 * UNIT)
        assert not self.is_alive(), "the publisher did not stop"
        return list(self.acked)


async def test_client_resumes_exactly_once_when_its_worker_is_killed(
    make_workers: WorkersFactory, redis_server: RedisServer, prefix: str
) -> None:
    # The page comes from one worker and connects to all three, each its own origin here
    # (behind a load balancer they share one): let the browser in from anywhere.
    workers = make_workers(3, *redis_args(redis_server, prefix, "--allowed-origins", '["*"]'))
    by_id = {healthz_worker(w): w for w in workers}
    assert len(by_id) == 3
    channel = unique("resume")

    async with browser_page(workers[0], "client-js-resume.png") as page:
        await start_client(page, "c", [w.ws + "/ws" for w in workers], (channel,))
        await wait_count(page, "c", "subscribed", 1)
        first = await page.evaluate("() => clients.c.client.worker")
        victim = by_id[first]
        publisher = Publisher(next(w for w in workers if w is not victim), channel)
        publisher.start()
        try:
            # Mid-stream: the page is receiving when its worker dies without a goodbye.
            await wait_count(page, "c", "message", 50)
            assert victim.process is not None
            victim.process.kill()
            victim.process.wait(timeout=10)
            killed_at = len(publisher.acked)
            await wait_count(page, "c", "subscribed", 2)
            second = await page.evaluate("() => clients.c.client.worker")
            assert second != first
            resumed_after = len(publisher.acked)
            # Published while the page was away: these can only come from history.
            assert resumed_after > killed_at

            async def published_enough() -> bool:
                return len(publisher.acked) >= max(300, resumed_after + 50)

            await async_wait_for(
                published_enough,
                timeout=30,
                what="300 messages published, 50 of them after the client resumed",
            )
        finally:
            acked = publisher.stop()
        assert publisher.failures == []
        # Delivered after all the others: once it is in, a duplicate would be too.
        acked.append((publisher.worker.publish(channel, "end"), "end"))
        await page.wait_for_function(
            "() => clients.c.events.some((e) => e.type === 'message' && e.data === 'end')"
        )
        found = await events(page, "c")

    messages = [(e["id"], e["data"]) for e in found if e["type"] == "message"]
    assert len(messages) > 300
    assert messages == acked, "every acknowledged message once, in publish order"
    assert [e for e in found if e["type"] in ("lost", "error")] == []
    subscribed = [e for e in found if e["type"] == "subscribed"]
    assert [e.get("recovered") for e in subscribed] == [None, True]
    kill = states(found).index(("reconnecting", 1006))
    assert states(found)[kill:] == [("reconnecting", 1006), ("connecting", None), ("open", None)]


class ScriptedServer:
    """A WebSocket server whose behaviour each connection picks with its path.

    * `/close/<code>`: `welcome`, then a close with `code` (`1005`: a close frame without
      a code; `abort`: the TCP connection dropped).
    * `/refuse/<code>`: the same without the `welcome`: a failed attempt.
    * `/open`: `welcome`, then nothing.
    * `/script`: `welcome`, then answers commands as the protocol test below scripts.
    """

    def __init__(self) -> None:
        self.port = 0
        self.opened: dict[str, list[float]] = defaultdict(list)
        self.closed: dict[str, list[float]] = defaultdict(list)
        self.received: list[tuple[int, dict[str, Any]]] = []  # (connection number, frame)
        self.close_codes: dict[str, list[int | None]] = defaultdict(list)
        self._connections = 0
        self._flaky_refused = False

    def url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedServer]:
        async with serve(self._handle, "127.0.0.1", 0, compression=None) as server:
            self.port = server.sockets[0].getsockname()[1]
            yield self

    async def _handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path
        self._connections += 1
        number = self._connections
        self.opened[path].append(time.monotonic())
        try:
            kind, _, arg = path.strip("/").partition("/")
            if kind != "refuse":
                await self._send(ws, type="welcome", worker=f"fake-{number}", protocol=1)
            if kind in ("close", "refuse"):
                if arg == "abort":
                    ws.transport.abort()
                elif arg == "1005":
                    await ws.close(None)  # type: ignore[arg-type]  # an empty close frame
                else:
                    await ws.close(int(arg), "scripted")
            elif kind == "script":
                async for raw in ws:
                    frame = json.loads(raw)
                    self.received.append((number, frame))
                    await self._answer(ws, frame)
            await ws.wait_closed()
        except ConnectionClosed:
            pass
        finally:
            self.closed[path].append(time.monotonic())
            self.close_codes[path].append(ws.close_code)

    async def _send(self, ws: ServerConnection, **frame: Any) -> None:
        await ws.send(json.dumps(frame))

    async def _answer(self, ws: ServerConnection, frame: dict[str, Any]) -> None:
        ref, channel = frame.get("ref"), frame.get("channel")
        if frame["type"] == "subscribe":
            if channel == "flaky" and not self._flaky_refused:
                self._flaky_refused = True
                await self._send(ws, type="error", code="unavailable", message="no", ref=ref)
                return
            if channel == "invalid!":
                await self._send(ws, type="error", code="invalid_channel", message="no", ref=ref)
                return
            reply: dict[str, Any] = {"channel": channel, "position": "e:5", "ref": ref}
            if channel == "old":  # a server without history: no position, since ignored
                del reply["position"]
            elif "since" in frame:
                reply["recovered"] = channel != "lossy"
            await self._send(ws, type="subscribed", **reply)
            if channel == "gappy" and "since" not in frame:
                await self._send(ws, type="message", channel=channel, id="e:6", data=6)
                await self._send(ws, type="gap", channel=channel)
                await self._send(ws, type="message", channel=channel, id="e:7", data=7)
                await self._send(ws, type="join", channel=channel, info={"name": "eve"})
        elif frame["type"] == "unsubscribe":
            await self._send(ws, type="unsubscribed", channel=channel, ref=ref)
        elif frame["type"] == "publish":
            if channel == "big":
                await self._send(ws, type="error", code="message_too_large", message="no", ref=ref)
            elif channel == "drop":
                await ws.close(1011, "scripted")
            else:
                await self._send(ws, type="published", channel=channel, id=f"id-{ref}", ref=ref)


async def test_client_reconnects_by_close_code_with_backoff(make_worker: WorkerFactory) -> None:
    origin = make_worker()  # serves the page and client.js; memory:// is enough
    async with (
        ScriptedServer().running() as server,
        browser_page(origin, "client-js-close-codes.png") as page,
    ):
        final = {code: f"/close/{code}" for code in (1000, 1008, 1009, 4000)}
        again = {code: f"/close/{code}" for code in (1001, 1005, 1011, 1012, 1013, 1014, "abort")}
        for code, path in {**final, **again}.items():
            await start_client(page, f"c{code}", server.url(path))
        # The only close code the service itself sends for good: simple mode, bad channel.
        await start_client(page, "policy", f"{origin.ws}/ws/bad!channel")
        # Failed attempts (nothing listens on that port) move on to the next URL.
        nobody = f"ws://127.0.0.1:{free_port()}/ws"
        await start_client(page, "rotate", [nobody, server.url("/open")])
        # Without a `welcome` in between, the attempt counter grows.
        await start_client(page, "refuse1011", server.url("/refuse/1011"))
        await start_client(page, "refuse1012", server.url("/refuse/1012"))

        waits = [(f"c{code}", "welcome", 2) for code in again]
        waits += [("rotate", "welcome", 1), ("refuse1011", "reconnecting", 4)]
        waits += [("refuse1012", "reconnecting", 3)]
        for name, kind, count in waits:
            if kind == "reconnecting":  # 0.25 + 0.5 + 1 + 2 s at most
                await page.wait_for_function(
                    """([name, n]) => clients[name].events.filter(
                        (e) => e.state === "reconnecting").length >= n""",
                    arg=[name, count],
                    timeout=3 * WAIT_MS,
                )
            else:
                await wait_count(page, name, kind, count)
            # Servers that close every connection would keep these clients busy.
            await page.evaluate("(name) => clients[name].client.close()", name)

        for code, path in final.items():
            found = await events(page, f"c{code}")
            assert states(found) == [("connecting", None), ("open", None), ("closed", code)]
            # Checked after the 1013 client waited >= 500 ms: a retry would have come.
            assert len(server.opened[path]) == 1, code
        found = await events(page, "policy")
        assert states(found) == [("connecting", None), ("closed", 1008)]
        assert [e["code"] for e in found if e["type"] == "error"] == ["invalid_channel"]

        delays = {}
        for code in again:
            found = await events(page, f"c{code}")
            first = [(e["state"], e["code"]) for e in found if e["type"] == "state"][:5]
            assert first == [
                ("connecting", None),
                ("open", None),
                ("reconnecting", 1006 if code == "abort" else code),
                ("connecting", None),
                ("open", None),
            ], code
            delays[code] = next(e["delay"] for e in found if e.get("state") == "reconnecting")
        for code in (1001, 1005, 1011, 1014, "abort"):
            assert 125 <= delays[code] <= 250, (code, delays[code])
        # 1012: the worker is shutting down, so at once (spread over minDelay), elsewhere.
        assert 0 <= delays[1012] <= 250
        gap = server.opened["/close/1012"][1] - server.closed["/close/1012"][0]
        assert gap < 0.5 * UNIT
        # 1013: the server asked for patience: base 1 s.
        assert 500 <= delays[1013] <= 1000
        assert server.opened["/close/1013"][1] - server.closed["/close/1013"][0] >= 0.45

        found = await events(page, "rotate")
        assert [e["url"] for e in found if e.get("state") == "connecting"] == [
            nobody,
            server.url("/open"),
        ]
        assert states(found)[:5] == [
            ("connecting", None),
            ("reconnecting", 1006),
            ("connecting", None),
            ("open", None),
            ("closed", 1000),
        ]
        assert server.close_codes["/open"] == [1000]  # close() says goodbye with 1000

        # Exponential: min(10 s, 250 ms * 2**n) * uniform(0.5, 1) for the n-th attempt.
        refused = await events(page, "refuse1011", "state")
        delays_1011 = [e["delay"] for e in refused if e["state"] == "reconnecting"][:4]
        for n, delay in enumerate(delays_1011):
            assert 125 * 2**n <= delay <= 250 * 2**n, delays_1011
        # 1012 skips the wait only for the first retry: no busy loop on a balancer
        # that keeps sending us back to the worker that is shutting down.
        refused = await events(page, "refuse1012", "state")
        delays_1012 = [e["delay"] for e in refused if e["state"] == "reconnecting"][:3]
        assert 0 <= delays_1012[0] <= 250
        for n, delay in enumerate(delays_1012[1:], start=1):
            assert 125 * 2**n <= delay <= 250 * 2**n, delays_1012


async def test_client_protocol_against_a_scripted_server(make_worker: WorkerFactory) -> None:
    origin = make_worker()
    async with (
        ScriptedServer().running() as server,
        browser_page(origin, "client-js-protocol.png") as page,
    ):
        url = server.url("/script")
        await page.evaluate(
            """async ([url]) => {
                const { BroadcastClient } = await import("/static/client.js");
                const early = new BroadcastClient(url);
                window.early = await early.publish("news", 1).catch((e) => e.code);
            }""",
            [url],
        )
        assert await page.evaluate("() => window.early") == "not_connected"

        channels = ("flaky", "gappy", "lossy", "temp", "invalid!", "old")
        await start_client(page, "c", url, channels)
        await wait_count(page, "c", "subscribed", 5)
        await page.evaluate("() => clients.c.client.unsubscribe('temp')")
        results = await page.evaluate(
            """async () => {
                const client = clients.c.client;
                const outcome = (p) => p.then((id) => ({id}), (e) => ({code: e.code}));
                return [
                    await outcome(client.publish("news", {n: 1})),
                    await outcome(client.publish("big", "x")),
                    await outcome(client.publish("drop", null)),
                ];
            }"""
        )
        assert results[0]["id"].startswith("id-")
        assert results[1:] == [{"code": "message_too_large"}, {"code": "connection_lost"}]
        await wait_count(page, "c", "subscribed", 9)
        found = await events(page, "c")

    first, second = [[f for n, f in server.received if n == c] for c in (1, 2)]
    subscribes = [f for f in first if f["type"] == "subscribe"]
    # `unavailable` is retried on the same connection; a refusal for good is not.
    assert [f["channel"] for f in subscribes] == [
        "flaky",
        "gappy",
        "lossy",
        "temp",
        "invalid!",
        "old",
        "flaky",
    ]
    assert len({f["ref"] for f in first}) == len(first), "every command has its own ref"
    assert {"type": "unsubscribe", "channel": "temp", "ref": first[7]["ref"]} == first[7]
    # After the reconnection: the channels still wanted, each from where it was.
    assert [(f["type"], f["channel"], f.get("since")) for f in second] == [
        ("subscribe", "flaky", "e:5"),  # the `position` of its `subscribed`
        ("subscribe", "gappy", "e:7"),  # its last message
        ("subscribe", "lossy", "e:5"),
        ("subscribe", "old", None),
    ]

    key = {"message": "id", "lost": "reason", "subscribed": "recovered", "error": "code"}

    def of(channel: str) -> list[tuple[str, Any]]:
        """(type, the detail that matters) of the events about `channel`."""
        about = [e for e in found if e.get("channel") == channel]
        return [(e["type"], e.get(key.get(e["type"], ""))) for e in about]

    assert of("flaky") == [("error", "unavailable"), ("subscribed", None), ("subscribed", True)]
    assert of("gappy") == [
        ("subscribed", None),
        ("message", "e:6"),
        ("lost", "gap"),
        ("message", "e:7"),
        ("join", None),
        ("subscribed", True),
    ]
    assert of("lossy") == [("subscribed", None), ("subscribed", False), ("lost", "not_recovered")]
    assert of("invalid!") == [("error", "invalid_channel")]
    assert of("temp") == [("subscribed", None)]
    # Resubscribed without `since`: nothing says what was missed in between.
    assert of("old") == [("subscribed", None), ("subscribed", None), ("lost", "not_recovered")]
    assert [e["worker"] for e in found if e["type"] == "welcome"] == ["fake-1", "fake-2"]


# HS256 needs 32 bytes at least; API keys 16 characters.
JWT_SECRET = "browser-client-tests-jwt-secret-0123456789abcdefgh"
API_KEY = "browser-client-tests-api-key"


def make_token(ttl: float, channel: str) -> str:
    """A JWT for user `ann` that may subscribe and publish to `channel`."""
    claims = {
        "sub": "ann",
        "exp": int(time.time() + ttl),
        "channels": {"subscribe": [channel], "publish": [channel]},
    }
    return jwt.encode(claims, JWT_SECRET, algorithm="HS256")


def exp_of(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


async def test_client_token_option_refresh_and_renewal(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    # The page comes from the worker the clients connect to: its own origin, allowed.
    worker = make_worker(
        *redis_args(redis_server, prefix, "--jwt-secret", JWT_SECRET, "--jwt-leeway", "0"),
        "--api-keys",
        json.dumps([API_KEY]),
    )
    channel = unique("tok")
    url = worker.ws + "/ws"
    issued: list[str] = []

    def issue(name: str) -> str:
        # The provider's backend: the first token lapses in 1 to 2 s, later ones do not.
        issued.append(make_token(2 if not issued else 600, channel))
        return issued[-1]

    async def publish(data: Any) -> str:
        return await worker.publish_async(channel, data, API_KEY)

    fixed, fresh = make_token(600, channel), make_token(900, channel)
    async with browser_page(worker, "client-js-token.png") as page:
        await page.expose_function("issueToken", issue)
        # A string token, added to a URL that has a query string of its own.
        await start_client(page, "fixed", url + "?app=test", (channel,), token=fixed)
        await start_client(page, "provided", url, (channel,), tokenFrom="issueToken")
        # A token the worker refuses (403): the browser sees only a failed attempt (1006),
        # so the client retries as it would after a network failure.
        await start_client(page, "expired", url, (channel,), token=make_token(-60, channel))

        for name in ("fixed", "provided"):
            await wait_count(page, name, "subscribed", 1)
        first = await publish("first")
        for name in ("fixed", "provided"):
            await wait_count(page, name, "message", 1)
        assert await page.evaluate("(t) => clients.fixed.client.refresh(t)", fresh) == exp_of(fresh)
        refused = await page.evaluate(
            "() => clients.fixed.client.refresh('not.a.jwt').then(() => null, (e) => e.code)"
        )
        assert refused == "invalid_token"

        # The provider's first token expires: close 1008 "token expired", then a new
        # connection with a fresh token, resubscribed with `since`.
        await wait_count(page, "provided", "subscribed", 2, timeout=2)
        second = await publish("second")
        for name in ("fixed", "provided"):
            await wait_count(page, name, "message", 2)
        # refresh() without a token asks the provider.
        expires = await page.evaluate("() => clients.provided.client.refresh()")
        assert expires == exp_of(issued[-1])

        await page.wait_for_function(
            """() => clients.expired.events.filter(
                (e) => e.state === "reconnecting").length >= 2"""
        )
        await page.evaluate("() => clients.expired.client.close()")
        found = {name: await events(page, name) for name in ("fixed", "provided", "expired")}

    assert len(issued) == 3  # the first connection, the reconnection, refresh()
    for name in ("fixed", "provided"):
        messages = [(e["id"], e["data"]) for e in found[name] if e["type"] == "message"]
        assert messages == [(first, "first"), (second, "second")], name
    assert states(found["fixed"]) == [("connecting", None), ("open", None)]
    provided = found["provided"]
    assert states(provided) == [
        ("connecting", None),
        ("open", None),
        ("reconnecting", 1008),
        ("connecting", None),
        ("open", None),
    ]
    assert next(e for e in provided if e.get("state") == "reconnecting")["reason"] == (
        "token expired"
    )
    assert [e.get("recovered") for e in provided if e["type"] == "subscribed"] == [None, True]
    assert [e for e in provided if e["type"] in ("lost", "error")] == []
    assert ("open", None) not in states(found["expired"])
    assert ("reconnecting", 1006) in states(found["expired"])
    # The tokens went in the query string (the app's own parameter kept); the worker's
    # log must not show them.
    log = worker.log()
    assert "/ws?app=test&token=" in log
    assert all(token not in log for token in (fixed, fresh, *issued))
