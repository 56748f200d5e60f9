"""`python -m service token` and `check`: tokens the service's own verifier accepts, and
what the commands say when something is wrong or risky."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from service.__main__ import main
from service.auth.tokens import Authenticator, mint
from service.cli import EXIT_RISKY
from service.settings import Settings

SECRET = "s" * 64
API_KEY = "k" * 40


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """`python -m service *argv`, in this process: exit code, stdout, stderr."""
    code = 0
    try:
        main(list(argv))
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            code = 1
        else:
            code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_token_round_trips_through_the_services_verifier(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    code, out, _ = run(
        capsys,
        *("token", "--sub", "alice", "--subscribe", "chat:*", "--subscribe", "news"),
        *("--publish", "chat:*", "--ttl", "60"),
    )
    assert code == 0
    token = out.strip()
    principal = Authenticator(Settings()).authenticate(token)
    assert principal.subject == "alice"
    assert principal.subscribe == ("chat:*", "news")
    assert principal.publish == ("chat:*",)
    assert principal.expires_at is not None
    assert 50 < principal.expires_at - time.time() <= 60
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["channels"] == {"subscribe": ["chat:*", "news"], "publish": ["chat:*"]}


def test_token_reads_dotenv_and_flags_like_the_server(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    # The autouse fixture runs every test in its own tmp_path: .env here is read.
    (tmp_path / ".env").write_text(f"JWT_SECRET={SECRET}\nJWT_AUDIENCE=chat-app\n")
    code, out, _ = run(capsys, "token", "--sub", "bob", "--jwt-issuer", "https://id.example")
    assert code == 0
    claims = jwt.decode(
        out.strip(),
        SECRET,
        algorithms=["HS256"],
        audience="chat-app",
        issuer="https://id.example",
    )
    assert claims["sub"] == "bob"
    assert claims["channels"] == {"subscribe": [], "publish": []}


def test_token_without_a_secret_says_how_to_set_one(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "token", "--sub", "alice")
    assert code == 1
    assert out == ""
    assert "no JWT_SECRET" in err
    assert "secrets.token_urlsafe(64)" in err
    assert ".env" in err


def test_token_with_invalid_settings_reports_them(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", "short")
    code, _, err = run(capsys, "token", "--sub", "alice")
    assert code == 1
    assert "invalid settings" in err
    assert "JWT_SECRET" in err


@pytest.mark.parametrize(("args", "expected"), [(("--ttl", "0"), "ttl"), (("--sub", ""), "sub")])
def test_token_refuses_nonsense(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    args: tuple[str, ...],
    expected: str,
) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    code, _, err = run(capsys, "token", "--sub", "alice", *args)
    assert code == 1
    assert expected in err


def _ec_pair(tmp_path: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    private = tmp_path / f"{name}.key"
    public = tmp_path / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


def test_token_with_a_public_key_needs_the_private_key(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    private, public = _ec_pair(tmp_path, "right")
    other, _ = _ec_pair(tmp_path, "wrong")
    monkeypatch.setenv("JWT_PUBLIC_KEY_FILE", str(public))
    monkeypatch.setenv("JWT_ALGORITHMS", '["ES256"]')

    code, _, err = run(capsys, "token", "--sub", "alice")
    assert code == 1
    assert "--private-key-file" in err
    assert "JWT_PUBLIC_KEY_FILE" in err

    code, _, err = run(capsys, "token", "--sub", "alice", "--private-key-file", str(other))
    assert code == 1
    assert "would refuse" in err

    code, out, _ = run(
        capsys, "token", "--sub", "alice", "--publish", "x:*", "--private-key-file", str(private)
    )
    assert code == 0
    assert Authenticator(Settings()).authenticate(out.strip()).publish == ("x:*",)


def test_mint_refuses_without_a_key() -> None:
    with pytest.raises(ValueError, match="no JWT_SECRET"):
        mint(Settings(), "alice", subscribe=[], publish=[], ttl=60)


def test_check_with_defaults_warns_that_auth_is_off(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check")
    assert code == 0
    assert "settings are valid" in out
    assert "auth OFF" in out
    assert "warning: AUTH IS OFF" in out


def test_check_strict_fails_on_warnings(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--strict")
    assert code == EXIT_RISKY
    assert "warning:" in out


def test_check_of_a_secured_service_is_quiet(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("API_KEYS", f'["{API_KEY}"]')
    code, out, _ = run(capsys, "check", "--strict")
    assert code == 0
    assert "auth on" in out
    assert "no warnings" in out
    assert "warning:" not in out


def test_check_lists_the_risky_settings(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("JWT_SECRET", SECRET)
    monkeypatch.setenv("ALLOWED_ORIGINS", '["*"]')
    monkeypatch.setenv("ANONYMOUS_PUBLISH", '["lobby"]')
    monkeypatch.setenv("ANONYMOUS_SUBSCRIBE", '["*"]')
    code, out, _ = run(capsys, "check")
    assert code == 0
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 4, out
    assert "no API_KEYS" in warnings[0]  # the worker's own start-up warning
    assert "ALLOWED_ORIGINS" in warnings[1]
    assert "ANONYMOUS_PUBLISH" in warnings[2]
    assert "ANONYMOUS_SUBSCRIBE" in warnings[3]


def test_check_warns_of_an_open_service_on_every_interface(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, _ = run(capsys, "check", "--host", "0.0.0.0")
    assert code == 0
    assert "HOST=0.0.0.0 with auth off" in out


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("--workers", "2"), "memory:// cannot be shared"),
        (("--broadcast-url", "redis://:bad:port/x"), "broadcast_url"),
        (("--api-keys", '["short"]'), "API_KEYS"),
    ],
)
def test_check_reports_invalid_settings(
    capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], expected: str
) -> None:
    code, out, err = run(capsys, "check", *argv)
    assert code == 1
    assert out == ""
    assert "invalid settings" in err
    assert expected in err


def test_check_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check", "--help")
    assert code == 0
    assert "--strict" in out
