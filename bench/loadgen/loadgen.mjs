// The benchmark's load generator: WebSocket clients speaking protocol v1 (docs/protocol.md).
//
// Node with the `ws` library, so that receiving a delivery costs the generator a few
// microseconds and the generator is not what limits the service (bench/README.md says how
// that is checked). The many-connections tool (bench/many_connections.py) has its own
// generator in C (listeners.c): at 100,000 connections on the server's two cores, a
// Node process cost about twice the CPU per message received.
//
// One process; driven by bench/loadgen.py (`python -m bench`):
//
//   node loadgen.mjs '<config JSON>'
//
// It prints JSON lines on stdout: {"event":"ready"} once its clients are connected and
// subscribed (and warmed up), {"event":"drained"} when the measured phase is over, and
// {"event":"result", ...} last. Between "ready" and the measured phase it waits for a
// line on stdin, so that the runner can read the servers' CPU counters first. Progress
// goes to stderr.

import { performance } from "node:perf_hooks";
import readline from "node:readline";
import WebSocket from "ws";


const config = JSON.parse(process.argv[2]);
const now = () => performance.now(); // ms, monotonic, the same clock for send and receive

function log(message) {
  process.stderr.write(`loadgen: ${message}\n`);
}

function emit(event, fields = {}) {
  process.stdout.write(JSON.stringify({ event, ...fields }) + "\n");
}

const stdin = readline.createInterface({ input: process.stdin });
const lines = stdin[Symbol.asyncIterator]();
async function waitForGo() {
  const { done } = await lines.next();
  if (done) process.exit(0); // the runner went away
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

async function until(condition, timeoutMs, what) {
  const deadline = now() + timeoutMs;
  while (!condition()) {
    if (now() > deadline) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await sleep(5);
  }
}

// --- latency and throughput records --------------------------------------------------

// Every latency of the measured phase, in ms (capped: past it, every other one is kept).
class Latencies {
  constructor(cap = 4_000_000) {
    this.values = new Float64Array(1 << 16);
    this.count = 0;
    this.cap = cap;
    this.stride = 1;
    this.seen = 0;
  }
  add(ms) {
    if (this.seen++ % this.stride !== 0) return;
    if (this.count === this.values.length) {
      if (this.count >= this.cap) {
        // Keep every other value, and from now on every other one of what comes.
        const half = new Float64Array(this.cap);
        for (let i = 0; i < this.count; i += 2) half[i >> 1] = this.values[i];
        this.values = half;
        this.count = Math.ceil(this.count / 2);
        this.stride *= 2;
        return;
      }
      const bigger = new Float64Array(Math.min(this.values.length * 2, this.cap));
      bigger.set(this.values);
      this.values = bigger;
    }
    this.values[this.count++] = ms;
  }
  summary() {
    const sorted = this.values.slice(0, this.count).sort();
    const at = (q) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] : null);
    // A log-spaced histogram for the plot: 40 bins per decade from 0.01 ms to 100 s.
    const bins = new Array(240).fill(0);
    for (const v of sorted) {
      const i = Math.floor((Math.log10(Math.max(v, 0.01)) + 2) * 40);
      bins[Math.min(bins.length - 1, Math.max(0, i))] += 1;
    }
    return {
      samples: sorted.length,
      p50_ms: at(0.5),
      p90_ms: at(0.9),
      p99_ms: at(0.99),
      p999_ms: at(0.999),
      max_ms: sorted.length ? sorted[sorted.length - 1] : null,
      histogram: { first_ms: 0.01, bins_per_decade: 40, counts: bins },
    };
  }
}

// Deliveries per 100 ms of the measured phase.
class Timeline {
  constructor() {
    this.start = null;
    this.counts = [];
  }
  begin() {
    this.start = now();
  }
  add() {
    if (this.start === null) return;
    const i = Math.floor((now() - this.start) / 100);
    while (this.counts.length <= i) this.counts.push(0);
    this.counts[i] += 1;
  }
}

// --- clients ----------------------------------------------------------------------------

const stats = {
  deliveries: 0, // message frames received in the measured phase
  received: 0, // message frames received at all
  duplicates: 0, // a sequence number not above the last one seen (repeated or reordered)
  gaps: 0, // a sequence number more than one above the last one (missed, or reordered)
  closes: {}, // unexpected closes by code
  errors: {}, // error frames by code
};
const latencies = new Latencies();
const timeline = new Timeline();
let measuring = false;
// Resolves the publisher's wait for progress (max mode) at the next delivery.
let wake = null;
const progress = () =>
  new Promise((resolve) => {
    wake = resolve;
    setTimeout(resolve, 50); // never stuck on a delivery that does not come
  });

function count(map, key) {
  map[key] = (map[key] || 0) + 1;
}

// One WebSocket client of /ws, subscribed to one channel.
class Subscriber {
  constructor(url, channel) {
    this.url = url;
    this.channel = channel;
    this.last = -1; // the last sequence number received
    this.lastId = null; // the last message id received (for `since`)
    this.subscribed = false;
    this.recovered = null;
    this.worker = null;
    this.expectClose = false;
  }

  connect() {
    return new Promise((resolve, reject) => {
      // Offers per-message deflate, as browsers do; the server decides (WS_PER_MESSAGE_DEFLATE).
      const ws = new WebSocket(this.url, { perMessageDeflate: config.deflate !== false });
      this.ws = ws;
      this.subscribed = false;
      // Events of a socket this client already dropped are not its business any more.
      ws.on("error", (error) => {
        if (ws === this.ws && !this.subscribed) reject(error);
      });
      ws.on("close", (code) => {
        if (ws !== this.ws) return;
        if (!this.expectClose) count(stats.closes, code);
        if (!this.subscribed) reject(new Error(`closed ${code} before subscribing`));
      });
      ws.on("message", (data) => {
        if (ws !== this.ws) return;
        const frame = JSON.parse(data.toString());
        if (frame.type === "message") {
          this.onMessage(frame);
        } else if (frame.type === "welcome") {
          this.worker = frame.worker;
          const subscribe = { type: "subscribe", channel: this.channel };
          if (this.lastId !== null) subscribe.since = this.lastId;
          ws.send(JSON.stringify(subscribe));
        } else if (frame.type === "subscribed") {
          this.subscribed = true;
          this.recovered = frame.recovered ?? null;
          resolve(this);
        } else if (frame.type === "error") {
          count(stats.errors, frame.code);
          if (!this.subscribed) reject(new Error(`error ${frame.code}: ${frame.message}`));
        }
      });
    });
  }

  onMessage(frame) {
    const data = frame.data;
    stats.received += 1;
    this.lastId = frame.id;
    if (data.s <= this.last) stats.duplicates += 1;
    else if (data.s > this.last + 1 && this.last >= 0) stats.gaps += 1;
    if (data.s > this.last) this.last = data.s;
    if (measuring && data.m) {
      stats.deliveries += 1;
      latencies.add(now() - data.t);
      timeline.add();
    }
    if (wake !== null) {
      const resolve = wake;
      wake = null;
      resolve();
    }
  }

  // Cut the TCP connection without a closing handshake, as a network failure would.
  drop() {
    const ws = this.ws;
    this.ws = null;
    this.subscribed = false;
    ws.terminate();
  }

  close() {
    this.expectClose = true;
    this.ws.close();
  }
}

// A publishing client of /ws: sends `publish` commands and counts their acknowledgements.
class Publisher {
  constructor(url, channels) {
    this.url = url;
    this.channels = channels;
    this.next = new Map(channels.map((c) => [c, 0])); // next sequence number per channel
    this.acked = new Map(channels.map((c) => [c, 0])); // acknowledged per channel
    this.inFlight = 0;
    this.refused = 0;
    this.turn = 0;
    this.onAck = null;
  }

  connect() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, { perMessageDeflate: config.deflate !== false });
      this.ws = ws;
      ws.on("error", reject);
      ws.on("close", (code) => {
        if (!this.closing) count(stats.closes, `publisher ${code}`);
      });
      ws.on("message", (data) => {
        const frame = JSON.parse(data.toString());
        if (frame.type === "welcome") resolve(this);
        else if (frame.type === "published") {
          this.inFlight -= 1;
          const channel = frame.channel;
          this.acked.set(channel, this.acked.get(channel) + 1);
          if (this.onAck) this.onAck();
        } else if (frame.type === "error") {
          this.inFlight -= 1;
          this.refused += 1;
          count(stats.errors, frame.code);
          if (this.onAck) this.onAck();
        }
      });
    });
  }

  // Publish one message to the next channel in turn.
  publish(measured) {
    const channel = this.channels[this.turn++ % this.channels.length];
    const s = this.next.get(channel);
    this.next.set(channel, s + 1);
    this.inFlight += 1;
    const data = { s, t: now(), m: measured ? 1 : 0, p: padding };
    this.ws.send(JSON.stringify({ type: "publish", channel, data, ref: s }));
  }

  close() {
    this.closing = true;
    this.ws.close();
  }
}

const padding = "x".repeat(Math.max(0, config.payload ?? 0));

// Connect `clients`, at most `parallel` handshakes at a time (all at once: Infinity).
async function connectAll(clients, parallel) {
  const failures = [];
  let next = 0;
  async function lane() {
    while (next < clients.length) {
      const client = clients[next++];
      const started = now();
      try {
        await client.connect();
        client.connectMs = now() - started;
      } catch (error) {
        failures.push(String(error.message || error));
      }
    }
  }
  const lanes = Math.min(parallel, clients.length);
  await Promise.all(Array.from({ length: lanes }, lane));
  return failures;
}

function urlFor(i) {
  return config.urls[i % config.urls.length];
}

function channelName(i) {
  return `${config.channelPrefix}${i}`;
}

// Subscribers spread over the workers and the channels.
function makeSubscribers(n, channels) {
  return Array.from({ length: n }, (_, i) => new Subscriber(urlFor(i), channelName(i % channels)));
}

// Publishers spread over the workers, sharing the channels between them.
function makePublishers(n, channels) {
  // One publisher per channel at most: each numbers its channels' messages itself.
  return Array.from({ length: Math.min(n, channels) }, (_, p) => {
    const mine = [];
    for (let c = p; c < channels; c += n) mine.push(channelName(c));
    return new Publisher(urlFor(p + 1), mine);
  });
}

// Publish at `rate` per second over all publishers for `ms`.
async function publishAtRate(publishers, rate, ms, measured) {
  const started = now();
  let sent = 0;
  let turn = 0;
  while (now() - started < ms) {
    const due = Math.floor(((now() - started) / 1000) * rate);
    while (sent < due) {
      publishers[turn++ % publishers.length].publish(measured);
      sent += 1;
    }
    await sleep(2);
  }
  return sent;
}

// Publish as fast as the service takes it: at most `window` messages not yet delivered
// to every subscriber, so that the outboxes never overflow.
async function publishAtMax(publishers, subscribers, windowSize, ms, measured) {
  const started = now();
  let sent = 0;
  let turn = 0;
  const perMessage = subscribers.length / publishers.reduce((n, p) => n + p.channels.length, 0);
  while (now() - started < ms) {
    const delivered = measured ? stats.deliveries : stats.received;
    const behind = sent - delivered / perMessage;
    if (behind < windowSize) {
      publishers[turn++ % publishers.length].publish(measured);
      sent += 1;
      if (sent % 64 === 0) await new Promise(setImmediate);
    } else {
      await progress();
    }
  }
  return sent;
}

function expectedDeliveries(publishers, subscribers) {
  const perChannel = new Map();
  for (const s of subscribers) perChannel.set(s.channel, (perChannel.get(s.channel) || 0) + 1);
  let total = 0;
  for (const p of publishers) {
    for (const [channel, acked] of p.acked) total += acked * (perChannel.get(channel) || 0);
  }
  return total;
}

async function drain(publishers, subscribers, timeoutMs) {
  try {
    await until(() => publishers.every((p) => p.inFlight === 0), timeoutMs, "publish acknowledgements");
    const expected = expectedDeliveries(publishers, subscribers);
    await until(() => stats.received >= expected, timeoutMs, "every delivery");
  } catch (error) {
    log(String(error.message));
  }
}

function memory() {
  const usage = process.memoryUsage();
  return { rss_mb: usage.rss / 2 ** 20 };
}

// --- scenarios ----------------------------------------------------------------------------

async function traffic({ max }) {
  const subscribers = makeSubscribers(config.subscribers, config.channels);
  const publishers = makePublishers(config.publishers, config.channels);
  const failures = await connectAll([...subscribers, ...publishers], 50);
  if (failures.length) throw new Error(`${failures.length} clients failed to connect: ${failures[0]}`);
  log(`${subscribers.length} subscribers and ${publishers.length} publishers connected`);
  // Warm-up, the same way as the measured phase but not measured.
  if (max) await publishAtMax(publishers, subscribers, config.window, config.warmup * 1000, false);
  else await publishAtRate(publishers, config.rate, config.warmup * 1000, false);
  await drain(publishers, subscribers, 10_000);
  emit("ready");
  await waitForGo();
  const cpuBefore = process.cpuUsage();
  measuring = true;
  timeline.begin();
  const started = now();
  const sent = max
    ? await publishAtMax(publishers, subscribers, config.window, config.duration * 1000, true)
    : await publishAtRate(publishers, config.rate, config.duration * 1000, true);
  await drain(publishers, subscribers, 15_000);
  const elapsed = (now() - started) / 1000;
  measuring = false;
  const cpu = process.cpuUsage(cpuBefore);
  emit("drained");
  const expected = expectedDeliveries(publishers, subscribers);
  const result = {
    subscribers: subscribers.length,
    publishers: publishers.length,
    channels: config.channels,
    published: sent,
    refused: publishers.reduce((n, p) => n + p.refused, 0),
    seconds: elapsed,
    deliveries: stats.deliveries,
    deliveries_per_s: stats.deliveries / elapsed,
    lost: Math.max(0, expected - (stats.received - stats.duplicates)),
    duplicates: stats.duplicates,
    gaps: stats.gaps,
    closes: stats.closes,
    errors: stats.errors,
    latency: latencies.summary(),
    timeline_100ms: timeline.counts,
    loadgen_cpu_s: (cpu.user + cpu.system) / 1e6,
    loadgen: memory(),
  };
  for (const c of [...subscribers, ...publishers]) c.close();
  return result;
}

async function idle() {
  const subscribers = makeSubscribers(config.subscribers, config.channels);
  const failures = await connectAll(subscribers, 100);
  if (failures.length) throw new Error(`${failures.length} clients failed to connect: ${failures[0]}`);
  emit("ready");
  await waitForGo(); // the runner reads the workers' memory meanwhile
  for (const s of subscribers) s.close();
  return { connections: subscribers.length, closes: stats.closes, errors: stats.errors };
}

async function burst() {
  const subscribers = makeSubscribers(config.subscribers, config.channels);
  emit("ready");
  await waitForGo();
  const started = now();
  const failures = await connectAll(subscribers, Infinity);
  const elapsed = now() - started;
  emit("drained");
  const times = subscribers.filter((s) => s.subscribed).map((s) => s.connectMs).sort((a, b) => a - b);
  const result = {
    clients: subscribers.length,
    subscribed: times.length,
    failures: failures.length,
    first_failure: failures[0] ?? null,
    all_subscribed_ms: elapsed,
    p50_ms: times[Math.floor(times.length * 0.5)] ?? null,
    p99_ms: times[Math.floor(times.length * 0.99)] ?? null,
    closes: stats.closes,
    errors: stats.errors,
  };
  for (const s of subscribers) s.close();
  return result;
}

// Every subscriber's connection drops at once while messages keep flowing; all reconnect
// at once and resume with `since`.
async function storm() {
  const subscribers = makeSubscribers(config.subscribers, config.channels);
  const publishers = makePublishers(config.publishers, config.channels);
  const failures = await connectAll([...subscribers, ...publishers], 50);
  if (failures.length) throw new Error(`${failures.length} clients failed to connect: ${failures[0]}`);
  await publishAtRate(publishers, config.rate, 1000, false);
  emit("ready");
  await waitForGo();
  measuring = true;
  const publishing = publishAtRate(publishers, config.rate, config.duration * 1000, true);
  await sleep(Math.min(1000, (config.duration * 1000) / 4));
  for (const s of subscribers) s.drop();
  const started = now();
  const reconnectFailures = await connectAll(subscribers, Infinity);
  const resubscribedMs = now() - started;
  await publishing;
  await drain(publishers, subscribers, 15_000);
  measuring = false;
  emit("drained");
  const expected = expectedDeliveries(publishers, subscribers);
  const result = {
    clients: subscribers.length,
    reconnect_failures: reconnectFailures.length,
    first_failure: reconnectFailures[0] ?? null,
    all_resubscribed_ms: resubscribedMs,
    recovered: subscribers.filter((s) => s.recovered === true).length,
    published: publishers.reduce((n, p) => n + [...p.acked.values()].reduce((a, b) => a + b, 0), 0),
    lost: Math.max(0, expected - (stats.received - stats.duplicates)),
    duplicates: stats.duplicates,
    closes: stats.closes,
    errors: stats.errors,
    latency: latencies.summary(),
  };
  for (const c of [...subscribers, ...publishers]) c.close();
  return result;
}

const scenarios = {
  fanout: () => traffic({ max: false }),
  max: () => traffic({ max: true }),
  idle,
  burst,
  storm,
};

try {
  const result = await scenarios[config.kind]();
  emit("result", { result });
  await sleep(50);
  process.exit(0);
} catch (error) {
  emit("failed", { error: String(error.stack || error) });
  process.exit(1);
}
