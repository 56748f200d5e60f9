"""Ids, history and publishing of messages in Redis: one Lua script per operation.

Per channel, two keys (hash-tagged by channel, so both land in one Cluster slot):

* `<prefix>meta:{<channel>}`, a hash: `epoch` (names this history), `seq` (the last
  id given) and `srv` (the run id of the server that gave it). It outlives the stream
  by `meta_ttl`, so that ids keep increasing while anyone may still hold one.
* `<prefix>history:{<channel>}`, a stream of the last frames, with entry ids
  `<seq>-0`: reading "after seq N" is one XRANGE, and a gap shows as a missing seq.

Publishing runs in one script, so a message is numbered, kept and published at once
(or not at all), and every worker forwards the same bytes. Each publish carries a token
key that Redis keeps after running it: a random one, or one made of the client's
idempotency key, `<prefix>idem:{<channel>}:<key>` (in the channel's slot). A call whose
token exists is skipped and answered with the id the token holds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol

from redis.asyncio import Redis, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.typing import EncodableT

from service.broker.history import HistoryRead, Position, Replayed, new_epoch, read_after
from service.broker.randomness import hex_name
from service.broker.redis_pipe import OnReply, Unanswered
from service.errors import BrokerUnavailable, OutcomeUnknown
from service.protocol.frames import message_parts

#: Gets a publish's message id (`Replayed` if an earlier publish with its idempotency key
#: had it), or the exception it failed with (`BrokerUnavailable`, or its `OutcomeUnknown`).
Published = Callable[[str | Exception], None]

# The publish script (bench/floor.py runs it too). KEYS: meta hash, stream, this
# publish's token.
# ARGV: frame head, frame tail, pub/sub channel, candidate epoch, history size,
#       history TTL, meta TTL, token TTL, the publish command (PUBLISH, or SPUBLISH on
#       a cluster: service/broker/redis_topology.py), and (added by the pipe) the run id
#       of the server it runs on.
# The token makes a retried call (the connection broke after Redis ran the script but
# before its reply arrived), or a client's retry with the same idempotency key, return the
# first call's id instead of publishing twice; as an array, to tell that answer apart.
# A new epoch means the old history is meaningless (and its entry ids could collide).
# The hash's `srv` is the run id of the server that numbered its last message. When
# another server numbers the next one (a replica promoted by a failover, a server
# restarted from a snapshot, a cluster primary a slot moved to), it may lack that
# server's last writes, and would give out their ids again for other messages: a new
# epoch starts, so that a client holding one of those ids hears "not recovered" instead
# of skipping messages. (A moved slot came whole, but nothing here can tell a move from
# a failover: both start an epoch.) A hash without `srv` (made by a history read, or by
# an older version) adopts the server as it is.
PUBLISH_SCRIPT = """
local done = redis.call('GET', KEYS[3])
if done then return {done} end
local meta = redis.call('HMGET', KEYS[1], 'epoch', 'srv')
local epoch, server = meta[1], ARGV[10]
if not epoch or (server and meta[2] and meta[2] ~= server) then
  epoch = ARGV[4]
  redis.call('HSET', KEYS[1], 'epoch', epoch, 'seq', 0)
  redis.call('DEL', KEYS[2])
end
if server and meta[2] ~= server then redis.call('HSET', KEYS[1], 'srv', server) end
local seq = redis.call('HINCRBY', KEYS[1], 'seq', 1)
redis.call('EXPIRE', KEYS[1], ARGV[7])
local id = epoch .. ':' .. seq
local frame = ARGV[1] .. id .. ARGV[2]
if tonumber(ARGV[5]) > 0 then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], seq .. '-0', 'f', frame)
  redis.call('EXPIRE', KEYS[2], ARGV[6])
end
redis.call('SET', KEYS[3], id, 'EX', ARGV[8])
redis.call(ARGV[9], ARGV[3], frame)
return id
"""

# KEYS: meta hash, stream.
# ARGV: candidate epoch, TTL of a meta hash made here, mode ('after' or 'latest'),
#       epoch of `since`, first entry id to read, count (0: none; -1: all).
# Starting an epoch here too means a channel's position is known before its first
# message, so "after position E:0" covers it from the very start. Such a hash lives
# only HISTORY_TTL unless a publish extends it: reads of made-up channel names must not
# fill Redis for a week.
_READ = """
if redis.call('HSETNX', KEYS[1], 'epoch', ARGV[1]) == 1 then
  redis.call('DEL', KEYS[2])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
local epoch = redis.call('HGET', KEYS[1], 'epoch')
local top = redis.call('HGET', KEYS[1], 'seq') or '0'
local count = tonumber(ARGV[6])
local entries = {}
if count ~= 0 then
  if ARGV[3] == 'latest' then
    entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', count)
  elseif ARGV[4] == epoch then
    if count > 0 then
      entries = redis.call('XRANGE', KEYS[2], ARGV[5], '+', 'COUNT', count)
    else
      entries = redis.call('XRANGE', KEYS[2], ARGV[5], '+')
    end
  end
end
return {epoch, top, entries}
"""


class ScriptRunner(Protocol):
    """Runs one script (`ScriptPipe`, `RoutedPipe`): its reply, or its failure, to `on_reply`."""

    def start(self, keys: list[EncodableT], args: list[EncodableT], on_reply: OnReply) -> None:
        """Run it; `on_reply` gets the reply later, never from inside this call."""


class RedisHistory:
    """Publishes messages with their ids and history, and reads that history back."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        *,
        pipe: Callable[[str], ScriptRunner],
        pubsub_key: Callable[[str], bytes],
        publish_command: bytes,
        prefix: str,
        size: int,
        ttl: int,
        meta_ttl: int,
        token_ttl: int,
        key_ttl: int = 0,
    ) -> None:
        """`key_ttl`: seconds a publish's idempotency key is kept (at least `token_ttl`)."""
        self._pubsub_key = pubsub_key
        self._publish_command = publish_command
        self._prefix = prefix
        self._size = size
        self._ttl = ttl
        self._meta_ttl = meta_ttl
        # Must outlive every retry of one call (see `publish_token_ttl`).
        self._token_ttl = token_ttl
        # A client's key is that call's token too: it must outlive the retries as well.
        self._key_ttl = max(key_ttl, token_ttl)
        # The hot path: a connection of its own, pipelined (service/broker/redis_pipe.py).
        self._publish = pipe(PUBLISH_SCRIPT)
        self._read = client.register_script(_READ)

    def publish_now(
        self, channel: str, data: bytes, done: Published, key: str | None = None
    ) -> None:
        """Number `data`'s `message` frame, keep it and PUBLISH it; `done` gets its id.

        With `key` (a client's idempotency key), a publish with the same key to the same
        channel within the key's TTL is not published again: `done` gets its id, as
        `Replayed`. `done` gets `BrokerUnavailable` when Redis did not publish it,
        `OutcomeUnknown` when it may have.

        `done` is called later, never from inside this call (service/broker/redis_pipe.py,
        `start`).
        """
        keys, args = self._publish_call(channel, data, key)
        self._publish.start(keys, args, partial(_published, done))

    def _publish_call(
        self, channel: str, data: bytes, key: str | None
    ) -> tuple[list[EncodableT], list[EncodableT]]:
        return publish_call(
            channel,
            data,
            prefix=self._prefix,
            pubsub_key=self._pubsub_key(channel),
            publish_command=self._publish_command,
            size=self._size,
            ttl=self._ttl,
            meta_ttl=self._meta_ttl,
            token_ttl=self._token_ttl,
            key=key,
            key_ttl=self._key_ttl,
        )

    async def after(self, channel: str, since: Position | None, limit: int | None) -> HistoryRead:
        """The messages after `since` (all of them, or the first `limit`)."""
        if since is None:
            since_epoch, first = "", "-"
        else:
            since_epoch, first = since.epoch, f"{since.seq + 1}-0"
        count = -1 if limit is None else limit
        epoch, top, entries = await self._run(channel, "after", since_epoch, first, count)
        return read_after(epoch, top, entries, since)

    async def latest(self, channel: str, limit: int) -> HistoryRead:
        """The last `limit` messages, oldest first (0: only the position)."""
        epoch, top, entries = await self._run(channel, "latest", "", "", limit)
        entries.reverse()
        return HistoryRead(Position(epoch, top), entries)

    async def _run(
        self, channel: str, mode: str, since_epoch: str, first: str, count: int
    ) -> tuple[str, int, list[tuple[int, str]]]:
        args: list[EncodableT] = [new_epoch(), self._ttl, mode, since_epoch, first, count]
        try:
            epoch, top, raw = await self._read(keys=list(_keys(self._prefix, channel)), args=args)
        except (RedisError, RedisClusterException) as exc:
            raise BrokerUnavailable(f"Redis did not return the history: {exc}") from exc
        return _text(epoch), int(top), [_entry(item) for item in raw]


def publish_call(
    channel: str,
    data: bytes,
    *,
    prefix: str,
    pubsub_key: bytes,
    publish_command: bytes,
    size: int,
    ttl: int,
    meta_ttl: int,
    token_ttl: int,
    key: str | None = None,
    key_ttl: int = 0,
) -> tuple[list[EncodableT], list[EncodableT]]:
    """KEYS and ARGV of `PUBLISH_SCRIPT` for one message (bench/floor.py sends them too).

    With `key`, the client's idempotency key (validated: no spaces, at most 64
    characters), the token is made of it and kept `key_ttl` seconds (at least
    `token_ttl`); else it is random, kept `token_ttl`.
    """
    head, tail = message_parts(channel, data)
    meta, stream = _keys(prefix, channel)
    if key is None:
        token = f"{prefix}pub:{{{channel}}}:{hex_name()}"
    else:
        # After the channel's hash tag, a brace in `key` does not move the key's slot.
        token = f"{prefix}idem:{{{channel}}}:{key}"
        token_ttl = max(key_ttl, token_ttl)
    args: list[EncodableT] = [
        head,
        tail,
        pubsub_key,
        new_epoch(),
        size,
        ttl,
        meta_ttl,
        token_ttl,
        publish_command,
    ]
    return [meta, stream, token], args


def _keys(prefix: str, channel: str) -> tuple[str, str]:
    """A channel's meta hash and history stream."""
    return f"{prefix}meta:{{{channel}}}", f"{prefix}history:{{{channel}}}"


def publish_token_ttl(timeout: float) -> int:
    """Seconds Redis keeps a publish's token, for calls that give up after `timeout`.

    A call is retried (on connection errors) until `timeout` after it was made, and its
    last attempt may wait `timeout` more for a reply (service/broker/redis_pipe.py): the
    token must outlive all of that, or a late retry would publish a second time. The
    margin covers the watchdog's period and the backoff.
    """
    return math.ceil(2 * timeout) + 10


def _published(done: Published, reply: Any) -> None:
    """A publish script's reply as `publish` would return it (or raise it) to `done`."""
    if not isinstance(reply, Exception):
        done(_message_id(reply))
    elif isinstance(reply, RedisError):
        unavailable = _unavailable(reply)
        unavailable.__cause__ = reply
        done(unavailable)
    else:
        done(reply)


def _message_id(reply: Any) -> str:
    """The id in a publish script's reply: `[id]` when the call was skipped (its token)."""
    if isinstance(reply, bytes):  # first: the hot path
        return reply.decode()
    if isinstance(reply, list):
        return Replayed(_text(reply[0]))
    return str(reply)


def _unavailable(error: RedisError) -> BrokerUnavailable:
    """What the client is told: `OutcomeUnknown` if Redis may have published it."""
    if isinstance(error, Unanswered):
        return OutcomeUnknown(
            f"Redis did not answer ({error}): the message may or may not have been "
            "published; publish it again with the same idempotency key to publish it at "
            "most once"
        )
    return BrokerUnavailable(f"Redis did not accept the message: {error}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(item: Any) -> tuple[int, str]:
    # [b"<seq>-0", [b"f", b"<frame>"]]
    entry_id, fields = item
    return int(_text(entry_id).partition("-")[0]), _text(fields[1])
