"""A probe machine: answers with the ``fly-replay`` values a test asks for, and records what it saw.

A request tells each probe what to answer, by machine id, so that one request can drive a chain:

- ``x-probe-replay-<id>: <value>``: machine ``<id>`` answers 307 with ``fly-replay: <value>``
  (unless the request came back by fallback, ``fly-replay-failed``, and ``x-probe-replay-on-fallback``
  is absent);
- ``x-probe-json-<id>: <json>``: machine ``<id>`` answers with the JSON form;
- ``x-probe-cache-<id>: <value>``: adds ``fly-replay-cache: <value>`` (and ``x-probe-cache-ttl``);
- ``x-probe-status-<id>: <code>``: machine ``<id>`` answers that status (no replay).

Paths: ``/healthz``; ``/slow?seconds=S``; ``/env`` (the machine's FLY_* / AFFINITY_* environment); ``/stream?gate=NAME``
(an SSE event, then a second one once the test sets ``GATES[NAME]``); ``/stream?hang=1`` (one event,
then silence until the connection closes); ``/upload?name=NAME`` (reads the body chunk by chunk,
logging sizes in ``UPLOADS``); anything else echoes the request as JSON. Runs in-process (``ProbeMachine(id)``) or as
``uvicorn tests.edge.edge_probe:app`` with ``FLY_MACHINE_ID`` set.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

GATES: dict[str, threading.Event] = {}
# Set by a /stream?gate=NAME machine once it has sent its second event: what the machine did, not the test.
SENT_SECOND: dict[str, threading.Event] = {}
UPLOADS: dict[str, list[int]] = {}


class ProbeMachine:
    """One probe machine; ``seen`` lists every request it received (method, path, headers, body)."""

    def __init__(self, machine_id: str) -> None:
        self.machine_id = machine_id
        self.seen: list[dict[str, Any]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        query = parse_qs(scope["query_string"].decode())
        path = scope["path"]
        if path == "/upload":
            await self._upload(query["name"][0], receive, send)
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.seen.append(
            {
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "headers": headers,
                "body": body,
                "raw_headers": [(k.decode().lower(), v.decode()) for k, v in scope["headers"]],
            }
        )
        me = self.machine_id
        came_back = "fly-replay-failed" in headers and "x-probe-replay-on-fallback" not in headers
        if f"x-probe-replay-{me}" in headers and not came_back:
            extra = [(b"fly-replay", headers[f"x-probe-replay-{me}"].encode())]
            if f"x-probe-cache-{me}" in headers:
                extra.append((b"fly-replay-cache", headers[f"x-probe-cache-{me}"].encode()))
                extra.append((b"fly-replay-cache-ttl-secs", headers.get("x-probe-cache-ttl", "60").encode()))
            await _answer(send, 307, b"replay answer, must not reach the client", extra)
            return
        if f"x-probe-json-{me}" in headers and not came_back:
            content_type = [(b"content-type", b"application/vnd.fly.replay+json")]
            await _answer(send, 200, headers[f"x-probe-json-{me}"].encode(), content_type)
            return
        if path == "/healthz":
            await _answer(send, 200, b"ok", [])
        elif path == "/env":
            env = {k: v for k, v in os.environ.items() if k.startswith(("FLY_", "AFFINITY_", "PRIMARY_"))}
            await _answer(send, 200, json.dumps(env).encode(), [(b"content-type", b"application/json")])
        elif path == "/slow":  # headers only after a pause
            await asyncio.sleep(float(query["seconds"][0]))
            await _answer(send, 200, b"late", [])
        elif path == "/stream":
            await self._stream(query, receive, send)
        else:
            status = int(headers.get(f"x-probe-status-{me}", "200"))
            echo = {
                "machine": me,
                "method": scope["method"],
                "path": path,
                "query": scope["query_string"].decode(),
                "headers": headers,
                "body_len": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
            }
            await _answer(send, status, json.dumps(echo).encode(), [(b"content-type", b"application/json")])

    async def _stream(self, query: dict[str, list[str]], receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
            }
        )
        await send({"type": "http.response.body", "body": b"event: first\ndata: 1\n\n", "more_body": True})
        if "hang" in query:  # silent until the other side hangs up
            while (await receive())["type"] != "http.disconnect":
                pass
            return
        name = query.get("gate", ["default"])[0]
        gate = GATES.setdefault(name, threading.Event())
        for _ in range(3000):
            if gate.is_set():
                break
            await asyncio.sleep(0.01)
        await send({"type": "http.response.body", "body": b"event: second\ndata: 2\n\n", "more_body": False})
        SENT_SECOND.setdefault(name, threading.Event()).set()

    async def _upload(self, name: str, receive: Receive, send: Send) -> None:
        sizes = UPLOADS.setdefault(name, [])
        digest = hashlib.sha256()
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            if chunk:
                sizes.append(len(chunk))
                digest.update(chunk)
            if not message.get("more_body"):
                break
        echo = {"machine": self.machine_id, "body_len": sum(sizes), "body_sha256": digest.hexdigest()}
        await _answer(send, 200, json.dumps(echo).encode(), [(b"content-type", b"application/json")])


def dead_url() -> str:
    """A loopback URL nothing listens on: a machine that refuses connections."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def _answer(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers = [*headers, (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


app = ProbeMachine(os.environ.get("FLY_MACHINE_ID", "probe"))
