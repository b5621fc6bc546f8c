"""The hand-over's wire format: ASGI messages in frames over a Unix stream socket.

::

    frame := kind (1 byte) | length (4 bytes, big-endian) | payload
    to the owner:   S scope · b body chunk, more to come · e last body chunk · D the client left
    to the sender:  R response start · B body chunk, more to come · E last chunk

The scope and the response start are lists of byte strings (``pack_fields``: their count, their
lengths, then the bytes one after the other; a length of ``0xFFFFFFFF`` for a field that is
absent), not a text document: no escaping, no parsing. Anything else is ``ValueError`` (or
``struct.error``): the connection is dropped. ``fly_replay_router.affinity.handover`` uses it.

Reference: the ASGI HTTP connection scope and messages (https://asgi.readthedocs.io/en/latest/specs/www.html).
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Mapping
from typing import Any

from fly_replay_router.asgi import Message, Scope

HANDED_OVER = b"affinity-handed-over"
# A frame larger than this is not something the layer sends: the connection is dropped.
MAX_FRAME_BYTES = 16 * 1024 * 1024

_FRAME = struct.Struct(">cI")
_COUNT = struct.Struct(">H")
_ABSENT = 0xFFFFFFFF  # the length of a field that is None (raw_path, client, server)
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


async def read_frame(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next frame's kind and payload; ``EOFError`` (``IncompleteReadError``) at the end of the connection."""
    kind, length = _FRAME.unpack(await reader.readexactly(_FRAME.size))
    if length > MAX_FRAME_BYTES:
        raise ValueError(f"a hand-over frame of {length} bytes")
    return kind, (await reader.readexactly(length) if length else b"")


def pack_fields(fields: list[bytes | None]) -> bytes:
    """``fields`` as one payload: their count, each length (``None``: absent), then their bytes."""
    lengths = [_ABSENT if field is None else len(field) for field in fields]
    return b"".join(
        (_COUNT.pack(len(fields)), struct.pack(f">{len(fields)}I", *lengths), *(f for f in fields if f is not None))
    )


def unpack_fields(payload: bytes) -> list[bytes | None]:
    """The fields ``pack_fields`` packed; ``ValueError`` (or ``struct.error``) for anything else."""
    (count,) = _COUNT.unpack_from(payload)
    lengths = struct.unpack_from(f">{count}I", payload, _COUNT.size)
    fields: list[bytes | None] = []
    offset = _COUNT.size + 4 * count
    for length in lengths:
        if length == _ABSENT:
            fields.append(None)
            continue
        end = offset + length
        if end > len(payload):
            raise ValueError("a hand-over field runs past its frame")
        fields.append(payload[offset:end])
        offset = end
    if offset != len(payload):
        raise ValueError("a hand-over frame holds more than its fields")
    return fields


def _address(address: Any) -> tuple[bytes | None, bytes | None]:
    if address is None:
        return None, None
    host, port = address
    return str(host).encode("utf-8"), None if port is None else str(port).encode("ascii")


def _port(text: bytes | None) -> int | None:
    if text is None:
        return None
    if not text.isdigit():
        raise ValueError("a port that is not ASCII digits")
    return int(text)


def encode_scope(scope: Scope, sender: str) -> bytes:
    """The parts of an HTTP scope the owner needs, marked as handed over by ``sender``."""
    raw_path: bytes | None = scope.get("raw_path")
    client_host, client_port = _address(scope.get("client"))
    server_host, server_port = _address(scope.get("server"))
    fields: list[bytes | None] = [
        scope["method"].encode("ascii"),
        scope.get("scheme", "http").encode("ascii"),
        scope.get("http_version", "1.1").encode("ascii"),
        scope["path"].encode("utf-8"),
        raw_path,
        scope.get("root_path", "").encode("utf-8"),
        scope["query_string"],
        client_host,
        client_port,
        server_host,
        server_port,
    ]
    for name, value in scope["headers"]:
        if name != HANDED_OVER:
            fields += (name, value)
    fields += (HANDED_OVER, sender.encode("ascii"))
    return pack_fields(fields)


def decode_scope(payload: bytes, state: Mapping[str, Any], app: object | None) -> Scope:
    """The HTTP scope a sender encoded, with this worker's lifespan ``state`` (copied, as servers do)."""
    fields = unpack_fields(payload)
    if len(fields) < _SCOPE_FIELDS or (len(fields) - _SCOPE_FIELDS) % 2:
        raise ValueError("a hand-over scope of the wrong shape")
    method, scheme, version, path, raw_path, root_path, query, client_host, client_port, server_host, server_port = (
        fields[:_SCOPE_FIELDS]
    )
    pairs = fields[_SCOPE_FIELDS:]
    headers = list(zip(pairs[::2], pairs[1::2], strict=True))
    if any(part is None for pair in headers for part in pair):
        raise ValueError("a hand-over header without a name or a value")
    scope: Scope = {
        "type": "http",
        "asgi": dict(_ASGI),
        "http_version": version.decode("ascii"),  # type: ignore[union-attr]
        "method": method.decode("ascii"),  # type: ignore[union-attr]
        "scheme": scheme.decode("ascii"),  # type: ignore[union-attr]
        "path": path.decode("utf-8"),  # type: ignore[union-attr]
        "raw_path": raw_path,
        "root_path": root_path.decode("utf-8"),  # type: ignore[union-attr]
        "query_string": query if query is not None else b"",
        "headers": headers,
        "client": None if client_host is None else (client_host.decode("utf-8"), _port(client_port)),
        "server": None if server_host is None else (server_host.decode("utf-8"), _port(server_port)),
        "state": dict(state),
    }
    if app is not None:
        scope["app"] = app
    return scope


def encode_start(message: Message) -> bytes:
    fields: list[bytes | None] = [str(message["status"]).encode("ascii")]
    for name, value in message.get("headers", ()):
        fields += (bytes(name), bytes(value))
    return pack_fields(fields)


def decode_start(payload: bytes) -> Message:
    status, *pairs = unpack_fields(payload)
    if status is None or not status.isdigit() or len(pairs) % 2 or None in pairs:
        raise ValueError("a hand-over response start of the wrong shape")
    headers = list(zip(pairs[::2], pairs[1::2], strict=True))
    return {"type": "http.response.start", "status": int(status), "headers": headers}
