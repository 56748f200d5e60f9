"""A worker as `python -m service` starts it, with some of uvicorn's options replaced.

For comparing uvicorn's WebSocket implementations, event loops and HTTP parsers by
measurement (`python -m bench --uvicorn ws=wsproto`), without making them settings
of the service: it is tested with websockets-sansio, uvloop and httptools only.

    python -m bench.worker '<uvicorn options as JSON>' [service flags...]
"""

from __future__ import annotations

import json
import os
import sys

import uvicorn

from service.__main__ import APP_FACTORY, check_backend, parse_settings, uvicorn_options
from service.settings import SETTINGS_ENV_VAR


def main() -> None:
    """Run one worker with the given uvicorn options on top of the service's own."""
    overrides = json.loads(sys.argv[1])
    settings = parse_settings(sys.argv[2:])
    check_backend(settings)
    os.environ[SETTINGS_ENV_VAR] = settings.handover_json()
    uvicorn.run(APP_FACTORY, **{**uvicorn_options(settings), **overrides})


if __name__ == "__main__":
    main()
