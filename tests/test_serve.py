"""The image's command, run as a real process: the addresses Fly uses, private metrics, SIGTERM.

Fly's proxy reaches a machine's ``internal_port`` over IPv4 and the machine's peers reach it over
IPv6 (6PN); here those are ``127.0.0.1`` and ``[::1]``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fly_replay_router.dockerfile import parse_image_command
from tests.conftest import ROOT, Machine, free_port, start_machine
from tests.mcp_http import INITIALIZE, JSON_AND_SSE

pytestmark = pytest.mark.anyio

FLY = tomllib.loads((ROOT / "fly.toml").read_text())
# The CMD the image shipped with before this launcher: uvicorn on "::" (IPv6 only under asyncio).
UVICORN_ON_IPV6_ONLY_CMD = (
    'CMD ["uvicorn", "app.main:app", "--host", "::", "--port", "8080", "--proxy-headers", '
    '"--forwarded-allow-ips", "*", "--timeout-graceful-shutdown", "25"]'
)


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    started = start_machine("c0c0c0c0c0c0c0")
    try:
        yield started
    finally:
        started.stop()


def decisions(metrics_text: str, outcome: str) -> float:
    lines = [line for line in metrics_text.splitlines() if f'outcome="{outcome}"' in line]
    assert lines, f"no {outcome} line in:\n{metrics_text}"
    return float(lines[0].rsplit(" ", 1)[1])


async def test_the_image_command_answers_on_ipv4_for_flys_proxy_and_on_ipv6_for_peers(machine: Machine) -> None:
    async with httpx.AsyncClient(timeout=10) as raw:
        for base in (machine.url, machine.peer_url):
            health = await raw.get(f"{base}/healthz")
            assert (health.status_code, health.text) == (200, "ok"), base
            opened = await raw.post(f"{base}/mcp", headers=JSON_AND_SSE, json=INITIALIZE)
            assert opened.status_code == 200, base
            assert opened.headers["mcp-session-id"].startswith(machine.machine_id + "."), base


async def test_metrics_answer_only_on_the_private_port_on_both_families(machine: Machine) -> None:
    assert machine.metrics_url is not None
    metrics_port = machine.metrics_url.rsplit(":", 1)[1]
    async with httpx.AsyncClient(timeout=10) as raw:
        for base in (machine.url, machine.peer_url):
            assert (await raw.get(f"{base}/metrics")).status_code == 404, base
        for base in (machine.metrics_url, f"http://[::1]:{metrics_port}"):
            scraped = await raw.get(f"{base}/metrics")
            assert scraped.status_code == 200, base
            assert scraped.headers["content-type"].startswith("text/plain")
            assert f'affinity_decisions_total{{machine="{machine.machine_id}"' in scraped.text
            assert "process_resident_memory_bytes" in scraped.text
            # Nothing but the metrics on that port: the app's routes are not there.
            assert (await raw.get(f"{base}/healthz")).status_code == 404
            assert (await raw.post(f"{base}/metrics")).status_code == 405


async def test_health_checks_and_scrapes_are_not_routing_decisions(machine: Machine) -> None:
    assert machine.metrics_url is not None
    async with httpx.AsyncClient(timeout=10) as raw:
        before = (await raw.get(f"{machine.metrics_url}/metrics")).text
        for _ in range(5):
            assert (await raw.get(f"{machine.url}/healthz")).status_code == 200
            assert (await raw.get(f"{machine.metrics_url}/metrics")).status_code == 200
        after = (await raw.get(f"{machine.metrics_url}/metrics")).text
        assert decisions(after, "passed") == decisions(before, "passed")
        # An MCP request without a session is one: the counters do move.
        assert (await raw.post(f"{machine.url}/mcp", headers=JSON_AND_SSE, json=INITIALIZE)).status_code == 200
        moved = (await raw.get(f"{machine.metrics_url}/metrics")).text
    assert decisions(moved, "passed") == decisions(after, "passed") + 1


async def test_redirects_keep_the_https_scheme_that_flys_proxy_reports(machine: Machine) -> None:
    async with httpx.AsyncClient(timeout=10) as raw:
        redirect = await raw.get(
            f"{machine.url}/messages", headers={"x-forwarded-proto": "https", "host": "test-mcp.fly.dev"}
        )
    assert redirect.status_code == 307
    assert redirect.headers["location"] == "https://test-mcp.fly.dev/messages/"


def test_a_machine_that_listens_on_ipv6_only_fails_naming_flys_proxy_path() -> None:
    old = parse_image_command(f"FROM python:3.11-slim\n{UVICORN_ON_IPV6_ONLY_CMD}\n")
    port = free_port()
    with pytest.raises(RuntimeError, match="could not be reached") as error:
        start_machine("c1c1c1c1c1c1c1", port=port, command=old.for_machine(port=port))
    assert "http://127.0.0.1:" in str(error.value)
    assert "IPv4, the path Fly's proxy uses" in str(error.value)
    assert "[::1]" not in str(error.value).split("could not be reached on", 1)[1].split(":\n", 1)[0]


def test_a_machine_that_listens_on_ipv4_only_fails_naming_the_private_network_path() -> None:
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", str(port)]
    with pytest.raises(RuntimeError, match="could not be reached") as error:
        start_machine("c2c2c2c2c2c2c2", port=port, command=command)
    assert "http://[::1]:" in str(error.value)
    assert "IPv6, the path peers on the private network (6PN) use" in str(error.value)


def test_sigterm_stops_the_machine_gracefully_within_kill_timeout() -> None:
    started = start_machine("c3c3c3c3c3c3c3")
    try:
        started.process.send_signal(signal.SIGTERM)
        # uvicorn re-raises the signal once it has shut down, as a process stopped by it.
        assert started.process.wait(timeout=FLY["kill_timeout"]) in (0, -signal.SIGTERM)
    finally:
        started.stop()
    log = started.log()
    assert "Application shutdown complete" in log
    assert "Traceback" not in log


def run_launcher(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fly_replay_router.serve", *arguments],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_taken_port_is_one_sentence_naming_the_address_and_its_path() -> None:
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        result = run_launcher("--port", str(port))
    assert result.returncode == 1
    assert f"cannot listen on 0.0.0.0:{port} (IPv4, the path Fly's proxy uses): Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_bad_options_are_refused_with_a_sentence() -> None:
    same = run_launcher("--port", "8080", "--metrics-port", "8080")
    assert same.returncode == 2
    assert "--metrics-port must differ from --port" in same.stderr
    missing = run_launcher("no_such_module:app", "--port", str(free_port()))
    assert missing.returncode == 1
    assert 'Could not import module "no_such_module"' in missing.stderr
    assert "Traceback" not in missing.stderr
    level = run_launcher("--log-level", "verbose")
    assert level.returncode == 2
    assert "invalid choice: 'verbose'" in level.stderr


@pytest.mark.parametrize(
    ("given", "layer"), [("info", "INFO"), ("debug", "DEBUG"), ("trace", "DEBUG"), ("warning", "WARNING")]
)
def test_the_launchers_log_level_is_the_layers_too(given: str, layer: str) -> None:
    # In a process of its own: the launcher configures the layer's logger once per process.
    code = (
        "import logging; from fly_replay_router.serve import show_layer_logs; "
        f"show_layer_logs({given!r}); print(logging.getLevelName(logging.getLogger('fly_replay_router').level))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert result.stdout.strip() == layer


def test_help_explains_which_address_serves_whom() -> None:
    result = run_launcher("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "0.0.0.0: Fly's proxy" in text
    assert "private network, 6PN" in text
    assert "--metrics-port" in text
    assert "https://fly.io/docs/networking/app-services/" in text


def test_with_several_workers_a_missing_secret_on_fly_is_one_sentence_not_a_restart_loop() -> None:
    env = {k: v for k, v in os.environ.items() if k != "AFFINITY_SECRET"}
    result = subprocess.run(
        [sys.executable, "-m", "fly_replay_router.serve", "--workers", "2", "--port", str(free_port())],
        cwd=ROOT, env={**env, "FLY_MACHINE_ID": "e0e0e0e0e0e0e0"}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 1
    assert "fly-replay-router cannot start: AFFINITY_SECRET is not set" in result.stderr
    assert "Traceback" not in result.stderr
    assert "worker" not in result.stderr.lower()  # no worker was started, so none restarts


def test_workers_die_with_a_supervisor_killed_by_sigkill() -> None:
    env = {**os.environ, "FLY_MACHINE_ID": "f0f0f0f0f0f0f0", "AFFINITY_SECRET": "serve-test-secret-0123456789abcdef"}
    supervisor = subprocess.Popen(
        [sys.executable, "-m", "fly_replay_router.serve", "--workers", "2", "--port", str(free_port())],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while len(children := _children(supervisor.pid)) < 2:
            assert supervisor.poll() is None
            assert time.monotonic() < deadline, "the workers never started"
            time.sleep(0.1)
    finally:
        supervisor.kill()
        supervisor.wait()
    deadline = time.monotonic() + 5
    while (left := [pid for pid in children if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert left == [], "workers outlived their supervisor and would keep the port"


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(") ", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except OSError:
        return False
