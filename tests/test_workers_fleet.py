"""The local fleet of machines of several worker processes, through the edge, with the official MCP client.

Two machines of the demo app behind ``python -m fly_replay_router.edge``, each running the
Dockerfile's command with 2 workers (from fly.toml's ``[[vm]] cpus = 2``, the default path) or 3
(``--workers 3``). Every call of a session must be answered by the one process that holds it
(the demo's ``worker`` tool says which), on the machine that minted it, counting without gaps,
whichever machine the edge's balancer picked and whichever worker the kernel gave the
connection. Kill -9 of one worker (the edge's control): its sessions get 404 at once, its
siblings' sessions go on counting, and the supervisor starts a new worker.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client

from fly_replay_router.protocol import SESSION_NOT_FOUND_BODY
from tests.edge.edge_cli import ROOT, FleetProcess, running_fleet, wait_gone
from tests.mcp_http import ServedBy, client_recording_served_by, client_recording_tokens, session_headers, tool_call

pytestmark = pytest.mark.anyio

SESSIONS = 20
CALLS = 10


@dataclass
class WorkerFleet:
    """The running edge, and every worker pid its status ever showed (all must be gone at the end)."""

    process: FleetProcess
    seen_workers: set[int] = field(default_factory=set)

    @property
    def url(self) -> str:
        return self.process.url

    def status(self) -> dict[str, Any]:
        status: dict[str, Any] = self.process.status()
        self.seen_workers.update(pid for machine in status["machines"] for pid in machine["worker_pids"])
        return status

    def workers(self) -> dict[str, list[int]]:
        return {machine["id"]: machine["worker_pids"] for machine in self.status()["machines"]}


@pytest.fixture(scope="module", params=[2, 3], ids=lambda workers: f"{workers}-workers")
def fleet(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerFleet]:
    """Two machines of ``request.param`` workers each; on exit, no machine and no worker is left."""
    workers: int = request.param
    directory = tmp_path_factory.mktemp(f"fleet-{workers}-workers")
    fly_toml = (ROOT / "fly.toml").read_text()
    assert re.search(r"^\s*cpus = 1\b", fly_toml, re.MULTILINE)
    if workers == 2:  # what a user does: give the VM two CPUs, and the launcher runs two workers
        fly_toml = re.sub(r"^(\s*)cpus = 1\b", r"\g<1>cpus = 2", fly_toml, flags=re.MULTILINE)
    (directory / "fly.toml").write_text(fly_toml)
    args = ["--machines", "2", "--fly-toml", str(directory / "fly.toml"), "--dockerfile", str(ROOT / "Dockerfile")]
    args += ["--autostop-interval", "600"]  # no machine suspended between two tests
    if workers == 3:
        args += ["--workers", "3"]
    with running_fleet(args, directory / "edge.log") as process:
        fleet = WorkerFleet(process)
        _wait_for_workers(fleet, workers)
        assert f"workers:  {workers} worker processes per machine" in process.text()
        yield fleet
        fleet.status()
    assert not wait_gone(sorted(fleet.seen_workers))  # stopping the fleet ended every worker too


def _wait_for_workers(fleet: WorkerFleet, count: int) -> None:
    deadline = time.monotonic() + 60
    while True:
        machines = fleet.status()["machines"]
        if all(len(machine["worker_pids"]) == count for machine in machines):
            assert all(machine["workers"] == count for machine in machines)
            assert all(machine["pid"] not in machine["worker_pids"] for machine in machines)
            return
        assert time.monotonic() < deadline, f"workers did not start: {machines}\n{fleet.process.text()}"
        time.sleep(0.2)


def _text(result: Any) -> str:
    return str(result.content[0].text)


def _machine_logs(fleet: WorkerFleet) -> str:
    return "".join(Path(machine["log"]).read_text(errors="replace") for machine in fleet.status()["machines"])


async def _sessions_stick(
    fleet: WorkerFleet, connect: Callable[[], AbstractAsyncContextManager[Client]], count: int
) -> dict[tuple[str, int], int]:
    """``count`` sessions at once, ``CALLS`` counts each, every call answered by one worker of one machine.

    Returns how many sessions each (machine, worker pid) owned.
    """
    owners: dict[tuple[str, int], int] = {}

    async def one() -> None:
        counts: list[int] = []
        pids: set[int] = set()
        async with connect() as client:
            for _ in range(CALLS):
                counts.append(int(_text(await client.call_tool("count", {}))))
                pids.add(int(_text(await client.call_tool("worker", {}))))
            machine = _text(await client.call_tool("whoami", {}))
        assert counts == list(range(1, CALLS + 1))  # the session's memory was there for every call
        assert len(pids) == 1, pids  # one process answered every call
        owner = (machine, pids.pop())
        owners[owner] = owners.get(owner, 0) + 1

    with anyio.fail_after(120):
        async with anyio.create_task_group() as group:
            for _ in range(count):
                group.start_soon(one)
    return owners


async def test_every_session_sticks_to_its_machine_and_its_worker(fleet: WorkerFleet) -> None:
    served_by = ServedBy()
    owners = await _sessions_stick(fleet, lambda: client_recording_served_by(f"{fleet.url}/mcp", served_by), SESSIONS)
    assert sum(owners.values()) == SESSIONS
    workers = fleet.workers()
    for machine, pid in owners:
        assert pid in workers[machine]  # the worker that answered is one of the machine's, as the status shows
    status = fleet.status()
    assert status["replays"] > 0  # sessions landed on the wrong machine and were replayed to their owner
    assert served_by.handed_over("/mcp") > 0  # ... and on the wrong worker, and were handed over
    assert "Session not found" not in _machine_logs(fleet)


async def test_legacy_sse_sessions_stick_to_their_worker(fleet: WorkerFleet) -> None:
    before = fleet.status()["replays"]
    owners = await _sessions_stick(fleet, lambda: Client(sse_client(f"{fleet.url}/sse"), mode="legacy"), 6)
    workers = fleet.workers()
    assert all(pid in workers[machine] for machine, pid in owners)
    # The edge balances every message POST at random over the two machines: of about 60, half landed on
    # the machine that does not hold their stream and were replayed to it.
    assert fleet.status()["replays"] - before >= 6


async def test_kill_9_of_a_worker_ends_its_sessions_and_not_its_siblings(fleet: WorkerFleet) -> None:
    sessions: list[dict[str, Any]] = []  # client, token, machine, worker, count so far
    async with AsyncExitStack() as stack:
        victim = None
        for _ in range(40):  # new sessions until one machine has sessions on two workers
            client, tokens = await stack.enter_async_context(client_recording_tokens(f"{fleet.url}/mcp"))
            machine = _text(await client.call_tool("whoami", {}))
            worker = int(_text(await client.call_tool("worker", {})))
            assert _text(await client.call_tool("count", {})) == "1"
            sessions.append({"client": client, "token": tokens[-1], "machine": machine, "worker": worker, "count": 1})
            owners = {(s["machine"], s["worker"]) for s in sessions}
            machines = [m for m, _ in owners]
            victim = next(((m, w) for m, w in sorted(owners) if machines.count(m) >= 2), None)
            if victim is not None and len(sessions) >= 6:
                break
        assert victim is not None, "no machine held sessions on two workers"
        machine, pid = victim
        doomed = [s for s in sessions if (s["machine"], s["worker"]) == victim]
        siblings = [s for s in sessions if s["machine"] == machine and s["worker"] != pid]
        others = [s for s in sessions if s["machine"] != machine]
        assert doomed
        assert siblings

        async with httpx.AsyncClient(base_url=fleet.url, timeout=30) as edge:
            killed = await edge.post(f"/_edge/machines/{machine}/workers/{pid}/kill")
            assert killed.status_code == 200, killed.text
            assert killed.json()["killed_worker"] == pid
            assert pid not in killed.json()["worker_pids"]
            assert killed.json()["state"] == "started"  # one worker's crash is not the machine's

            for session in doomed:  # its sessions: 404 at once, wherever the request lands
                with anyio.fail_after(10):
                    response = await edge.post(
                        "/mcp", headers=session_headers(session["token"]), json=tool_call("count")
                    )
                assert response.status_code == 404, response.text
                assert response.content == SESSION_NOT_FOUND_BODY
                with pytest.raises(Exception, match="Session not found"), anyio.fail_after(10):
                    await session["client"].call_tool("count", {})

        for _ in range(3):  # the others never notice, on any worker the kernel picks, the new one included
            for session in siblings + others:
                session["count"] += 1
                assert _text(await session["client"].call_tool("count", {})) == str(session["count"])
                assert int(_text(await session["client"].call_tool("worker", {}))) == session["worker"]
        deadline = time.monotonic() + 20  # the supervisor starts a new worker in the victim's place
        while len(workers := fleet.workers()[machine]) != killed.json()["workers"]:
            assert time.monotonic() < deadline, workers
            await anyio.sleep(0.2)
        assert pid not in workers
        assert "kill worker" in {event["kind"] for event in fleet.status()["recent_events"]}
