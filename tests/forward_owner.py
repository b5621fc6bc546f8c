"""A stand-in owner machine for forwarding tests: records every request it gets and how its body ended.

``GET /_records`` answers the records as JSON; ``GET /_in_progress`` how many requests are reading
their body now (each holds a connection of the forwarder's pool); ``GET /healthz`` answers ok. Any other request has
its body read to the end (or to the disconnect) and is answered 200 with ``{"received": <bytes>}``
when the body was complete.
"""

from __future__ import annotations

import json
from typing import Any

Scope = dict[str, Any]

records: list[dict[str, Any]] = []
in_progress = 0


async def app(scope: Scope, receive: Any, send: Any) -> None:
    global in_progress
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            await send({"type": f"{message['type']}.complete"})
            if message["type"] == "lifespan.shutdown":
                return
    if scope["path"] in ("/healthz", "/_records", "/_in_progress"):
        answers = {"/_records": json.dumps(records).encode(), "/_in_progress": str(in_progress).encode()}
        await _answer(send, 200, answers.get(scope["path"], b"ok"))
        return
    received = 0
    complete = False
    in_progress += 1
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                complete = True
                break
    finally:
        in_progress -= 1
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
    records.append(
        {
            "method": scope["method"],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query": scope["query_string"].decode("latin-1"),
            "authorization": headers.get("authorization"),
            "forwarded_from": headers.get("affinity-forwarded-from"),
            "received": received,
            "complete": complete,
        }
    )
    if complete:
        await _answer(send, 200, json.dumps({"received": received}).encode())


async def _answer(send: Any, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
