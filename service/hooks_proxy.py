"""Hooks as HTTP calls to the app's backend, for the standalone service.

Each is a `POST` of JSON; the backend answers 200 with a JSON object:

- `{}` (or any object without the two keys below): let it through;
- `{"error": {"code": "banned_word", "message": "..."}}`: refuse; the client sees both;
- for a publish, `{"data": ...}`: publish this data instead.

Anything else (another status, not JSON, no answer within HOOK_TIMEOUT, more than
HOOK_MAX_IN_FLIGHT calls already waiting) tells the client `unavailable`: nothing was
done, and the backend's trouble does not pile up in the worker.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

import httpx
from pydantic import JsonValue

from service.auth import Principal
from service.auth.principal import matches_any
from service.errors import HookUnavailable, Refused
from service.hooks import ConnectHook, Hooks, PublishHook, SubscribeHook
from service.settings import Settings, redact_url

logger = logging.getLogger(__name__)

_HEADERS = {"Content-Type": "application/json", "User-Agent": "broadcast-service hooks"}


class ProxyHooks(Hooks):
    """The HOOK_* settings: which URL each action on which channels is posted to."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(timeout=settings.hook_timeout)
        self._connect_url = settings.hook_connect_url
        # (pattern, hook), in the order the settings give them: the first match wins.
        self._subscribe_rules: tuple[tuple[str, SubscribeHook], ...] = _rules(
            settings.hook_subscribe_urls, self._subscribe_call
        )
        self._publish_rules: tuple[tuple[str, PublishHook], ...] = _rules(
            settings.hook_publish_urls, self._publish_call
        )
        self._max_in_flight = settings.hook_max_in_flight
        self._in_flight = 0
        headers = dict(_HEADERS)
        if settings.hook_api_key is not None:
            headers["X-API-Key"] = settings.hook_api_key.get_secret_value()
        self._headers = headers
        self._client: httpx.AsyncClient | None = None

    @staticmethod
    def configured(settings: Settings) -> bool:
        """Whether the settings name any hook URL."""
        return bool(
            settings.hook_connect_url or settings.hook_subscribe_urls or settings.hook_publish_urls
        )

    def connect_hook(self) -> ConnectHook | None:
        """POST to HOOK_CONNECT_URL, if set."""
        return None if self._connect_url is None else self._connect_call

    def subscribe_hook(self, channel: str) -> SubscribeHook | None:
        """POST to the first of HOOK_SUBSCRIBE_URLS whose pattern matches `channel`."""
        return _first(self._subscribe_rules, channel)

    def publish_hook(self, channel: str) -> PublishHook | None:
        """POST to the first of HOOK_PUBLISH_URLS whose pattern matches `channel`."""
        return _first(self._publish_rules, channel)

    async def _connect_call(self, client: Principal) -> None:
        assert self._connect_url is not None
        await self._post("connect", self._connect_url, {"client": _client(client)})

    async def _subscribe_call(self, url: str, client: Principal, channel: str) -> None:
        await self._post("subscribe", url, {"client": _client(client), "channel": channel})

    async def _publish_call(
        self, url: str, client: Principal, channel: str, data: JsonValue
    ) -> JsonValue:
        body = {"client": _client(client), "channel": channel, "data": data}
        answer = await self._post("publish", url, body)
        changed: JsonValue = answer.get("data", data)
        return changed

    async def _post(self, what: str, url: str, body: dict[str, Any]) -> Mapping[str, Any]:
        if self._client is None:
            raise RuntimeError("ProxyHooks used outside `async with`")
        if self._in_flight >= self._max_in_flight:
            raise HookUnavailable(
                f"{self._in_flight} calls to the app's hooks are already waiting: retry later"
            )
        self._in_flight += 1
        try:
            response = await self._client.post(url, json=body)
        except httpx.HTTPError as exc:
            logger.warning("%s hook %s: %s", what, redact_url(url), exc.__class__.__name__)
            raise HookUnavailable(
                f"the app's {what} hook could not be reached: retry later"
            ) from None
        finally:
            self._in_flight -= 1
        return _answer(what, url, response)

    async def start(self) -> None:
        """Open the pooled HTTP client the calls go through."""
        self._client = httpx.AsyncClient(
            headers=self._headers,
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=self._max_in_flight),
            follow_redirects=False,
            trust_env=False,  # a proxy set for the shell must not carry the app's calls
            verify=_tls_context(),
        )

    async def stop(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None


H = TypeVar("H")


def _rules(urls: Mapping[str, str], call: Callable[..., Any]) -> tuple[tuple[str, Any], ...]:
    return tuple((pattern, partial(call, url)) for pattern, url in urls.items())


def _first(rules: tuple[tuple[str, H], ...], channel: str) -> H | None:
    for pattern, hook in rules:
        if matches_any(channel, (pattern,)):
            return hook
    return None


def _tls_context() -> ssl.SSLContext:
    """The system's CAs, or SSL_CERT_FILE's (a backend with a private CA), as usual."""
    return ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE") or None)


def _client(principal: Principal) -> dict[str, Any]:
    return {
        "subject": principal.subject,
        "subscribe": list(principal.subscribe),
        "publish": list(principal.publish),
    }


def _answer(what: str, url: str, response: httpx.Response) -> Mapping[str, Any]:
    """The backend's answer as an object, or the error the client is told."""
    if response.status_code != 200:
        logger.warning("%s hook %s answered %d", what, redact_url(url), response.status_code)
        raise HookUnavailable(
            f"the app's {what} hook answered HTTP {response.status_code}: retry later"
        )
    try:
        answer = response.json()
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        logger.warning(
            "%s hook %s answered something other than a JSON object", what, redact_url(url)
        )
        raise HookUnavailable(f"the app's {what} hook answered nonsense: retry later")
    error = answer.get("error")
    if error is None:
        return answer
    code = error.get("code", "forbidden") if isinstance(error, dict) else "forbidden"
    message = error.get("message") if isinstance(error, dict) else None
    try:
        raise Refused(str(message or f"refused by the app's {what} hook"), str(code))
    except ValueError:
        logger.warning("%s hook %s: unusable error code %r", what, redact_url(url), code)
        raise Refused(str(message or f"refused by the app's {what} hook")) from None
