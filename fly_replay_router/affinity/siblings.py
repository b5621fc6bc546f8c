"""Connections to the sibling workers of this machine, kept open between hand-overs.

A hand-over (``fly_replay_router.affinity.handover``) takes an idle connection to the owner's Unix
socket if there is one, else opens one; once its exchange ended cleanly the connection goes back,
and at most ``IDLE_PER_OWNER`` idle ones are kept per owner (the rest are closed). Busy
connections are not limited: a long answer (an event stream) holds its own.

Busy is not gone. ``connect()`` on a Unix stream socket whose listen backlog is full fails with
``EAGAIN`` at once: the owner is alive but has not accepted yet (a burst, a long CPU-bound call).
That is retried, with a short backoff, for up to the busy timeout (``AFFINITY_WORKER_BUSY_TIMEOUT``),
then ``WorkerBusy`` (the caller answers 503 with ``Retry-After``: the session lives). Only
``ENOENT`` (no socket) and ``ECONNREFUSED`` (nobody listening on it) are ``WorkerGone`` (404).

An idle connection whose owner went away is seen closed (end of file) before it is used, and
dropped; no request is ever sent on it, so none is sent twice. An owner that closes a connection
after a request was sent and before it answered is probed with a fresh connection to tell which
of the two it is; the request is not sent again.

Reference: unix(7) (``connect`` on a stream socket: ``EAGAIN`` when the backlog is full,
``ECONNREFUSED`` when nobody listens); connect(2).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from dataclasses import dataclass

from fly_replay_router.affinity.frames import FrameChannel
from fly_replay_router.affinity.handover import Outcome, WorkerBusy, WorkerGone

IDLE_PER_OWNER = 8
# The backoff between two connects to a full backlog: from the first to the longest wait.
_FIRST_RETRY_SECONDS = 0.001
_LONGEST_RETRY_SECONDS = 0.05
_GONE = (errno.ENOENT, errno.ECONNREFUSED)


@dataclass(slots=True)
class SiblingConnection:
    """One open connection to the worker listening on ``socket_path``."""

    socket_path: str
    channel: FrameChannel

    def usable(self) -> bool:
        """Still open both ways, with nothing unread: an owner that went away shows here as end of file."""
        channel = self.channel
        return not (channel.is_closing() or channel.ended or channel.buffered)


class Siblings:
    """Open connections to this machine's other workers, by socket path (one event loop's)."""

    def __init__(self, idle_per_owner: int = IDLE_PER_OWNER) -> None:
        self.idle_per_owner = idle_per_owner
        self._idle: dict[str, list[SiblingConnection]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    async def connection(self, socket_path: str, busy_timeout: float, *, fresh: bool = False) -> SiblingConnection:
        """An idle connection to ``socket_path`` (unless ``fresh``), or a new one; ``WorkerBusy`` or
        ``WorkerGone`` if none."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            # Connections belong to the loop that opened them (a test may run several loops in turn).
            self.close()
            self._loop = loop
        idle = None if fresh else self._idle.get(socket_path)
        while idle:
            connection = idle.pop()
            if connection.usable():
                return connection
            connection.channel.close()
        sock = await connect(socket_path, busy_timeout)
        _, channel = await loop.create_unix_connection(FrameChannel, sock=sock)
        return SiblingConnection(socket_path, channel)

    def idle(self, socket_path: str) -> int:
        """How many idle connections to ``socket_path`` are kept that still look open."""
        return sum(connection.usable() for connection in self._idle.get(socket_path, ()))

    def release(self, connection: SiblingConnection, *, reusable: bool) -> None:
        """Keep ``connection`` for the next hand-over if it ended cleanly and there is room; else close it."""
        idle = self._idle.setdefault(connection.socket_path, [])
        if reusable and connection.usable() and len(idle) < self.idle_per_owner:
            idle.append(connection)
        else:
            connection.channel.close()

    async def after_silence(self, socket_path: str) -> Outcome:
        """An owner closed a connection before answering: ``GONE`` if nobody listens there any more,
        else ``BUSY`` (it is alive; the request is not sent again, it may have been taken)."""
        for connection in self._idle.pop(socket_path, ()):
            connection.channel.close()
        try:
            probe = await connect(socket_path, 0)
        except WorkerGone:
            return Outcome.GONE
        except WorkerBusy:
            return Outcome.BUSY
        probe.close()
        return Outcome.BUSY

    def close(self) -> None:
        """Close every idle connection."""
        for idle in self._idle.values():
            for connection in idle:
                with contextlib.suppress(RuntimeError):  # its event loop has ended
                    connection.channel.close()
        self._idle.clear()


async def connect(socket_path: str, busy_timeout: float) -> socket.socket:
    """A connected non-blocking socket to ``socket_path``, waiting up to ``busy_timeout`` seconds while
    the owner's backlog is full; ``WorkerGone`` or ``WorkerBusy`` (see the module docstring)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + busy_timeout
    delay = _FIRST_RETRY_SECONDS
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(socket_path)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno in _GONE:
                raise WorkerGone(f"{exc.strerror} ({errno.errorcode[exc.errno]})") from None
            if exc.errno == errno.EINTR:
                continue
            if exc.errno != errno.EAGAIN:
                # Not the two answers of a worker that is gone: treated as busy, the session lives.
                raise WorkerBusy(f"{exc.strerror} ({errno.errorcode.get(exc.errno or 0, exc.errno)})") from None
        left = deadline - loop.time()
        if left <= 0:
            raise WorkerBusy("its listen backlog stayed full (EAGAIN)")
        await asyncio.sleep(min(delay, left))
        delay = min(delay * 2, _LONGEST_RETRY_SECONDS)
