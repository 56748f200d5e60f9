"""HTTP publish, health, metrics and the demo page against one real worker."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers import Worker, subscribed_client, unique


def post(worker: Worker, channel: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(
        f"{worker.http}/api/channels/{channel}/messages",
        content=body,
        headers={"content-type": "application/json", **headers},
    )


async def test_http_publish_reaches_websocket_subscribers(worker: Worker) -> None:
    channel = unique("http")
    client = await subscribed_client(worker, channel)
    response = httpx.post(
        f"{worker.http}/api/channels/{channel}/messages", json={"data": {"n": [1, 2]}}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["channel"] == channel
    assert await client.recv() == {
        "type": "message",
        "channel": channel,
        "id": body["id"],
        "data": {"n": [1, 2]},
    }
    await client.close()


@pytest.mark.parametrize(
    ("channel", "body", "status", "code"),
    [
        ("ok", b"{not json", 400, "invalid_json"),
        ("ok", b"[1]", 400, "invalid_request"),
        ("ok", b'{"payload": 1}', 400, "invalid_request"),
        ("ok", b'{"data": "' + b"x" * 1100 + b'"}', 413, "message_too_large"),
        ("ok", b'{"data": "' + b"x" * 5000 + b'"}', 413, "message_too_large"),
        ("bad%20name", b'{"data": 1}', 400, "invalid_channel"),
        ("x" * 200, b'{"data": 1}', 400, "invalid_channel"),
    ],
)
def test_bad_publish_requests_say_what_is_wrong(
    worker: Worker, channel: str, body: bytes, status: int, code: str
) -> None:
    response = post(worker, channel, body)
    assert response.status_code == status, response.text
    assert response.json()["error"] == code
    assert response.json()["message"]


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("limit=abc", "valid integer"),
        ("limit=-1", "greater than or equal to 1"),
        ("limit=0", "greater than or equal to 1"),
        ("limit=1001", "less than or equal to 1000"),
        ("limit=2.5", "valid integer"),
        ("limit=", "valid integer"),
    ],
)
def test_a_bad_query_parameter_is_a_400_invalid_request_not_a_422(
    worker: Worker, query: str, says: str
) -> None:
    response = httpx.get(f"{worker.http}/api/channels/ok/history?{query}")
    assert response.status_code == 400, response.text
    body = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == "invalid_request"
    assert "limit" in body["message"], body["message"]
    assert says in body["message"], body["message"]


def test_a_good_limit_is_read_as_a_number(worker: Worker) -> None:
    channel = unique("limit")
    for n in range(3):
        worker.publish(channel, n)
    response = httpx.get(f"{worker.http}/api/channels/{channel}/history?limit=2")
    assert response.status_code == 200, response.text
    assert [m["data"] for m in response.json()["messages"]] == [1, 2]


def test_health_and_readiness(worker: Worker) -> None:
    health = httpx.get(worker.http + "/healthz")
    assert health.status_code == 200
    assert health.json()["status"] == "ok"
    ready = httpx.get(worker.http + "/readyz")
    assert ready.status_code == 200
    assert ready.json()["ready"] is True


def test_metrics_are_prometheus_text(worker: Worker) -> None:
    response = httpx.get(worker.http + "/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    for name in (
        "broadcast_connections",
        "broadcast_messages_published_total",
        "broadcast_deliveries_total",
        "broadcast_slow_consumer_closes_total",
        "broadcast_channels",
        "broadcast_redis_subscriptions_alive",
    ):
        assert f"\n{name}" in response.text or response.text.startswith(name), name


def test_demo_page_and_static_files(worker: Worker) -> None:
    page = httpx.get(worker.http + "/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="channel"' in page.text
    assert "/ws" in page.text
