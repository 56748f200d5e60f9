// The chat page: sign in with the app, then chat in one room over the service's
// WebSocket. The client comes from the npm package, by name (see the import map).
import { BroadcastClient } from "broadcast-service-client";

const $ = (id) => document.getElementById(id);
// `?room=name` picks the room; the app checks the name.
const room = new URLSearchParams(location.search).get("room") || "lobby";
const channel = `room:${room}`;
let client = null;
let topicArrived = false; // a live topic is newer than the one the history read holds

async function api(method, path, body) {
  const response = await fetch(path, {
    method,
    headers: body ? { "Content-Type": "application/json" } : {},
    body: body ? JSON.stringify(body) : undefined,
  });
  if (!response.ok) throw new Error(`${method} ${path}: HTTP ${response.status}`);
  return response.json();
}

function showError(text) {
  $("error").textContent = text;
}

function span(className, text) {
  const element = document.createElement("span");
  element.className = className;
  element.textContent = text; // never innerHTML: the text is other people's
  return element;
}

// One `<li>` per message: chat from the publish hook ({text, user}), or a topic
// change the app published ({topic, by}).
function line(data) {
  const li = document.createElement("li");
  if (typeof data?.topic === "string") {
    li.className = "system";
    li.textContent = `${data.by} set the topic: ${data.topic}`;
  } else if (typeof data?.text === "string") {
    li.className = "chat";
    li.append(span("user", data.user), span("text", data.text));
  } else {
    li.textContent = JSON.stringify(data);
  }
  return li;
}

// The room's topic and the messages sent before this page subscribed: those up to
// `position`, the last one before what the subscription delivers live.
async function loadBacklog(position) {
  const { topic, messages } = await api("GET", `/rooms/${room}/history`);
  if (!topicArrived) $("topic").textContent = topic;
  const last = messages.findIndex((m) => m.id === position);
  const before = messages.slice(0, last + 1); // none when `position` is not among them
  $("messages").prepend(...before.map((m) => line(m.data)));
}

// The signed-in user's name (the cookie is HttpOnly: ask the app); null when not
// signed in, undefined when the app cannot say.
async function signedIn() {
  try {
    const response = await fetch("/me");
    return response.ok ? (await response.json()).user : undefined;
  } catch {
    return undefined; // the app is unreachable: restarting, or the network is down
  }
}

function start(user) {
  $("login").hidden = true;
  $("chat").hidden = false;
  $("user").textContent = user;
  $("room").textContent = room;
  showError("");
  // The session cookie goes with the handshake (same origin): no token needed.
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ours = new BroadcastClient(`${scheme}://${location.host}/rt/ws`);
  client = ours;
  client.addEventListener("state", async ({ detail }) => {
    $("state").textContent = detail.state;
    if (detail.state !== "open") $("send-button").disabled = true;
    // A browser cannot tell a refused handshake (403: the session is gone, say after
    // the app restarted) from a network failure, and the client would retry forever:
    // ask the app.
    if (detail.state === "reconnecting" && (await signedIn()) === null && client === ours) {
      stop();
      showError("signed out: sign in again");
    }
  });
  // Subscribed once; the client subscribes again by itself after each reconnect,
  // resuming where it was.
  client.addEventListener("welcome", () => client.subscribe(channel), { once: true });
  client.addEventListener("subscribed", ({ detail }) => {
    $("send-button").disabled = false;
    if (detail.recovered === true) return; // resumed: nothing was missed
    // First subscribe (undefined), or the history did not reach back far enough
    // (false, and a `lost` event follows): start the room over.
    if (detail.recovered === false) $("messages").replaceChildren();
    loadBacklog(detail.position).catch((error) => showError(error.message));
  });
  client.addEventListener("message", ({ detail }) => {
    if (detail.channel !== channel) return;
    if (typeof detail.data?.topic === "string") {
      $("topic").textContent = detail.data.topic;
      topicArrived = true;
    }
    $("messages").append(line(detail.data));
  });
  // Errors not tied to a publish, such as a refused subscribe.
  client.addEventListener("error", ({ detail }) => showError(`${detail.code}: ${detail.message}`));
  client.connect();
}

// Back to the sign-in form, without a connection.
function stop() {
  client?.close();
  client = null;
  topicArrived = false;
  $("messages").replaceChildren();
  $("topic").textContent = "";
  $("chat").hidden = true;
  $("login").hidden = false;
}

$("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const { user } = await api("POST", "/login", { name: $("name").value });
    start(user);
  } catch (error) {
    showError(error.message);
  }
});

$("send").addEventListener("submit", async (event) => {
  event.preventDefault();
  showError("");
  try {
    // The message comes back through the subscription, stamped with the sender.
    await client.publish(channel, { text: $("text").value });
    $("text").value = "";
  } catch (error) {
    showError(error.message); // "<code>: <message>", such as "empty_message: ..."
  }
});

$("logout").addEventListener("click", async () => {
  await api("POST", "/logout");
  stop();
});

const user = await signedIn();
if (user) start(user);
else $("login").hidden = false;
