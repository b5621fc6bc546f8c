"""Run an ASGI app as a Fly Machine needs it: ``python -m fly_replay_router.serve app.main:app``.

A machine behind the affinity layer is reached on two paths, over two address families:

- Fly's proxy (every public request, and every ``fly-replay``) connects to the machine's
  ``internal_port`` over a private **IPv4** address: the process must accept IPv4 on
  ``0.0.0.0:<port>`` (Fly, "Connect to an App Service":
  https://fly.io/docs/networking/app-services/).
- Other machines of the app (the layer forwards bodies Fly cannot replay to their owner) connect
  over the private network, 6PN, which is **IPv6**: ``<machine_id>.vm.<app>.internal`` resolves to an
  ``fdaa:`` address (Fly, "Private Networking": https://fly.io/docs/networking/private-networking/).

``uvicorn --host ::`` does not cover both: asyncio sets ``IPV6_V6ONLY`` on a socket it binds to
``::``, so IPv4 connections are refused. This launcher binds two sockets per port, ``0.0.0.0`` and
``::`` (IPv6 only), and hands them to uvicorn: one ``uvicorn.Server`` (one process, one event
loop, one lifespan), or ``--workers`` of them. With ``--metrics-port`` it also serves ``/metrics``
there, on both families, through ``PrivateMetrics``: the port is left out of fly.toml's services,
so only Fly's scraper reaches it.

SIGTERM (fly.toml's ``kill_signal``) stops the server gracefully: no new connections, open requests
get ``--timeout-graceful-shutdown`` seconds (keep it below ``kill_timeout``), then the app's lifespan
shuts down.

``--workers N`` (default: the CPUs this process may run on, so a machine of N CPUs runs N workers) runs
N processes on the same sockets under uvicorn's supervisor, which restarts a worker that dies. The
affinity layer keeps each session on the worker that holds it (``docs/workers.md``). The supervisor
checks once, in a short-lived process, that the app imports, so that a missing secret stops the machine
with one sentence instead of a worker that restarts forever; it checks that ``prometheus-client`` is
there for ``--metrics-port`` for the same reason. With ``--metrics-port`` and several workers, it
creates an empty directory for the run in which every worker publishes its figures, so that a scrape,
whichever worker answers it, sums the machine's (``fly_replay_router.affinity.worker_metrics``); the
directory is removed when the supervisor ends.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass

import uvicorn
from uvicorn.importer import ImportFromStringError, import_from_string
from uvicorn.supervisors import Multiprocess

from fly_replay_router.asgi import ASGIApp
from fly_replay_router.settings import default_peer_url_template

logger = logging.getLogger("uvicorn.error")

DEFAULT_APP = "app.main:app"
DEFAULT_PORT = 8080
# (bind address, family, who connects that way on Fly): see the module docstring.
LISTEN_ADDRESSES = (
    ("0.0.0.0", socket.AF_INET, "IPv4, the path Fly's proxy uses"),
    ("::", socket.AF_INET6, "IPv6, the path peers on the private network use"),
)


@dataclass(frozen=True, slots=True)
class ServeOptions:
    """What the launcher runs and how. Validated on construction."""

    app: str = DEFAULT_APP
    port: int = DEFAULT_PORT
    metrics_port: int | None = None
    app_dir: str = "."
    proxy_headers: bool = True
    forwarded_allow_ips: str = "*"
    timeout_graceful_shutdown: int = 25
    log_level: str = "info"
    access_log: bool = True
    workers: int = 1

    def __post_init__(self) -> None:
        module, _, attribute = self.app.partition(":")
        if not module or not attribute:
            raise ValueError(f"app {self.app!r} must be module:attribute, such as app.main:app")
        for name, port in (("--port", self.port), ("--metrics-port", self.metrics_port)):
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"{name} {port} is not a TCP port (1 to 65535)")
        if self.metrics_port == self.port:
            raise ValueError("--metrics-port must differ from --port: the service's port is public on Fly")
        if self.timeout_graceful_shutdown < 0:
            raise ValueError("--timeout-graceful-shutdown must be 0 or more seconds")
        if not 1 <= self.workers <= 256:
            raise ValueError(f"--workers {self.workers} must be from 1 to 256")


def listening_sockets(port: int) -> list[socket.socket]:
    """Bound sockets for ``port`` on ``0.0.0.0`` and on ``::`` (IPv6 only), not yet listening.

    ``OSError`` names the address and the path it serves; sockets already bound are closed.
    """
    bound: list[socket.socket] = []
    for host, family, purpose in LISTEN_ADDRESSES:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # Explicit, whatever net.ipv6.bindv6only says: the IPv4 socket has the port's IPv4 side.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            for other in bound:
                other.close()
            raise OSError(exc.errno, f"cannot listen on {_address(host, port)} ({purpose}): {exc.strerror}") from None
        bound.append(sock)
    return bound


class FlyServer(uvicorn.Server):
    """A uvicorn server that says which addresses it serves (uvicorn is silent when given sockets)."""

    options: ServeOptions

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if not self.started:
            return
        options = self.options
        for host, _family, purpose in LISTEN_ADDRESSES:
            logger.info("Serving %s on http://%s (%s)", options.app, _address(host, options.port), purpose)
        if options.metrics_port is not None:
            logger.info("Serving /metrics on port %d, IPv4 and IPv6 (for Fly's scraper only)", options.metrics_port)


# How the supervisor tells its worker processes what to serve (they are spawned, not forked).
_WORKER_OPTIONS = "FLY_REPLAY_ROUTER_SERVE"
_PR_SET_PDEATHSIG = 1


def cpu_count() -> int:
    """The CPUs this process may run on (a Fly machine's ``cpus``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def worker_app() -> ASGIApp:
    """The app of one worker process (a uvicorn app factory): what the supervisor passed it."""
    _die_with_supervisor()
    app_ref, app_dir, metrics_port, workers_dir, log_level = os.environ[_WORKER_OPTIONS].split("\n")
    sys.path.insert(0, app_dir)
    show_layer_logs(log_level)
    app: ASGIApp = import_from_string(app_ref)
    return _with_private_metrics(app, int(metrics_port), workers_dir) if metrics_port else app


def _die_with_supervisor() -> None:
    # uvicorn's workers outlive a supervisor killed with SIGKILL and keep the port: ask the kernel
    # (Linux's PR_SET_PDEATHSIG) to end this worker with it.
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the supervisor was already gone before the request took effect
        os._exit(1)


def _check_app_imports(options: ServeOptions) -> None:
    """Import the app once in a short-lived process; ``ValueError`` with its last words if it cannot."""
    probe = "import sys; from uvicorn.importer import import_from_string; import_from_string(sys.argv[1])"
    result = subprocess.run(
        [sys.executable, "-c", probe, options.app],
        cwd=options.app_dir,
        capture_output=True,
        text=True,
        check=False,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [options.app_dir, os.environ.get("PYTHONPATH")])),
        },
    )
    if result.returncode != 0:
        lines = (result.stderr.strip() or f"exit status {result.returncode}").splitlines()
        raise ValueError(lines[-1].removeprefix("fly-replay-router cannot start: "))


def build_server(options: ServeOptions) -> tuple[FlyServer, list[socket.socket]]:
    """Bind the sockets, import the app, and make the server; start it with ``server.run(sockets)``.

    Raises ``ValueError`` with a sentence to act on when the app cannot be imported or a port is taken.
    """
    ports = [options.port] if options.metrics_port is None else [options.port, options.metrics_port]
    sockets: list[socket.socket] = []
    # Peers reach this machine on its service port over 6PN: the default peer address names that port.
    os.environ.setdefault("AFFINITY_PEER_URL", default_peer_url_template(options.port))
    try:
        for port in ports:
            sockets += listening_sockets(port)
        app: ASGIApp | str
        if options.workers > 1:
            _check_app_imports(options)
            workers_dir = ""
            if options.metrics_port is not None:
                _check_metrics_client()
                # New and empty for this run: a counter starts from 0 only when the machine does.
                workers_dir = tempfile.mkdtemp(prefix="fly-replay-router-metrics-")
            os.environ[_WORKER_OPTIONS] = "\n".join(
                [options.app, options.app_dir, str(options.metrics_port or ""), workers_dir, options.log_level]
            )
            # The workers share the VM's memory: each sizes its session budget to its share.
            os.environ["AFFINITY_WORKERS"] = str(options.workers)
            app = "fly_replay_router.serve:worker_app"
        else:
            sys.path.insert(0, options.app_dir)
            show_layer_logs(options.log_level)
            imported: ASGIApp = import_from_string(options.app)
            if options.metrics_port is not None:
                imported = _with_private_metrics(imported, options.metrics_port)
            app = imported
    except (OSError, ImportFromStringError, ValueError) as exc:
        for sock in sockets:
            sock.close()
        raise ValueError(exc.strerror if isinstance(exc, OSError) else str(exc)) from None
    config = uvicorn.Config(
        app,
        factory=options.workers > 1,
        workers=options.workers,
        proxy_headers=options.proxy_headers,
        forwarded_allow_ips=options.forwarded_allow_ips,
        timeout_graceful_shutdown=options.timeout_graceful_shutdown,
        log_level=options.log_level,
        access_log=options.access_log,
        port=options.port,
    )
    server = FlyServer(config)
    server.options = options
    return server, sockets


def show_layer_logs(level: str = "info") -> None:
    """Write the layer's decision lines (logger ``fly_replay_router``) to stderr beside uvicorn's, at
    uvicorn's ``--log-level`` (``trace`` is ``debug`` here; ``debug`` adds a line per hand-over).

    A library configures no logging, and an app that configures none would lose them: the launcher
    is the entry point, so it does (unless the logger already has a handler of the app's).
    """
    layer = logging.getLogger("fly_replay_router")
    if layer.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
    layer.addHandler(handler)
    layer.setLevel(logging.DEBUG if level.lower() == "trace" else level.upper())
    layer.propagate = False  # once, whatever the app does with the root logger


_NEEDS_METRICS_CLIENT = "--metrics-port needs prometheus-client: pip install 'fly-replay-router[metrics]'"


def _check_metrics_client() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ValueError(_NEEDS_METRICS_CLIENT) from None


def _with_private_metrics(app: ASGIApp, metrics_port: int, workers_dir: str = "") -> ASGIApp:
    try:
        from fly_replay_router.affinity.metrics import register_metrics
        from fly_replay_router.private_metrics import PrivateMetrics

        register_metrics(workers_dir=workers_dir or None)
        return PrivateMetrics(app, metrics_port=metrics_port)
    except ImportError:
        raise ValueError(_NEEDS_METRICS_CLIENT) from None


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_options(argv: Sequence[str] | None = None) -> ServeOptions:
    """``ServeOptions`` from the command line; ``--help`` explains every option."""
    parser = argparse.ArgumentParser(
        prog="python -m fly_replay_router.serve",
        description=(
            "Serve an ASGI app (uvicorn, one worker per CPU) on PORT over IPv4 (0.0.0.0: Fly's proxy reaches a "
            "machine's internal_port that way) and IPv6 (:: : peers on Fly's private network, 6PN, do), "
            "and optionally /metrics on a private METRICS_PORT, both families. SIGTERM stops it gracefully."
        ),
        epilog=(
            "Example, as the Dockerfile's CMD: "
            '["python", "-m", "fly_replay_router.serve", "app.main:app", "--port", "8080", "--metrics-port", "9091"]. '
            "References: https://fly.io/docs/networking/app-services/, "
            "https://fly.io/docs/networking/private-networking/, https://fly.io/docs/monitoring/metrics/"
        ),
    )
    defaults = ServeOptions()
    parser.add_argument(
        "app", nargs="?", default=DEFAULT_APP, help=f"the ASGI app as module:attribute (default {DEFAULT_APP})"
    )
    parser.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"fly.toml's internal_port (default {DEFAULT_PORT})"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="serve Prometheus metrics at /metrics on this port, which no fly.toml service may expose; "
        "point fly.toml's [metrics] port at it (Fly's examples use 9091). Default: no metrics",
    )
    parser.add_argument("--app-dir", default=".", help="directory put first on sys.path to import the app (default .)")
    parser.add_argument(
        "--forwarded-allow-ips",
        default=defaults.forwarded_allow_ips,
        help="addresses whose X-Forwarded-* headers are trusted (default *: on Fly only Fly's proxy and "
        "the app's private network reach the machine)",
    )
    parser.add_argument("--no-proxy-headers", action="store_true", help="ignore X-Forwarded-For and X-Forwarded-Proto")
    parser.add_argument(
        "--timeout-graceful-shutdown",
        type=int,
        default=defaults.timeout_graceful_shutdown,
        help="seconds open requests get after SIGTERM; keep it below fly.toml's kill_timeout "
        f"(default {defaults.timeout_graceful_shutdown})",
    )
    parser.add_argument(
        "--log-level",
        default=defaults.log_level,
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        help="uvicorn's log level, and the layer's: info writes a line per request not served here as it came "
        "(replayed, forwarded, refused), debug one per hand-over to a sibling worker too (default info)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="no log line per request")
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes on the port; sessions stick to the one that holds them "
        "(default: the CPUs this process may use, so fly.toml's cpus)",
    )
    args = parser.parse_args(argv)
    try:
        return ServeOptions(
            app=args.app,
            port=args.port,
            metrics_port=args.metrics_port,
            app_dir=args.app_dir,
            proxy_headers=not args.no_proxy_headers,
            forwarded_allow_ips=args.forwarded_allow_ips,
            timeout_graceful_shutdown=args.timeout_graceful_shutdown,
            log_level=args.log_level,
            access_log=not args.no_access_log,
            workers=cpu_count() if args.workers is None else args.workers,
        )
    except ValueError as exc:
        parser.error(str(exc))


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: parse, bind, serve until SIGTERM or SIGINT; one sentence on a failed start."""
    options = parse_options(argv)
    try:
        server, sockets = build_server(options)
    except ValueError as exc:
        raise SystemExit(f"fly-replay-router cannot start: {exc}") from None
    if options.workers > 1:
        for host, _family, purpose in LISTEN_ADDRESSES:
            logger.info("Serving %s on http://%s (%s)", options.app, _address(host, options.port), purpose)
        logger.info("%d worker processes; each session sticks to the one that holds it", options.workers)
        try:
            Multiprocess(server.config, sockets=sockets).run()
        finally:
            workers_dir = os.environ[_WORKER_OPTIONS].split("\n")[3]
            if workers_dir:
                shutil.rmtree(workers_dir, ignore_errors=True)
        return
    server.run(sockets=sockets)


if __name__ == "__main__":
    main()
