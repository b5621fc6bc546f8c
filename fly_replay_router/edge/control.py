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

from collections.abc import Awaitable, Callable

from fly_replay_router.asgi import Receive, Scope, Send
from fly_replay_router.edge.context import EdgeContext
from fly_replay_router.edge.guard import refusal
from fly_replay_router.edge.machine import MACHINE_VERBS, Machine, MachineControlError, MachineStartError
from fly_replay_router.edge.page import send_static, stream_feed
from fly_replay_router.edge.respond import respond, respond_json

EDGE_PREFIX = "/_edge/"
ENDPOINTS = [
    "GET /_edge/ (live page)",
    "GET /_edge/events (SSE feed)",
    "GET /_edge/status",
    "POST /_edge/machines/<id>/stop|start|suspend|resume|kill",
]


async def handle_control(ctx: EdgeContext, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one request under ``/_edge/``: 403 unless it is addressed to the edge by no foreign page."""
    refused = refusal(scope, ctx.config.control_names, ctx.config.edge_port)
    if refused is not None:
        await respond_json(send, 403, {"error": f"forbidden: {refused}"})
        return
    method = str(scope["method"])
    path = str(scope["path"])
    parts = [part for part in path.split("/") if part][1:]
    if not parts or parts[0] in ("events", "static"):
        if method not in ("GET", "HEAD"):
            await respond_json(send, 405, {"error": "the page and its files answer GET"})
        elif not parts and not path.endswith("/"):
            await respond(send, 307, headers=[(b"location", EDGE_PREFIX.encode())])
        elif not parts:
            await send_static("index.html", method, send)
        elif parts == ["events"]:
            await stream_feed(ctx, receive, send)
        else:
            await send_static("/".join(parts[1:]), method, send)
        return
    if parts == ["status"]:
        if method not in ("GET", "HEAD"):
            await respond_json(send, 405, {"error": "use GET /_edge/status"})
            return
        config = ctx.config
        limits = (config.fly_toml.soft_limit, config.fly_toml.hard_limit)
        document = ctx.status.to_json(ctx.fleet, app_name=config.app_name, region=config.region, limits=limits)
        await respond_json(send, 200, document)
        return
    if len(parts) == 3 and parts[0] == "machines" and parts[2] in MACHINE_VERBS:
        if method != "POST":
            await respond_json(send, 405, {"error": f"use POST /_edge/machines/<id>/{parts[2]}"})
            return
        await _machine_verb(ctx, parts[1], parts[2], send)
        return
    await respond_json(send, 404, {"error": "unknown edge endpoint", "endpoints": ENDPOINTS})


async def _machine_verb(ctx: EdgeContext, machine_id: str, verb: str, send: Send) -> None:
    fleet = ctx.fleet
    fleet.refresh()  # a control request acts on the machines as they are now
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
        await respond_json(send, status, {"error": str(exc)})
        return
    except MachineStartError as exc:
        ctx.status.error("machine_start_failed", str(exc))
        await respond_json(send, 500, {"error": str(exc), "log": exc.log_tail})
        return
    ctx.status.record(verb, machine_id)
    entry = machine.to_json((ctx.config.fly_toml.soft_limit, ctx.config.fly_toml.hard_limit))
    entry["sessions"] = ctx.status.sessions.count(machine_id)
    await respond_json(send, 200, entry)
