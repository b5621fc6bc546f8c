"""Facts of the MCP protocol that the layer and the edge both rely on; no SDK is imported.

Reference: MCP specification, "Transports" (https://modelcontextprotocol.io/specification/2025-11-25/basic/transports):
session management with ``Mcp-Session-Id``, the ``MCP-Protocol-Version`` header, 404 for an unknown
session; and the 2024-11-05 "HTTP with SSE" transport (the ``endpoint`` event and its
``session_id`` query parameter).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable

MCP_SESSION_ID = b"mcp-session-id"
MCP_PROTOCOL_VERSION = b"mcp-protocol-version"
# The query parameter of the 2024-11-05 transport's message endpoint (``/messages/?session_id=...``).
LEGACY_SESSION_PARAMETER = "session_id"

# Protocol revisions that open a session with the initialize handshake. Later revisions
# (2026-07-28 on) are sessionless. Kept here rather than imported from an SDK, so that the layer
# runs in front of any SDK line without pinning one.
HANDSHAKE_PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")


# The legacy transport's endpoint event names the session in the query of the URL it gives:
# ``/messages/?session_id=<id>``. Group 1 is the ``?session_id=`` / ``&session_id=`` prefix, group 2
# the value.
ENDPOINT_SESSION_PARAM = re.compile(rb"([?&]session_id=)([^&#\r\n]+)")


def owner_of(token: str) -> str:
    """The machine a session token of this project *names* (the part before its first ``.``).

    Unverified: for display and bookkeeping (the edge's page, the example client) only. Routing
    trusts an owner only after ``TokenCodec.verify``.
    """
    return token.split(".", 1)[0]


# The body the official SDK sends for an unknown session (JSON-RPC "Invalid Request", no id).
SESSION_NOT_FOUND_BODY = json.dumps(
    {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}},
    separators=(",", ":"),
).encode("utf-8")


def is_event_stream(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """The headers declare ``Content-Type: text/event-stream`` (the first ``content-type`` header decides)."""
    for name, value in headers:
        if name == b"content-type":
            return is_event_stream_type(value)
    return False


# The two answer types as the SDKs send them (Starlette adds the charset to text/* types only);
# ``rewrite.Watcher`` compares an answer's value with them before it calls ``is_event_stream_type``.
SDK_EVENT_STREAM_TYPE = b"text/event-stream; charset=utf-8"
SDK_JSON_TYPE = b"application/json"
# The values servers send, decided without parsing.
_KNOWN_TYPES = {
    b"text/event-stream": True,
    SDK_EVENT_STREAM_TYPE: True,
    SDK_JSON_TYPE: False,
    b"text/plain; charset=utf-8": False,
}


def is_event_stream_type(value: bytes) -> bool:
    """A ``Content-Type`` value names ``text/event-stream``, whatever its parameters (the media type is
    case-insensitive, RFC 9110 8.3.1)."""
    known = _KNOWN_TYPES.get(value)
    if known is not None:
        return known
    return value.split(b";", 1)[0].strip().lower() == b"text/event-stream"
