"""The hand-over's wire format: ASGI messages in frames over a Unix stream socket.

::

    frame := kind (1 byte) | length (4 bytes, big-endian) | payload
    to the owner:   S scope · b body chunk, more to come · e last body chunk · D the client left
    to the sender:  R response start · B body chunk, more to come · E last chunk

The scope and the response start are lists of byte strings (``pack_fields``: their count, their
lengths, then the bytes one after the other; a bit mask marks the scope's fields that are absent,
such as ``client``), not a text document: no escaping, no parsing. Anything else is ``ValueError`` (or
``struct.error``): the connection is dropped. ``fly_replay_router.affinity.handover`` uses it.

Reference: the ASGI HTTP connection scope and messages (https://asgi.readthedocs.io/en/latest/specs/www.html).
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import Mapping
from itertools import accumulate, chain
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


class FrameReader:
    """The frames of one connection, in order: reads what the socket holds (often several frames at
    once, such as an answer's start, event and end) and hands them out one by one."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self._reader = reader
        self._buffer = b""
        self._offset = 0

    @property
    def buffered(self) -> bool:
        """Bytes were read that no frame has handed out yet."""
        return self._offset < len(self._buffer)

    async def next(self) -> tuple[bytes, bytes]:
        """The next frame's kind and payload; ``EOFError`` at the end of the connection. Safe to
        cancel: a frame is handed out whole or stays for the next call."""
        while True:
            buffer, offset = self._buffer, self._offset
            if len(buffer) - offset >= _FRAME.size:
                kind, length = _FRAME.unpack_from(buffer, offset)
                if length > MAX_FRAME_BYTES:
                    raise ValueError(f"a hand-over frame of {length} bytes")
                end = offset + _FRAME.size + length
                if len(buffer) >= end:
                    self._offset = end
                    return kind, buffer[offset + _FRAME.size : end]
                if length > _READ_BYTES:
                    # A large frame: the rest in one read of its exact size, not chunk by chunk.
                    rest = await self._reader.readexactly(end - len(buffer))
                    self._buffer, self._offset = b"", 0
                    return kind, buffer[offset + _FRAME.size :] + rest
            data = await self._reader.read(_READ_BYTES)
            if not data:
                raise EOFError("the connection ended")
            self._buffer, self._offset = buffer[offset:] + data, 0


def pack_fields(fields: list[bytes], absent: int = 0) -> bytes:
    """``fields`` as one payload: their count, a bit mask of absent ones (``None`` to the reader: bit
    ``i`` for field ``i``, the first 16 fields only), each length, then their bytes."""
    count = len(fields)
    return b"".join((_HEAD.pack(count, absent), _lengths(count).pack(*map(len, fields)), *fields))


def unpack_fields(payload: bytes) -> tuple[list[bytes], int]:
    """The fields ``pack_fields`` packed and its mask; ``ValueError`` (or ``struct.error``) for anything else."""
    count, absent = _HEAD.unpack_from(payload)
    ends = list(accumulate(_lengths(count).unpack_from(payload, _HEAD.size), initial=_HEAD.size + 4 * count))
    if ends[-1] != len(payload):
        raise ValueError("a hand-over frame whose fields do not fill it")
    return list(map(payload.__getitem__, map(slice, ends, ends[1:]))), absent


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
