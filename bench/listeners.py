"""Builds the many-connections tool's load generator (bench/loadgen/listeners.c).

A C program, compiled here on first use with the system's C compiler (scripts/bootstrap
installs one), into bench/loadgen/build/. It is built again whenever its source is newer
than the binary, so an edit takes effect on the next run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "loadgen" / "listeners.c"
BINARY = SOURCE.parent / "build" / "listeners"
#: Warnings are errors: the program reads bytes from the network into fixed buffers.
FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wpedantic", "-Werror"]


def ensure_built() -> Path:
    """The listeners binary, compiled first if missing or older than its source."""
    if BINARY.exists() and BINARY.stat().st_mtime >= SOURCE.stat().st_mtime:
        return BINARY
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) is installed: run scripts/bootstrap")
    BINARY.parent.mkdir(exist_ok=True)
    # Built under another name and moved into place: a run never starts half a binary.
    partial = BINARY.with_name(f"listeners.{os.getpid()}.tmp")
    done = subprocess.run(
        [compiler, *FLAGS, "-o", str(partial), str(SOURCE), "-lm"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{done.stdout}{done.stderr}")
    os.replace(partial, BINARY)
    return BINARY
