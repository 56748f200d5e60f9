// Type-checked only (tsc --noEmit, tests/e2e/test_js_package.py), never run: every
// option, method, property and event of the package's types, used as an app would, and
// wrong uses that the types must reject (each `@ts-expect-error` fails the check if
// the line below it compiles).
import WebSocket from "ws";
import {
  BroadcastClient,
  type BroadcastClientOptions,
  type BroadcastError,
  type ConnectionState,
  type MessageDetail,
} from "broadcast-service-client";

const options: BroadcastClientOptions = {
  token: async () => "a.jwt.token",
  minDelay: 100,
  maxDelay: 5000,
  openTimeout: 2000,
  WebSocket, // the ws package's class, as under Node 20
};
const client = new BroadcastClient(["ws://a.example/ws", "ws://b.example/ws"], options);
new BroadcastClient("wss://example.com/ws", { token: "a.jwt.token" });
new BroadcastClient("ws://example.com/ws", { WebSocket: globalThis.WebSocket }); // the DOM's

const state: ConnectionState = client.state;
const worker: string | null = client.worker;

client.addEventListener("state", (e) => {
  const detail = e.detail;
  switch (detail.state) {
    case "connecting":
      console.log("connecting to", detail.url.toUpperCase());
      break;
    case "reconnecting":
      console.log(detail.code.toFixed(), detail.reason.trim(), detail.delay.toFixed());
      break;
    case "closed":
      console.log("closed", detail.code, detail.reason);
      break;
    case "open":
      console.log("open", state, worker);
      break;
  }
});
client.addEventListener("welcome", (e) => console.log(e.detail.worker.toUpperCase()));
client.addEventListener("subscribed", (e) => {
  const { channel, recovered, position } = e.detail;
  const resumed: boolean | undefined = recovered;
  console.log(channel.length, resumed, position?.split(":"));
});
client.addEventListener("message", (e) => {
  const { channel, id, data }: MessageDetail = e.detail;
  console.log(channel.toUpperCase(), id.split(":"), data);
});
client.addEventListener("lost", (e) => {
  const reason: "not_recovered" | "gap" = e.detail.reason;
  console.log("resync", e.detail.channel.toUpperCase(), reason);
});
client.addEventListener("join", (e) => console.log(e.detail.channel.length, e.detail.info));
client.addEventListener("leave", (e) => console.log(e.detail.channel.length, e.detail.info));
client.addEventListener("error", (e) => {
  const { code, message, channel } = e.detail;
  console.log(code.toUpperCase(), message.length, channel?.length);
});
const onMessage = (e: CustomEvent<MessageDetail>) => console.log(e.detail.id);
client.addEventListener("message", onMessage, { once: true });
client.removeEventListener("message", onMessage);

client.subscribe("news");
client.subscribe("chat:lobby", { info: { name: "ada" } });
client.connect();

async function main(): Promise<void> {
  const id: string = await client.publish("news", { text: "hello" });
  await client.publish("news", [1, 2], { idempotencyKey: crypto.randomUUID() });
  const expires: number | null = await client.refresh();
  await client.refresh("another.jwt.token");
  console.log(id, expires);
  try {
    await client.publish("bad channel!", null);
  } catch (error) {
    console.log((error as BroadcastError).code);
  }
  client.unsubscribe("news");
  client.close();
}
void main();

// Wrong uses, rejected:

// @ts-expect-error: `detail.channel` of a message is a string, not a number
client.addEventListener("message", (e) => e.detail.channel.toFixed());
// @ts-expect-error: no such field in a `message` event's detail
client.addEventListener("message", (e) => e.detail.chanel);
// @ts-expect-error: an unknown event is a plain Event, without `detail`
client.addEventListener("mesage", (e) => e.detail);
// @ts-expect-error: `url` only exists while connecting
client.addEventListener("state", (e) => e.detail.url);
// @ts-expect-error: times are numbers of milliseconds
new BroadcastClient("ws://example.com/ws", { minDelay: "250" });
// @ts-expect-error: not an option
new BroadcastClient("ws://example.com/ws", { reconnect: true });
// @ts-expect-error: the WebSocket option is a class, not a socket
new BroadcastClient("ws://example.com/ws", { WebSocket: new WebSocket("ws://example.com") });
// @ts-expect-error: a URL is needed
new BroadcastClient();
// @ts-expect-error: the state cannot be set
client.state = "open";
// @ts-expect-error: publish resolves with the id, a string
const wrongId: number = await client.publish("news", 1);
// @ts-expect-error: an idempotency key is a string
client.publish("news", 1, { idempotencyKey: 42 });
// @ts-expect-error: subscribe returns nothing to await on
client.subscribe("news").then(() => {});
console.log(wrongId);
