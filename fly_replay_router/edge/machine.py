"""One machine as the edge sees it: its id, address, state and counters.

The one place machine state lives. States follow Fly Machines' names: ``starting``, ``started``,
``stopping``, ``stopped``, ``suspended``; the status shows a started machine that refuses
connections as ``unreachable`` (Fly keeps such a machine in its pool and routes around it, so the
edge does too: ``state`` stays ``started``, ``unreachable`` is a flag). A machine whose process
exits on its own (a crash) is ``stopped``, as a Fly Machine is when its main process ends.
``fleet.py`` changes the state; the proxy reads it and keeps the counters.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from fly_replay_router.edge.workers import worker_pids

MachineState = Literal["starting", "started", "stopping", "stopped", "suspended"]
# A machine's load against fly.toml's [http_service.concurrency], in requests in flight (an open event
# stream counts as one, as on Fly): "near_soft_limit" from this share of the soft limit on.
NEAR_LIMIT = 0.8
# What a user can ask of a machine (the control surface and its command-line verbs).
MACHINE_VERBS = ("stop", "start", "suspend", "resume", "kill")
# What a user can ask of one worker process of a machine (``POST /_edge/machines/<id>/workers/<pid>/kill``).
WORKER_VERBS = ("kill",)


def new_machine_id() -> str:
    """A random 14-lowercase-hex id, the shape of a Fly Machine id."""
    return secrets.token_hex(7)


def load_level(in_flight: int, soft_limit: int, hard_limit: int | None) -> str:
    """``ok``, ``near_soft_limit``, ``above_soft_limit`` (Fly's proxy prefers other machines) or
    ``at_hard_limit`` (it sends this machine nothing new), as "Load balancing" describes the limits
    (https://fly.io/docs/reference/load-balancing/)."""
    if hard_limit is not None and in_flight >= hard_limit:
        return "at_hard_limit"
    if in_flight >= soft_limit:
        return "above_soft_limit"
    if in_flight >= NEAR_LIMIT * soft_limit:
        return "near_soft_limit"
    return "ok"


class MachineStartError(RuntimeError):
    """A machine did not become healthy; ``log_tail`` holds the end of its log."""

    def __init__(self, machine_id: str, reason: str, log_tail: str) -> None:
        super().__init__(f"machine {machine_id} failed to start: {reason}")
        self.machine_id = machine_id
        self.reason = reason
        self.log_tail = log_tail


class MachineControlError(ValueError):
    """A lifecycle operation that does not apply (unknown machine, kill of an external backend)."""


@dataclass(eq=False)
class Machine:
    """One machine as the edge sees it. ``managed`` machines are processes this fleet started."""

    id: str
    url: str
    managed: bool
    state: MachineState = "stopped"
    requests: int = 0
    in_flight: int = 0
    # How many times this machine answered with fly-replay (it was not the right machine).
    replays_answered: int = 0
    # Set when a connection to a started machine was refused; cleared by the next answer.
    unreachable: bool = False
    # time.monotonic() of the last request sent or finished: autostop's "idle since".
    last_active: float = field(default_factory=time.monotonic)
    exit_code: int | None = None
    log_path: Path | None = None
    # The machine's private metrics port (the image's --metrics-port), when it serves one.
    metrics_url: str | None = None
    # Worker processes the machine's command runs (--workers); None for a machine started elsewhere.
    workers: int | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        """The loopback port from ``url``."""
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    @property
    def peer_url(self) -> str:
        """How its peers reach it: over IPv6 for a managed machine, as on Fly's private network (6PN)."""
        return f"http://[::1]:{self.port}" if self.managed else self.url

    @property
    def shown_state(self) -> str:
        """The state a user sees: ``state``, or ``unreachable`` for a started machine refusing connections."""
        if self.state == "started" and self.unreachable:
            return "unreachable"
        return self.state

    def to_json(self, limits: tuple[int, int | None] | None = None) -> dict[str, object]:
        """The machine's entry in ``GET /_edge/status``; with ``limits`` (soft, hard), its ``load`` too.

        ``workers`` is how many worker processes its command runs, ``worker_pids`` the live ones
        (``workers.py``): fewer for a moment after one dies, until its supervisor starts another.
        """
        running = self.process if self.process is not None and self.process.poll() is None else None
        entry: dict[str, object] = {
            "id": self.id,
            "url": self.url,
            "peer_url": self.peer_url,
            "state": self.shown_state,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "replays_answered": self.replays_answered,
            "managed": self.managed,
            "pid": running.pid if running is not None else None,
            "workers": self.workers,
            "worker_pids": worker_pids(running.pid, self.port) if running is not None else [],
            "exit_code": self.exit_code,
            "log": str(self.log_path) if self.log_path is not None else None,
            "metrics_url": self.metrics_url,
        }
        if limits is not None:
            soft, hard = limits
            entry.update(load=load_level(self.in_flight, soft, hard), soft_limit=soft, hard_limit=hard)
        return entry
