"""Logging filters: tokens and keys never reach a log line."""

from __future__ import annotations

import logging
import re

_SECRETS = (
    # `token=...` in a query string or a cookie: uvicorn logs the request line of every
    # request and handshake, query string included.
    (re.compile(r"(?i)\b((?:access_)?token|api_?key)=[^&\s\"';]*"), r"\1=[redacted]"),
    # Header lines, as websockets logs them at debug level.
    (re.compile(r"(?i)\b(authorization|x-api-key)(\W{1,3})[^\r\n]*"), r"\1\2[redacted]"),
    # The content of WebSocket frames, as websockets logs them at debug level: a
    # `refresh` frame holds a token, and long frames are logged cut in the middle, where
    # no pattern could still recognise one.
    (
        re.compile(r"^([<>] (?:TEXT|BINARY|CONT)) .*?( \[\d+ bytes\])?$", re.DOTALL),
        r"\1 [hidden]\2",
    ),
    # A JWT anywhere else.
    # The lookbehind keeps this linear: with `\b`, "eyJ-eyJ-eyJ-..." (a request path
    # anyone can send) has a start at every `-`, each scanning to the end.
    (re.compile(r"(?<![\w-])eyJ[\w-]*\.[\w-]+\.[\w-]*"), "[redacted token]"),
)


def redact(text: str) -> str:
    """`text` with tokens, keys and secret query parameters replaced."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


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
