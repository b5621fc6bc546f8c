"""First-hop routing and the headers the edge adds, removes and passes."""

from __future__ import annotations

import httpx
import pytest

from tests.edge.edge_probe import dead_url

pytestmark = pytest.mark.anyio


async def test_force_instance_id_reaches_that_machine_every_time(make_probes, make_edge) -> None:
    probes = make_probes(3)
    edge = make_edge(probes)
    async with httpx.AsyncClient(base_url=edge.url) as client:
        for probe in probes:
            for _ in range(3):
                response = await client.get("/echo", headers={"fly-force-instance-id": probe.id})
                assert response.json()["machine"] == probe.id


async def test_force_instance_id_to_an_unreachable_machine_is_a_5xx_without_fallback(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge({a.id: a.url, "0badc0ffee0000": dead_url()}, default_replay_timeout=0.3)
    async with httpx.AsyncClient(base_url=edge.url) as client:
        response = await client.get("/echo", headers={"fly-force-instance-id": "0badc0ffee0000"})
        unknown = await client.get("/echo", headers={"fly-force-instance-id": "00000000000000"})
    assert response.status_code == 502
    assert unknown.status_code == 502
    assert not a.machine.seen


async def test_prefer_instance_id_header(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge({a.id: a.url, b.id: b.url, "0badc0ffee0000": dead_url()})
    async with httpx.AsyncClient(base_url=edge.url) as client:
        kept = await client.get("/echo", headers={"fly-prefer-instance-id": b.id})
        moved = await client.get("/echo", headers={"fly-prefer-instance-id": "0badc0ffee0000"})
    assert kept.json()["machine"] == b.id
    assert "fly-preferred-instance-unavailable" not in kept.json()["headers"]
    assert moved.status_code == 200
    assert moved.json()["headers"]["fly-preferred-instance-unavailable"] == "0badc0ffee0000"


async def test_routing_headers_choose_the_first_hop_only(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    headers = {"fly-force-instance-id": a.id, f"x-probe-replay-{a.id}": f"instance={b.id}"}
    async with httpx.AsyncClient(base_url=edge.url) as client:
        response = await client.get("/echo", headers=headers)
    assert response.json()["machine"] == b.id
    assert "fly-force-instance-id" not in response.json()["headers"]


async def test_client_copies_of_proxy_headers_are_replaced(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    spoofed = {
        "fly-replay-src": "instance=00000000000000;state=forged",
        "fly-replay-failed": "instance=x;reason=timeout",
        "fly-client-ip": "6.6.6.6",
        "fly-request-id": "forged",
        "fly-region": "forged",
        "fly-preferred-instance-unavailable": "x",
        "fly-replay-cache-status": "hit",
        "x-forwarded-for": "6.6.6.6",
        "via": "1.1 evil",
    }
    async with httpx.AsyncClient(base_url=edge.url) as client:
        response = await client.get("/echo", headers=spoofed)
    seen = a.machine.seen[-1]
    names = [name for name, _ in seen["raw_headers"]]
    for name in (
        "fly-replay-src",
        "fly-replay-failed",
        "fly-preferred-instance-unavailable",
        "fly-replay-cache-status",
    ):
        assert name not in names
    for name in ("fly-client-ip", "fly-request-id", "fly-region", "x-forwarded-for", "via"):
        assert names.count(name) == 1
    headers = seen["headers"]
    assert headers["fly-client-ip"] == "127.0.0.1"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["fly-region"] == "lcl"
    assert headers["via"] == "1.1 fly.io"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["fly-forwarded-port"] == headers["x-forwarded-port"] == edge.url.rsplit(":", 1)[1]
    assert headers["fly-request-id"].endswith("-lcl")
    assert response.headers["fly-request-id"] == headers["fly-request-id"]
    assert response.headers["via"] == "1.1 fly.io"
    assert headers["host"] == edge.url.removeprefix("http://")  # the client's Host is kept


async def test_hop_by_hop_headers_do_not_cross_the_edge(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    async with httpx.AsyncClient(base_url=edge.url) as client:
        await client.get("/echo", headers={"connection": "keep-alive, x-drop-me", "x-drop-me": "1", "te": "trailers"})
    headers = a.machine.seen[-1]["headers"]
    assert "x-drop-me" not in headers
    assert "te" not in headers
    assert headers.get("connection", "keep-alive") == "keep-alive"  # aiohttp's own, not the client's


async def test_balancing_skips_machines_that_refuse_connections(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge({a.id: a.url, "0badc0ffee0000": dead_url(), b.id: b.url})
    async with httpx.AsyncClient(base_url=edge.url) as client:
        machines = {(await client.get("/echo")).json()["machine"] for _ in range(30)}
        status = (await client.get("/_edge/status")).json()
    assert machines == {a.id, b.id}  # both live machines got traffic, no request failed
    assert status["retries"] > 0
    assert next(m for m in status["machines"] if m["id"] == "0badc0ffee0000")["requests"] == 0


async def test_stopped_machines_get_no_traffic_until_named(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    async with httpx.AsyncClient(base_url=edge.url) as client:
        stopped = await client.post(f"/_edge/machines/{b.id}/stop")
        assert stopped.json()["state"] == "stopped"
        machines = {(await client.get("/echo")).json()["machine"] for _ in range(20)}
        assert machines == {a.id}
        # A force header names it: the edge starts it (for a backend started elsewhere: back in rotation).
        forced = await client.get("/echo", headers={"fly-force-instance-id": b.id})
        assert forced.json()["machine"] == b.id
        assert (await client.get("/_edge/status")).json()["autostarts"] == 1


@pytest.mark.parametrize("policy", ["round-robin", "least-requests"])
async def test_other_balancing_policies_spread_requests(make_probes, make_edge, policy: str) -> None:
    probes = make_probes(3)
    edge = make_edge(probes, balance=policy)
    async with httpx.AsyncClient(base_url=edge.url) as client:
        machines = [(await client.get("/echo")).json()["machine"] for _ in range(9)]
    assert {m: machines.count(m) for m in machines} == {p.id: 3 for p in probes}
