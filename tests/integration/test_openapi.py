"""The OpenAPI schema tells the truth: what it documents is what the routes answer.

Against real workers and Redis: for every route and every status `/openapi.json`
documents, a request that really gets that status, whose body validates against the
documented schema (jsonschema) and which carries the documented headers; and the
schema documents no status a route cannot answer (no FastAPI 422 anywhere: a bad
query parameter is a 400 `invalid_request`).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from tests.conftest import WorkerFactory
from tests.helpers import UNIT, RedisServer, Worker, redis_args, unique, wait_for

PUBLISH = "/api/channels/{channel}/messages"
HISTORY = "/api/channels/{channel}/history"
API_KEY = "openapi-test-key-Zq8xK2vLw"

# Every route of the schema, with exactly the statuses it can answer.
ROUTES: dict[tuple[str, str], set[str]] = {
    ("post", PUBLISH): {"200", "400", "401", "413", "503", "504"},
    ("get", HISTORY): {"200", "400", "401", "503"},
    ("get", "/healthz"): {"200"},
    ("get", "/readyz"): {"200", "503"},
    ("get", "/metrics"): {"200"},
}
# Headers documented for a status that only some of its answers carry.
CONDITIONAL_HEADERS = {"idempotent-replayed"}

Case = Callable[[Worker, Worker], httpx.Response]


def _publish(worker: Worker, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{worker.http}/api/channels/{unique('doc')}/messages",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=10 * UNIT,
    )


def _history(worker: Worker, query: str = "", **headers: str) -> httpx.Response:
    return httpx.get(
        f"{worker.http}/api/channels/{unique('doc')}/history{query}",
        headers=headers,
        timeout=10 * UNIT,
    )


# Requests that get each status without a Redis fault: (open worker, secure worker).
CASES: dict[tuple[str, str, str], list[Case]] = {
    ("post", PUBLISH, "200"): [lambda w, s: _publish(w, b'{"data": {"n": 1}}')],
    ("post", PUBLISH, "400"): [
        lambda w, s: _publish(w, b"{not json"),
        lambda w, s: _publish(w, b"[1]"),
        lambda w, s: _publish(w, b'{"data": 1}', **{"Idempotency-Key": "two words"}),
    ],
    ("post", PUBLISH, "401"): [
        lambda w, s: _publish(s, b'{"data": 1}'),
        lambda w, s: _publish(s, b'{"data": 1}', **{"X-API-Key": "wrong-key-0123456789"}),
    ],
    ("post", PUBLISH, "413"): [lambda w, s: _publish(w, b'{"data": "' + b"x" * 5000 + b'"}')],
    ("get", HISTORY, "200"): [
        lambda w, s: _history(w),
        lambda w, s: _history(w, "?since=x:1&limit=5"),
        lambda w, s: _history(s, "?limit=1000", **{"X-API-Key": API_KEY}),
    ],
    ("get", HISTORY, "400"): [
        lambda w, s: _history(w, "?limit=abc"),
        lambda w, s: _history(w, "?limit=-1"),
        lambda w, s: _history(w, "?limit=1001"),
    ],
    ("get", HISTORY, "401"): [lambda w, s: _history(s, "?limit=5")],
    ("get", "/healthz", "200"): [lambda w, s: httpx.get(w.http + "/healthz")],
    ("get", "/readyz", "200"): [lambda w, s: httpx.get(w.http + "/readyz")],
    ("get", "/metrics", "200"): [lambda w, s: httpx.get(w.http + "/metrics")],
}
# Statuses only a Redis fault gets: test_redis_faults_answer_as_documented.
FAULT_CASES = {
    ("post", PUBLISH, "503"),
    ("post", PUBLISH, "504"),
    ("get", HISTORY, "503"),
    ("get", "/readyz", "503"),
}


@pytest.fixture(scope="module")
def secure(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A worker with auth on (API_KEYS): the HTTP API wants the key."""
    worker = Worker(
        tmp_path_factory.mktemp("secure"),
        redis_args(redis_server, unique("o") + ":", "--api-keys", json.dumps([API_KEY])),
    )
    worker.start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def openapi(worker: Worker) -> dict[str, Any]:
    """The schema a worker serves (with auth off: with auth on it is not served)."""
    response = httpx.get(worker.http + "/openapi.json")
    assert response.status_code == 200, response.text
    schema: dict[str, Any] = response.json()
    return schema


def check_against_schema(
    openapi: dict[str, Any], method: str, path: str, response: httpx.Response
) -> None:
    """`response` has a documented status, a body of its schema and its headers."""
    responses = openapi["paths"][path][method]["responses"]
    status = str(response.status_code)
    assert status in responses, f"{method} {path} answered undocumented {status}: {response.text}"
    documented = responses[status]
    media = response.headers["content-type"].split(";")[0].strip()
    content = {key.split(";")[0].strip(): value for key, value in documented["content"].items()}
    assert media in content, f"{method} {path} {status}: {media} is not documented"
    schema = content[media]["schema"]
    body: Any = response.json() if media == "application/json" else response.text
    validator = Draft202012Validator({**schema, "components": openapi["components"]})
    errors = [error.message for error in validator.iter_errors(body)]
    assert not errors, f"{method} {path} {status}: {body!r} does not fit its schema: {errors}"
    for header in documented.get("headers", {}):
        if header.lower() not in CONDITIONAL_HEADERS:
            assert header in response.headers, f"{method} {path} {status}: no {header} header"


def test_the_schema_documents_exactly_the_statuses_the_routes_answer(
    openapi: dict[str, Any],
) -> None:
    documented = {
        (method, path): set(operation["responses"])
        for path, item in openapi["paths"].items()
        for method, operation in item.items()
    }
    assert documented == ROUTES
    text = json.dumps(openapi)
    assert '"422"' not in text
    assert "ValidationError" not in text
    # Every documented status is exercised below, without a fault or with one.
    exercised = set(CASES) | FAULT_CASES
    assert exercised == {(m, p, s) for (m, p), statuses in ROUTES.items() for s in statuses}


def test_every_error_is_an_error_body_and_the_answers_have_their_models(
    openapi: dict[str, Any],
) -> None:
    schemas = openapi["components"]["schemas"]
    assert schemas["ErrorBody"]["required"] == ["error", "message"]
    for (method, path), statuses in ROUTES.items():
        responses = openapi["paths"][path][method]["responses"]
        for status in statuses:
            if status.startswith(("4", "5")) and path.startswith("/api/"):
                schema = responses[status]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (path, status)
    publish_ok = openapi["paths"][PUBLISH]["post"]["responses"]["200"]
    assert publish_ok["content"]["application/json"]["schema"]["$ref"].endswith("/Published")
    history_ok = openapi["paths"][HISTORY]["get"]["responses"]["200"]
    assert history_ok["content"]["application/json"]["schema"]["$ref"].endswith("/History")
    assert set(schemas["History"]["required"]) == {"channel", "position", "messages"}
    assert schemas["History"]["properties"]["recovered"]["type"] == "boolean"


def test_limit_is_an_integer_from_1_to_1000(openapi: dict[str, Any]) -> None:
    [limit] = [p for p in openapi["paths"][HISTORY]["get"]["parameters"] if p["name"] == "limit"]
    assert limit["in"] == "query"
    assert limit["schema"]["type"] == "integer"
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 1000)
    assert limit["schema"]["default"] == 100


@pytest.mark.parametrize("case", sorted(CASES), ids=lambda case: " ".join(case))
def test_each_documented_answer_is_really_answered_with_its_schema(
    openapi: dict[str, Any], worker: Worker, secure: Worker, case: tuple[str, str, str]
) -> None:
    method, path, status = case
    for request in CASES[case]:
        response = request(worker, secure)
        assert str(response.status_code) == status, response.text
        check_against_schema(openapi, method, path, response)


def test_a_history_with_since_has_recovered_and_fits_the_schema(
    openapi: dict[str, Any], worker: Worker
) -> None:
    channel = unique("since")
    first = worker.publish(channel, "a")
    worker.publish(channel, "b")
    response = httpx.get(f"{worker.http}/api/channels/{channel}/history?since={first}")
    assert response.status_code == 200, response.text
    assert response.json()["recovered"] is True
    assert [m["data"] for m in response.json()["messages"]] == ["b"]
    check_against_schema(openapi, "get", HISTORY, response)


async def test_redis_faults_answer_as_documented(
    make_worker: WorkerFactory, own_redis: RedisServer, prefix: str
) -> None:
    worker = make_worker(*redis_args(own_redis, prefix, "--broker-timeout", "1"))
    openapi = httpx.get(worker.http + "/openapi.json").json()
    worker.publish(unique("warm"), "warm-up")  # the publish connection is up

    # Frozen after the publish connection was made: Redis took it, no answer came.
    assert own_redis.process is not None
    os.kill(own_redis.process.pid, signal.SIGSTOP)
    try:
        unknown = _publish(worker, b'{"data": "once"}', **{"Idempotency-Key": unique("k")})
    finally:
        os.kill(own_redis.process.pid, signal.SIGCONT)
    assert (unknown.status_code, unknown.json()["error"]) == (504, "outcome_unknown")
    check_against_schema(openapi, "post", PUBLISH, unknown)
    wait_for(lambda: worker.status("/readyz") == 200, what="ready again")

    own_redis.kill()
    wait_for(lambda: worker.status("/readyz") == 503, what="not ready while Redis is down")
    not_ready = httpx.get(worker.http + "/readyz")
    assert not_ready.status_code == 503
    assert not_ready.json()["ready"] is False
    assert not_ready.json()["reason"]
    check_against_schema(openapi, "get", "/readyz", not_ready)
    refused = _publish(worker, b'{"data": "lost"}')
    assert (refused.status_code, refused.json()["error"]) == (503, "unavailable")
    check_against_schema(openapi, "post", PUBLISH, refused)
    unread = _history(worker)
    assert (unread.status_code, unread.json()["error"]) == (503, "unavailable")
    check_against_schema(openapi, "get", HISTORY, unread)
