"""Ending a session the server minted but the budget refused: the client never learnt its id.

The layer answers such an opening with its refusal instead of the server's answer, so nobody
could ever use or end that session; left alone it would hold the server's memory (and a place
under the SDK's own cap) until its idle timeout. So the layer ends it the way a client would, with
a ``DELETE`` carrying the inner id, sent to the same app in-process on the same path with the
opening request's other headers (``Host`` and ``Origin`` for the SDK's checks, and the caller's
credentials, to which the SDK binds a session).

Reference: MCP "Streamable HTTP", session management (a client ends a session with ``DELETE``,
https://modelcontextprotocol.io/specification/2025-11-25/basic/transports).
"""

from __future__ import annotations

import logging

from fly_replay_router.asgi import ASGIApp, Message, Scope
from fly_replay_router.protocol import MCP_PROTOCOL_VERSION, MCP_SESSION_ID

logger = logging.getLogger("fly_replay_router.affinity")

# Headers of the opening that do not describe the DELETE: its body, its session, its version (the
# opening may have claimed one the server refuses on later requests; without it, the server assumes
# its default).
_NOT_CARRIED = frozenset(
    {MCP_SESSION_ID, MCP_PROTOCOL_VERSION, b"content-length", b"content-type", b"transfer-encoding"}
)


async def end_orphan(app: ASGIApp, opening: Scope, root_path: str, inner_session_id: bytes) -> bool:
    """Send ``DELETE`` for ``inner_session_id`` through ``app``; True if the server answered 2xx."""
    headers = [(name, value) for name, value in opening["headers"] if name not in _NOT_CARRIED]
    headers.append((MCP_SESSION_ID, inner_session_id))
    scope = {**opening, "method": "DELETE", "headers": headers, "root_path": root_path}
    scope.pop("endpoint", None)
    scope.pop("path_params", None)
    sent_body = False
    status = 0

    async def receive() -> Message:
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    try:
        await app(scope, receive, send)
    except Exception:
        logger.exception("affinity: ending a refused session in the server failed")
        return False
    if not 200 <= status < 300:
        logger.warning("affinity: the server answered %s to ending a refused session; it lingers until idle", status)
        return False
    return True
