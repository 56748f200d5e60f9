"""The benchmark's command line: what `--floor` refuses, and its default scenarios."""

from __future__ import annotations

import pytest

from bench.__main__ import parse_args


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
