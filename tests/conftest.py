"""Shared fixtures: the anyio backend, and real machines of the demo app on loopback.

A machine runs the Dockerfile's own command (``fly_replay_router.dockerfile``), with only its ports
(and the app) replaced, and is reached the way Fly reaches it: over IPv4 by the proxy's path
(``Machine.url``), over IPv6 by its peers on the private network (``Machine.peer_url``).
"""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from fly_replay_router.dockerfile import read_image_command

ROOT = Path(__file__).resolve().parent.parent
SECRET = "test-secret-for-the-fleet-0123456789"
APP_NAME = "test-mcp"
IMAGE_COMMAND = read_image_command(ROOT / "Dockerfile")
# After one path answers, how long the other may take to start listening before the machine fails.
OTHER_PATH_GRACE = 3.0
# The most files the real-process tests hold open at once (held streams' sockets), with a margin.
OPEN_FILES_NEEDED = 3200


def _raise_open_file_limit() -> str | None:
    """Raise this process's soft open-file limit to its hard limit where that is needed and allowed.

    Machines started by the tests inherit it. Returns a sentence naming what is missing, if anything.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < OPEN_FILES_NEEDED:
        with suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < OPEN_FILES_NEEDED:
        return (
            f"the open-file limit is {soft} (hard limit {hard}) and the suite needs {OPEN_FILES_NEEDED}: "
            "raise the hard limit (ulimit -Hn as root)"
        )
    return None


def _ipv6_loopback_missing() -> str | None:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return "IPv6 loopback (::1) is missing, and the machines' peers reach each other over it as on Fly's 6PN"
    return None


ENVIRONMENT_MISSING = [gap for gap in (_raise_open_file_limit(), _ipv6_loopback_missing()) if gap]


def pytest_report_header() -> list[str]:
    """Say in the run's header what the environment lacks for the real-process tests."""
    return [f"environment: {gap}" for gap in ENVIRONMENT_MISSING]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerProcess:
    """What a test's server holds: its ``process`` and ``log_path`` (fields of the dataclass that
    subclasses this); its log, and a stop that waits ``stop_seconds`` before it kills."""

    process: subprocess.Popen[bytes]
    log_path: Path
    stop_seconds = 10.0

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.stop_seconds)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@dataclass
class Machine(ServerProcess):
    """One process of an ASGI app, as a Fly Machine would run it."""

    machine_id: str
    url: str  # IPv4 loopback: the path Fly's proxy (and the local edge) uses
    peer_url: str  # IPv6 loopback: the path other machines use, as on Fly's private network (6PN)
    metrics_url: str | None  # the private metrics port, when the command serves one
    process: subprocess.Popen[bytes]
    log_path: Path


def machine_command(app: str, port: int, metrics_port: int | None, workers: int = 1) -> list[str]:
    """The Dockerfile's CMD for one local machine: its ports and app replaced, this interpreter.

    One worker, as fly.toml's ``cpus = 1`` gives the image on Fly (the launcher runs one per CPU).
    """
    return IMAGE_COMMAND.for_machine(port=port, metrics_port=metrics_port, app=app, workers=workers)


def start_machine(
    machine_id: str,
    *,
    app: str = "app.main:app",
    secret: str = SECRET,
    app_name: str = APP_NAME,
    extra_env: dict[str, str] | None = None,
    port: int | None = None,
    command: list[str] | None = None,
) -> Machine:
    """Start ``app`` with the image's command on a free port and wait until both paths answer.

    Any HTTP answer counts: the server answers only once the app's lifespan has started. A machine
    that answers on one address family but not the other fails with the path that could not connect.
    ``command`` replaces the image's (give it ``port`` too). A free port can be taken again before
    the machine binds it (free_port() only asks the kernel for one that is free now): a machine that
    finds its chosen port in use is started again on new ones, at most twice.
    """
    for attempt in range(3):
        try:
            return _start_machine(machine_id, app, secret, app_name, extra_env, port, command)
        except PortTaken:
            if port is not None or attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTaken(RuntimeError):
    """The machine exited at start because a port chosen for it was taken meanwhile."""


def _start_machine(
    machine_id: str,
    app: str,
    secret: str,
    app_name: str,
    extra_env: dict[str, str] | None,
    port: int | None,
    command: list[str] | None,
) -> Machine:
    port = port or free_port()
    metrics_port = free_port() if IMAGE_COMMAND.metrics_port is not None else None
    if command is None:
        argv = machine_command(app, port, metrics_port)
    else:
        argv, metrics_port = command, None
    env = {
        **os.environ,
        "FLY_MACHINE_ID": machine_id,
        "FLY_APP_NAME": app_name,
        "FLY_REGION": "lcl",
        "AFFINITY_SECRET": secret,
        **(extra_env or {}),
    }
    log_file = tempfile.NamedTemporaryFile(prefix=f"machine-{machine_id}-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    log_file.close()
    machine = Machine(
        machine_id,
        f"http://127.0.0.1:{port}",
        f"http://[::1]:{port}",
        None if metrics_port is None else f"http://127.0.0.1:{metrics_port}",
        process,
        Path(log_file.name),
    )
    try:
        _wait_for_both_paths(machine)
    except BaseException:
        machine.stop()
        raise
    return machine


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
    except httpx.TransportError:
        return False
    return True


def _wait_for_both_paths(machine: Machine) -> None:
    paths = {
        machine.url: "IPv4, the path Fly's proxy uses",
        machine.peer_url: "IPv6, the path peers on the private network (6PN) use",
    }
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if machine.process.poll() is not None:
            log = machine.log()
            error = PortTaken if "Address already in use" in log else RuntimeError
            raise error(f"machine {machine.machine_id} exited during start:\n{log}")
        answered = [url for url in paths if _answers(url)]
        if len(answered) == len(paths):
            return
        if answered:
            # Up on one family: give the other a moment (its socket starts listening just after).
            deadline = min(deadline, time.monotonic() + OTHER_PATH_GRACE)
        time.sleep(0.05)
    silent = [f"{url} ({purpose})" for url, purpose in paths.items() if not _answers(url)]
    if len(silent) == len(paths):
        raise RuntimeError(f"machine {machine.machine_id} did not answer HTTP in 20 s:\n{machine.log()}")
    raise RuntimeError(
        f"machine {machine.machine_id} could not be reached on {' and '.join(silent)}: a Fly Machine must accept "
        f"both address families on its port:\n{machine.log()}"
    )


@contextmanager
def running_pair(
    ids: tuple[str, str], *, app: str = "app.main:app", extra_env: dict[str, str] | None = None
) -> Iterator[tuple[Machine, Machine]]:
    """Two machines of one app that know each other as peers (``AFFINITY_PEERS``); stopped on exit.

    Peers reach each other over IPv6, as on Fly's private network.
    """
    ports = (free_port(), free_port())
    peers = ",".join(f"{machine_id}=http://[::1]:{port}" for machine_id, port in zip(ids, ports, strict=True))
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
