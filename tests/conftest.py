"""Shared fixtures: the anyio backend, and real uvicorn machines of the demo app on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-for-the-fleet-0123456789"
APP_NAME = "test-mcp"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Machine:
    """One uvicorn process of an ASGI app, as a Fly Machine would run it."""

    machine_id: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_machine(
    machine_id: str,
    *,
    app: str = "app.main:app",
    secret: str = SECRET,
    app_name: str = APP_NAME,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
) -> Machine:
    """Start ``app`` under uvicorn on a free loopback port and wait until it answers.

    Any HTTP answer counts: uvicorn answers only once the app's lifespan has started.
    """
    port = port or free_port()
    env = {
        **os.environ,
        "FLY_MACHINE_ID": machine_id,
        "FLY_APP_NAME": app_name,
        "FLY_REGION": "lcl",
        "AFFINITY_SECRET": secret,
        **(extra_env or {}),
    }
    log_file = tempfile.NamedTemporaryFile(prefix=f"machine-{machine_id}-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--log-level", "info"],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    machine = Machine(machine_id, f"http://127.0.0.1:{port}", process, Path(log_file.name))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"machine {machine_id} exited during start:\n{machine.log()}")
        try:
            httpx.get(f"{machine.url}/healthz", timeout=1)
            return machine
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    machine.stop()
    raise RuntimeError(f"machine {machine_id} did not answer HTTP in 20 s:\n{machine.log()}")


@contextmanager
def running_pair(
    ids: tuple[str, str], *, app: str = "app.main:app", extra_env: dict[str, str] | None = None
) -> Iterator[tuple[Machine, Machine]]:
    """Two machines of one app that know each other as peers (``AFFINITY_PEERS``); stopped on exit."""
    ports = (free_port(), free_port())
    peers = ",".join(f"{machine_id}=http://127.0.0.1:{port}" for machine_id, port in zip(ids, ports, strict=True))
    env = {**(extra_env or {}), "AFFINITY_PEERS": peers}
    started: list[Machine] = []
    try:
        for machine_id, port in zip(ids, ports, strict=True):
            started.append(start_machine(machine_id, app=app, port=port, extra_env=env))
        yield started[0], started[1]
    finally:
        for machine in started:
            machine.stop()


@pytest.fixture(scope="module")
def two_machines() -> Iterator[tuple[Machine, Machine]]:
    """Machines A and B of the demo app: one app, one secret, two machine ids, each other's peers."""
    with running_pair(("aaaaaaaaaaaaaa", "bbbbbbbbbbbbbb")) as pair:
        yield pair
