"""GET /_edge/status and the machine control endpoints."""

from __future__ import annotations

import asyncio
import json

import anyio
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


async def test_status_and_page_feed_show_a_machine_nearing_its_concurrency_limits(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a], soft_limit=5, hard_limit=10)
    forced = {"fly-force-instance-id": a.id}
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:

        async def load_with(in_flight: int) -> dict:
            """The machine's status entry while ``in_flight`` slow requests are open on it."""
            held = [asyncio.ensure_future(client.get("/slow?seconds=1.5", headers=forced)) for _ in range(in_flight)]
            try:
                for _ in range(200):
                    (entry,) = (await client.get("/_edge/status")).json()["machines"]
                    if entry["in_flight"] == in_flight:
                        return entry
                    await asyncio.sleep(0.01)
                raise AssertionError(f"never saw {in_flight} requests in flight: {entry}")
            finally:
                await asyncio.gather(*held)

        idle = (await client.get("/_edge/status")).json()["machines"][0]
        assert (idle["load"], idle["soft_limit"], idle["hard_limit"]) == ("ok", 5, 10)
        assert (await load_with(4))["load"] == "near_soft_limit"  # 80 % of the soft limit
        assert (await load_with(6))["load"] == "above_soft_limit"
        assert (await load_with(10))["load"] == "at_hard_limit"
        fed: dict | None = None
        with anyio.fail_after(15):  # the feed sends a document at once, then on every change
            async with client.stream("GET", "/_edge/events") as feed:
                async for line in feed.aiter_lines():
                    if line.startswith("data: "):
                        fed = json.loads(line[6:])
                        break
        assert fed is not None, "the event feed ended without a data: line"
        assert fed["machines"][0]["load"] == "ok"
