"""The many-connections tool (bench/many_connections.py) at a small size, so that it cannot rot.

It checks that every connection subscribed and received every one-to-all message,
that results.json has every figure docs/capacity.md quotes, and that nothing the tool
started outlives it, also when it is stopped half-way. How fast anything is belongs to
the full run (docs/capacity.md), never to a test.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.many_connections import FD_RESERVE, plan

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
SMALL = [
    *("--connections", "2000", "--workers", "2", "--loadgens", "2", "--per-address", "500"),
    *("--deadline", "120"),
]


def tool(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench.many_connections", *args]


def leftovers(out: Path, channel: str) -> list[str]:
    """Processes still running in the run's folder (the servers) or on its channel (Node)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if cwd.startswith(str(out)) or channel in cmdline:
            found.append(f"{entry.name}: {cmdline[:200]}")
    return found


def run_small(out: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """The tool at the CI size with `args`, its results in `out`; it must succeed."""
    result = subprocess.run(
        tool(*SMALL, *args, "--out", str(out)),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_every_connection_gets_every_message_and_results_hold_what_the_doc_quotes(
    tmp_path: Path,
) -> None:
    out = tmp_path / "many"
    result = run_small(
        out, "--broadcasts", "3", "--interval", "1", "--idle-seconds", "1", timeout=150
    )
    assert "connecting: " in result.stdout or "connected: 2,000/2,000" in result.stdout
    assert "broadcast  received" in result.stdout  # the final table
    document = json.loads((out / "results.json").read_text())
    assert document["connected"] == 2000
    assert document["connect_failures"] == 0
    assert document["all_connected"] is True
    assert document["all_received"] is True
    assert document["duplicates"] == 0
    assert document["unexpected_closes"] == {}
    assert document["connects_per_s"] > 0
    assert document["bytes_per_connection"] > 0
    assert len(document["source_addresses"]) == 4  # 500 connections on each
    assert len(document["broadcasts"]) == 3
    for row in document["broadcasts"]:
        assert row["received"] == row["expected"] == 2000
        assert 0 < row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    # Every figure the doc quotes from results.json is there.
    doc = (REPO / "docs" / "capacity.md").read_text()
    quoted = set(re.findall(r"`results\.json`\s+field\s+`([a-z0-9_.\[\]]+)`", doc))
    assert quoted, "docs/capacity.md names no results.json field"
    for name in quoted:
        value: object = document
        for part in name.replace("[]", "").split("."):
            value = value[0] if isinstance(value, list) else value
            assert isinstance(value, dict), name
            assert part in value, f"results.json has no {name}"
            value = value[part]
    assert leftovers(out, document["channel"]) == []


def test_every_connection_answers_the_workers_pings(tmp_path: Path) -> None:
    # Pings every 0.5 s, each answered within 2 s or the connection is dropped: over the
    # idle window and the broadcast, a client that did not answer would be gone.
    out = tmp_path / "many"
    run_small(
        out,
        *("--set", "WS_PING_INTERVAL=0.5", "--set", "WS_PING_TIMEOUT=2"),
        *("--broadcasts", "1", "--idle-seconds", "3"),
        timeout=90,
    )
    document = json.loads((out / "results.json").read_text())
    assert document["idle_seconds"] >= 3
    assert document["connected"] == 2000
    assert document["unexpected_closes"] == {}
    assert document["all_received"] is True
    assert [row["received"] for row in document["broadcasts"]] == [2000]


def test_a_stopped_run_stops_everything_it_started(tmp_path: Path) -> None:
    out = tmp_path / "many"
    process = subprocess.Popen(
        tool(
            *SMALL,
            "--broadcasts",
            "1000",
            "--interval",
            "1",
            "--idle-seconds",
            "1",
            "--out",
            str(out),
        ),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    seen = []
    try:
        # Stopped in the middle of the broadcasts, with every connection open.
        for line in process.stdout:
            seen.append(line)
            if "broadcast 1/" in line:
                process.send_signal(signal.SIGTERM)
                break
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, "".join(seen) + rest
    document = json.loads((out / "results.json").read_text())
    assert document["error"] == "interrupted"
    # The run stopped every process it started before exiting; give /proc a moment.
    end = time.monotonic() + 5
    while leftovers(out, document["channel"]) and time.monotonic() < end:
        time.sleep(0.1)
    assert leftovers(out, document["channel"]) == []


def test_the_plan_keeps_every_process_under_the_open_file_limit() -> None:
    shares = plan(100_000, 7, 6, 5000, fd_limit=20_000)
    assert shares.per_worker == 14_286
    assert sum(count for _, count, _ in shares.loadgens) == 100_000
    # Contiguous blocks, each on its own addresses, at most 5000 connections on each.
    offsets = [offset for offset, _, _ in shares.loadgens]
    assert offsets == sorted(offsets)
    assert offsets[0] == 0
    assert len(set(shares.addresses)) == len(shares.addresses) == 24
    assert shares.addresses[0] == "127.0.0.2"
    for _, count, addresses in shares.loadgens:
        assert count <= 20_000 - FD_RESERVE
        assert count <= 5000 * len(addresses)


@pytest.mark.parametrize(
    ("workers", "loadgens", "per_address", "says"),
    [(5, 6, 5000, "--workers 6"), (7, 5, 5000, "--loadgens 6"), (7, 6, 300, "--per-address")],
)
def test_the_plan_says_what_to_change_when_a_limit_is_in_the_way(
    workers: int, loadgens: int, per_address: int, says: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        plan(100_000, workers, loadgens, per_address, fd_limit=20_000)
