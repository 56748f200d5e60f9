// Types of client.js, written by hand (the module has no build step): keep them in step
// with its constructor, its public methods and its #emit(...) calls. clients/js checks
// them with tsc against a sample that uses every one. EventTarget and CustomEvent come
// from the DOM library or, in a Node project, from @types/node.

/** The states a client goes through; `closed` until connect(). */
export type ConnectionState = "connecting" | "open" | "reconnecting" | "closed";

/**
 * The least a WebSocket class must offer: the browser's, or `WebSocket` from the `ws`
 * package under Node before 22. The client sets `onmessage` and `onclose` on each socket.
 */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

export type WebSocketClass = new (url: string) => WebSocketLike;

/** A JWT, or a function (possibly async) called before every connection attempt. */
export type TokenOption = string | (() => string | Promise<string>);

export interface BroadcastClientOptions {
  /** Sent as the `token` query parameter of each connection. */
  token?: TokenOption;
  /** First retry delay, in ms (250). */
  minDelay?: number;
  /** Longest retry delay, in ms (10000). */
  maxDelay?: number;
  /** How long an attempt may take to receive `welcome`, in ms (5000). */
  openTimeout?: number;
  /**
   * The WebSocket class to connect with; defaults to `globalThis.WebSocket`. Without
   * either, the constructor throws a TypeError.
   */
  WebSocket?: WebSocketClass;
}

export interface SubscribeOptions {
  /** Announced to the channel's other subscribers in `join` and `leave` events. */
  info?: unknown;
}

export interface PublishOptions {
  /** Up to 64 visible ASCII characters: a message is published once per key and channel. */
  idempotencyKey?: string;
}

/**
 * What publish() and refresh() reject with: `code` is the protocol's error code
 * (`invalid_channel`, `unavailable`, `outcome_unknown`, `invalid_token`, ...), or
 * `not_connected` (nothing was sent) or `connection_lost` (the outcome is unknown).
 */
export interface BroadcastError extends Error {
  code: string;
}

/** `detail` of `state`: `url` only while connecting, `delay` (ms) before a retry. */
export type StateDetail =
  | { state: "connecting"; url: string; code: undefined; reason: undefined; delay: undefined }
  | { state: "open"; code: undefined; reason: undefined; delay: undefined }
  | { state: "reconnecting"; code: number; reason: string; delay: number }
  | { state: "closed"; code: number; reason: string; delay: undefined };

export interface WelcomeDetail {
  /** The id of the worker this connection reached. */
  worker: string;
}

export interface SubscribedDetail {
  channel: string;
  /** Undefined on a first subscribe; false means: resync the channel (a `lost` follows). */
  recovered: boolean | undefined;
  /** The id of the last message before those this subscription sends (rarely missing). */
  position: string | undefined;
}

export interface MessageDetail {
  channel: string;
  id: string;
  /** As published: any JSON value. */
  data: unknown;
}

export interface LostDetail {
  channel: string;
  reason: "not_recovered" | "gap";
}

export interface PresenceDetail {
  channel: string;
  /** The `info` the joining or leaving client subscribed with. */
  info: unknown;
}

export interface ErrorDetail {
  code: string;
  message: string;
  /** Set when the error answers a subscribe or unsubscribe. */
  channel: string | undefined;
}

export interface BroadcastClientEventMap {
  state: CustomEvent<StateDetail>;
  welcome: CustomEvent<WelcomeDetail>;
  subscribed: CustomEvent<SubscribedDetail>;
  message: CustomEvent<MessageDetail>;
  lost: CustomEvent<LostDetail>;
  join: CustomEvent<PresenceDetail>;
  leave: CustomEvent<PresenceDetail>;
  error: CustomEvent<ErrorDetail>;
}

// Taken from EventTarget itself: the DOM library and @types/node (which lacks some of
// the DOM's names, such as AddEventListenerOptions) both declare it.
type AnyListener = Parameters<EventTarget["addEventListener"]>[1];
type AddOptions = Parameters<EventTarget["addEventListener"]>[2];
type RemoveOptions = Parameters<EventTarget["removeEventListener"]>[2];

/** Protocol v1 over one WebSocket at a time, with reconnection, failover and resume. */
export class BroadcastClient extends EventTarget {
  /**
   * @param urls one URL (a load balancer) or a list of workers, tried in turn; each must
   *   be ws: or wss: (a TypeError otherwise)
   */
  constructor(urls: string | readonly string[], options?: BroadcastClientOptions);

  /** The current state. */
  readonly state: ConnectionState;
  /** The worker id of the last `welcome`, null before the first. */
  readonly worker: string | null;

  /** Start connecting, and keep reconnecting until close() or a final close code. */
  connect(): void;
  /** Close with 1000 and stop reconnecting. */
  close(): void;
  /** Subscribe now if connected, and after every reconnect (resuming where it was). */
  subscribe(channel: string, options?: SubscribeOptions): void;
  /** Stop receiving the channel and forget it. */
  unsubscribe(channel: string): void;
  /** The id of the published message; rejects with a BroadcastError. */
  publish(channel: string, data: unknown, options?: PublishOptions): Promise<string>;
  /**
   * Send a fresh token on the open connection: the new token's `exp` (Unix time), or
   * null from a server that does not check tokens. Rejects with a BroadcastError, or a
   * TypeError when there is no token to send.
   */
  refresh(token?: string): Promise<number | null>;

  addEventListener<K extends keyof BroadcastClientEventMap>(
    type: K,
    listener: (this: BroadcastClient, event: BroadcastClientEventMap[K]) => unknown,
    options?: AddOptions,
  ): void;
  addEventListener(type: string, listener: AnyListener, options?: AddOptions): void;
  removeEventListener<K extends keyof BroadcastClientEventMap>(
    type: K,
    listener: (this: BroadcastClient, event: BroadcastClientEventMap[K]) => unknown,
    options?: RemoveOptions,
  ): void;
  removeEventListener(type: string, listener: AnyListener, options?: RemoveOptions): void;
}
