"""Redis Cluster URLs, parsed: a few nodes to start from; the rest is discovered.

    redis-cluster://[[user]:password@]host1:6379,host2:6379,host3:6379

`rediss-cluster://` reaches every node over TLS. A cluster has one database, so the URL
has no path. No redis-py here: the settings check these URLs without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from service.sentinel_url import credentials, host_list

CLUSTER_SCHEMES = ("redis-cluster", "rediss-cluster")
_DEFAULT_PORT = 6379


@dataclass(frozen=True, slots=True)
class ClusterTarget:
    """A Redis Cluster URL, parsed."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None
    password: str | None
    tls: bool


def parse_cluster_url(url: str) -> ClusterTarget:
    """The parts of a `redis-cluster://` URL; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: scheme {parts.scheme!r}")
    username, password, hosts = credentials(parts.netloc)
    nodes = host_list(hosts, _DEFAULT_PORT, "Redis Cluster node")
    if not nodes:
        raise ValueError(
            "a Redis Cluster URL needs one or more host:port of its nodes, e.g. "
            "redis-cluster://10.0.0.1:6379,10.0.0.2:6379,10.0.0.3:6379"
        )
    if parts.path.strip("/"):
        raise ValueError("a Redis Cluster URL has no database path: a cluster has only database 0")
    if parts.query:
        raise ValueError("a Redis Cluster URL takes no parameters")
    return ClusterTarget(
        nodes=nodes,
        username=username,
        password=password,
        tls=parts.scheme == "rediss-cluster",
    )
