"""The npm package broadcast-service-client (service/static, the same client.js the
workers serve), checked as npm users get it.

* Its own tests (clients/js/test, Node's built-in runner) against real workers and a
  real redis-server started here: they import the package by name, and one of them
  packs it, installs the tarball in a fresh project and makes a round trip from there.
* Its hand-written types (client.d.ts): `tsc --strict` over a sample that uses every
  option, method, property and event, and rejects a sample that misuses one, so that
  the check is seen to be able to fail.
* Its version is the Python package's.

Node and the packages of clients/js (typescript, ws) come from scripts/bootstrap.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import WorkerFactory
from tests.helpers import UNIT, RedisServer, hermetic_environment, redis_args, unique

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "service" / "static"
TESTS = REPO / "clients" / "js"
TSC = TESTS / "node_modules" / ".bin" / "tsc"


def node_project() -> None:
    """Fail with what to do when Node or the test project's packages are missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed: scripts/bootstrap installs them")
    if not TSC.exists() or not (TESTS / "node_modules" / "ws").is_dir():
        pytest.fail("clients/js has no node_modules: run scripts/bootstrap (npm ci there)")


def run(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run a command to its end (bounded), with its output captured."""
    return subprocess.run(
        args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout * UNIT,
        check=False,
    )


def test_the_package_version_is_the_python_packages() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    manifest = json.loads((PACKAGE / "package.json").read_text("utf-8"))
    assert manifest["name"] == "broadcast-service-client"
    assert manifest["version"] == pyproject["project"]["version"]
    # The tarball's name, as the docs show it, is that version's.
    tarball = f"broadcast-service-client-{manifest['version']}.tgz"
    for doc in ("README.md", "docs/clients.md", "service/static/README.md"):
        text = (REPO / doc).read_text("utf-8")
        shown = set(re.findall(r"broadcast-service-client-[\w.<>-]+?\.tgz", text))
        assert shown, doc
        assert shown <= {tarball, "broadcast-service-client-<version>.tgz"}, (doc, shown)


def test_the_node_tests_pass_against_a_real_worker(
    make_worker: WorkerFactory, redis_server: RedisServer, prefix: str
) -> None:
    node_project()
    worker = make_worker(*redis_args(redis_server, prefix))
    # For `lost`: a worker that keeps no history, so that a missed message is lost.
    amnesic = make_worker(*redis_args(redis_server, unique("t") + ":"), env={"HISTORY_SIZE": "0"})
    env = {
        **hermetic_environment(),
        "BROADCAST_URL_HTTP": worker.http,
        "BROADCAST_URL_WS": worker.ws + "/ws",
        "BROADCAST_URL_HTTP_NO_HISTORY": amnesic.http,
        "BROADCAST_URL_WS_NO_HISTORY": amnesic.ws + "/ws",
        "TEST_TIME_UNIT": str(UNIT),
    }
    result = run(["node", "--test", "test/"], TESTS, env, timeout=240)
    assert result.returncode == 0, (
        f"node --test failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    )
    assert "# fail 0" in result.stdout, result.stdout


@pytest.mark.parametrize(
    "tsconfig",
    [
        "tsconfig.json",  # every option, method, property and event, with the DOM library
        "tsconfig.node.json",  # a Node project: @types/node instead of the DOM library
    ],
)
def test_the_types_check_against_the_samples(tsconfig: str) -> None:
    node_project()
    result = run([str(TSC), "--noEmit", "--strict", "-p", tsconfig], TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_type_check_fails_on_a_misuse(tmp_path: Path) -> None:
    node_project()
    (tmp_path / "wrong.ts").write_text(
        'import { BroadcastClient } from "broadcast-service-client";\n'
        'const client = new BroadcastClient("ws://example.com/ws");\n'
        # `channel`, misspelt: a message's detail has no such field.
        'client.addEventListener("message", (e) => console.log(e.detail.chanel));\n',
        "utf-8",
    )
    tsconfig = {
        "compilerOptions": {
            "strict": True,
            "noEmit": True,
            "target": "ES2022",
            "module": "ESNext",
            "moduleResolution": "Bundler",
            "lib": ["ES2022", "DOM"],
            "types": [],
            "paths": {"broadcast-service-client": [str(PACKAGE / "client.d.ts")]},
        },
        "files": ["wrong.ts"],
    }
    (tmp_path / "tsconfig.json").write_text(json.dumps(tsconfig), "utf-8")
    result = run([str(TSC), "-p", "tsconfig.json"], tmp_path)
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Property 'chanel' does not exist" in result.stdout, result.stdout + result.stderr
    # The same file, spelt right, passes: the failure was the misuse, not the setup.
    wrong = (tmp_path / "wrong.ts").read_text("utf-8")
    (tmp_path / "wrong.ts").write_text(wrong.replace("chanel", "channel"), "utf-8")
    fixed = run([str(TSC), "-p", "tsconfig.json"], tmp_path)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr


def test_npm_pack_lists_only_the_package_files() -> None:
    node_project()
    result = run(["npm", "pack", "--dry-run", "--json", str(PACKAGE)], REPO)
    assert result.returncode == 0, result.stderr
    [packed] = json.loads(result.stdout)
    files = sorted(entry["path"] for entry in packed["files"])
    assert files == ["README.md", "client.d.ts", "client.js", "package.json"]


def test_the_wheel_still_serves_the_client() -> None:
    """setuptools' package data (`static/*`) takes in the package's files too."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text("utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["service"]
    assert "static/*" in patterns
    assert (PACKAGE / "client.js").is_file()
    # npm pack would not follow a link, and the wheel would hold what it points to.
    assert not any(path.is_symlink() for path in PACKAGE.iterdir())
