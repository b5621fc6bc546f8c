"""A user's app as the edge meets it: MCP-like at ``/notes/mcp``, ready at ``/ready``, nothing at ``/healthz``.

``uvicorn tests.edge.plain_app:app``: every request line is printed (so a test can see which
health checks reached it); ``/ready`` and ``/notes/mcp`` answer 200 with the machine's id, anything
else 404.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        del message
        await send({"type": "lifespan.shutdown.complete"})
        return
    print(f"plain-app {scope['method']} {scope['path']}", flush=True)
    known = scope["path"] in ("/ready", "/notes/mcp")
    body = json.dumps({"machine": os.environ.get("FLY_MACHINE_ID")} if known else {"error": "not here"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200 if known else 404,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
