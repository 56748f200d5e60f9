"""Logging filters: tokens and keys never reach a log line."""

from __future__ import annotations

import logging
import re

# `token=...` (and `access_token=`, `api_key=`) in a URL's query string: uvicorn logs the
# request line of every request and WebSocket handshake, query string included.
_SECRET_PARAMETER = re.compile(r"(?i)\b((?:access_)?token|api_key|apikey)=[^&\s\"']*")


def redact(text: str) -> str:
    """`text` with the values of secret query parameters replaced."""
    return _SECRET_PARAMETER.sub(r"\1=[redacted]", text)


class RedactSecrets(logging.Filter):
    """Redacts secret query parameters from a record's message and arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record in place; never drops it."""
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        return True
