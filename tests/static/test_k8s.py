"""deploy/k8s: valid Kubernetes objects that agree with each other and with the service.

Schemas come from kubernetes-validate (strict: unknown fields are errors); the rest reads
the YAML and checks what a schema cannot: selectors that select, ports and probes that
meet the container, a grace period that outlasts the worker's shutdown, and settings
that `service.settings.Settings` accepts.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from service.broker import check_redis_url
from service.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
# The oldest Kubernetes the manifests are meant for (PodDisruptionBudget's
# unhealthyPodEvictionPolicy is on by default from 1.27); they are also checked
# against the newest one kubernetes-validate knows.
OLDEST_KUBERNETES = "1.30.0"
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)
# Paths for operators and probes only (docs/security.md).
PRIVATE_PATHS = ("/healthz", "/readyz", "/metrics")

Manifest = dict[str, Any]


def _kustomization() -> Manifest:
    loaded: Manifest = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return loaded


def _manifests() -> list[Manifest]:
    found: list[Manifest] = []
    for name in _kustomization()["resources"]:
        found.extend(doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc)
    return found


MANIFESTS = _manifests()
WORKLOADS = [m for m in MANIFESTS if m["kind"] in WORKLOAD_KINDS]


def _ids(manifests: list[Manifest]) -> list[str]:
    return [f"{m['kind']}/{m['metadata']['name']}" for m in manifests]


def _all(kind: str) -> list[Manifest]:
    return [m for m in MANIFESTS if m["kind"] == kind]


def _one(kind: str, name: str) -> Manifest:
    matches = [m for m in _all(kind) if m["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind} named {name}, found {len(matches)}"
    return matches[0]


def _worker() -> Manifest:
    return _one("Deployment", "broadcast-worker")


def _containers(workload: Manifest) -> list[Manifest]:
    containers: list[Manifest] = workload["spec"]["template"]["spec"]["containers"]
    return containers


def _worker_container() -> Manifest:
    (container,) = _containers(_worker())
    return container


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _selected_workloads(selector: dict[str, str]) -> list[Manifest]:
    """The workloads whose pods carry every label of `selector`."""
    return [
        workload
        for kind in WORKLOAD_KINDS
        for workload in _all(kind)
        if _selects(selector, workload["spec"]["template"]["metadata"]["labels"])
    ]


def _container_port(container: Manifest, port: int | str) -> int:
    """The number of a container's port, given by number or by name."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            number: int = declared["containerPort"]
            return number
    raise AssertionError(f"container {container['name']} has no port {port!r}")


def _config() -> dict[str, str]:
    data: dict[str, str] = _one("ConfigMap", "broadcast-config")["data"]
    return data


def _secret_values() -> dict[str, str]:
    secret = _one("Secret", "broadcast-secrets")
    values = {
        key: base64.b64decode(value).decode() for key, value in secret.get("data", {}).items()
    }
    values.update(secret.get("stringData", {}))
    return values


def _real_secrets() -> dict[str, str]:
    """A value of each secret such as an operator would generate."""
    generated = {
        "JWT_SECRET": secrets.token_urlsafe(64),
        "API_KEYS": json.dumps([secrets.token_urlsafe(32)]),
    }
    assert set(_secret_values()) <= set(generated), "a new secret needs a generated value here"
    return {key: generated[key] for key in _secret_values()}


def _settings_from(monkeypatch: pytest.MonkeyPatch, environment: dict[str, str]) -> Settings:
    """Settings as a worker would read them from this environment (no .env file)."""
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)  # type: ignore[call-arg]


@pytest.fixture
def settings(monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings of a worker: the ConfigMap, and the Secret once filled in."""
    return _settings_from(monkeypatch, {**_config(), **_real_secrets()})


def _prestop_seconds(container: Manifest) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"unexpected preStop {command}"
    return float(command[1])


def _path_matches(ingress_path: Manifest, path: str) -> bool:
    """Whether an Ingress path sends `path` to its backend (Prefix works by segment)."""
    prefix = ingress_path["path"]
    if ingress_path["pathType"] == "Exact":
        return bool(path == prefix)
    stem = prefix.rstrip("/")
    return bool(stem == "" or path == stem or path.startswith(stem + "/"))


def _ingress_paths() -> Iterator[Manifest]:
    for ingress in _all("Ingress"):
        for rule in ingress["spec"]["rules"]:
            yield from rule["http"]["paths"]


# --- the files ----------------------------------------------------------------------


def test_the_kustomization_lists_every_manifest_once() -> None:
    resources = _kustomization()["resources"]
    assert len(resources) == len(set(resources))
    for name in resources:
        assert (K8S / name).is_file(), f"{name} is listed but missing"
    on_disk = {path.name for path in K8S.iterdir() if path.suffix in (".yaml", ".yml")}
    assert on_disk - {"kustomization.yaml"} == set(resources), "a manifest is left out"


def test_no_two_objects_share_a_kind_and_name() -> None:
    ids = _ids(MANIFESTS)
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("manifest", MANIFESTS, ids=_ids(MANIFESTS))
def test_every_object_matches_the_kubernetes_schema(manifest: Manifest, version: str) -> None:
    # Raises on an unknown kind too (SchemaNotFoundError), not only on a bad field.
    kubernetes_validate.validate(manifest, version, strict=True)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_builds_the_same_objects() -> None:
    # Checks kustomization.yaml itself (its transformers), which has no schema.
    built = subprocess.run(
        ["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60
    )
    assert built.returncode == 0, built.stderr
    objects = [doc for doc in yaml.safe_load_all(built.stdout) if doc]
    assert sorted(_ids(objects)) == sorted(_ids(MANIFESTS))
    for manifest in objects:
        kubernetes_validate.validate(manifest, OLDEST_KUBERNETES, strict=True)
        assert manifest["metadata"]["labels"]["app.kubernetes.io/part-of"] == "broadcast-service"


# --- objects that point at each other ----------------------------------------------


def test_each_workload_selects_its_own_pods() -> None:
    for kind in WORKLOAD_KINDS:
        for workload in _all(kind):
            selector = workload["spec"]["selector"]["matchLabels"]
            assert _selected_workloads(selector) == [workload], f"{kind} selector overlaps"


def test_the_autoscaler_owns_the_worker_count() -> None:
    # A count in the Deployment would be put back by every apply, scaling it down.
    assert "replicas" not in _worker()["spec"]
    (hpa,) = _all("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "broadcast-worker")
    assert 3 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    # Utilization is relative to the request: without one the HPA cannot compute it.
    assert _worker_container()["resources"]["requests"]["cpu"]


def test_the_disruption_budget_covers_the_workers_and_leaves_some() -> None:
    (pdb,) = _all("PodDisruptionBudget")
    assert _selected_workloads(pdb["spec"]["selector"]["matchLabels"]) == [_worker()]
    (hpa,) = _all("HorizontalPodAutoscaler")
    min_replicas = hpa["spec"]["minReplicas"]
    if "maxUnavailable" in pdb["spec"]:
        assert pdb["spec"]["maxUnavailable"] < min_replicas
    else:
        assert 0 < pdb["spec"]["minAvailable"] < min_replicas


def test_each_service_reaches_one_workload_on_a_declared_port() -> None:
    for service in _all("Service"):
        (workload,) = _selected_workloads(service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            assert any(
                _container_port(container, port["targetPort"])
                for container in _containers(workload)
            )


def test_the_ingress_reaches_the_worker_service() -> None:
    worker_service = _one("Service", "broadcast-worker")
    ports = {p["port"] for p in worker_service["spec"]["ports"]}
    ports |= {p["name"] for p in worker_service["spec"]["ports"]}
    for path in _ingress_paths():
        backend = path["backend"]["service"]
        assert backend["name"] == "broadcast-worker"
        assert backend["port"].get("number", backend["port"].get("name")) in ports
    for client_path in ("/ws", "/ws/news", "/api/channels/news/messages", "/static/client.js"):
        assert any(_path_matches(path, client_path) for path in _ingress_paths()), client_path


def test_the_ingress_keeps_operator_endpoints_private() -> None:
    for path in _ingress_paths():
        for private in PRIVATE_PATHS:
            assert not _path_matches(path, private), f"{path['path']} exposes {private}"


def test_broadcast_url_names_the_shipped_redis(settings: Settings) -> None:
    redis = [w for w in _all("StatefulSet") if w["metadata"]["name"] == "broadcast-redis"]
    if not redis:
        pytest.skip("no Redis in the kustomization: BROADCAST_URL points elsewhere")
    url = urlsplit(settings.broadcast_url)
    service = _one("Service", str(url.hostname))
    assert _selected_workloads(service["spec"]["selector"]) == redis
    assert (url.port or 6379) in {port["port"] for port in service["spec"]["ports"]}


# --- the worker pod and the service's behaviour ------------------------------------


def test_probes_ask_the_worker_its_health_and_readiness(settings: Settings) -> None:
    container = _worker_container()
    expected = {"readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert _container_port(container, get["port"]) == settings.port
    # Liveness must not depend on Redis: an outage would restart every worker at once.
    assert container["livenessProbe"]["httpGet"]["path"] != "/readyz"
    if "startupProbe" in container:
        assert container["startupProbe"]["httpGet"]["path"] == "/healthz"


def test_the_worker_listens_where_the_pod_is_reached(settings: Settings) -> None:
    assert settings.host in ("0.0.0.0", "::")
    assert _container_port(_worker_container(), "http") == settings.port
    # One process per pod: SIGTERM, /metrics and the autoscaler each see the whole pod.
    assert settings.workers == 1


def test_the_grace_period_outlasts_the_prestop_sleep_and_the_shutdown(
    settings: Settings,
) -> None:
    pod = _worker()["spec"]["template"]["spec"]
    # The grace period runs from the start of preStop; past it the pod is SIGKILLed.
    pre_stop = _prestop_seconds(_worker_container())
    assert pre_stop > 0
    assert pod["terminationGracePeriodSeconds"] > pre_stop + settings.shutdown_timeout


def test_the_ingress_outwaits_the_websocket_keepalive(settings: Settings) -> None:
    # A quiet healthy socket sees a ping every interval, answered within the timeout.
    keepalive = settings.ws_ping_interval + settings.ws_ping_timeout
    for ingress in _all("Ingress"):
        annotations = ingress["metadata"]["annotations"]
        for timeout in ("proxy-read-timeout", "proxy-send-timeout"):
            assert float(annotations[f"nginx.ingress.kubernetes.io/{timeout}"]) > keepalive


def test_every_variable_given_to_the_worker_is_a_setting() -> None:
    names = set(_config()) | set(_secret_values())
    names |= {variable["name"] for variable in _worker_container().get("env", [])}
    assert names - SETTING_NAMES == set()
    sources = _worker_container()["envFrom"]
    assert {"configMapRef": {"name": "broadcast-config"}} in sources
    assert {"secretRef": {"name": "broadcast-secrets"}} in sources
    # The settings have no prefix: Kubernetes' service links (FOO_PORT=...) stay out.
    assert _worker()["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_the_config_makes_a_production_worker_on_redis(settings: Settings) -> None:
    assert settings.environment == "production"
    assert settings.backend_scheme in ("redis", "rediss")
    check_redis_url(settings.broadcast_url)
    assert settings.auth_enabled
    assert not settings.demo_page


@pytest.mark.parametrize("name", sorted(_secret_values()))
def test_the_shipped_secrets_are_refused_until_replaced(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # A placeholder that passed validation would run production with a public secret.
    environment = {**_config(), **_real_secrets(), name: _secret_values()[name]}
    with pytest.raises(ValidationError, match=name):
        _settings_from(monkeypatch, environment)


@pytest.mark.parametrize("workload", WORKLOADS, ids=_ids(WORKLOADS))
def test_containers_run_unprivileged_with_bounded_resources(workload: Manifest) -> None:
    pod = workload["spec"]["template"]["spec"]
    for container in _containers(workload):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        assert context.get("runAsNonRoot", pod["securityContext"].get("runAsNonRoot")) is True
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][bound])
