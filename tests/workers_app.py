"""A small sessionful ASGI app behind the affinity layer, for hand-over tests between worker processes.

Run two processes of it with one ``FLY_MACHINE_ID`` and one ``AFFINITY_WORKER_SOCKET_DIR``: they
are two workers of one machine, each on its own port, so a test chooses which worker a request
reaches. Every answer carries ``x-worker-pid``.

- ``POST /open``: a new session (``Mcp-Session-Id`` answer header, wrapped by the layer).
- ``POST /echo`` (session): streams the request body back chunk by chunk, as it arrives.
- ``GET /ticks`` (session): ``tick <n>`` lines every 0.1 s until the client leaves; then the
  session's disconnect count goes up.
- ``GET /disconnects`` (session): how many ``/ticks`` streams of the session saw their client leave.
- ``POST /block?seconds=S&marker=PATH`` (session): creates the file ``PATH``, then holds this process's
  event loop for ``S`` seconds (as a CPU-bound call in the loop does): it accepts no connection meanwhile.
- a session this process does not hold: 404.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import urllib.parse
import uuid
from typing import Any

from fly_replay_router import AffinityMiddleware, AffinitySettings

logging.basicConfig(level=logging.INFO)  # the layer's decision lines, which the tests read
_sessions: dict[str, int] = {}
_PID = str(os.getpid()).encode()


async def inner(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = dict(scope["headers"])
    session = headers.get(b"mcp-session-id", b"").decode()
    path = scope["path"]
    if path == "/open":
        session = uuid.uuid4().hex
        _sessions[session] = 0
        await _answer(send, 200, _PID, [(b"mcp-session-id", session.encode())])
        return
    if session not in _sessions:
        await _answer(send, 404, b"unknown session")
        return
    if path == "/echo":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-worker-pid", _PID)]})
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            await send({"type": "http.response.body", "body": message.get("body", b""), "more_body": True})
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/ticks":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"x-worker-pid", _PID)]})
        left = asyncio.ensure_future(receive_disconnect(receive))
        tick = 0
        while not left.done():
            tick += 1
            await send({"type": "http.response.body", "body": f"tick {tick}\n".encode(), "more_body": True})
            await asyncio.wait([left], timeout=0.1)
        _sessions[session] += 1
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    elif path == "/disconnects":
        await _answer(send, 200, str(_sessions[session]).encode())
    elif path == "/block":
        query = urllib.parse.parse_qs(scope["query_string"].decode())
        with open(query["marker"][0], "w") as marker:  # noqa: ASYNC230  (the point: nothing else runs)
            marker.write(str(os.getpid()))
        time.sleep(float(query["seconds"][0]))  # noqa: ASYNC251
        await _answer(send, 200, b"unblocked")
    else:
        await _answer(send, 404, b"no such path")


async def receive_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    head = [(b"x-worker-pid", _PID), (b"content-length", str(len(body)).encode()), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


app = AffinityMiddleware(inner, settings=AffinitySettings.from_env())
