"""The edge's own endpoints under ``/_edge/`` (never forwarded to a machine).

- ``GET /_edge/status``: machines, counters, errors by code (see ``EdgeStatus.to_json``);
- ``POST /_edge/machines/<id>/stop`` | ``start`` | ``kill``: machine lifecycle, answered with the
  machine's new status entry (JSON). ``stop`` is a graceful SIGTERM, ``kill`` a SIGKILL (a crash),
  ``start`` boots a stopped machine with the same id and port and empty memory.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from app.edge.machine import MachineControlError, MachineStartError

if TYPE_CHECKING:
    from app.edge.proxy import EdgeProxy

EDGE_PREFIX = "/_edge/"
MACHINE_VERBS = ("stop", "start", "kill")

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]


async def handle_control(edge: EdgeProxy, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    """Answer one request under ``/_edge/``."""
    method = str(scope["method"])
    parts = [part for part in str(scope["path"]).split("/") if part][1:]
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
    await _json(
        send,
        404,
        {
            "error": "unknown edge endpoint",
            "endpoints": ["GET /_edge/status", "POST /_edge/machines/<id>/stop|start|kill"],
        },
    )


async def _machine_verb(edge: EdgeProxy, machine_id: str, verb: str, send: Send) -> None:
    fleet = edge.fleet
    try:
        if verb == "stop":
            machine = await fleet.stop(machine_id)
        elif verb == "kill":
            machine = await fleet.kill(machine_id)
        else:
            machine = await fleet.start(machine_id)
    except MachineControlError as exc:
        status = 404 if machine_id not in fleet.machines else 409
        await _json(send, status, {"error": str(exc)})
        return
    except MachineStartError as exc:
        edge.status.error("machine_start_failed", str(exc))
        await _json(send, 500, {"error": str(exc), "log": exc.log_tail})
        return
    edge.status.record(verb, machine_id)
    await _json(send, 200, machine.to_json())


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
