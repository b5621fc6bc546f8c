"""Autostop and the concurrency limits, as fly.toml sets them (short intervals; probe machines in-process).

Machines started elsewhere cannot be signalled, so here stop and suspend only take them out of
rotation; ``test_edge_lifecycle.py`` shows what they do to real processes and sessions.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest

pytestmark = pytest.mark.anyio

INTERVAL = 0.3


async def _status(edge_url: str) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        document: dict[str, Any] = (await client.get(f"{edge_url}/_edge/status")).json()
        return document


async def _states(edge_url: str) -> dict[str, str]:
    return {m["id"]: m["state"] for m in (await _status(edge_url))["machines"]}


async def _wait_for(edge_url: str, check: Callable[[dict[str, str]], bool], within: float = 5.0) -> None:
    """Until ``check(states)`` holds, where states maps machine id to state."""
    with anyio.fail_after(within):
        while not check(await _states(edge_url)):  # noqa: ASYNC110  # the edge offers no event to await
            await anyio.sleep(0.05)


@contextlib.asynccontextmanager
async def _open_stream(client: httpx.AsyncClient, machine_id: str) -> AsyncIterator[None]:
    """An SSE stream held open on ``machine_id``: a request in flight for as long as it lasts."""
    async with client.stream("GET", "/stream?hang=1", headers={"fly-force-instance-id": machine_id}) as response:
        assert response.status_code == 200
        chunks = response.aiter_raw()  # kept: a collected iterator would close the stream
        await chunks.__anext__()
        yield


async def test_autostop_stops_idle_machines_one_per_check_down_to_the_minimum(make_probes, make_edge) -> None:
    probes = make_probes(3)
    edge = make_edge(probes, auto_stop="stop", min_machines_running=1, autostop_interval=INTERVAL)
    await _wait_for(edge.url, lambda states: list(states.values()).count("stopped") == 2)
    await anyio.sleep(3 * INTERVAL)
    status = await _status(edge.url)
    assert sorted(m["state"] for m in status["machines"]) == ["started", "stopped", "stopped"]
    assert status["autostops"] == 2
    stops = [event["at"] for event in status["recent_events"] if event["kind"] == "autostop"]
    assert stops[1] - stops[0] >= INTERVAL * 0.8  # one machine per check, as on Fly


async def test_autostop_suspend_and_a_request_resumes_a_machine(make_probes, make_edge) -> None:
    probes = make_probes(2)
    edge = make_edge(probes, auto_stop="suspend", min_machines_running=0, autostop_interval=INTERVAL)
    await _wait_for(edge.url, lambda states: set(states.values()) == {"suspended"})
    async with httpx.AsyncClient(base_url=edge.url) as client:
        response = await client.get("/echo")
    assert response.status_code == 200
    status = await _status(edge.url)
    assert status["autostarts"] == 1
    assert {m["id"]: m["state"] for m in status["machines"]}[response.json()["machine"]] == "started"


async def test_autostop_off_leaves_machines_running(make_probes, make_edge) -> None:
    probes = make_probes(2)
    edge = make_edge(probes, auto_stop="off", autostop_interval=INTERVAL)
    await anyio.sleep(4 * INTERVAL)
    assert set((await _states(edge.url)).values()) == {"started"}


async def test_a_machine_holding_a_stream_is_not_idle(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b], auto_stop="stop", min_machines_running=0, autostop_interval=INTERVAL)
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        async with _open_stream(client, a.id):
            await _wait_for(edge.url, lambda states: states[b.id] == "stopped")
            await anyio.sleep(3 * INTERVAL)
            assert (await _states(edge.url))[a.id] == "started"
        # Once the stream ends, a whole idle interval later, it goes too.
        await _wait_for(edge.url, lambda states: states[a.id] == "stopped")


async def test_no_autostop_without_excess_capacity(make_probes, make_edge) -> None:
    # soft_limit 1: the one request in flight on A would not fit on one machine fewer, so B stays.
    a, b = make_probes(2)
    edge = make_edge([a, b], auto_stop="stop", min_machines_running=0, autostop_interval=INTERVAL, soft_limit=1)
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client, _open_stream(client, a.id):
        await anyio.sleep(5 * INTERVAL)
        assert (await _states(edge.url)) == {a.id: "started", b.id: "started"}


async def test_balancing_starts_a_machine_when_every_running_one_is_at_its_soft_limit(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b], soft_limit=1)
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        assert (await client.post(f"/_edge/machines/{b.id}/stop")).json()["state"] == "stopped"
        # Below the soft limit, the running machine takes everything.
        assert {(await client.get("/echo")).json()["machine"] for _ in range(5)} == {a.id}
        assert (await _states(edge.url))[b.id] == "stopped"
        async with _open_stream(client, a.id):
            served = (await client.get("/echo")).json()["machine"]
    assert served == b.id
    status = await _status(edge.url)
    assert status["autostarts"] == 1
    assert (await _states(edge.url))[b.id] == "started"


async def test_at_the_hard_limit_a_request_queues_then_gets_503(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a], soft_limit=1, hard_limit=1, queue_timeout=0.5)
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client, _open_stream(client, a.id):
        started = time.monotonic()
        response = await client.get("/echo")
        waited = time.monotonic() - started
    assert response.status_code == 503
    assert "no_capacity" in response.text
    assert waited >= 0.45
    status = await _status(edge.url)
    assert status["queued"] == 1
    assert status["errors"] == {"no_capacity": 1}


async def test_a_queued_request_is_served_when_room_frees_up(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a], soft_limit=1, hard_limit=1, queue_timeout=5)
    results: list[httpx.Response] = []
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:

        async def queued() -> None:
            results.append(await client.get("/echo"))

        async with anyio.create_task_group() as group, _open_stream(client, a.id):
            group.start_soon(queued)
            await anyio.sleep(0.4)
            assert not results  # still waiting for room
    assert results[0].status_code == 200
    assert results[0].json()["machine"] == a.id


async def test_a_replay_to_a_machine_at_its_hard_limit_waits_then_falls_back(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b], soft_limit=1, hard_limit=1)
    replay = f"instance={a.id};timeout=500ms;fallback=force_self"
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client, _open_stream(client, a.id):
        response = await client.get("/echo", headers={"fly-force-instance-id": b.id, f"x-probe-replay-{b.id}": replay})
    assert response.status_code == 200
    assert response.json()["machine"] == b.id
    assert "reason=timeout" in response.json()["headers"]["fly-replay-failed"]
