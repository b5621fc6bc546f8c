"""The machines behind the edge: local ``uvicorn`` processes, or backends started elsewhere.

Each managed machine is one ``python -m uvicorn <app>`` process on a loopback port, with the
environment a Fly Machine has (``FLY_MACHINE_ID``, ``FLY_ALLOC_ID``, ``FLY_APP_NAME``,
``FLY_REGION``) plus the fleet's shared ``AFFINITY_SECRET`` and ``AFFINITY_PEERS``. Machines keep
their id and port across stop/start, as Fly Machines do, and start with empty memory.

Every machine runs in its own process group and is asked (``PR_SET_PDEATHSIG``) to die with the
edge, so that no process outlives the fleet even when the edge itself is killed.
This module owns the machine lifecycle; the proxy only reads machine state and asks for starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import aiohttp

from app.edge.machine import Machine, MachineControlError, MachineStartError, new_machine_id

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """How to start managed machines."""

    app: str = "app.main:app"
    app_dir: str | None = None
    app_name: str = "local-mcp"
    region: str = "lcl"
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    log_dir: Path | None = None
    start_timeout: float = 30.0
    stop_timeout: float = 5.0
    # fly.toml's [env], set in every machine under the FLY_* variables.
    env: tuple[tuple[str, str], ...] = ()


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Fleet:
    """All machines behind one edge, and their lifecycle: start, stop, kill.

    Use ``async with Fleet(...)`` or call ``close()`` in a ``finally``: it kills whatever is left.
    """

    def __init__(self, spec: FleetSpec | None = None) -> None:
        self.spec = spec or FleetSpec()
        self.machines: dict[str, Machine] = {}
        self._starting: dict[str, asyncio.Future[None]] = {}
        self._log_dir = self.spec.log_dir

    @classmethod
    def from_backends(cls, backends: dict[str, str], spec: FleetSpec | None = None) -> Fleet:
        """A fleet of machines started elsewhere, all assumed running."""
        fleet = cls(spec)
        for machine_id, url in backends.items():
            fleet.add_backend(machine_id, url)
        return fleet

    def add_backend(self, machine_id: str, url: str) -> Machine:
        """Put an external machine behind the edge (``--backend ID=URL``)."""
        if machine_id in self.machines:
            raise ValueError(f"machine id {machine_id} is given twice")
        machine = Machine(id=machine_id, url=url.rstrip("/"), managed=False, state="started")
        self.machines[machine_id] = machine
        return machine

    def plan(self, count: int) -> list[Machine]:
        """Allocate ids and ports for ``count`` managed machines (not started yet)."""
        planned = []
        for _ in range(count):
            machine_id = new_machine_id()
            while machine_id in self.machines:
                machine_id = new_machine_id()
            machine = Machine(id=machine_id, url=f"http://127.0.0.1:{free_port()}", managed=True)
            self.machines[machine_id] = machine
            planned.append(machine)
        return planned

    def started(self) -> list[Machine]:
        """Machines in rotation."""
        self.refresh()
        return [machine for machine in self.machines.values() if machine.state == "started"]

    def refresh(self) -> None:
        """Notice managed machines whose process exited on its own (a crash)."""
        for machine in self.machines.values():
            process = machine.process
            if process is not None and machine.state == "started" and process.poll() is not None:
                machine.state = "stopped"
                machine.exit_code = process.returncode

    async def start_all(self) -> None:
        """Start every stopped managed machine concurrently; raise the first failure after all tried."""
        machines = [m for m in self.machines.values() if m.managed and m.state == "stopped"]
        results = await asyncio.gather(*(self.start(m.id) for m in machines), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def start(self, machine_id: str) -> Machine:
        """Start a machine and wait until ``GET /healthz`` answers 2xx. Concurrent calls share one start."""
        machine = self.get(machine_id)
        self.refresh()
        if machine.state == "started":
            return machine
        if not machine.managed:
            machine.state = "started"  # the edge cannot start it, only put it back in rotation
            return machine
        pending = self._starting.get(machine_id)
        if pending is None:
            pending = asyncio.get_running_loop().create_future()
            self._starting[machine_id] = pending
            try:
                await self._spawn_and_wait(machine)
                pending.set_result(None)
            except BaseException as exc:
                pending.set_exception(exc)
                pending.exception()  # retrieved: the caller gets it by raising below
                raise
            finally:
                del self._starting[machine_id]
        else:
            await asyncio.shield(pending)
        return machine

    async def stop(self, machine_id: str) -> Machine:
        """SIGTERM the machine's process group and wait; SIGKILL after ``stop_timeout``."""
        machine = self.get(machine_id)
        if not machine.managed or machine.process is None:
            machine.state = "stopped"
            return machine
        machine.state = "stopping"
        _signal_group(machine.process, signal.SIGTERM)
        try:
            await asyncio.to_thread(machine.process.wait, self.spec.stop_timeout)
        except subprocess.TimeoutExpired:
            _signal_group(machine.process, signal.SIGKILL)
            await asyncio.to_thread(machine.process.wait)
        self._mark_exited(machine)
        return machine

    async def kill(self, machine_id: str) -> Machine:
        """SIGKILL the machine's process group at once, like a crash."""
        machine = self.get(machine_id)
        if not machine.managed:
            raise MachineControlError(f"machine {machine_id} was started elsewhere; the edge cannot kill it")
        if machine.process is not None:
            _signal_group(machine.process, signal.SIGKILL)
            await asyncio.to_thread(machine.process.wait)
        self._mark_exited(machine)
        return machine

    def get(self, machine_id: str) -> Machine:
        """The machine with that id, or ``MachineControlError``."""
        machine = self.machines.get(machine_id)
        if machine is None:
            raise MachineControlError(f"no machine {machine_id} in this fleet")
        return machine

    def close(self) -> None:
        """Kill every process this fleet started and reap it. Safe to call twice and from ``finally``."""
        for machine in self.machines.values():
            if machine.process is not None:
                _signal_group(machine.process, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    machine.process.wait(timeout=10)
                self._mark_exited(machine)

    async def aclose(self) -> None:
        """Stop every managed machine gracefully, then kill leftovers."""
        try:
            await asyncio.gather(*(self.stop(m.id) for m in self.machines.values() if m.process is not None))
        finally:
            self.close()

    async def __aenter__(self) -> Fleet:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def log_tail(self, machine: Machine, lines: int = 30) -> str:
        """The last ``lines`` lines of a machine's log."""
        if machine.log_path is None or not machine.log_path.exists():
            return ""
        text = machine.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def _environment(self, machine: Machine) -> dict[str, str]:
        peers = ",".join(f"{m.id}={m.url}" for m in self.machines.values())
        env = dict(os.environ)
        env.update(self.spec.env)
        env.update(
            FLY_MACHINE_ID=machine.id,
            FLY_ALLOC_ID=machine.id,
            FLY_APP_NAME=self.spec.app_name,
            FLY_REGION=self.spec.region,
            PRIMARY_REGION=self.spec.region,
            AFFINITY_SECRET=self.spec.secret,
            AFFINITY_PEERS=peers,
            PYTHONUNBUFFERED="1",
        )
        return env

    async def _spawn_and_wait(self, machine: Machine) -> None:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="fly-edge-logs-"))
        machine.log_path = self._log_dir / f"{machine.id}.log"
        command = [sys.executable, "-m", "uvicorn", self.spec.app, "--host", "127.0.0.1", "--port", str(machine.port)]
        command += ["--no-access-log", "--timeout-graceful-shutdown", "2"]
        if self.spec.app_dir is not None:
            command += ["--app-dir", self.spec.app_dir]
        machine.state = "starting"
        machine.exit_code = None
        log: IO[bytes]
        with machine.log_path.open("ab") as log:
            log.write(f"--- starting {machine.id}: {' '.join(command)}\n".encode())
            log.flush()
            # A plain Popen (not asyncio's) so that close() can kill and reap from any finally.
            machine.process = subprocess.Popen(  # noqa: ASYNC220
                command,
                env=self._environment(machine),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_own_group_and_die_with_parent,  # before any thread uses it
            )
        try:
            await self._wait_healthy(machine)
        except BaseException:
            if machine.process.poll() is None:
                _signal_group(machine.process, signal.SIGKILL)
                await asyncio.to_thread(machine.process.wait)
            self._mark_exited(machine)
            raise
        machine.state = "started"

    async def _wait_healthy(self, machine: Machine) -> None:
        assert machine.process is not None
        deadline = time.monotonic() + self.spec.start_timeout
        timeout = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if machine.process.poll() is not None:
                    raise MachineStartError(
                        machine.id, f"process exited with code {machine.process.returncode}", self.log_tail(machine)
                    )
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(f"{machine.url}/healthz") as response:
                        if 200 <= response.status < 300:
                            return
                if time.monotonic() > deadline:
                    raise MachineStartError(
                        machine.id, f"GET /healthz not 2xx after {self.spec.start_timeout:g}s", self.log_tail(machine)
                    )
                await asyncio.sleep(0.05)

    def _mark_exited(self, machine: Machine) -> None:
        machine.state = "stopped"
        if machine.process is not None:
            machine.exit_code = machine.process.poll()
            machine.process = None


def _signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _own_group_and_die_with_parent() -> None:
    # Runs in the child between fork and exec: a new process group (so a stop reaches uvicorn's
    # own children too), and SIGTERM when the edge dies, even by SIGKILL.
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
