"""One self-healing pub/sub connection to one Redis node, for the channels routed to it.

A worker holds one link per node its channels live on (service/broker/redis_backend.py
routes them): with one Redis, one link; with a Redis Cluster, one per primary.

* `hold`/`release` only change the link's set of channels, at once; `send_subscribe`
  and `send_unsubscribe` then send the command when a connection is up. None raises.
* One reader task owns a dedicated connection (not a pool connection). It reconnects
  with jittered exponential backoff and re-subscribes every channel; it catches every
  error, so it cannot end while the link is open. Messages are handed on from inside
  each read (`reply_reader`).
* A watchdog pings the connection when it is silent and rebuilds it when no reply comes
  in time, which `health_check_interval` does not do for a frozen Redis.
* A canary (service/broker/canary.py) checks that this connection still hears what is
  published on its node.
* After a reconnect, each channel that was live is reported `interrupted` once it is
  confirmed again, so that the hub can fill the gap from history.
* On a cluster, a channel the node stops serving (Redis drops a sharded subscription
  when its slot moves, or answers MOVED) is given back to the router, to be
  subscribed where it lives now.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from typing import Any, Protocol

from redis.asyncio.connection import AbstractConnection
from redis.crc import key_slot
from redis.exceptions import AskError

from service.broker.canary import Canary
from service.broker.redis_topology import Node, Topology, own_connection
from service.broker.replies import Replies, reply_reader

logger = logging.getLogger(__name__)

_FIRST_RETRY_DELAY = 0.05


class LinkOwner(Protocol):
    """What a link tells about its channels (the backend that routes them)."""

    def delivered(self, key: bytes, data: bytes) -> None:
        """A message on pub/sub channel `key` (from inside the read)."""

    def confirmed(self, channel: str, interrupted: bool) -> None:
        """Redis confirmed the subscription; `interrupted`: it had been live, then broken."""

    def unconfirmed(self, channel: str) -> None:
        """The subscription is no longer known to hold (the connection broke)."""

    def dropped(self, channel: str, interrupted: bool) -> None:
        """The node no longer serves `channel`: it must be routed anew."""

    def misrouted(self) -> None:
        """The node is gone or serves other slots than believed: learn the topology."""


class PubSubLink:
    """Subscriptions on one node, over one connection that rebuilds itself."""

    def __init__(
        self,
        owner: LinkOwner,
        node: Node,
        topology: Topology,
        *,
        prefix: str,
        client_name: str,
        ping_interval: float,
        ping_timeout: float,
        retry_max_delay: float,
        canary_interval: float,
        canary_timeout: float,
        fast: bool,
    ) -> None:
        self.node = node
        self._owner = owner
        self._topology = topology
        self._kind = topology.kind
        self._prefix = prefix
        self._client_name = client_name
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._retry_max_delay = retry_max_delay
        self._fast = fast
        #: The channels routed here: subscribed on every connection this link makes.
        self.channels: set[str] = set()
        # channel -> SUBSCRIBE commands sent on the current connection, not yet confirmed
        self._pending: dict[str, int] = {}
        # channel -> UNSUBSCRIBE commands sent, not yet confirmed: any other unsubscribe
        # is Redis dropping the channel (a sharded channel whose slot moved).
        self._leaving: dict[str, int] = {}
        # Channels here when the current connection was made and not yet re-confirmed on
        # it: while any is left, the worker is deaf to them (readiness is false). A channel
        # added later is not counted: its subscriber waits for it, nobody else does.
        self._resubscribing: set[str] = set()
        # Confirmed on the current connection.
        self._live: set[str] = set()
        # Were live when the connection broke: reported `interrupted` once confirmed again.
        self._gaps: set[str] = set()
        self._conn: AbstractConnection | None = None
        self._generation = 0
        self._reader: asyncio.Task[None] | None = None
        # `#` is never part of a channel name, so no client can subscribe to or spoof it;
        # the random part keeps it this process's own even if workers share a WORKER_ID.
        self._canary_base = f"{client_name}#canary:{os.urandom(6).hex()}".encode()
        self._canary_key: bytes | None = None
        self._canary = Canary(
            interval=canary_interval,
            timeout=canary_timeout,
            publish=self._publish_canary,
            generation=self._canary_generation,
            on_deaf=self._deafened,
            on_heard=self._heard_canary,
        )
        self._canary_task: asyncio.Task[None] | None = None
        self._canary_subscribed = False
        self._deaf: str | None = None
        self.deaf_detections = 0
        self.reconnects = 0
        self.last_error = "not connected yet"

    def start(self) -> None:
        """Start the reader; it connects (and keeps reconnecting) in the background."""
        name = f"redis-pubsub-reader {self.node.name}"
        self._reader = asyncio.create_task(self._run_reader(), name=name)
        self._canary_task = asyncio.create_task(self._canary.run(), name="redis-canary")

    async def close(self) -> None:
        """Stop the reader and the canary, and close the connection."""
        tasks = [t for t in (self._reader, self._canary_task) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def hold(self, channel: str, *, interrupted: bool = False) -> None:
        """Hold `channel` here; `send_subscribe` tells Redis.

        `interrupted`: it was live elsewhere and may have missed some.
        """
        self.channels.add(channel)
        if interrupted:
            self._gaps.add(channel)

    async def send_subscribe(self, channel: str) -> None:
        """SUBSCRIBE `channel` on the connection, if it is up and the channel still held."""
        if channel not in self.channels:
            return  # let go meanwhile
        for command in self._subscribe_commands([channel]):
            await self._command(*command, channel=channel)

    def release(self, channel: str) -> bool:
        """Stop holding `channel`; `send_unsubscribe` tells Redis.

        True if it had been live and may have missed some.
        """
        self.channels.discard(channel)
        self._resubscribing.discard(channel)
        interrupted = channel in self._live or channel in self._gaps
        self._live.discard(channel)
        self._gaps.discard(channel)
        return interrupted

    async def send_unsubscribe(self, channel: str) -> None:
        """UNSUBSCRIBE `channel` on the connection, unless it is held here again."""
        conn = self._conn
        if channel in self.channels or conn is None or not conn.is_connected:
            return
        self._leaving[channel] = self._leaving.get(channel, 0) + 1
        await self._command(self._kind.unsubscribe, self._key(channel))

    @property
    def canary_checks(self) -> int:
        """Canary round trips that came back."""
        return self._canary.checks

    def alive(self) -> bool:
        """True when connected, re-subscribed after connecting, and not found deaf."""
        return self._conn is not None and not self._resubscribing and self._deaf is None

    def problem(self) -> str:
        """Why `alive()` is false, for operators ("" when it is true)."""
        if self._conn is None:
            return f"pub/sub connection down: {self.last_error}"
        if self._resubscribing:
            return f"re-subscribing {len(self._resubscribing)} channels"
        return self._deaf or ""

    async def check_canary(self) -> None:
        """Subscribe a canary anew if its slot moved away (after the topology changed)."""
        conn = self._conn
        if self._canary_key is not None or conn is None or not conn.is_connected:
            return
        self._canary_key = self._topology.canary_key(self._canary_base, self.node)
        if self._canary_key is not None:
            await self._command(self._kind.subscribe, self._canary_key)

    def _key(self, channel: str) -> bytes:
        return self._kind.key(self._prefix, channel)

    def _subscribe_commands(self, channels: list[str]) -> list[tuple[bytes, ...]]:
        keys = [self._key(channel) for channel in channels]
        if not keys:
            return []
        if self._kind.hash_tagged:
            # A sharded SUBSCRIBE takes channels of one slot only.
            return [(self._kind.subscribe, key) for key in keys]
        return [(self._kind.subscribe, *keys)]

    async def _deafened(self, reason: str) -> None:
        self.deaf_detections += 1
        self._deaf = f"deaf: {reason}"
        logger.warning("Redis subscription is deaf (%s): rebuilding it%s", reason, self.node.label)
        self._owner.misrouted()
        conn = self._conn
        if conn is not None:
            # The reader's pending read fails on the closed connection; it reconnects,
            # re-subscribes, and marks the interruption, as after any other break.
            await conn.disconnect(nowait=True)

    def _canary_generation(self) -> int | None:
        # Checking before Redis confirmed the canary's own SUBSCRIBE would read a
        # reconnect as deafness ("0 receivers").
        if self._conn is None or not self._canary_subscribed:
            return None
        return self._generation

    async def _publish_canary(self, nonce: bytes) -> int:
        key = self._canary_key
        if key is None:
            raise RuntimeError("no canary channel on this node")
        return await self._topology.publish(key, nonce)

    def _heard_canary(self) -> None:
        if self._deaf is not None:
            logger.warning("Redis subscription hears again (%s)", self._deaf)
            self._deaf = None

    # -- the reader ---------------------------------------------------------------------

    async def _command(self, *args: bytes | str, channel: str | None = None) -> None:
        conn = self._conn
        # Only write on a live connection: `send_command` would otherwise reconnect it
        # from this task, behind the reader's back.
        if conn is None or not conn.is_connected:
            return
        if channel is not None:
            self._pending[channel] = self._pending.get(channel, 0) + 1
        try:
            await conn.send_command(*args, check_health=False)
        except Exception as exc:
            # Whatever broke (redis-py can even raise AttributeError when the reader tears
            # the connection down mid-write), the reader reconnects and re-subscribes all
            # channels; raising here would corrupt the caller's bookkeeping.
            logger.debug("pub/sub command %r not sent: %r", args[0], exc)

    async def _run_reader(self) -> None:
        delay = _FIRST_RETRY_DELAY
        failures = 0
        while True:
            conn: AbstractConnection | None = None
            replies: Replies | None = None
            try:
                conn = own_connection(self.node)
                await conn.connect()  # type: ignore[no-untyped-call]
                # Before anything is sent: every reply from here on goes to `_reply`.
                replies = reply_reader(conn, self._reply, fast=self._fast)
                # From here on `send_subscribe` writes on this connection; every channel held
                # before this point is in the snapshot below (no await in between).
                self._conn = conn
                self._generation += 1
                self._canary_subscribed = False
                self._pending = dict.fromkeys(self.channels, 1)
                self._leaving = {}
                self._resubscribing = set(self.channels)
                self._canary_key = self._topology.canary_key(self._canary_base, self.node)
                commands = self._subscribe_commands(list(self.channels))
                if self._canary_key is not None:
                    commands.insert(0, (self._kind.subscribe, self._canary_key))
                # In one write: a channel let go meanwhile is unsubscribed after this.
                await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
                if failures:
                    logger.warning(
                        "Redis pub/sub connection restored after %d failures%s",
                        failures,
                        self.node.label,
                    )
                delay, failures = _FIRST_RETRY_DELAY, 0
                self.last_error = ""
                await self._watch(conn, replies)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the reader must outlive any error
                failures += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
                log = logger.warning if failures == 1 or failures % 20 == 0 else logger.debug
                log(
                    "Redis pub/sub connection failed (attempt %d, retrying in %.2f s): %s%s",
                    failures,
                    delay,
                    self.last_error,
                    self.node.label,
                )
                # On a cluster the node may be gone for good (failed over).
                self._owner.misrouted()
            finally:
                self._conn = None
                self._gaps |= self._live
                self._live.clear()
                for channel in self.channels:
                    self._owner.unconfirmed(channel)
                if replies is not None:
                    await replies.aclose()  # the public reader's task ends with it
                if conn is not None:
                    await conn.disconnect(nowait=True)
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, self._retry_max_delay)

    async def _watch(self, conn: AbstractConnection, replies: Replies) -> None:
        """Until the connection ends: ping it when silent, end it when a ping goes unheard.

        Messages do not pass through here: the reader `reply_reader` chose hands each
        reply to `_reply` (with the tap, from inside the read: no task step and no timeout
        per read; docs/performance.md, "What changed, and what each part bought", no. 5).
        """
        loop = asyncio.get_running_loop()
        pinged_at: float | None = None  # last_heard when the pending PING went out
        while not replies.ended.done():
            silent = loop.time() - replies.last_heard
            if silent >= self._ping_interval + self._ping_timeout:
                raise TimeoutError(f"no reply from Redis for {silent:.1f} s")
            if silent >= self._ping_interval and pinged_at != replies.last_heard:
                pinged_at = replies.last_heard
                await conn.send_command("PING", check_health=False)
            # Wake when the connection ends, or at the next mark of the silence as it is
            # now, not as it was before the send: its answer may have come meanwhile (on
            # a busy machine it did, and the next wake found the connection "silent" for
            # the whole timeout). A ping `ping_interval` after the last reply, the end
            # `ping_timeout` after that while the ping is unanswered.
            mark = self._ping_interval
            if pinged_at == replies.last_heard:
                mark += self._ping_timeout
            await asyncio.wait([replies.ended], timeout=replies.last_heard + mark - loop.time())
        raise replies.ended.result()

    def _reply(self, reply: Any) -> None:
        if isinstance(reply, AskError):  # MOVED too: the node does not serve that slot
            self._moved(reply.slot_id)
            return
        if isinstance(reply, Exception):  # another error reply (reply_error made it)
            raise reply
        if isinstance(reply, list) and len(reply) == 3:
            self._handle(reply[0], reply[1], reply[2])

    def _handle(self, kind: bytes, key: bytes, data: Any) -> None:
        if key == self._canary_key:
            if kind == self._kind.message:
                self._canary.heard(data)
            elif kind == self._kind.subscribed:
                self._canary_subscribed = True
                if self._deaf is not None:
                    self._canary.check_soon()  # rebuilt after deafness: verify it now
            elif kind == self._kind.unsubscribed:
                self._canary_gone()
            return
        if kind == self._kind.message:
            self._owner.delivered(key, data)
            return
        channel = self._kind.channel_of(self._prefix, key)
        if kind == self._kind.subscribed:
            self._subscribed(channel)
        elif kind == self._kind.unsubscribed:
            leaving = self._leaving.get(channel, 0)
            if leaving > 1:
                self._leaving[channel] = leaving - 1
            elif leaving == 1:
                del self._leaving[channel]
            elif channel in self.channels:
                # Redis dropped it: its slot moved to another node.
                self._give_back(channel)

    def _subscribed(self, channel: str) -> None:
        # Count acks per channel even if it is no longer held: an ack from before an
        # unsubscribe must not confirm a later subscribe that Redis has not yet seen.
        left = self._pending.get(channel, 1) - 1
        if left > 0:
            self._pending[channel] = left
            return
        self._pending.pop(channel, None)
        self._resubscribing.discard(channel)
        if channel not in self.channels:
            return
        self._live.add(channel)
        interrupted = channel in self._gaps
        self._gaps.discard(channel)
        # Messages published while the connection was down never reached us.
        self._owner.confirmed(channel, interrupted)

    def _moved(self, slot: int) -> None:
        """Redis answered MOVED for `slot`: what is held here in that slot goes back."""
        if self._canary_key is not None and key_slot(self._canary_key) == slot:
            self._canary_gone()
        # No acknowledgement comes for that slot's commands: none is waited for any more.
        for waiting in (self._pending, self._leaving):
            for channel in [c for c in waiting if key_slot(self._key(c)) == slot]:
                del waiting[channel]
        for channel in [c for c in self.channels if key_slot(self._key(c)) == slot]:
            self._give_back(channel)
        self._owner.misrouted()

    def _give_back(self, channel: str) -> None:
        self._owner.dropped(channel, self.release(channel))

    def _canary_gone(self) -> None:
        # Picked again (`check_canary`) once the router learnt where the slots are.
        self._canary_key = None
        self._canary_subscribed = False
        self._owner.misrouted()
