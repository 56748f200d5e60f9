"""`python -m service`: parse the settings and run uvicorn with one or more workers."""

from __future__ import annotations

import copy
import logging.config
import os
import sys
from typing import Any

import uvicorn
from uvicorn.config import LOGGING_CONFIG

from service import cli
from service.adapters import uvicorn as uvicorn_adapter

# Also named here for bench/worker.py and bench/floor.py, which run older checkouts'
# `service` too (`scripts/bench --compare`), where these lived in this module.
from service.command_line import check_backend as check_backend
from service.command_line import parse_settings as parse_settings
from service.settings import SETTINGS_ENV_VAR, Settings

APP_FACTORY = "service.app:create_app_from_environment"


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options a worker runs with (the tests start workers with these too)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "workers": settings.workers,
        "factory": True,
        "lifespan": "on",
        # `ws` and `http`: websockets-sansio and httptools subclassed for bounds and
        # speed, or uvicorn's own if the adapter's check fails (service/adapters/uvicorn.py).
        **uvicorn_adapter.uvicorn_options(settings),
        "ws_max_size": settings.max_frame_bytes,
        "ws_ping_interval": settings.ws_ping_interval,
        "ws_ping_timeout": settings.ws_ping_timeout,
        "ws_per_message_deflate": settings.ws_per_message_deflate,
        # Without it uvicorn waits for app tasks forever on SIGTERM.
        "timeout_graceful_shutdown": settings.shutdown_timeout,
        "log_level": settings.log_level,
        "log_config": _log_config(settings),
        # X-Forwarded-For/-Proto are believed only from the load balancer's addresses.
        "proxy_headers": True,
        "forwarded_allow_ips": settings.forwarded_allow_ips,
    }


def _log_config(settings: Settings) -> dict[str, Any]:
    config = copy.deepcopy(LOGGING_CONFIG)
    # On the handlers, so that they see every record, whichever logger made it.
    filters = config.setdefault("filters", {})
    filters["redact_secrets"] = {"()": "service.logs.RedactSecrets"}
    filters["worker"] = {"()": "service.logs.WorkerName", "configured": settings.worker_id}
    for handler in config["handlers"].values():
        handler.setdefault("filters", []).extend(["worker", "redact_secrets"])
    # When it was and which worker said it: several share a terminal or a log stream.
    for formatter in config["formatters"].values():
        level, _, rest = formatter["fmt"].partition(" ")
        formatter["fmt"] = f"%(asctime)s {level} [%(worker)s] {rest}"
    config["loggers"]["service"] = {
        "handlers": ["default"],
        "level": settings.log_level.upper(),
        "propagate": False,
    }
    return config


def main(argv: list[str] | None = None) -> None:
    """Entry point of `python -m service` and `broadcast-service`.

    `token` and `check` as the first argument are the commands of service/cli.py.
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in cli.COMMANDS:
        cli.main(argv[0], argv[1:])
        return
    settings = parse_settings(argv)
    check_backend(settings)
    # uvicorn's worker processes import the app anew: hand them the parsed settings.
    os.environ[SETTINGS_ENV_VAR] = settings.handover_json()
    # Configured before uvicorn does it again, so that what `uvicorn_options` may log
    # (why the uvicorn adapter is off) looks like every other line.
    logging.config.dictConfig(_log_config(settings))
    uvicorn.run(APP_FACTORY, **uvicorn_options(settings))


if __name__ == "__main__":
    main()
