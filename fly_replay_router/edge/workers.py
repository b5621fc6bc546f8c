"""The worker processes of a managed machine: which they are, and killing one (one worker's crash).

A machine runs the image's command; with ``--workers N`` that is a supervisor (uvicorn's, or
gunicorn's arbiter) and N worker processes sharing the machine's port, all in the machine's
process group, so that stop, suspend and kill of the machine reach every one of them. A worker is
a child of the machine's process that holds the machine's listening socket: that leaves out
helpers such as the resource tracker ``multiprocessing`` starts beside uvicorn's workers. A
machine of one process (``--workers 1``) is its own worker.

Everything is read from ``/proc`` (proc(5), Linux): a process's children from
``/proc/<pid>/task/<tid>/children`` where the kernel offers it, else from each process's parent in
``/proc/<pid>/stat``; listening sockets from ``/proc/net/tcp`` and ``/proc/net/tcp6``; a process's
sockets from ``/proc/<pid>/fd``. Where there is no ``/proc``, a machine shows no workers. Reading
only: a worker that dies is restarted by its supervisor, never by the edge.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

PROC = Path("/proc")
# Children of every process, read at most this often (the page asks a few times a second).
SNAPSHOT_SECONDS = 0.2
_TCP_LISTEN = "0A"
_snapshot: tuple[float, dict[int, list[int]]] = (0.0, {})
# (machine pid, port) -> inodes of the sockets listening on the port: fixed while the process lives.
_listeners: dict[tuple[int, int], frozenset[str]] = {}


class NotAWorker(LookupError):
    """The pid is not a worker of that machine (so the edge will not signal it)."""


def worker_pids(machine_pid: int, port: int, *, fresh: bool = False) -> list[int]:
    """The live worker processes of the machine whose process is ``machine_pid``, listening on ``port``.

    ``fresh`` reads the process table now rather than from a snapshot up to ``SNAPSHOT_SECONDS`` old.
    """
    inodes = _listening_inodes(machine_pid, port)
    if not inodes:
        return []
    workers = [pid for pid in _children(machine_pid, fresh=fresh) if _alive(pid) and _holds(pid, inodes)]
    if not workers and _holds(machine_pid, inodes):
        return [machine_pid]  # one process serves: the machine is its own worker
    return sorted(workers)


async def kill_worker(machine_pid: int, port: int, pid: int, *, within: float = 2.0) -> None:
    """SIGKILL one worker of the machine, as a crash, and wait until it is dead (or ``within`` seconds).

    ``NotAWorker`` unless ``pid`` is one of the machine's workers now: no other process is signalled.
    """
    if pid not in worker_pids(machine_pid, port, fresh=True):
        raise NotAWorker(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + within
    # Polled: nothing reports the end of a process the edge did not start. Dead means its files are
    # closed too: a process whose main thread exited still holds its sockets until its last thread
    # ends, and a request the edge sent on one of them then would be reset.
    while not _gone(pid) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


def _children(pid: int, *, fresh: bool) -> list[int]:
    tasks = PROC / str(pid) / "task"
    try:
        found: list[int] = []
        for task in tasks.iterdir():
            found += [int(child) for child in (task / "children").read_text().split()]
        return found
    except FileNotFoundError:
        pass  # no such process, or a kernel without CONFIG_PROC_CHILDREN: read every parent instead
    except OSError:
        return []
    return list(_parents(fresh=fresh).get(pid, ()))


def _parents(*, fresh: bool) -> dict[int, list[int]]:
    """Each parent pid -> its children's pids, from ``/proc/<pid>/stat`` (field 4 is the parent)."""
    global _snapshot
    taken, children = _snapshot
    now = time.monotonic()
    if not fresh and now - taken < SNAPSHOT_SECONDS:
        return children
    children = {}
    with contextlib.suppress(OSError), os.scandir(PROC) as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            try:
                stat = (PROC / entry.name / "stat").read_bytes()
            except OSError:
                continue  # it exited while we looked
            # The command name may hold spaces and parentheses: the fields start after its last ")".
            fields = stat.rsplit(b") ", 1)[-1].split()
            if len(fields) > 1:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    _snapshot = (now, children)
    return children


def _listening_inodes(machine_pid: int, port: int) -> frozenset[str]:
    key = (machine_pid, port)
    inodes = _listeners.get(key)
    if inodes is not None:
        return inodes
    found = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError), (PROC / "net" / table).open() as lines:
            next(lines, None)  # the header
            for line in lines:
                fields = line.split()
                # sl, local address:port (hex), remote address:port, state, ..., inode (the 10th field)
                if len(fields) > 9 and fields[3] == _TCP_LISTEN and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    found.add(fields[9])
    inodes = frozenset(found)
    if inodes and _holds(machine_pid, inodes):  # remembered once the machine's own sockets are there
        if len(_listeners) > 256:
            _listeners.clear()
        _listeners[key] = inodes
    return inodes


def _holds(pid: int, inodes: frozenset[str]) -> bool:
    """Whether ``pid`` has one of the sockets ``inodes`` open."""
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        with os.scandir(PROC / str(pid) / "fd") as fds:
            for fd in fds:
                with contextlib.suppress(OSError):
                    if os.readlink(fd.path) in wanted:
                        return True
    except OSError:
        return False
    return False


def _gone(pid: int) -> bool:
    """Exited with every file closed: no such process, or a zombie whose other threads ended too.

    (The files are shared by the threads and closed with the last one; a zombie main thread shows
    no files in ``/proc/<pid>/fd`` while its siblings still hold them, so the threads are counted.)
    """
    if _alive(pid):
        return False
    try:
        return os.listdir(PROC / str(pid) / "task") == [str(pid)]
    except OSError:
        return True


def _alive(pid: int) -> bool:
    """Running, sleeping or stopped; not a zombie its supervisor has yet to reap."""
    try:
        stat = (PROC / str(pid) / "stat").read_bytes()
    except OSError:
        return False
    return stat.rsplit(b") ", 1)[-1][:1] not in (b"Z", b"X")
