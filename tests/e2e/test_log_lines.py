"""Every log line says when and which worker: several workers share one log stream."""

from __future__ import annotations

import re

import pytest

from tests.conftest import WorkerFactory
from tests.helpers import RedisServer, redis_args, wait_for

# `2026-12-06 15:41:40,138 INFO:     [vm:8385] message`
LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+: +\[([^\]]+)\] ")
READY = re.compile(r"\[([^\]]+)\] worker (\S+) ready to serve")

pytestmark = pytest.mark.e2e


def test_two_workers_in_one_stream_are_told_apart(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    worker = make_worker("--workers", "2", *redis_args(redis_server, prefix))
    ready = wait_for(
        lambda: (found := READY.findall(worker.log())) and len(found) == 2 and found,
        20,
        "both worker processes ready",
    )
    # Each says it itself: the name in the brackets is the one it reports to clients.
    assert [stamp for stamp, _ in ready] == [name for _, name in ready]
    assert len({name for _, name in ready}) == 2
    lines = worker.log().splitlines()
    assert lines
    for line in lines:
        assert LINE.match(line), line
    # The access log too.
    assert worker.status("/healthz") == 200
    wait_for(lambda: "GET /healthz" in worker.log(), 10, "the access line")
    [access] = [line for line in worker.log().splitlines() if "GET /healthz" in line][-1:]
    stamp = LINE.match(access)
    assert stamp is not None, access
    assert stamp[1] in {name for _, name in ready}


def test_a_configured_worker_id_names_the_lines(make_worker: WorkerFactory) -> None:
    worker = make_worker("--worker-id", "eu-1")
    assert all(line.startswith(tuple("0123456789")) for line in worker.log().splitlines())
    assert "[eu-1] worker eu-1 ready to serve" in worker.log()
