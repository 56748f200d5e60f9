"""The benchmark's command line: what `--floor`, `--compare` and `--redis` refuse, and
the default scenarios."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import parse_args

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "argv",
    [
        ["--floor", "--scenarios", "storm"],
        ["--floor", "--scenarios", "channels,storm"],
        ["--floor", "--uvicorn", "ws=wsproto"],
        ["--floor", "--set", "WS_PER_MESSAGE_DEFLATE=true"],
        ["--floor", "--set", "ws_per_message_deflate=1"],
    ],
)
def test_the_floor_refuses_what_it_cannot_run(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_the_floor_runs_every_scenario_but_storm_by_default() -> None:
    floor = parse_args(["--floor"]).scenarios.split(",")
    service = parse_args([]).scenarios.split(",")
    assert "storm" in service
    assert floor == [name for name in service if name != "storm"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--floor"],  # the floor runs no service
        ["--workers", "3"],  # the two sides must carry the same load
        ["--workers", "1"],
    ],
)
def test_compare_refuses_what_it_cannot_measure(extra: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--compare", str(REPO), *extra])


def test_compare_needs_a_checkout_of_this_project(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--compare", str(tmp_path)])
    assert parse_args(["--compare", str(REPO)]).compare == REPO


def test_redis_is_one_redis_server_unless_a_cluster_is_asked_for() -> None:
    assert parse_args([]).redis == "single"
    assert parse_args(["--redis", "single"]).redis == "single"
    assert parse_args(["--redis", "cluster"]).redis == "cluster"


@pytest.mark.parametrize(
    "argv",
    [
        ["--redis", "sentinel"],
        ["--redis"],
        ["--floor", "--redis", "cluster"],  # the floor talks to one redis-server
    ],
)
def test_redis_refuses_what_it_cannot_start(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_the_help_says_what_a_cluster_is(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "cluster: a local Redis Cluster of 3 primaries and 3 replicas" in help_text
    assert "BROADCAST_URL=redis-cluster://" in help_text
