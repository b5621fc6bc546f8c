"""A managed machine's operating-system process: spawning it, waiting for health, signalling its group.

Every machine runs in its own process group (so that a signal reaches uvicorn's own children too)
and is asked (``PR_SET_PDEATHSIG``) to die with the edge, so that no process outlives the fleet
even when the edge itself is killed. Suspending is ``SIGSTOP`` to that group and resuming is
``SIGCONT``: the memory stays, as with Fly's ``suspend``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import aiohttp

from fly_replay_router.edge.machine import Machine, MachineStartError

_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def spawn(machine: Machine, command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start ``command`` for ``machine`` in a new process group, its output appended to ``log_path``."""
    log: IO[bytes]
    with log_path.open("ab") as log:
        log.write(f"--- starting {machine.id}: {' '.join(command)}\n".encode())
        log.flush()
        # A plain Popen (not asyncio's) so that Fleet.close() can kill and reap from any finally.
        return subprocess.Popen(
            command,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_own_group_and_die_with_parent,  # before any thread uses it
        )


async def wait_healthy(
    machine: Machine, process: subprocess.Popen[bytes], within: float, health_path: str | None
) -> None:
    """Wait until the machine passes its health check; ``MachineStartError`` if it exits or time runs out.

    With ``health_path``, a ``GET`` of it must answer 2xx (redirects are not followed), as Fly's
    HTTP checks (``[[http_service.checks]]``) require; without, a TCP connection to the machine's
    port must open (uvicorn listens only once the app's lifespan has started).
    """
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if process.poll() is not None:
                raise MachineStartError(machine.id, f"process exited with code {process.returncode}", log_tail(machine))
            if await _passes(session, machine, health_path):
                return
            if time.monotonic() > deadline:
                check = f"GET {health_path} not 2xx" if health_path else f"no TCP connection on port {machine.port}"
                raise MachineStartError(machine.id, f"{check} after {within:g}s", log_tail(machine))
            await asyncio.sleep(0.05)


async def _passes(session: aiohttp.ClientSession, machine: Machine, health_path: str | None) -> bool:
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        if health_path is None:
            _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", machine.port), 2)
            writer.close()
            return True
        async with session.get(machine.url + health_path, allow_redirects=False) as response:
            return 200 <= response.status < 300
    return False


def log_tail(machine: Machine, lines: int = 30) -> str:
    """The last ``lines`` lines of a machine's log."""
    if machine.log_path is None or not machine.log_path.exists():
        return ""
    text = machine.log_path.read_text(encoding="utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


def signal_group(process: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    """Send ``signum`` to the process group of ``process`` (gone already is fine)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signum)


def _own_group_and_die_with_parent() -> None:
    # Runs in the child between fork and exec: a new process group, and a signal when the edge
    # dies, even by SIGKILL. SIGKILL rather than SIGTERM: a suspended (SIGSTOPped) machine would
    # keep a SIGTERM pending forever, and with the edge gone nobody waits for a graceful stop.
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
