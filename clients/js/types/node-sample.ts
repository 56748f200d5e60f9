// Type-checked only (tsconfig.node.json): the package in a Node script whose project has
// Node's types and not the DOM library.
import { BroadcastClient, type StateDetail } from "broadcast-service-client";
import WebSocket from "ws";

const client = new BroadcastClient("ws://127.0.0.1:8000/ws", { WebSocket });
client.addEventListener("state", (e) => {
  const detail: StateDetail = e.detail;
  if (detail.state === "reconnecting") console.log(detail.code, detail.delay);
});
client.addEventListener("message", (e) => console.log(e.detail.channel.length, e.detail.data));
client.addEventListener("subscribed", () => void client.publish("news", "hi"), { once: true });
client.subscribe("news");
client.connect();
// @ts-expect-error: no such field in a `message` event's detail
client.addEventListener("message", (e) => e.detail.chanel);
