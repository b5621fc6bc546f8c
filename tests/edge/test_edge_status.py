"""GET /_edge/status and the machine control endpoints."""

from __future__ import annotations

import httpx
import pytest

pytestmark = pytest.mark.anyio


async def test_status_document(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    async with httpx.AsyncClient(base_url=edge.url) as client:
        await client.get("/echo", headers={"fly-force-instance-id": a.id, f"x-probe-replay-{a.id}": f"instance={b.id}"})
        await client.get("/echo", headers={f"x-probe-replay-{a.id}": "bad=1", "fly-force-instance-id": a.id})
        status = (await client.get("/_edge/status")).json()
    assert {m["id"]: (m["url"], m["state"], m["requests"]) for m in status["machines"]} == {
        a.id: (a.url, "started", 2),
        b.id: (b.url, "started", 1),
    }
    assert status["replays"] == 1
    assert status["replay_cache_hits"] == 0
    assert status["errors"] == {"PA03": 1}
    assert status["requests"] == 2  # the status request itself is not counted


async def test_edge_paths_are_never_forwarded(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    async with httpx.AsyncClient(base_url=edge.url) as client:
        unknown = await client.get("/_edge/nothing")
        wrong_method = await client.get(f"/_edge/machines/{a.id}/stop")
        no_machine = await client.post("/_edge/machines/00000000000000/stop")
    assert unknown.status_code == 404
    assert wrong_method.status_code == 405
    assert no_machine.status_code == 404
    assert not a.machine.seen


async def test_stop_and_start_an_external_backend(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    async with httpx.AsyncClient(base_url=edge.url) as client:
        assert (await client.post(f"/_edge/machines/{a.id}/stop")).json()["state"] == "stopped"
        assert {(await client.get("/echo")).json()["machine"] for _ in range(10)} == {b.id}
        assert (await client.post(f"/_edge/machines/{a.id}/start")).json()["state"] == "started"
        killed = await client.post(f"/_edge/machines/{a.id}/kill")
    assert killed.status_code == 409  # the edge did not start it, so it cannot kill it
