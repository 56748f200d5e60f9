"""`create_app(settings)`: the FastAPI application of one worker, and its lifespan."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware

from service import __version__
from service.adapters.uvicorn import adapter_ready
from service.api import demo, health, http, ws
from service.auth import ApiKeys, Authenticator
from service.broker import Broker
from service.errors import BrokerUnavailable, OutcomeUnknown, ProtocolError, Unauthorized
from service.hub import Hub
from service.limits import ConnectionSlots
from service.metrics import Metrics
from service.outbox import OutboxLimits
from service.protocol.codes import ErrorCode
from service.protocol.commands import Limits
from service.risks import open_doors
from service.runtime import Runtime
from service.settings import SETTINGS_ENV_VAR, Settings

logger = logging.getLogger(__name__)

_PROTOCOL_ERROR_STATUS = {ErrorCode.MESSAGE_TOO_LARGE: 413}
# Seconds a client should wait before publishing again after a 503 or 504.
_RETRY_AFTER_SECONDS = "1"


def create_app(settings: Settings) -> ws.WebSocketEndpoints:
    """Build a worker's app; Redis is connected in its lifespan, not here.

    The WebSocket endpoints sit in front of the FastAPI app (service/api/ws.py), which
    serves everything else, the lifespan included.
    """
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker_id = settings.resolved_worker_id()
        async with Broker(settings, worker_id) as broker:
            hub = Hub(
                broker,
                linger=settings.channel_linger,
                catchup_frames=settings.outbox_max_messages,
                catchup_chars=settings.outbox_max_bytes,
                fanout_chunk=settings.fanout_chunk,
                on_fanout=metrics.delivered,
            )
            metrics.watch(hub, broker)
            app.state.runtime = Runtime(
                settings=settings,
                broker=broker,
                hub=hub,
                metrics=metrics,
                worker_id=worker_id,
                limits=Limits(settings.max_channel_length, settings.max_data_bytes),
                outbox_limits=OutboxLimits(settings.outbox_max_messages, settings.outbox_max_bytes),
                authenticator=Authenticator(settings),
                api_keys=ApiKeys(settings.api_keys),
                slots=ConnectionSlots(settings.max_connections),
            )
            for door in open_doors(settings):
                logger.warning("%s", door)
            if settings.fast_adapters:
                adapter_ready()  # checked now rather than at the first connection
            else:
                logger.info("FAST_ADAPTERS=false: public API paths only (slower, same behaviour)")
            logger.info(
                "worker %s ready to serve, backend %s, prefix %r",
                worker_id,
                settings.redacted_url(),
                settings.redis_prefix,
            )
            try:
                yield
            finally:
                await hub.close()

    # With auth on, the API's description is not for anonymous visitors.
    private = settings.auth_enabled
    app = FastAPI(
        title="broadcast-service",
        version=__version__,
        lifespan=lifespan,
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

    @app.exception_handler(ProtocolError)
    async def protocol_error(request: Request, exc: ProtocolError) -> JSONResponse:
        status = _PROTOCOL_ERROR_STATUS.get(exc.code, 400)
        # `invalid_frame` is the WebSocket's word; over HTTP it is `invalid_request`.
        code = ErrorCode.INVALID_REQUEST if exc.code is ErrorCode.INVALID_FRAME else exc.code
        return JSONResponse({"error": code.value, "message": exc.message}, status_code=status)

    # A query parameter FastAPI could not parse (`limit=abc`): a 400 like any bad request,
    # not FastAPI's 422 (which the OpenAPI schema then does not document either).
    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = http.validation_error_message(exc.errors())
        return JSONResponse(
            {"error": ErrorCode.INVALID_REQUEST.value, "message": message}, status_code=400
        )

    http.drop_validation_errors_from_openapi(app)

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, exc: Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"error": exc.code.value, "message": exc.message},
            status_code=401,
            headers={"WWW-Authenticate": "X-API-Key"},
        )

    @app.exception_handler(BrokerUnavailable)
    async def broker_unavailable(request: Request, exc: BrokerUnavailable) -> JSONResponse:
        return JSONResponse(
            {"error": exc.code.value, "message": f"{exc.message}; retry later"},
            status_code=503,
            headers={"Retry-After": _RETRY_AFTER_SECONDS},
        )

    # Starlette picks the handler of the closest class, so this one wins over the above.
    @app.exception_handler(OutcomeUnknown)
    async def outcome_unknown(request: Request, exc: OutcomeUnknown) -> JSONResponse:
        # 504, not 503: Redis (the upstream) took the publish and did not answer in time,
        # so unlike a 503 this does not say that nothing was done; the message says how
        # to retry safely.
        return JSONResponse(
            {"error": exc.code.value, "message": exc.message},
            status_code=504,
            headers={"Retry-After": _RETRY_AFTER_SECONDS},
        )

    return ws.WebSocketEndpoints(app)


def create_app_from_environment() -> ws.WebSocketEndpoints:
    """Factory for uvicorn: settings handed over by `python -m service`, else from the env."""
    handed_over = os.environ.get(SETTINGS_ENV_VAR)
    settings = Settings.model_validate_json(handed_over) if handed_over else Settings()
    return create_app(settings)
