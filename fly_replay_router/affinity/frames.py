"""The hand-over's wire format: ASGI messages in frames over a Unix stream socket.

::

    frame := kind (1 byte) | length (4 bytes, big-endian) | payload
    to the owner:   S scope · b body chunk, more to come · e last body chunk · D the client left
    to the sender:  R response start · B body chunk, more to come · E last chunk

The scope and the response start are lists of byte strings (``pack_fields``: their count, their
lengths, then the bytes one after the other; a bit mask marks the scope's fields that are absent,
such as ``client``), not a text document: no escaping, no parsing. Anything else is ``ValueError`` (or
``struct.error``): the connection is dropped. ``fly_replay_router.affinity.handover`` uses it, over ``FrameChannel``.

Reference: the ASGI HTTP connection scope and messages (https://asgi.readthedocs.io/en/latest/specs/www.html).
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from itertools import chain
from operator import itemgetter
from typing import Any

from fly_replay_router.asgi import Message, Scope

HANDED_OVER = b"affinity-handed-over"
# A frame larger than this is not something the layer sends: the connection is dropped.
MAX_FRAME_BYTES = 16 * 1024 * 1024

_FRAME = struct.Struct(">cI")
_READ_BYTES = 64 * 1024
_HEAD = struct.Struct(">HH")  # the number of fields, the mask of absent ones
# Bits of the mask of a scope: its fields that are None (an empty field stands in for them).
_NO_RAW_PATH, _NO_CLIENT, _NO_CLIENT_PORT, _NO_SERVER, _NO_SERVER_PORT = 1 << 4, 1 << 7, 1 << 8, 1 << 9, 1 << 10
SCOPE, BODY, BODY_END, DISCONNECT = b"S", b"b", b"e", b"D"
START, CHUNK, END = b"R", b"B", b"E"
FRAME_ERRORS = (EOFError, OSError, ValueError, struct.error)
SCOPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError, UnicodeError, IndexError, struct.error)
_ASGI = {"version": "3.0", "spec_version": "2.3"}
# method, scheme, http_version, path, raw_path, root_path, query_string, client host/port, server host/port
_SCOPE_FIELDS = 11


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame of ``kind`` around ``payload``."""
    return _FRAME.pack(kind, len(payload)) + payload


class FrameChannel(asyncio.Protocol):
    """One hand-over connection as frames: what arrives is cut into frames as it comes (often several
    in one read, such as an answer's start, event and end), and ``next`` hands them out in order;
    ``write`` puts bytes straight on the transport. A protocol rather than asyncio's streams: a frame
    that has arrived is handed out without a wait, and one wake-up of the reader per read.

    Flow control both ways: reading pauses while more than ``_READ_BYTES`` wait unread (a sender
    streaming a body to an owner that does not read it), and ``drain`` waits while the transport's
    write buffer is over its high-water mark. ``serve``: for a connection the owner accepted, what
    runs it (a task is started with the channel once connected).
    """

    def __init__(self, serve: Callable[[FrameChannel], Coroutine[Any, Any, None]] | None = None) -> None:
        self._serve = serve
        self.transport: asyncio.Transport | None = None
        self._pending = b""  # what arrived after the last complete frame
        # A frame larger than a read, as it arrives: its parts, their bytes, and the frame's size.
        self._parts: list[bytes] = []
        self._parts_bytes = self._needed = 0
        self._frames: deque[tuple[bytes, bytes]] = deque()
        self._frame_bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._paused = self._reading_paused = self._lost = False
        # Why no more frames will come: EOFError at the end, the ValueError of a bad frame, an OSError.
        self._end: BaseException | None = None
        self.task: asyncio.Task[None] | None = None
        self._on_arrival: Callable[[], object] | None = None

    # The protocol's side, called by the event loop.

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self._serve is not None:
            self.task = asyncio.get_running_loop().create_task(self._serve(self))

    def data_received(self, data: bytes) -> None:
        if self._needed:
            # The rest of a frame larger than a read: gathered, and joined once it is whole.
            self._parts.append(data)
            self._parts_bytes += len(data)
            if self._parts_bytes < self._needed:
                return
            data = b"".join(self._parts)
            self._parts, self._parts_bytes, self._needed = [], 0, 0
        elif self._pending:
            data = self._pending + data
        size = _FRAME.size
        offset = 0
        available = len(data)
        frames = self._frames
        while available - offset >= size:
            kind, length = _FRAME.unpack_from(data, offset)
            if length > MAX_FRAME_BYTES:
                self._pending = b""
                self._stop(ValueError(f"a hand-over frame of {length} bytes"))
                return
            end = offset + size + length
            if end > available:
                if end - offset > _READ_BYTES:
                    self._needed = end - offset
                    self._parts, self._parts_bytes = [data[offset:]], available - offset
                    offset = available
                break
            frames.append((kind, data[offset + size : end]))
            self._frame_bytes += length
            offset = end
        self._pending = data[offset:] if offset < available else b""
        if frames:
            self._wake()
            # Only whole frames count: the rest of a large frame must still arrive for anyone to read it.
            if self._frame_bytes > _READ_BYTES and not self._reading_paused:
                self._reading_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._stop(EOFError("the connection ended"))
        return False  # the transport closes

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._stop(EOFError("the connection ended") if exc is None else exc)
        self._drained()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._drained()

    # The user's side.

    @property
    def buffered(self) -> bool:
        """Bytes arrived that no ``next`` has handed out yet (a whole frame or part of one)."""
        return bool(self._frames or self._pending or self._needed)

    @property
    def ended(self) -> bool:
        """No more frames will come: the other side closed, the connection failed, or a frame was bad."""
        return self._end is not None

    async def next(self) -> tuple[bytes, bytes]:
        """The next frame's kind and payload; ``EOFError`` at the end of the connection, ``ValueError``
        for a frame over ``MAX_FRAME_BYTES``, an ``OSError`` if the connection failed. Safe to cancel:
        a frame is handed out whole or stays for the next call. One reader at a time (as with
        asyncio's streams, a second one waiting is a ``RuntimeError``)."""
        frames = self._frames
        while not frames:
            if self._end is not None:
                raise self._end.with_traceback(None)
            if self._waiter is not None:
                raise RuntimeError("a hand-over connection read by two tasks at once")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        frame = frames.popleft()
        self._frame_bytes -= len(frame[1])
        if self._reading_paused and self._frame_bytes <= _READ_BYTES:
            self._reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return frame

    def on_arrival(self, callback: Callable[[], object] | None) -> None:
        """Call ``callback`` once, as soon as a frame or the end of the connection is there to read,
        without reading it (at once if one is); ``None`` forgets a callback not yet called."""
        if callback is not None and (self._frames or self._end is not None):
            callback()
            return
        self._on_arrival = callback

    def write(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]

    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def drain(self) -> None:
        """Wait while the transport holds more unsent bytes than its high-water mark; ``ConnectionError``
        once the connection is lost."""
        if self._paused and not self._lost:
            # Each waiter its own future (two tasks of an app may send at once).
            waiter = asyncio.get_running_loop().create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self._lost:
            raise ConnectionResetError("the hand-over connection was lost")

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _drained(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        callback = self._on_arrival
        if callback is not None:
            self._on_arrival = None
            callback()

    def _stop(self, reason: BaseException) -> None:
        if self._end is None:
            self._end = reason
        if isinstance(reason, ValueError) and self.transport is not None:
            self.transport.close()
        self._wake()


def pack_fields(fields: list[bytes], absent: int = 0) -> bytes:
    """``fields`` as one payload: their count, a bit mask of absent ones (``None`` to the reader: bit
    ``i`` for field ``i``, the first 16 fields only), each length, then their bytes."""
    count = len(fields)
    return b"".join((_HEAD.pack(count, absent), _lengths(count).pack(*map(len, fields)), *fields))


def unpack_fields(payload: bytes) -> tuple[list[bytes], int]:
    """The fields ``pack_fields`` packed and its mask; ``ValueError`` (or ``struct.error``) for anything else."""
    count, absent = _HEAD.unpack_from(payload)
    at = _HEAD.size + 4 * count
    fields: list[bytes] = []
    append = fields.append
    # A loop of slices: cheaper on CPython 3.11 than mapping slice objects over the payload.
    for length in _lengths(count).unpack_from(payload, _HEAD.size):
        end = at + length
        append(payload[at:end])
        at = end
    if at != len(payload):
        raise ValueError("a hand-over frame whose fields do not fill it")
    return fields, absent


@functools.lru_cache(maxsize=64)
def _lengths(count: int) -> struct.Struct:
    return struct.Struct(f">{count}I")


def encode_scope(scope: Scope, sender: str) -> bytes:
    """The parts of an HTTP scope the owner needs, marked as handed over by ``sender``."""
    raw_path: bytes | None = scope.get("raw_path")
    client = scope.get("client")
    server = scope.get("server")
    absent = (
        (raw_path is None) * _NO_RAW_PATH
        | (client is None) * _NO_CLIENT
        | (server is None) * _NO_SERVER
        | (server is not None and server[1] is None) * _NO_SERVER_PORT
        | (client is not None and client[1] is None) * _NO_CLIENT_PORT
    )
    fields = [
        scope["method"].encode("ascii"),
        scope.get("scheme", "http").encode("ascii"),
        scope.get("http_version", "1.1").encode("ascii"),
        scope["path"].encode("utf-8"),
        raw_path or b"",
        scope.get("root_path", "").encode("utf-8"),
        scope["query_string"],
        *_address(client),
        *_address(server),
    ]
    headers = scope["headers"]
    if HANDED_OVER in map(itemgetter(0), headers):
        headers = [pair for pair in headers if pair[0] != HANDED_OVER]  # a client's copy of the mark
    fields.extend(chain.from_iterable(headers))
    fields += (HANDED_OVER, sender.encode("ascii"))
    return pack_fields(fields, absent)


def _address(address: Any) -> tuple[bytes, bytes]:
    if address is None:
        return b"", b""
    host, port = address
    return str(host).encode("utf-8"), b"" if port is None else str(port).encode("ascii")


def _port(text: bytes) -> int:
    if not text.isdigit():
        raise ValueError("a port that is not ASCII digits")
    return int(text)


def decode_scope(payload: bytes, state: Mapping[str, Any], app: object | None) -> Scope:
    """The HTTP scope a sender encoded, with this worker's lifespan ``state`` (copied, as servers do)."""
    fields, absent = unpack_fields(payload)
    if len(fields) < _SCOPE_FIELDS or (len(fields) - _SCOPE_FIELDS) % 2:
        raise ValueError("a hand-over scope of the wrong shape")
    method, scheme, version, path, raw_path, root_path, query, client_host, client_port, server_host, server_port = (
        fields[:_SCOPE_FIELDS]
    )
    scope: Scope = {
        "type": "http",
        "asgi": dict(_ASGI),
        "http_version": version.decode("ascii"),
        "method": method.decode("ascii"),
        "scheme": scheme.decode("ascii"),
        "path": path.decode("utf-8"),
        "raw_path": None if absent & _NO_RAW_PATH else raw_path,
        "root_path": root_path.decode("utf-8"),
        "query_string": query,
        "headers": list(zip(fields[_SCOPE_FIELDS::2], fields[_SCOPE_FIELDS + 1 :: 2], strict=True)),
        "client": None
        if absent & _NO_CLIENT
        else (client_host.decode("utf-8"), None if absent & _NO_CLIENT_PORT else _port(client_port)),
        "server": None
        if absent & _NO_SERVER
        else (server_host.decode("utf-8"), None if absent & _NO_SERVER_PORT else _port(server_port)),
        "state": dict(state),
    }
    if app is not None:
        scope["app"] = app
    return scope


def encode_start(message: Message) -> bytes:
    """An ``http.response.start`` message: its status, then its headers' names and values."""
    fields = [str(message["status"]).encode("ascii")]
    fields.extend(chain.from_iterable(message.get("headers", ())))
    return pack_fields(fields)


def decode_start(payload: bytes) -> Message:
    """The ``http.response.start`` message ``encode_start`` encoded."""
    fields, _ = unpack_fields(payload)
    status = fields[0] if fields else b""
    if not status.isdigit() or len(fields) % 2 == 0:
        raise ValueError("a hand-over response start of the wrong shape")
    return {
        "type": "http.response.start",
        "status": int(status),
        "headers": list(zip(fields[1::2], fields[2::2], strict=True)),
    }
