// The raw WebSocket client (../raw_websocket.mjs) against a real `ws` server, and against
// hand-written servers for what `ws` will not send (bad handshakes, frames cut anywhere).
//
//   cd bench/loadgen && node --test test/

import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { once } from "node:events";
import http from "node:http";
import net from "node:net";
import { test } from "node:test";
import { WebSocketServer } from "ws";

import { CLOSED, OPEN, RawWebSocket } from "../raw_websocket.mjs";

const LIMIT = { timeout: 10_000 }; // every test is bounded; none needs more than a moment

// A `ws` server on a free port, closed (with every connection) when the test ends.
async function wsServer(t) {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await once(server, "listening");
  t.after(() => {
    for (const client of server.clients) client.terminate();
    return new Promise((resolve) => server.close(resolve));
  });
  return { server, url: `ws://127.0.0.1:${server.address().port}/ws?since=1` };
}

// A plain TCP server whose connections `onSocket` handles, closed when the test ends.
async function tcpServer(t, onSocket) {
  const sockets = new Set();
  const server = net.createServer((socket) => {
    sockets.add(socket);
    socket.on("close", () => sockets.delete(socket));
    socket.on("error", () => {});
    onSocket(socket);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    return new Promise((resolve) => server.close(resolve));
  });
  return `ws://127.0.0.1:${server.address().port}/ws`;
}

// Reads a client's request head off `socket` and answers 101 with `accept` (by default
// the right one); calls `then(socket)` after.
function handshake(socket, then, accept = null) {
  let head = "";
  const onData = (chunk) => {
    head += chunk.toString("latin1");
    if (!head.includes("\r\n\r\n")) return;
    socket.off("data", onData);
    const key = /sec-websocket-key: *(\S+)/i.exec(head)[1];
    const right = createHash("sha1").update(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest("base64");
    socket.write(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        `Sec-WebSocket-Accept: ${accept ?? right}\r\n\r\n`,
    );
    then(socket);
  };
  socket.on("data", onData);
}

// An unmasked server frame.
function serverFrame(opcode, payload, fin = true) {
  const head = payload.length < 126 ? Buffer.from([0, payload.length]) : Buffer.from([0, 126, payload.length >> 8, payload.length & 0xff]);
  head[0] = (fin ? 0x80 : 0) | opcode;
  return Buffer.concat([head, payload]);
}

// A client and what happened to it, as promises and lists.
function connect(url, options = {}) {
  const ws = new RawWebSocket(url, { handshakeTimeoutMs: 5000, ...options });
  const seen = { ws, messages: [], errors: [] };
  let wake = () => {};
  seen.opened = new Promise((resolve) => (ws.onopen = resolve));
  seen.closed = new Promise((resolve) => (ws.onclose = resolve));
  ws.onmessage = (text) => {
    seen.messages.push(text);
    wake();
  };
  ws.onerror = (error) => seen.errors.push(error);
  // The next message not yet taken.
  let taken = 0;
  seen.next = async () => {
    while (taken === seen.messages.length) await new Promise((resolve) => (wake = resolve));
    return seen.messages[taken++];
  };
  return seen;
}

test("text goes both ways, to the URL's path and query", LIMIT, async (t) => {
  const { server, url } = await wsServer(t);
  let requested = null;
  server.on("connection", (socket, request) => {
    requested = request.url;
    socket.send("welcome");
    socket.on("message", (data, binary) => socket.send(`echo ${binary ? "binary" : "text"}: ${data}`));
  });
  const client = connect(url);
  await client.opened;
  assert.equal(client.ws.readyState, OPEN);
  assert.equal(requested, "/ws?since=1");
  assert.equal(await client.next(), "welcome");
  client.ws.send("héllo ✓");
  assert.equal(await client.next(), "echo text: héllo ✓");
  client.ws.close();
  assert.equal(await client.closed, 1000);
});

test("messages of 16-bit and 64-bit lengths, both ways", LIMIT, async (t) => {
  const { server, url } = await wsServer(t);
  const small = "s".repeat(199) + "é"; // 201 bytes: a 16-bit length
  const big = "b".repeat(69_998) + "é"; // 70,000 bytes: a 64-bit length, over several reads
  server.on("connection", (socket) => {
    socket.send(small);
    socket.send(big);
    socket.on("message", (data) => socket.send(`got ${data.length} bytes, ${data.toString() === big ? "same" : "different"}`));
  });
  const client = connect(url);
  assert.equal(await client.next(), small);
  assert.equal(await client.next(), big);
  client.ws.send(big);
  assert.equal(await client.next(), "got 70000 bytes, same");
  client.ws.close();
  await client.closed;
});

test("a fragmented message arrives whole", LIMIT, async (t) => {
  const { server, url } = await wsServer(t);
  server.on("connection", (socket) => {
    socket.send("one, ", { fin: false });
    socket.ping("in between"); // a control frame may come between the fragments
    socket.send("two, ", { fin: false });
    socket.send("three", { fin: true });
  });
  const client = connect(url);
  assert.equal(await client.next(), "one, two, three");
  client.ws.close();
  await client.closed;
});

test("frames cut at every byte, and a frame in the same read as the 101", LIMIT, async (t) => {
  const frames = Buffer.concat([
    serverFrame(0x1, Buffer.from("first")),
    serverFrame(0x1, Buffer.from("x".repeat(300))),
    serverFrame(0x1, Buffer.from("ab"), false),
    serverFrame(0x0, Buffer.from("cd")),
  ]);
  const url = await tcpServer(t, (socket) => {
    socket.setNoDelay(true);
    handshake(socket, async () => {
      socket.write(serverFrame(0x1, Buffer.from("with the head")));
      for (const byte of frames) {
        socket.write(Buffer.from([byte]));
        await new Promise((resolve) => setTimeout(resolve, 0));
      }
    });
  });
  const client = connect(url);
  assert.equal(await client.next(), "with the head");
  assert.equal(await client.next(), "first");
  assert.equal(await client.next(), "x".repeat(300));
  assert.equal(await client.next(), "abcd");
  client.ws.terminate();
  assert.equal(await client.closed, 1006);
});

test("the server's ping is answered with a pong of the same payload", LIMIT, async (t) => {
  const { server, url } = await wsServer(t);
  const ponged = new Promise((resolve) => {
    server.on("connection", (socket) => {
      socket.on("pong", resolve);
      socket.ping(Buffer.from("are you there?"));
    });
  });
  const client = connect(url);
  assert.equal((await ponged).toString(), "are you there?");
  client.ws.close();
  await client.closed;
});

test("a close from the server is reported with its code and echoed", LIMIT, async (t) => {
  const { server, url } = await wsServer(t);
  const echoed = new Promise((resolve) => {
    server.on("connection", (socket) => {
      socket.on("close", (code) => resolve(code));
      socket.close(4001, "go away");
    });
  });
  const client = connect(url);
  assert.equal(await client.closed, 4001);
  assert.equal(await echoed, 4001);
  assert.equal(client.ws.readyState, CLOSED);
  assert.deepEqual(client.errors, []);
});

test("close(1000) completes the closing handshake", LIMIT, async (t) => {
  const { server, url } = await wsServer(t);
  const seen = new Promise((resolve) => server.on("connection", (socket) => socket.on("close", resolve)));
  const client = connect(url);
  await client.opened;
  client.ws.close(1000);
  assert.equal(await client.closed, 1000);
  assert.equal(await seen, 1000);
  assert.equal(client.ws.readyState, CLOSED);
  assert.deepEqual(client.errors, []);
});

test("a refused upgrade is an error that says what came back", LIMIT, async (t) => {
  const server = http.createServer((request, response) => {
    response.writeHead(403, { "content-type": "text/plain" });
    response.end("no");
  });
  server.on("upgrade", (request, socket) => socket.end("HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n"));
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  t.after(() => new Promise((resolve) => server.close(resolve)));
  const client = connect(`ws://127.0.0.1:${server.address().port}/ws`);
  assert.equal(await client.closed, 1006);
  assert.equal(client.errors.length, 1);
  assert.equal(client.errors[0].message, "HTTP 403: HTTP/1.1 403 Forbidden");
});

test("a wrong Sec-WebSocket-Accept is an error", LIMIT, async (t) => {
  const url = await tcpServer(t, (socket) => handshake(socket, () => {}, "d3JvbmcgYWNjZXB0IGtleSE="));
  const client = connect(url);
  assert.equal(await client.closed, 1006);
  assert.match(client.errors[0].message, /wrong Sec-WebSocket-Accept/);
});

test("a server that never answers the handshake times out", LIMIT, async (t) => {
  const url = await tcpServer(t, () => {});
  const started = performance.now();
  const client = connect(url, { handshakeTimeoutMs: 200 });
  assert.equal(await client.closed, 1006);
  assert.match(client.errors[0].message, /handshake timed out after 200 ms/);
  assert.ok(performance.now() - started < 2000);
});

test("a server that hangs up, or is not there, is an error", LIMIT, async (t) => {
  const url = await tcpServer(t, (socket) => socket.once("data", () => socket.end("HTTP/1.1 10")));
  const hungUp = connect(url);
  assert.equal(await hungUp.closed, 1006);
  assert.match(hungUp.errors[0].message, /closed during the handshake/);
  // A port nobody listens on: that of a server just closed.
  const gone = net.createServer().listen(0, "127.0.0.1");
  await once(gone, "listening");
  const { port } = gone.address();
  await new Promise((resolve) => gone.close(resolve));
  const refused = connect(`ws://127.0.0.1:${port}/ws`);
  assert.equal(await refused.closed, 1006);
  assert.equal(refused.errors[0].code, "ECONNREFUSED");
});

test("invalid UTF-8 in a text message fails the connection with 1007", LIMIT, async (t) => {
  const { server, url } = await wsServer(t);
  const seen = new Promise((resolve) => {
    server.on("connection", (socket) => {
      socket.on("close", resolve);
      socket.send(Buffer.from([0x68, 0x69, 0xc3, 0x28]), { binary: false });
    });
  });
  const client = connect(url);
  assert.equal(await client.closed, 1007);
  assert.equal(client.errors[0].closeCode, 1007);
  assert.equal(await seen, 1007);
  assert.deepEqual(client.messages, []);
});

test("protocol errors close with their codes", LIMIT, async (t) => {
  const cases = [
    [serverFrame(0x2, Buffer.from("bin")), 1003], // binary: protocol v1 is text only
    [Buffer.from([0xc1, 0x00]), 1002], // a reserved bit
    [Buffer.from([0x81, 0x80, 1, 2, 3, 4]), 1002], // masked by the server
    [serverFrame(0x3, Buffer.alloc(0)), 1002], // an unknown opcode
    [serverFrame(0x9, Buffer.alloc(126)), 1002], // a control frame over 125 bytes
    [serverFrame(0x9, Buffer.from("p"), false), 1002], // a fragmented control frame
    [serverFrame(0x0, Buffer.from("c")), 1002], // a continuation of nothing
    [serverFrame(0x1, Buffer.alloc(200, 0x61)), 1009], // over maxMessageBytes below
  ];
  for (const [frame, code] of cases) {
    let heard = null;
    const url = await tcpServer(t, (socket) =>
      handshake(socket, () => {
        socket.on("data", (data) => (heard = data));
        socket.write(frame);
      }),
    );
    const client = connect(url, { maxMessageBytes: 100 });
    assert.equal(await client.closed, code, `frame ${frame.subarray(0, 2).toString("hex")}`);
    assert.equal(client.errors[0].closeCode, code);
    // The close frame the client sent: masked, with the code.
    assert.equal(heard[0], 0x88);
    assert.equal(heard[1], 0x82);
    assert.equal(((heard[6] ^ heard[2]) << 8) | (heard[7] ^ heard[3]), code);
  }
});
