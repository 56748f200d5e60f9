// What the tests in test/ share: the worker's URLs, clients that close themselves after
// each test, and waits bounded by a timeout (never a fixed sleep). Kept out of test/,
// where Node's runner would take it for a test file.
import { randomUUID } from "node:crypto";
import net from "node:net";

import { BroadcastClient } from "broadcast-service-client";
import WebSocket from "ws";

/** A URL the test needs from its environment; tests/e2e/test_js_package.py sets them. */
function required(name) {
  const value = process.env[name];
  if (!value) {
    throw new Error(
      `${name} is not set: these tests need a running worker ` +
        "(tests/e2e/test_js_package.py starts one and sets it)",
    );
  }
  return value;
}

/** The worker the tests use, and one with HISTORY_SIZE=0 (for `lost`). */
export const HTTP = required("BROADCAST_URL_HTTP");
export const WS = required("BROADCAST_URL_WS");
export const HTTP_NO_HISTORY = required("BROADCAST_URL_HTTP_NO_HISTORY");
export const WS_NO_HISTORY = required("BROADCAST_URL_WS_NO_HISTORY");

// Scales every deadline, as TEST_TIME_UNIT does for the Python tests.
const UNIT = Number(process.env.TEST_TIME_UNIT || "1");
export const WAIT_MS = 5000 * UNIT;
/** Per test: the waits inside fail first, with a better message. */
export const TEST_TIMEOUT_MS = 30000 * UNIT;

export function unique(prefix = "js") {
  return `${prefix}-${randomUUID().slice(0, 12)}`;
}

export const EVENTS = [
  "state",
  "welcome",
  "subscribed",
  "message",
  "lost",
  "join",
  "leave",
  "error",
];

/**
 * A client with the ws package's WebSocket (Node 20 has no global one) that records
 * every event, as {type, ...detail}, and is closed when the test `t` ends.
 */
export function recordedClient(t, urls, options = {}) {
  const client = new BroadcastClient(urls, { WebSocket, minDelay: 50, ...options });
  const events = [];
  for (const type of EVENTS) {
    client.addEventListener(type, (e) => events.push({ type, ...e.detail }));
  }
  t.after(() => client.close());
  return { client, events };
}

/** Polls `condition` until it returns something truthy, or fails after `timeout` ms. */
export async function waitFor(condition, what, timeout = WAIT_MS) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const result = await condition();
    if (result) return result;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}

/** The recorded events of `type` matching `match` (an object of fields to compare). */
export function eventsOf(events, type, match = {}) {
  return events.filter(
    (e) => e.type === type && Object.entries(match).every(([key, value]) => e[key] === value),
  );
}

/** Waits for the `n`th recorded event of `type` matching `match`, and returns it. */
export function waitEvent(events, type, match = {}, n = 1) {
  const text = `${n} ${type} event(s) matching ${JSON.stringify(match)}`;
  return waitFor(() => eventsOf(events, type, match)[n - 1], text);
}

/** Publishes over the HTTP API, as a backend does; resolves with the message id. */
export async function httpPublish(base, channel, data) {
  const response = await fetch(`${base}/api/channels/${channel}/messages`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ data }),
    signal: AbortSignal.timeout(WAIT_MS),
  });
  if (!response.ok) throw new Error(`HTTP publish: ${response.status} ${await response.text()}`);
  return (await response.json()).id;
}

/**
 * A TCP relay to the worker that the test can cut, as a network failure or a killed
 * worker would: the client sees its connection break (1006) and must reconnect.
 */
export async function startRelay(t, target) {
  const { hostname, port } = new URL(target);
  const sockets = new Set();
  const server = net.createServer((downstream) => {
    const upstream = net.connect(Number(port), hostname);
    for (const [a, b] of [
      [downstream, upstream],
      [upstream, downstream],
    ]) {
      sockets.add(a);
      a.pipe(b);
      a.on("error", () => b.destroy());
      a.on("close", () => {
        sockets.delete(a);
        b.destroy();
      });
    }
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    return new Promise((resolve) => server.close(resolve));
  });
  return {
    url: `ws://127.0.0.1:${server.address().port}${new URL(target).pathname}`,
    cut() {
      for (const socket of sockets) socket.destroy();
    },
  };
}

/** A promise with its resolve function, to hold a token provider (and so an attempt). */
export function gate() {
  let open;
  const promise = new Promise((resolve) => {
    open = resolve;
  });
  return { promise, open };
}
