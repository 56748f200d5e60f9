"""A broadcaster backend for Redis pub/sub that never dies and never loses a subscription.

broadcaster 0.3.1's own Redis backend has known traps (tests/integration/test_pitfalls.py): with
redis-py 8 it can deliver nothing after the first subscription (its listener waits
on a signal sent before SUBSCRIBE is recorded), its listener ends for good on a
disconnect or a non-UTF-8 payload, and it builds its client without retries.

This backend keeps broadcaster's `BroadcastBackend` interface, but:

* `subscribe`/`unsubscribe` only change a *wanted* set (and send the command when a
  connection is up); they never raise, so broadcaster's bookkeeping stays consistent.
* Each channel is routed to the link of the node that serves it
  (service/broker/pubsub_link.py: one self-healing connection with its watchdog and
  canary): one link with one Redis, one per primary with a Redis Cluster
  (service/broker/redis_topology.py). The messages are parsed and handed on from inside
  each read, to the channel's `ChannelSink` with their position: broadcaster's listener
  gets none.
* When a link reports a node gone or a slot moved, the router learns the topology again
  and moves the channels to the links that serve them now. A channel that was live is
  told `interrupted()` once it is confirmed again (after a reconnect or a move), so
  the hub can fill the gap from history.
"""

from __future__ import annotations

import asyncio
import logging
import random
from typing import Any

from broadcaster import BroadcastBackend, Event
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from service.broker.history import position_of
from service.broker.pubsub_link import PubSubLink
from service.broker.redis_pipe import Redirect, ScriptPipe
from service.broker.redis_topology import Node, Topology, own_connection, topology
from service.broker.redis_url import connection_pool
from service.broker.routed_pipe import RoutedPipe
from service.broker.sink import ChannelSink
from service.cluster_url import CLUSTER_SCHEMES
from service.errors import BrokerUnavailable
from service.protocol.frames import message_head

logger = logging.getLogger(__name__)

# Log the first non-UTF-8 payload, then one in this many.
_DROPPED_PAYLOAD_LOG_EVERY = 1000
_FIRST_RETRY_DELAY = 0.05
# Seconds between two lessons of the topology when asked for more often.
_ROUTE_INTERVAL = 0.25
#: What redis-py raises when Redis fails a command: RedisCluster's own errors are not
#: RedisErrors.
REDIS_ERRORS = (RedisError, RedisClusterException)


def check_redis_url(url: str) -> None:
    """Raise ValueError if redis-py cannot build a connection from `url` (connects nothing).

    Settings checks the scheme, host, port and database; the query string is redis-py's
    to interpret, and it rejects a bad value when parsing the URL and an unknown
    parameter only when it builds a connection.
    """
    if url.partition("://")[0] in CLUSTER_SCHEMES:
        return  # no query string: the settings checked all of it
    try:
        connection_pool(url).make_connection()  # type: ignore[no-untyped-call]
    except (TypeError, ValueError, RedisError) as exc:
        raise ValueError(f"BROADCAST_URL is not usable by redis-py: {exc}") from None


class RedisBackend(BroadcastBackend):
    """broadcaster backend over self-healing Redis pub/sub connections, one per node."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        client_name: str,
        timeout: float,
        max_connections: int,
        ping_interval: float,
        ping_timeout: float,
        retry_max_delay: float,
        canary_interval: float,
        canary_timeout: float,
        fast: bool = True,
    ) -> None:
        # BroadcastBackend.__init__ only raises NotImplementedError: not called on purpose.
        self._prefix = prefix
        self._client_name = client_name
        self._timeout = timeout
        self._retry_max_delay = retry_max_delay
        self._link_options: dict[str, Any] = {
            "prefix": prefix,
            "client_name": client_name,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "retry_max_delay": retry_max_delay,
            "canary_interval": canary_interval,
            "canary_timeout": canary_timeout,
            # Read the pub/sub and publish connections with `ReplyTap` when its start-up
            # check passes (service/broker/replies.py); False: redis-py's public reads only.
            "fast": fast,
        }
        self._fast = fast
        # The client's Retry must be redis.asyncio.retry.Retry: the sync class accepts
        # async commands but never retries them
        # (test_publish_rides_out_a_dropped_command_connection). Retry only on connection
        # errors: a timed-out script may still run later, and running it twice would
        # publish the message twice.
        # A blocking pool: redis-py's default pool raises "Too many connections" at once
        # when every connection is busy, which failed resumes in a reconnect storm
        # (docs/performance.md, "What changed, and what each part bought", no. 3;
        # test_a_storm_of_resumes_waits_for_pool_connections_instead_of_failing).
        self._retry = Retry(
            ExponentialWithJitterBackoff(base=_FIRST_RETRY_DELAY, cap=0.5),
            retries=3,
            supported_errors=(RedisConnectionError,),
        )
        self._topology: Topology = topology(
            url,
            max_connections=max_connections,
            timeout=timeout,
            # Named so that operators (and tests) can tell our connections apart in CLIENT LIST.
            client_name=client_name,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=self._retry,
        )
        self._kind = self._topology.kind
        self._pipes: list[RoutedPipe] = []
        # channel name -> (its frames' head, what takes its messages): `attach`
        self._sinks: dict[str, tuple[str, ChannelSink]] = {}
        # channel name -> set once Redis confirmed our latest SUBSCRIBE to it
        self._wanted: dict[str, asyncio.Event] = {}
        # pub/sub channel (bytes, as Redis sends it) -> channel name
        self._names: dict[bytes, str] = {}
        # node name -> its link; channel name -> the link that holds it
        self._links: dict[str, PubSubLink] = {}
        self._routes: dict[str, PubSubLink] = {}
        # Dropped by a node while live: told `interrupted()` once confirmed elsewhere.
        self._moved_live: set[str] = set()
        self._router: asyncio.Task[None] | None = None
        self._reroute = asyncio.Event()
        self._topology_error = ""
        # What links that were closed had counted.
        self._retired = {"reconnects": 0, "deaf_detections": 0, "canary_checks": 0}
        self.dropped_payloads = 0

    # -- broadcaster's interface ------------------------------------------------------

    async def connect(self) -> None:
        """Start the links and the router; they connect (and reconnect) in the background."""
        for node in self._topology.nodes():
            self._link_for(node)
        self._router = asyncio.create_task(self._route_forever(), name="redis-router")

    async def disconnect(self) -> None:
        """Stop the router and the links and close every connection."""
        if self._router is not None:
            self._router.cancel()
            await asyncio.gather(self._router, return_exceptions=True)
        for link in list(self._links.values()):
            await link.close()
        for pipe in self._pipes:
            await pipe.close()
        await self._topology.close()

    async def subscribe(self, channel: str) -> None:
        """Want `channel`; sent now if connected, else when its link (re)connects."""
        key = self.key(channel)
        # Subscribed already (broadcaster asks again for a second first subscriber): its
        # confirmation stands, or is still to come.
        self._wanted.setdefault(channel, asyncio.Event())
        self._names[key] = channel
        node = self._topology.node_for(key)
        if node is None:
            self._reroute.set()  # the topology is not known yet: routed once it is
            return
        await self._route(channel, self._link_for(node))

    async def unsubscribe(self, channel: str) -> None:
        """Stop wanting `channel`."""
        if self._wanted.pop(channel, None) is None:
            return
        self._names.pop(self.key(channel), None)
        self._moved_live.discard(channel)
        link = self._routes.pop(channel, None)
        if link is not None:
            link.release(channel)
            await link.send_unsubscribe(channel)

    async def publish(self, channel: str, message: Any) -> None:
        """Publish a ready frame (used for join/leave events, which carry no id)."""
        try:
            await self._topology.publish(self.key(channel), message)
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"Redis did not accept the event: {exc}") from exc

    async def next_published(self) -> Event:
        """Never returns: messages go to each channel's sink from inside the read."""
        await asyncio.Future()
        raise AssertionError("unreachable")

    def attach(self, channel: str, sink: ChannelSink) -> None:
        """Hand `channel`'s messages to `sink`, from inside the read, with their positions."""
        self._sinks[channel] = (message_head(channel), sink)

    def detach(self, channel: str, sink: ChannelSink) -> None:
        """Stop handing `channel`'s messages to `sink` (if it is still the one attached)."""
        attached = self._sinks.get(channel)
        if attached is not None and attached[1] is sink:
            del self._sinks[channel]

    # -- what the broker adds ---------------------------------------------------------

    @property
    def client(self) -> Redis | RedisCluster:
        """The client for commands (not pub/sub), shared with the history store."""
        return self._topology.client

    @property
    def publish_command(self) -> bytes:
        """What the publish script publishes with: PUBLISH, or SPUBLISH on a cluster."""
        return self._kind.publish

    def script_pipe(self, script: str) -> RoutedPipe:
        """A runner of `script` on connections of its own, for the hot path (publishes).

        Retried like the pool's commands (connection errors only); closed with the backend.
        """
        # Named apart from the pool's connections, so that CLIENT LIST tells them apart.
        name = f"{self._client_name}:publish"

        def pipe_to(node: Node, redirect: Redirect) -> ScriptPipe:
            return ScriptPipe(
                script,
                lambda: own_connection(node, client_name=name),
                timeout=self._timeout,
                retry=self._retry,
                fast=self._fast,
                redirect=redirect,
            )

        pipe = RoutedPipe(self._topology, pipe_to, on_misrouted=self._reroute.set)
        self._pipes.append(pipe)
        return pipe

    def key(self, channel: str) -> bytes:
        """The Redis pub/sub channel of `channel`."""
        return self._kind.key(self._prefix, channel)

    async def wait_subscribed(self, channel: str) -> None:
        """Return once Redis confirmed the subscription to `channel` (at once if not wanted)."""
        confirmed = self._wanted.get(channel)
        if confirmed is None or confirmed.is_set():
            return
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
            async with asyncio.timeout(self._timeout):
                await confirmed.wait()
        except TimeoutError:
            raise BrokerUnavailable(
                f"Redis did not confirm the subscription within {self._timeout:g} s "
                f"({self.problem() or 'no reply'})"
            ) from None

    def subscriptions_alive(self) -> bool:
        """True when every link is connected, re-subscribed and not deaf, and all routed."""
        return not self.problem()

    @property
    def reconnects(self) -> int:
        """Pub/sub connections rebuilt, over every link."""
        return self._retired["reconnects"] + sum(x.reconnects for x in self._links.values())

    @property
    def deaf_detections(self) -> int:
        """Times a link was found deaf by its canary."""
        deaf = sum(x.deaf_detections for x in self._links.values())
        return self._retired["deaf_detections"] + deaf

    @property
    def canary_checks(self) -> int:
        """Canary round trips that came back, over every link."""
        checks = sum(x.canary_checks for x in self._links.values())
        return self._retired["canary_checks"] + checks

    @property
    def last_error(self) -> str:
        """The last error of a link that is down ("" when none is)."""
        return next((x.last_error for x in self._links.values() if x.last_error), "")

    def problem(self) -> str:
        """Why `subscriptions_alive()` is false, for operators ("" when it is true)."""
        if not self._links:
            return f"Redis Cluster topology unknown: {self._topology_error or 'not asked yet'}"
        for link in self._links.values():
            problem = link.problem()
            if problem:
                return problem if len(self._links) == 1 else f"{link.node.name}: {problem}"
        unrouted = sum(channel not in self._routes for channel in self._wanted)
        if unrouted:
            return f"{unrouted} channels wait for the cluster's topology"
        return ""

    async def ping(self) -> None:
        """One PING of every node; raises BrokerUnavailable."""
        try:
            await self._topology.ping()
        except REDIS_ERRORS as exc:
            raise BrokerUnavailable(f"Redis is unreachable: {exc}") from exc

    # -- what links tell (service/broker/pubsub_link.py) --------------------------------

    def delivered(self, key: bytes, data: bytes) -> None:
        """A message on pub/sub channel `key`: to its channel's sink, with its position."""
        channel = self._names.get(key)
        attached = None if channel is None else self._sinks.get(channel)
        if attached is None:
            return  # unsubscribed meanwhile
        try:
            text = data.decode()
        except UnicodeDecodeError:
            # Not one of our frames (someone else published on our prefix); skipping it
            # must not end the reader (broadcaster issue #144's other trigger).
            self.dropped_payloads += 1
            if self.dropped_payloads % _DROPPED_PAYLOAD_LOG_EVERY == 1:
                logger.warning(
                    "dropped a non-UTF-8 payload on channel %r (%d so far): something "
                    "other than this service publishes under prefix %r",
                    channel,
                    self.dropped_payloads,
                    self._prefix,
                )
            return
        head, sink = attached
        sink.message(position_of(text, head), text)

    def confirmed(self, channel: str, interrupted: bool) -> None:
        """Redis confirmed `channel`: its subscribers are live; a gap is filled."""
        confirmed = self._wanted.get(channel)
        if confirmed is None:
            return
        confirmed.set()
        if interrupted or channel in self._moved_live:
            self._moved_live.discard(channel)
            attached = self._sinks.get(channel)
            if attached is not None:
                attached[1].interrupted()

    def unconfirmed(self, channel: str) -> None:
        """`channel`'s subscription is not known to hold any more."""
        confirmed = self._wanted.get(channel)
        if confirmed is not None:
            confirmed.clear()

    def dropped(self, channel: str, interrupted: bool) -> None:
        """A node no longer serves `channel`: route it anew."""
        self.unconfirmed(channel)
        if self._routes.get(channel) is not None:
            del self._routes[channel]
        if interrupted and channel in self._wanted:
            self._moved_live.add(channel)
        self._reroute.set()

    def misrouted(self) -> None:
        """A node is gone or serves other slots: learn the topology anew."""
        self._reroute.set()

    # -- routing ------------------------------------------------------------------------

    def _link_for(self, node: Node) -> PubSubLink:
        link = self._links.get(node.name)
        if link is None:
            link = PubSubLink(self, node, self._topology, **self._link_options)
            self._links[node.name] = link
            link.start()
        return link

    async def _route(self, channel: str, link: PubSubLink) -> None:
        current = self._routes.get(channel)
        if current is link:
            return
        # The bookkeeping at once, the commands after: an unsubscribe that comes while
        # they are sent finds the channel where it now is.
        interrupted = channel in self._moved_live
        self._moved_live.discard(channel)
        if current is not None:
            interrupted = current.release(channel) or interrupted
        self._routes[channel] = link
        if interrupted:
            self.unconfirmed(channel)
        link.hold(channel, interrupted=interrupted)
        if current is not None:
            await current.send_unsubscribe(channel)
        await link.send_subscribe(channel)

    async def _route_forever(self) -> None:
        """Learn the topology whenever asked to, and move channels to where they live."""
        delay = _FIRST_RETRY_DELAY
        self._reroute.set()
        while True:
            await self._reroute.wait()
            self._reroute.clear()
            try:
                await self._topology.refresh()
                await self._route_all()
                self._topology_error = ""
                # Links that keep failing ask again at once: ask the cluster at most
                # this often.
                delay = _ROUTE_INTERVAL
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the router must outlive any error
                self._topology_error = f"{type(exc).__name__}: {exc}"
                logger.warning("Redis topology not learnt (%s): trying again", exc)
                self._reroute.set()
                delay = min(delay * 2, self._retry_max_delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _route_all(self) -> None:
        nodes = {node.name: node for node in self._topology.nodes()}
        for node in nodes.values():
            self._link_for(node)
        for channel in list(self._wanted):
            serves = self._topology.node_for(self.key(channel))
            if serves is not None and channel in self._wanted:
                await self._route(channel, self._link_for(serves))
        for name, link in list(self._links.items()):
            if name not in nodes and not link.channels:
                await link.close()
                # In one step: the metrics' sums never go back.
                for counter in self._retired:
                    self._retired[counter] += getattr(link, counter)
                del self._links[name]
        for link in self._links.values():
            await link.check_canary()
