"""Handing a request to the worker process that owns its session, over that worker's Unix socket.

Several worker processes of one machine (``uvicorn --workers N``, gunicorn) share its port, and the
kernel gives each connection to any of them; a session lives in the memory of one. A request that
reaches another worker is streamed to the owner over a local stream socket, and the owner's answer
streamed back, both ways as the messages come (no body is buffered). The exchange is ASGI messages
in frames (``fly_replay_router.affinity.frames``), so the owner runs the request through the same
layer and app with the client's scope.

Each write wakes the other side up once, so frames travel together where they can: a body of
known length leaves in one write with its scope, and the owner holds an answer's frames for up
to ``COALESCE_SECONDS`` (its last frame, or 64 KiB, goes at once), so that the start, the event
and the end of a ``tools/call`` answer arrive in one read.

A connection carries one exchange at a time and is kept open for the next (``siblings`` keeps a
few idle ones per owner): the owner reads the next ``S`` once it has ended its answer, and skips
what is left of a request whose answer ended before its body did. The scope names the sender in
the ``affinity-handed-over`` header, which only the layer sets (client copies are dropped), and a
request that carries it is never handed over again.

References: the ASGI HTTP connection scope and messages (https://asgi.readthedocs.io/en/latest/specs/www.html);
unix(7) (stream sockets).
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Mapping
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from fly_replay_router.affinity.frames import (
    BODY,
    BODY_END,
    CHUNK,
    DISCONNECT,
    END,
    FRAME_ERRORS,
    SCOPE,
    SCOPE_ERRORS,
    START,
    FrameChannel,
    decode_scope,
    decode_start,
    encode_scope,
    encode_start,
    frame,
)
from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fly_replay_router.affinity.siblings import SiblingConnection, Siblings

logger = logging.getLogger("fly_replay_router.affinity")

_DISCONNECT_MESSAGE: Message = {"type": "http.disconnect"}
# How long the owner may hold frames of an answer to send them in one write (the last frame of an
# answer, or this many bytes, goes at once): a streamed event reaches the sender this much later at most.
COALESCE_SECONDS = 0.002
_FLUSH_BYTES = 64 * 1024


class Outcome(enum.Enum):
    """How a hand-over ended: the owner answered, is busy (alive, not accepting in time), or is gone."""

    ANSWERED = "answered"
    BUSY = "busy"
    GONE = "gone"


class WorkerBusy(Exception):
    """The owner's socket exists and is listening, but did not accept a connection in time."""


class WorkerGone(Exception):
    """The owner's socket does not exist, or nobody listens on it (``ENOENT``, ``ECONNREFUSED``)."""


async def hand_over(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    siblings: Siblings,
    socket_path: str,
    sender: str,
    busy_timeout: float,
) -> Outcome:
    """Stream the request to the worker listening on ``socket_path`` and its answer back.

    ``GONE`` if nobody listens there (or the owner went away before answering), ``BUSY`` if it did
    not accept within ``busy_timeout`` seconds: in both cases nothing was answered. ``ANSWERED``
    once its answer started, however it ends.
    """
    head = frame(SCOPE, encode_scope(scope, sender))
    body_done = False
    if not _streamed_body(scope):
        # A body of known length (or none) goes in one write with the scope: one wake-up of the owner.
        first = await receive()
        body_done = first["type"] == "http.disconnect" or not first.get("more_body", False)
        if first["type"] == "http.disconnect":
            head += frame(DISCONNECT)
        else:
            head += frame(BODY_END if body_done else BODY, first.get("body", b""))
    # Else the scope goes at once: the owner may answer before the body arrives (or without reading it).
    fresh = False
    while True:
        try:
            connection = await siblings.connection(socket_path, busy_timeout, fresh=fresh)
        except WorkerGone as exc:
            logger.info("affinity: hand-over to %s failed: %s", socket_path, exc)
            return Outcome.GONE
        except WorkerBusy as exc:
            logger.warning("affinity: hand-over to %s waited %.3g s: %s", socket_path, busy_timeout, exc)
            return Outcome.BUSY
        connection.channel.write(head)
        if not connection.channel.is_closing() or fresh:
            break
        # The write failed at once (EPIPE: the owner had closed this idle connection): nothing of the
        # request reached it, so it goes once more, on a new connection.
        siblings.release(connection, reusable=False)
        fresh = True
    reusable = False
    try:
        outcome = await _exchange(receive, send, connection, body_done)
        if outcome is None:
            reusable = True
            return Outcome.ANSWERED
        return outcome if outcome is Outcome.ANSWERED else await siblings.after_silence(socket_path)
    finally:
        siblings.release(connection, reusable=reusable)


async def _exchange(receive: Receive, send: Send, connection: SiblingConnection, body_done: bool) -> Outcome | None:
    """The rest of one request on ``connection``, whose scope was written: None if it ended cleanly
    (the connection can carry another), ``ANSWERED`` if the answer started and was cut short,
    ``GONE`` if the owner closed before answering."""
    channel = connection.channel
    # A streamed body goes on as it comes. A request whose body went with its scope only has the
    # client's leaving left to tell, which matters once the answer streams: that watch starts the
    # first time this side waits for more of an answer (a tools/call answer arrives whole, in one
    # read, and needs none).
    pump = None if body_done else asyncio.ensure_future(_send_request(receive, channel, body_done=False))
    try:
        try:
            kind, payload = await channel.next()
            if kind != START:
                raise ValueError(f"a {kind!r} frame before the response start")
            start = decode_start(payload)
        except (*FRAME_ERRORS, *SCOPE_ERRORS) as exc:
            logger.info("affinity: the worker at %s closed before answering: %r", connection.socket_path, exc)
            return Outcome.GONE
        await send(start)
        while True:
            if pump is None and not channel.buffered:
                pump = asyncio.ensure_future(_send_request(receive, channel, body_done=True))
            try:
                kind, payload = await channel.next()
            except FRAME_ERRORS as exc:
                # The answer has started: all that is left is to end it.
                logger.info("affinity: the answer from the worker at %s was cut short: %r", connection.socket_path, exc)
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return Outcome.ANSWERED
            if kind == CHUNK:
                await send({"type": "http.response.body", "body": payload, "more_body": True})
                continue
            await send({"type": "http.response.body", "body": payload if kind == END else b"", "more_body": False})
            return None if kind == END else Outcome.ANSWERED
    finally:
        # Not awaited: once cancelled it writes nothing more (it is not running now, and its next
        # step raises), so the connection may carry the next request at once.
        if pump is not None:
            pump.cancel()


def _streamed_body(scope: Scope) -> bool:
    """The request body comes in chunks of unknown number (``Transfer-Encoding: chunked``)."""
    return b"transfer-encoding" in map(itemgetter(0), scope["headers"])


async def _send_request(receive: Receive, channel: FrameChannel, *, body_done: bool) -> None:
    """The rest of the request body to the owner as it arrives; then, once the client leaves, a disconnect."""
    try:
        while not body_done:
            await channel.drain()
            message = await receive()
            if message["type"] == "http.disconnect":
                channel.write(frame(DISCONNECT))
                return
            body_done = not message.get("more_body", False)
            channel.write(frame(BODY_END if body_done else BODY, message.get("body", b"")))
        if (await receive())["type"] == "http.disconnect":
            channel.write(frame(DISCONNECT))
    except (ConnectionError, OSError):
        return


async def serve_connection(app: ASGIApp, channel: FrameChannel, state: Mapping[str, Any], root: object) -> None:
    """Run the requests a sibling hands over on one connection through ``app`` (the owner's layer),
    one after the other, and stream each answer back; until the sibling closes the connection."""
    try:
        while True:
            try:
                kind, payload = await channel.next()
            except FRAME_ERRORS:
                return  # the sibling closed the connection
            if kind != SCOPE:
                continue  # the rest of a request whose answer has ended, or a late disconnect
            try:
                scope = decode_scope(payload, state, root)
            except SCOPE_ERRORS:
                return  # not a sender of this protocol: nothing to answer
            exchange = _OwnerSide(channel)
            try:
                await app(scope, exchange.receive, exchange.send)
            except Exception:
                logger.exception("affinity: a handed-over request failed in the app")
            if not exchange.started:
                # As a server does for an app that ended without answering.
                await exchange.send(
                    {"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"0")]}
                )
            if not exchange.ended:
                await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})
            channel.on_arrival(None)
            if channel.is_closing():
                return
    finally:
        channel.close()


class _OwnerSide:
    """``receive`` and ``send`` of a handed-over request, on the owner's end of the connection."""

    def __init__(self, channel: FrameChannel) -> None:
        self._channel = channel
        self._body_done = self._watching = False
        self._reading = asyncio.Lock()
        self._gone = asyncio.Event()
        self.started = self.ended = False
        self._queued: list[bytes] = []
        self._queued_bytes = 0
        self._flush_timer: asyncio.TimerHandle | None = None

    async def receive(self) -> Message:
        if not self._body_done:
            async with self._reading:
                if not self._body_done:
                    try:
                        kind, payload = await self._channel.next()
                    except FRAME_ERRORS:
                        kind, payload = DISCONNECT, b""
                    if kind == BODY:
                        return {"type": "http.request", "body": payload, "more_body": True}
                    self._body_done = True
                    if kind == BODY_END:
                        return {"type": "http.request", "body": payload, "more_body": False}
                    self._gone.set()
        if not self._watching and not self._gone.is_set():
            # Whatever comes next on the connection (a disconnect, or the end of it) means the client
            # left; it stays unread for the connection's loop. After the answer's end, nothing is watched.
            self._watching = True
            self._channel.on_arrival(self._gone.set)
        # As servers do: after the body, receive() waits until the client leaves or the answer ends.
        await self._gone.wait()
        return _DISCONNECT_MESSAGE

    async def send(self, message: Message) -> None:
        if self.ended or self._channel.is_closing():
            return  # the sender is gone: the answer goes nowhere, as with a client that left
        if message["type"] == "http.response.start":
            self._queue(frame(START, encode_start(message)))
            self.started = True
            return
        if message["type"] != "http.response.body":
            return
        more = message.get("more_body", False)
        self._queue(frame(CHUNK if more else END, message.get("body", b"")))
        if not more:
            self.ended = True
            self._gone.set()
            self._flush()
        elif self._queued_bytes >= _FLUSH_BYTES:
            self._flush()
        try:
            await self._channel.drain()
        except (ConnectionError, OSError):
            self._gone.set()

    def _queue(self, frame: bytes) -> None:
        # Frames leave together: the last one at once, the others within COALESCE_SECONDS, so that an
        # answer's start, its event and its end (a tools/call) wake the sender up once, not three times.
        self._queued.append(frame)
        self._queued_bytes += len(frame)
        if self._flush_timer is None:
            self._flush_timer = asyncio.get_running_loop().call_later(COALESCE_SECONDS, self._flush)

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self._queued and not self._channel.is_closing():
            self._channel.write(b"".join(self._queued))
        self._queued.clear()
        self._queued_bytes = 0
