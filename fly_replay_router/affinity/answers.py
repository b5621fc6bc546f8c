"""The answers the layer gives itself, instead of the MCP server's: 404, replays, refusals, forward failures.

404 with the official SDK's own body is the MCP signal that a session is gone: the client starts a
new one. A forward that fails while the owner still holds the session gets another status (503,
504, 502, 408), so that the client keeps it and may try again.

Reference: MCP "Streamable HTTP", session management
(https://modelcontextprotocol.io/specification/2025-11-25/basic/transports); RFC 9110 section 15
(status codes); JSON-RPC 2.0 error objects.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fly_replay_router.asgi import Send
from fly_replay_router.fly import FLY_REPLAY, ReplayInstruction
from fly_replay_router.protocol import SESSION_NOT_FOUND_BODY

if TYPE_CHECKING:
    from fly_replay_router.affinity.capacity import Full, RateLimited

_FLY_REPLAY = FLY_REPLAY.encode("ascii")

_NOT_FOUND_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", str(len(SESSION_NOT_FOUND_BODY)).encode("ascii")),
]
_FORWARD_FAILURES = {
    408: "The request body stopped arriving before it was complete",
    502: "The session's machine could not complete the request",
    503: "The session's machine is busy: try again",
    504: "The session's machine did not answer in time",
}


async def send_not_found(send: Send) -> None:
    """404 with the SDK's body for an unknown session."""
    await send({"type": "http.response.start", "status": 404, "headers": _NOT_FOUND_HEADERS})
    await send({"type": "http.response.body", "body": SESSION_NOT_FOUND_BODY})


async def send_forward_failure(send: Send, status: int) -> None:
    """408, 502, 503 or 504 with a JSON-RPC error body; 503 says when to try again."""
    error = {"code": -32603, "message": _FORWARD_FAILURES[status]}
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}, separators=(",", ":")).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode("ascii"))]
    if status == 503:
        headers.append((b"retry-after", b"1"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_replay(send: Send, instruction: ReplayInstruction, text: str) -> None:
    """307 with ``fly-replay``: Fly's proxy throws this answer away and replays the request.

    307, not 2xx: without Fly in front, this answer must not look like a success.
    """
    body = text.encode("utf-8")
    headers = [
        (_FLY_REPLAY, instruction.to_header().encode("ascii")),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"content-length", str(len(body)).encode("ascii")),
    ]
    await send({"type": "http.response.start", "status": 307, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_refusal(send: Send, refusal: RateLimited | Full) -> None:
    """429 or 503 for a new session refused now, with ``Retry-After`` and a JSON-RPC error body."""
    error = {"code": -32000, "message": refusal.message}
    body = json.dumps({"jsonrpc": "2.0", "id": None, "error": error}, separators=(",", ":")).encode("utf-8")
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode("ascii")),
        (b"retry-after", str(refusal.retry_after).encode("ascii")),
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
