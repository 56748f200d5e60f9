"""Where a channel's pub/sub and keys live: one Redis server, or a shard of a Redis Cluster.

A worker talks to Redis through one of two topologies, with the same calls:

* `OneServer` (`redis://`, `rediss://`, and a Sentinel group's primary): one node;
  channels use classic pub/sub (SUBSCRIBE/PUBLISH).
* `Cluster` (`redis-cluster://`): a node per primary; channels use sharded pub/sub
  (SSUBSCRIBE/SPUBLISH, Redis 7), which sends a message only to the shard that owns
  its channel's slot. Classic PUBLISH on a cluster reaches every node, so it would
  not scale there. A channel's pub/sub name carries the channel as its hash tag, so it
  lives in the slot of the channel's history keys and the publish script may SPUBLISH.

The command client (history reads, join/leave events, the canary, PING) is redis-py's:
`Redis` or `RedisCluster`, which follows MOVED and ASK itself. The worker's own
connections (the pub/sub readers and the publish pipes) are made per node, with the
URL's credentials and TLS, and `refresh` asks the cluster for its slots again (CLUSTER
SLOTS) when they report a node gone or a slot moved.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from redis.asyncio import Redis, RedisCluster
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import AbstractConnection, Connection, SSLConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.exceptions import RedisError
from redis.maint_notifications import MaintNotificationsConfig
from redis.typing import EncodableT

from service.broker.redis_url import connection_pool
from service.cluster_url import CLUSTER_SCHEMES, parse_cluster_url

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PubSubKind:
    """The commands, reply kinds and channel names of one kind of Redis pub/sub."""

    subscribe: bytes
    unsubscribe: bytes
    #: The first item of a delivered message, and of the confirmations.
    message: bytes
    subscribed: bytes
    unsubscribed: bytes
    #: What the publish script calls to publish.
    publish: bytes
    #: Put the channel in braces (a hash tag), so that it shares its keys' slot.
    hash_tagged: bool

    def key(self, prefix: str, channel: str) -> bytes:
        """The Redis pub/sub channel of `channel`."""
        if self.hash_tagged:
            return f"{prefix}{{{channel}}}".encode()
        return (prefix + channel).encode()

    def channel_of(self, prefix: str, key: bytes) -> str:
        """`key`'s channel name (the inverse of `key`)."""
        name = key.decode(errors="replace").removeprefix(prefix)
        if self.hash_tagged:
            return name.removeprefix("{").removesuffix("}")
        return name


CLASSIC = PubSubKind(
    subscribe=b"SUBSCRIBE",
    unsubscribe=b"UNSUBSCRIBE",
    message=b"message",
    subscribed=b"subscribe",
    unsubscribed=b"unsubscribe",
    publish=b"PUBLISH",
    hash_tagged=False,
)
SHARDED = PubSubKind(
    subscribe=b"SSUBSCRIBE",
    unsubscribe=b"SUNSUBSCRIBE",
    message=b"smessage",
    subscribed=b"ssubscribe",
    unsubscribed=b"sunsubscribe",
    publish=b"SPUBLISH",
    hash_tagged=True,
)


class Node(Protocol):
    """A Redis server the worker makes connections of its own to."""

    @property
    def name(self) -> str:
        """host:port (the single server: "redis")."""

    @property
    def label(self) -> str:
        """What log lines about it end with: " (node host:port)", "" for the one server."""

    def connection(self, **overrides: Any) -> AbstractConnection:
        """A new, unconnected connection to this node; `overrides` its options."""


class Topology(Protocol):
    """Which node serves which channel, and the client for everything else."""

    kind: PubSubKind

    @property
    def client(self) -> Redis | RedisCluster:
        """redis-py's client for commands (it follows the cluster itself)."""

    async def refresh(self) -> None:
        """Learn the nodes and slots anew; raises RedisError when no node answers."""

    def nodes(self) -> list[Node]:
        """The nodes channels live on (a cluster's primaries), as last learnt."""

    def node_for(self, key: EncodableT) -> Node | None:
        """The node that serves `key` (a pub/sub channel or a key); None: not known yet."""

    def canary_key(self, base: bytes, node: Node) -> bytes | None:
        """A pub/sub channel named after `base` that `node` serves (None: it serves none)."""

    async def publish(self, key: bytes, data: bytes | str) -> int:
        """Publish `data` on `key` through the client; the number of receivers."""

    async def ping(self) -> None:
        """PING every node; raises RedisError."""

    async def close(self) -> None:
        """Close the client's connections."""


class _PoolNode:
    """The one server: its connections are made like the pool's."""

    name = "redis"
    label = ""

    def __init__(self, client: Redis) -> None:
        self._pool = client.connection_pool

    def connection(self, **overrides: Any) -> AbstractConnection:
        connection: AbstractConnection = self._pool.connection_class(
            **{**self._pool.connection_kwargs, **overrides}
        )
        return connection


class OneServer:
    """One Redis server (or the primary its Sentinels name): classic pub/sub."""

    kind = CLASSIC

    def __init__(self, url: str, **options: Any) -> None:
        self._client = Redis(connection_pool=connection_pool(url, **options))
        self._node = _PoolNode(self._client)

    @property
    def client(self) -> Redis:
        """The one client."""
        return self._client

    async def refresh(self) -> None:
        """Nothing to learn: one server."""
        return None

    def nodes(self) -> list[Node]:
        """The one node."""
        return [self._node]

    def node_for(self, key: EncodableT) -> Node:
        """The one node."""
        return self._node

    def canary_key(self, base: bytes, node: Node) -> bytes:
        """`base` itself: the one node serves every channel."""
        return base

    async def publish(self, key: bytes, data: bytes | str) -> int:
        """PUBLISH."""
        return int(await self._client.publish(key, data))

    async def ping(self) -> None:
        """PING."""
        await self._client.ping()

    async def close(self) -> None:
        """Close the pool."""
        await self._client.aclose(close_connection_pool=True)


class _ClusterNode:
    """A cluster node: its address, and the options of the connections made to it."""

    def __init__(self, host: str, port: int, options: dict[str, Any]) -> None:
        self.name = f"{host}:{port}"
        self.label = f" (node {self.name})"
        self._options = {**options, "host": host, "port": port}

    def connection(self, **overrides: Any) -> AbstractConnection:
        options = {**self._options, **overrides}
        if options.pop("ssl", False):
            return SSLConnection(**options)
        return Connection(**options)


class Cluster:
    """A Redis Cluster: sharded pub/sub, a node per primary."""

    kind = SHARDED

    def __init__(self, url: str, **options: Any) -> None:
        target = parse_cluster_url(url)
        # The cluster client keeps its own connections per node; these options are the
        # pool's elsewhere (`timeout` is how long to wait for a free one there).
        options.pop("timeout", None)
        self._client = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            username=target.username,
            password=target.password,
            ssl=target.tls,
            # A shard without a primary must not stop the others (the cluster's own
            # `cluster-require-full-coverage` decides what its nodes answer).
            require_full_coverage=False,
            **options,
        )
        # What the worker's own connections to a node are made with (`own_connection`
        # replaces the retry): the URL's credentials and TLS, the timeouts, the name.
        options.pop("max_connections", None)
        self._node_options: dict[str, Any] = {
            **options,
            "username": target.username,
            "password": target.password,
            "ssl": target.tls,
        }
        self._nodes: dict[str, _ClusterNode] = {}
        # slot -> the node that owned it when the slots were last learnt
        self._owners: list[_ClusterNode | None] = [None] * 16384

    @property
    def client(self) -> RedisCluster:
        """redis-py's cluster client."""
        return self._client

    async def refresh(self) -> None:
        """Ask the cluster for its slots (CLUSTER SLOTS, through the client)."""
        try:
            # redis-py's cluster client parses the reply: {(first, last): {"primary":
            # (host, port), "replicas": [...]}}; its stub says a list.
            reply: Any = await self._client.cluster_slots()
            ranges: dict[tuple[int, int], dict[str, Any]] = reply
        except RedisError:
            raise
        except Exception as exc:  # redis-py's RedisClusterException is not a RedisError
            raise RedisError(f"no node told the cluster's slots: {exc}") from exc
        nodes: dict[str, _ClusterNode] = {}
        owners: list[_ClusterNode | None] = [None] * 16384
        for (first, last), holders in ranges.items():
            host, port = holders["primary"][:2]
            name = f"{host}:{port}"
            node = nodes.get(name) or self._nodes.get(name)
            if node is None:
                node = _ClusterNode(host, int(port), self._node_options)
            nodes[name] = node
            owners[first : last + 1] = [node] * (last - first + 1)
        self._nodes, self._owners = nodes, owners

    def nodes(self) -> list[Node]:
        """The primaries, as last learnt."""
        return list(self._nodes.values())

    def node_for(self, key: EncodableT) -> Node | None:
        """The primary of `key`'s slot, as last learnt."""
        return self._owners[key_slot(key if isinstance(key, bytes) else str(key).encode())]

    def canary_key(self, base: bytes, node: Node) -> bytes | None:
        """`base` with the first hash tag that lands in one of `node`'s slots."""
        # A few tries for a shard of thousands of slots.
        for number in range(100_000):
            key = base + b"{" + str(number).encode() + b"}"
            owner = self._owners[key_slot(key)]
            if owner is not None and owner.name == node.name:
                return key
        return None

    async def publish(self, key: bytes, data: bytes | str) -> int:
        """SPUBLISH, through the client (which follows MOVED)."""
        return int(await self._client.spublish(key, data))

    async def ping(self) -> None:
        """PING every primary."""
        await self._client.ping(target_nodes=RedisCluster.PRIMARIES)

    async def close(self) -> None:
        """Close the client's connections."""
        await self._client.aclose()


def topology(url: str, **options: Any) -> Topology:
    """The topology `url` names (nothing is connected). `options`: see connection_pool."""
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        return Cluster(url, **options)
    return OneServer(url, **options)


def own_connection(node: Node, **overrides: Any) -> AbstractConnection:
    """A connection of the worker's own to `node`, outside any pool (pub/sub, publishes).

    No retries of its own: its user (a pub/sub link, a publish pipe) decides when and
    how often to reconnect, and reads its replies itself (`reply_reader`). RESP2,
    because redis-py 8 speaks RESP3 by default and then routes pub/sub messages through
    a push handler that formats a debug line for each one; in RESP2 they are plain
    replies.
    """
    options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
        # Cluster maintenance notifications need RESP3, which this connection does not speak.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
        "maint_notifications_pool_handler": None,
    }
    return node.connection(**{**options, **overrides})
