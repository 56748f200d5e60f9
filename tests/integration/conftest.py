"""One worker process against the session's redis-server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.helpers import RedisServer, Worker, redis_args, unique


@pytest.fixture(scope="module")
def worker(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker shared by a module's tests (each test uses channels of its own)."""
    worker = Worker(
        tmp_path_factory.mktemp("worker"),
        redis_args(
            redis_server,
            unique("m") + ":",
            "--max-data-bytes",
            "1000",
            "--max-frame-bytes",
            "4000",
            "--channel-linger",
            "0.2",
            # These tests publish as fast as they can from one connection; the limit has
            # tests of its own.
            "--publish-rate",
            "100000",
            "--publish-burst",
            "100000",
        ),
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(params=[True, False], ids=["tap", "public"])
def fast(request: pytest.FixtureRequest) -> bool:
    """Both readers of a Redis connection (service/broker/replies.py): the fast tap and
    the public fallback, for the tests that build pipes, taps and backends themselves."""
    value: bool = request.param
    return value
