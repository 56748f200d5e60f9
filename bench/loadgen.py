"""Runs the Node load generator (bench/loadgen/loadgen.mjs) and talks to it.

The generator prints JSON lines: "ready" when its clients are set up, "drained" when the
measured phase is over, "result" last. It starts the measured phase when it reads a line
on stdin, so the runner can read the servers' counters just before and just after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent / "loadgen"
SCRIPT = HERE / "loadgen.mjs"
NODE_FLAGS = [f for f in os.environ.get("BENCH_NODE_FLAGS", "").split() if f]


def ensure_installed() -> str:
    """The `node` binary, with the generator's npm dependencies installed if missing."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node is not installed: run scripts/bootstrap")
    if not (HERE / "node_modules" / "ws").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm is not installed: run scripts/bootstrap")
        # Exactly what package-lock.json names.
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True
        )
    return node


def run(
    config: dict[str, Any],
    on_ready: Callable[[], object],
    on_drained: Callable[[], object],
    timeout: float,
    log: Path,
) -> dict[str, Any]:
    """Run one scenario; call `on_ready` before the measured phase and `on_drained` after.

    Returns the generator's result, or raises with its error output.
    """
    node = ensure_installed()
    with open(log, "ab") as errors:
        process = subprocess.Popen(
            [node, *NODE_FLAGS, str(SCRIPT), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    assert process.stdin is not None
    assert process.stdout is not None
    # A generator that hangs must not hang the benchmark.
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    try:
        for raw in process.stdout:
            line = json.loads(raw)
            event = line["event"]
            if event == "ready":
                on_ready()
                process.stdin.write(b"go\n")
                process.stdin.flush()
            elif event == "drained":
                on_drained()
            elif event == "result":
                process.wait(timeout=timeout)
                result: dict[str, Any] = line["result"]
                return result
            elif event == "failed":
                raise RuntimeError(f"the load generator failed: {line['error']}")
        raise RuntimeError(
            f"the load generator exited with {process.wait()} (killed after {timeout:.0f} s?): "
            f"see {log}"
        )
    finally:
        watchdog.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
