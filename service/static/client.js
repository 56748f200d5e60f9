// BroadcastClient: protocol v1 (docs/protocol.md) over one WebSocket at a time, with
// reconnection, worker failover and resume, as docs/clients.md describes.
//
//   import { BroadcastClient } from "/static/client.js";
//   const client = new BroadcastClient([`ws://${location.host}/ws`], { token: getToken });
//   client.addEventListener("message", (e) => show(e.detail.channel, e.detail.data));
//   client.subscribe("chat:lobby");
//   client.connect();
//
// An ES module with no dependencies and no build step: it is served as is, and it is
// also the npm package broadcast-service-client (package.json, client.d.ts beside it).
// Under Node before 22, which has no global WebSocket, pass one: { WebSocket } from "ws".

// 1005 and 1006 are never sent by a server: the browser reports them for a connection
// that closed without a status or broke (a killed worker, a failed attempt).
const RECONNECT_CODES = new Set([1001, 1005, 1006, 1011, 1012, 1013, 1014]);
const SERVICE_RESTART = 1012;
const TRY_AGAIN_LATER = 1013;
const TRY_AGAIN_LATER_BASE = 1000;
// Not a code a server sends: the browser's way of saying an attempt failed or a
// connection broke, which it does not tell apart.
const ABNORMAL_CLOSURE = 1006;
// The reason of the 1008 a worker closes with when the connection's token lapses: with
// a token provider, a new connection (with a fresh token) is the cure.
const POLICY_VIOLATION = 1008;
const TOKEN_EXPIRED = "token expired";
// WebSocket.OPEN in the standard and in ws: a literal, so that a WebSocket class given as
// an option needs no static constants.
const OPEN = 1;

/** An Error with the protocol error code (or "not_connected", "connection_lost"). */
function clientError(code, message) {
  const error = new Error(`${code}: ${message}`);
  error.code = code;
  return error;
}

/** `min(max, base * 2**n) * uniform(0.5, 1)`: jittered so that clients cut off together
 * by a dying worker do not all come back in the same instant. */
function backoff(n, base, max) {
  return Math.min(max, base * 2 ** n) * (0.5 + Math.random() / 2);
}

/** `url` with `token` as its `token` query parameter (the rest of the query kept). */
function withToken(url, token) {
  if (!token) return url;
  const parsed = new URL(url);
  parsed.searchParams.set("token", token); // URL-encoded by URLSearchParams
  return parsed.href;
}

export class BroadcastClient extends EventTarget {
  #urls;
  #minDelay;
  #maxDelay;
  #openTimeout;
  #token; // a string, a function returning one (or a Promise of one), or undefined
  #WebSocket; // the class each connection is made with
  #state = "closed";
  #worker = null;
  #running = false;
  #socket = null;
  #urlIndex = 0;
  #ready = false; // the current connection received `welcome`: commands may go out
  #attempt = 0; // retries since the last `welcome`
  #cause = null; // the last close code the server sent since then
  #timer = null;
  #openTimer = null;
  #nextRef = 1;
  // ref -> {kind, channel, entry?, resolve?, reject?}; refs are never reused, so a
  // reply can never be taken for that of a later command.
  #replies = new Map();
  // channel -> {info, last, confirmed, onServer, retries, timer}: `last` (where to
  // resume) and `confirmed` (subscribed once) outlive connections; the rest describes
  // the subscription on the current one.
  #channels = new Map();

  /**
   * @param {string | string[]} urls one URL (a load balancer) or a list of workers
   * @param {{token?: string | (() => string | Promise<string>), minDelay?: number,
   *   maxDelay?: number, openTimeout?: number, WebSocket?: typeof WebSocket}} options times
   *   in ms; `token` is a JWT or a function called before every connection attempt, sent
   *   as `?token=`; `WebSocket` the class to connect with (default: the global one)
   */
  constructor(
    urls,
    {
      token,
      minDelay = 250,
      maxDelay = 10000,
      openTimeout = 5000,
      WebSocket = globalThis.WebSocket,
    } = {},
  ) {
    super();
    // Checked here rather than at the first connect(), which a timer runs, out of reach
    // of the caller's try/catch (Node 20 has no global WebSocket without a flag).
    if (typeof WebSocket !== "function") {
      throw new TypeError(
        WebSocket === undefined
          ? "BroadcastClient needs a WebSocket class and this runtime has no global one " +
              '(Node before 22): pass one as the WebSocket option, e.g. from the "ws" package'
          : `the WebSocket option must be a WebSocket class, not ${typeof WebSocket}`,
      );
    }
    this.#WebSocket = WebSocket;
    this.#urls = typeof urls === "string" ? [urls] : [...urls];
    if (this.#urls.length === 0) throw new TypeError("BroadcastClient needs at least one URL");
    for (const url of this.#urls) {
      // Checked here, because a bad URL found later, in a timer, would throw where
      // nobody can catch it.
      if (!/^wss?:$/.test(new URL(url).protocol)) throw new TypeError(`not a ws(s) URL: ${url}`);
    }
    this.#minDelay = minDelay;
    this.#maxDelay = maxDelay;
    this.#openTimeout = openTimeout;
    this.#token = token;
  }

  /** "connecting", "open" (a `welcome` came), "reconnecting" or "closed". */
  get state() {
    return this.#state;
  }

  /** The worker id of the last `welcome`. */
  get worker() {
    return this.#worker;
  }

  /** Start connecting, and keep reconnecting until close() or a final close code. */
  connect() {
    if (this.#running) return;
    this.#running = true;
    this.#attempt = 0;
    this.#cause = null;
    this.#open();
  }

  /** Close with 1000 and stop reconnecting. */
  close() {
    this.#running = false;
    clearTimeout(this.#timer);
    this.#timer = null;
    const socket = this.#socket;
    if (socket) {
      this.#dropped(socket, 1000, "closed by the client");
      socket.close(1000);
    } else if (this.#state !== "closed") {
      this.#setState("closed", { code: 1000, reason: "closed by the client" });
    }
  }

  /**
   * Subscribe to `channel` now if connected, and again after every reconnect. On a
   * channel already subscribed, only replaces the `info` sent on the next resubscribe.
   */
  subscribe(channel, { info } = {}) {
    const entry = this.#channels.get(channel);
    if (entry) {
      entry.info = info;
      return;
    }
    const fresh = { info, last: undefined, confirmed: false, onServer: false, retries: 0 };
    this.#channels.set(channel, fresh);
    if (this.#ready) this.#sendSubscribe(channel, fresh);
  }

  /** Stop receiving `channel` and forget it (its position too). */
  unsubscribe(channel) {
    const entry = this.#channels.get(channel);
    if (!entry) return;
    this.#channels.delete(channel);
    clearTimeout(entry.timer);
    // Also when the subscribe is still unanswered: the server may be completing it.
    if (entry.onServer) {
      const ref = this.#nextRef++;
      this.#replies.set(ref, { kind: "unsubscribe", channel });
      this.#send({ type: "unsubscribe", channel, ref });
    }
  }

  /**
   * A Promise of the id Redis gave the message. Nothing is queued while disconnected,
   * and nothing is retried. To retry after "connection_lost" or "outcome_unknown" (it
   * may have been published), pass the same `idempotencyKey` (up to 64 visible ASCII
   * characters, such as crypto.randomUUID()) each time: it is published at most once.
   */
  publish(channel, data, { idempotencyKey } = {}) {
    if (!this.#ready) {
      return Promise.reject(clientError("not_connected", "not connected"));
    }
    const ref = this.#nextRef++;
    const frame = { type: "publish", channel, data, ref };
    if (idempotencyKey !== undefined) frame.idempotency_key = idempotencyKey;
    return new Promise((resolve, reject) => {
      this.#replies.set(ref, { kind: "publish", channel, resolve, reject });
      this.#send(frame);
    });
  }

  /**
   * Replace the connection's token before it expires: a Promise of the new token's
   * `exp` (Unix time; null from a server that does not check tokens). Without `token`,
   * sends what the next connection attempt would: the provider's answer, or the fixed
   * token (a fixed token is replaced by the refreshed one for later connections).
   * Rejects like publish(), with code "invalid_token" for a token the server refused.
   */
  async refresh(token) {
    if (!this.#ready) throw clientError("not_connected", "not connected");
    const fresh = token || (await this.#fetchToken());
    if (!fresh) throw new TypeError("refresh() needs a token: the client was given none");
    if (!this.#ready) throw clientError("not_connected", "not connected");
    const ref = this.#nextRef++;
    const expires = await new Promise((resolve, reject) => {
      this.#replies.set(ref, { kind: "refresh", resolve, reject });
      this.#send({ type: "refresh", token: fresh, ref });
    });
    if (typeof this.#token !== "function") this.#token = fresh; // not the old one again
    return expires;
  }

  async #fetchToken() {
    const token = this.#token;
    return (typeof token === "function" ? await token() : token) || undefined;
  }

  #emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  #setState(state, extra = {}) {
    this.#state = state;
    this.#emit("state", { state, code: undefined, reason: undefined, delay: undefined, ...extra });
  }

  #send(frame) {
    if (this.#socket?.readyState === OPEN) this.#socket.send(JSON.stringify(frame));
  }

  #open() {
    this.#timer = null;
    const url = this.#urls[this.#urlIndex]; // reported without the token: it is a secret
    this.#setState("connecting", { url });
    // Stands for the socket while the token is fetched, so that close() and the open
    // timeout (a provider that never answers) end the attempt as they end a socket.
    const pending = { close() {} };
    this.#socket = pending;
    // A host that swallows packets would hold an attempt for minutes, never failing
    // over to the next URL; a server that accepts but never says `welcome` is no better.
    this.#openTimer = setTimeout(() => {
      const socket = this.#socket;
      if (!socket) return;
      this.#dropped(socket, ABNORMAL_CLOSURE, "no welcome in time");
      socket.close();
    }, this.#openTimeout);
    this.#fetchToken().then(
      (token) => {
        if (this.#socket === pending) this.#dial(pending, withToken(url, token));
      },
      // Like a network failure: the provider's backend may be back next time.
      (error) => this.#dropped(pending, ABNORMAL_CLOSURE, `token provider failed: ${error}`),
    );
  }

  #dial(pending, url) {
    let socket;
    try {
      socket = new this.#WebSocket(url);
    } catch (error) {
      // Refused before any traffic (ws:// from an https page): a failed attempt like
      // any other, and the next URL may do better. Thrown on, it would kill the timer.
      return this.#dropped(pending, ABNORMAL_CLOSURE, String(error));
    }
    this.#socket = socket;
    socket.onmessage = (event) => this.#onFrame(socket, event.data);
    socket.onclose = (event) => this.#dropped(socket, event.code, event.reason);
  }

  // The end of `socket`, whether the server, the network, a timeout or close() ended it.
  #dropped(socket, code, reason) {
    if (socket !== this.#socket) return; // already handled
    this.#socket = null;
    this.#ready = false;
    socket.onmessage = socket.onclose = null;
    clearTimeout(this.#openTimer);
    for (const entry of this.#channels.values()) {
      clearTimeout(entry.timer);
      Object.assign(entry, { onServer: false, retries: 0, timer: undefined });
    }
    const replies = [...this.#replies.values()];
    this.#replies.clear();
    for (const reply of replies) {
      // The message may or may not have been published: only the caller can tell.
      reply.reject?.(clientError("connection_lost", `connection closed (${code}) before the reply`));
    }
    // A handshake refused with HTTP 403 (a bad or expired token, the Origin) reaches us
    // as 1006, like any failed attempt: it is retried, the browser tells no difference.
    const renew =
      code === POLICY_VIOLATION && reason === TOKEN_EXPIRED && typeof this.#token === "function";
    if (!this.#running || !(RECONNECT_CODES.has(code) || renew)) {
      this.#running = false;
      this.#setState("closed", { code, reason });
      return;
    }
    if (code !== ABNORMAL_CLOSURE) this.#cause = code;
    const base =
      this.#cause === TRY_AGAIN_LATER
        ? Math.max(TRY_AGAIN_LATER_BASE, this.#minDelay)
        : this.#minDelay;
    // A worker shutting down (1012) is no reason to wait: another one is up. Spread over
    // minDelay, so that its clients do not all land on the others at once; and only the
    // first retry, so that a balancer routing back to it cannot make a busy loop.
    const delay =
      this.#cause === SERVICE_RESTART && this.#attempt === 0
        ? Math.random() * this.#minDelay
        : backoff(this.#attempt, base, this.#maxDelay);
    this.#attempt += 1;
    this.#urlIndex = (this.#urlIndex + 1) % this.#urls.length;
    this.#setState("reconnecting", { code, reason, delay });
    this.#timer = setTimeout(() => this.#open(), delay);
  }

  #onFrame(socket, text) {
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // the server sends only JSON text; anything else is not ours to judge
    }
    if (frame === null || typeof frame !== "object") return;
    const { channel } = frame;
    // Frames are passed on as they come, even for a channel just unsubscribed: the
    // server promises each message once and in order, and a bug there should show.
    switch (frame.type) {
      case "welcome":
        return this.#onWelcome(socket, frame);
      case "subscribed":
        return this.#onSubscribed(frame);
      case "message": {
        const entry = this.#channels.get(channel);
        if (entry) entry.last = frame.id;
        return this.#emit("message", { channel, id: frame.id, data: frame.data });
      }
      case "gap":
        return this.#emit("lost", { channel, reason: "gap" });
      case "join":
      case "leave":
        return this.#emit(frame.type, { channel, info: frame.info });
      case "published": {
        const reply = this.#takeReply(frame.ref, "publish");
        return reply?.resolve(frame.id);
      }
      case "refreshed": {
        const reply = this.#takeReply(frame.ref, "refresh");
        return reply?.resolve(typeof frame.expires === "number" ? frame.expires : null);
      }
      case "error":
        return this.#onError(socket, frame);
      default:
        return; // unsubscribed, pong, and frame types of later protocol versions
    }
  }

  #takeReply(ref, kind) {
    const reply = this.#replies.get(ref);
    if (reply?.kind !== kind) return undefined;
    this.#replies.delete(ref);
    return reply;
  }

  #onWelcome(socket, frame) {
    clearTimeout(this.#openTimer);
    this.#ready = true;
    this.#attempt = 0;
    this.#cause = null;
    this.#worker = frame.worker;
    // Listeners run before the resubscribes go out, so a `welcome` listener can still
    // change a channel's `info` (the demo page announces the worker it is on).
    this.#emit("welcome", { worker: frame.worker });
    if (socket !== this.#socket) return; // a listener closed the client
    this.#setState("open");
    if (socket !== this.#socket) return;
    for (const [channel, entry] of this.#channels) this.#sendSubscribe(channel, entry);
  }

  #sendSubscribe(channel, entry) {
    const ref = this.#nextRef++;
    entry.onServer = true;
    this.#replies.set(ref, { kind: "subscribe", channel, entry });
    const frame = { type: "subscribe", channel, ref };
    if (entry.info !== undefined && entry.info !== null) frame.info = entry.info;
    if (entry.last !== undefined) frame.since = entry.last;
    this.#send(frame);
  }

  #onSubscribed(frame) {
    const { channel, recovered, position } = frame;
    const reply = this.#takeReply(frame.ref, "subscribe");
    this.#emit("subscribed", { channel, recovered, position });
    const entry = reply?.entry;
    if (!entry || this.#channels.get(channel) !== entry) return; // unsubscribed meanwhile
    const resubscribed = entry.confirmed;
    Object.assign(entry, { confirmed: true, retries: 0 });
    // The id just before the first message this subscription sends: resuming from it
    // misses nothing even if no message comes before the next disconnection.
    if (position !== undefined) entry.last = position;
    // Resubscribed without `since` (a server that gave no position, and no message
    // came): nothing can say what was missed meanwhile.
    if (recovered === false || (resubscribed && recovered === undefined)) {
      this.#emit("lost", { channel, reason: "not_recovered" });
    }
  }

  #onError(socket, frame) {
    const { code, message } = frame;
    const reply = frame.ref === undefined ? undefined : this.#replies.get(frame.ref);
    if (reply) this.#replies.delete(frame.ref);
    if (reply?.kind === "publish" || reply?.kind === "refresh") {
      return reply.reject(clientError(code, message));
    }
    const channel = reply?.channel;
    this.#emit("error", { code, message, channel });
    const entry = reply?.kind === "subscribe" ? reply.entry : undefined;
    if (!entry || this.#channels.get(channel) !== entry) return;
    entry.onServer = false;
    if (code !== "unavailable") {
      // Refused for good (an invalid name, an oversized info): every retry would be too.
      this.#channels.delete(channel);
      return;
    }
    // Redis is out of reach from this worker; the connection itself is fine.
    const delay = backoff(entry.retries++, this.#minDelay, this.#maxDelay);
    entry.timer = setTimeout(() => {
      entry.timer = undefined;
      if (this.#socket === socket && this.#channels.get(channel) === entry) {
        this.#sendSubscribe(channel, entry);
      }
    }, delay);
  }
}
