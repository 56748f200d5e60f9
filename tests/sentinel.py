"""A Sentinel group of the test's own: a primary, a replica and three Sentinels.

The Sentinels run deploy/sentinel.conf, the compose stack's, with loopback addresses
and shorter times.

All on free loopback ports, each a real `redis-server` process (Sentinels are
`redis-server <conf> --sentinel`), so that a test can SIGKILL the primary and watch
the Sentinels promote the replica.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import redis

from tests.helpers import UNIT, RedisServer, free_port, wait_for

SENTINEL_CONF = Path(__file__).resolve().parents[1] / "deploy" / "sentinel.conf"
SERVICE = "mymaster"
# A primary silent for this long is down; then a failover may start at once.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


class SentinelGroup:
    """A primary, a replica of it, and three Sentinels watching them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.primary = RedisServer(workdir / "primary")
        self.replica = RedisServer(workdir / "replica")
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        self.replica.client().replicaof("127.0.0.1", self.primary.port)
        wait_for(self._replica_in_sync, 20, what="the replica to sync with the primary")
        for index, port in enumerate(self.sentinel_ports):
            directory = self.workdir / f"sentinel-{index}"
            directory.mkdir(parents=True, exist_ok=True)
            config = directory / "sentinel.conf"  # Sentinels rewrite their config file
            config.write_text(self._config(port, directory))
            self.sentinels.append(
                subprocess.Popen(
                    [self.primary.binary, str(config), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        wait_for(self._sentinels_know_the_group, 20, what="the Sentinels to see the group")

    def _config(self, port: int, directory: Path) -> str:
        """deploy/sentinel.conf, on loopback ports and with the tests' shorter times."""
        lines = []
        for line in SENTINEL_CONF.read_text().splitlines():
            words = line.split()
            if words[:1] == ["port"]:
                line = f"port {port}"
            elif words[:3] == ["sentinel", "monitor", SERVICE]:
                assert words[3:5] == ["redis", "6379"], line  # the compose stack's primary
                line = f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} {words[5]}"
            elif words[:2] == ["sentinel", "down-after-milliseconds"]:
                line = f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}"
            elif words[:2] == ["sentinel", "failover-timeout"]:
                line = f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}"
            lines.append(line)
        lines += ["bind 127.0.0.1", f"dir {directory}", f"logfile {directory / 'sentinel.log'}"]
        return "\n".join(lines) + "\n"

    def _replica_in_sync(self) -> bool:
        info = self.replica.client().info("replication")
        return bool(info.get("master_link_status") == "up")

    def replica_caught_up(self) -> bool:
        """Whether the replica has every write the primary has."""
        primary = self.primary.client().info("replication")["master_repl_offset"]
        replica = self.replica.client().info("replication")["slave_repl_offset"]
        return bool(replica >= primary)

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(
            host="127.0.0.1", port=self.sentinel_ports[index], socket_timeout=2 * UNIT
        )

    def primary_port(self) -> int:
        """The primary's port as the first Sentinel that answers says it."""
        for index in range(len(self.sentinel_ports)):
            try:
                _, port = self.sentinel(index).sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            return int(port)
        raise AssertionError("no Sentinel answers")

    def _sentinels_know_the_group(self) -> bool:
        for index in range(len(self.sentinel_ports)):
            try:
                master = self.sentinel(index).sentinel_master(SERVICE)
            except redis.RedisError:
                return False
            # Each Sentinel must know the replica and the two other Sentinels.
            if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < 2:
                return False
        return True

    def stop(self) -> None:
        for process in self.sentinels:
            if process.poll() is None:
                process.terminate()
        for process in self.sentinels:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self.primary.stop()
        self.replica.stop()
