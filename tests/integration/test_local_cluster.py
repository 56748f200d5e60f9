"""bench/redis_cluster.py's LocalCluster: a real Redis Cluster of real processes.

One cluster for the module (starting one takes a few seconds); the tests run in file
order, and the last ones fail a primary over and finally stop the cluster.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.exceptions import MovedError

from bench.redis_cluster import SLOTS, LocalCluster
from bench.servers import Servers, cpu_seconds
from tests.helpers import UNIT, wait_for


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    local.start(timeout=30 * UNIT)
    try:
        yield local
    finally:
        local.stop()


def process_alive(pid: int) -> bool:
    # The cluster reaps what it stops, so a stopped node's PID is gone from /proc.
    return Path(f"/proc/{pid}").exists()


@pytest.mark.timeout(40)
def test_start_gives_three_primaries_with_a_replica_each_covering_every_slot(
    cluster: LocalCluster,
) -> None:
    primaries = cluster.primaries()
    assert len(primaries) == 3
    assert len(cluster.ports) == 6
    assert all(len(cluster.replicas_of(port)) == 1 for port in primaries)
    replicas = {replica for port in primaries for replica in cluster.replicas_of(port)}
    assert replicas | set(primaries) == set(cluster.ports)
    assert {cluster.owner(slot) for slot in range(0, SLOTS, 97)} == set(primaries)
    assert all(cluster.owner(slot) in primaries for slot in (0, SLOTS - 1))
    for port in cluster.ports:
        info = cluster.client(port).cluster("INFO")
        assert info["cluster_state"] == "ok"
        assert int(info["cluster_slots_assigned"]) == SLOTS
    hosts = cluster.url.removeprefix("redis-cluster://").split(",")
    assert sorted(hosts) == sorted(f"127.0.0.1:{port}" for port in primaries)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    "key", ["a{b}c", "{}x", "{x", "x}{y}", "{user1000}.following", "plain", "", "é"]
)
def test_keyslot_is_redis_own(cluster: LocalCluster, key: str) -> None:
    client = cluster.client(cluster.ports[0])
    assert cluster.keyslot(key) == client.cluster("KEYSLOT", key)
    assert cluster.keyslot(key.encode()) == cluster.keyslot(key)


@pytest.mark.timeout(10)
def test_a_key_set_through_its_owner_reads_back(cluster: LocalCluster) -> None:
    owner = cluster.client(cluster.owner(cluster.keyslot("greeting")))
    owner.set("greeting", b"hello")
    assert owner.get("greeting") == b"hello"


@pytest.mark.timeout(30)
def test_migrate_slot_moves_the_slot_and_its_keys(cluster: LocalCluster) -> None:
    slot = cluster.keyslot("{moving}")
    source = cluster.owner(slot)
    target = next(port for port in cluster.primaries() if port != source)
    keys = [f"{{moving}}:{n}" for n in range(250)]  # more than one MIGRATE batch
    for n, key in enumerate(keys):
        cluster.client(source).set(key, n)
    cluster.migrate_slot(slot, target, timeout=20 * UNIT)
    assert cluster.owner(slot) == target
    assert cluster.client(source).cluster("COUNTKEYSINSLOT", slot) == 0
    assert cluster.client(target).cluster("COUNTKEYSINSLOT", slot) == len(keys)
    assert cluster.client(target).get(keys[7]) == b"7"
    with pytest.raises(MovedError) as moved:
        cluster.client(source).get(keys[7])
    assert (moved.value.slot_id, moved.value.port) == (slot, target)
    cluster.wait_ok(timeout=10 * UNIT)


@pytest.mark.timeout(20)
def test_a_frozen_node_answers_nothing_until_thawed(cluster: LocalCluster) -> None:
    replica = cluster.replicas_of(cluster.primaries()[0])[0]
    cluster.freeze(replica)
    try:
        with pytest.raises(redis.TimeoutError):
            cluster.client(replica).ping()
        cluster.wait_ok(timeout=5 * UNIT)  # the live nodes still agree
    finally:
        cluster.thaw(replica)
    wait_for(lambda: cluster.client(replica).ping(), 5, what="the thawed node to answer")
    cluster.wait_ok(timeout=10 * UNIT)


@pytest.mark.timeout(40)
def test_a_killed_primary_is_failed_over_and_rejoins_as_a_replica(
    cluster: LocalCluster,
) -> None:
    victim = cluster.owner(cluster.keyslot("greeting"))
    [replica] = cluster.replicas_of(victim)
    slots = [slot for slot in range(0, SLOTS, 97) if cluster.owner(slot) == victim]
    old_pid = cluster.pid(victim)
    cluster.kill(victim)
    assert not process_alive(old_pid)
    promoted = cluster.wait_promoted(victim, timeout=20 * UNIT)
    assert promoted == replica
    assert victim not in cluster.primaries()
    assert all(cluster.owner(slot) == promoted for slot in slots)
    assert cluster.client(promoted).get("greeting") == b"hello"  # replicated before the kill

    cluster.restart(victim, timeout=10 * UNIT)
    assert cluster.pid(victim) != old_pid
    wait_for(
        lambda: victim in cluster.replicas_of(promoted),
        10,
        what="the old primary to rejoin as a replica of the new one",
    )
    cluster.wait_ok(timeout=10 * UNIT)
    assert sorted(cluster.primaries()) == sorted(
        {cluster.owner(slot) for slot in range(0, SLOTS, 97)}
    )


@pytest.mark.timeout(30)
def test_stop_leaves_no_process_alive(cluster: LocalCluster) -> None:
    pids = [cluster.pid(port) for port in cluster.ports]
    assert all(process_alive(pid) for pid in pids)
    cluster.freeze(cluster.ports[0])  # a frozen node must stop too
    cluster.stop()
    assert not any(process_alive(pid) for pid in pids)
    cluster.stop()  # idempotent: the fixture stops it again


@pytest.mark.timeout(40)
def test_the_benchmark_servers_count_every_node_of_a_cluster(tmp_path: Path) -> None:
    # No workers: the service's cluster support is not what this checks.
    with Servers(tmp_path / "servers", 0, {}, redis="cluster") as servers:
        assert servers.cluster is not None
        assert servers.redis is None
        assert servers.broadcast_url == servers.cluster.url
        pids = [servers.cluster.pid(port) for port in servers.cluster.ports]
        assert sorted(p.pid for p in servers.processes) == sorted(pids)
        servers.check_alive()
        assert servers.redis_cpu_seconds() >= max(cpu_seconds(pid) for pid in pids)
        assert servers.redis_rss() > len(pids) * 1024 * 1024
    assert not any(process_alive(pid) for pid in pids)


@pytest.mark.timeout(20)
def test_a_node_that_cannot_start_is_reported_with_its_log(tmp_path: Path) -> None:
    local = LocalCluster(tmp_path, node_timeout_ms=-5)  # a value redis-server refuses
    with pytest.raises(RuntimeError, match=r"(?s)exited with 1.*cluster-node-timeout -5"):
        local.start(timeout=10 * UNIT)
    assert not any(process_alive(local.pid(port)) for port in local.ports)
