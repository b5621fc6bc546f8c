"""One machine as the edge sees it: its id, address, state and counters.

The one place machine state lives. States follow Fly Machines' names: ``starting``, ``started``,
``stopping``, ``stopped`` (a later ``suspended`` fits here too). ``fleet.py`` changes them; the
proxy reads them.
"""

from __future__ import annotations

import secrets
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

MachineState = Literal["starting", "started", "stopping", "stopped"]


def new_machine_id() -> str:
    """A random 14-lowercase-hex id, the shape of a Fly Machine id."""
    return secrets.token_hex(7)


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
    exit_code: int | None = None
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def port(self) -> int:
        """The loopback port from ``url``."""
        return int(self.url.rsplit(":", 1)[1].split("/", 1)[0])

    def to_json(self) -> dict[str, object]:
        """The machine's entry in ``GET /_edge/status``."""
        return {
            "id": self.id,
            "url": self.url,
            "state": self.state,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "managed": self.managed,
            "pid": self.process.pid if self.process is not None and self.process.poll() is None else None,
            "exit_code": self.exit_code,
            "log": str(self.log_path) if self.log_path is not None else None,
        }
