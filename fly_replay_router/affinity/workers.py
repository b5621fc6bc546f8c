"""Several worker processes on one machine: which worker owns a session, and its hand-over socket.

Fly routes to machines, not to processes; a machine may run N worker processes on its port
(``uvicorn --workers N``, gunicorn with uvicorn workers), and the kernel gives each connection to
any of them. So the inner id inside a token names the worker too::

    <worker tag>~<inner server's session id>

The worker tag is 8 random hex characters drawn when the worker starts serving: a restarted worker
is a new worker, and the sessions of the old one (gone with its memory) get 404. Each worker
listens on ``<socket dir>/<worker tag>.sock``; a request that reaches another worker of the right
machine is streamed there (``fly_replay_router.affinity.handover``, over connections that
``fly_replay_router.affinity.siblings`` keeps open) and served by its owner.

The socket directory (``AffinitySettings.worker_socket_dir``; by default
``<temp dir>/fly-replay-router-<uid>/<machine id>``) is created with mode 700 and refused if it
belongs to another user or others may write to it; each socket is mode 600. Only processes of the
same user on the same machine can connect, which is who could read the sessions' memory anyway.

Tokens minted before workers were named carry no tag: the worker that receives one serves it as
before, and the inner server answers 404 if that process does not hold the session.

Reference: unix(7) (socket files and their permissions).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import secrets
import socket
import stat
import tempfile
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fly_replay_router.affinity.decision import Reject, Serve
from fly_replay_router.affinity.frames import HANDED_OVER, FrameChannel
from fly_replay_router.affinity.handover import Outcome, hand_over, serve_connection
from fly_replay_router.affinity.siblings import Siblings
from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send
from fly_replay_router.settings import AffinitySettings

logger = logging.getLogger("fly_replay_router.affinity")

WORKER_SEPARATOR = "~"
# A Unix socket path must fit in sockaddr_un.sun_path (108 bytes on Linux, with the final NUL).
MAX_SOCKET_PATH_BYTES = 107
_WORKER_TAG = re.compile(r"[0-9a-f]{8}")
_SOCKET_SUFFIX = ".sock"
_DEFAULT_PARENT = "fly-replay-router-"


def default_socket_dir(machine_id: str) -> str:
    """``<temp dir>/fly-replay-router-<uid>/<machine_id>``: shared by the workers of one machine."""
    return os.path.join(tempfile.gettempdir(), f"{_DEFAULT_PARENT}{os.getuid()}", machine_id)


def socket_dir(settings: AffinitySettings) -> str:
    """The directory of this machine's worker sockets, from the settings or the default."""
    return settings.worker_socket_dir or default_socket_dir(settings.machine_id)


@dataclass(frozen=True, slots=True)
class HandOver:
    """Another worker process of this machine owns the session: stream the request to it."""

    owner_worker: str


def decide_worker(inner: str, *, this_worker: str, handed_over: bool) -> Serve | HandOver | Reject:
    """Which worker serves a request whose verified token holds ``inner`` (a pure function).

    A tag of this worker: serve the inner server's id here. An untagged id (a token minted before
    workers were named): serve it as it is. Another worker's tag: hand it over, unless it was
    handed over already (reason ``already_handed_over``: it never moves twice).
    """
    worker, separator, session_id = inner.partition(WORKER_SEPARATOR)
    if not separator or not _WORKER_TAG.fullmatch(worker):
        return Serve(inner)
    if worker == this_worker:
        return Serve(session_id)
    if handed_over:
        return Reject("already_handed_over")
    return HandOver(worker)


class WorkerChannel:
    """This worker's tag, and the Unix socket on which its sibling workers hand it requests.

    ``serve`` is the app handed-over requests run through: the affinity layer itself, so the owner
    verifies the token like any request. ``start`` opens the socket (from the ASGI lifespan, or
    at the first session this worker mints when no lifespan reaches the layer); ``stop`` closes it.
    """

    def __init__(self, directory: str, *, serve: ASGIApp, lazy: bool = False) -> None:
        self.directory = Path(directory)
        # Open the socket at the first session minted when no lifespan opened it: only where several
        # workers are declared, so that a single process (or an app called in-process) binds nothing.
        self.lazy = lazy
        self.siblings = Siblings()
        self._serve = serve
        self._pid = os.getpid()
        self.tag = secrets.token_hex(4)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._state: Mapping[str, Any] = {}
        self._root: object | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def serving(self) -> bool:
        """The socket is open in the running event loop (it cannot serve from a loop that ended)."""
        return self._loop is asyncio.get_running_loop()

    def socket_path(self, worker: str) -> str:
        return str(self.directory / f"{worker}{_SOCKET_SUFFIX}")

    async def start(self, *, state: Mapping[str, Any] | None = None, root: object | None = None) -> None:
        """Open this worker's socket; on failure log one warning (then only requests that reach
        this worker directly are served: enough for one worker per machine)."""
        if os.getpid() != self._pid:
            # A forked copy (gunicorn --preload): a process of its own, so a worker of its own.
            self._pid, self.tag = os.getpid(), secrets.token_hex(4)
        self._close_server()
        self._loop = asyncio.get_running_loop()
        self._state = {} if state is None else state
        self._root = root
        path = self.socket_path(self.tag)
        try:
            if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
                raise ValueError(f"the path is longer than the {MAX_SOCKET_PATH_BYTES} bytes a socket path may have")
            _prepare_directory(self.directory, check_parent=self.directory.parent.name.startswith(_DEFAULT_PARENT))
            _remove_stale_sockets(self.directory)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(path)
                os.chmod(path, 0o600)
                listener.listen(512)
            except OSError:
                listener.close()
                raise
            # A layer dropped without a shutdown (no lifespan, an event loop that ended) closes it too.
            self._finalizer = weakref.finalize(self, _close_listener, listener, path)
            self._server = await self._loop.create_unix_server(lambda: FrameChannel(self._accept), sock=listener)
        except (OSError, ValueError) as exc:
            logger.warning(
                "affinity: worker %s cannot open its hand-over socket %s (%s): its sessions are served only "
                "when their requests reach this process; set AFFINITY_WORKER_SOCKET_DIR to a directory it may use",
                self.tag,
                path,
                exc,
            )

    async def stop(self) -> None:
        """Close the socket and remove its file (later requests for this worker's sessions get 404), and
        the idle connections to the siblings."""
        self._close_server()
        self.siblings.close()
        self._loop = None

    def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if self._finalizer is not None:
            self._finalizer()
            self._finalizer = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """The socket open for the block (for an app mounted in another, from the parent's lifespan)."""
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    async def lifespan(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass a lifespan scope to ``app``; open the socket once it started, close it at shutdown."""

        async def send_started(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                await self.start(state=scope.get("state"), root=scope.get("app"))
            await send(message)

        async def receive_stopping() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.stop()
            return message

        await app(scope, receive_stopping, send_started)

    async def hand_over(
        self, scope: Scope, receive: Receive, send: Send, owner_worker: str, *, busy_timeout: float
    ) -> Outcome:
        """Stream the request to ``owner_worker`` and its answer back: ``ANSWERED``, or ``BUSY`` (it did
        not accept within ``busy_timeout`` seconds) or ``GONE`` (no socket, nobody listening), unanswered."""
        return await hand_over(
            scope,
            receive,
            send,
            siblings=self.siblings,
            socket_path=self.socket_path(owner_worker),
            sender=self.tag,
            busy_timeout=busy_timeout,
        )

    async def _accept(self, channel: FrameChannel) -> None:
        await serve_connection(self._serve, channel, self._state, self._root)


def handed_over(scope: Scope) -> bool:
    """The request came from a sibling worker (the header only the layer sets)."""
    return any(name == HANDED_OVER for name, _ in scope["headers"])


def _close_listener(listener: socket.socket, path: str) -> None:
    listener.close()
    with contextlib.suppress(OSError):
        os.unlink(path)


def _prepare_directory(directory: Path, *, check_parent: bool) -> None:
    # In a shared temp dir the parent is ours too: whoever owns it could swap the directory.
    for level in (directory.parent, directory) if check_parent else (directory,):
        with contextlib.suppress(FileExistsError):
            level.mkdir(mode=0o700, parents=not check_parent)
        info = level.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            raise ValueError(f"{level} must be a directory of this user that others cannot write to")


def _remove_stale_sockets(directory: Path) -> None:
    """Remove the sockets of workers that are gone (nobody listens: ``ECONNREFUSED``)."""
    for path in directory.glob(f"*{_SOCKET_SUFFIX}"):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                with contextlib.suppress(OSError):
                    path.unlink()
        finally:
            probe.close()
