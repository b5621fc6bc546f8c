"""A managed machine's operating-system process: spawning it, waiting for health, watching it exit, signalling it.

Every machine runs in its own process group (so that a signal reaches uvicorn's own children too)
and is asked (``PR_SET_PDEATHSIG``) to die with the edge, so that no process outlives the fleet
even when the edge itself is killed. Suspending is ``SIGSTOP`` to that group and resuming is
``SIGCONT``: the memory stays, as with Fly's ``suspend``.

A machine is reached on two paths, as on Fly: the edge connects over IPv4 (``127.0.0.1``), as Fly's
proxy reaches a machine's ``internal_port`` ("Connect to an App Service",
https://fly.io/docs/networking/app-services/), and its peers over IPv6 (``[::1]``), as machines
reach each other on the private network, 6PN ("Private Networking",
https://fly.io/docs/networking/private-networking/). The start-up check requires both.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import aiohttp

from fly_replay_router.edge.machine import Machine, MachineStartError

_PR_SET_PDEATHSIG = 1
# After one path passes the check, how long the other may take before the machine fails to start
# (the two sockets of one server start listening a moment apart).
OTHER_PATH_GRACE = 3.0
_IPV4 = "127.0.0.1"
_IPV6 = "::1"
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def machine_environment(
    machine: Machine, fly_toml_env: tuple[tuple[str, str], ...], fleet_env: dict[str, str]
) -> dict[str, str]:
    """A machine's environment: fly.toml's ``[env]``, the edge's own environment over it, then the fleet's.

    The shell's environment wins over fly.toml's ``[env]``, as ``fly secrets`` do on Fly, so that
    ``AFFINITY_FAILOVER=cached python -m fly_replay_router.edge`` means what it says; ``fleet_env``
    (app, region, secret, peers) and the machine's id win over both.
    """
    env = {**dict(fly_toml_env), **os.environ, **fleet_env}
    env.update(FLY_MACHINE_ID=machine.id, FLY_ALLOC_ID=machine.id, PYTHONUNBUFFERED="1")
    return env


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
    """Wait until the machine passes its health check on both paths; ``MachineStartError`` if not.

    With ``health_path``, a ``GET`` of it must answer 2xx (redirects are not followed), as Fly's
    HTTP checks (``[[http_service.checks]]``) require; without, a TCP connection to the machine's
    port must open (uvicorn listens only once the app's lifespan has started). Both ``127.0.0.1``
    (the edge's path, Fly's proxy's) and ``[::1]`` (the peers' path, 6PN's) must pass: a machine
    that passes on one only fails, with an error naming the path that could not connect.
    """
    deadline = time.monotonic() + within
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session:
        while True:
            if process.poll() is not None:
                raise MachineStartError(machine.id, f"process exited with code {process.returncode}", log_tail(machine))
            ipv4 = await _passes(session, machine, _IPV4, health_path)
            ipv6 = await _passes(session, machine, _IPV6, health_path)
            if ipv4 and ipv6:
                return
            if ipv4 or ipv6:
                deadline = min(deadline, time.monotonic() + OTHER_PATH_GRACE)
            if time.monotonic() > deadline:
                reason = _failed_check(machine, health_path, within, ipv4, ipv6)
                raise MachineStartError(machine.id, reason, log_tail(machine))
            await asyncio.sleep(0.05)


def _failed_check(machine: Machine, health_path: str | None, within: float, ipv4: bool, ipv6: bool) -> str:
    check = f"GET {health_path} not 2xx" if health_path else f"no TCP connection on port {machine.port}"
    if ipv6:
        return (
            f"it answered on IPv6 [::1]:{machine.port} but not on 127.0.0.1:{machine.port} ({check}): Fly's proxy, "
            "which reaches machines over IPv4, could not reach it; listen on 0.0.0.0 too (python -m "
            "fly_replay_router.serve does)"
        )
    if ipv4:
        return (
            f"it answered on 127.0.0.1:{machine.port} but not on IPv6 [::1]:{machine.port} ({check}): its peers on "
            "Fly's private network (6PN, IPv6 only) could not reach it; listen on :: too (python -m "
            "fly_replay_router.serve does)"
        )
    return f"{check} after {within:g}s"


async def _passes(session: aiohttp.ClientSession, machine: Machine, host: str, health_path: str | None) -> bool:
    with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
        if health_path is None:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, machine.port), 2)
            writer.close()
            return True
        url = f"http://{'[' + host + ']' if ':' in host else host}:{machine.port}{health_path}"
        async with session.get(url, allow_redirects=False) as response:
            return 200 <= response.status < 300
    return False


def free_port() -> int:
    """A port free right now on every IPv4 and IPv6 address, for a machine that listens on both families."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
        return int(sock.getsockname()[1])


def watch_exit(process: subprocess.Popen[bytes], on_exit: Callable[[], None]) -> bool:
    """Call ``on_exit`` in the running loop as soon as ``process`` exits (a pidfd becomes readable).

    False where there is no pidfd (not Linux): the caller's own loop must notice instead.
    """
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        return False
    loop = asyncio.get_running_loop()

    def exited() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        on_exit()

    loop.add_reader(pidfd, exited)
    return True


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


def _group_states(pgid: int) -> list[str] | None:
    """The kernel's one-letter state of every process in group ``pgid``, or ``None`` without ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    states = []
    group = str(pgid).encode()
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b") ", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile, or not ours to read
        if fields[2] == group:
            states.append(fields[0].decode())
    return states


async def wait_group_stopped(process: subprocess.Popen[bytes], within: float = 2.0) -> None:
    """Return once every live process of the group shows the stopped state (``T``), or after ``within`` s.

    ``SIGSTOP`` is delivered asynchronously: a process on another core may run on for a moment after
    ``killpg`` returns. Without ``/proc`` (not Linux) this returns at once.
    """
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        states = _group_states(process.pid)
        if states is None or all(state in "TtZX" for state in states):  # a zombie never stops
            return
        await asyncio.sleep(0.005)


def _own_group_and_die_with_parent() -> None:
    # Runs in the child between fork and exec: a new process group, and a signal when the edge
    # dies, even by SIGKILL. SIGKILL rather than SIGTERM: a suspended (SIGSTOPped) machine would
    # keep a SIGTERM pending forever, and with the edge gone nobody waits for a graceful stop.
    os.setsid()
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
