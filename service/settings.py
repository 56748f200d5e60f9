"""Every setting of the service, in one pydantic-settings class.

Values come from (highest first) command-line flags, environment variables and a
`.env` file. `Settings` is built once by the entry point and passed down; nothing
reads it at import time. `.env.example` lists every field (a unit test checks it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.cluster_url import CLUSTER_SCHEMES, parse_cluster_url
from service.sentinel_url import SENTINEL_SCHEMES, parse_sentinel_url

#: Environment variable through which the entry point hands the parsed settings to
#: uvicorn's worker processes (they import the app anew and cannot see our argv).
SETTINGS_ENV_VAR = "BROADCAST_SERVICE_SETTINGS_JSON"

_BACKEND_SCHEMES = ("memory", "redis", "rediss", *SENTINEL_SCHEMES, *CLUSTER_SCHEMES)

LogLevel = Literal["critical", "error", "warning", "info", "debug"]

#: Algorithms a token may be signed with, by the kind of key that verifies them.
#: `none` is not among them, whatever the settings say.
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_KEY_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)

#: Secrets copied from examples and tutorials: refused outside development.
PLACEHOLDER_SECRETS = frozenset(
    {
        "changeme",
        "change-me",
        "secret",
        "your-secret-key",
        "your-256-bit-secret",  # jwt.io's example
        "dev-secret-do-not-use-in-production-0123456789",  # the compose demo's
    }
)
# Bytes an HMAC secret needs: the hash's size (RFC 7518 3.2; PyJWT warns below it).
_MIN_SECRET_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
_MIN_API_KEY_LENGTH = 16
_MIN_RSA_BITS = 2048
# Which public-key algorithms each kind of key verifies.
_KEY_ALGORITHMS = {
    "RSA": {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"},
    "EC": {"ES256", "ES384", "ES512"},
    "Ed": {"EdDSA"},
}


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
        # Validation errors must not print the secrets they were given.
        hide_input_in_errors=True,
    )

    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: Annotated[int, Field(ge=0, le=65535)] = Field(8000, description="TCP port.")
    workers: PositiveInt = Field(
        1, description="Worker processes. More than one needs a shared Redis backend."
    )
    broadcast_url: str = Field(
        "memory://",
        description=(
            "Pub/sub backend: memory:// (one process only), redis://[:password@]host:port/db "
            "(rediss:// for TLS), redis+sentinel://host:26379,.../<service>[/db] or "
            "redis-cluster://host:6379,host:6379,... (rediss+sentinel://, rediss-cluster://)."
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
    fanout_chunk: PositiveInt = Field(
        1_000,
        description=(
            "Local subscribers a message is handed to per turn of the event loop; a "
            "bigger channel gets it in chunks, so that it does not stall the worker."
        ),
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
    idempotency_ttl: PositiveInt = Field(
        300,
        description=(
            "Seconds a publish's idempotency key (Idempotency-Key header, `idempotency_key` "
            "field) is remembered per channel: a publish with the same key within it "
            "publishes nothing and gets the first id. Redis keeps it at least "
            "2 x BROKER_TIMEOUT + 10 s, as long as the publish itself may be retried."
        ),
    )
    ws_ping_interval: PositiveFloat = Field(
        20.0, description="Seconds between server pings to each client."
    )
    ws_ping_timeout: PositiveFloat = Field(
        20.0, description="Seconds a client has to answer a ping before it is dropped."
    )
    ws_close_timeout: PositiveFloat = Field(
        20.0,
        description=(
            "Seconds a closing connection gets to take its last frames and the close "
            "frame; then its socket is dropped (a client that never reads holds nothing)."
        ),
    )
    fast_adapters: bool = Field(
        True,
        description=(
            "Use the adapters that reach into uvicorn and redis-py for speed (frames "
            "written straight to the socket, messages taken from inside the read, Redis "
            "replies parsed in C from inside the read). Each checks the installed library "
            "at start-up and falls back to the public API by itself; false takes the public "
            "paths only (the bounds on request heads and handshakes stay)."
        ),
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
    redis_max_connections: PositiveInt = Field(
        50,
        description=(
            "Connections a worker opens to Redis for commands other than publishing messages "
            "(history reads, join and leave events, pings); more at once wait up to "
            "BROKER_TIMEOUT for a free one. The subscription and publish connections are extra."
        ),
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
    environment: Literal["development", "production"] = Field(
        "production",
        description=(
            "`development` allows the demo's placeholder secrets; `production` refuses them."
        ),
    )
    jwt_secret: SecretStr | None = Field(
        None,
        description=(
            "Shared secret of HS256/384/512 tokens (at least 32 characters). With no "
            "JWT_SECRET, JWT_PUBLIC_KEY_FILE nor API_KEYS, auth is off (development only)."
        ),
    )
    jwt_public_key_file: Path | None = Field(
        None, description="PEM public key that verifies RS*/PS*/ES*/EdDSA tokens."
    )
    jwt_algorithms: list[str] = Field(
        ["HS256"],
        description="Algorithms tokens may use (never taken from the token itself).",
    )
    jwt_audience: str | None = Field(None, description="Required `aud` of tokens, if set.")
    jwt_issuer: str | None = Field(None, description="Required `iss` of tokens, if set.")
    jwt_leeway: Annotated[float, Field(ge=0, le=300)] = Field(
        10.0, description="Seconds of clock skew allowed when checking `exp` and `nbf`."
    )
    anonymous_subscribe: list[str] = Field(
        [],
        description=(
            'Channel patterns a connection without a token may subscribe to, e.g. ["public:*"].'
        ),
    )
    anonymous_publish: list[str] = Field(
        [], description="Channel patterns a connection without a token may publish to."
    )
    authenticated_subscribe: list[str] = Field(
        [],
        description="Channel patterns every valid token may subscribe to, besides its claim.",
    )
    authenticated_publish: list[str] = Field(
        [], description="Channel patterns every valid token may publish to, besides its claim."
    )
    api_keys: list[SecretStr] = Field(
        [],
        description=(
            "Keys accepted in the X-API-Key header of the HTTP API (several, for rotation). "
            "With auth on and none set, the HTTP API refuses every request."
        ),
    )
    allowed_origins: list[str] = Field(
        [],
        description=(
            "Origins (scheme://host[:port]) browsers may connect from besides the service's "
            'own; ["*"] allows any.'
        ),
    )
    max_connections: PositiveInt = Field(
        10_000, description="WebSocket connections per worker; more are closed with 1013."
    )
    handshake_timeout: PositiveFloat = Field(
        10.0,
        description=(
            "Seconds a connection has to send its whole request (head and body) and, for a "
            "WebSocket, to be accepted, from its opening or, kept alive, from the request's "
            "first byte; then it gets 408 (503 if the app was late) and is closed. Request "
            "lines and header lines over 8192 bytes get 414 and 431."
        ),
    )
    max_subscriptions: PositiveInt = Field(
        100, description="Channels one connection may subscribe to."
    )
    publish_rate: PositiveFloat = Field(
        20.0, description="Publishes per second one connection may make, on average."
    )
    publish_burst: PositiveInt = Field(
        40,
        description=(
            "Publishes one connection may make at once. Past the rate it gets `rate_limited`; "
            "as many refusals again without slowing down close it with 1008."
        ),
    )
    hook_connect_url: str | None = Field(
        None,
        description=(
            "URL of the app's backend that each WebSocket connection is POSTed to before it "
            "is accepted; its answer may refuse it (docs/hooks.md). Empty: no connect hook."
        ),
    )
    hook_subscribe_urls: dict[str, str] = Field(
        {},
        description=(
            'JSON object {"channel pattern": "URL"}: subscribes to matching channels are '
            "POSTed to the first URL whose pattern matches, which may refuse them."
        ),
    )
    hook_publish_urls: dict[str, str] = Field(
        {},
        description=(
            'JSON object {"channel pattern": "URL"}: publishes from WebSocket clients to '
            "matching channels are POSTed to that URL, which may refuse them or change data."
        ),
    )
    hook_timeout: PositiveFloat = Field(
        2.0,
        description="Seconds a hook has to answer; then the client gets `unavailable`.",
    )
    hook_max_in_flight: PositiveInt = Field(
        100,
        description=(
            "Hook calls a worker has waiting at once; more get `unavailable` at once rather "
            "than pile up behind a slow backend."
        ),
    )
    hook_api_key: SecretStr | None = Field(
        None, description="Sent as the X-API-Key header of every hook call, if set."
    )
    log_level: LogLevel = Field("info", description="Log level.")
    demo_page: bool = Field(True, description="Serve the demo chat page at /.")
    forwarded_allow_ips: str = Field(
        "127.0.0.1",
        description=(
            "Comma-separated addresses (or *) of the load balancers whose X-Forwarded-For "
            "and X-Forwarded-Proto headers are believed."
        ),
    )

    @field_validator("broadcast_url")
    @classmethod
    def _check_broadcast_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in _BACKEND_SCHEMES:
            raise ValueError(
                f"unsupported scheme {parts.scheme!r} in BROADCAST_URL; use one of "
                + ", ".join(f"{scheme}://" for scheme in _BACKEND_SCHEMES)
            )
        if parts.scheme in SENTINEL_SCHEMES:
            parse_sentinel_url(value)  # raises ValueError saying what is wrong
        elif parts.scheme in CLUSTER_SCHEMES:
            parse_cluster_url(value)
        elif parts.scheme != "memory":
            if not parts.hostname:
                raise ValueError("BROADCAST_URL needs a host, e.g. redis://127.0.0.1:6379/0")
            try:
                parts.port  # noqa: B018  (raises ValueError on a malformed port)
            except ValueError:
                raise ValueError("BROADCAST_URL has a malformed port") from None
            db = parts.path.lstrip("/")
            if db and not db.isdigit():
                raise ValueError(f"BROADCAST_URL database must be a number, got {db!r}")
        return value

    @field_validator(
        "jwt_secret",
        "jwt_public_key_file",
        "jwt_audience",
        "jwt_issuer",
        "hook_connect_url",
        "hook_api_key",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # `JWT_SECRET=` in a .env file means "no secret", not an empty one.
        return None if value == "" else value

    @field_validator("hook_connect_url")
    @classmethod
    def _check_hook_url(cls, value: str | None) -> str | None:
        if value is not None:
            _check_http_url("HOOK_CONNECT_URL", value)
        return value

    @field_validator("hook_subscribe_urls", "hook_publish_urls")
    @classmethod
    def _check_hook_urls(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern, url in value.items():
            if not pattern:
                raise ValueError("a hook's channel pattern must not be empty (use * for all)")
            _check_http_url(f"the hook URL for {pattern!r}", url)
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
        self._check_auth()
        if self.history_meta_ttl < self.history_ttl:
            raise ValueError(
                "HISTORY_META_TTL must be at least HISTORY_TTL: the ids of kept messages must "
                "stay valid as long as the messages"
            )
        return self

    def _check_auth(self) -> None:
        algorithms = set(self.jwt_algorithms)
        unknown = algorithms - HMAC_ALGORITHMS - PUBLIC_KEY_ALGORITHMS
        if unknown or not algorithms:
            raise ValueError(
                f"JWT_ALGORITHMS: unsupported {sorted(unknown) or 'empty list'}; choose from "
                + ", ".join(sorted(HMAC_ALGORITHMS | PUBLIC_KEY_ALGORITHMS))
            )
        if self.jwt_secret is not None and self.jwt_public_key_file is not None:
            raise ValueError("set JWT_SECRET or JWT_PUBLIC_KEY_FILE, not both")
        if self.jwt_secret is not None:
            if not algorithms <= HMAC_ALGORITHMS:
                raise ValueError(
                    "JWT_SECRET verifies only HS256/HS384/HS512: set JWT_ALGORITHMS to those"
                )
            secret = self.jwt_secret.get_secret_value()
            if self.environment != "development" and secret.strip().lower() in PLACEHOLDER_SECRETS:
                raise ValueError(
                    "JWT_SECRET is a well-known placeholder; generate one, e.g. with "
                    "`python -c 'import secrets; print(secrets.token_urlsafe(64))'` "
                    "(ENVIRONMENT=development allows it)"
                )
            needed = max(_MIN_SECRET_BYTES[algorithm] for algorithm in algorithms)
            if len(secret.strip().encode()) < needed:
                raise ValueError(
                    f"JWT_SECRET must be at least {needed} bytes for "
                    f"{', '.join(sorted(algorithms))}"
                )
        if self.jwt_public_key_file is not None:
            if not algorithms <= PUBLIC_KEY_ALGORITHMS:
                # Accepting HS* with a public key lets anyone sign with that public key.
                raise ValueError(
                    "JWT_PUBLIC_KEY_FILE verifies only public-key algorithms (RS256, ES256, "
                    "...): set JWT_ALGORITHMS to those"
                )
            _check_public_key(self.jwt_public_key_file, algorithms)
        for key in self.api_keys:
            value = key.get_secret_value().strip()
            if self.environment != "development" and value.lower() in PLACEHOLDER_SECRETS:
                raise ValueError("API_KEYS holds a well-known placeholder; generate keys")
            if len(value) < _MIN_API_KEY_LENGTH:
                raise ValueError(
                    f"each of API_KEYS needs at least {_MIN_API_KEY_LENGTH} characters"
                )

    def handover_json(self) -> str:
        """These settings as JSON for the worker processes, secrets included.

        `model_dump_json` would mask them, and the workers would verify with "**********".
        """
        data = self.model_dump(mode="json")
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                data[name] = value.get_secret_value()
            elif isinstance(value, list) and value and isinstance(value[0], SecretStr):
                data[name] = [item.get_secret_value() for item in value]
        return json.dumps(data)

    @property
    def jwt_enabled(self) -> bool:
        """A key to verify tokens is configured."""
        return self.jwt_secret is not None or self.jwt_public_key_file is not None

    @property
    def auth_enabled(self) -> bool:
        """Anything secret is configured; without, the service runs open (development)."""
        return self.jwt_enabled or bool(self.api_keys)

    @property
    def backend_scheme(self) -> str:
        """Scheme of `broadcast_url` (memory, redis, rediss, or a Sentinel or Cluster one)."""
        return urlsplit(self.broadcast_url).scheme

    def resolved_worker_id(self) -> str:
        """The worker name clients see: the configured one, or hostname:pid."""
        return worker_name(self.worker_id)

    def redacted_url(self) -> str:
        """`broadcast_url` with any password replaced, for logs."""
        return redact_url(self.broadcast_url)


def redact_url(url: str) -> str:
    """`url` with its passwords replaced, for logs (a Sentinel URL's `sentinel_password` too)."""
    parts = urlsplit(url)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        user = userinfo.partition(":")[0]
        parts = parts._replace(netloc=f"{user}:***@{hosts}")
    if "sentinel_password=" in parts.query:
        query = "&".join(
            "sentinel_password=***" if item.startswith("sentinel_password=") else item
            for item in parts.query.split("&")
        )
        parts = parts._replace(query=query)
    return parts.geturl()


def _check_http_url(what: str, url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        # The URL itself is not repeated: it may carry a password.
        raise ValueError(f"{what} must be an http:// or https:// URL with a host")


def worker_name(configured: str) -> str:
    """`configured` (WORKER_ID), or else hostname:pid of the process that asks."""
    return configured or f"{os.uname().nodename}:{os.getpid()}"


def _check_public_key(path: Path, algorithms: set[str]) -> None:
    """Refuse at start a key file that cannot verify the configured algorithms."""
    # Imported here: only a deployment with a key file needs cryptography loaded.
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ValueError(f"JWT_PUBLIC_KEY_FILE {path}: not a PEM public key ({exc})") from None
    kinds = {
        "RSA": isinstance(key, rsa.RSAPublicKey),
        "EC": isinstance(key, ec.EllipticCurvePublicKey),
        "Ed": isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey),
    }
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        raise ValueError(
            f"JWT_PUBLIC_KEY_FILE holds a {key.key_size}-bit RSA key: use {_MIN_RSA_BITS} bits "
            "or more"
        )
    kind = next((name for name, matches in kinds.items() if matches), None)
    usable = _KEY_ALGORITHMS.get(kind or "", set())
    if not algorithms <= usable:
        raise ValueError(
            f"JWT_PUBLIC_KEY_FILE holds a {kind or 'unsupported'} key, which cannot verify "
            f"{', '.join(sorted(algorithms - usable))}: set JWT_ALGORITHMS to some of "
            f"{', '.join(sorted(usable)) or 'nothing'}"
        )
