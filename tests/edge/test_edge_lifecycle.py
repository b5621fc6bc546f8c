"""Machine lifecycle as on Fly: stop, suspend, start/resume, kill, on real processes, and what it does to sessions."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client

from tests.edge.edge_cli import ROOT, FleetProcess, alive, probe_fleet_args, wait_gone
from tests.edge.edge_probe import dead_url

pytestmark = pytest.mark.anyio


def _process_state(pid: int) -> str:
    """The kernel's one-letter state: ``T`` for a stopped (suspended) process."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0]


def _machine(fleet: FleetProcess, machine_id: str) -> dict[str, Any]:
    return next(m for m in fleet.status()["machines"] if m["id"] == machine_id)


def _text(result: Any) -> str:
    return str(result.content[0].text)


@pytest.fixture(scope="module")
def probes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    process = FleetProcess(probe_fleet_args(2), tmp_path_factory.mktemp("lifecycle") / "edge.log")
    try:
        process.wait_ready()
        yield process
    finally:
        assert process.stop() == 0
        assert not wait_gone(process.machine_pids)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    process = FleetProcess(["--machines", "3"], tmp_path_factory.mktemp("demo") / "edge.log")
    try:
        process.wait_ready()
        yield process
    finally:
        pids = [m["pid"] for m in process.status()["machines"] if m["pid"]]
        assert process.stop() == 0
        assert not wait_gone(pids + process.machine_pids)


def test_suspend_freezes_the_process_and_a_forced_request_resumes_it(probes: FleetProcess) -> None:
    a, b = (m["id"] for m in probes.status()["machines"])
    pid = _machine(probes, a)["pid"]
    with httpx.Client(base_url=probes.url, timeout=30) as client:
        suspended = client.post(f"/_edge/machines/{a}/suspend").json()
        assert suspended["state"] == "suspended"
        assert suspended["pid"] == pid
        assert _process_state(pid) == "T"  # frozen, memory kept
        assert {client.get("/echo").json()["machine"] for _ in range(10)} == {b}  # out of rotation
        before = probes.status()["autostarts"]
        resumed = client.get("/echo", headers={"fly-force-instance-id": a})
    assert resumed.json()["machine"] == a  # the request waited for the resume
    assert _process_state(pid) != "T"
    after = _machine(probes, a)
    assert (after["state"], after["pid"]) == ("started", pid)  # the same process, continued
    assert probes.status()["autostarts"] == before + 1


def test_stop_and_kill_work_on_a_suspended_machine(probes: FleetProcess) -> None:
    a, b = (m["id"] for m in probes.status()["machines"])
    pids = {m["id"]: m["pid"] for m in probes.status()["machines"]}
    with httpx.Client(base_url=probes.url, timeout=30) as client:
        client.post(f"/_edge/machines/{a}/suspend")
        client.post(f"/_edge/machines/{b}/suspend")
        started = time.monotonic()
        assert client.post(f"/_edge/machines/{a}/stop").json()["state"] == "stopped"
        assert time.monotonic() - started < 4  # SIGTERM reached it (no wait for the SIGKILL timeout)
        assert client.post(f"/_edge/machines/{b}/kill").json()["state"] == "stopped"
        assert not wait_gone(list(pids.values()))
        # Started again: fresh processes, same ids.
        for machine_id in (a, b):
            assert client.post(f"/_edge/machines/{machine_id}/start").json()["state"] == "started"
    probes.machine_pids += [m["pid"] for m in probes.status()["machines"]]


def test_cli_verbs_suspend_and_resume(probes: FleetProcess) -> None:
    a = probes.status()["machines"][0]["id"]
    for verb, state in (("suspend", "suspended"), ("resume", "started")):
        result = subprocess.run(
            [sys.executable, "-m", "fly_replay_router.edge", "machine", verb, a, "--edge", probes.url],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        assert f'"state": "{state}"' in result.stdout


def test_suspending_a_stopped_machine_is_refused(probes: FleetProcess) -> None:
    a = probes.status()["machines"][0]["id"]
    with httpx.Client(base_url=probes.url, timeout=30) as client:
        client.post(f"/_edge/machines/{a}/stop")
        refused = client.post(f"/_edge/machines/{a}/suspend")
        client.post(f"/_edge/machines/{a}/start")
    assert refused.status_code == 409
    assert "stopped" in refused.json()["error"]
    probes.machine_pids.append(_machine(probes, a)["pid"])


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL])
def test_the_edge_leaves_no_process_behind_suspended_ones_included(tmp_path: Path, signum: int) -> None:
    process = FleetProcess(probe_fleet_args(2), tmp_path / "edge.log")
    process.wait_ready()
    a = process.status()["machines"][0]["id"]
    with httpx.Client(base_url=process.url, timeout=30) as client:
        client.post(f"/_edge/machines/{a}/suspend")
    assert all(alive(pid) for pid in process.machine_pids)
    process.stop(signum)
    assert not wait_gone(process.machine_pids)


async def test_a_machine_that_refuses_connections_shows_as_unreachable(make_probes, make_edge) -> None:
    (b,) = make_probes(1)
    dead = "0123456789abcd"
    edge = make_edge({dead: dead_url(), b.id: b.url})
    async with httpx.AsyncClient(base_url=edge.url) as client:
        served = {(await client.get("/echo")).json()["machine"] for _ in range(10)}
        states = {m["id"]: m["state"] for m in (await client.get("/_edge/status")).json()["machines"]}
    assert served == {b.id}  # the edge routed around it
    assert states == {dead: "unreachable", b.id: "started"}


# --- what the lifecycle does to MCP sessions (the demo app) ------------------------------


async def test_suspend_keeps_a_session_and_its_count(demo: FleetProcess) -> None:
    async with Client(f"{demo.url}/mcp", mode="legacy") as client:
        owner = _text(await client.call_tool("whoami", {}))
        assert [_text(await client.call_tool("count", {})) for _ in range(2)] == ["1", "2"]
        assert _machine(demo, owner)["sessions"] == 1
        async with httpx.AsyncClient(base_url=demo.url, timeout=30) as edge:
            assert (await edge.post(f"/_edge/machines/{owner}/suspend")).json()["state"] == "suspended"
        assert _machine(demo, owner)["sessions"] == 1  # suspend keeps memory, and so the session
        with anyio.fail_after(20):
            assert _text(await client.call_tool("count", {})) == "3"  # the replay resumed the owner
        assert _text(await client.call_tool("whoami", {})) == owner
    assert _machine(demo, owner)["state"] == "started"
    assert _machine(demo, owner)["sessions"] == 0  # the client closed it


async def test_stop_loses_a_session_and_a_new_one_works(demo: FleetProcess) -> None:
    async with Client(f"{demo.url}/mcp", mode="legacy") as client:
        owner = _text(await client.call_tool("whoami", {}))
        assert _text(await client.call_tool("count", {})) == "1"
        async with httpx.AsyncClient(base_url=demo.url, timeout=30) as edge:
            assert (await edge.post(f"/_edge/machines/{owner}/stop")).json()["state"] == "stopped"
        assert _machine(demo, owner)["sessions"] == 0
        with pytest.raises(Exception, match="Session not found"), anyio.fail_after(30):
            await client.call_tool("count", {})  # the owner came back fresh: it answers 404
    async with Client(f"{demo.url}/mcp", mode="legacy") as client:
        assert _text(await client.call_tool("count", {})) == "1"
    demo.machine_pids += [m["pid"] for m in demo.status()["machines"] if m["pid"]]
