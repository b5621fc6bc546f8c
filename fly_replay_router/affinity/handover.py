"""Handing a request to the worker process that owns its session, over that worker's Unix socket.

Several worker processes of one machine (``uvicorn --workers N``, gunicorn) share its port, and the
kernel gives each connection to any of them; a session lives in the memory of one. A request that
reaches another worker is streamed to the owner over a local stream socket, and the owner's answer
streamed back, both ways as the messages come (no body is buffered). The exchange is ASGI messages
in frames, so the owner runs the request through the same layer and app with the client's scope::

    frame := kind (1 byte) | length (4 bytes, big-endian) | payload
    to the owner:   S scope (JSON) · b body chunk, more to come · e last body chunk · D the client left
    to the sender:  R response start (JSON: status, headers) · B body chunk, more to come · E last chunk

One connection carries one request. The scope names the sender in the ``affinity-handed-over``
header, which only the layer sets (client copies are dropped), and a request that carries it is
never handed over again. An owner that is gone (no socket, nobody listening, or the connection
closes before the answer starts) makes ``hand_over`` return False: the caller answers 404.

References: the ASGI HTTP connection scope and messages (https://asgi.readthedocs.io/en/latest/specs/www.html);
unix(7) (stream sockets, ``ECONNREFUSED`` when nobody listens).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import struct
from collections.abc import Mapping
from typing import Any

from fly_replay_router.asgi import ASGIApp, Message, Receive, Scope, Send

logger = logging.getLogger("fly_replay_router.affinity")

HANDED_OVER = b"affinity-handed-over"
# A frame larger than this is not something the layer sends: the connection is dropped.
MAX_FRAME_BYTES = 16 * 1024 * 1024
# How long an owner that has answered waits for the sender to close the connection.
LINGER_SECONDS = 5.0

_FRAME = struct.Struct(">cI")
_SCOPE, _BODY, _BODY_END, _DISCONNECT = b"S", b"b", b"e", b"D"
_START, _CHUNK, _END = b"R", b"B", b"E"
_FRAME_ERRORS = (EOFError, OSError, ValueError, struct.error)
_SCOPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, UnicodeError)
_DISCONNECT_MESSAGE: Message = {"type": "http.disconnect"}


def _frame(kind: bytes, payload: bytes = b"") -> bytes:
    return _FRAME.pack(kind, len(payload)) + payload


async def _read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    kind, length = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"a hand-over frame of {length} bytes")
    return kind, (await reader.readexactly(length) if length else b"")


def _text_pairs(pairs: Any) -> list[list[str]]:
    return [[name.decode("latin-1"), value.decode("latin-1")] for name, value in pairs]


def _byte_pairs(pairs: Any) -> list[tuple[bytes, bytes]]:
    return [(name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs]


def encode_scope(scope: Scope, sender: str) -> bytes:
    """The parts of an HTTP scope the owner needs, as JSON, marked as handed over by ``sender``."""
    headers = _text_pairs((name, value) for name, value in scope["headers"] if name != HANDED_OVER)
    headers.append([HANDED_OVER.decode("ascii"), sender])
    raw_path: bytes | None = scope.get("raw_path")
    document = {
        "http_version": scope.get("http_version", "1.1"),
        "method": scope["method"],
        "scheme": scope.get("scheme", "http"),
        "path": scope["path"],
        "raw_path": None if raw_path is None else raw_path.decode("latin-1"),
        "root_path": scope.get("root_path", ""),
        "query_string": scope["query_string"].decode("latin-1"),
        "headers": headers,
        "client": scope.get("client"),
        "server": scope.get("server"),
    }
    return json.dumps(document, separators=(",", ":")).encode()


def decode_scope(payload: bytes, state: Mapping[str, Any], app: object | None) -> Scope:
    """The HTTP scope a sender encoded, with this worker's lifespan ``state`` (copied, as servers do)."""
    document = json.loads(payload)
    raw_path = document["raw_path"]
    client, server = document["client"], document["server"]
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": str(document["http_version"]),
        "method": str(document["method"]),
        "scheme": str(document["scheme"]),
        "path": str(document["path"]),
        "raw_path": None if raw_path is None else raw_path.encode("latin-1"),
        "root_path": str(document["root_path"]),
        "query_string": document["query_string"].encode("latin-1"),
        "headers": _byte_pairs(document["headers"]),
        "client": None if client is None else tuple(client),
        "server": None if server is None else tuple(server),
        "state": dict(state),
    }
    if app is not None:
        scope["app"] = app
    return scope


async def hand_over(
    scope: Scope, receive: Receive, send: Send, *, socket_path: str, sender: str, connect_timeout: float
) -> bool:
    """Stream the request to the worker listening on ``socket_path`` and its answer back.

    False if that worker could not be reached or closed the connection before answering (then
    nothing was sent); True once its answer started, however it ends.
    """
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_unix_connection(socket_path)
    except (OSError, TimeoutError) as exc:
        logger.info("affinity: hand-over to %s failed: %r", socket_path, exc)
        return False
    pump: asyncio.Future[None] | None = None
    try:
        writer.write(_frame(_SCOPE, encode_scope(scope, sender)))
        pump = asyncio.ensure_future(_send_request(receive, writer))
        try:
            kind, payload = await _read_frame(reader)
            start = json.loads(payload) if kind == _START else None
            status, headers = int(start["status"]), _byte_pairs(start["headers"])  # type: ignore[index]
        except (*_FRAME_ERRORS, *_SCOPE_ERRORS) as exc:
            logger.info("affinity: the worker at %s closed before answering: %r", socket_path, exc)
            return False
        await send({"type": "http.response.start", "status": status, "headers": headers})
        while True:
            try:
                kind, payload = await _read_frame(reader)
            except _FRAME_ERRORS as exc:
                # The answer has started: all that is left is to end it.
                logger.info("affinity: the answer from the worker at %s was cut short: %r", socket_path, exc)
                kind, payload = _END, b""
            if kind == _CHUNK:
                await send({"type": "http.response.body", "body": payload, "more_body": True})
                continue
            pump.cancel()
            await send({"type": "http.response.body", "body": payload if kind == _END else b"", "more_body": False})
            return True
    finally:
        if pump is not None:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_FRAME_ERRORS):
                await pump
        writer.close()


async def _send_request(receive: Receive, writer: asyncio.StreamWriter) -> None:
    """The request body to the owner as it arrives; then, once the client leaves, a disconnect."""
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                writer.write(_frame(_DISCONNECT))
                return
            more = message.get("more_body", False)
            writer.write(_frame(_BODY if more else _BODY_END, message.get("body", b"")))
            await writer.drain()
            if not more:
                break
        if (await receive())["type"] == "http.disconnect":
            writer.write(_frame(_DISCONNECT))
    except (ConnectionError, OSError):
        return


async def serve_connection(
    app: ASGIApp, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: Mapping[str, Any], root: object
) -> None:
    """Run one handed-over request through ``app`` (the owner's layer) and stream its answer back."""
    exchange: _OwnerSide | None = None
    try:
        try:
            kind, payload = await _read_frame(reader)
            if kind != _SCOPE:
                return
            scope = decode_scope(payload, state, root)
        except (*_FRAME_ERRORS, *_SCOPE_ERRORS):
            return  # not a sender of this protocol (or one that left at once): nothing to answer
        exchange = _OwnerSide(reader, writer)
        try:
            await app(scope, exchange.receive, exchange.send)
        except Exception:
            logger.exception("affinity: a handed-over request failed in the app")
        if not exchange.started:
            # As a server does for an app that ended without answering.
            await exchange.send({"type": "http.response.start", "status": 500, "headers": [(b"content-length", b"0")]})
        if not exchange.ended:
            await exchange.send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        if exchange is not None:
            await exchange.linger()
        writer.close()


class _OwnerSide:
    """``receive`` and ``send`` of a handed-over request, on the owner's end of the connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._body_done = False
        self._reading = asyncio.Lock()
        self._gone = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self.started = self.ended = False

    async def receive(self) -> Message:
        if not self._body_done:
            async with self._reading:
                if not self._body_done:
                    try:
                        kind, payload = await _read_frame(self._reader)
                    except _FRAME_ERRORS:
                        kind, payload = _DISCONNECT, b""
                    if kind == _BODY:
                        return {"type": "http.request", "body": payload, "more_body": True}
                    self._body_done = True
                    if kind == _BODY_END:
                        return {"type": "http.request", "body": payload, "more_body": False}
                    self._gone.set()
        if self._watcher is None and not self._gone.is_set():
            self._watcher = asyncio.ensure_future(self._watch_sender())
        # As servers do: after the body, receive() waits until the client leaves or the answer ends.
        await self._gone.wait()
        return _DISCONNECT_MESSAGE

    async def _watch_sender(self) -> None:
        with contextlib.suppress(*_FRAME_ERRORS):
            await _read_frame(self._reader)  # a disconnect frame, or the end of the connection
        self._gone.set()

    async def send(self, message: Message) -> None:
        if self.ended or self._writer.is_closing():
            return  # the sender is gone: the answer goes nowhere, as with a client that left
        if message["type"] == "http.response.start":
            start = {"status": message["status"], "headers": _text_pairs(message.get("headers", ()))}
            self._writer.write(_frame(_START, json.dumps(start, separators=(",", ":")).encode()))
            self.started = True
        elif message["type"] == "http.response.body":
            more = message.get("more_body", False)
            self._writer.write(_frame(_CHUNK if more else _END, message.get("body", b"")))
            if not more:
                self.ended = True
                self._gone.set()
        else:
            return
        try:
            await self._writer.drain()
        except (ConnectionError, OSError):
            self._gone.set()

    async def linger(self) -> None:
        """Wait for the sender to close first (briefly): an answer that ended before the request
        body did would otherwise be lost to the sender, whose writes then fail (``EPIPE``)."""
        self._gone.set()
        if self._watcher is not None:
            self._watcher.cancel()
        with contextlib.suppress(*_FRAME_ERRORS, TimeoutError, RuntimeError):
            self._writer.write_eof()
            async with asyncio.timeout(LINGER_SECONDS):
                while await self._reader.read(65536):
                    pass  # the rest of a body nobody reads any more
