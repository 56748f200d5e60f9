"""Fixtures shared by every test layer."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.settings import SETTINGS_ENV_VAR, Settings
from tests.helpers import WORKER_DEFAULTS, RedisServer, Worker, start_all, unique


def pytest_addoption(parser: pytest.Parser) -> None:
    """`--public-paths`: the run of scripts/test that keeps the adapters' fallbacks alive."""
    parser.addoption(
        "--public-paths",
        action="store_true",
        help="start every worker with FAST_ADAPTERS=false (the public API paths only)",
    )


def pytest_configure(config: pytest.Config) -> None:
    """Apply `--public-paths` to the workers the tests start."""
    if config.getoption("--public-paths"):
        WORKER_DEFAULTS["FAST_ADAPTERS"] = "false"


def pytest_report_header(config: pytest.Config) -> str:
    """Say which paths the workers take."""
    public = config.getoption("--public-paths")
    return "workers: " + ("FAST_ADAPTERS=false (public paths)" if public else "fast adapters on")


@pytest.fixture(autouse=True)
def _no_service_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Tests see only the settings they set, whatever the shell exports or a .env holds."""
    for name in [*(field.upper() for field in Settings.model_fields), SETTINGS_ENV_VAR]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; tests isolate themselves with their own prefix."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test only, which it may kill, freeze or restart."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prefix() -> str:
    """A Redis prefix no other test uses."""
    return unique("t") + ":"


WorkerFactory = Callable[..., Worker]


@pytest.fixture
def make_worker(tmp_path: Path) -> Iterator[WorkerFactory]:
    """Start `python -m service` processes; all are stopped (by PID) after the test."""
    workers: list[Worker] = []

    def make(
        *args: str,
        env: dict[str, str] | None = None,
        start: bool = True,
        host: str = "127.0.0.1",
        port: int | None = None,
        program: list[str] | None = None,
    ) -> Worker:
        worker = Worker(
            tmp_path / "workers", list(args), env, host=host, port=port, program=program
        )
        workers.append(worker)
        if start:
            worker.start()
        return worker

    yield make
    for worker in workers:
        worker.stop()


WorkersFactory = Callable[..., list[Worker]]


@pytest.fixture
def make_workers(make_worker: WorkerFactory) -> WorkersFactory:
    """Start `count` workers with the same flags, side by side; stopped after the test."""

    def make(count: int, *args: str) -> list[Worker]:
        workers = [make_worker(*args, start=False) for _ in range(count)]
        start_all(workers)
        return workers

    return make
