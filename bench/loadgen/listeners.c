/* One process's share of a very large audience (bench/many_connections.py).
 *
 * The same job and the same JSON lines as loadgen.mjs's `many` kind, in C: a listener
 * holds one WebSocket connection subscribed to one channel and stamps the time each
 * message reaches it. A Node process spends about 9 us of user-space CPU per message
 * it receives (libuv, the call into JavaScript, JSON.parse) on cores the workers need;
 * this one reads with epoll and looks at a message's bytes where they lie.
 *
 * Usage: listeners '<config JSON>' (the runner's; see bench/many_connections.py).
 * Out (stdout), one JSON object a line: progress, ready, collected, result, failed.
 * In (stdin), one JSON object a line: {"cmd":"collect","k":K,"timeoutMs":T}, {"cmd":"close"}.
 *
 * The client side of RFC 6455 this needs: the opening handshake (Sec-WebSocket-Accept
 * checked), masked frames out, text messages in (fragmented ones too), pings answered,
 * the closing handshake; a protocol error fails the connection (1002, 1007 or 1009).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_HEAD 16384          /* bytes of handshake response head we read at most */
#define MAX_MESSAGE (1 << 20)   /* a bigger message fails the connection with 1009 */
#define MAX_URLS 256
#define MAX_ADDRESSES 256
#define MAX_BROADCASTS 4096

/* DRAINING: closed at the WebSocket level (both close frames, or ours after a protocol
   error); what still comes is read and dropped until the server closes the TCP connection,
   which it does first (RFC 6455, 7.1.1): its side, not this one, then holds the address
   in TIME_WAIT, and a server started later on this loopback address can bind it. */
enum state { IDLE, CONNECTING, HANDSHAKE, OPEN, SUBSCRIBED, CLOSING, DRAINING, DONE };

struct conn {
  int fd;
  enum state state;
  uint8_t *in;      /* bytes kept between reads: a head or a frame not yet whole */
  size_t in_len;
  uint8_t *message; /* a fragmented text message so far */
  size_t message_len;
  double deadline;  /* of the handshake and subscription, or of draining */
  char key[25];
};

static struct {
  const char *urls[MAX_URLS];
  int url_count;
  const char *addresses[MAX_ADDRESSES];
  int address_count;
  long connections, offset, parallel, retries, progress_ms, deadline_ms, handshake_ms;
  char channel[256];
} config;

static struct conn *conns;
static int epoll_fd;
static long connected, failed_attempts, duplicates;
static long in_flight;
static int closing;
static double *latency[MAX_BROADCASTS]; /* per broadcast, per listener; NaN: not yet */
static long received[MAX_BROADCASTS];
static long closes[5000], errors_seen;
static char first_failure[512];

static double now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t); /* Python's time.monotonic() reads the same clock */
  return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void emit(const char *format, ...) {
  va_list args;
  va_start(args, format);
  vprintf(format, args);
  va_end(args);
  putchar('\n');
  fflush(stdout);
}

static void log_line(const char *format, ...) {
  va_list args;
  va_start(args, format);
  fputs("listeners: ", stderr);
  vfprintf(stderr, format, args);
  va_end(args);
  fputc('\n', stderr);
}

static double rss_mb(void) {
  long pages = 0, resident = 0;
  FILE *f = fopen("/proc/self/statm", "r");
  if (f) {
    if (fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    fclose(f);
  }
  return resident * (double)sysconf(_SC_PAGESIZE) / (1 << 20);
}

/* --- the runner's config: a flat JSON object of numbers, strings and string arrays --- */

static const char *json_value(const char *json, const char *key) {
  char pattern[64];
  snprintf(pattern, sizeof pattern, "\"%s\":", key);
  const char *at = strstr(json, pattern);
  if (!at) return NULL;
  at += strlen(pattern);
  while (*at == ' ') at++;
  return at;
}

static long json_long(const char *json, const char *key, long fallback) {
  const char *at = json_value(json, key);
  return at ? strtol(at, NULL, 10) : fallback;
}

/* Copies each string of the array at `key` (no escapes in them) into `out`. */
static int json_strings(char *json, const char *key, const char **out, int max) {
  char *at = (char *)json_value(json, key);
  int n = 0;
  if (!at || *at != '[') return 0;
  for (at++; *at && *at != ']' && n < max;) {
    char *open = strchr(at, '"');
    if (!open) break;
    char *close = strchr(open + 1, '"');
    if (!close) break;
    out[n++] = strndup(open + 1, close - open - 1);
    at = close + 1;
  }
  return n;
}

/* --- SHA-1 and base64, for Sec-WebSocket-Accept (RFC 3174, RFC 4648) --- */

static uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1(const uint8_t *data, size_t len, uint8_t out[20]) {
  uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
  size_t padded = ((len + 8) / 64 + 1) * 64;
  uint8_t *m = calloc(padded, 1);
  memcpy(m, data, len);
  m[len] = 0x80;
  uint64_t bits = (uint64_t)len * 8;
  for (int i = 0; i < 8; i++) m[padded - 1 - i] = (uint8_t)(bits >> (8 * i));
  for (size_t block = 0; block < padded; block += 64) {
    uint32_t w[80];
    for (int i = 0; i < 16; i++) {
      const uint8_t *p = m + block + 4 * i;
      w[i] = (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
    }
    for (int i = 16; i < 80; i++) w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    uint32_t a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 80; i++) {
      uint32_t f, k;
      if (i < 20) f = (b & c) | (~b & d), k = 0x5A827999;
      else if (i < 40) f = b ^ c ^ d, k = 0x6ED9EBA1;
      else if (i < 60) f = (b & c) | (b & d) | (c & d), k = 0x8F1BBCDC;
      else f = b ^ c ^ d, k = 0xCA62C1D6;
      uint32_t t = rol(a, 5) + f + e + k + w[i];
      e = d, d = c, c = rol(b, 30), b = a, a = t;
    }
    h[0] += a, h[1] += b, h[2] += c, h[3] += d, h[4] += e;
  }
  free(m);
  for (int i = 0; i < 20; i++) out[i] = (uint8_t)(h[i / 4] >> (24 - 8 * (i % 4)));
}

static void base64(const uint8_t *data, size_t len, char *out) {
  static const char alphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  size_t o = 0;
  for (size_t i = 0; i < len; i += 3) {
    uint32_t v = (uint32_t)data[i] << 16;
    if (i + 1 < len) v |= (uint32_t)data[i + 1] << 8;
    if (i + 2 < len) v |= data[i + 2];
    out[o++] = alphabet[v >> 18 & 63];
    out[o++] = alphabet[v >> 12 & 63];
    out[o++] = i + 1 < len ? alphabet[v >> 6 & 63] : '=';
    out[o++] = i + 2 < len ? alphabet[v & 63] : '=';
  }
  out[o] = 0;
}

/* --- frames out: masked, as a client's must be --- */

static void send_frame(struct conn *c, int opcode, const uint8_t *payload, size_t len) {
  uint8_t frame[8 + 1024];
  if (len > 1024) return; /* only subscribe, pong and close frames go out: all short */
  size_t head = len < 126 ? 2 : 4;
  frame[0] = 0x80 | opcode;
  if (head == 2) frame[1] = 0x80 | (uint8_t)len;
  else frame[1] = 0x80 | 126, frame[2] = (uint8_t)(len >> 8), frame[3] = (uint8_t)len;
  uint8_t *mask = frame + head;
  if (getrandom(mask, 4, 0) != 4) memset(mask, 0x5a, 4);
  for (size_t i = 0; i < len; i++) frame[head + 4 + i] = payload[i] ^ mask[i & 3];
  /* A short frame to a socket that reads fits its buffer; if the peer is gone, the next
     read says so. */
  if (write(c->fd, frame, head + 4 + len) < 0) return;
}

static void send_close(struct conn *c, int code) {
  uint8_t payload[2] = {(uint8_t)(code >> 8), (uint8_t)code};
  send_frame(c, 0x8, payload, 2);
}

/* --- a connection's life --- */

static void note_failure(const char *why) {
  failed_attempts++;
  if (first_failure[0]) return;
  /* It goes into a JSON string as it is: no quote, backslash or control character. */
  size_t n = 0;
  for (; why[n] && n < sizeof first_failure - 1; n++)
    first_failure[n] = why[n] == '"' ? '\'' : why[n] == '\\' ? '/' : (unsigned char)why[n] < 32 ? ' ' : why[n];
  first_failure[n] = 0;
}

static void drop(struct conn *c) {
  if (c->fd >= 0) close(c->fd); /* closing it takes it out of epoll too */
  c->fd = -1;
  free(c->in), c->in = NULL, c->in_len = 0;
  free(c->message), c->message = NULL, c->message_len = 0;
}

/* The attempt ends without a subscription: it may be tried again. */
static void fail(struct conn *c, const char *why) {
  if (c->state == SUBSCRIBED) {
    connected--;
  } else if (c->state != DONE && c->state != IDLE) {
    in_flight--;
    note_failure(why);
  }
  drop(c);
  c->state = DONE;
}

/* A subscribed connection ended: the server closed it with `code` (1006: no close frame). */
static void ended(struct conn *c, int code) {
  if (c->state == SUBSCRIBED || c->state == CLOSING) {
    if (!closing && code >= 0 && code < 5000) closes[code]++;
    if (c->state == SUBSCRIBED) connected--;
    if (code == 1006) { /* the TCP connection is gone already */
      drop(c);
      c->state = DONE;
    } else {
      c->state = DRAINING;
      c->deadline = now_ms() + 5000;
    }
  } else {
    char why[64];
    snprintf(why, sizeof why, "closed %d before subscribing", code);
    fail(c, why);
  }
}

#define PROTOCOL_ERROR(c, code, what) \
  do {                                  \
    protocol_error(c, code, what);      \
    return;                             \
  } while (0)

static void protocol_error(struct conn *c, int code, const char *what) {
  log_line("listener %ld: %s", (long)(c - conns), what);
  if (c->state != OPEN && c->state != SUBSCRIBED) {
    ended(c, code);
    return;
  }
  send_close(c, code);
  shutdown(c->fd, SHUT_WR);
  if (c->state == SUBSCRIBED) {
    if (!closing) closes[code]++;
    connected--;
  } else {
    in_flight--;
    note_failure(what);
  }
  c->state = DRAINING;
  c->deadline = now_ms() + 5000;
}

static int start(struct conn *c, long index) {
  drop(c); /* a failed attempt's socket, if it is still draining */
  const char *url = config.urls[(config.offset + index) % config.url_count];
  const char *address = config.addresses[index % config.address_count];
  int port = 0;
  char host[64] = {0};
  if (sscanf(url, "ws://%63[^:]:%d", host, &port) != 2) {
    note_failure("a URL not of the form ws://host:port/path");
    return -1;
  }
  struct sockaddr_in local = {.sin_family = AF_INET}, remote = {.sin_family = AF_INET};
  inet_pton(AF_INET, address, &local.sin_addr);
  inet_pton(AF_INET, host, &remote.sin_addr);
  remote.sin_port = htons((uint16_t)port);
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd < 0) {
    note_failure(strerror(errno));
    return -1;
  }
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  /* Should this side still hold the address when the process ends, a server may bind it. */
  setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (bind(fd, (struct sockaddr *)&local, sizeof local) < 0 ||
      (connect(fd, (struct sockaddr *)&remote, sizeof remote) < 0 && errno != EINPROGRESS)) {
    note_failure(strerror(errno));
    close(fd);
    return -1;
  }
  c->fd = fd;
  c->state = CONNECTING;
  c->deadline = now_ms() + config.handshake_ms;
  struct epoll_event event = {.events = EPOLLOUT, .data.u64 = (uint64_t)index};
  epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event);
  in_flight++;
  return 0;
}

static void send_request(struct conn *c, long index) {
  int error = 0;
  socklen_t size = sizeof error;
  getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &error, &size);
  if (error) {
    fail(c, strerror(error));
    return;
  }
  uint8_t nonce[16];
  if (getrandom(nonce, sizeof nonce, 0) != sizeof nonce) memset(nonce, 7, sizeof nonce);
  base64(nonce, sizeof nonce, c->key);
  const char *url = config.urls[(config.offset + index) % config.url_count];
  const char *authority = url + 5, *path = strchr(authority, '/');
  char request[1024];
  int n = snprintf(request, sizeof request,
                   "GET %s HTTP/1.1\r\nHost: %.*s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n\r\n",
                   path ? path : "/", (int)(path ? path - authority : (long)strlen(authority)),
                   authority, c->key);
  if (write(c->fd, request, (size_t)n) != n) {
    fail(c, "the handshake request could not be written");
    return;
  }
  c->state = HANDSHAKE;
  struct epoll_event event = {.events = EPOLLIN, .data.u64 = (uint64_t)index};
  epoll_ctl(epoll_fd, EPOLL_CTL_MOD, c->fd, &event);
}

/* The value of header `name` in the response head, copied to `out`; 0 if absent. */
static int header(const char *head, const char *name, char *out, size_t size) {
  size_t len = strlen(name);
  for (const char *line = strstr(head, "\r\n"); line; line = strstr(line + 2, "\r\n")) {
    if (strncasecmp(line + 2, name, len) == 0 && line[2 + len] == ':') {
      const char *v = line + 3 + len;
      while (*v == ' ' || *v == '\t') v++;
      size_t n = strcspn(v, "\r");
      while (n && (v[n - 1] == ' ' || v[n - 1] == '\t')) n--;
      snprintf(out, size, "%.*s", (int)n, v);
      return 1;
    }
  }
  return 0;
}

/* The response head is whole at `head` (NUL-terminated): NULL if it accepts, else why not. */
static const char *check_response(struct conn *c, const char *head) {
  static char why[160];
  if (strncmp(head, "HTTP/1.1 101", 12) != 0) {
    snprintf(why, sizeof why, "not a 101 response: %.100s", head);
    return why;
  }
  char value[256], expected[64], joined[64];
  uint8_t digest[20];
  snprintf(joined, sizeof joined, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", c->key);
  sha1((const uint8_t *)joined, strlen(joined), digest);
  base64(digest, 20, expected);
  if (!header(head, "Upgrade", value, sizeof value) || strcasecmp(value, "websocket") != 0)
    return "101 without Upgrade: websocket";
  if (!header(head, "Sec-WebSocket-Accept", value, sizeof value) || strcmp(value, expected) != 0)
    return "101 with a wrong Sec-WebSocket-Accept";
  if (header(head, "Sec-WebSocket-Extensions", value, sizeof value))
    return "101 with an extension, though none was offered";
  return NULL;
}

/* Whether `text` is well-formed UTF-8 (RFC 3629: no overlong form, surrogate or code
   point past U+10FFFF), as a text message must be (RFC 6455, 8.1). */
static int utf8(const uint8_t *text, size_t len) {
  size_t i = 0;
  while (i < len) {
    uint8_t b = text[i];
    if (b < 0x80) {
      i++;
      continue;
    }
    size_t n = b >= 0xf0 ? 4 : b >= 0xe0 ? 3 : b >= 0xc2 ? 2 : 0;
    if (n == 0 || b > 0xf4 || len - i < n) return 0;
    for (size_t j = 1; j < n; j++)
      if ((text[i + j] & 0xc0) != 0x80) return 0;
    uint8_t second = text[i + 1];
    if ((b == 0xe0 && second < 0xa0) || (b == 0xed && second > 0x9f) ||
        (b == 0xf0 && second < 0x90) || (b == 0xf4 && second > 0x8f))
      return 0;
    i += n;
  }
  return 1;
}

static void receive_message(struct conn *c, long index, const uint8_t *text, size_t len);

/* Frames in `data`; what is left of a frame not yet whole is kept in c->in. */
static void frames(struct conn *c, long index, const uint8_t *data, size_t len) {
  size_t at = 0;
  while (at < len && (c->state == OPEN || c->state == SUBSCRIBED || c->state == CLOSING)) {
    if (len - at < 2) break;
    uint8_t first = data[at], second = data[at + 1];
    uint64_t length = second & 0x7f;
    size_t head = 2;
    if (length == 126) {
      if (len - at < 4) break;
      length = (uint64_t)data[at + 2] << 8 | data[at + 3], head = 4;
    } else if (length == 127) {
      if (len - at < 10) break;
      length = 0;
      for (int i = 0; i < 8; i++) length = length << 8 | data[at + 2 + i];
      head = 10;
    }
    int fin = first & 0x80, opcode = first & 0x0f;
    if (first & 0x70) PROTOCOL_ERROR(c, 1002, "reserved bits set");
    if (second & 0x80) PROTOCOL_ERROR(c, 1002, "a masked frame from the server");
    if (length > MAX_MESSAGE) PROTOCOL_ERROR(c, 1009, "a message too big");
    if (len - at - head < length) break; /* the rest of this frame is still to come */
    const uint8_t *payload = data + at + head;
    at += head + (size_t)length;
    if (opcode >= 0x8) {
      if (!fin || length > 125) PROTOCOL_ERROR(c, 1002, "a bad control frame");
      if (opcode == 0x9) send_frame(c, 0xA, payload, (size_t)length);
      else if (opcode == 0x8) {
        int code = length >= 2 ? payload[0] << 8 | payload[1] : 1005;
        int known = (code >= 1000 && code <= 1003) || (code >= 1007 && code <= 1014) ||
                    (code >= 3000 && code <= 4999);
        size_t reason = length >= 2 ? (size_t)length - 2 : 0;
        if (length == 1 || (length >= 2 && !known) || !utf8(payload + 2, reason))
          PROTOCOL_ERROR(c, 1002, "a malformed close frame");
        if (c->state != CLOSING) send_close(c, code == 1005 ? 1000 : code);
        ended(c, code);
        return;
      } else if (opcode != 0xA) {
        PROTOCOL_ERROR(c, 1002, "an unknown opcode");
      }
    } else if (opcode == 0x1 || opcode == 0x0) {
      if ((opcode == 0x0) != (c->message != NULL))
        PROTOCOL_ERROR(c, 1002, "a continuation out of place");
      if (fin && !c->message) {
        receive_message(c, index, payload, (size_t)length);
      } else {
        if (c->message_len + length > MAX_MESSAGE) PROTOCOL_ERROR(c, 1009, "a message too big");
        c->message = realloc(c->message, c->message_len + (size_t)length + 1);
        memcpy(c->message + c->message_len, payload, (size_t)length);
        c->message_len += (size_t)length;
        if (fin) {
          uint8_t *whole = c->message;
          size_t whole_len = c->message_len;
          c->message = NULL, c->message_len = 0;
          receive_message(c, index, whole, whole_len);
          free(whole);
        }
      }
    } else {
      PROTOCOL_ERROR(c, 1003, "a binary or unknown data frame");
    }
  }
  if (c->fd < 0 || c->state == DRAINING) return;
  /* Keep the partial frame for the next read. */
  size_t rest = len - at;
  uint8_t *kept = rest ? malloc(rest) : NULL;
  if (rest) memcpy(kept, data + at, rest);
  free(c->in);
  c->in = kept, c->in_len = rest;
}

static const char *field(const char *json, size_t len, const char *name) {
  const char *at = memmem(json, len, name, strlen(name));
  return at ? at + strlen(name) : NULL;
}

static void receive_message(struct conn *c, long index, const uint8_t *bytes, size_t len) {
  const char *text = (const char *)bytes;
  if (!utf8(bytes, len)) PROTOCOL_ERROR(c, 1007, "a text message that is not UTF-8");
  const char *type = field(text, len, "\"type\":\"");
  if (!type) PROTOCOL_ERROR(c, 1007, "a message without a type");
  if (strncmp(type, "message\"", 8) == 0) {
    double at = now_ms();
    const char *data = field(text, len, "\"data\":{");
    if (!data) return;
    size_t left = len - (size_t)(data - text);
    const char *k_at = field(data, left, "\"k\":"), *t_at = field(data, left, "\"t\":");
    if (!k_at || !t_at) return;
    long k = strtol(k_at, NULL, 10);
    double sent = strtod(t_at, NULL);
    if (k < 0 || k >= MAX_BROADCASTS) return;
    if (!latency[k]) {
      latency[k] = malloc(sizeof(double) * (size_t)config.connections);
      for (long i = 0; i < config.connections; i++) latency[k][i] = NAN;
    }
    if (!isnan(latency[k][index])) {
      duplicates++;
      return;
    }
    latency[k][index] = at - sent;
    received[k]++;
  } else if (strncmp(type, "welcome\"", 8) == 0) {
    char subscribe[512];
    int n = snprintf(subscribe, sizeof subscribe, "{\"type\":\"subscribe\",\"channel\":\"%s\"}",
                     config.channel);
    send_frame(c, 0x1, (const uint8_t *)subscribe, (size_t)n);
  } else if (strncmp(type, "subscribed\"", 11) == 0) {
    if (c->state == OPEN) {
      c->state = SUBSCRIBED;
      in_flight--;
      connected++;
    }
  } else if (strncmp(type, "error\"", 6) == 0) {
    errors_seen++;
    if (c->state == OPEN) {
      const char *code = field(text, len, "\"code\":\"");
      char why[128];
      snprintf(why, sizeof why, "error %.40s", code ? code : "?");
      fail(c, why);
    }
  }
}

static void readable(struct conn *c, long index) {
  static uint8_t buffer[65536];
  ssize_t n = read(c->fd, buffer, sizeof buffer);
  if (c->state == DRAINING) {
    if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) drop(c), c->state = DONE;
    return;
  }
  if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR)) {
    ended(c, 1006);
    return;
  }
  if (n < 0) return;
  const uint8_t *data = buffer;
  size_t len = (size_t)n;
  uint8_t *joined = NULL;
  if (c->in_len) { /* a head or a frame begun in an earlier read */
    joined = malloc(c->in_len + len + 1);
    memcpy(joined, c->in, c->in_len);
    memcpy(joined + c->in_len, buffer, len);
    len += c->in_len;
    data = joined;
    free(c->in), c->in = NULL, c->in_len = 0;
  }
  if (c->state == HANDSHAKE) {
    const uint8_t *end = memmem(data, len, "\r\n\r\n", 4);
    if (!end) {
      if (len > MAX_HEAD) {
        fail(c, "a handshake response head over 16 KiB");
      } else { /* the head goes on in the next read */
        c->in = malloc(len);
        memcpy(c->in, data, len);
        c->in_len = len;
      }
      free(joined);
      return;
    }
    size_t head_len = (size_t)(end - data);
    char *head = strndup((const char *)data, head_len);
    const char *problem = check_response(c, head);
    free(head);
    if (problem) {
      fail(c, problem);
      free(joined);
      return;
    }
    c->state = OPEN;
    data += head_len + 4;
    len -= head_len + 4;
  }
  frames(c, index, data, len);
  free(joined);
}

/* --- the phases --- */

static long last_progress_ms;

static void check_deadlines(double now) {
  static double last;
  if (now - last < 100) return;
  last = now;
  for (long i = 0; i < config.connections; i++) {
    struct conn *c = &conns[i];
    if ((c->state == CONNECTING || c->state == HANDSHAKE || c->state == OPEN) && now > c->deadline)
      fail(c, "no subscription within the handshake timeout");
    else if (c->state == DRAINING && now > c->deadline)
      drop(c), c->state = DONE;
  }
}

static void handle(struct epoll_event *event) {
  long index = (long)event->data.u64;
  struct conn *c = &conns[index];
  if (c->fd < 0) return;
  if (c->state == CONNECTING) send_request(c, index);
  else if (event->events & (EPOLLIN | EPOLLHUP | EPOLLERR)) readable(c, index);
}

static void poll_once(int timeout_ms) {
  struct epoll_event events[512];
  int n = epoll_wait(epoll_fd, events, 512, timeout_ms);
  for (int i = 0; i < n; i++) handle(&events[i]);
  double now = now_ms();
  if (now > config.deadline_ms) {
    log_line("deadline of %ld ms passed: exiting", config.deadline_ms);
    exit(2);
  }
  check_deadlines(now);
}

/* One round: every listener in `todo` tries, `parallel` at a time. */
static void connect_round(long *todo, long count, double started) {
  long next = 0;
  while (next < count || in_flight > 0) {
    while (next < count && in_flight < config.parallel) {
      struct conn *c = &conns[todo[next]];
      c->state = IDLE;
      if (start(c, todo[next]) < 0) c->state = DONE;
      next++;
    }
    poll_once(50);
    double now = now_ms();
    if (now - last_progress_ms >= config.progress_ms) {
      last_progress_ms = (long)now;
      emit("{\"event\":\"progress\",\"connected\":%ld,\"failed\":%ld}", connected, failed_attempts);
    }
    (void)started;
  }
}

static long unsubscribed(long *todo) {
  long n = 0;
  for (long i = 0; i < config.connections; i++)
    if (conns[i].state != SUBSCRIBED) todo[n++] = i;
  return n;
}

static void emit_ready(double connect_ms, long first_round_failures, const char *first_round) {
  long failures = config.connections - connected;
  emit("{\"event\":\"ready\",\"connected\":%ld,\"failures\":%ld,\"first_failure\":%s%s%s,"
       "\"failed_attempts\":%ld,\"first_round_failures\":%ld,\"first_round_failure\":%s%s%s,"
       "\"connect_ms\":%.1f,\"loadgen\":{\"rss_mb\":%.1f}}",
       connected, failures, failures ? "\"" : "", failures ? first_failure : "null",
       failures ? "\"" : "", failed_attempts, first_round_failures,
       first_round[0] ? "\"" : "", first_round[0] ? first_round : "null",
       first_round[0] ? "\"" : "", connect_ms, rss_mb());
}

static void emit_collected(long k) {
  printf("{\"event\":\"collected\",\"k\":%ld,\"received\":%ld,\"connected\":%ld,\"latencies_ms\":[",
         k, k >= 0 && k < MAX_BROADCASTS ? received[k] : 0, connected);
  int first = 1;
  if (k >= 0 && k < MAX_BROADCASTS && latency[k])
    for (long i = 0; i < config.connections; i++)
      if (!isnan(latency[k][i])) printf(first ? "%.3f" : ",%.3f", latency[k][i]), first = 0;
  printf("]}\n");
  fflush(stdout);
}

/* The next command line on stdin, without blocking: 1 and the line, or 0, or -1 at its end. */
static int next_command(char *line, size_t size) {
  static char pending[4096];
  static size_t have;
  for (;;) {
    char *newline = memchr(pending, '\n', have);
    if (newline) {
      size_t n = (size_t)(newline - pending);
      snprintf(line, size, "%.*s", (int)n, pending);
      memmove(pending, newline + 1, have - n - 1);
      have -= n + 1;
      return 1;
    }
    if (have == sizeof pending - 1) have = 0; /* no command is that long: drop it */
    ssize_t got = read(STDIN_FILENO, pending + have, sizeof pending - have - 1);
    if (got == 0) return -1;
    if (got < 0) return 0;
    have += (size_t)got;
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    fprintf(stderr, "usage: listeners '<config JSON>'\n");
    return 64;
  }
  /* A write to a socket the peer reset must fail, not end the process. */
  signal(SIGPIPE, SIG_IGN);
  char *json = argv[1];
  config.url_count = json_strings(json, "urls", config.urls, MAX_URLS);
  config.address_count = json_strings(json, "localAddresses", config.addresses, MAX_ADDRESSES);
  const char *channel = json_value(json, "channel");
  if (channel && *channel == '"')
    snprintf(config.channel, sizeof config.channel, "%.*s", (int)strcspn(channel + 1, "\""),
             channel + 1);
  config.connections = json_long(json, "connections", 0);
  config.offset = json_long(json, "offset", 0);
  config.parallel = json_long(json, "parallel", 64);
  config.retries = json_long(json, "retries", 0);
  config.progress_ms = json_long(json, "progressMs", 1000);
  config.handshake_ms = json_long(json, "handshakeTimeoutMs", 30000);
  double started = now_ms();
  config.deadline_ms = (long)started + json_long(json, "deadlineMs", 900000);
  if (!config.url_count || !config.address_count || !config.connections || !config.channel[0]) {
    emit("{\"event\":\"failed\",\"error\":\"the config needs urls, localAddresses, connections "
         "and channel\"}");
    return 1;
  }
  conns = calloc((size_t)config.connections, sizeof *conns);
  for (long i = 0; i < config.connections; i++) conns[i].fd = -1;
  epoll_fd = epoll_create1(EPOLL_CLOEXEC);
  /* Commands are looked for between polls, not polled for: a command line waiting while
     a broadcast is collected would wake every poll. */
  fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);

  long *todo = malloc(sizeof(long) * (size_t)config.connections);
  long count = unsubscribed(todo);
  connect_round(todo, count, started);
  long first_round_failures = config.connections - connected;
  char first_round[512];
  snprintf(first_round, sizeof first_round, "%s", first_round_failures ? first_failure : "");
  /* As real clients do: those that failed try again, after everyone else had a turn. */
  for (long round = 1; round <= config.retries && connected < config.connections; round++) {
    count = unsubscribed(todo);
    log_line("retry %ld: %ld connections (%s)", round, count, first_failure);
    first_failure[0] = 0;
    connect_round(todo, count, started);
  }
  free(todo);
  emit_ready(now_ms() - started, first_round_failures, first_round);

  /* Commands until `close`; meanwhile the audience receives. */
  int collecting = 0;
  long k = 0;
  double collect_until = 0;
  char line[4096];
  for (;;) {
    poll_once(collecting ? 5 : 50);
    int got;
    while (!collecting && (got = next_command(line, sizeof line)) != 0) {
      if (got < 0) return 0; /* the runner went away */
      if (strstr(line, "\"collect\"")) {
        collecting = 1;
        k = json_long(line, "k", 0);
        collect_until = now_ms() + json_long(line, "timeoutMs", 30000);
      } else if (strstr(line, "\"close\"")) {
        goto close_all;
      }
    }
    if (collecting) {
      long got_k = k >= 0 && k < MAX_BROADCASTS ? received[k] : 0; /* one it cannot hold: none */
      int all = got_k >= connected;
      if (all || now_ms() > collect_until) {
        if (!all) log_line("broadcast %ld: %ld of %ld by the timeout", k, got_k, connected);
        emit_collected(k);
        collecting = 0;
      }
    }
  }

close_all:
  closing = 1;
  for (long i = 0; i < config.connections; i++)
    if (conns[i].state == SUBSCRIBED) {
      send_close(&conns[i], 1000);
      conns[i].state = CLOSING;
      connected--;
    }
  double until = now_ms() + 5000;
  for (;;) {
    long open = 0;
    for (long i = 0; i < config.connections; i++)
      open += conns[i].state == CLOSING || conns[i].state == DRAINING;
    if (!open || now_ms() > until) break;
    poll_once(50);
  }
  for (long i = 0; i < config.connections; i++) drop(&conns[i]);
  printf("{\"event\":\"result\",\"result\":{\"connections\":%ld,\"duplicates\":%ld,\"closes\":{",
         config.connections, duplicates);
  int first = 1;
  for (int code = 0; code < 5000; code++)
    if (closes[code]) printf(first ? "\"%d\":%ld" : ",\"%d\":%ld", code, closes[code]), first = 0;
  printf("},\"errors\":%ld,\"loadgen\":{\"rss_mb\":%.1f}}}\n", errors_seen, rss_mb());
  fflush(stdout);
  return 0;
}
