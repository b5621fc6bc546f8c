"""Busy is not gone: a burst for one session while its worker holds its event loop, two workers on one port.

The image's launcher runs ``tests.workers_app`` with ``--workers 2``. One request makes the
session's owner hold its event loop (as a CPU-bound call in the loop does); meanwhile a burst of
requests for sessions of that owner arrives on new connections, and the kernel gives about half
of them to the sibling, which hands them over. The owner accepts nothing while it is held, so its
Unix socket's listen backlog fills and ``connect()`` fails with ``EAGAIN``: the owner is alive.
An MCP client drops a session on 404, so no request of a live session may get one. Either the
hand-over waits until the owner accepts (up to ``AFFINITY_WORKER_BUSY_TIMEOUT``) and the request is
served, or it answers 503 with ``Retry-After`` and the session goes on.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import APP_NAME, ROOT, SECRET, ServerProcess, free_port

pytestmark = pytest.mark.anyio

MACHINE = "b0b0b0b0b0b0b0"
# Well past the owner's backlog (asyncio's default, 100) and the sibling's idle connections to it.
BURST = 600
# The layer's busy wait is retried at most every 50 ms: a burst is over long before this.
HOLD_SECONDS = 3.0


@dataclass
class Launcher(ServerProcess):
    """``python -m fly_replay_router.serve tests.workers_app:app --workers 2``: one machine, two workers."""

    url: str
    port: int
    busy_timeout: float
    process: subprocess.Popen[bytes]
    log_path: Path
    stop_seconds = 20.0


def _launch(busy_timeout: str) -> Launcher:
    port = free_port()
    env = {
        **os.environ,
        "FLY_MACHINE_ID": MACHINE,
        "FLY_APP_NAME": APP_NAME,
        "FLY_REGION": "lcl",
        "AFFINITY_SECRET": SECRET,
        "AFFINITY_WORKER_SOCKET_DIR": tempfile.mkdtemp(prefix="workers-busy-") + "/sockets",
        "AFFINITY_WORKER_BUSY_TIMEOUT": busy_timeout,
    }
    log = tempfile.NamedTemporaryFile(prefix="workers-busy-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, "-m", "fly_replay_router.serve", "tests.workers_app:app", "--workers", "2"]
    command += ["--port", str(port), "--log-level", "debug"]  # debug: a line per hand-over too
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return Launcher(f"http://127.0.0.1:{port}", port, float(busy_timeout), process, Path(log.name))


@pytest.fixture(params=["30", "0.2"], ids=["waits-for-the-owner", "answers-503"])
def machine(request: pytest.FixtureRequest) -> Iterator[Launcher]:
    launcher = _launch(request.param)
    try:
        yield launcher
    finally:
        launcher.stop()


async def _sessions_of_both_workers(machine: Launcher) -> dict[int, list[str]]:
    """New sessions on new connections until each worker owns two (``/open`` answers with the owner's pid)."""
    owned: dict[int, list[str]] = {}
    deadline = time.monotonic() + 60
    while len(owned) < 2 or any(len(tokens) < 2 for tokens in owned.values()):
        assert machine.process.poll() is None, machine.log()
        assert time.monotonic() < deadline, f"sessions did not spread over two workers: {owned}"
        try:
            async with httpx.AsyncClient(base_url=machine.url, timeout=10) as client:
                response = await client.post("/open")
        except httpx.TransportError:
            await asyncio.sleep(0.1)  # the workers are still starting
            continue
        assert response.status_code == 200, response.text
        owned.setdefault(int(response.text), []).append(response.headers["mcp-session-id"])
    return owned


async def _raw_request(port: int, request: bytes) -> tuple[int, bytes]:
    """One HTTP/1.1 request on a new connection (whichever worker the kernel gives it to): status, head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # the body, until the worker closes (the request says Connection: close)
        return int(head.split(b" ", 2)[1]), head
    finally:
        writer.close()


# An answer the owner served after a sibling handed the request over (affinity-served-by names the hops).
HANDED_OVER = re.compile(rb"^affinity-served-by: [^\r\n]*via=[^\r\n]*handover", re.IGNORECASE | re.MULTILINE)


def _get(path: str, token: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nmcp-session-id: {token}\r\nconnection: close\r\n\r\n".encode()


async def test_a_burst_while_the_owner_is_held_never_gets_a_404(machine: Launcher, tmp_path: Path) -> None:
    owned = await _sessions_of_both_workers(machine)
    owner = sorted(owned)[0]
    held, burst_tokens = owned[owner][0], owned[owner][1:] + owned[owner][:1]
    marker = tmp_path / "held"
    block = f"POST /block?seconds={HOLD_SECONDS}&marker={marker} HTTP/1.1\r\nhost: 127.0.0.1\r\n"
    block += f"mcp-session-id: {held}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    blocking = asyncio.ensure_future(_raw_request(machine.port, block.encode()))
    deadline = time.monotonic() + 30
    while not marker.exists():  # a file the owner writes: there is no event to wait on
        assert not blocking.done(), machine.log()
        assert time.monotonic() < deadline, "the owner never started holding its loop"
        await asyncio.sleep(0.01)
    assert int(marker.read_text()) == owner

    answers = await asyncio.gather(
        *(
            _raw_request(machine.port, _get("/disconnects", burst_tokens[index % len(burst_tokens)]))
            for index in range(BURST)
        )
    )
    assert (await blocking)[0] == 200
    statuses = Counter(status for status, _ in answers)
    log = machine.log()
    handed_over = sum(1 for _, head in answers if HANDED_OVER.search(head))

    assert statuses[404] == 0, (statuses, log[-3000:])
    # The launcher's --log-level debug shows the layer's hand-over lines (at info it writes none).
    assert log.count("outcome=handed_over") >= handed_over, (log.count("outcome=handed_over"), handed_over)
    # About half the burst reached the sibling while the owner accepted nothing: more than its backlog.
    assert handed_over + statuses[503] > 150, (handed_over, statuses)
    if machine.busy_timeout > HOLD_SECONDS:
        # Every hand-over waited for the owner to accept, and was served.
        assert statuses == {200: BURST}, statuses
    else:
        # Those the owner did not accept within the busy timeout: 503, try again in a second.
        assert set(statuses) == {200, 503}, statuses
        assert all(b"\r\nretry-after: 1\r\n" in head.lower() for status, head in answers if status == 503)
        assert log.count("reason=worker_busy") >= 1
    # Every session of the owner still lives, and the owner still answers for them.
    async with httpx.AsyncClient(base_url=machine.url, timeout=10) as client:
        for token in owned[owner]:
            response = await client.get("/disconnects", headers={"mcp-session-id": token})
            assert response.status_code == 200, response.text
            assert response.headers["x-worker-pid"] == str(owner)
