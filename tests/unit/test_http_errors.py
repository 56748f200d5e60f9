"""The HTTP API's answers to FastAPI's validation errors, and its OpenAPI without 422."""

from __future__ import annotations

import json

from service.api.errors import validation_error_message
from service.app import create_app
from service.protocol.codes import ErrorCode
from service.settings import Settings


def test_a_validation_error_says_which_parameter_and_what_was_given() -> None:
    message = validation_error_message(
        [{"loc": ("query", "limit"), "msg": "Input should be a valid integer", "input": "abc"}]
    )
    assert message == "query parameter limit: Input should be a valid integer, got 'abc'"


def test_a_huge_input_is_cut_in_the_message() -> None:
    message = validation_error_message(
        [{"loc": ("query", "limit"), "msg": "too big", "input": "9" * 5000}]
    )
    assert len(message) < 100
    assert message.endswith("...")


def test_no_errors_still_say_something() -> None:
    assert validation_error_message([]) == "invalid request"


def test_invalid_request_is_a_code_of_its_own() -> None:
    assert ErrorCode.INVALID_REQUEST.value == "invalid_request"
    assert ErrorCode.INVALID_FRAME.value == "invalid_frame"


def test_the_openapi_schema_has_no_422_with_auth_on_or_off() -> None:
    for settings in (Settings(), Settings(api_keys=["unit-test-key-Zq8xK2vLw"])):
        schema = create_app(settings).app.openapi()
        text = json.dumps(schema)
        assert '"422"' not in text
        assert "ValidationError" not in text
        assert schema["components"]["schemas"]["ErrorBody"]["required"] == ["error", "message"]
