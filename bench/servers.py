"""The servers under load: one redis-server and N workers, each its own process.

Or, with `redis="cluster"`, a local Redis Cluster (bench/redis_cluster.py) in place of
the one redis-server. Started on free loopback ports, read through /proc (CPU seconds,
resident memory) and stopped by their own PIDs. Nothing here touches a Redis the
benchmark did not start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from service.settings import SETTINGS_ENV_VAR, Settings

if TYPE_CHECKING:
    from bench.redis_cluster import LocalCluster

_TICKS = os.sysconf("SC_CLK_TCK")
#: What `Servers(redis=...)` takes: one redis-server, or a local Redis Cluster.
REDIS_MODES = ("single", "cluster")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / _TICKS


def rss_bytes(pid: int) -> int:
    """The process's resident memory now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _wait(
    condition: Callable[[], object],
    timeout: float,
    what: str,
    errors: tuple[type[Exception], ...] = (OSError, httpx.HTTPError),
) -> None:
    """Poll `condition` until it is true; `errors` mean "not yet" and the last is reported."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except errors as exc:
            last = exc
        time.sleep(0.05)
    because = "" if last is None else f" (last error: {last!r})"
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}{because}")


@dataclass
class Process:
    """A started server process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The process's id."""
        return self.popen.pid

    def check_alive(self) -> None:
        """Raise with the tail of its log if it has exited."""
        if self.popen.poll() is not None:
            tail = self.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{tail}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 15 s."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


class Servers:
    """redis-server plus `workers` worker processes, started with `worker_env`.

    With `floor`, the workers are bench/floor.py's instead of the service's. With
    `compare` (a checkout of this project), the odd-numbered workers import the service
    from there. With `redis="cluster"`, Redis is a LocalCluster of 3 primaries and 3
    replicas, and the workers get its redis-cluster:// URL.
    """

    def __init__(
        self,
        workdir: Path,
        workers: int,
        worker_env: dict[str, str],
        uvicorn_overrides: dict[str, str] | None = None,
        *,
        floor: bool = False,
        compare: Path | None = None,
        redis: str = "single",
    ) -> None:
        if redis not in REDIS_MODES:
            raise ValueError(f"redis is one of {', '.join(REDIS_MODES)}, not {redis!r}")
        self.workdir = workdir
        self.worker_count = workers
        self.worker_env = worker_env
        self.uvicorn_overrides = uvicorn_overrides or {}
        self.floor = floor
        self.compare = compare
        self.redis_mode = redis
        self.redis: Process | None = None
        self.cluster: LocalCluster | None = None
        self.broadcast_url = ""  # the workers' BROADCAST_URL, once Redis is up
        self.workers: list[Process] = []
        self.ports: list[int] = []

    def __enter__(self) -> Servers:
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis()
            self._start_workers()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def processes(self) -> list[Process]:
        """Every server process: the workers and Redis (every node of a cluster)."""
        return [*self.workers, *self.redis_processes]

    @property
    def redis_processes(self) -> list[Process]:
        """The redis-server, or every node of the cluster."""
        if self.cluster is not None:
            return self.cluster.processes
        return [self.redis] if self.redis else []

    def redis_cpu_seconds(self) -> float:
        """CPU time Redis has used so far: all of its processes, with a cluster."""
        return sum(cpu_seconds(p.pid) for p in self.redis_processes)

    def redis_cpu_each(self) -> dict[str, float]:
        """CPU time each Redis process has used so far, by name ("redis", or port:role)."""
        if self.cluster is None:
            return {"redis": self.redis_cpu_seconds()}
        primaries = set(self.cluster.primaries())
        return {
            f"{port}:{'primary' if port in primaries else 'replica'}": cpu_seconds(
                self.cluster.pid(port)
            )
            for port in self.cluster.ports
        }

    def redis_rss(self) -> int:
        """Resident memory of Redis now: all of its processes, with a cluster."""
        return sum(rss_bytes(p.pid) for p in self.redis_processes)

    def ws_urls(self) -> list[str]:
        """Each worker's protocol endpoint."""
        return [f"ws://127.0.0.1:{port}/ws" for port in self.ports]

    def worker_cpu_seconds(self) -> list[float]:
        """CPU time each worker has used so far, in worker order."""
        return [cpu_seconds(p.pid) for p in self.workers]

    def worker_rss(self) -> int:
        """Resident memory of all workers now."""
        return sum(rss_bytes(p.pid) for p in self.workers)

    def check_alive(self) -> None:
        """Raise if any server process has exited."""
        for process in self.processes:
            process.check_alive()

    def stop(self) -> None:
        """Stop every process this started, by PID: the workers first, then Redis."""
        for process in [*self.workers, *([self.redis] if self.redis else [])]:
            process.stop()
        if self.cluster is not None:
            self.cluster.stop()

    def _start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, cwd=self.workdir, env=env
            )
        return Process(name, popen, log)

    def _start_redis(self) -> None:
        if self.redis_mode == "cluster":
            # Imported here: bench.redis_cluster builds on this module's helpers.
            from bench.redis_cluster import LocalCluster

            self.cluster = LocalCluster(self.workdir / "redis-cluster", primaries=3, replicas=1)
            self.cluster.start()
            self.broadcast_url = self.cluster.url
            return
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not Path(binary).exists():
            raise RuntimeError("redis-server is not installed: run scripts/bootstrap")
        self.redis_port = free_port()
        self.redis = self._start(
            "redis",
            [
                *(binary, "--port", str(self.redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
            ],
        )
        redis = self.redis

        def answers() -> bool:
            redis.check_alive()
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")

        _wait(answers, 20, "redis-server")
        self.broadcast_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def _start_workers(self) -> None:
        # Only the settings given here: none from the shell that runs the benchmark.
        settings = {name.upper() for name in Settings.model_fields} | {SETTINGS_ENV_VAR}
        env = {key: value for key, value in os.environ.items() if key not in settings}
        env.update(self.worker_env)
        env["BROADCAST_URL"] = self.broadcast_url
        if self.floor or self.uvicorn_overrides:
            # bench.* is found from the repository, wherever the worker runs.
            env["PYTHONPATH"] = os.pathsep.join(
                filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")])
            )
        for n in range(self.worker_count):
            port = free_port()
            self.ports.append(port)
            flags = ["--port", str(port), "--worker-id", f"w{n}"]
            if self.floor:
                command = [sys.executable, "-m", "bench.floor", *flags]
            elif self.uvicorn_overrides:
                overrides = json.dumps(self.uvicorn_overrides)
                command = [sys.executable, "-m", "bench.worker", overrides, *flags]
            else:
                command = [sys.executable, "-m", "service", *flags]
            worker_env = env
            if self.compare is not None and n % 2:
                # Found first on the path: this worker's `service` is the other checkout's.
                path = [str(self.compare), env.get("PYTHONPATH", "")]
                worker_env = {**env, "PYTHONPATH": os.pathsep.join(filter(None, path))}
            self.workers.append(self._start(f"worker-{n}", command, worker_env))
        for worker, port in zip(self.workers, self.ports, strict=True):

            def ready(worker: Process = worker, port: int = port) -> bool:
                worker.check_alive()
                url = f"http://127.0.0.1:{port}/readyz"
                return httpx.get(url, timeout=2).status_code == 200

            _wait(ready, 30, f"{worker.name} to be ready")
