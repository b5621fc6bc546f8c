"""The command line of ``python -m fly_replay_router.edge`` (``fly-replay-edge``), read into a ``LaunchPlan``.

Only reading and checking happens here: nothing is bound or started, so that a mistake is reported
in one sentence before any machine exists. ``launch.py`` runs the plan; ``remote.py`` holds the
verbs for a running edge.
"""

from __future__ import annotations

import argparse
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from fly_replay_router import fly
from fly_replay_router.edge.command import MachineCommand
from fly_replay_router.edge.config import (
    DEFAULT_APP_NAME,
    DEFAULT_AUTOSTOP_INTERVAL,
    DEFAULT_HEAD_TIMEOUT,
    DEFAULT_MAX_HEAD_BYTES,
    DEFAULT_REGION,
    FlyToml,
)
from fly_replay_router.edge.guard import is_loopback
from fly_replay_router.edge.remote import add_verbs

# The demo MCP server that `fly deploy` ships; its endpoints are known, a user's app's are not.
DEMO_APP = "app.main:app"
DEMO_MCP_PATH = "/mcp"
DEMO_SSE_PATH = "/sse"
DEFAULT_MACHINES = 3
# --health-path value for a plain TCP connect check.
TCP_CHECK = "tcp"


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything the fleet's run needs, checked: the machines, the edge's address and its rules."""

    app: str
    app_dir: str | None
    app_name: str
    region: str
    machines: int
    backends: tuple[tuple[str, str], ...]
    log_dir: Path | None
    host: str
    port: int
    allow_remote: bool
    balance: str
    fly_toml: FlyToml
    fly_toml_source: str
    autostop_interval: float
    log_level: str
    health_path: str | None
    health_source: str
    mcp_path: str | None
    sse_path: str | None
    secret: str
    command: MachineCommand
    max_head_bytes: int
    head_timeout: float
    # Worker processes per machine, and why that many (for the banner).
    workers: int = 1
    workers_source: str = "one per CPU: fly.toml has no [[vm]]"


def build_parser() -> argparse.ArgumentParser:
    """The command line, with a ``--help`` that explains every option."""
    parser = argparse.ArgumentParser(
        prog="fly-replay-edge",
        description=(
            "Run a local fleet of machines behind a simulated Fly edge proxy, so that session affinity "
            "with fly-replay can be seen and tested without a Fly account. Also: python -m fly_replay_router.edge."
        ),
        epilog=(
            "Verbs for a running edge: 'machine stop|start|suspend|resume|kill ID', 'worker kill ID PID', 'status'. "
            "The live page is at http://HOST:PORT/_edge/. Ctrl-C or SIGTERM stops everything."
        ),
    )
    fleet = parser.add_argument_group("fleet")
    fleet.add_argument(
        "--machines",
        type=int,
        default=None,
        metavar="N",
        help=f"machines to start (default {DEFAULT_MACHINES}, or none when --backend is given)",
    )
    fleet.add_argument(
        "--app", default=DEMO_APP, help=f"ASGI app each machine runs, module:attr (default {DEMO_APP}, the demo)"
    )
    fleet.add_argument("--app-dir", default=None, help="directory to import --app from (uvicorn --app-dir)")
    fleet.add_argument(
        "--dockerfile",
        type=Path,
        default=None,
        metavar="PATH",
        help=(
            "each machine runs this Dockerfile's CMD, with only its ports and --app replaced (default: the "
            "Dockerfile next to the fly.toml in use; without one, python -m fly_replay_router.serve)"
        ),
    )
    fleet.add_argument(
        "--workers",
        type=int,
        default=None,
        metavar="N",
        help=(
            "worker processes per machine, the image's --workers (default: the Dockerfile CMD's --workers, else "
            "fly.toml's [[vm]] cpus, 1 without it: the launcher runs one per CPU on Fly)"
        ),
    )
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
        help=(
            "put a machine started elsewhere behind the edge (repeatable); ID is its FLY_MACHINE_ID. "
            "Given alone, the fleet is only these machines"
        ),
    )
    fleet.add_argument(
        "--health-path",
        default=None,
        metavar="PATH|tcp",
        help=(
            "a started machine is healthy once GET PATH answers 2xx (default: the path of fly.toml's "
            f"[[http_service.checks]]); '{TCP_CHECK}', or no check in fly.toml: once its port accepts a connection"
        ),
    )
    fleet.add_argument(
        "--mcp-path",
        default=None,
        metavar="PATH",
        help=f"the MCP endpoint the app serves, shown in the banner (default {DEMO_MCP_PATH} for the demo app only)",
    )
    fleet.add_argument(
        "--log-dir",
        type=Path,
        default=None,
        help="where machine logs go, created when missing (default: a new temp directory)",
    )
    edge = parser.add_argument_group("edge")
    edge.add_argument(
        "--host",
        default="127.0.0.1",
        help="address the edge listens on (default 127.0.0.1); an address other than loopback needs --allow-remote",
    )
    edge.add_argument(
        "--allow-remote",
        action="store_true",
        help=(
            "let --host be an address other hosts can reach; /_edge/ (stop, suspend, kill machines) has no "
            "authentication, so only on a network you trust"
        ),
    )
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
            "fly.toml to read app, primary_region, [env], replay_cache rules, idle_timeout, autostop/autostart, "
            "concurrency limits and the health check path from (default ./fly.toml if present)"
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
    edge.add_argument(
        "--max-header-bytes",
        type=int,
        default=DEFAULT_MAX_HEAD_BYTES,
        metavar="BYTES",
        help=f"largest request line + headers the edge reads; 431 past it (default {DEFAULT_MAX_HEAD_BYTES})",
    )
    edge.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEAD_TIMEOUT,
        metavar="SECONDS",
        help=f"a request's headers must arrive within this time, else 408 (default {DEFAULT_HEAD_TIMEOUT:g})",
    )
    edge.add_argument("--log-level", default="info", choices=("debug", "info", "warning"), help="edge log level")
    add_verbs(parser)
    return parser


def plan_launch(args: argparse.Namespace) -> LaunchPlan:
    """Check the arguments and read fly.toml. Raises ``ValueError`` with a sentence a user can act on."""
    if not args.autostop_interval > 0:
        raise ValueError("--autostop-interval must be a positive number of seconds")
    if not args.header_timeout > 0:
        raise ValueError("--header-timeout must be a positive number of seconds")
    if args.max_header_bytes < 1024:
        raise ValueError("--max-header-bytes must be at least 1024")
    machines = args.machines
    if machines is None:
        machines = 0 if args.backend else DEFAULT_MACHINES
    if machines < 0 or (machines == 0 and not args.backend):
        raise ValueError("--machines must be at least 1, or 0 with at least one --backend")
    path = args.fly_toml if args.fly_toml is not None else Path("fly.toml")
    fly_toml = FlyToml.load(path, required=args.fly_toml is not None)
    backends: dict[str, str] = {}
    for item in args.backend:
        machine_id, sep, url = item.partition("=")
        if not sep or not fly.MACHINE_ID_PATTERN.fullmatch(machine_id) or not url.startswith(("http://", "https://")):
            raise ValueError(f"--backend {item!r} must look like 148e272a6d4689=http://127.0.0.1:9001")
        if machine_id in backends:
            raise ValueError(f"--backend names machine {machine_id} twice")
        backends[machine_id] = url
    if not is_loopback(args.host) and not args.allow_remote:
        raise ValueError(
            f"refusing to listen on {args.host}: the edge's /_edge/ endpoints stop, suspend and kill machines "
            "without authentication. Keep --host on loopback (127.0.0.1), or pass --allow-remote to let every "
            f"host that can reach {args.host} use them"
        )
    health_path, health_source = _health_check(args.health_path, fly_toml)
    if args.mcp_path is not None and not args.mcp_path.startswith("/"):
        raise ValueError(f"--mcp-path {args.mcp_path!r} must start with '/', e.g. /mcp")
    demo = args.app == DEMO_APP
    log_dir: Path | None = args.log_dir
    if log_dir is not None and machines > 0:
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"--log-dir {log_dir}: cannot create it ({exc.strerror})") from exc
    command = MachineCommand.find(args.dockerfile, path, required=args.dockerfile is not None) if machines else None
    workers, workers_source = _workers(args.workers, command or MachineCommand(), fly_toml)
    return LaunchPlan(
        workers=workers,
        workers_source=workers_source,
        command=command or MachineCommand(),
        max_head_bytes=args.max_header_bytes,
        head_timeout=args.header_timeout,
        app=args.app,
        app_dir=args.app_dir,
        app_name=args.app_name or fly_toml.app or DEFAULT_APP_NAME,
        region=args.region or fly_toml.primary_region or DEFAULT_REGION,
        machines=machines,
        backends=tuple(backends.items()),
        log_dir=log_dir,
        host=args.host,
        port=args.port,
        allow_remote=args.allow_remote,
        balance=args.balance,
        fly_toml=fly_toml,
        fly_toml_source=str(path) if path.exists() else "no fly.toml, defaults",
        autostop_interval=args.autostop_interval,
        log_level=args.log_level,
        health_path=health_path,
        health_source=health_source,
        mcp_path=args.mcp_path or (DEMO_MCP_PATH if demo else None),
        sse_path=DEMO_SSE_PATH if demo and args.mcp_path is None else None,
        secret=os.environ.get("AFFINITY_SECRET") or secrets.token_urlsafe(32),
    )


def _health_check(option: str | None, fly_toml: FlyToml) -> tuple[str | None, str]:
    """The health check path (None: TCP connect) and where it came from, for the banner."""
    if option == TCP_CHECK:
        return None, "--health-path tcp"
    if option is not None:
        if not option.startswith("/"):
            raise ValueError(f"--health-path {option!r} must be a path starting with '/', or '{TCP_CHECK}'")
        return option, "--health-path"
    if fly_toml.health_path is not None:
        return fly_toml.health_path, "fly.toml [[http_service.checks]]"
    return None, "no [[http_service.checks]] path in fly.toml"


def _workers(option: int | None, command: MachineCommand, fly_toml: FlyToml) -> tuple[int, str]:
    """Worker processes per machine and where the number came from: what Fly would run on the VM."""
    if option is not None:
        if not 1 <= option <= 256:
            raise ValueError(f"--workers {option} must be from 1 to 256")
        return option, "--workers"
    fixed = command.image_workers
    if fixed is not None:
        return fixed, "the Dockerfile CMD's --workers"
    return fly_toml.vm.cpus, f"one per CPU: {fly_toml.vm.source}"
