"""Real processes for the benchmarks: uvicorn machines and ``python -m fly_replay_router.edge`` fleets on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import APP_NAME, ROOT, SECRET, free_port


@dataclass
class Process:
    """A process this benchmark started, its URL and its log."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def rss_mb(self) -> float:
        """Resident memory of this process (not of its children), from ``/proc``."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError(f"no VmRSS for {self.name}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _wait_http(proc: Process, path: str, *, timeout: float = 60) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.process.poll() is not None:
            raise RuntimeError(f"{proc.name} exited during start:\n{proc.log_tail()}")
        try:
            with urllib.request.urlopen(proc.url + path, timeout=2) as response:
                body: bytes = response.read()
                return body
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    proc.stop()
    raise RuntimeError(f"{proc.name} did not answer {path} within {timeout:.0f} s:\n{proc.log_tail()}")


def _spawn(name: str, command: list[str], env: dict[str, str], url: str) -> Process:
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".log", delete=False)  # noqa: SIM115
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    return Process(name, url, process, Path(log.name))


def start_uvicorn(app: str, machine_id: str, *, extra_env: dict[str, str] | None = None) -> Process:
    """``app`` under uvicorn as the Dockerfile runs it (one process; uvloop + httptools), no access log."""
    port = free_port()
    env = {
        **os.environ,
        "FLY_MACHINE_ID": machine_id,
        "FLY_APP_NAME": APP_NAME,
        "FLY_REGION": "lcl",
        "AFFINITY_SECRET": SECRET,
        # One benchmark process stands in for many clients: no per-client limit on new sessions.
        "AFFINITY_NEW_SESSION_RATE": "off",
        **(extra_env or {}),
    }
    command = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    command += ["--loop", "uvloop", "--http", "httptools", "--no-access-log", "--log-level", "warning"]
    proc = _spawn(f"{machine_id}-{app}", command, env, f"http://127.0.0.1:{port}")
    _wait_http(proc, "/healthz")
    return proc


FLY_TOML_CACHED = """\
app = "bench-mcp"

[env]
  AFFINITY_FAILOVER = "cached"

[http_service]
  internal_port = 8080

  [[http_service.http_options.replay_cache]]
    path_prefix = "/"
    ttl_seconds = 300
    type = "header"
    name = "Mcp-Session-Id"
    allow_bypass = false
"""

FLY_TOML_UNCACHED = """\
app = "bench-mcp"

[http_service]
  internal_port = 8080
"""


def start_edge(*, machines: int, cached: bool = False, backends: dict[str, str] | None = None) -> Process:
    """``python -m fly_replay_router.edge`` on a free port, waiting until every machine it lists is started.

    A temporary fly.toml decides the replay cache (the project's own fly.toml is never read), and
    ``AFFINITY_FAILOVER`` is set both in the environment and in its ``[env]`` (which Fly, and the
    fleet, apply over the environment).
    """
    port = free_port()
    fly_toml = Path(tempfile.mkdtemp(prefix="bench-edge-")) / "fly.toml"
    fly_toml.write_text(FLY_TOML_CACHED if cached else FLY_TOML_UNCACHED)
    env = {**os.environ, "AFFINITY_SECRET": SECRET, "AFFINITY_FAILOVER": "cached" if cached else "safe"}
    env["AFFINITY_NEW_SESSION_RATE"] = "off"  # one benchmark process stands in for many clients
    command = [sys.executable, "-m", "fly_replay_router.edge", "--machines", str(machines), "--port", str(port)]
    # Machines run the image's own command, as on Fly (the temporary fly.toml has no Dockerfile beside it).
    command += ["--fly-toml", str(fly_toml), "--dockerfile", str(ROOT / "Dockerfile"), "--log-level", "warning"]
    for machine_id, url in (backends or {}).items():
        command += ["--backend", f"{machine_id}={url}"]
    proc = _spawn(f"edge-{'cached' if cached else 'uncached'}", command, env, f"http://127.0.0.1:{port}")
    expected = machines + len(backends or {})
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = json.loads(_wait_http(proc, "/_edge/status", timeout=90))
        started = [m for m in status["machines"] if m.get("state") == "started"]
        if len(started) >= expected:
            return proc
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"the edge did not start {expected} machines:\n{proc.log_tail()}")


def edge_status(edge: Process) -> dict[str, Any]:
    with urllib.request.urlopen(edge.url + "/_edge/status", timeout=10) as response:
        status: dict[str, Any] = json.loads(response.read())
        return status


@contextlib.contextmanager
def running(*processes: Process) -> Iterator[tuple[Process, ...]]:
    """Stop every process on the way out, whatever happened."""
    try:
        yield processes
    finally:
        for proc in processes:
            proc.stop()
