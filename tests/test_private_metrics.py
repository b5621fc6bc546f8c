"""PrivateMetrics: what a request gets depending on the port it arrived on (in process)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fly_replay_router.private_metrics import PrivateMetrics

pytestmark = pytest.mark.anyio


def app_with_its_own_metrics_route(_request: Any) -> PlainTextResponse:
    return PlainTextResponse("the app's answer")


@pytest.fixture
def wrapped() -> PrivateMetrics:
    registry = CollectorRegistry()
    Counter("demo_requests", "Requests.", registry=registry).inc(3)
    inner = Starlette(routes=[Route("/{path:path}", app_with_its_own_metrics_route, methods=["GET", "POST"])])
    return PrivateMetrics(inner, metrics_port=9091, registry=registry)


async def test_the_public_port_never_reaches_the_metrics_whatever_the_headers(wrapped: PrivateMetrics) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(wrapped), base_url="http://app:8080") as client:
        response = await client.get(
            "/metrics", headers={"host": "app:9091", "x-forwarded-port": "9091", "forwarded": "host=app:9091"}
        )
    assert response.text == "the app's answer"


async def test_the_metrics_port_serves_only_the_metrics(wrapped: PrivateMetrics) -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(wrapped), base_url="http://[fdaa::3]:9091") as client:
        scraped = await client.get("/metrics")
        assert scraped.status_code == 200
        assert "demo_requests_total 3.0" in scraped.text
        assert scraped.headers["content-type"].startswith("text/plain; version=")
        openmetrics = await client.get("/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"})
        assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
        assert openmetrics.text.endswith("# EOF\n")
        head = await client.head("/metrics")
        assert (head.status_code, head.content) == (200, b"")
        assert (await client.get("/anything-else")).status_code == 404
        refused = await client.post("/metrics")
        assert (refused.status_code, refused.headers["allow"]) == (405, "GET, HEAD")


async def test_a_websocket_on_the_metrics_port_is_closed() -> None:
    sent: list[dict[str, Any]] = []

    async def never_called(*_: Any) -> None:
        raise AssertionError("the app must not see the metrics port's connections")

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        sent.append(message)

    wrapped = PrivateMetrics(never_called, metrics_port=9091)
    await wrapped({"type": "websocket", "path": "/metrics", "server": ("::", 9091), "headers": []}, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008}]


def test_a_metrics_path_must_be_absolute() -> None:
    with pytest.raises(ValueError, match="must start with /"):
        PrivateMetrics(Starlette(), metrics_port=9091, path="metrics")
