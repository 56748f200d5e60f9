"""Tokens and keys are redacted from log records, whatever their shape."""

from __future__ import annotations

import logging
import time

import pytest

from service.logs import RedactSecrets, redact

JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1In0.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    "text",
    [
        f"GET /ws?token={JWT} HTTP/1.1",
        f"GET /ws?channel=a&access_token={JWT}&x=1",
        f"cookie: token={JWT}",
        f"authorization: Bearer {JWT}",
        "X-API-Key: k1-0123456789abcdef",
        f'< TEXT \'{{"type":"refresh","token":"{JWT}"}}\' [80 bytes]',
    ],
)
def test_secrets_are_redacted(text: str) -> None:
    redacted = redact(text)
    assert JWT not in redacted
    assert "k1-0123456789abcdef" not in redacted
    assert "[redacted" in redacted or "[hidden]" in redacted


def test_a_header_split_over_two_arguments_is_redacted() -> None:
    record = logging.LogRecord(
        "websockets", logging.DEBUG, "", 0, "< %s: %s", ("authorization", f"Bearer {JWT}"), None
    )
    RedactSecrets().filter(record)
    assert JWT not in record.getMessage()


def test_access_log_records_keep_their_argument_tuple() -> None:
    args = ("127.0.0.1:5000", "GET", f"/ws?token={JWT}", "1.1", 403)
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', args, None
    )
    RedactSecrets().filter(record)
    assert isinstance(record.args, tuple)
    assert len(record.args) == 5
    assert record.args[2] == "/ws?token=[redacted]"


def test_frame_contents_logged_at_debug_are_hidden() -> None:
    # websockets cuts long frames in the middle: what is left need not look like a JWT.
    line = '< TEXT \'{"type": "refresh", "token": "eyJhbGciOiJIUzI1N...ECitCHyLWIw"}\' [254 bytes]'
    assert redact(line) == "< TEXT [hidden] [254 bytes]"
    assert redact('> TEXT \'{"type":"pong"}\' [15 bytes]') == "> TEXT [hidden] [15 bytes]"


def test_redaction_stays_linear_on_hostile_input() -> None:
    # Anyone can send a request path like this; a pattern with a start at every `-` took
    # 5 s for 64 KB, with the event loop stalled. A generous bound: it takes milliseconds.
    hostile = "/" + "eyJ-" * 16_000
    started = time.perf_counter()
    redact(f'127.0.0.1:1 - "GET {hostile} HTTP/1.1" 404')
    assert time.perf_counter() - started < 0.5
