"""One machine of two workers is one machine to the scraper (the launcher, ``uvicorn --workers``, gunicorn).

Before: a scrape reported the one worker that took the connection, so totals alternated and
Prometheus saw a counter reset at almost every scrape. Now: 20 scrapes over a load never go down,
and once the load stops they sum to exactly the requests sent, whichever worker answers. A worker
killed with SIGKILL: the counters keep what it counted, its sessions leave the gauge.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from fly_replay_router.affinity.worker_metrics import supervisor_directory
from fly_replay_router.settings import sessions_for_memory
from tests.conftest import APP_NAME, ROOT, SECRET, ServerProcess, free_port
from tests.mcp_http import open_session, session_headers, tool_call, tool_text
from tests.test_workers_e2e import _sessionless_worker

pytestmark = pytest.mark.anyio

MACHINE = "e1e1e1e1e1e1e1"
SCRAPES = 20
SESSIONS = 4
GUNICORN = ["-m", "gunicorn", "tests.metrics_app:app", "--workers", "2", "-k", "uvicorn.workers.UvicornWorker"]
LAUNCHER = ["-m", "fly_replay_router.serve", "app.main:app", "--workers", "2"]
SERVERS = {
    "launcher": [*LAUNCHER, "--port", "{port}", "--metrics-port", "{metrics}"],
    "uvicorn": ["-m", "uvicorn", "tests.metrics_app:app", "--workers", "2", "--host", "127.0.0.1", "--port", "{port}"],
    "gunicorn": [*GUNICORN, "--bind", "127.0.0.1:{port}", "--bind", "127.0.0.1:{metrics}"],
}
_SAMPLE = re.compile(r"^(?P<series>[a-z_]+(?:\{[^}]*\})?) (?P<value>\S+)$")


@dataclass
class TwoWorkerMachine(ServerProcess):
    url: str
    metrics_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    workers: set[int] = field(default_factory=set)
    sessionless_sent: int = 0  # answered sessionless requests: each is one "passed" decision
    stop_seconds = 20.0

    def scrape(self) -> dict[str, float]:
        """Every sample of one scrape, on a new connection (any worker may take it)."""
        response = httpx.get(self.metrics_url, timeout=10)
        assert response.status_code == 200, response.text
        samples = {}
        for line in response.text.splitlines():
            match = _SAMPLE.match(line)
            if match and line.startswith("affinity_"):
                samples[match["series"]] = float(match["value"])
        return samples


@pytest.fixture(params=sorted(SERVERS))
def machine(request: pytest.FixtureRequest) -> Iterator[TwoWorkerMachine]:
    yield from _machine(request.param)


def _machine(server: str) -> Iterator[TwoWorkerMachine]:
    port, metrics = free_port(), free_port()
    env = {
        **os.environ,
        "FLY_MACHINE_ID": MACHINE,
        "FLY_APP_NAME": APP_NAME,
        "FLY_REGION": "lcl",
        "AFFINITY_SECRET": SECRET,
        "AFFINITY_WORKERS": "2",
        "FLY_VM_MEMORY_MB": "512",
        "AFFINITY_WORKER_SOCKET_DIR": tempfile.mkdtemp(prefix="metrics-workers-") + "/sockets",
    }
    if server == "gunicorn":
        env["METRICS_PORT"] = str(metrics)
    log = tempfile.NamedTemporaryFile(prefix=f"metrics-{server}-", suffix=".log", delete=False)  # noqa: SIM115
    command = [sys.executable, *(part.format(port=port, metrics=metrics) for part in SERVERS[server])]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    scrape_port = port if server == "uvicorn" else metrics
    started = TwoWorkerMachine(
        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{scrape_port}/metrics", process, Path(log.name)
    )
    try:
        _until(lambda: _workers_seen(started) >= 2, started, "two workers answer")
        yield started
    finally:
        started.stop()
        # uvicorn's and gunicorn's workers named their directory after their supervisor (the launcher removes its own).
        for directory in Path(supervisor_directory(MACHINE)).parent.glob(f"metrics-{process.pid}-*"):
            shutil.rmtree(directory, ignore_errors=True)


def _workers_seen(machine: TwoWorkerMachine) -> int:
    try:
        machine.workers.add(_sessionless_worker(machine.url))
    except httpx.TransportError:
        return 0
    machine.sessionless_sent += 1
    return len(machine.workers)


def _until(condition: object, machine: TwoWorkerMachine, what: str, within: float = 60) -> None:
    deadline = time.monotonic() + within
    while not condition():  # type: ignore[operator]
        if machine.process.poll() is not None or time.monotonic() > deadline:
            log = machine.log_path.read_text(errors="replace")
            raise AssertionError(f"not true within {within:g}s: {what}\n{log[-4000:]}")
        time.sleep(0.05)


def _decisions(samples: dict[str, float], outcome: str) -> float:
    return samples.get(f'affinity_decisions_total{{machine="{MACHINE}",outcome="{outcome}",reason=""}}', 0.0)


def _counters(samples: dict[str, float]) -> dict[str, float]:
    counted = ("_total{", "_bucket{", "_count{", "_sum{")
    return {series: value for series, value in samples.items() if any(part in series for part in counted)}


def _assert_never_down(history: list[dict[str, float]]) -> None:
    for before, after in itertools.pairwise(history):
        for series, value in _counters(before).items():
            assert after.get(series, 0.0) >= value, f"{series} went down from {value} to {after.get(series)}"


class Load:
    """Requests of a known kind, each on a new connection: the kernel spreads them over the workers."""

    def __init__(self, machine: TwoWorkerMachine) -> None:
        self.url = machine.url
        # Requests with no session: initialize, and sessionless (2026-07-28) calls (the fixture's too).
        self.passed = machine.sessionless_sent
        self.served = 0  # requests of a session, served by the worker that holds it
        self.tokens: list[str] = []

    def open_sessions(self, count: int) -> None:
        import anyio

        async def opening() -> None:
            async with httpx.AsyncClient(base_url=self.url, timeout=10) as raw:
                self.tokens.append(await open_session(raw, "/mcp"))

        for _ in range(count):
            anyio.run(opening)
            self.passed += 1
            self.served += 1

    def call(self, token: str, tool: str = "count") -> httpx.Response:
        response = httpx.post(f"{self.url}/mcp", headers=session_headers(token), json=tool_call(tool), timeout=10)
        if response.status_code == 200:
            self.served += 1
        return response

    def round(self) -> None:
        _sessionless_worker(self.url)
        self.passed += 1
        for token in self.tokens:
            assert self.call(token).status_code == 200


def _matches(machine: TwoWorkerMachine, load: Load) -> bool:
    samples = machine.scrape()
    return (_decisions(samples, "passed"), _decisions(samples, "served")) == (load.passed, load.served)


def test_twenty_scrapes_over_a_load_never_go_down_and_sum_to_the_requests_sent(machine: TwoWorkerMachine) -> None:
    load = Load(machine)
    load.open_sessions(SESSIONS)
    history = []
    for _ in range(SCRAPES):
        load.round()
        history.append(machine.scrape())
    _assert_never_down(history)
    # Each worker publishes about once a second; the one that answers adds its own figures of now.
    _until(lambda: _matches(machine, load), machine, f"a scrape sums {load.passed} passed, {load.served} served", 15)
    final = machine.scrape()
    _assert_never_down([*history, final])
    assert final[f'affinity_worker_processes{{machine="{MACHINE}"}}'] == 2
    held = final[f'affinity_sessions_held{{machine="{MACHINE}",transport="streamable_http"}}']
    assert held == SESSIONS
    # Calls that landed on the other worker were handed over, each timed once.
    handed = final[f'affinity_decisions_total{{machine="{MACHINE}",outcome="handed_over",reason=""}}']
    assert handed > 0
    assert final[f'affinity_handover_duration_seconds_count{{machine="{MACHINE}"}}'] == handed
    # The machine's budget: each worker's share of it, added up.
    cap = final[f'affinity_sessions_max{{machine="{MACHINE}",transport="streamable_http"}}']
    assert cap == 2 * sessions_for_memory(512, workers=2)


def test_a_worker_killed_keeps_its_counts_and_drops_its_sessions(machine: TwoWorkerMachine) -> None:
    load = Load(machine)
    owners: dict[str, int] = {}
    while len(set(owners.values())) < 2 or len(owners) < SESSIONS:  # sessions on both workers
        assert len(owners) < 40, owners
        load.open_sessions(1)
        owners[load.tokens[-1]] = int(tool_text(load.call(load.tokens[-1], "worker")))
    _until(lambda: _matches(machine, load), machine, "every worker's figures published", 15)
    before = machine.scrape()
    victim = owners[load.tokens[0]]
    survivors = [token for token, pid in owners.items() if pid != victim]
    os.kill(victim, signal.SIGKILL)

    history = [before]
    for token in load.tokens:
        response = load.call(token)
        assert response.status_code == (200 if token in survivors else 404), response.text
        history.append(machine.scrape())
    known = set(owners.values())

    def replacement_answers() -> bool:
        pid = _sessionless_worker(load.url)
        load.passed += 1
        return pid not in known

    _until(replacement_answers, machine, "a new worker replaces the killed one")
    _until(lambda: _workers_alive(machine) == 2, machine, "two live workers: the replacement, not the killed one")
    _until(lambda: _matches(machine, load), machine, "the counts of the killed worker still summed", 15)
    # Every request for the killed worker's sessions reached a worker that could not hand it over: 404.
    lost = len(load.tokens) - len(survivors)
    gone = f'affinity_handover_failures_total{{machine="{MACHINE}",reason="worker_gone"}}'
    _until(lambda: machine.scrape()[gone] == lost, machine, f"{lost} hand-overs to a worker gone", 15)
    history.append(machine.scrape())
    _assert_never_down(history)
    final = history[-1]
    assert final[f'affinity_sessions_held{{machine="{MACHINE}",transport="streamable_http"}}'] == len(survivors)


def _workers_alive(machine: TwoWorkerMachine) -> float:
    return machine.scrape().get(f'affinity_worker_processes{{machine="{MACHINE}"}}', 0.0)


def _workers_dir(machine: TwoWorkerMachine) -> Path:
    """The directory the launcher gave its workers (in their environment)."""
    pid = next(iter(machine.workers))
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    (options,) = [entry for entry in environ if entry.startswith(b"FLY_REPLAY_ROUTER_SERVE=")]
    return Path(options.decode().split("\n")[3])


@pytest.mark.parametrize("machine", ["launcher"], indirect=True)
def test_a_machine_started_again_counts_from_zero_and_its_directory_is_gone(
    machine: TwoWorkerMachine, request: pytest.FixtureRequest
) -> None:
    load = Load(machine)
    load.open_sessions(2)
    _until(lambda: _matches(machine, load), machine, "the first run's figures", 15)
    directory = _workers_dir(machine)
    assert len(list(directory.glob("*.json"))) == 2  # one file per worker
    machine.stop()
    assert not directory.exists()  # removed with the supervisor: nothing left for the next run

    again = request.getfixturevalue("machine_again")
    fresh = Load(again)
    _until(lambda: _matches(again, fresh), again, "a new run counts its own requests only", 15)
    assert _workers_dir(again) != directory


@pytest.fixture
def machine_again() -> Iterator[TwoWorkerMachine]:
    """The same machine started again: one more run of the launcher, with the same machine id."""
    yield from _machine("launcher")
