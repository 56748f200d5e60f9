"""Error replies on the publish connection become the exceptions redis-py would raise."""

from __future__ import annotations

import hiredis
import pytest
from redis.exceptions import (
    BusyLoadingError,
    ConnectionError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)

from service.broker.replies import reply_error


@pytest.mark.parametrize(
    ("reply", "kind"),
    [
        (b"-NOSCRIPT No matching script.\r\n", NoScriptError),
        (b"-READONLY You can't write against a read only replica.\r\n", ReadOnlyError),
        (b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n", ResponseError),
    ],
)
def test_error_replies_keep_their_classes(reply: bytes, kind: type[Exception]) -> None:
    parser = hiredis.Reader(replyError=reply_error)
    parser.feed(reply)
    error = parser.gets()
    assert type(error) is kind


def test_a_loading_redis_is_a_connection_error_and_so_is_retried() -> None:
    # redis-py's Retry retries ConnectionError: a Redis still loading its data is waited for.
    parser = hiredis.Reader(replyError=reply_error)
    parser.feed(b"-LOADING Redis is loading the dataset in memory\r\n")
    error = parser.gets()
    assert isinstance(error, BusyLoadingError)
    assert isinstance(error, ConnectionError)
