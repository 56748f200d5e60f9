"""Tokens and keys are redacted from log records, whatever their shape."""

from __future__ import annotations

import logging
import time
from urllib.parse import unquote_plus

import jwt
import pytest
from starlette.datastructures import QueryParams
from starlette.requests import cookie_parser

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


def test_a_cookie_the_service_would_decode_is_redacted_whole() -> None:
    # Starlette's cookie parser reads a quoted value with octal escapes: the token below
    # is the JWT spelt so that no pattern on the value could recognise it.
    escaped = "".join(f"\\{ord(c):03o}" for c in JWT)
    assert cookie_parser(f'token="{escaped}"')["token"] == JWT
    for line in (
        f'< cookie: token="{escaped}"; theme=dark',
        f'< Cookie: theme=dark; token="{escaped}"',
    ):
        assert redact(line).endswith(": [redacted]")


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


# --- query strings, decoded as the service decodes them ---------------------------------

# A real token (HS256 is deterministic): a signature long enough to look for parts of.
TOKEN = jwt.encode({"sub": "alice", "exp": 2_000_000_000}, "log-test-secret-" + "0" * 32)
SIGNATURE = TOKEN.rpartition(".")[2]


def encoded(text: str) -> str:
    """Every character of `text` percent-encoded."""
    return "".join(f"%{byte:02X}" for byte in text.encode())


def assert_no_part_of_the_token(text: str) -> None:
    """Not a run of 8 characters of the signature, as logged or percent-decoded."""
    parts = {SIGNATURE[i : i + 8] for i in range(len(SIGNATURE) - 7)}
    for form in (text, unquote_plus(text)):
        leaks = [part for part in parts if part in form]
        assert not leaks, f"part of the signature in {text!r}"


@pytest.mark.parametrize(
    ("query", "accepted"),
    [
        pytest.param(f"tok%65n={TOKEN}", True, id="tok%65n"),
        pytest.param(f"%74oken={TOKEN}", True, id="%74oken"),
        pytest.param(f"{encoded('token')}={TOKEN}", True, id="name-all-encoded"),
        pytest.param(f"TOKEN={TOKEN}", False, id="TOKEN"),  # Starlette's names are exact
        pytest.param(f"Tok%65n={TOKEN}", False, id="Tok%65n"),
        pytest.param(f"token={encoded(TOKEN)}", True, id="value-all-encoded"),
        pytest.param(f"token=eyJ%68{TOKEN[4:]}", True, id="value-partly-encoded"),
        pytest.param(f"tok%65n={TOKEN.replace('.', '%2E')}", True, id="dots-encoded"),
        pytest.param(f"%74oken={encoded(TOKEN)}", True, id="name-and-value-encoded"),
        pytest.param(f"tok%65n=eyJ%68{TOKEN[4:]}", True, id="name-and-value-partly-encoded"),
        pytest.param(f"channel=a&tok%65n={TOKEN}&x=1", True, id="among-other-pairs"),
        pytest.param(f"token=a&tok%65n={TOKEN}", True, id="the-last-token-counts"),
        pytest.param(f"tok%65n={TOKEN}&token=a", False, id="an-earlier-token"),
        pytest.param(f"x=a+b&%74oken={TOKEN}&y=c+d", True, id="plus-around"),
        pytest.param(f"x=+{encoded(TOKEN)}", False, id="encoded-under-another-name"),
        pytest.param(f"x=1;tok%65n={TOKEN}", False, id="semicolon-before"),  # not a separator
        pytest.param(f"tok%65n={TOKEN};x=1", False, id="semicolon-after"),
        pytest.param(f"access%5Ftoken={TOKEN}", False, id="access%5Ftoken"),
        pytest.param(f"api%5Fkey={TOKEN}", False, id="api%5Fkey"),
        pytest.param(encoded(TOKEN), False, id="encoded-alone"),
        pytest.param(f"x%3D{encoded(TOKEN)}", False, id="encoded-equals-sign"),
    ],
)
def test_query_parameters_are_redacted_as_the_service_decodes_them(
    query: str, accepted: bool
) -> None:
    # Whether /ws would take this as its token (from `?token=`, through Starlette).
    assert (QueryParams(query.encode()).get("token") == TOKEN) is accepted
    lines = [
        f'127.0.0.1:5000 - "WebSocket /ws?{query}" [accepted]',  # uvicorn's handshake line
        f"> GET /ws?{query} HTTP/1.1",  # websockets at debug level
    ]
    for line in lines:
        assert_no_part_of_the_token(redact(line))
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        "",
        0,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "GET", f"/ws?{query}", "1.1", 403),
        None,
    )
    RedactSecrets().filter(record)
    assert_no_part_of_the_token(record.getMessage())


def test_a_redacted_request_line_keeps_its_shape() -> None:
    line = f'127.0.0.1:5000 - "WebSocket /ws?channel=news&tok%65n={TOKEN}&x=a+b" [accepted]'
    assert redact(line) == (
        '127.0.0.1:5000 - "WebSocket /ws?channel=news&tok%65n=[redacted]&x=a+b" [accepted]'
    )
    plain = (
        '127.0.0.1:5000 - "GET /api/channels/news/history?since=k3v9x2ma:16&limit=100 HTTP/1.1" 200'
    )
    assert redact(plain) == plain


@pytest.mark.parametrize(
    "query",
    [
        "&" * 64_000,
        "%" * 64_000,
        "=eyJ-" * 16_000,
        "x=" + "eyJ-" * 16_000,
        "?" * 64_000,
        "%65yJ-" * 12_000,
        "a=b" + " ?" * 32_000,
    ],
)
def test_query_redaction_stays_linear_on_hostile_input(query: str) -> None:
    started = time.perf_counter()
    redact(f'127.0.0.1:1 - "GET /?{query} HTTP/1.1" 404')
    assert time.perf_counter() - started < 0.5
