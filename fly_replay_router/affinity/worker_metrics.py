"""A machine of several worker processes is one machine to the scraper: ``WorkerFigures``.

Fly's Prometheus scrapes a machine's metrics port, and the kernel gives the connection to any of
its workers. Each worker's figures live in its own memory, as plain integers (the hot path stays
cheap), so each worker also publishes them to a file of its own in a directory the workers of one
machine share, about once a second, at shutdown, and whenever it answers a scrape. The worker that
answers sums every file:

- a counter never goes down: a file only ever grows, and the file of a worker that died stays and
  keeps counting in the sum (what it counted after its last publication, at most a second, is
  lost with it); a replaced worker writes a new file;
- a gauge (sessions held, their cap) counts live workers only. A worker holds an exclusive
  ``flock`` on a lock file beside its figures for as long as it lives; the kernel releases it when
  the process dies, however it dies, so a lock that can be taken marks a dead worker;
- the directory must be empty when the machine starts: ``python -m fly_replay_router.serve``
  creates a new one for each run; ``supervisor_directory`` names one per supervisor process (its
  pid and start time) for ``uvicorn --workers`` and gunicorn.

This is Prometheus's own answer for several processes (the client library's multiprocess mode: a
file per process, summed at scrape time, dead processes marked) with the layer's plain counters
as the source, since the library's values would make the hot path pay for every increment.

References: Prometheus Python client, "Multiprocess mode" (https://prometheus.github.io/client_python/multiprocess/);
flock(2) (a lock is released when the last descriptor of its open file description is closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from fly_replay_router.affinity.figures import Figures, add_up

logger = logging.getLogger("fly_replay_router.affinity")

PUBLISH_INTERVAL = 1.0
_FIGURES_SUFFIX = ".json"
_LOCK_SUFFIX = ".lock"
# This process's publisher, if register_metrics(workers_dir=...) started one (one per process).
_ACTIVE: WorkerFigures | None = None


class WorkerFigures:
    """This worker's file in a machine's shared directory, and the sum of all of them."""

    def __init__(self, directory: str, source: Callable[[], Figures]) -> None:
        self.directory = Path(directory)
        self.source = source
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._lock_fd: int | None = None
        self._pid = os.getpid()
        self._published = ""

    @classmethod
    def start(cls, directory: str, source: Callable[[], Figures]) -> WorkerFigures:
        """This process's publisher for ``directory`` (the same one when called again)."""
        global _ACTIVE
        if _ACTIVE is None or _ACTIVE.directory != Path(directory) or _ACTIVE._pid != os.getpid():
            _ACTIVE = cls(directory, source)
        return _ACTIVE

    def publish(self) -> None:
        """Write this worker's figures to its file (atomically: a reader sees the old or the new)."""
        if self._pid != os.getpid():  # a forked copy (gunicorn --preload) is a worker of its own
            self._pid, self.name, self._lock_fd = os.getpid(), f"{os.getpid()}-{secrets.token_hex(4)}", None
            self._published = ""
        if self._lock_fd is None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self.directory.lstat()
            if info.st_uid != os.getuid() or info.st_mode & 0o022:
                raise PermissionError(f"{self.directory} must be this user's, and others must not write to it")
            fd = os.open(self.directory / f"{self.name}{_LOCK_SUFFIX}", os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._lock_fd = fd
        text = json.dumps(self.source().to_json(), separators=(",", ":"))
        if text == self._published:
            return  # an idle worker writes nothing
        temporary = self.directory / f".{self.name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.directory / f"{self.name}{_FIGURES_SUFFIX}")
        self._published = text

    def machine_figures(self) -> tuple[Figures, int]:
        """Every worker's figures summed (this one's as of now), and how many workers are alive."""
        try:
            self.publish()
        except OSError as exc:
            logger.warning("affinity: cannot publish this worker's metrics to %s (%s)", self.directory, exc)
            own = self.source()
            return own, 1
        every: list[Figures] = []
        alive: list[Figures] = []
        for path in sorted(self.directory.glob(f"*{_FIGURES_SUFFIX}")):
            try:
                figures = Figures.from_json(json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError, KeyError):
                continue  # not one of ours, or unreadable: leave it out rather than fail the scrape
            every.append(figures)
            name = path.name.removesuffix(_FIGURES_SUFFIX)
            if name == self.name or _alive(self.directory / f"{name}{_LOCK_SUFFIX}"):
                alive.append(figures)
        return add_up(every, sessions_of=alive), len(alive)

    @contextlib.asynccontextmanager
    async def publishing(self, interval: float = PUBLISH_INTERVAL) -> AsyncIterator[None]:
        """Publish every ``interval`` seconds in the running loop for the block, and once at its end."""

        async def loop() -> None:
            while True:
                try:
                    self.publish()
                except OSError as exc:
                    logger.warning("affinity: cannot publish this worker's metrics to %s (%s)", self.directory, exc)
                await asyncio.sleep(interval)

        task = asyncio.ensure_future(loop())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(OSError):
                self.publish()


def active() -> WorkerFigures | None:
    """This process's publisher, when ``register_metrics(workers_dir=...)`` made one."""
    return _ACTIVE if _ACTIVE is not None and _ACTIVE._pid == os.getpid() else None


def _alive(lock_path: Path) -> bool:
    """Whether the worker of ``lock_path`` lives: it holds the file's lock as long as it does."""
    try:
        fd = os.open(lock_path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops the shared lock this probe may have taken
    return False


def supervisor_directory(machine_id: str) -> str:
    """A directory for the workers of this process's supervisor (gunicorn's arbiter, uvicorn's).

    ``<temp dir>/fly-replay-router-<uid>/<machine_id>/metrics-<supervisor pid>-<its start time>``:
    new for each start of the supervisor, shared by all its workers, never by another run.
    """
    parent = os.getppid()
    started = "0"
    with contextlib.suppress(OSError, IndexError):
        # /proc/<pid>/stat field 22: the start time in clock ticks since boot (proc(5)).
        stat = Path(f"/proc/{parent}/stat").read_text(encoding="ascii")
        started = stat.rsplit(")", 1)[1].split()[19]
    root = Path(tempfile.gettempdir()) / f"fly-replay-router-{os.getuid()}" / machine_id
    return str(root / f"metrics-{parent}-{started}")
