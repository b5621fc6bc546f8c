"""The fleet's run: bind the edge's socket, start the machines, serve, print the banner, stop it all.

Runs until Ctrl-C or SIGTERM, which stop the edge and every machine it started (suspended ones
included); a machine that fails to start ends the run with the end of its log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

import uvloop

from fly_replay_router.edge.arguments import LaunchPlan
from fly_replay_router.edge.config import EdgeConfig
from fly_replay_router.edge.fleet import Fleet, FleetSpec
from fly_replay_router.edge.guard import edge_names, is_loopback
from fly_replay_router.edge.machine import MachineStartError
from fly_replay_router.edge.proxy import EdgeProxy
from fly_replay_router.edge.serve import edge_server


def run_fleet(plan: LaunchPlan) -> int:
    """Bind, start and serve ``plan`` until a signal; returns the exit status."""
    try:
        sock = _bind(plan.host, plan.port)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=plan.log_level.upper(), format="%(asctime)s edge %(levelname)s %(message)s")
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_run(plan, sock))
    finally:
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port") from exc
    return sock


async def _run(plan: LaunchPlan, sock: socket.socket) -> int:
    spec = FleetSpec(
        app=plan.app,
        app_dir=plan.app_dir,
        app_name=plan.app_name,
        region=plan.region,
        secret=plan.secret,
        log_dir=plan.log_dir,
        env=plan.fly_toml.env,
        health_path=plan.health_path,
        command=plan.command,
        # Fly sends kill_signal, then SIGKILL after kill_timeout: the image's graceful timeout fits inside it.
        stop_timeout=plan.fly_toml.kill_timeout,
        workers=plan.workers,
        memory_mb=plan.fly_toml.vm.memory_mb,
    )
    fleet = Fleet(spec)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        for machine_id, url in plan.backends:
            fleet.add_backend(machine_id, url)
        fleet.plan(plan.machines)
        if not await _start_machines(fleet, stop):
            return 130 if stop.is_set() else 1
        port = sock.getsockname()[1]
        config = EdgeConfig(
            fly_toml=plan.fly_toml,
            app_name=plan.app_name,
            region=plan.region,
            balance=plan.balance,  # type: ignore[arg-type]  # argparse checked the choices
            edge_port=port,
            control_names=edge_names(plan.host),
            autostop_interval=plan.autostop_interval,
            max_head_bytes=plan.max_head_bytes,
            head_timeout=plan.head_timeout,
        )
        server = edge_server(EdgeProxy(fleet, config))
        serving = asyncio.ensure_future(server.serve(sockets=[sock]))
        while not server.started and not serving.done():  # noqa: ASYNC110  # uvicorn offers no event
            await asyncio.sleep(0.01)
        if serving.done():
            serving.result()
            return 1
        if not is_loopback(plan.host):
            print(f"warning: {_remote_warning(plan.host, port)}", file=sys.stderr, flush=True)
        print(banner(fleet, config, plan, port), flush=True)
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


async def _start_machines(fleet: Fleet, stop: asyncio.Event) -> bool:
    """Start every planned machine; False when a signal came first or one failed (reported)."""
    starting = asyncio.ensure_future(fleet.start_all())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError, MachineStartError):
            await starting
        print("interrupted while starting machines; stopped them", flush=True)
        return False
    stopping.cancel()
    try:
        starting.result()
    except MachineStartError as exc:
        print(f"error: machine {exc.machine_id} failed to start: {exc.reason}", file=sys.stderr)
        print(f"--- last lines of its log ({fleet.machines[exc.machine_id].log_path}):", file=sys.stderr)
        print(exc.log_tail or "(empty log)", file=sys.stderr, flush=True)
        return False
    return True


def _url_host(host: str, *, wildcard: str = "127.0.0.1") -> str:
    if host in ("0.0.0.0", "::"):
        return wildcard
    return f"[{host}]" if ":" in host else host


def _remote_warning(host: str, port: int) -> str:
    where = "every interface" if host in ("0.0.0.0", "::") else host
    return (
        f"the edge listens on {where} (port {port}): other hosts can reach it, and its /_edge/ endpoints "
        "(stop, suspend, kill machines) have no authentication"
    )


def banner(fleet: Fleet, config: EdgeConfig, plan: LaunchPlan, port: int) -> str:
    """What the run prints once the edge serves: the machines, the addresses, the rules in force."""
    edge_url = f"http://{_url_host(plan.host)}:{port}"
    rows = [f"Local Fly fleet: app {config.app_name}, region {config.region}, balancing {config.balance}", ""]
    rows.append(f"  {'MACHINE':<16} {'ADDRESS':<24} {'METRICS':<24} {'STATE':<8} {'PID':>7}  LOG")
    for machine in fleet.machines.values():
        pid = str(machine.process.pid) if machine.process is not None else "-"
        log = str(machine.log_path) if machine.log_path is not None else "(started elsewhere)"
        metrics = machine.metrics_url or "-"
        rows.append(f"  {machine.id:<16} {machine.url:<24} {metrics:<24} {machine.state:<8} {pid:>7}  {log}")
    toml = plan.fly_toml
    rules = ", ".join(f"{r.type} {r.name} under {r.path_prefix} ({r.ttl_seconds}s)" for r in toml.replay_cache)
    if plan.mcp_path is None:
        mcp = f"{edge_url}<the app's MCP path>   (unknown to the edge for --app {plan.app}: give --mcp-path)"
    else:
        mcp = f"{edge_url}{plan.mcp_path}"
        if plan.sse_path is not None:
            mcp += f"   (legacy SSE: {edge_url}{plan.sse_path})"
    health = f"GET {plan.health_path} answers 2xx" if plan.health_path else "its port accepts a TCP connection"
    rows += ["", f"edge:     {edge_url}"]
    if not is_loopback(plan.host):
        address = f"{_url_host(plan.host, wildcard=plan.host)}:{port}"
        rows.append(f"listen:   {address}   WARNING: {_remote_warning(plan.host, port)}")
    rows += [
        f"MCP:      {mcp}",
        f"page:     {edge_url}/_edge/   (live view of machines, sessions and replays)",
        f"status:   {edge_url}/_edge/status",
        f"control:  python -m fly_replay_router.edge machine stop|start|suspend|resume|kill <id> --edge {edge_url}",
        f"          python -m fly_replay_router.edge worker kill <id> <pid> --edge {edge_url}   (one worker's crash)",
        *_command_lines(fleet, plan),
        f"fly.toml: {plan.fly_toml_source}; idle_timeout {toml.idle_timeout:g}s; replay cache: {rules or 'none'}",
        f"health:   a machine is up once {health} ({plan.health_source}), on 127.0.0.1 and on [::1]",
        f"autostop: {_autostop_line(config)}",
        f"stop:     Ctrl-C (or kill -TERM {os.getpid()}) stops the edge and every machine it started",
    ]
    return "\n".join(rows)


def _command_lines(fleet: Fleet, plan: LaunchPlan) -> list[str]:
    managed = [machine for machine in fleet.machines.values() if machine.managed]
    if not managed:
        return []
    first = managed[0]
    metrics = None if first.metrics_url is None else int(first.metrics_url.rsplit(":", 1)[1])
    argv = plan.command.argv(
        app=plan.app, app_dir=plan.app_dir, port=first.port, metrics_port=metrics, workers=plan.workers
    )
    memory = plan.fly_toml.vm.memory_mb
    return [
        f"command:  {plan.command.source}",
        f"          e.g. {' '.join(argv)}",
        f"workers:  {plan.workers} worker process{'es' if plan.workers != 1 else ''} per machine "
        f"({plan.workers_source}); FLY_VM_MEMORY_MB={memory}",
        f"network:  the edge reaches machines on 127.0.0.1 (IPv4, as Fly's proxy); peers on [::1] (IPv6, as 6PN); "
        f"stop waits kill_timeout {plan.fly_toml.kill_timeout:g}s before SIGKILL",
    ]


def _autostop_line(config: EdgeConfig) -> str:
    toml = config.fly_toml
    hard = "none" if toml.hard_limit is None else str(toml.hard_limit)
    limits = f"concurrency soft {toml.soft_limit} / hard {hard} requests"
    start = "autostart on" if toml.auto_start else "autostart off"
    if toml.auto_stop == "off":
        return f"off; {start}; {limits}"
    return (
        f"{toml.auto_stop} idle machines every {config.autostop_interval:g}s, keeping "
        f"{toml.min_machines_running} running; {start}; {limits}"
    )
