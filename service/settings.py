"""Every setting of the service, in one pydantic-settings class.

Values come from (highest first) command-line flags, environment variables and a
`.env` file. `Settings` is built once by the entry point and passed down; nothing
reads it at import time. `.env.example` lists every field (a unit test checks it).
"""

from __future__ import annotations

import os
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, PositiveFloat, PositiveInt, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

#: Environment variable through which the entry point hands the parsed settings to
#: uvicorn's worker processes (they import the app anew and cannot see our argv).
SETTINGS_ENV_VAR = "BROADCAST_SERVICE_SETTINGS_JSON"

_BACKEND_SCHEMES = ("memory", "redis", "rediss")

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    """Configuration of a broadcast worker (and of the process that starts the workers)."""

    model_config = SettingsConfigDict(
        env_file=".env",
        extra="ignore",
        frozen=True,
        cli_prog_name="python -m service",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        use_attribute_docstrings=False,
    )

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="TCP port.")
    workers: PositiveInt = Field(
        1, description="Worker processes. More than one needs a shared Redis backend."
    )
    broadcast_url: str = Field(
        "memory://",
        description=(
            "Pub/sub backend: memory:// (one process only) or redis://[:password@]host:port/db "
            "(rediss:// for TLS)."
        ),
    )
    redis_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:\-]{0,64}$")] = Field(
        "broadcast:",
        description=(
            "Prefix of every Redis channel and key. Redis pub/sub ignores the database "
            "number, so two deployments sharing one Redis need different prefixes."
        ),
    )
    worker_id: str = Field(
        "", description="Name this worker reports to clients. Empty: hostname:pid."
    )
    max_channel_length: Annotated[int, Field(ge=1, le=1024)] = Field(
        128, description="Longest channel name accepted, in characters."
    )
    max_data_bytes: PositiveInt = Field(
        32_768, description="Largest `data` of one message, in bytes of JSON."
    )
    max_frame_bytes: PositiveInt = Field(
        65_536,
        description="Largest WebSocket frame a client may send; larger frames close with 1009.",
    )
    outbox_max_messages: PositiveInt = Field(
        1_000,
        description="Frames queued for one client before it is closed as a slow consumer (1013).",
    )
    outbox_max_bytes: PositiveInt = Field(
        1_048_576,
        description="Characters queued for one client before it is closed as a slow consumer.",
    )
    history_size: Annotated[int, Field(ge=0, le=100_000)] = Field(
        100,
        description=(
            "Messages kept per channel for clients that resume with `since` (Redis trims "
            "approximately, keeping up to about 100 more). 0 turns history off."
        ),
    )
    history_ttl: PositiveInt = Field(
        300, description="Seconds a channel's history is kept after its last message."
    )
    history_meta_ttl: PositiveInt = Field(
        604_800,
        description=(
            "Seconds a channel's id counter and epoch are kept after it was last used; past "
            "that its ids start a new epoch and older ids no longer resume."
        ),
    )
    ws_ping_interval: PositiveFloat = Field(
        20.0, description="Seconds between server pings to each client."
    )
    ws_ping_timeout: PositiveFloat = Field(
        20.0, description="Seconds a client has to answer a ping before it is dropped."
    )
    ws_per_message_deflate: bool = Field(
        False,
        description="Accept per-message compression. Costs CPU and memory per connection.",
    )
    channel_linger: Annotated[float, Field(ge=0)] = Field(
        1.0,
        description=(
            "Seconds a worker keeps its Redis subscription to a channel after the last "
            "local subscriber left (cheap re-subscription on reconnect storms)."
        ),
    )
    broker_timeout: PositiveFloat = Field(
        5.0,
        description="Seconds to wait for Redis to connect, answer, or confirm a subscription.",
    )
    redis_ping_interval: PositiveFloat = Field(
        1.0, description="Seconds of silence on the subscription connection before it is pinged."
    )
    redis_ping_timeout: PositiveFloat = Field(
        3.0,
        description="Seconds of silence after a ping before the pub/sub connection is rebuilt.",
    )
    canary_interval: PositiveFloat = Field(
        5.0,
        description="Seconds between checks that the worker still hears its own Redis messages.",
    )
    canary_timeout: PositiveFloat = Field(
        3.0, description="Seconds to hear the check back before the worker counts as deaf."
    )
    redis_retry_max_delay: PositiveFloat = Field(
        2.0, description="Longest pause between two attempts to reconnect to Redis."
    )
    shutdown_timeout: PositiveFloat = Field(
        10.0, description="Seconds a worker waits for its connections to end on SIGTERM."
    )
    log_level: LogLevel = Field("info", description="Log level.")
    demo_page: bool = Field(True, description="Serve the demo chat page at /.")

    @field_validator("broadcast_url")
    @classmethod
    def _check_broadcast_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in _BACKEND_SCHEMES:
            raise ValueError(
                f"unsupported scheme {parts.scheme!r} in BROADCAST_URL; use one of "
                + ", ".join(f"{scheme}://" for scheme in _BACKEND_SCHEMES)
            )
        if parts.scheme != "memory":
            if not parts.hostname:
                raise ValueError("BROADCAST_URL needs a host, e.g. redis://127.0.0.1:6379/0")
            try:
                parts.port  # noqa: B018  (raises ValueError on a malformed port)
            except ValueError:
                raise ValueError(f"BROADCAST_URL has a malformed port: {value!r}") from None
            db = parts.path.lstrip("/")
            if db and not db.isdigit():
                raise ValueError(f"BROADCAST_URL database must be a number, got {db!r}")
        return value

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        if self.workers > 1 and self.backend_scheme == "memory":
            raise ValueError(
                "memory:// cannot be shared between processes: with several workers each "
                "would be an island that hears only its own clients. Set BROADCAST_URL to a "
                "Redis URL (e.g. redis://127.0.0.1:6379/0) or use --workers 1."
            )
        if self.max_data_bytes >= self.max_frame_bytes:
            raise ValueError(
                "MAX_DATA_BYTES must be smaller than MAX_FRAME_BYTES so that a frame "
                "carrying the largest allowed data still fits"
            )
        if self.history_meta_ttl < self.history_ttl:
            raise ValueError(
                "HISTORY_META_TTL must be at least HISTORY_TTL: the ids of kept messages must "
                "stay valid as long as the messages"
            )
        return self

    @property
    def backend_scheme(self) -> str:
        """Scheme of `broadcast_url` (memory, redis or rediss)."""
        return urlsplit(self.broadcast_url).scheme

    def resolved_worker_id(self) -> str:
        """The worker name clients see: the configured one, or hostname:pid."""
        return self.worker_id or f"{os.uname().nodename}:{os.getpid()}"

    def redacted_url(self) -> str:
        """`broadcast_url` with any password replaced, for logs."""
        parts = urlsplit(self.broadcast_url)
        if parts.password is None:
            return self.broadcast_url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return parts._replace(netloc=netloc).geturl()
