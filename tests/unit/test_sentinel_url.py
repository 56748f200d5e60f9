"""Sentinel URLs: what BROADCAST_URL may say, and what the logs may show of it."""

from __future__ import annotations

import pytest

from service.sentinel_url import SentinelTarget, parse_sentinel_url
from service.settings import redact_url


def test_every_part_is_read() -> None:
    url = (
        "rediss+sentinel://app:s3cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-3/cache/2"
        "?sentinel_password=sp&sentinel_username=watcher"
    )
    assert parse_sentinel_url(url) == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-3", 26379)),
        service="cache",
        db=2,
        username="app",
        password="s3cret",
        sentinel_username="watcher",
        sentinel_password="sp",
        tls=True,
    )


def test_the_database_defaults_to_0_and_passwords_to_none() -> None:
    target = parse_sentinel_url("redis+sentinel://h:1/mymaster")
    assert (target.db, target.password, target.sentinel_password, target.tls) == (
        0,
        None,
        None,
        False,
    )


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("redis+sentinel:///mymaster", "one or more host:port"),
        ("redis+sentinel://h:1/", "path is /<service name>"),
        ("redis+sentinel://h:1/a/b/c", "path is /<service name>"),
        ("redis+sentinel://h:port/m", "must be host:port"),
        ("redis+sentinel://h:70000/m", "must be host:port"),
        ("redis+sentinel://h:1/m/x", "must be a number"),
        ("redis+sentinel://h:1/m?password=x", "unknown parameters"),
    ],
)
def test_a_bad_url_says_what_is_wrong(url: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_sentinel_url(url)


def test_logs_show_no_password() -> None:
    url = "redis+sentinel://:pw@h1:1,h2:2/m/0?sentinel_password=sp&sentinel_username=u"
    shown = redact_url(url)
    assert "pw" not in shown.replace("sentinel_password", "")
    assert "sp" not in shown.replace("sentinel_password", "")
    assert shown == "redis+sentinel://:***@h1:1,h2:2/m/0?sentinel_password=***&sentinel_username=u"
    assert redact_url("redis://:pw@h:6379/0") == "redis://:***@h:6379/0"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
