// The package's client against a real worker and a real redis-server (started by
// tests/e2e/test_js_package.py), imported by name as an application imports it.
import assert from "node:assert/strict";
import { test } from "node:test";

import { BroadcastClient } from "broadcast-service-client";
import WebSocket from "ws";

import {
  HTTP,
  HTTP_NO_HISTORY,
  TEST_TIMEOUT_MS,
  WS,
  WS_NO_HISTORY,
  eventsOf,
  gate,
  httpPublish,
  recordedClient,
  startRelay,
  unique,
  waitEvent,
} from "../harness.mjs";

const options = { timeout: TEST_TIMEOUT_MS };

/** The `state` events so far, reduced to what a test compares. */
function states(events) {
  return eventsOf(events, "state").map((e) => e.state);
}

test("connects, subscribes, publishes and receives its own message", options, async (t) => {
  const channel = unique();
  const { client, events } = recordedClient(t, WS);
  assert.equal(client.state, "closed");
  assert.equal(client.worker, null);
  client.subscribe(channel);
  client.connect();
  const welcome = await waitEvent(events, "welcome");
  assert.equal(typeof welcome.worker, "string");
  assert.equal(client.worker, welcome.worker);
  const subscribed = await waitEvent(events, "subscribed", { channel });
  assert.equal(subscribed.recovered, undefined); // a first subscribe
  assert.match(subscribed.position, /^\w+:\d+$/);
  assert.equal(client.state, "open");

  const id = await client.publish(channel, { text: "hello" });
  const message = await waitEvent(events, "message", { channel });
  assert.deepEqual(message, { type: "message", channel, id, data: { text: "hello" } });
  assert.deepEqual(eventsOf(events, "lost"), []);
  assert.deepEqual(eventsOf(events, "error"), []);
});

test("reports the states connecting, open and closed, in order", options, async (t) => {
  const { client, events } = recordedClient(t, WS);
  client.connect();
  await waitEvent(events, "state", { state: "open" });
  client.close();
  assert.equal(client.state, "closed");
  const [connecting, open, closed] = eventsOf(events, "state");
  assert.deepEqual(states(events), ["connecting", "open", "closed"]);
  assert.deepEqual(connecting, {
    type: "state",
    state: "connecting",
    url: WS,
    code: undefined,
    reason: undefined,
    delay: undefined,
  });
  assert.deepEqual([open.code, open.reason, open.delay], [undefined, undefined, undefined]);
  assert.deepEqual([closed.code, closed.reason], [1000, "closed by the client"]);
  // The welcome comes before `open`: listeners of `welcome` may still change things.
  const order = events.map((e) => e.type);
  assert.ok(order.indexOf("welcome") < order.lastIndexOf("state"));
});

test("two clients on one channel receive the same messages in order", options, async (t) => {
  const channel = unique();
  const a = recordedClient(t, WS);
  const b = recordedClient(t, WS);
  for (const { client } of [a, b]) {
    client.subscribe(channel);
    client.connect();
  }
  await waitEvent(a.events, "subscribed", { channel });
  await waitEvent(b.events, "subscribed", { channel });
  const ids = [];
  for (let n = 0; n < 5; n += 1) {
    const publisher = n % 2 ? a.client : b.client;
    ids.push(await publisher.publish(channel, n));
  }
  for (const { events } of [a, b]) {
    await waitEvent(events, "message", { channel }, ids.length);
    const got = eventsOf(events, "message", { channel });
    assert.deepEqual(
      got.map((e) => [e.id, e.data]),
      ids.map((id, n) => [id, n]),
    );
  }
});

test("join and leave announce a subscriber that gave info", options, async (t) => {
  const channel = unique();
  const watcher = recordedClient(t, WS);
  watcher.client.subscribe(channel);
  watcher.client.connect();
  await waitEvent(watcher.events, "subscribed", { channel });
  const guest = recordedClient(t, WS);
  guest.client.subscribe(channel, { info: { name: "ada" } });
  guest.client.connect();
  const join = await waitEvent(watcher.events, "join", { channel });
  assert.deepEqual(join.info, { name: "ada" });
  guest.client.unsubscribe(channel);
  const leave = await waitEvent(watcher.events, "leave", { channel });
  assert.deepEqual(leave.info, { name: "ada" });
});

test("unsubscribe stops the channel's messages", options, async (t) => {
  const channel = unique();
  const { client, events } = recordedClient(t, WS);
  const other = recordedClient(t, WS);
  other.client.subscribe(channel);
  other.client.connect();
  client.subscribe(channel);
  client.connect();
  await waitEvent(events, "subscribed", { channel });
  await waitEvent(other.events, "subscribed", { channel });
  const before = await client.publish(channel, "before");
  await waitEvent(events, "message", { id: before });

  client.unsubscribe(channel);
  // Published after the unsubscribe, on the same connection: the server handles it after.
  const during = await client.publish(channel, "during");
  await waitEvent(other.events, "message", { id: during });
  // Subscribed again, the client gets what follows. A channel's messages come in order,
  // so had `during` been sent to it, it would have arrived before `after`.
  client.subscribe(channel);
  await waitEvent(events, "subscribed", { channel }, 2);
  const after = await other.client.publish(channel, "after");
  await waitEvent(events, "message", { id: after });
  const ids = eventsOf(events, "message", { channel }).map((e) => e.id);
  assert.deepEqual(ids, [before, after]);
});

test("publish without a connection rejects at once with not_connected", options, async (t) => {
  const channel = unique();
  const { client, events } = recordedClient(t, WS);
  await assert.rejects(client.publish(channel, 1), { code: "not_connected" });
  await assert.rejects(client.refresh("a.token"), { code: "not_connected" });
  client.connect();
  await waitEvent(events, "welcome");
  client.close();
  const error = await client.publish(channel, 1).catch((e) => e);
  assert.ok(error instanceof Error);
  assert.equal(error.code, "not_connected");
});

test("an error frame rejects the publish with its code", options, async (t) => {
  const { client, events } = recordedClient(t, WS);
  client.connect();
  await waitEvent(events, "welcome");
  const error = await client.publish("not a valid name!", 1).catch((e) => e);
  assert.ok(error instanceof Error);
  assert.equal(error.code, "invalid_channel");
  // Nothing else is reported for it: the rejection is the caller's to handle.
  assert.deepEqual(eventsOf(events, "error"), []);
  // The connection carries on.
  const channel = unique();
  client.subscribe(channel);
  await waitEvent(events, "subscribed", { channel });
  assert.match(await client.publish(channel, 2), /^\w+:\d+$/);
});

test("a refused subscribe is an error event, and the channel is forgotten", options, async (t) => {
  const { client, events } = recordedClient(t, WS);
  client.subscribe("bad name!");
  client.connect();
  const error = await waitEvent(events, "error");
  assert.equal(error.code, "invalid_channel");
  assert.equal(error.channel, "bad name!");
  assert.equal(typeof error.message, "string");
  // Forgotten: a reconnect does not send it again.
  client.close();
  client.connect();
  await waitEvent(events, "welcome", {}, 2);
  const channel = unique();
  client.subscribe(channel);
  await waitEvent(events, "subscribed", { channel });
  assert.equal(eventsOf(events, "error").length, 1);
});

test("refresh resolves with null from a worker without auth", options, async (t) => {
  const { client, events } = recordedClient(t, WS);
  client.connect();
  await waitEvent(events, "welcome");
  // No token given, and the client has none to send.
  await assert.rejects(client.refresh(), TypeError);
  assert.equal(await client.refresh("any.token.here"), null);
  // The refreshed token is the client's now: sent again without an argument.
  assert.equal(await client.refresh(), null);
});

test("close() then connect() resumes every channel with what was missed", options, async (t) => {
  const channel = unique();
  const { client, events } = recordedClient(t, WS);
  client.subscribe(channel);
  client.connect();
  await waitEvent(events, "subscribed", { channel });
  const first = await client.publish(channel, "first");
  await waitEvent(events, "message", { id: first });
  client.close();

  const missed = await httpPublish(HTTP, channel, "missed");
  client.connect();
  const resumed = await waitEvent(events, "subscribed", { channel }, 2);
  assert.equal(resumed.recovered, true);
  await waitEvent(events, "message", { id: missed });
  const live = await client.publish(channel, "live");
  await waitEvent(events, "message", { id: live });
  const got = eventsOf(events, "message", { channel }).map((e) => e.data);
  assert.deepEqual(got, ["first", "missed", "live"]);
  assert.deepEqual(states(events), ["connecting", "open", "closed", "connecting", "open"]);
  assert.deepEqual(eventsOf(events, "lost"), []);
});

test("a broken connection reconnects to the next URL and resumes", options, async (t) => {
  const channel = unique();
  const relay = await startRelay(t, WS);
  // The token provider holds each attempt until the test lets it go, so that a message
  // is surely published while the client is away (no token is sent: auth is off).
  let hold = { promise: Promise.resolve(undefined) };
  const { client, events } = recordedClient(t, [relay.url, WS], { token: () => hold.promise });
  client.subscribe(channel);
  client.connect();
  await waitEvent(events, "subscribed", { channel });
  const first = await client.publish(channel, "first");
  await waitEvent(events, "message", { id: first });

  hold = gate();
  relay.cut();
  const reconnecting = await waitEvent(events, "state", { state: "reconnecting" });
  assert.equal(reconnecting.code, 1006);
  assert.equal(typeof reconnecting.delay, "number");
  await assert.rejects(client.publish(channel, "nope"), { code: "not_connected" });
  await waitEvent(events, "state", { state: "connecting", url: WS });
  const missed = await httpPublish(HTTP, channel, "missed");
  hold.open(undefined);

  const resumed = await waitEvent(events, "subscribed", { channel }, 2);
  assert.equal(resumed.recovered, true);
  await waitEvent(events, "message", { id: missed });
  assert.deepEqual(
    eventsOf(events, "message", { channel }).map((e) => e.data),
    ["first", "missed"],
  );
  assert.deepEqual(states(events), ["connecting", "open", "reconnecting", "connecting", "open"]);
  assert.deepEqual(eventsOf(events, "lost"), []);
  assert.equal(eventsOf(events, "welcome").length, 2);
});

test("a channel whose history cannot reach back is reported lost", options, async (t) => {
  const channel = unique();
  const { client, events } = recordedClient(t, WS_NO_HISTORY);
  client.subscribe(channel);
  client.connect();
  await waitEvent(events, "subscribed", { channel });
  const first = await client.publish(channel, "first");
  await waitEvent(events, "message", { id: first });
  client.close();
  await httpPublish(HTTP_NO_HISTORY, channel, "missed"); // kept nowhere: HISTORY_SIZE=0
  client.connect();
  const resumed = await waitEvent(events, "subscribed", { channel }, 2);
  assert.equal(resumed.recovered, false);
  const lost = await waitEvent(events, "lost", { channel });
  assert.deepEqual(lost, { type: "lost", channel, reason: "not_recovered" });
});

test("without a WebSocket class the constructor says to pass one", options, () => {
  const global = Object.getOwnPropertyDescriptor(globalThis, "WebSocket");
  // Node 22 and later have a global WebSocket: hide it, as Node 20 has none.
  if (global) delete globalThis.WebSocket;
  try {
    assert.throws(() => new BroadcastClient(WS), {
      name: "TypeError",
      message: /needs a WebSocket class and this runtime has no global one.*WebSocket option.*"ws"/,
    });
  } finally {
    if (global) Object.defineProperty(globalThis, "WebSocket", global);
  }
  assert.throws(() => new BroadcastClient(WS, { WebSocket: 42 }), {
    name: "TypeError",
    message: "the WebSocket option must be a WebSocket class, not number",
  });
  // Given one, it is used.
  const client = new BroadcastClient(WS, { WebSocket });
  assert.equal(client.state, "closed");
});

test("the constructor refuses what cannot work", options, () => {
  assert.throws(() => new BroadcastClient([], { WebSocket }), TypeError);
  assert.throws(() => new BroadcastClient("http://example.com/ws", { WebSocket }), {
    name: "TypeError",
    message: /not a ws\(s\) URL/,
  });
});
