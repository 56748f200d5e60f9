"""The settings as the command line gives them: flags, environment and .env, checked.

Shared by `python -m service` and its `token` and `check` commands (service/cli.py).
"""

from __future__ import annotations

import sys

from pydantic import ValidationError
from pydantic_settings import CliApp, SettingsError

from service.broker import check_redis_url
from service.settings import Settings


def parse_settings(argv: list[str]) -> Settings:
    """Settings from flags, environment and .env; exits with a readable message if invalid."""
    try:
        return CliApp.run(Settings, cli_args=argv)
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        ]
        sys.exit("error: invalid settings\n" + "\n".join(lines))
    except SettingsError as exc:
        sys.exit(f"error: {exc}")


def check_backend(settings: Settings) -> None:
    """Exit with a readable message if redis-py cannot use `broadcast_url`."""
    if settings.backend_scheme == "memory":
        return
    try:
        check_redis_url(settings.broadcast_url)
    except ValueError as exc:
        sys.exit(f"error: invalid settings\n  broadcast_url: {exc}")
