"""Logging filters: tokens and keys never reach a log line; each line names its worker."""

from __future__ import annotations

import logging
import re
from urllib.parse import unquote_plus

from service.settings import worker_name

#: Query parameters whose values are secrets, by their decoded names in lower case.
_SECRET_PARAMETERS = frozenset({"token", "access_token", "api_key", "apikey"})

# A JWT. The lookbehind keeps this linear: with `\b`, "eyJ-eyJ-eyJ-..." (a request path
# anyone can send) has a start at every `-`, each scanning to the end.
_JWT = re.compile(r"(?<![\w-])eyJ[\w-]*\.[\w-]+\.[\w-]*")

# A query string, as uvicorn logs it in a request line: from the `?` of the request
# target to the next whitespace (a target holds none, but may hold quotes).
_QUERY = re.compile(r"\?(\S+)")

_SECRETS = (
    # `token=...` in a query string or a cookie: uvicorn logs the request line of every
    # request and handshake, query string included.
    (re.compile(r"(?i)\b((?:access_)?token|api_?key)=[^&\s\"';]*"), r"\1=[redacted]"),
    # Header lines, as websockets logs them at debug level. Cookies whole: the service
    # decodes a cookie's value (quoted, with octal escapes), which no pattern could follow.
    (
        re.compile(r"(?i)\b(authorization|x-api-key|cookie)(\W{1,3})[^\r\n]*"),
        r"\1\2[redacted]",
    ),
    # The content of WebSocket frames, as websockets logs them at debug level: a
    # `refresh` frame holds a token, and long frames are logged cut in the middle, where
    # no pattern could still recognise one.
    (
        re.compile(r"^([<>] (?:TEXT|BINARY|CONT)) .*?( \[\d+ bytes\])?$", re.DOTALL),
        r"\1 [hidden]\2",
    ),
    # A JWT anywhere else.
    (_JWT, "[redacted token]"),
)


def redact(text: str) -> str:
    """`text` with tokens, keys and secret query parameters replaced."""
    text = _QUERY.sub(_redact_query, text)
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def _redact_query(match: re.Match[str]) -> str:
    # The service reads `?tok%65n=...` as `token` (Starlette decodes names and values as
    # urllib's parse_qsl does): each `&`-separated pair is judged decoded the same way.
    query = match[1]
    closing = '"' if query.endswith('"') else ""  # uvicorn quotes the request line
    pairs = query.removesuffix(closing).split("&")
    return "?" + "&".join(map(_redact_pair, pairs)) + closing


def _redact_pair(pair: str) -> str:
    name, equals, value = pair.partition("=")
    decoded_name = unquote_plus(name)
    if _JWT.search(decoded_name):
        return "[redacted]"  # a token as a name, or with an encoded `=` in front of it
    if value and (decoded_name.lower() in _SECRET_PARAMETERS or _JWT.search(unquote_plus(value))):
        return f"{name}{equals}[redacted]"
    return pair


class RedactSecrets(logging.Filter):
    """Redacts secrets from every record a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            # Its formatter unpacks the arguments (client, method, path, version, status).
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
            return True
        # Anything else: redact the finished message, whichever argument held the secret
        # (websockets logs a header's name and value as two).
        record.msg = redact(record.getMessage())
        record.args = ()
        return True


class WorkerName(logging.Filter):
    """Stamps every record with the name of the worker that logs it, as `%(worker)s`.

    Made in the process that logs (uvicorn configures logging in each worker process it
    starts), so that hostname:pid names that process.
    """

    def __init__(self, configured: str = "") -> None:
        super().__init__()
        self._name = worker_name(configured)

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the name; never drops the record."""
        record.worker = self._name
        return True
