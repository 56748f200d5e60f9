"""`python -m service token` and `python -m service check`: development helpers.

Both read the settings exactly as the server does (flags, environment, `.env` in the
current directory), through `service.command_line.parse_settings`.

    token   prints a JWT the service accepts, signed with the configured key
    check   says what is wrong (exit 1) or risky (printed; exit 0, or 3 with --strict)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.auth.tokens import Authenticator, InvalidToken, mint
from service.command_line import check_backend, parse_settings
from service.risks import risks
from service.settings import Settings

COMMANDS = ("token", "check")

#: `check --strict` exits with this when the settings are valid but risky.
EXIT_RISKY = 3

_GENERATE_SECRET = "python3 -c 'import secrets; print(secrets.token_urlsafe(64))'"


def main(command: str, argv: list[str]) -> None:
    """Run `command` (one of COMMANDS) with the arguments after it."""
    if command == "token":
        token_command(argv)
    else:
        check_command(argv)


def _settings(argv: list[str]) -> Settings:
    settings = parse_settings(argv)
    check_backend(settings)
    return settings


def token_command(argv: list[str]) -> None:
    """`python -m service token --sub alice --subscribe 'chat:*' --publish 'chat:*'`."""
    parser = argparse.ArgumentParser(
        prog="python -m service token",
        description=(
            "Print a JWT the service accepts, signed with its JWT_SECRET (or with "
            "--private-key-file when it verifies with JWT_PUBLIC_KEY_FILE). Settings come "
            "from the environment and .env as for the server; any server flag "
            "(e.g. --jwt-secret) may follow. For development: in production your backend "
            "signs tokens (docs/security.md)."
        ),
    )
    parser.add_argument("--sub", required=True, help="the subject: who the client is")
    parser.add_argument(
        "--subscribe",
        action="append",
        default=[],
        metavar="PATTERN",
        help="channel pattern it may subscribe to (`*` is a wildcard); repeatable",
    )
    parser.add_argument(
        "--publish",
        action="append",
        default=[],
        metavar="PATTERN",
        help="channel pattern it may publish to; repeatable",
    )
    parser.add_argument(
        "--ttl", type=float, default=3600.0, help="seconds until it expires (default 3600)"
    )
    parser.add_argument(
        "--private-key-file",
        type=Path,
        help="PEM private key, needed when the service is set up with JWT_PUBLIC_KEY_FILE",
    )
    args, rest = parser.parse_known_args(argv)
    settings = _settings(rest)
    if not settings.jwt_enabled:
        sys.exit(
            "error: no JWT_SECRET (or JWT_PUBLIC_KEY_FILE) is set, so the service accepts no "
            "tokens. Generate a secret and set it where the service reads it, e.g.\n"
            f'  echo "JWT_SECRET=$({_GENERATE_SECRET})" >> .env\n'
            "then restart the service and run this command again (in the same directory)."
        )
    private_key = None
    if settings.jwt_public_key_file is not None:
        if args.private_key_file is None:
            sys.exit(
                f"error: the service verifies tokens with JWT_PUBLIC_KEY_FILE "
                f"({settings.jwt_public_key_file}): pass the matching private key with "
                "--private-key-file PATH"
            )
        try:
            private_key = args.private_key_file.read_text()
        except OSError as exc:
            sys.exit(f"error: --private-key-file: {exc}")
    elif args.private_key_file is not None:
        sys.exit("error: --private-key-file is for JWT_PUBLIC_KEY_FILE; JWT_SECRET is set")
    try:
        token = mint(
            settings,
            args.sub,
            subscribe=args.subscribe,
            publish=args.publish,
            ttl=args.ttl,
            private_key=private_key,
        )
        # The service's own verifier: a key that does not match the public key, or an
        # algorithm mix-up, is reported here rather than as a refused handshake.
        Authenticator(settings).authenticate(token)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    except InvalidToken as exc:
        sys.exit(
            f"error: the service would refuse this token ({exc.reason}): does "
            "--private-key-file match JWT_PUBLIC_KEY_FILE?"
        )
    print(token)


def check_command(argv: list[str]) -> None:
    """`python -m service check [--strict] [server flags]`."""
    strict = "--strict" in argv
    argv = [arg for arg in argv if arg != "--strict"]
    if "-h" in argv or "--help" in argv:
        print(
            "usage: python -m service check [--strict] [server flags]\n\n"
            "Validate the settings as the server would (flags, environment, .env) and\n"
            "list what is risky. Exit 1 if invalid; risky settings are printed as\n"
            f"warnings and exit 0, or {EXIT_RISKY} with --strict."
        )
        return
    settings = _settings(argv)
    warnings = risks(settings)
    workers = f"{settings.workers} worker{'s' if settings.workers > 1 else ''}"
    auth = "on" if settings.auth_enabled else "OFF"
    print(f"settings are valid: backend {settings.redacted_url()}, {workers}, auth {auth}")
    for warning in warnings:
        print(f"warning: {warning}")
    if not warnings:
        print("no warnings")
    if warnings and strict:
        sys.exit(EXIT_RISKY)
