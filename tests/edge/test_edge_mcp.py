"""End to end: the official MCP client through ``python -m fly_replay_router.edge --machines 3`` (the demo app).

Every call of a session must be answered by the machine that holds it, whatever machine the
random balancer picked first; the edge's replays make that so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client

from tests.edge.edge_cli import TESTS_DIR, FleetProcess, running_fleet
from tests.mcp_http import measure_body, open_session, session_headers

pytestmark = pytest.mark.anyio

SESSIONS = 20
CALLS = 3


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    with running_fleet(["--machines", "3"], tmp_path_factory.mktemp("mcp") / "edge.log") as process:
        yield process


def _text(result: Any) -> str:
    return str(result.content[0].text)


async def _session(client: Client) -> tuple[set[str], list[int]]:
    machines: set[str] = set()
    counts: list[int] = []
    for _ in range(CALLS):
        machines.add(_text(await client.call_tool("whoami", {})))
        counts.append(int(_text(await client.call_tool("count", {}))))
    return machines, counts


async def _sessions_stick(connect: Callable[[], Client], count: int) -> set[str]:
    """Run ``count`` sessions at once; each must be answered by one machine, counting without gaps.

    Returns the machines that owned them.
    """
    results: list[tuple[set[str], list[int]]] = []

    async def one() -> None:
        async with connect() as client:
            results.append(await _session(client))

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)
    assert len(results) == count
    for machines, counts in results:
        assert len(machines) == 1  # one machine answered every call of the session
        assert counts == list(range(1, CALLS + 1))  # no gaps: the session's memory was always there
    return {next(iter(machines)) for machines, _ in results}


async def test_concurrent_legacy_sessions_stick_to_their_machine(fleet: FleetProcess) -> None:
    before = fleet.status()["replays"]
    owners = await _sessions_stick(lambda: Client(f"{fleet.url}/mcp", mode="legacy"), SESSIONS)
    assert len(owners) > 1  # sessions spread over the fleet
    status = fleet.status()
    assert status["replays"] > before  # wrong-machine landings happened and were replayed
    assert not status["errors"]


async def test_legacy_sse_sessions_through_the_edge(fleet: FleetProcess) -> None:
    before = fleet.status()["replays"]
    await _sessions_stick(lambda: Client(sse_client(f"{fleet.url}/sse"), mode="legacy"), 5)
    status = fleet.status()
    # Each session's stream opened on one machine; of its eight or so message POSTs, balanced at random
    # over three machines, about two in three landed elsewhere and were replayed to it (all eight on the
    # owner, for all five sessions, has a chance below 1e-17).
    assert status["replays"] - before >= 5
    assert not status["errors"]


async def test_modern_client_through_the_edge(fleet: FleetProcess) -> None:
    machine_ids = {m["id"] for m in fleet.status()["machines"]}
    async with Client(f"{fleet.url}/mcp") as client:
        answered = {_text(await client.call_tool("whoami", {})) for _ in range(6)}
        assert int(_text(await client.call_tool("measure", {"data": "x" * 1000}))) == 1000
    assert answered <= machine_ids


async def test_first_sse_event_arrives_before_the_stream_ends(fleet: FleetProcess) -> None:
    # The legacy SSE stream stays open for the session's life: a proxy that buffered the body
    # until its end would never deliver the endpoint event.
    async with (
        httpx.AsyncClient(base_url=fleet.url, timeout=10) as client,
        client.stream("GET", "/sse", headers={"accept": "text/event-stream"}) as response,
    ):
        assert response.status_code == 200
        with anyio.fail_after(5):
            first = await response.aiter_raw().__anext__()
        assert b"event: endpoint" in first


async def test_three_mib_calls_are_answered_whichever_machine_they_land_on(fleet: FleetProcess) -> None:
    # Over 1 MiB, Fly (and the edge) cannot replay: the layer forwards to the owner itself.
    three_mib = 3 * 1024 * 1024
    machine_ids = [m["id"] for m in fleet.status()["machines"]]
    async with Client(f"{fleet.url}/mcp", mode="legacy") as client:
        owner = _text(await client.call_tool("whoami", {}))
        for _ in range(4):  # the balancer picks the first machine at random
            assert _text(await client.call_tool("measure", {"data": "x" * three_mib})) == str(three_mib)
        assert _text(await client.call_tool("count", {})) == "1"  # still one session, on its owner
        assert _text(await client.call_tool("whoami", {})) == owner
    async with httpx.AsyncClient(base_url=fleet.url, timeout=60) as raw:
        token = await open_session(raw, "/mcp")
        for machine_id in machine_ids:  # land on every machine, the owner and the others
            headers = session_headers(token, **{"fly-force-instance-id": machine_id})
            response = await raw.post("/mcp", headers=headers, content=measure_body(three_mib))
            assert response.status_code == 200, response.text
            assert f'"text":"{three_mib}"' in response.text.replace(" ", "")
    assert "PA01" not in fleet.status()["errors"]


async def test_replay_cache_with_the_demo_in_cached_mode(tmp_path: Path) -> None:
    args = ["--machines", "2", "--fly-toml", str(TESTS_DIR / "fly.cached.toml")]
    with running_fleet(args, tmp_path / "edge.log") as process:
        await _sessions_stick(lambda: Client(f"{process.url}/mcp", mode="legacy"), 6)
        status = process.status()
        assert status["replay_cache_hits"] > 0  # later calls went straight to the owner
        assert not status["errors"]
