"""`create_app(settings)`: the FastAPI application of one worker, and its lifespan."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from service import __version__
from service.api import demo, health, http, ws
from service.realtime import Realtime
from service.settings import SETTINGS_ENV_VAR, Settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> ws.WebSocketEndpoints:
    """Build a standalone worker's app; Redis is connected in its lifespan, not here.

    The WebSocket endpoints sit in front of the FastAPI app (service/api/ws.py), which
    serves everything else, the lifespan included. To put the service inside an app of
    your own, include `Realtime(settings).router` instead (service/realtime.py).
    """
    realtime = Realtime(settings)
    # With auth on, the API's description is not for anonymous visitors.
    private = settings.auth_enabled
    app = FastAPI(
        title="broadcast-service",
        version=__version__,
        lifespan=realtime.lifespan,
        docs_url=None if private else "/docs",
        redoc_url=None if private else "/redoc",
        openapi_url=None if private else "/openapi.json",
    )
    app.include_router(http.router)
    app.include_router(health.router)
    if settings.demo_page:
        app.include_router(demo.router)
    # The browser client is imported by apps on other origins (a dev server, the app's
    # own domain): the same origins that may open a WebSocket may load it.
    static = CORSMiddleware(
        StaticFiles(packages=[("service", "static")]),
        allow_origins=settings.allowed_origins,
        allow_methods=["GET", "HEAD"],
    )
    app.mount("/static", static, name="static")

    # The routes answer our errors themselves (service/api/errors.py).
    http.drop_validation_errors_from_openapi(app)

    return ws.WebSocketEndpoints(app, realtime.identify)


def create_app_from_environment() -> ws.WebSocketEndpoints:
    """Factory for uvicorn: settings handed over by `python -m service`, else from the env."""
    handed_over = os.environ.get(SETTINGS_ENV_VAR)
    settings = Settings.model_validate_json(handed_over) if handed_over else Settings()
    return create_app(settings)
