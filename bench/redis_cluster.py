"""A real local Redis Cluster, for the benchmark and the tests.

Real `redis-server` processes on free loopback ports, joined by `redis-cli --cluster
create`. The benchmark runs its workers against it (`python -m bench --redis
cluster`); the tests kill, freeze, restart and fail over its nodes and migrate its
slots. Every process is started here and stopped by its own PID; nothing here touches
a Redis it did not start.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bench.servers import Process, _wait, free_port

SLOTS = 16384
# The cluster bus listens on port + 10000, so a node's port must leave room for it.
BUS_OFFSET = 10000
MAX_PORT = 55000
# Never a port of the machine's own Redis, even if it happens to be down right now.
RESERVED_PORTS = {6379, 6379 + BUS_OFFSET}
# Keys moved per MIGRATE while a slot migrates.
MIGRATE_BATCH = 100


class _NotYet(Exception):
    """A condition of a wait that does not hold yet; the wait keeps it as its last error."""


# What a wait on the cluster retries on: a node that cannot answer yet, or a no.
_RETRY = (OSError, redis.RedisError, _NotYet)


def _poll(condition: Callable[[], object], timeout: float, what: str) -> None:
    # A deadline already passed still gets one look: callers share one budget.
    _wait(condition, max(timeout, 0.1), what, errors=_RETRY)


def _crc16(data: bytes) -> int:
    """CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), as Redis Cluster uses."""
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def keyslot(key: str | bytes) -> int:
    """The hash slot of `key`: only a non-empty {hash tag} is hashed, if the key has one."""
    data = key.encode() if isinstance(key, str) else key
    start = data.find(b"{")
    if start != -1:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return _crc16(data) % SLOTS


def _ask(client: redis.Redis, *args: str | int | bytes) -> Any:
    """A command's raw reply: no redis-py parsing, whatever the command."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_ports(count: int) -> list[int]:
    """`count` free loopback ports whose cluster bus ports (port + 10000) are free too."""
    ports: list[int] = []
    taken = set(RESERVED_PORTS)
    for _ in range(1000):
        if len(ports) == count:
            return ports
        port = free_port()
        bus = port + BUS_OFFSET
        if port > MAX_PORT or port in taken or bus in taken or not _port_is_free(bus):
            continue
        ports.append(port)
        taken.update({port, bus})
    raise RuntimeError(f"found only {len(ports)} of {count} free port pairs under {MAX_PORT}")


@dataclass(frozen=True)
class ClusterTls:
    """The files for a cluster whose nodes speak only TLS, to clients and to each other."""

    cert_file: Path
    key_file: Path
    #: The authority clients check the nodes' certificate against (and nodes each other's).
    ca_file: Path


@dataclass
class _Node:
    """One line of CLUSTER NODES: a node as one member of the cluster sees it."""

    id: str
    port: int
    flags: set[str]
    master: str | None  # the id of its primary, if it is a replica
    slots: set[int] = field(default_factory=set)

    @property
    def failed(self) -> bool:
        return bool(self.flags & {"fail", "noaddr", "handshake"})

    @property
    def primary(self) -> bool:
        return "master" in self.flags


def _parse_nodes(text: str) -> list[_Node]:
    nodes = []
    for line in text.splitlines():
        words = line.split()
        if len(words) < 8:
            continue
        # The address is ip:port@busport (and ,hostname on Redis 7).
        port = int(words[1].split("@", 1)[0].rsplit(":", 1)[1] or 0)
        node = _Node(
            words[0], port, set(words[2].split(",")), None if words[3] == "-" else words[3]
        )
        for item in words[8:]:
            if item.startswith("["):  # a slot being imported or migrated: not owned yet
                continue
            first, _, last = item.partition("-")
            node.slots.update(range(int(first), int(last or first) + 1))
        nodes.append(node)
    return nodes


class LocalCluster:
    """`primaries` primaries with `replicas` replicas each, on free loopback ports.

    Each node has its own directory under `workdir` (config, nodes.conf, log). Use it
    as a context manager, or call `start` and then `stop`.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        primaries: int = 3,
        replicas: int = 1,
        node_timeout_ms: int = 1000,
        full_coverage: bool = True,
        password: str | None = None,
        tls: ClusterTls | None = None,
    ) -> None:
        """`password`: every node requires it (`requirepass`, and `masterauth` for replicas).

        `tls`: every node listens on TLS only, and the cluster bus and replication use it.
        """
        if primaries < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 primaries")
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        binary = shutil.which("redis-server")
        cli = shutil.which("redis-cli")
        if binary is None or cli is None:
            raise RuntimeError("redis-server and redis-cli are not installed: scripts/bootstrap")
        self.binary = binary
        self.cli = cli
        self.workdir = workdir
        self.primary_count = primaries
        self.replica_count = replicas
        self.node_timeout_ms = node_timeout_ms
        self.full_coverage = full_coverage
        self.password = password
        self.tls = tls
        self._ports = free_cluster_ports(primaries * (1 + replicas))
        self._processes: dict[int, Process] = {}
        self._clients: dict[int, redis.Redis] = {}
        self._ids: dict[int, str] = {}
        self._frozen: set[int] = set()
        self._down: set[int] = set()  # killed here, not restarted yet
        self._initial_primaries: list[int] = []
        # What each killed node was just before the kill: its slots and its replicas.
        self._killed: dict[int, tuple[set[int], list[int]]] = {}

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The service's BROADCAST_URL: the nodes that were primaries at creation."""
        if not self._initial_primaries:
            raise RuntimeError("the cluster is not started")
        hosts = ",".join(f"127.0.0.1:{port}" for port in self._initial_primaries)
        auth = "" if self.password is None else f":{self.password}@"
        scheme = "redis-cluster" if self.tls is None else "rediss-cluster"
        return f"{scheme}://{auth}{hosts}"

    @property
    def ports(self) -> list[int]:
        """Every node's port, primaries and replicas."""
        return list(self._ports)

    @property
    def processes(self) -> list[Process]:
        """The node processes running now (or killed and not yet restarted)."""
        return list(self._processes.values())

    def pid(self, port: int) -> int:
        """The process id of the node on `port`."""
        return self._processes[port].pid

    def node_dir(self, port: int) -> Path:
        """The node's directory: redis.conf, nodes.conf and redis.log."""
        return self.workdir / f"node-{port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, create the cluster, and wait until it is ok.

        Ok: every node says cluster_state:ok and all agree on who owns each slot. If
        anything fails, what was started is stopped.
        """
        try:
            deadline = time.monotonic() + timeout
            for port in self._ports:
                self._launch(port)
            for port in self._ports:
                self._wait_answers(port, deadline - time.monotonic())
            self._create(deadline - time.monotonic())
            self._ids = {port: self._myid(port) for port in self._ports}
            _poll(self._agreed_views, deadline - time.monotonic(), "the new cluster to be ok")
            # A replica that never synced may not be promoted (its data counts as too
            # old), so a primary killed right after start would never be failed over.
            _poll(self._replicas_synced, deadline - time.monotonic(), "the replicas to sync")
            # The view of one node is enough: they all agree by now.
            by_id = {node.id: node for node in self._nodes(self._ports[0])}
            self._initial_primaries = [p for p in self._ports if by_id[self._ids[p]].primary]
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node this started, by PID: SIGTERM, then SIGKILL. Idempotent."""
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        for process in self._processes.values():
            if process.popen.poll() is None:
                # A frozen node would hold SIGTERM until it runs again.
                os.kill(process.pid, signal.SIGCONT)
                process.popen.terminate()
        self._frozen.clear()
        for process in self._processes.values():
            process.stop()

    def client(self, port: int) -> redis.Redis:
        """A plain (not cluster-aware) client of one node, with short timeouts."""
        if port not in self._clients:
            self._clients[port] = redis.Redis(
                host="127.0.0.1",
                port=port,
                socket_timeout=2,
                socket_connect_timeout=1,
                password=self.password,
                decode_responses=False,
                # One try: a frozen or dead node must fail fast, and the waits poll anyway
                # (redis-py's default would retry three times, 2 s each).
                retry=Retry(NoBackoff(), 0),
                ssl=self.tls is not None,
                ssl_ca_certs=None if self.tls is None else str(self.tls.ca_file),
            )
        return self._clients[port]

    def keyslot(self, key: str | bytes) -> int:
        """The hash slot of `key`, computed here as Redis does (CLUSTER KEYSLOT)."""
        return keyslot(key)

    def primaries(self) -> list[int]:
        """The ports of the nodes that are primaries now, failed ones left out."""
        return [n.port for n in self._view() if n.primary and not n.failed]

    def replicas_of(self, port: int) -> list[int]:
        """The ports of the (not failed) replicas of the node on `port`, now."""
        primary = self._ids[port]
        return [n.port for n in self._view() if n.master == primary and not n.failed]

    def owner(self, slot: int) -> int:
        """The port of the primary that owns `slot` now."""
        for node in self._view():
            if node.primary and slot in node.slots:
                return node.port
        raise RuntimeError(f"no node owns slot {slot}")

    def kill(self, port: int) -> None:
        """SIGKILL the node on `port`: a crash, with no goodbye to the cluster."""
        view = self._view(exclude={port})
        by_id = {node.id: node for node in view}
        me = by_id[self._ids[port]]
        self._killed[port] = (set(me.slots), [n.port for n in view if n.master == me.id])
        process = self._processes[port]
        process.popen.kill()
        process.popen.wait(timeout=10)
        self._frozen.discard(port)
        self._down.add(port)

    def freeze(self, port: int) -> None:
        """SIGSTOP the node on `port`: it holds its connections but answers nothing."""
        os.kill(self.pid(port), signal.SIGSTOP)
        self._frozen.add(port)

    def thaw(self, port: int) -> None:
        """SIGCONT a frozen node."""
        os.kill(self.pid(port), signal.SIGCONT)
        self._frozen.discard(port)

    def restart(self, port: int, timeout: float = 30.0) -> None:
        """Start a killed node again, on its port and config, and wait until it answers.

        Its nodes.conf keeps its identity, so it rejoins by itself: as a replica if one
        of its replicas was promoted meanwhile.
        """
        if self._processes[port].popen.poll() is None:
            raise RuntimeError(f"the node on port {port} is still running")
        self._close_client(port)
        self._launch(port)
        self._down.discard(port)
        self._wait_answers(port, timeout)

    def wait_promoted(self, old_primary: int, timeout: float = 30.0) -> int:
        """Wait until a replica of the killed `old_primary` took over; its port.

        Taken over: that replica owns all of the old primary's slots, and every live
        node says cluster_state:ok and agrees.
        """
        if old_primary in self._killed:
            slots, candidates = self._killed[old_primary]
        else:
            by_id = {node.id: node for node in self._view(exclude={old_primary})}
            slots = set(by_id[self._ids[old_primary]].slots)
            candidates = [n.port for n in by_id.values() if n.master == self._ids[old_primary]]
        if not slots or not candidates:
            raise RuntimeError(f"port {old_primary} had no slots or no replicas to promote")
        promoted: list[int] = []

        def done() -> bool:
            views = self._agreed_views()
            owners = {n.port for n in views[0] if n.primary and n.slots & slots}
            if len(owners) != 1 or owners.isdisjoint(candidates):
                return False
            [port] = owners
            owner = next(n for n in views[0] if n.port == port)
            if not slots <= owner.slots:
                return False
            promoted[:] = [port]
            return True

        _poll(done, timeout, f"a replica of port {old_primary} to take over its slots")
        return promoted[0]

    def migrate_slot(self, slot: int, to_port: int, timeout: float = 30.0) -> None:
        """Move `slot` and its keys to the primary on `to_port`, online.

        As `redis-cli --cluster reshard` does: IMPORTING on the target, MIGRATING on the
        source, MIGRATE in batches, then SETSLOT NODE on every primary; then wait until
        every live node agrees.
        """
        source = self.owner(slot)
        if source == to_port:
            return
        if to_port not in self.primaries():
            raise RuntimeError(f"port {to_port} is not a primary: it cannot own slot {slot}")
        src, dst = self.client(source), self.client(to_port)
        timeout_ms = int(timeout * 1000)
        _ask(dst, "CLUSTER", "SETSLOT", slot, "IMPORTING", self._ids[source])
        _ask(src, "CLUSTER", "SETSLOT", slot, "MIGRATING", self._ids[to_port])
        while True:
            keys = _ask(src, "CLUSTER", "GETKEYSINSLOT", slot, MIGRATE_BATCH)
            if not keys:
                break
            auth = [] if self.password is None else ["AUTH", self.password]
            _ask(src, "MIGRATE", "127.0.0.1", to_port, "", 0, timeout_ms, *auth, "KEYS", *keys)
        # The target first, so that it owns the slot before the source sends clients there.
        live = self._live()
        others = [p for p in self.primaries() if p in live and p not in {source, to_port}]
        for port in [to_port, source, *others]:
            _ask(self.client(port), "CLUSTER", "SETSLOT", slot, "NODE", self._ids[to_port])

        def agreed() -> bool:
            views = self._agreed_views()
            return any(n.port == to_port and slot in n.slots for n in views[0])

        _poll(agreed, timeout, f"every node to see slot {slot} on port {to_port}")

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Wait until every live node says cluster_state:ok and all agree.

        Agree: each knows every node, sees no live node as failing, and sees the same
        owner for each slot. Live: not killed (and not restarted since), not frozen.
        """
        _poll(self._agreed_views, timeout, "every live node to say cluster_state:ok and agree")

    # -- internals

    def _launch(self, port: int) -> None:
        directory = self.node_dir(port)
        directory.mkdir(parents=True, exist_ok=True)
        config = directory / "redis.conf"
        log = directory / "redis.log"
        config.write_text(
            "\n".join(
                [
                    *([f"port {port}"] if self.tls is None else self._tls_config(port)),
                    "bind 127.0.0.1",
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    f"cluster-node-timeout {self.node_timeout_ms}",
                    f"cluster-require-full-coverage {'yes' if self.full_coverage else 'no'}",
                    'save ""',
                    "appendonly no",
                    f"dir {directory}",
                    f"logfile {log}",
                    "daemonize no",
                    # Replicas sync at once, not after the default 5 s wait for others.
                    "repl-diskless-sync-delay 0",
                    *(
                        []
                        if self.password is None
                        else [f"requirepass {self.password}", f"masterauth {self.password}"]
                    ),
                ]
            )
            + "\n"
        )
        # What the server prints before it opens its logfile (a bad config) lands there too.
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [self.binary, str(config)], stdout=out, stderr=subprocess.STDOUT, cwd=directory
            )
        self._processes[port] = Process(f"redis node {port}", popen, log)

    def _tls_config(self, port: int) -> list[str]:
        assert self.tls is not None
        return [
            "port 0",  # no plain port at all: nothing may reach a node without TLS
            f"tls-port {port}",
            f"tls-cert-file {self.tls.cert_file}",
            f"tls-key-file {self.tls.key_file}",
            f"tls-ca-cert-file {self.tls.ca_file}",
            "tls-auth-clients no",
            "tls-cluster yes",
            "tls-replication yes",
        ]

    def _wait_answers(self, port: int, timeout: float) -> None:
        process = self._processes[port]

        def answers() -> bool:
            process.check_alive()
            return bool(self.client(port).ping())

        _poll(answers, timeout, f"the redis node on port {port} to answer PING")

    def _create(self, timeout: float) -> None:
        nodes = [f"127.0.0.1:{port}" for port in self._ports]
        command = [self.cli, "--cluster", "create", *nodes]
        if self.tls is not None:
            command += ["--tls", "--cacert", str(self.tls.ca_file)]
        if self.password is not None:
            command += ["-a", self.password, "--no-auth-warning"]
        command += ["--cluster-replicas", str(self.replica_count), "--cluster-yes"]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=max(timeout, 1), check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"redis-cli --cluster create took over {timeout:.0f} s") from exc
        if done.returncode != 0:
            output = (done.stdout + done.stderr)[-3000:]
            raise RuntimeError(f"redis-cli --cluster create failed ({done.returncode}):\n{output}")

    def _myid(self, port: int) -> str:
        return bytes(_ask(self.client(port), "CLUSTER", "MYID")).decode()

    def _close_client(self, port: int) -> None:
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()

    def _live(self) -> list[int]:
        """The nodes that should answer: not killed here, not frozen.

        A node that died by itself is no failover to wait for but a fault to report, with
        the tail of its log.
        """
        ports = [p for p in self._processes if p not in self._down | self._frozen]
        for port in ports:
            self._processes[port].check_alive()
        return ports

    def _nodes(self, port: int) -> list[_Node]:
        reply = _ask(self.client(port), "CLUSTER", "NODES")
        return _parse_nodes(bytes(reply).decode())

    def _view(self, exclude: set[int] | None = None) -> list[_Node]:
        """CLUSTER NODES of the first live node that answers."""
        last: Exception | None = None
        for port in self._live():
            if exclude and port in exclude:
                continue
            try:
                return self._nodes(port)
            except redis.RedisError as exc:
                last = exc
        raise RuntimeError(f"no live node answers CLUSTER NODES (last error: {last!r})")

    def _replicas_synced(self) -> bool:
        for port in self._live():
            info = self.client(port).info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                raise _NotYet(f"the replica on port {port} is not in sync with its primary")
        return True

    def _agreed_views(self) -> list[list[_Node]]:
        """Every live node's CLUSTER NODES, if the cluster is ok (see `wait_ok`)."""
        views = []
        owners: dict[int, str] | None = None
        live = self._live()
        for port in live:
            info = bytes(_ask(self.client(port), "CLUSTER", "INFO")).decode()
            fields = dict(line.split(":", 1) for line in info.split() if ":" in line)
            if fields.get("cluster_state") != "ok":
                raise _NotYet(f"port {port} says cluster_state:{fields.get('cluster_state')}")
            if int(fields.get("cluster_known_nodes", 0)) != len(self._ports):
                raise _NotYet(f"port {port} knows {fields.get('cluster_known_nodes')} nodes")
            view = self._nodes(port)
            # A node thawed or restarted is flagged failing until the others hear from it.
            doubted = [n.port for n in view if n.port in live and (n.failed or "fail?" in n.flags)]
            if doubted:
                raise _NotYet(f"port {port} still sees {doubted} as failing")
            mine = {slot: n.id for n in view if n.primary for slot in n.slots}
            if owners is None:
                owners = mine
            elif mine != owners:
                raise _NotYet(f"port {port} sees another owner for some slots")
            views.append(view)
        if not views:
            raise RuntimeError("no node of the cluster is running")
        return views
