"""The deploy files, checked without a Docker engine.

docker-compose.yml against the Compose specification (check-jsonschema) and what the
topology promises; deploy/Dockerfile with hadolint and what the image promises;
deploy/nginx.conf with `nginx -t`; the shell scripts with shellcheck. Settings named in
these files must be real ones.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.adapters.uvicorn import MAX_HEAD_BYTES, MAX_LINE_BYTES
from service.settings import Settings
from tests.helpers import free_port
from tests.nginx import nginx_binary

pytestmark = pytest.mark.static

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
WATCHER = ROOT / "deploy" / "nginx-watch-workers.sh"

SETTING_NAMES = {name.upper() for name in Settings.model_fields}
# Environment variables of the image that are not settings of the service.
PLATFORM_ENV = re.compile(r"^(PATH|PYTHON[A-Z_]*|PIP_[A-Z_]*)$")


def tool(name: str) -> str:
    """A command installed with the test extras (next to this Python) or on PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: scripts/bootstrap installs it")
    return found


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a checker; its output goes into the assertion message."""
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


# --- docker-compose.yml -------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of its forms (mapping or KEY=VALUE list)."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def seconds(duration: str) -> float:
    """A compose duration such as `15s`, `1m30s` or `500ms`, in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def test_compose_file_follows_the_compose_specification() -> None:
    result = run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))
    assert result.returncode == 0, result.stdout + result.stderr


def test_workers_wait_for_a_healthy_redis(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]


def test_three_worker_replicas_built_from_the_dockerfile(compose: dict[str, Any]) -> None:
    worker = compose["services"]["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert (ROOT / worker["build"]["context"] / worker["build"]["dockerfile"]) == DOCKERFILE
    # Replicas must not share a name, nor a fixed WORKER_ID.
    assert "container_name" not in worker
    assert "WORKER_ID" not in environment_of(worker)


def test_nginx_serves_the_shipped_config_and_alone_publishes_a_port(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    nginx = services["nginx"]
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert nginx["ports"] == ["8000:8000"]
    assert nginx["depends_on"]["worker"]["condition"] in {"service_started", "service_healthy"}
    published = sorted(name for name, service in services.items() if service.get("ports"))
    assert published == ["nginx"], "only nginx may publish ports"


def test_nginx_runs_the_worker_watcher_on_the_upstream_name(compose: dict[str, Any]) -> None:
    nginx = compose["services"]["nginx"]
    # The image's entrypoint runs /docker-entrypoint.d/*.sh only if they are executable.
    [mount] = [v for v in nginx["volumes"] if v.startswith("./deploy/nginx-watch-workers.sh:")]
    _, target, mode = mount.split(":")
    assert re.fullmatch(r"/docker-entrypoint\.d/[^/]+\.sh", target), target
    assert mode == "ro"
    assert WATCHER.stat().st_mode & 0o111, "the watcher must be executable (git mode 100755)"
    # It watches the name the upstream's `server` line uses, and that is the service.
    watched = environment_of(nginx)["UPSTREAM_HOST"]
    [server] = re.findall(r"^\s*server\s+([\w.-]+):8000\b", NGINX_CONF.read_text(), re.M)
    assert watched == server == "worker"
    assert watched in compose["services"]
    assert int(environment_of(nginx)["UPSTREAM_WATCH_INTERVAL"]) >= 1
    # The e2e tests run the watcher with Debian's glibc tools (getent, sort, paste): the
    # image must be a Debian one, not Alpine's busybox and musl.
    assert "alpine" not in nginx["image"], nginx["image"]


def test_worker_environment_is_made_of_real_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    env = environment_of(compose["services"]["worker"])
    assert set(env) <= SETTING_NAMES, f"not settings: {sorted(set(env) - SETTING_NAMES)}"
    assert env["BROADCAST_URL"].startswith("redis://redis:")
    # And their values are valid (the conftest clears the environment and the cwd).
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.backend_scheme == "redis"
    assert settings.environment == "development"
    assert not settings.auth_enabled, "the demo holds no secrets"


SENTINEL_COMPOSE = ROOT / "deploy" / "compose.sentinel.yml"
SENTINEL_CONF = ROOT / "deploy" / "sentinel.conf"


def test_the_sentinel_override_follows_the_compose_specification() -> None:
    result = run(
        tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(SENTINEL_COMPOSE)
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_sentinel_override_watches_the_stacks_redis_with_three_sentinels(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    override = yaml.safe_load(SENTINEL_COMPOSE.read_text())["services"]
    sentinels = sorted(name for name in override if name.startswith("sentinel-"))
    assert sentinels == ["sentinel-1", "sentinel-2", "sentinel-3"]
    for name in sentinels:
        sentinel = override[name]
        assert "./deploy/sentinel.conf:/etc/redis/sentinel.conf.in:ro" in sentinel["volumes"]
        assert "--sentinel" in sentinel["command"][-1]
    # The replica follows the base stack's `redis`, announced by a name workers resolve.
    replica = " ".join(override["redis-replica"]["command"])
    assert "--replicaof redis 6379" in replica
    assert "--replica-announce-ip redis-replica" in replica
    assert "redis" in compose["services"]
    monitor = next(
        line.split() for line in SENTINEL_CONF.read_text().splitlines() if " monitor " in line
    )
    assert monitor[3:6] == ["redis", "6379", "2"]  # the base stack's primary; a quorum of 2
    # The workers' URL names every Sentinel and the monitored service, and is a valid
    # setting together with the base stack's other ones.
    env = {**environment_of(compose["services"]["worker"]), **environment_of(override["worker"])}
    url = env["BROADCAST_URL"]
    assert url == ("redis+sentinel://sentinel-1:26379,sentinel-2:26379,sentinel-3:26379/mymaster/0")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Settings().backend_scheme == "redis+sentinel"
    assert set(override["worker"]["depends_on"]) == set(sentinels)


def test_workers_get_longer_than_their_shutdown_timeout_to_stop(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["worker"]
    shutdown_timeout = float(
        environment_of(worker).get("SHUTDOWN_TIMEOUT", Settings().shutdown_timeout)
    )
    assert seconds(worker["stop_grace_period"]) > shutdown_timeout


# --- deploy/Dockerfile --------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments out."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


def final_stage(steps: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The `ENV KEY=VALUE ...` pairs of these steps (values without spaces)."""
    env: dict[str, str] = {}
    for keyword, arguments in steps:
        if keyword == "ENV":
            env.update(pair.split("=", 1) for pair in arguments.split())
    return env


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    # An explicit config: a user's ~/.config/hadolint.yaml must not relax the check.
    config = tmp_path / "hadolint.yaml"
    config.write_text("failure-threshold: warning\n")
    result = run(
        tool("hadolint"),
        "--config",
        str(config),
        "--failure-threshold",
        "warning",
        "--no-color",
        str(DOCKERFILE),
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_is_multi_stage_on_python_slim() -> None:
    steps = instructions(DOCKERFILE)
    stages = [arguments for keyword, arguments in steps if keyword == "FROM"]
    assert len(stages) >= 2, "a builder stage and a final stage"
    global_args = dict(
        arguments.split("=", 1)
        for keyword, arguments in steps[: next(i for i, s in enumerate(steps) if s[0] == "FROM")]
        if keyword == "ARG" and "=" in arguments
    )
    base = re.sub(r"\$\{(\w+)\}", lambda m: global_args[m.group(1)], stages[-1])
    assert base == "python:3.11-slim"
    # Runtime dependencies only.
    assert not [arguments for keyword, arguments in steps if "[test]" in arguments]


def test_image_runs_as_a_numeric_non_root_user() -> None:
    users = [
        arguments
        for keyword, arguments in final_stage(instructions(DOCKERFILE))
        if keyword == "USER"
    ]
    assert users, "the final stage sets no USER: it would run as root"
    user = users[-1].split(":")[0]
    # Numeric, so that Kubernetes' runAsNonRoot can verify it.
    assert user.isdigit(), users[-1]
    assert int(user) != 0, users[-1]


def test_image_checks_its_health_with_python_only() -> None:
    checks = [
        arguments
        for keyword, arguments in final_stage(instructions(DOCKERFILE))
        if keyword == "HEALTHCHECK"
    ]
    assert len(checks) == 1
    command = json.loads(checks[0].partition("CMD ")[2])
    assert command[0] == "python"
    assert "/healthz" in command[-1]
    assert not {"curl", "wget"} & set(" ".join(command).split())


def test_image_starts_the_service_in_exec_form_and_stops_with_sigterm() -> None:
    steps = final_stage(instructions(DOCKERFILE))
    commands = [arguments for keyword, arguments in steps if keyword == "CMD"]
    # Exec form: python is PID 1 and gets the SIGTERM (a shell would swallow it).
    assert json.loads(commands[-1]) == ["python", "-m", "service"]
    assert not [arguments for keyword, arguments in steps if keyword == "ENTRYPOINT"]
    stop_signals = [arguments for keyword, arguments in steps if keyword == "STOPSIGNAL"]
    assert stop_signals in ([], ["SIGTERM"])


def test_image_listens_on_every_interface_and_sets_only_real_settings() -> None:
    steps = final_stage(instructions(DOCKERFILE))
    env = env_of(steps)
    assert env["HOST"] == "0.0.0.0"
    assert env["PORT"] == "8000"
    assert ("EXPOSE", env["PORT"]) in steps
    settings = {name for name in env if not PLATFORM_ENV.match(name)}
    assert settings <= SETTING_NAMES, f"not settings: {sorted(settings - SETTING_NAMES)}"


def test_dockerignore_keeps_local_and_secret_files_out_but_not_the_sources() -> None:
    patterns = {
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "test-artifacts", "**/__pycache__"} <= patterns
    copied = {"pyproject.toml", "README.md", "service"}
    assert not copied & patterns, "the builder stage COPYs these"


# --- deploy/nginx.conf --------------------------------------------------------------


def test_nginx_accepts_the_config(tmp_path: Path) -> None:
    nginx = nginx_binary()
    # `nginx -t` resolves upstream host names, and `worker` exists only inside compose:
    # only that address changes.
    shipped, servers = re.subn(
        r"^(\s*server\s+)worker:8000\b",
        rf"\g<1>127.0.0.1:{free_port()}",
        NGINX_CONF.read_text(),
        flags=re.MULTILINE,
    )
    assert servers == 1, "deploy/nginx.conf has no single `server worker:8000` line"
    config = tmp_path / "nginx.conf"
    config.write_text(shipped)
    result = run(
        nginx, "-t", "-c", str(config), "-p", str(tmp_path), "-g", f"error_log {tmp_path}/e.log;"
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "test is successful" in output, output
    # Warnings fail too, except one about the shell running this test rather than the
    # file: compose raises the containers' open-file limit (ulimits), a shell may not.
    warnings = [
        line
        for line in output.splitlines()
        if "[warn]" in line and "exceed open file resource limit" not in line
    ]
    assert not warnings, output


def nginx_directive(name: str) -> list[str]:
    """The arguments of the one `name` directive in deploy/nginx.conf."""
    [args] = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), flags=re.MULTILINE)
    return str(args).split()


def test_nginx_bounds_handshakes_no_looser_than_the_workers() -> None:
    # A slow or oversized request is cut at nginx as it would be at the worker (nginx
    # holds two sockets for every one it passes on).
    deadline = Settings().handshake_timeout
    for name in ("client_header_timeout", "client_body_timeout"):
        [value] = nginx_directive(name)
        assert seconds(value) <= deadline, f"{name} {value} is looser than HANDSHAKE_TIMEOUT"
    count, size = nginx_directive("large_client_header_buffers")
    assert size.endswith("k")
    line = int(size[:-1]) * 1024
    assert line <= MAX_LINE_BYTES
    assert int(count) * line <= MAX_HEAD_BYTES


# --- shell scripts ------------------------------------------------------------------


@pytest.mark.parametrize(
    "script",
    [WATCHER, *sorted((ROOT / "scripts").iterdir()), ROOT / ".ci" / "run"],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_shell_scripts_pass_shellcheck(script: Path) -> None:
    result = run(tool("shellcheck"), "--severity=style", str(script))
    assert result.returncode == 0, result.stdout + result.stderr
