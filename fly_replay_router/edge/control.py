"""The edge's own endpoints under ``/_edge/`` (never forwarded to a machine).

- ``GET /_edge/``: the live page (``page.py``), with ``/_edge/static/<file>`` and the SSE feed
  ``GET /_edge/events``;
- ``GET /_edge/status``: machines, sessions, counters, errors by code, the last routing events
  (see ``EdgeStatus.to_json``);
- ``POST /_edge/machines/<id>/stop`` | ``start`` | ``suspend`` | ``resume`` | ``kill``: machine
  lifecycle, answered with the machine's new status entry (JSON). ``stop`` is a graceful SIGTERM
  (memory gone), ``suspend`` a SIGSTOP (memory kept), ``start`` boots a stopped machine with the
  same id and port and empty memory or resumes a suspended one (``resume`` is the same verb under
  the name Fly's ``fly machine`` uses for it), ``kill`` a SIGKILL (a crash); each reaches the
  machine's whole process group (a supervisor and its workers);
- ``POST /_edge/machines/<id>/workers/<pid>/kill``: SIGKILL to one worker process of the machine
  (one of its ``worker_pids``), the crash of that worker alone; answered with the machine's entry
  and ``killed_worker``. A pid that is not a worker of that machine is 404 and is not signalled.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fly_replay_router import fly
from fly_replay_router.asgi import Receive, Scope, Send
from fly_replay_router.edge.context import EdgeContext
from fly_replay_router.edge.guard import refusal
from fly_replay_router.edge.machine import (
    MACHINE_VERBS,
    WORKER_VERBS,
    Machine,
    MachineControlError,
    MachineStartError,
)
from fly_replay_router.edge.page import send_static, stream_feed
from fly_replay_router.edge.respond import respond, respond_json
from fly_replay_router.edge.workers import NotAWorker, kill_worker

EDGE_PREFIX = "/_edge/"
ENDPOINTS = [
    "GET /_edge/ (live page)",
    "GET /_edge/events (SSE feed)",
    "GET /_edge/status",
    "POST /_edge/machines/<id>/stop|start|suspend|resume|kill",
    "POST /_edge/machines/<id>/workers/<pid>/kill",
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
    if len(parts) == 5 and parts[0] == "machines" and parts[2] == "workers" and parts[4] in WORKER_VERBS:
        if method != "POST":
            await respond_json(send, 405, {"error": f"use POST /_edge/machines/<id>/workers/<pid>/{parts[4]}"})
            return
        await _kill_worker(ctx, parts[1], parts[3], send)
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


async def _kill_worker(ctx: EdgeContext, machine_id: str, pid_text: str, send: Send) -> None:
    machine = ctx.fleet.machines.get(machine_id)
    if machine is None:
        await respond_json(send, 404, {"error": f"no machine {machine_id} in this fleet"})
        return
    process = machine.process
    if process is None or process.poll() is not None:
        why = "was started elsewhere" if not machine.managed else f"is {machine.state}"
        await respond_json(send, 409, {"error": f"machine {machine_id} {why}: the edge has no worker of it to kill"})
        return
    try:
        pid = fly.ascii_decimal(pid_text, max_digits=10) or -1
        await kill_worker(process.pid, machine.port, pid)
    except NotAWorker:
        entry = machine.to_json()
        error = f"process {pid_text} is not a worker of machine {machine_id} (its workers: {entry['worker_pids']})"
        await respond_json(send, 404, {"error": error})
        return
    ctx.status.record("kill worker", f"{pid} of {machine_id}")
    entry = machine.to_json((ctx.config.fly_toml.soft_limit, ctx.config.fly_toml.hard_limit))
    entry["sessions"] = ctx.status.sessions.count(machine_id)
    entry["killed_worker"] = pid
    await respond_json(send, 200, entry)
