"""The machines behind the edge: local ``uvicorn`` processes, or backends started elsewhere.

Each managed machine is one process running the image's own command (``command.py``: the
Dockerfile's ``CMD`` with its ports and app replaced) on a port of its own, with the environment a
Fly Machine has (``FLY_MACHINE_ID``, ``FLY_ALLOC_ID``, ``FLY_APP_NAME``, ``FLY_REGION``) plus the
fleet's shared ``AFFINITY_SECRET`` and ``AFFINITY_PEERS``. The edge reaches a machine over IPv4
(``Machine.url``), as Fly's proxy does; ``AFFINITY_PEERS`` names its peers over IPv6
(``Machine.peer_url``), as on Fly's private network. Machines keep their id and ports across
stop/start, as Fly Machines do.

The lifecycle, as Fly Machines have it:

- ``stop``: SIGTERM, SIGKILL after ``stop_timeout`` (fly.toml's ``kill_timeout``); the process
  ends, its memory (and every in-memory MCP session) is gone;
- ``suspend``: SIGSTOP to the process group (a supervisor and its workers alike); the memory is
  kept, connections to it hang;
- ``start``: a stopped machine boots fresh (same id and port, empty memory); a suspended one is
  resumed with SIGCONT and continues where it was;
- ``kill``: SIGKILL at once, like a crash.

A machine started elsewhere (``--backend``) cannot be signalled: stop, suspend and start only take
it out of rotation or put it back. This module owns the lifecycle; the proxy only reads machine
state and asks for starts. Every state change is reported to ``listeners`` (the edge's session
book forgets the sessions of a machine that stopped).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from fly_replay_router.edge import process as proc
from fly_replay_router.edge.command import MachineCommand
from fly_replay_router.edge.machine import Machine, MachineControlError, MachineState, new_machine_id


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
    # Fly's kill_timeout: SIGTERM, then SIGKILL after this many seconds (Fly's default is 5).
    stop_timeout: float = 5.0
    # What each machine runs: the Dockerfile's CMD, or the launcher when there is none.
    command: MachineCommand = field(default_factory=MachineCommand)
    # fly.toml's [env], set in every machine under the FLY_* variables.
    env: tuple[tuple[str, str], ...] = ()
    # A started machine is healthy once GET of this path answers 2xx; None: once its port accepts
    # a TCP connection (an app without [[http_service.checks]]).
    health_path: str | None = None
    # Worker processes per machine (the image's --workers: fly.toml's [[vm]] cpus by default), and
    # the memory Fly would give each machine (FLY_VM_MEMORY_MB: fly.toml's [[vm]] memory).
    workers: int = 1
    memory_mb: int | None = None


StateListener = Callable[[Machine, MachineState], None]
# How often the fleet's own loop looks for processes that exited, where no pidfd reports it.
WATCH_INTERVAL = 0.5


class Fleet:
    """All machines behind one edge, and their lifecycle: start, stop, suspend, kill.

    Use ``async with Fleet(...)`` or call ``close()`` in a ``finally``: it kills whatever is left.
    """

    def __init__(self, spec: FleetSpec | None = None) -> None:
        self.spec = spec or FleetSpec()
        self.machines: dict[str, Machine] = {}
        self.listeners: list[StateListener] = []
        self._locks: dict[str, asyncio.Lock] = {}
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
        # A port the kernel calls free now may be the one it gave a moment ago: every port once.
        taken = {urlsplit(url).port for m in self.machines.values() for url in (m.url, m.metrics_url) if url}

        def port() -> int:
            while (found := proc.free_port()) in taken:
                pass
            taken.add(found)
            return found

        for _ in range(count):
            machine_id = new_machine_id()
            while machine_id in self.machines:
                machine_id = new_machine_id()
            url = f"http://127.0.0.1:{port()}"
            machine = Machine(id=machine_id, url=url, managed=True, workers=self.spec.workers)
            if self.spec.command.serves_metrics:
                machine.metrics_url = f"http://127.0.0.1:{port()}"
            self.machines[machine_id] = machine
            planned.append(machine)
        return planned

    def started(self) -> list[Machine]:
        """Machines in rotation."""
        return [machine for machine in self.machines.values() if machine.state == "started"]

    def refresh(self) -> None:
        """Notice managed machines whose process exited on its own (a crash): they are stopped.

        Called by the fleet's own loop (``watch``) and before a control request acts; never while
        reading status, so that looking at the fleet cannot change it.
        """
        for machine in self.machines.values():
            self._notice_exit(machine)

    async def watch(self, interval: float = WATCH_INTERVAL) -> None:
        """The fleet's own loop, until cancelled: a machine whose process exits on its own is stopped.

        Each process started here is also watched by a pidfd (Linux), which reports an exit at
        once; the loop is the fallback where there is none.
        """
        while True:
            self.refresh()
            await asyncio.sleep(interval)

    def _notice_exit(self, machine: Machine) -> None:
        process = machine.process
        if process is not None and machine.state in ("started", "suspended") and process.poll() is not None:
            self._mark_exited(machine)

    async def start_all(self) -> None:
        """Start every stopped managed machine concurrently; raise the first failure as soon as it happens.

        A machine whose process exits while starting fails at once (``MachineStartError`` with its exit
        code and the end of its log); the machines still starting are then stopped, not waited for.
        """
        machines = [m for m in self.machines.values() if m.managed and m.state == "stopped"]
        starting = [asyncio.ensure_future(self.start(m.id)) for m in machines]
        if not starting:
            return
        try:
            done, _ = await asyncio.wait(starting, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for task in starting:
                task.cancel()
            await asyncio.gather(*starting, return_exceptions=True)
        for task in starting:
            error = task.exception() if task in done else None
            if error is not None:
                raise error

    async def start(self, machine_id: str) -> Machine:
        """Start a stopped machine (once it passes its health check) or resume a suspended one.

        Concurrent calls wait for one another: the second finds the machine started.
        """
        machine = self.get(machine_id)
        async with self._lock(machine_id):
            self._notice_exit(machine)
            if machine.state == "started":
                return machine
            if machine.state == "suspended":
                if machine.process is not None:
                    proc.signal_group(machine.process, signal.SIGCONT)
                self._set_state(machine, "started")
                return machine
            if not machine.managed:
                self._set_state(machine, "started")  # the edge cannot start it, only put it back in rotation
                return machine
            await self._spawn_and_wait(machine)
        return machine

    async def suspend(self, machine_id: str) -> Machine:
        """SIGSTOP the machine's process group: out of rotation, memory kept."""
        machine = self.get(machine_id)
        async with self._lock(machine_id):
            self._notice_exit(machine)
            if machine.state == "suspended":
                return machine
            if machine.state != "started":
                raise MachineControlError(f"machine {machine_id} is {machine.state}; only a started machine suspends")
            if machine.process is not None:
                proc.signal_group(machine.process, signal.SIGSTOP)
                await proc.wait_group_stopped(machine.process)  # "suspended" means frozen when we say it
            self._set_state(machine, "suspended")
        return machine

    async def stop(self, machine_id: str) -> Machine:
        """SIGTERM the machine's process group and wait; SIGKILL after ``stop_timeout``."""
        machine = self.get(machine_id)
        async with self._lock(machine_id):
            process = machine.process
            if not machine.managed or process is None:
                self._set_state(machine, "stopped")
                return machine
            self._set_state(machine, "stopping")
            proc.signal_group(process, signal.SIGTERM)
            proc.signal_group(process, signal.SIGCONT)  # a suspended process must run to see its SIGTERM
            try:
                await asyncio.to_thread(process.wait, self.spec.stop_timeout)
            except subprocess.TimeoutExpired:
                proc.signal_group(process, signal.SIGKILL)
                await asyncio.to_thread(process.wait)
            self._mark_exited(machine)
        return machine

    async def kill(self, machine_id: str) -> Machine:
        """SIGKILL the machine's process group at once, like a crash (a suspended one too)."""
        machine = self.get(machine_id)
        if not machine.managed:
            raise MachineControlError(f"machine {machine_id} was started elsewhere; the edge cannot kill it")
        if machine.process is not None:
            proc.signal_group(machine.process, signal.SIGKILL)
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
                proc.signal_group(machine.process, signal.SIGKILL)  # SIGKILL ends a SIGSTOPped process too
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

    def _lock(self, machine_id: str) -> asyncio.Lock:
        lock = self._locks.get(machine_id)
        if lock is None:
            lock = self._locks[machine_id] = asyncio.Lock()
        return lock

    def _set_state(self, machine: Machine, state: MachineState) -> None:
        if machine.state == state:
            return
        machine.state = state
        machine.unreachable = False
        for listener in self.listeners:
            listener(machine, state)

    async def _spawn_and_wait(self, machine: Machine) -> None:
        if self._log_dir is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="fly-edge-logs-"))
        machine.log_path = self._log_dir / f"{machine.id}.log"
        metrics_port = None if machine.metrics_url is None else int(machine.metrics_url.rsplit(":", 1)[1])
        spec = self.spec
        command = spec.command.argv(
            app=spec.app, app_dir=spec.app_dir, port=machine.port, metrics_port=metrics_port, workers=spec.workers
        )
        self._set_state(machine, "starting")
        machine.exit_code = None
        peers = ",".join(f"{m.id}={m.peer_url}" for m in self.machines.values())
        fleet_env = {"FLY_APP_NAME": spec.app_name, "FLY_REGION": spec.region, "PRIMARY_REGION": spec.region}
        fleet_env.update(AFFINITY_SECRET=spec.secret, AFFINITY_PEERS=peers)
        if spec.memory_mb is not None:
            fleet_env["FLY_VM_MEMORY_MB"] = str(spec.memory_mb)
        env = proc.machine_environment(machine, spec.env, fleet_env)
        machine.process = process = proc.spawn(machine, command, env, machine.log_path)
        try:
            await proc.wait_healthy(machine, process, self.spec.start_timeout, self.spec.health_path)
        except BaseException:
            if process.poll() is None:
                proc.signal_group(process, signal.SIGKILL)
                await asyncio.to_thread(process.wait)
            self._mark_exited(machine)
            raise
        self._set_state(machine, "started")

        def exited() -> None:
            if machine.process is process:
                self._notice_exit(machine)

        proc.watch_exit(process, exited)  # else the watch loop notices

    def _mark_exited(self, machine: Machine) -> None:
        if machine.process is not None:
            machine.exit_code = machine.process.poll()
            # Workers orphaned by a supervisor that died go with it, as a Fly Machine's processes
            # do when its main process ends (and the port is free for the next start).
            proc.signal_group(machine.process, signal.SIGKILL)
            machine.process = None
        self._set_state(machine, "stopped")
