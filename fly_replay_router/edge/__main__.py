"""``python -m fly_replay_router.edge``: a local fleet of machines behind a simulated Fly edge proxy.

Starts N ``uvicorn`` machines (``app.main:app`` by default), puts the edge in front of them on
``--port``, prints what it started, and runs until Ctrl-C or SIGTERM, which stop the edge and every
machine it started (suspended ones included). The live page is at ``/_edge/``. ``python -m fly_replay_router.edge
machine stop|start|suspend|resume|kill ID`` and ``python -m fly_replay_router.edge status`` talk to a running edge.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import uvloop

from fly_replay_router import fly
from fly_replay_router.edge.config import (
    DEFAULT_APP_NAME,
    DEFAULT_AUTOSTOP_INTERVAL,
    DEFAULT_REGION,
    EdgeConfig,
    FlyToml,
)
from fly_replay_router.edge.control import MACHINE_VERBS
from fly_replay_router.edge.fleet import Fleet, FleetSpec
from fly_replay_router.edge.machine import MachineStartError
from fly_replay_router.edge.proxy import EdgeProxy
from fly_replay_router.edge.serve import edge_server

DEFAULT_EDGE = "http://127.0.0.1:8080"
logger = logging.getLogger("fly_replay_router.edge")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a ``--help`` that explains every option."""
    parser = argparse.ArgumentParser(
        prog="python -m fly_replay_router.edge",
        description=(
            "Run a local fleet of machines behind a simulated Fly edge proxy, so that session affinity "
            "with fly-replay can be seen and tested without a Fly account."
        ),
        epilog=(
            "Verbs for a running edge: 'machine stop|start|suspend|resume|kill ID', 'status'. "
            "The live page is at http://HOST:PORT/_edge/. Ctrl-C or SIGTERM stops everything."
        ),
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument(
        "--machines", type=int, default=3, metavar="N", help="machines to start (default 3; 0 with --backend)"
    )
    fleet.add_argument(
        "--app", default="app.main:app", help="ASGI app each machine runs, module:attr (default app.main:app)"
    )
    fleet.add_argument("--app-dir", default=None, help="directory to import --app from (uvicorn --app-dir)")
    fleet.add_argument(
        "--app-name", default=None, help=f"FLY_APP_NAME (default: fly.toml's app, else {DEFAULT_APP_NAME})"
    )
    fleet.add_argument(
        "--region", default=None, help=f"FLY_REGION of the fleet (default: primary_region, else {DEFAULT_REGION})"
    )
    fleet.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="ID=URL",
        help="put a machine started elsewhere behind the edge (repeatable); ID is its FLY_MACHINE_ID",
    )
    fleet.add_argument(
        "--log-dir", type=Path, default=None, help="where machine logs go (default: a new temp directory)"
    )
    edge = parser.add_argument_group("edge")
    edge.add_argument("--host", default="127.0.0.1", help="address the edge listens on (default 127.0.0.1)")
    edge.add_argument(
        "--port", type=int, default=8080, help="port the edge listens on (default 8080; 0 = any free port)"
    )
    edge.add_argument(
        "--balance",
        choices=("random", "round-robin", "least-requests"),
        default="random",
        help="how the first hop picks a machine (default random, so that wrong-machine landings happen)",
    )
    edge.add_argument(
        "--fly-toml",
        type=Path,
        default=None,
        help=(
            "fly.toml to read replay_cache rules, idle_timeout, auto_stop_machines, auto_start_machines, "
            "min_machines_running and concurrency limits from (default ./fly.toml if present)"
        ),
    )
    edge.add_argument(
        "--autostop-interval",
        type=float,
        default=DEFAULT_AUTOSTOP_INTERVAL,
        metavar="SECONDS",
        help=(
            f"how often autostop looks for idle machines (default {DEFAULT_AUTOSTOP_INTERVAL:g}; Fly checks every "
            "few minutes); a machine is idle with no request in flight for a whole interval"
        ),
    )
    edge.add_argument("--log-level", default="info", choices=("debug", "info", "warning"), help="edge log level")
    verbs = parser.add_subparsers(dest="verb", metavar="{machine,status}")
    machine = verbs.add_parser(
        "machine",
        help="stop, start, suspend, resume or kill a machine of a running edge",
        description=(
            "stop: SIGTERM, memory and sessions gone; suspend: SIGSTOP, memory kept; start: boot a stopped "
            "machine fresh (same id) or resume a suspended one; resume: same as start; kill: SIGKILL (a crash)."
        ),
    )
    machine.add_argument("action", choices=MACHINE_VERBS)
    machine.add_argument("machine_id", metavar="ID")
    machine.add_argument("--edge", default=DEFAULT_EDGE, help=f"the running edge (default {DEFAULT_EDGE})")
    status = verbs.add_parser("status", help="print a running edge's /_edge/status")
    status.add_argument("--edge", default=DEFAULT_EDGE, help=f"the running edge (default {DEFAULT_EDGE})")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.verb == "machine":
        return _call_edge(f"{args.edge.rstrip('/')}/_edge/machines/{args.machine_id}/{args.action}", method="POST")
    if args.verb == "status":
        return _call_edge(f"{args.edge.rstrip('/')}/_edge/status", method="GET")
    try:
        plan = _plan(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s edge %(levelname)s %(message)s")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(_run(plan))


class _Plan:
    def __init__(self, args: argparse.Namespace, fly_toml: FlyToml, fly_toml_path: Path, sock: socket.socket) -> None:
        self.args = args
        self.fly_toml = fly_toml
        self.fly_toml_path = fly_toml_path
        self.sock = sock
        self.backends: dict[str, str] = {}


def _plan(args: argparse.Namespace) -> _Plan:
    if not args.autostop_interval > 0:
        raise ValueError("--autostop-interval must be a positive number of seconds")
    if args.machines < 0 or (args.machines == 0 and not args.backend):
        raise ValueError("--machines must be at least 1, or 0 with at least one --backend")
    path = args.fly_toml if args.fly_toml is not None else Path("fly.toml")
    fly_toml = FlyToml.load(path, required=args.fly_toml is not None)
    backends: dict[str, str] = {}
    for item in args.backend:
        machine_id, sep, url = item.partition("=")
        if not sep or not fly.MACHINE_ID_PATTERN.fullmatch(machine_id) or not url.startswith(("http://", "https://")):
            raise ValueError(f"--backend {item!r} must look like 148e272a6d4689=http://127.0.0.1:9001")
        backends[machine_id] = url
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({exc.strerror}); choose another --port") from exc
    plan = _Plan(args, fly_toml, path, sock)
    plan.backends = backends
    return plan


async def _run(plan: _Plan) -> int:
    args = plan.args
    region = args.region or plan.fly_toml.primary_region or DEFAULT_REGION
    app_name = args.app_name or plan.fly_toml.app or DEFAULT_APP_NAME
    spec = FleetSpec(
        app=args.app,
        app_dir=args.app_dir,
        app_name=app_name,
        region=region,
        secret=os.environ.get("AFFINITY_SECRET") or secrets.token_urlsafe(32),
        log_dir=args.log_dir,
        env=plan.fly_toml.env,
    )
    fleet = Fleet(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        for machine_id, url in plan.backends.items():
            fleet.add_backend(machine_id, url)
        fleet.plan(args.machines)
        starting = asyncio.ensure_future(fleet.start_all())
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, MachineStartError):
                await starting
            print("interrupted while starting machines; stopped them", flush=True)
            return 130
        stopping.cancel()
        try:
            starting.result()
        except MachineStartError as exc:
            print(f"error: machine {exc.machine_id} failed to start: {exc.reason}", file=sys.stderr)
            print(f"--- last lines of its log ({fleet.machines[exc.machine_id].log_path}):", file=sys.stderr)
            print(exc.log_tail or "(empty log)", file=sys.stderr, flush=True)
            return 1
        port = plan.sock.getsockname()[1]
        config = EdgeConfig(
            app_name=app_name,
            region=region,
            idle_timeout=plan.fly_toml.idle_timeout,
            replay_cache=plan.fly_toml.replay_cache,
            balance=args.balance,
            edge_port=port,
            auto_stop=plan.fly_toml.auto_stop,
            auto_start=plan.fly_toml.auto_start,
            min_machines_running=plan.fly_toml.min_machines_running,
            autostop_interval=args.autostop_interval,
            soft_limit=plan.fly_toml.soft_limit,
            hard_limit=plan.fly_toml.hard_limit,
        )
        edge = EdgeProxy(fleet, config)
        server = edge_server(edge)
        serving = asyncio.ensure_future(server.serve(sockets=[plan.sock]))
        while not server.started and not serving.done():  # noqa: ASYNC110  # uvicorn offers no event
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
            return 1
        print(_banner(fleet, config, plan, f"http://{_display_host(args.host)}:{port}"), flush=True)
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        server.should_exit = True
        await serving
        stopping.cancel()
        print("stopping the edge and its machines ...", flush=True)
        await fleet.aclose()
        print("stopped", flush=True)
        return 0
    finally:
        fleet.close()
        plan.sock.close()


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def _banner(fleet: Fleet, config: EdgeConfig, plan: _Plan, edge_url: str) -> str:
    rows = [f"Local Fly fleet: app {config.app_name}, region {config.region}, balancing {config.balance}", ""]
    rows.append(f"  {'MACHINE':<16} {'ADDRESS':<24} {'STATE':<8} {'PID':>7}  LOG")
    for machine in fleet.machines.values():
        pid = str(machine.process.pid) if machine.process is not None else "-"
        log = str(machine.log_path) if machine.log_path is not None else "(started elsewhere)"
        rows.append(f"  {machine.id:<16} {machine.url:<24} {machine.state:<8} {pid:>7}  {log}")
    rules = ", ".join(f"{r.type} {r.name} under {r.path_prefix} ({r.ttl_seconds}s)" for r in config.replay_cache)
    source = str(plan.fly_toml_path) if plan.fly_toml_path.exists() else "no fly.toml, defaults"
    rows += [
        "",
        f"edge:     {edge_url}",
        f"MCP:      {edge_url}/mcp   (legacy SSE: {edge_url}/sse)",
        f"page:     {edge_url}/_edge/   (live view of machines, sessions and replays)",
        f"status:   {edge_url}/_edge/status",
        f"control:  python -m fly_replay_router.edge machine stop|start|suspend|resume|kill <id> --edge {edge_url}",
        f"fly.toml: {source}; idle_timeout {config.idle_timeout:g}s; replay cache: {rules or 'none'}",
        f"autostop: {_autostop_line(config)}",
        f"stop:     Ctrl-C (or kill -TERM {os.getpid()}) stops the edge and every machine it started",
    ]
    return "\n".join(rows)


def _autostop_line(config: EdgeConfig) -> str:
    hard = "none" if config.hard_limit is None else str(config.hard_limit)
    limits = f"concurrency soft {config.soft_limit} / hard {hard} requests"
    start = "autostart on" if config.auto_start else "autostart off"
    if config.auto_stop == "off":
        return f"off; {start}; {limits}"
    return (
        f"{config.auto_stop} idle machines every {config.autostop_interval:g}s, keeping "
        f"{config.min_machines_running} running; {start}; {limits}"
    )


def _call_edge(url: str, *, method: str) -> int:
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            document = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(f"error: {exc.code} {exc.read().decode(errors='replace').strip()}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"error: cannot reach the edge at {url}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(document, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
