"""The load generator's raw WebSocket client (bench/loadgen/raw_websocket.mjs).

Its own tests (bench/loadgen/test, Node's built-in runner) run it against a real `ws`
server and hand-written ones: round trips, lengths, fragments, pings, both closes, bad
handshakes and protocol errors. Node and bench/loadgen's packages come from
scripts/bootstrap.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.helpers import UNIT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LOADGEN = Path(__file__).resolve().parents[2] / "bench" / "loadgen"


def test_the_raw_websocket_clients_node_tests_pass() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed: scripts/bootstrap installs it")
    if not (LOADGEN / "node_modules" / "ws").is_dir():
        pytest.fail("bench/loadgen has no node_modules: run scripts/bootstrap (npm ci there)")
    result = subprocess.run(
        [node, "--test", "test/raw_websocket.test.mjs"],
        cwd=LOADGEN,
        capture_output=True,
        text=True,
        timeout=90 * UNIT,
        check=False,
    )
    output = f"node --test failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    assert result.returncode == 0, output
    assert "# fail 0" in result.stdout, output
