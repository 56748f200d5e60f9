"""Redis Sentinel and Redis Cluster deploy files, checked without Docker or Kubernetes.

deploy/compose.cluster.yml against the Compose specification and what the topology
promises (six nodes joined by a one-shot init, workers on a `redis-cluster://` URL);
the Helm values under deploy/k8s/redis-sentinel and deploy/k8s/redis-cluster; and the
kustomize overlays under deploy/k8s-overlays, built here (and by kubectl when it is
installed), validated against the Kubernetes schemas, and changing nothing of the base
but where BROADCAST_URL comes from. Every BROADCAST_URL must be one `Settings` accepts.
"""

from __future__ import annotations

import copy
import re
import secrets
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from service.broker import check_redis_url
from service.sentinel_url import parse_sentinel_url
from service.settings import Settings
from tests.static.test_deploy_files import environment_of, run, tool
from tests.static.test_k8s import (
    K8S,
    OLDEST_KUBERNETES,
    _ids,
    _manifests,
    _real_secrets,
    _settings_from,
)

pytestmark = pytest.mark.static

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CLUSTER_COMPOSE = ROOT / "deploy" / "compose.cluster.yml"
OVERLAYS = ROOT / "deploy" / "k8s-overlays"
SENTINEL_VALUES = K8S / "redis-sentinel" / "values.yaml"
CLUSTER_VALUES = K8S / "redis-cluster" / "values.yaml"
OPERATIONS = ROOT / "docs" / "operations.md"
CLUSTER_NODES = [f"redis-node-{n}" for n in range(1, 7)]
# The variable the kubelet expands into BROADCAST_URL; not a setting of the service.
PASSWORD_VARIABLE = "REDIS_PASSWORD"

Manifest = dict[str, Any]


# --- deploy/compose.cluster.yml -----------------------------------------------------


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def cluster() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_COMPOSE.read_text())["services"]


def shell_script(service: dict[str, Any]) -> str:
    """The script of a `sh -c` command, as the shell gets it (compose turns $$ into $)."""
    command = service["command"]
    assert command[0] == "sh", command
    assert re.fullmatch(r"-e?c", command[1]), command
    return str(command[2]).replace("$$", "$")


def test_the_cluster_override_follows_the_compose_specification() -> None:
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(CLUSTER_COMPOSE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_six_cluster_nodes_announce_their_service_names(
    base: dict[str, Any], cluster: dict[str, Any]
) -> None:
    nodes = sorted(
        name for name, service in cluster.items() if "--cluster-enabled yes" in str(service)
    )
    assert nodes == CLUSTER_NODES
    for name in nodes:
        node = cluster[name]
        # The same pinned image as the base stack's Redis; sharded pub/sub needs 7.0+.
        assert node["image"] == base["services"]["redis"]["image"] == "redis:7-alpine"
        script = shell_script(node)
        assert script.startswith("exec redis-server "), "redis-server must be PID 1"
        # Clients are handed the node's name, which compose DNS resolves: the name is
        # the service's, through the container's hostname.
        assert node["hostname"] == name
        assert '--cluster-announce-hostname "$(hostname)"' in script
        assert "--cluster-preferred-endpoint-type hostname" in script
        assert node["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
        # Failover within seconds, and a shard down stops only its own channels.
        assert "--cluster-node-timeout 5000" in script
        assert "--cluster-require-full-coverage no" in script


def test_the_init_creates_the_cluster_from_exactly_the_six_nodes(
    cluster: dict[str, Any],
) -> None:
    init = cluster["redis-cluster-init"]
    script = shell_script(init)
    [names] = re.findall(r"^\s*for node in ([\w\s-]+); do$", script, re.M)
    assert names.split() == CLUSTER_NODES
    [create] = [line.split() for line in script.splitlines() if "--cluster create" in line]
    assert create[:4] == ["exec", "redis-cli", "--cluster", "create"]
    assert create[4] == '"$@"', "one argument per node, built by the loop"
    assert create[5:] == ["--cluster-replicas", "1", "--cluster-yes"]
    # It waits for every node to answer, runs once, and the workers wait for it.
    assert init["depends_on"] == {name: {"condition": "service_healthy"} for name in CLUSTER_NODES}
    assert init.get("restart", "no") == "no"
    worker = cluster["worker"]
    assert worker["depends_on"]["redis-cluster-init"] == {
        "condition": "service_completed_successfully"
    }


@pytest.mark.parametrize("name", ["redis-cluster-init", CLUSTER_NODES[0]])
def test_the_cluster_scripts_pass_shellcheck(
    cluster: dict[str, Any], name: str, tmp_path: Path
) -> None:
    script = tmp_path / f"{name}.sh"
    script.write_text("#!/bin/sh\n" + shell_script(cluster[name]) + "\n")
    result = run(tool("shellcheck"), "--severity=style", str(script))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_cluster_workers_url_is_a_valid_setting(
    base: dict[str, Any], cluster: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = {**environment_of(base["services"]["worker"]), **environment_of(cluster["worker"])}
    url = urlsplit(env["BROADCAST_URL"])
    assert url.scheme == "redis-cluster"
    # Startup nodes of this stack, on the port they listen on; no database.
    startup = [item.rpartition(":") for item in url.netloc.split(",")]
    assert {host for host, _, _ in startup} <= set(CLUSTER_NODES)
    assert {port for _, _, port in startup} == {"6379"}
    assert url.path in ("", "/")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().backend_scheme == "redis-cluster"


def test_the_cluster_stack_publishes_only_nginx(
    base: dict[str, Any], cluster: dict[str, Any]
) -> None:
    services = {**base["services"], **cluster}
    published = sorted(name for name, service in services.items() if service.get("ports"))
    assert published == ["nginx"]


# --- Helm values --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentinel_values() -> dict[str, Any]:
    return yaml.safe_load(SENTINEL_VALUES.read_text())


@pytest.fixture(scope="module")
def cluster_values() -> dict[str, Any]:
    return yaml.safe_load(CLUSTER_VALUES.read_text())


def chart_version(values_file: Path, chart: str) -> str:
    """The chart version the values file says it was written against."""
    header = values_file.read_text()
    [version] = re.findall(rf"Bitnami `{chart}` Helm chart, version (\d+\.\d+\.\d+)", header)
    return str(version)


@pytest.mark.parametrize(
    ("values_file", "chart", "overlay"),
    [(SENTINEL_VALUES, "redis", "sentinel"), (CLUSTER_VALUES, "redis-cluster", "cluster")],
    ids=["redis", "redis-cluster"],
)
def test_the_install_commands_name_the_chart_version_of_the_values(
    values_file: Path, chart: str, overlay: str
) -> None:
    version = chart_version(values_file, chart)
    install = f"bitnamicharts/{chart} --version {version}"
    for path in (values_file, OVERLAYS / overlay / "kustomization.yaml", OPERATIONS):
        text = re.sub(r"\\\n\s*(#\s*)?", "", path.read_text())  # join continued lines
        commands = re.findall(rf"bitnamicharts/{chart} --version \S+", text)
        assert commands, f"{path.name} has no `helm install` of {chart}"
        assert set(commands) == {install}, f"{path.name}: {commands}"


def test_the_sentinel_values_run_three_nodes_with_sentinels(
    sentinel_values: dict[str, Any],
) -> None:
    assert sentinel_values["architecture"] == "replication"
    assert sentinel_values["replica"]["replicaCount"] == 3
    sentinel = sentinel_values["sentinel"]
    assert sentinel["enabled"] is True
    assert sentinel["masterSet"]
    assert sentinel["quorum"] == 2
    # Publishes are refused until the failover: seconds, not the chart's minute.
    assert sentinel["downAfterMilliseconds"] <= 10_000
    auth = sentinel_values["auth"]
    assert auth["enabled"] is True
    assert auth["sentinel"] is True
    assert "password" not in auth, "the password comes from auth.existingSecret"
    assert auth["existingSecret"]
    assert auth["existingSecretPasswordKey"]


def test_the_cluster_values_run_three_primaries_with_a_replica_each(
    cluster_values: dict[str, Any],
) -> None:
    assert cluster_values["cluster"]["nodes"] == 6
    assert cluster_values["cluster"]["replicas"] == 1
    assert cluster_values["usePassword"] is True
    assert "password" not in cluster_values, "the password comes from existingSecret"
    assert cluster_values["existingSecret"]
    assert cluster_values["existingSecretPasswordKey"]
    # The volume keeps each node's identity (nodes.conf) across rescheduling.
    assert cluster_values["persistence"]["enabled"] is True
    # As in the compose file: failover within seconds (the chart leaves Redis's 15 s),
    # and a shard down stops only its own channels.
    config = cluster_values["redis"]["configmap"].splitlines()
    assert "cluster-node-timeout 5000" in config
    assert "cluster-require-full-coverage no" in config


# --- deploy/k8s-overlays -----------------------------------------------------------


def _documents(text: str) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _merge(target: Manifest, patch: Manifest) -> None:
    """A strategic merge, as far as the overlays use it: null deletes a key, lists of
    named items (containers, env) merge by name, patch items first."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        elif (
            isinstance(value, list)
            and isinstance(target.get(key), list)
            and all(isinstance(item, dict) and "name" in item for item in value + target[key])
        ):
            old = {item["name"]: item for item in target[key]}
            merged = []
            for item in value:
                if item["name"] in old:
                    _merge(old[item["name"]], item)
                    merged.append(old.pop(item["name"]))
                else:
                    merged.append(copy.deepcopy(item))
            target[key] = merged + list(old.values())
        else:
            target[key] = copy.deepcopy(value)


def _apply(objects: list[Manifest], patch: Manifest) -> list[Manifest]:
    kind, name = patch["kind"], patch["metadata"]["name"]
    matches = [m for m in objects if (m["kind"], m["metadata"]["name"]) == (kind, name)]
    assert len(matches) == 1, f"the patch of {kind}/{name} matches {len(matches)} objects"
    if patch.get("$patch") == "delete":
        return [m for m in objects if m is not matches[0]]
    _merge(matches[0], patch)
    return objects


def build(directory: Path) -> list[Manifest]:
    """The objects of a kustomization: its resources, then its patches applied in order.

    Transformers of the base (labels, images) are left out, as in test_k8s.py; files
    must lie inside the kustomization's directory, as kustomize demands.
    """
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    objects: list[Manifest] = []
    for reference in kustomization.get("resources", []):
        path = (directory / reference).resolve()
        if path.is_dir():
            objects.extend(build(path))
        else:
            assert path.is_relative_to(directory), f"{reference} is outside {directory}"
            objects.extend(_documents(path.read_text()))
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            path = (directory / patch["path"]).resolve()
            assert path.is_relative_to(directory), f"{patch['path']} is outside {directory}"
            assert path.is_file(), f"{patch['path']} is listed but missing"
            documents = _documents(path.read_text())
        else:
            documents = _documents(patch["patch"])
        for document in documents:
            objects = _apply(objects, document)
    return objects


OVERLAY_NAMES = ["sentinel", "cluster"]
VALUES_OF = {"sentinel": SENTINEL_VALUES, "cluster": CLUSTER_VALUES}
BUILT = {name: build(OVERLAYS / name) for name in OVERLAY_NAMES}
VALIDATED = [
    pytest.param(manifest, id=f"{name}:{object_id}")
    for name, objects in BUILT.items()
    for manifest, object_id in zip(objects, _ids(objects), strict=True)
]


def _find(objects: list[Manifest], kind: str, name: str) -> Manifest:
    [found] = [m for m in objects if (m["kind"], m["metadata"]["name"]) == (kind, name)]
    return found


def _worker_env(objects: list[Manifest]) -> list[Manifest]:
    deployment = _find(objects, "Deployment", "broadcast-worker")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env: list[Manifest] = container["env"]
    return env


def _expand(value: str, defined: dict[str, str]) -> str:
    """`$(NAME)` replaced as the kubelet does, from the variables defined before it."""

    def one(match: re.Match[str]) -> str:
        assert match.group(1) in defined, f"$({match.group(1)}) is not defined before"
        return defined[match.group(1)]

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", one, value)


def _overlay_environment(name: str, password: str) -> dict[str, str]:
    """The worker's settings on this overlay: the ConfigMap, the Secret filled in, and
    the container's `env` expanded with `password` as the Secret's value."""
    objects = BUILT[name]
    environment = {**_find(objects, "ConfigMap", "broadcast-config")["data"], **_real_secrets()}
    defined: dict[str, str] = {}
    for variable in _worker_env(objects):
        if "value" in variable:
            defined[variable["name"]] = _expand(variable["value"], defined)
        elif "secretKeyRef" in variable.get("valueFrom", {}):
            defined[variable["name"]] = password
    environment.update(defined)
    return environment


def test_the_overlays_are_outside_the_base() -> None:
    # kustomize refuses an overlay inside its base's directory ("cycle detected").
    assert not OVERLAYS.is_relative_to(K8S)
    assert sorted(p.name for p in OVERLAYS.iterdir() if p.is_dir()) == sorted(OVERLAY_NAMES)


@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_an_overlay_changes_only_where_broadcast_url_comes_from(name: str) -> None:
    base = _manifests()
    built = copy.deepcopy(BUILT[name])
    # The base's single Redis is gone, and nothing else.
    dropped = {"StatefulSet/broadcast-redis", "Service/broadcast-redis"}
    assert sorted(_ids(built)) == sorted(set(_ids(base)) - dropped)
    # The URL is no longer in the ConfigMap, where a password has no place.
    config = _find(built, "ConfigMap", "broadcast-config")
    assert "BROADCAST_URL" not in config["data"]
    # ... but in the worker's env, after the password it is made with.
    env = _worker_env(built)
    names = [variable["name"] for variable in env]
    assert names.index(PASSWORD_VARIABLE) < names.index("BROADCAST_URL")
    # Take those two away, put the URL back: the base, unchanged.
    container = _find(built, "Deployment", "broadcast-worker")["spec"]["template"]["spec"]
    container["containers"][0]["env"] = [
        variable for variable in env if variable["name"] not in {PASSWORD_VARIABLE, "BROADCAST_URL"}
    ]
    config["data"]["BROADCAST_URL"] = _find(base, "ConfigMap", "broadcast-config")["data"][
        "BROADCAST_URL"
    ]
    by_id = dict(zip(_ids(base), base, strict=True))
    for manifest, object_id in zip(built, _ids(built), strict=True):
        assert manifest == by_id[object_id], f"{name} changes {object_id}"


@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_the_password_comes_from_the_secret_the_chart_uses(name: str) -> None:
    values = yaml.safe_load(VALUES_OF[name].read_text())
    secret = values["auth"] if name == "sentinel" else values
    [password] = [v for v in _worker_env(BUILT[name]) if v["name"] == PASSWORD_VARIABLE]
    assert password["valueFrom"] == {
        "secretKeyRef": {
            "name": secret["existingSecret"],
            "key": secret["existingSecretPasswordKey"],
        }
    }
    # The URL holds only a reference to it.
    [url] = [v for v in _worker_env(BUILT[name]) if v["name"] == "BROADCAST_URL"]
    assert f":$({PASSWORD_VARIABLE})@" in url["value"]
    # And the overlays add no Secret of their own: the operator makes it, out of git.
    assert [m["metadata"]["name"] for m in BUILT[name] if m["kind"] == "Secret"] == [
        "broadcast-secrets"
    ]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("manifest", VALIDATED)
def test_every_overlay_object_matches_the_kubernetes_schema(
    manifest: Manifest, version: str
) -> None:
    kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.parametrize("name", OVERLAY_NAMES)
def test_kubectl_builds_what_the_overlay_test_builds(name: str) -> None:
    # CI images without kubectl still check the overlay through build() above; where
    # kubectl is installed, kustomize itself must agree with it.
    kubectl = shutil.which("kubectl")
    objects = BUILT[name]
    if kubectl is not None:
        built = subprocess.run(
            [kubectl, "kustomize", str(OVERLAYS / name)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert built.returncode == 0, built.stderr
        objects = _documents(built.stdout)
        for manifest in objects:
            kubernetes_validate.validate(manifest, OLDEST_KUBERNETES, strict=True)
    assert sorted(_ids(objects)) == sorted(_ids(BUILT[name]))
    assert _worker_env(objects) == _worker_env(BUILT[name])
    config = _find(objects, "ConfigMap", "broadcast-config")["data"]
    assert config == _find(BUILT[name], "ConfigMap", "broadcast-config")["data"]


def test_the_sentinel_overlay_names_the_charts_sentinels(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    values = yaml.safe_load(SENTINEL_VALUES.read_text())
    password = secrets.token_urlsafe(32)
    settings = _settings_from(monkeypatch, _overlay_environment("sentinel", password))
    assert settings.backend_scheme == "redis+sentinel"
    assert settings.environment == "production"
    check_redis_url(settings.broadcast_url)
    target = parse_sentinel_url(settings.broadcast_url)
    # Every Sentinel the chart runs (one per node pod), by the headless Service's names.
    fullname = values["fullnameOverride"]
    assert sorted(target.sentinels) == [
        (f"{fullname}-node-{i}.{fullname}-headless", 26379)
        for i in range(values["replica"]["replicaCount"])
    ]
    assert target.service == values["sentinel"]["masterSet"]
    assert target.db == 0
    assert target.password == password
    # auth.sentinel: the Sentinels want the same password.
    assert target.sentinel_password == password


def test_the_cluster_overlay_names_the_charts_nodes(monkeypatch: pytest.MonkeyPatch) -> None:
    values = yaml.safe_load(CLUSTER_VALUES.read_text())
    password = secrets.token_urlsafe(32)
    environment = _overlay_environment("cluster", password)
    url = urlsplit(environment["BROADCAST_URL"])
    assert url.scheme == "redis-cluster"
    assert url.password == password
    assert url.path in ("", "/"), "a cluster has only database 0"
    fullname = values["fullnameOverride"]
    pods = {f"{fullname}-{i}.{fullname}-headless:6379" for i in range(values["cluster"]["nodes"])}
    startup = url.netloc.rpartition("@")[2].split(",")
    assert len(startup) >= 3, "one startup node down must leave others"
    assert set(startup) <= pods
    settings = _settings_from(monkeypatch, environment)
    assert settings.backend_scheme == "redis-cluster"
    assert settings.environment == "production"
