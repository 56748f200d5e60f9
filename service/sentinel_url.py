"""Sentinel URLs, parsed: which Sentinels to ask, for which primary.

    redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/mymaster[/db]
        [?sentinel_password=...&sentinel_username=...]

The password in the netloc is the data nodes' (the primary's and replicas'); the
Sentinels' own, if they have one, is the `sentinel_password` parameter. With
`rediss+sentinel://` the data nodes are reached over TLS. No redis-py here: the
settings check these URLs without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
_DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelTarget:
    """A Sentinel URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_username: str | None
    sentinel_password: str | None
    tls: bool


def parse_sentinel_url(url: str) -> SentinelTarget:
    """The parts of a `redis+sentinel://` URL; ValueError saying what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: scheme {parts.scheme!r}")
    username, password, hosts = credentials(parts.netloc)
    sentinels = host_list(hosts, _DEFAULT_SENTINEL_PORT, "Sentinel")
    if not sentinels:
        raise ValueError(
            "a Sentinel URL needs one or more host:port, e.g. "
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster/0"
        )
    path = [segment for segment in parts.path.split("/") if segment]
    if not path or len(path) > 2:
        raise ValueError(
            "a Sentinel URL's path is /<service name>[/<db>], e.g. /mymaster/0 "
            "(the name in the Sentinels' `sentinel monitor` line)"
        )
    db = path[1] if len(path) == 2 else "0"
    if not db.isdigit():
        raise ValueError(f"the database in a Sentinel URL must be a number, got {db!r}")
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    unknown = set(query) - {"sentinel_password", "sentinel_username"}
    if unknown:
        raise ValueError(
            f"unknown parameters in the Sentinel URL: {', '.join(sorted(unknown))} "
            "(known: sentinel_password, sentinel_username)"
        )
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(db),
        username=username,
        password=password,
        sentinel_username=query.get("sentinel_username"),
        sentinel_password=query.get("sentinel_password"),
        tls=parts.scheme == "rediss+sentinel",
    )


def credentials(netloc: str) -> tuple[str | None, str | None, str]:
    """`[[user]:password@]hosts` as (user, password, hosts); None where not given."""
    userinfo, _, hosts = netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    return unquote(username) or None, unquote(password) or None, hosts


def host_list(hosts: str, default_port: int, what: str) -> tuple[tuple[str, int], ...]:
    """`h1:p1,h2,[::1]:p3` as (host, port) pairs; ValueError naming `what` on a bad one."""
    return tuple(_host_port(item, default_port, what) for item in hosts.split(",") if item)


def _host_port(item: str, default_port: int, what: str) -> tuple[str, int]:
    host, sep, port = item.rpartition(":")
    if not sep:
        return item, default_port
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"a {what} address must be host:port, got {item!r}")
    return host.strip("[]"), int(port)
