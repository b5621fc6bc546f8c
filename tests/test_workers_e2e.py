"""One machine, several worker processes (the image's launcher, ``uvicorn --workers 2``, gunicorn).

The workers share the machine's port and the kernel gives each connection to any of them; every
call of a session must still be answered by the process that holds it (the demo's ``worker`` tool
says which), counting without gaps. Kill -9 of a worker: its sessions get 404, its sibling's go on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.sse import sse_client

from fly_replay_router.protocol import SESSION_NOT_FOUND_BODY
from tests.conftest import APP_NAME, ROOT, SECRET, ServerProcess, free_port
from tests.mcp_http import (
    ServedBy,
    client_recording_served_by,
    open_session,
    session_headers,
    tool_call,
    tool_text,
)

pytestmark = pytest.mark.anyio

MACHINE = "d0d0d0d0d0d0d0"
SESSIONS = 20
CALLS = 10
SERVERS = {
    # The image's own launcher, as the Dockerfile runs it on a machine of 2 CPUs.
    "launcher": ["-m", "fly_replay_router.serve", "app.main:app", "--workers", "2", "--port", "{port}"],
    "uvicorn": ["-m", "uvicorn", "app.main:app", "--workers", "2", "--host", "127.0.0.1", "--port", "{port}"],
    "gunicorn": [
        "-m",
        "gunicorn",
        "app.main:app",
        "--workers",
        "2",
        "--worker-class",
        "uvicorn.workers.UvicornWorker",
        "--bind",
        "127.0.0.1:{port}",
    ],
}


@dataclass
class MultiWorkerMachine(ServerProcess):
    """One machine (one ``FLY_MACHINE_ID``) served by a process manager and its workers."""

    url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_seconds = 20.0


@pytest.fixture(scope="module", params=sorted(SERVERS))
def machine(request: pytest.FixtureRequest) -> Iterator[MultiWorkerMachine]:
    port = free_port()
    env = {
        **os.environ,
        "FLY_MACHINE_ID": MACHINE,
        "FLY_APP_NAME": APP_NAME,
        "FLY_REGION": "lcl",
        "AFFINITY_SECRET": SECRET,
        "AFFINITY_WORKER_SOCKET_DIR": tempfile.mkdtemp(prefix="workers-e2e-") + "/sockets",
    }
    log = tempfile.NamedTemporaryFile(prefix=f"workers-{request.param}-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, *(part.format(port=port) for part in SERVERS[request.param])]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    started = MultiWorkerMachine(f"http://127.0.0.1:{port}", process, Path(log.name))
    try:
        _wait_for_two_workers(started)
        yield started
    finally:
        started.stop()


def _wait_for_two_workers(machine: MultiWorkerMachine) -> None:
    """Until two different processes have answered (each on a new connection)."""
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while len(seen) < 2:
        if machine.process.poll() is not None or time.monotonic() > deadline:
            machine.stop()
            raise RuntimeError(f"the machine did not start two workers:\n{machine.log()}")
        try:
            seen.add(_sessionless_worker(machine.url))
        except httpx.TransportError:
            time.sleep(0.1)


def _sessionless_worker(url: str) -> int:
    """The pid of the worker that takes a new connection (a 2026-07-28 call: no session, any worker)."""
    body = tool_call("worker")
    body["params"]["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": "2026-07-28",
        "io.modelcontextprotocol/clientInfo": {"name": "tests", "version": "1"},
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    headers = {
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
        "mcp-protocol-version": "2026-07-28",
        "mcp-method": "tools/call",
        "mcp-name": "worker",
    }
    with httpx.Client(base_url=url, timeout=10) as client:
        return int(tool_text(client.post("/mcp", headers=headers, json=body)))


def _text(result: Any) -> str:
    return str(result.content[0].text)


async def _sessions_stick(connect: Callable[[], AbstractAsyncContextManager[Client]], count: int) -> dict[int, int]:
    """``count`` sessions at once, ``CALLS`` calls each; every one answered by one process without gaps.

    Returns how many sessions each worker process owned.
    """
    owners: dict[int, int] = {}

    async def one() -> None:
        workers: set[int] = set()
        counts: list[int] = []
        async with connect() as client:
            for _ in range(CALLS):
                counts.append(int(_text(await client.call_tool("count", {}))))
                workers.add(int(_text(await client.call_tool("worker", {}))))
        assert counts == list(range(1, CALLS + 1))  # the session's memory was there for every call
        assert len(workers) == 1  # one process answered every call
        owner = workers.pop()
        owners[owner] = owners.get(owner, 0) + 1

    async with anyio.create_task_group() as group:
        for _ in range(count):
            group.start_soon(one)
    return owners


async def test_concurrent_sessions_stick_to_their_worker(machine: MultiWorkerMachine) -> None:
    served_by = ServedBy()
    owners = await _sessions_stick(lambda: client_recording_served_by(f"{machine.url}/mcp", served_by), SESSIONS)
    assert sum(owners.values()) == SESSIONS
    # Connections landed on the worker that did not own their session, and were handed over.
    assert served_by.handed_over("/mcp") > 0, served_by.values[:10]
    assert "Session not found" not in machine.log()


async def test_legacy_sse_sessions_stick_to_their_worker(machine: MultiWorkerMachine) -> None:
    served_by = ServedBy()

    def new_connection_per_request(
        headers: dict[str, str] | None = None, timeout: httpx2.Timeout | None = None, auth: httpx2.Auth | None = None
    ) -> httpx2.AsyncClient:
        """The SDK's client, but no connection is reused: every message POST reaches whichever worker
        accepts it; and the answers' affinity-served-by recorded."""
        return httpx2.AsyncClient(
            headers=headers,
            timeout=timeout or httpx2.Timeout(30, read=300),
            auth=auth,
            limits=httpx2.Limits(max_keepalive_connections=0),
            event_hooks={"response": [served_by]},
        )

    await _sessions_stick(
        lambda: Client(
            sse_client(f"{machine.url}/sse", httpx_client_factory=new_connection_per_request), mode="legacy"
        ),
        6,
    )
    # Of about 120 message POSTs, each on a new connection, some reached the worker without the stream.
    assert served_by.handed_over("/messages") > 0, "no message POST reached the other worker"


async def _count(url: str, token: str) -> httpx.Response:
    # A new connection for every call: whichever worker the kernel picks.
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return await client.post("/mcp", headers=session_headers(token), json=tool_call("count"))


async def test_kill_9_of_a_worker_ends_its_sessions_and_not_its_siblings(machine: MultiWorkerMachine) -> None:
    by_worker: dict[int, list[str]] = {}
    for _ in range(60):  # new sessions on new connections, until both workers own two
        async with httpx.AsyncClient(base_url=machine.url, timeout=10) as client:
            token = await open_session(client, "/mcp")
            response = await client.post("/mcp", headers=session_headers(token), json=tool_call("worker"))
        by_worker.setdefault(int(tool_text(response)), []).append(token)
        if len(by_worker) >= 2 and all(len(tokens) >= 2 for tokens in by_worker.values()):
            break
    assert len(by_worker) == 2, by_worker
    victim, survivor = sorted(by_worker)
    for token in by_worker[victim] + by_worker[survivor]:
        assert tool_text(await _count(machine.url, token)) == "1"

    os.kill(victim, signal.SIGKILL)
    for attempt in range(1, 6):  # every landing: on the survivor, or on a worker started in the victim's place
        for token in by_worker[victim]:
            response = await _count(machine.url, token)
            assert response.status_code == 404, response.text
            assert response.content == SESSION_NOT_FOUND_BODY
        for token in by_worker[survivor]:
            assert tool_text(await _count(machine.url, token)) == str(1 + attempt)
