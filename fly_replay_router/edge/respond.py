"""The one way the edge writes an answer of its own (errors, the control surface, the page).

Answers relayed from machines do not pass here: their headers come from the machine (``headers.py``).
Reference: the ASGI specification, "HTTP" messages (https://asgi.readthedocs.io/en/latest/specs/www.html).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from fly_replay_router.asgi import Send

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"


async def start_response(send: Send, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Send the status line and headers; the body follows in ``http.response.body`` messages."""
    await send({"type": "http.response.start", "status": status, "headers": list(headers)})


async def respond(
    send: Send,
    status: int,
    body: bytes = b"",
    *,
    content_type: str | None = None,
    headers: Iterable[tuple[bytes, bytes]] = (),
    length: int | None = None,
) -> None:
    """A whole answer. ``length`` is the Content-Length to announce when it differs from ``body`` (HEAD)."""
    fields = [(b"content-type", content_type.encode())] if content_type is not None else []
    fields.append((b"content-length", str(len(body) if length is None else length).encode()))
    fields += headers
    await start_response(send, status, fields)
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def respond_json(send: Send, status: int, document: object) -> None:
    """A JSON answer, indented for people reading it with curl."""
    await respond(send, status, json.dumps(document, indent=2).encode() + b"\n", content_type=JSON)
