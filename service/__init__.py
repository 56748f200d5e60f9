"""A horizontally scalable WebSocket broadcast service on FastAPI, broadcaster and Redis.

Inside a FastAPI app of your own (README, "Inside a FastAPI app"):

    from service import Realtime, Settings
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from service.auth import Principal
    from service.errors import Refused
    from service.hooks import Hooks
    from service.realtime import History, Message, Realtime
    from service.settings import Settings

# Imported on first use: `service.client` and the command line must not pay for FastAPI
# and redis-py to be loaded.
_EXPORTS = {
    "History": "service.realtime",
    "Hooks": "service.hooks",
    "Message": "service.realtime",
    "Principal": "service.auth",
    "Realtime": "service.realtime",
    "Refused": "service.errors",
    "Settings": "service.settings",
}

__all__ = [
    "History",
    "Hooks",
    "Message",
    "Principal",
    "Realtime",
    "Refused",
    "Settings",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'service' has no attribute {name!r}")
    return getattr(import_module(module), name)
