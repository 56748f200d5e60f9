"""The compose topology's load balancer from real processes: nginx with the shipped
deploy/nginx.conf, and the worker watcher that docker-compose.yml runs beside it.

Compose's network gives every replica of `worker` its own address and one name, which
Docker's DNS resolves to all of them. Here the replicas listen on one port at different
loopback addresses (127.0.0.2, 127.0.0.3, ...), and the name comes from a hosts file
that is mounted over /etc/hosts in a mount namespace of nginx's own: `set_workers` is
the test's `docker compose up --scale`. The config keeps `server worker:...`; only the
listen port, the workers' port and the pid file's path change.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.helpers import UNIT, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
NGINX_CONF = REPO / "deploy" / "nginx.conf"
WATCHER = REPO / "deploy" / "nginx-watch-workers.sh"
COMPOSE = REPO / "docker-compose.yml"
# What the watcher logs when it reloads nginx (deploy/nginx-watch-workers.sh).
RELOADING = ": reloading nginx"


def compose_service(name: str) -> dict[str, Any]:
    """One service of docker-compose.yml."""
    service = yaml.safe_load(COMPOSE.read_text())["services"][name]
    assert isinstance(service, dict)
    return service


def compose_worker_flags() -> list[str]:
    """The workers' environment in docker-compose.yml, as flags; Redis's address aside."""
    flags = []
    for name, value in compose_service("worker")["environment"].items():
        if name != "BROADCAST_URL":  # the test's own redis-server instead of `redis`
            flags += ["--" + name.lower().replace("_", "-"), str(value)]
    return flags


def nginx_binary() -> str:
    """Debian's nginx, also where /usr/sbin is not on PATH."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise AssertionError("nginx is not installed (.ci/run installs it: apt-get install nginx)")
    return binary


class Nginx:
    """nginx on the shipped config, resolving `worker` to the addresses of `set_workers`.

    With `watch`, deploy/nginx-watch-workers.sh runs first, the way the nginx image's
    entrypoint runs /docker-entrypoint.d/, with docker-compose.yml's environment for it
    (and `watch_interval` instead of its interval, to keep the test short).
    """

    def __init__(
        self,
        workdir: Path,
        worker_port: int,
        addresses: list[str],
        *,
        watch: bool = True,
        watch_interval: int = 1,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.watch = watch
        self.watch_interval = watch_interval
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "nginx.log"
        self.hosts_path = workdir / "hosts"
        workdir.mkdir(parents=True, exist_ok=True)
        shipped = NGINX_CONF.read_text()
        config, servers = re.subn(
            r"^(\s*server worker):8000\b", rf"\g<1>:{worker_port}", shipped, flags=re.MULTILINE
        )
        assert servers == 1, "deploy/nginx.conf has no single `server worker:8000` line"
        listen = "\n        listen 8000;"
        assert listen in config
        config = config.replace(listen, f"\n        listen 127.0.0.1:{self.port};")
        assert "pid /tmp/nginx.pid;" in config
        config = config.replace("pid /tmp/nginx.pid;", f"pid {workdir / 'nginx.pid'};")
        self.config_path = workdir / "nginx.conf"
        self.config_path.write_text(config)
        self.set_workers(addresses)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def set_workers(self, addresses: list[str]) -> None:
        """What `worker` resolves to from now on, as Docker's DNS after a scale."""
        # Written in place: the bind mount holds this inode, a new file would go unseen.
        with open(self.hosts_path, "w") as hosts:
            hosts.write("".join(f"{address} worker\n" for address in addresses))

    def start(self) -> Nginx:
        binary = nginx_binary()
        directives = "daemon off;"
        if os.geteuid() == 0:
            # Its workers would otherwise run as `nobody`, who cannot enter pytest's
            # private temporary directories.
            directives += " user root;"
        env = dict(os.environ)
        env["PATH"] = f"{Path(binary).parent}:{env.get('PATH', '/usr/bin:/bin')}"
        if self.watch:
            env.update({k: str(v) for k, v in compose_service("nginx")["environment"].items()})
            env["UPSTREAM_WATCH_INTERVAL"] = str(self.watch_interval)
            env["NGINX_CONF"] = str(self.config_path)
        # As the image's entrypoint: the watcher forks its loop and returns, then nginx
        # replaces the shell. Its own session, so that stop() can end the watcher too.
        script = 'mount --bind "$0" /etc/hosts && { [ -z "$1" ] || "$1"; } && shift && exec "$@"'
        watcher = str(WATCHER) if self.watch else ""
        command = [binary, "-c", str(self.config_path), "-p", str(self.workdir), "-g", directives]
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [
                    *("unshare", "--mount", "--propagation", "private", "--"),
                    *("sh", "-c", script, str(self.hosts_path), watcher, *command),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        wait_for(self._answers, 20, "nginx to answer")
        return self

    def _answers(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise AssertionError(f"nginx exited:\n{self.log()}")
        return httpx.get(self.http + "/healthz", timeout=2).status_code == 200

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def reloads(self) -> int:
        """How many times the watcher has reloaded nginx."""
        return self.log().count(RELOADING)

    def serving_processes(self) -> set[int]:
        """PIDs of nginx's worker processes that take new connections.

        After a reload the old ones are renamed "... is shutting down" (they keep their
        WebSockets until worker_shutdown_timeout) and new ones start on the new config.
        """
        assert self.process is not None
        serving = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                # The parent's pid is the 2nd field after the parenthesised command name.
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != self.process.pid:
                    continue
                title = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").strip()
                if title == b"nginx: worker process":
                    serving.add(int(stat.parent.name))
        return serving

    def wait_reloaded(self, before: set[int], reloads: int) -> None:
        """Wait until the watcher's `reloads`-th reload is the config in service."""
        wait_for(lambda: self.reloads() >= reloads, 20, f"reload #{reloads} by the watcher")
        wait_for(
            lambda: (now := self.serving_processes()) and not now & before,
            20,
            "nginx's processes on the reloaded config",
        )

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful, as `nginx -s quit`
            try:
                self.process.wait(timeout=15 * UNIT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        # The watcher outlives nginx (in a container it dies with it): end the session.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
