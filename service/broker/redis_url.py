"""Which Redis a worker talks to: one server, or the primary a Sentinel group names.

`redis://` and `rediss://` name one server; `redis+sentinel://` and `rediss+sentinel://`
name the Sentinels to ask (service/sentinel_url.py).

Every connection a worker makes comes from the pool `connection_pool` builds: with
Sentinel, redis-py's `SentinelManagedConnection` asks the Sentinels for the primary at
each connect, so a worker that reconnects after a failover finds the new one.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool

from service.sentinel_url import SENTINEL_SCHEMES, parse_sentinel_url


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """The primary's connections, found through the Sentinels, waited for when all busy.

    Blocking for the reason the single-server pool is (service/broker/redis_backend.py):
    a storm of resumes must wait for a connection, not fail at once.
    """


def connection_pool(url: str, **options: Any) -> ConnectionPool:
    """The pool of the worker's command connections for `url` (nothing is connected).

    `options`: the pool's and the connections' (max_connections, timeout, client_name,
    socket timeouts, retry), for either kind of URL.
    """
    if urlsplit(url).scheme not in SENTINEL_SCHEMES:
        pool: ConnectionPool = BlockingConnectionPool.from_url(url, **options)
        return pool
    target = parse_sentinel_url(url)
    sentinel_options: dict[str, Any] = {
        "socket_timeout": options.get("socket_timeout"),
        "socket_connect_timeout": options.get("socket_connect_timeout"),
    }
    if target.sentinel_password is not None:
        sentinel_options["password"] = target.sentinel_password
    if target.sentinel_username is not None:
        sentinel_options["username"] = target.sentinel_username
    sentinel = Sentinel(list(target.sentinels), sentinel_kwargs=sentinel_options)
    return _BlockingSentinelPool(  # type: ignore[no-untyped-call]
        target.service,
        sentinel,
        db=target.db,
        username=target.username,
        password=target.password,
        ssl=target.tls,
        **options,
    )
