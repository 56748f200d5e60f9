// A minimal RFC 6455 WebSocket client on node:net, for the `many` kind of loadgen.mjs.
//
// Why it exists: the `many` kind holds up to 100,000 connections on a 2-core machine and
// times how long one message takes to reach all of them. With the `ws` library each
// received message cost the generator ~15 µs at 30k connections, more than the server's
// ~10 µs per delivery, and the generator shares the cores with the server, so it was what
// limited the measurement. Most of that cost is Node's stream machinery (net.Socket
// 'data' events through a Readable, then ws's Receiver, a Writable) and the garbage it
// makes. This client reads with net.connect's `onread` option instead: the kernel's bytes
// land in one buffer shared by every socket of the process and are parsed in place, so no
// stream events are involved and a message costs its string and little else.
//
// The other generator kinds keep `ws`: they need permessage-deflate, which this client
// does not speak (it offers no extensions), and their costs are not what is measured.
//
// What it does: ws:// URLs only; text messages (UTF-8 checked) in and out; fragmented
// messages reassembled; pings answered; the close handshake both ways. Binary messages
// are refused (close 1003): protocol v1 is text only. Messages over `maxMessageBytes`
// (default 16 MiB) fail with 1009, invalid UTF-8 with 1007, other protocol errors with 1002.
//
//   const ws = new RawWebSocket("ws://127.0.0.1:8000/ws", { localAddress, handshakeTimeoutMs });
//   ws.onopen = () => ws.send("hi");
//   ws.onmessage = (text) => {};
//   ws.onerror = (error) => {}; // then onclose, always
//   ws.onclose = (code) => {}; // the close code: the peer's, ours on a failure, 1006 if none

import { Buffer, isUtf8 } from "node:buffer";
import { createHash, randomBytes, randomFillSync } from "node:crypto";
import net from "node:net";

export const CONNECTING = 0;
export const OPEN = 1;
export const CLOSING = 2;
export const CLOSED = 3;

const GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const MAX_HEAD = 16 * 1024; // bytes of handshake response head we are willing to read
const END_OF_HEAD = Buffer.from("\r\n\r\n");

// Callbacks of `onread` run synchronously and one at a time, so every socket of the
// process can read into the same buffer; whatever must outlive a callback is copied.
const readBuffer = Buffer.allocUnsafe(64 * 1024);

// Masks for outgoing frames come out of a pool of random bytes, refilled when used up.
const maskPool = Buffer.allocUnsafe(4096);
let maskOffset = maskPool.length;
function nextMask(target, at) {
  if (maskOffset === maskPool.length) {
    randomFillSync(maskPool);
    maskOffset = 0;
  }
  maskPool.copy(target, at, maskOffset, maskOffset + 4);
  maskOffset += 4;
}

// A masked client frame (FIN set) carrying `payload`.
function clientFrame(opcode, payload) {
  const length = payload.length;
  const head = length < 126 ? 2 : length < 65536 ? 4 : 10;
  const frame = Buffer.allocUnsafe(head + 4 + length);
  frame[0] = 0x80 | opcode;
  if (head === 2) frame[1] = 0x80 | length;
  else if (head === 4) {
    frame[1] = 0x80 | 126;
    frame.writeUInt16BE(length, 2);
  } else {
    frame[1] = 0x80 | 127;
    frame.writeUInt32BE(Math.floor(length / 2 ** 32), 2);
    frame.writeUInt32BE(length >>> 0, 6);
  }
  nextMask(frame, head);
  const start = head + 4;
  for (let i = 0; i < length; i++) frame[start + i] = payload[i] ^ frame[head + (i & 3)];
  return frame;
}

function closePayload(code) {
  if (code === undefined || code === 1005) return Buffer.alloc(0);
  const payload = Buffer.allocUnsafe(2);
  payload.writeUInt16BE(code, 0);
  return payload;
}

// Close codes a peer may send (RFC 6455 section 7.4 and the IANA registry).
function validCloseCode(code) {
  return (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) || (code >= 3000 && code <= 4999);
}

class ProtocolError extends Error {
  constructor(message, closeCode) {
    super(message);
    this.closeCode = closeCode;
  }
}

export class RawWebSocket {
  constructor(url, { localAddress, handshakeTimeoutMs = 30_000, closeTimeoutMs = 30_000, maxMessageBytes = 16 * 2 ** 20 } = {}) {
    const parsed = new URL(url);
    if (parsed.protocol !== "ws:") throw new Error(`only ws:// URLs are supported, not ${url}`);
    this.readyState = CONNECTING;
    this.onopen = null;
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    this.closeTimeoutMs = closeTimeoutMs;
    this.maxMessageBytes = maxMessageBytes;
    this.code = 1006; // what onclose reports unless a close frame says otherwise
    this.closeSent = false;
    this.finished = false; // a close came, an error was reported or we terminated: input is ignored
    this.timer = null;
    // Handshake state.
    this.key = randomBytes(16).toString("base64");
    this.head = null; // response bytes so far, until the end of its head
    // Frame parser state: the header being read, and the payload being filled.
    this.rest = null; // a partial frame header (under 14 bytes) from the previous read
    this.fin = false;
    this.opcode = 0;
    this.length = 0;
    this.payload = null; // a frame's payload spread over reads, and how much of it came
    this.filled = 0;
    this.fragments = null; // a fragmented text message's frames so far, and their size
    this.fragmentBytes = 0;

    const port = Number(parsed.port || 80);
    const host = parsed.hostname.startsWith("[") ? parsed.hostname.slice(1, -1) : parsed.hostname;
    const socket = net.connect({
      host,
      port,
      localAddress,
      onread: { buffer: readBuffer, callback: (n, buffer) => this._read(n, buffer) },
    });
    this.socket = socket;
    socket.setNoDelay(true); // a broadcast's latency is what the caller measures
    socket.on("connect", () => {
      const request =
        `GET ${parsed.pathname}${parsed.search} HTTP/1.1\r\n` +
        `Host: ${parsed.host}\r\n` +
        "Upgrade: websocket\r\n" +
        "Connection: Upgrade\r\n" +
        `Sec-WebSocket-Key: ${this.key}\r\n` +
        "Sec-WebSocket-Version: 13\r\n\r\n";
      socket.write(request);
    });
    socket.on("error", (error) => this._fail(error));
    socket.on("close", () => this._closed());
    this.timer = setTimeout(() => {
      this.timer = null;
      this._fail(new Error(`handshake timed out after ${handshakeTimeoutMs} ms`));
    }, handshakeTimeoutMs);
  }

  send(text) {
    if (this.readyState !== OPEN) return false;
    return this.socket.write(clientFrame(0x1, Buffer.from(text)));
  }

  // Starts the closing handshake; the socket ends once the server's close frame came.
  close(code = 1000) {
    if (this.readyState === CONNECTING) {
      this._fail(new Error("closed before the connection was established"));
    } else if (this.readyState === OPEN) {
      this._sendClose(code);
    }
  }

  terminate() {
    if (this.readyState === CLOSED) return;
    this.finished = true;
    this.socket.destroy();
  }

  _sendClose(code) {
    this.closeSent = true;
    this.readyState = CLOSING;
    this.socket.write(clientFrame(0x8, closePayload(code)));
    // A server that never answers does not keep the socket open for ever.
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = setTimeout(() => this.socket.destroy(), this.closeTimeoutMs);
  }

  // Reports an error and fails the connection: a close frame with `closeCode` when the
  // connection is open (RFC 6455 section 7.1.7), then the socket goes.
  _fail(error, closeCode = error.closeCode) {
    if (this.finished || this.readyState === CLOSED) return;
    this.finished = true;
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    if (closeCode !== undefined) this.code = closeCode;
    const open = this.readyState === OPEN && !this.closeSent && closeCode !== undefined;
    this.readyState = CLOSING;
    if (this.onerror) this.onerror(error);
    if (open) {
      this.socket.end(clientFrame(0x8, closePayload(closeCode)));
      this.timer = setTimeout(() => this.socket.destroy(), this.closeTimeoutMs);
    } else this.socket.destroy();
  }

  _closed() {
    // A server that hangs up mid-handshake is an error too, as any failed connect is.
    if (this.readyState === CONNECTING) this._fail(new Error("connection closed during the handshake"));
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = null;
    this.readyState = CLOSED;
    if (this.onclose) this.onclose(this.code);
  }

  // --- reading ------------------------------------------------------------------------

  _read(n, buffer) {
    if (this.finished || n <= 0) return;
    let at = 0;
    if (this.readyState === CONNECTING) {
      at = this._handshake(buffer, n);
      if (at < 0) return;
    }
    this._frames(buffer, at, n);
  }

  // The response head; returns where the frames start in `buffer`, or -1 if not yet.
  _handshake(buffer, n) {
    const previous = this.head === null ? 0 : this.head.length;
    const data = previous ? Buffer.concat([this.head, buffer.subarray(0, n)]) : buffer.subarray(0, n);
    const end = data.indexOf(END_OF_HEAD, Math.max(0, previous - 3));
    if (end > MAX_HEAD || (end < 0 && data.length > MAX_HEAD)) {
      this._fail(new Error(`handshake response head over ${MAX_HEAD} bytes`));
      return -1;
    }
    if (end < 0) {
      this.head = Buffer.from(data); // a copy: `buffer` is reused
      return -1;
    }
    this.head = null;
    const lines = data.toString("latin1", 0, end).split("\r\n");
    const problem = this._checkResponse(lines);
    if (problem) {
      this._fail(new Error(problem));
      return -1;
    }
    clearTimeout(this.timer);
    this.timer = null;
    this.readyState = OPEN;
    if (this.onopen) this.onopen();
    return end + 4 - previous;
  }

  _checkResponse(lines) {
    const status = /^HTTP\/1\.1 (\d{3})/.exec(lines[0]);
    if (!status) return `not an HTTP/1.1 response: ${lines[0].slice(0, 200)}`;
    if (status[1] !== "101") return `HTTP ${status[1]}: ${lines[0].slice(0, 200)}`;
    const headers = new Map();
    for (const line of lines.slice(1)) {
      const colon = line.indexOf(":");
      if (colon > 0) headers.set(line.slice(0, colon).trim().toLowerCase(), line.slice(colon + 1).trim());
    }
    const accept = createHash("sha1").update(this.key + GUID).digest("base64");
    if ((headers.get("upgrade") ?? "").toLowerCase() !== "websocket") return "101 without Upgrade: websocket";
    if (!/(^|,)\s*upgrade\s*(,|$)/i.test(headers.get("connection") ?? "")) return "101 without Connection: Upgrade";
    if (headers.get("sec-websocket-accept") !== accept) return `101 with a wrong Sec-WebSocket-Accept: ${headers.get("sec-websocket-accept")}`;
    if (headers.has("sec-websocket-extensions")) return "101 with an extension, though none was offered";
    if (headers.has("sec-websocket-protocol")) return "101 with a subprotocol, though none was offered";
    return null;
  }

  // Every complete frame in buffer[at, n); what is left of an incomplete one is kept.
  _frames(buffer, at, n) {
    while (at < n && !this.finished) {
      if (this.payload !== null) {
        // The rest of a payload that did not fit in the previous read.
        const take = Math.min(n - at, this.payload.length - this.filled);
        buffer.copy(this.payload, this.filled, at, at + take);
        this.filled += take;
        at += take;
        if (this.filled < this.payload.length) return;
        const payload = this.payload;
        this.payload = null;
        this._frame(payload, 0, payload.length);
        continue;
      }
      if (this.rest === null) {
        const size = this._header(buffer, at, n);
        if (size === 0) {
          this.rest = Buffer.from(buffer.subarray(at, n));
          return;
        }
        if (size < 0) return;
        at += size;
      } else {
        // A header split over reads: at most 14 bytes, so join just those.
        const joined = Buffer.concat([this.rest, buffer.subarray(at, Math.min(n, at + 14))]);
        const size = this._header(joined, 0, joined.length);
        if (size === 0) {
          this.rest = joined; // all of this read was header
          return;
        }
        if (size < 0) return;
        at += size - this.rest.length;
        this.rest = null;
      }
      if (n - at >= this.length) {
        this._frame(buffer, at, at + this.length);
        at += this.length;
      } else {
        this.payload = Buffer.allocUnsafe(this.length);
        this.filled = 0;
      }
    }
  }

  // Parses and checks a frame header at b[at, end): its size, 0 if incomplete, -1 if bad.
  _header(b, at, end) {
    if (end - at < 2) return 0;
    const first = b[at];
    const second = b[at + 1];
    let length = second & 0x7f;
    let size = 2;
    if (length === 126) {
      if (end - at < 4) return 0;
      length = b.readUInt16BE(at + 2);
      size = 4;
    } else if (length === 127) {
      if (end - at < 10) return 0;
      const high = b.readUInt32BE(at + 2);
      if (high & 0x80000000) return this._protocolError("a 64-bit length with its top bit set", 1002);
      length = high * 2 ** 32 + b.readUInt32BE(at + 6);
      size = 10;
    }
    this.fin = (first & 0x80) !== 0;
    this.opcode = first & 0x0f;
    this.length = length;
    const opcode = this.opcode;
    if (first & 0x70) return this._protocolError("reserved bits set", 1002);
    if (second & 0x80) return this._protocolError("a masked frame from the server", 1002);
    if (opcode >= 0x8) {
      if (opcode > 0xa) return this._protocolError(`unknown opcode ${opcode}`, 1002);
      if (!this.fin) return this._protocolError("a fragmented control frame", 1002);
      if (length > 125) return this._protocolError("a control frame over 125 bytes", 1002);
    } else if (opcode === 0x0) {
      if (this.fragments === null) return this._protocolError("a continuation frame with no message", 1002);
      if (length > this.maxMessageBytes - this.fragmentBytes) return this._protocolError("a message too big", 1009);
    } else if (opcode === 0x1) {
      if (this.fragments !== null) return this._protocolError("a new message inside a fragmented one", 1002);
      if (length > this.maxMessageBytes) return this._protocolError("a message too big", 1009);
    } else if (opcode === 0x2) {
      return this._protocolError("a binary message: protocol v1 is text only", 1003);
    } else {
      return this._protocolError(`unknown opcode ${opcode}`, 1002);
    }
    return size;
  }

  _protocolError(message, closeCode) {
    this._fail(new ProtocolError(message, closeCode));
    return -1;
  }

  // One whole frame, its header already checked; its payload is b[start, end).
  _frame(b, start, end) {
    const opcode = this.opcode;
    if (opcode === 0x1 && this.fin) {
      const payload = b.subarray(start, end);
      if (!isUtf8(payload)) return this._fail(new ProtocolError("invalid UTF-8 in a text message", 1007));
      if (this.onmessage) this.onmessage(payload.toString("utf8"));
    } else if (opcode <= 0x1) {
      // Part of a fragmented message: kept (a copy) until its last frame.
      if (this.fragments === null) {
        this.fragments = [];
        this.fragmentBytes = 0;
      }
      this.fragments.push(Buffer.from(b.subarray(start, end)));
      this.fragmentBytes += end - start;
      if (!this.fin) return;
      const message = Buffer.concat(this.fragments, this.fragmentBytes);
      this.fragments = null;
      this.fragmentBytes = 0;
      if (!isUtf8(message)) return this._fail(new ProtocolError("invalid UTF-8 in a text message", 1007));
      if (this.onmessage) this.onmessage(message.toString("utf8"));
    } else if (opcode === 0x9) {
      if (this.readyState === OPEN) this.socket.write(clientFrame(0xa, b.subarray(start, end)));
    } else if (opcode === 0x8) {
      this._peerClose(b, start, end);
    } // 0xa, a pong: nothing to do, this client sends no pings
  }

  _peerClose(b, start, end) {
    let code = 1005; // no code in the frame
    if (end - start === 1) return this._fail(new ProtocolError("a close frame of 1 byte", 1002));
    if (end - start >= 2) {
      code = b.readUInt16BE(start);
      if (!validCloseCode(code)) return this._fail(new ProtocolError(`close code ${code} is not one a peer may send`, 1002));
      if (!isUtf8(b.subarray(start + 2, end))) return this._fail(new ProtocolError("invalid UTF-8 in a close reason", 1007));
    }
    this.code = code;
    if (!this.closeSent) {
      this.closeSent = true;
      this.readyState = CLOSING;
      this.socket.write(clientFrame(0x8, closePayload(code)));
    }
    // Both closes are sent: the TCP connection goes (the server closes its side too).
    this.finished = true; // nothing may follow a close frame
    if (this.timer !== null) clearTimeout(this.timer);
    this.timer = setTimeout(() => this.socket.destroy(), this.closeTimeoutMs);
    this.socket.end();
  }
}
