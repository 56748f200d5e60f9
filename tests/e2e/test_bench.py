"""The benchmark tool's smoke run, so that it cannot rot: every scenario, tiny.

It checks that the tool runs and that what it reports holds together (no loss, every
figure present, the files written), not how fast anything is: speed is the full
benchmark's business (docs/performance.md), never a test's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m bench --smoke ARGS`, as a user runs it from the repository."""
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_the_benchmark_runs_every_scenario_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    result = run_bench("--out", str(out))
    # Progress for each scenario, then the table.
    names = {"fanout-50k", "fanout-max", "channels", "publish", "idle", "burst", "storm"}
    for name in names:
        assert f"] {name}: " in result.stdout
    assert "CPU s/100k" in result.stdout
    assert "us CPU per publish" in result.stdout
    document = json.loads((out / "results.json").read_text())
    rows = {s["summary"]["scenario"]: s["summary"] for s in document["scenarios"]}
    assert set(rows) == names
    for name in ("fanout-50k", "fanout-max", "channels"):
        row = rows[name]
        assert row["lost"] == 0
        assert row["duplicates"] == 0
        assert row["deliveries_per_s"] > 0
        assert row["cpu_s_per_100k"] > 0
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    publish = rows["publish"]
    assert (publish["lost"], publish["duplicates"]) == (0, 0)
    assert "deliveries_per_s" not in publish
    assert 0 < publish["redis_cpu_us_per_publish"] < publish["cpu_us_per_publish"]
    assert rows["idle"]["kb_per_connection"] > 0
    assert rows["burst"]["failures"] == 0
    storm = rows["storm"]
    assert (storm["lost"], storm["duplicates"]) == (0, 0)
    recovered, clients = storm["recovered"].split("/")
    assert recovered == clients
    assert (out / "plot.png").read_bytes().startswith(b"\x89PNG")


def test_the_benchmark_compares_uvicorn_options(tmp_path: Path) -> None:
    """`--uvicorn` starts the workers through bench.worker with the option replaced."""
    out = tmp_path / "bench"
    run_bench("--scenarios", "fanout-50k", "--uvicorn", "ws=wsproto", "--out", str(out))
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["uvicorn"] == {"ws": "wsproto"}
    [row] = [s["summary"] for s in document["scenarios"]]
    assert (row["lost"], row["duplicates"]) == (0, 0)
    # wsproto has no direct writes: every frame went through ASGI, and nothing broke.
    for log in (out / "fanout-50k").glob("worker-*.log"):
        assert "Traceback" not in log.read_text()


def test_the_floor_runs_in_place_of_the_service(tmp_path: Path) -> None:
    """`--floor` measures bench/floor.py's workers, and says so, on every scenario it can."""
    out = tmp_path / "bench"
    result = run_bench("--floor", "--out", str(out))
    assert "THE FLOOR" in result.stdout
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["floor"] is True
    rows = {s["summary"]["scenario"]: s["summary"] for s in document["scenarios"]}
    assert set(rows) == {"fanout-50k", "fanout-max", "channels", "publish", "idle", "burst"}
    for name in ("fanout-50k", "fanout-max", "channels", "publish"):
        assert (rows[name]["lost"], rows[name]["duplicates"]) == (0, 0)
    assert rows["channels"]["deliveries_per_s"] > 0
    assert rows["burst"]["failures"] == 0
    logs = [log.read_text() for log in (out / "channels").glob("worker-*.log")]
    assert len(logs) == 2
    for log in logs:
        assert "floor worker" in log
        assert "Uvicorn" not in log
        assert "Traceback" not in log


def test_the_benchmark_compares_two_checkouts_in_one_run(tmp_path: Path) -> None:
    """`--compare` runs every second worker from another checkout, and reports both sides."""
    other = tmp_path / "other"
    shutil.copytree(REPO / "service", other / "service")
    # A mark only the other checkout's workers print.
    main = other / "service" / "__main__.py"
    source = main.read_text()
    main.write_text(
        source.replace('if __name__ == "__main__":', MARK + '\nif __name__ == "__main__":')
    )
    out = tmp_path / "bench"
    result = run_bench("--scenarios", "channels", "--compare", str(other), "--out", str(out))
    assert f"workers 1, 3, ... ran {other}" in result.stdout
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["compare"] == str(other)
    [scenario] = document["scenarios"]
    assert (scenario["summary"]["lost"], scenario["summary"]["duplicates"]) == (0, 0)
    each = scenario["worker_cpu_s_each"]
    assert len(each) == 2
    assert all(seconds > 0 for seconds in each)
    assert sum(each) == pytest.approx(scenario["worker_cpu_s"])
    logs = {log.name: log.read_text() for log in (out / "channels").glob("worker-*.log")}
    assert "compare checkout" not in logs["worker-0.log"]
    assert "compare checkout" in logs["worker-1.log"]


MARK = 'print("compare checkout", flush=True)'


def test_the_benchmark_runs_on_a_redis_cluster(tmp_path: Path) -> None:
    """`--redis cluster`: the workers on a local cluster's sharded pub/sub, its CPU counted."""
    out = tmp_path / "bench"
    run_bench("--redis", "cluster", "--scenarios", "channels,publish,storm", "--out", str(out))
    document = json.loads((out / "results.json").read_text())
    assert document["settings"]["redis"] == "cluster"
    rows = {s["summary"]["scenario"]: s["summary"] for s in document["scenarios"]}
    for name in ("channels", "publish", "storm"):
        assert (rows[name]["lost"], rows[name]["duplicates"]) == (0, 0)
    assert rows["channels"]["deliveries_per_s"] > 0
    assert 0 < rows["publish"]["redis_cpu_us_per_publish"] < rows["publish"]["cpu_us_per_publish"]
    recovered, clients = rows["storm"]["recovered"].split("/")
    assert recovered == clients
    # Each node's CPU, by role: three primaries and their replicas.
    [publish] = [s for s in document["scenarios"] if s["summary"]["scenario"] == "publish"]
    roles = sorted(name.partition(":")[2] for name in publish["redis_cpu_s_each"])
    assert roles == ["primary"] * 3 + ["replica"] * 3
    logs = [log.read_text() for log in (out / "channels").glob("worker-*.log")]
    assert logs
    for log in logs:
        assert "redis-cluster://" in log
        assert "Traceback" not in log
