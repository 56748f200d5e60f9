"""Settings: defaults, validation, .env.example and --help list every field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.helpers import hermetic_environment

ROOT = Path(__file__).resolve().parents[2]


def make(**values: object) -> Settings:
    return Settings.model_validate(values)


def test_defaults_are_a_single_worker_on_memory() -> None:
    settings = make()
    assert settings.broadcast_url == "memory://"
    assert settings.workers == 1
    assert settings.port == 8000
    assert settings.max_data_bytes < settings.max_frame_bytes
    assert settings.ws_per_message_deflate is False


def test_several_workers_on_memory_are_refused_with_the_reason() -> None:
    with pytest.raises(ValidationError, match="island"):
        make(workers=2)
    assert make(workers=4, broadcast_url="redis://127.0.0.1:6379/0").workers == 4


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis-stream://127.0.0.1:6379", "unsupported scheme"),
        ("postgres://localhost/db", "unsupported scheme"),
        ("127.0.0.1:6379", "unsupported scheme"),
        ("redis://", "needs a host"),
        ("redis://127.0.0.1:port/0", "malformed port"),
        ("redis://127.0.0.1:6379/zero", "must be a number"),
    ],
)
def test_malformed_backend_urls_are_clear_errors(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        make(broadcast_url=url)


def test_data_limit_must_fit_in_a_frame() -> None:
    with pytest.raises(ValidationError, match="smaller than MAX_FRAME_BYTES"):
        make(max_data_bytes=1000, max_frame_bytes=1000)


def test_prefix_grammar() -> None:
    assert make(redis_prefix="").redis_prefix == ""
    with pytest.raises(ValidationError):
        make(redis_prefix="has space")


def test_environment_variables_are_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROADCAST_URL", "redis://10.1.2.3:6380/2")
    monkeypatch.setenv("OUTBOX_MAX_MESSAGES", "7")
    settings = Settings()
    assert settings.broadcast_url == "redis://10.1.2.3:6380/2"
    assert settings.outbox_max_messages == 7


def test_passwords_are_redacted_for_logs() -> None:
    settings = make(broadcast_url="redis://:s3cret@redis:6379/0")
    assert "s3cret" not in settings.redacted_url()
    assert settings.redacted_url() == "redis://:***@redis:6379/0"


def test_env_example_lists_every_setting_with_its_default() -> None:
    text = (ROOT / ".env.example").read_text()
    entries = dict(re.findall(r"^([A-Z_]+)=(.*)$", text, flags=re.MULTILINE))
    defaults = make()
    for name, field in Settings.model_fields.items():
        assert name.upper() in entries, f"{name.upper()} missing from .env.example"
        assert field.description, f"{name} has no description"
        shown = entries[name.upper()]
        value = getattr(defaults, name)
        if isinstance(value, bool):
            expected = str(value).lower()
        elif isinstance(value, list):
            expected = json.dumps(value)
        else:
            expected = "" if value is None else str(value)
        assert shown == expected, f"{name.upper()}={shown} but the default is {expected}"
    assert set(entries) == {name.upper() for name in Settings.model_fields}


def test_help_lists_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--help"], capture_output=True, text=True, check=True
    )
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in result.stdout


def test_refuses_several_workers_on_memory_before_starting() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--workers", "2"],
        env=hermetic_environment(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "island" in result.stderr
    assert "Traceback" not in result.stderr


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name.upper()}` |" in readme, f"{name.upper()} missing from README"


def test_handover_keeps_every_secret_for_the_workers() -> None:
    secret, key, hook_key = "s" * 40, "k" * 20, "h" * 20
    settings = make(jwt_secret=secret, api_keys=[key], hook_api_key=hook_key)
    handed = Settings.model_validate_json(settings.handover_json())
    assert handed.jwt_secret is not None
    assert handed.jwt_secret.get_secret_value() == secret
    assert [k.get_secret_value() for k in handed.api_keys] == [key]
    assert handed.hook_api_key is not None
    assert handed.hook_api_key.get_secret_value() == hook_key


@pytest.mark.parametrize(
    "values",
    [
        {"hook_connect_url": "ftp://backend/connect"},
        {"hook_connect_url": "http:///no-host"},
        {"hook_publish_urls": {"chat:*": "backend/publish"}},
        {"hook_subscribe_urls": {"": "http://backend/subscribe"}},
    ],
)
def test_hook_urls_must_be_http_urls_with_a_host(values: dict[str, object]) -> None:
    with pytest.raises(ValidationError, match="hook"):
        make(**values)


def test_an_empty_hook_url_is_no_hook() -> None:
    assert make(hook_connect_url="", hook_api_key="").hook_connect_url is None
