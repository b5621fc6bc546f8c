"""The edge's own endpoints under ``/_edge/`` (never forwarded to a machine).

- ``GET /_edge/``: the live page (``page.py``), with ``/_edge/static/<file>`` and the SSE feed
  ``GET /_edge/events``;
- ``GET /_edge/status``: machines, sessions, counters, errors by code, the last routing events
  (see ``EdgeStatus.to_json``);
- ``POST /_edge/machines/<id>/stop`` | ``start`` | ``suspend`` | ``resume`` | ``kill``: machine
  lifecycle, answered with the machine's new status entry (JSON). ``stop`` is a graceful SIGTERM
  (memory gone), ``suspend`` a SIGSTOP (memory kept), ``start`` boots a stopped machine with the
  same id and port and empty memory or resumes a suspended one (``resume`` is the same verb under
  the name Fly's ``fly machine`` uses for it), ``kill`` a SIGKILL (a crash).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from fly_replay_router.edge.guard import refusal
from fly_replay_router.edge.machine import MACHINE_VERBS, Machine, MachineControlError, MachineStartError
from fly_replay_router.edge.page import send_static, stream_feed

if TYPE_CHECKING:
    from fly_replay_router.edge.proxy import EdgeProxy

EDGE_PREFIX = "/_edge/"
ENDPOINTS = [
    "GET /_edge/ (live page)",
    "GET /_edge/events (SSE feed)",
    "GET /_edge/status",
    "POST /_edge/machines/<id>/stop|start|suspend|resume|kill",
]

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def handle_control(edge: EdgeProxy, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    """Answer one request under ``/_edge/``: 403 unless it is addressed to the edge by no foreign page."""
    refused = refusal(scope, edge.config.control_names, edge.config.edge_port)
    if refused is not None:
        await _json(send, 403, {"error": f"forbidden: {refused}"})
        return
    method = str(scope["method"])
    path = str(scope["path"])
    parts = [part for part in path.split("/") if part][1:]
    if not parts or parts[0] in ("events", "static"):
        if method not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "the page and its files answer GET"})
        elif not parts and not path.endswith("/"):
            await _redirect(send, EDGE_PREFIX)
        elif not parts:
            await send_static("index.html", method, send)
        elif parts == ["events"]:
            await stream_feed(edge, receive, send)
        else:
            await send_static("/".join(parts[1:]), method, send)
        return
    if parts == ["status"]:
        if method not in ("GET", "HEAD"):
            await _json(send, 405, {"error": "use GET /_edge/status"})
            return
        config = edge.config
        await _json(send, 200, edge.status.to_json(edge.fleet, app_name=config.app_name, region=config.region))
        return
    if len(parts) == 3 and parts[0] == "machines" and parts[2] in MACHINE_VERBS:
        if method != "POST":
            await _json(send, 405, {"error": f"use POST /_edge/machines/<id>/{parts[2]}"})
            return
        await _machine_verb(edge, parts[1], parts[2], send)
        return
    await _json(send, 404, {"error": "unknown edge endpoint", "endpoints": ENDPOINTS})


async def _machine_verb(edge: EdgeProxy, machine_id: str, verb: str, send: Send) -> None:
    fleet = edge.fleet
    operations: dict[str, Callable[[str], Awaitable[Machine]]] = {
        "stop": fleet.stop,
        "kill": fleet.kill,
        "suspend": fleet.suspend,
        "start": fleet.start,
        "resume": fleet.start,
    }
    try:
        machine = await operations[verb](machine_id)
    except MachineControlError as exc:
        status = 404 if machine_id not in fleet.machines else 409
        await _json(send, status, {"error": str(exc)})
        return
    except MachineStartError as exc:
        edge.status.error("machine_start_failed", str(exc))
        await _json(send, 500, {"error": str(exc), "log": exc.log_tail})
        return
    edge.status.record(verb, machine_id)
    entry = machine.to_json()
    entry["sessions"] = edge.status.sessions.count(machine_id)
    await _json(send, 200, entry)


async def _redirect(send: Send, location: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 307,
            "headers": [(b"location", location.encode()), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _json(send: Send, status: int, document: object) -> None:
    body = json.dumps(document, indent=2).encode() + b"\n"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
