"""Redis Cluster URLs: what BROADCAST_URL may say, and how channels are named on a cluster."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from service.broker.redis_topology import CLASSIC, SHARDED
from service.cluster_url import ClusterTarget, parse_cluster_url
from service.settings import Settings, redact_url


def test_every_part_is_read() -> None:
    url = "rediss-cluster://app:s3cret@10.0.0.1:7000,10.0.0.2:7001,node-3"
    assert parse_cluster_url(url) == ClusterTarget(
        nodes=(("10.0.0.1", 7000), ("10.0.0.2", 7001), ("node-3", 6379)),
        username="app",
        password="s3cret",
        tls=True,
    )
    target = parse_cluster_url("redis-cluster://h:1")
    assert (target.username, target.password, target.tls) == (None, None, False)


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis-cluster://", "needs one or more host:port"),
        ("redis-cluster://h:1/0", "no database path"),
        ("redis-cluster://h:1?timeout=3", "takes no parameters"),
        ("redis-cluster://h:port", "host:port"),
        ("redis-cluster://h:70000", "host:port"),
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_cluster_url(url)
    with pytest.raises(ValueError, match=words):
        Settings(broadcast_url=url)


def test_settings_take_a_cluster_url_and_logs_hide_its_password() -> None:
    url = "redis-cluster://:pw@10.0.0.1:7000,10.0.0.2:7001"
    assert Settings(broadcast_url=url).backend_scheme == "redis-cluster"
    assert redact_url(url) == "redis-cluster://:***@10.0.0.1:7000,10.0.0.2:7001"


@pytest.mark.parametrize("channel", ["room:1", "user@example.com", "news.eu-west", "a"])
def test_a_sharded_channel_lives_in_the_slot_of_its_history_keys(channel: str) -> None:
    # The publish script SPUBLISHes to it: Redis refuses a script that touches two slots.
    # (Channel names never hold braces, service/channels.py: the tag is the whole name.)
    prefix = "broadcast:"
    key = SHARDED.key(prefix, channel)
    assert key_slot(key) == key_slot(f"{prefix}meta:{{{channel}}}".encode())
    assert key_slot(key) == key_slot(f"{prefix}history:{{{channel}}}".encode())
    assert SHARDED.channel_of(prefix, key) == channel


def test_classic_channels_keep_their_names() -> None:
    # One Redis keeps the names it always had: workers of the last version still hear them.
    assert CLASSIC.key("broadcast:", "room:1") == b"broadcast:room:1"
    assert CLASSIC.channel_of("broadcast:", b"broadcast:room:1") == "room:1"
