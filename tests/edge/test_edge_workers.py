"""Machines of several worker processes in the local fleet: how many, what the status shows, one worker's crash.

fly.toml's ``[[vm]]`` sizes each machine as Fly would: ``cpus`` is the number of workers the image's
launcher runs (unless ``--workers`` or the Dockerfile's ``CMD`` says otherwise) and ``memory``
becomes ``FLY_VM_MEMORY_MB``. The probe app runs here; the demo app's sessions across workers are
``tests/test_workers_fleet.py``'s.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import expect

from fly_replay_router.edge.arguments import build_parser, plan_launch
from fly_replay_router.edge.config import FlyToml
from fly_replay_router.edge.vm import VmSize, parse_memory
from tests.edge.browser import browser_page
from tests.edge.edge_cli import ROOT, FleetProcess, alive, running_fleet, wait_gone

PROBE = "tests.edge.edge_probe:app"


def _fly_toml(tmp_path: Path, vm: str, cmd: list[str] | None = None) -> Path:
    (tmp_path / "fly.toml").write_text(f'app = "workers-app"\n{vm}\n')
    if cmd is not None:
        (tmp_path / "Dockerfile").write_text(f"FROM python:3.11-slim\nCMD {json.dumps(cmd)}\n")
    return tmp_path / "fly.toml"


# --- [[vm]]: what Fly would give each machine ----------------------------------------------


@pytest.mark.parametrize(
    ("vm", "cpus", "memory_mb"),
    [
        ("", 1, 256),  # no [[vm]]: Fly's default, shared-cpu-1x
        ('[[vm]]\n  cpus = 2\n  memory = "1gb"', 2, 1024),
        ('[[vm]]\n  cpus = 4\n  memory = "512mb"', 4, 512),
        ("[[vm]]\n  cpus = 2\n  memory_mb = 2048", 2, 2048),
        ("[[vm]]\n  memory = 768", 1, 768),
        ('[[vm]]\n  size = "shared-cpu-2x"', 2, 512),
        ('[[vm]]\n  size = "performance-2x"', 2, 4096),
        ('[[vm]]\n  size = "shared-cpu-4x"\n  memory = "2gb"', 4, 2048),
    ],
)
def test_vm_section_sizes_each_machine(tmp_path: Path, vm: str, cpus: int, memory_mb: int) -> None:
    size = FlyToml.load(_fly_toml(tmp_path, vm)).vm
    assert (size.cpus, size.memory_mb) == (cpus, memory_mb)


@pytest.mark.parametrize(
    ("vm", "message"),
    [
        ("[[vm]]\n  cpus = 0", "cpus must be from 1 to 256"),
        ('[[vm]]\n  cpus = "two"', "cpus must be a whole number"),
        ('[[vm]]\n  memory = "lots"', "memory 'lots' must be a size such as \"512mb\""),
        ('[[vm]]\n  size = "huge-cpu-1x"', "is not a preset such as shared-cpu-2x"),
        ('vm = "small"', "[[vm]] must be an array of tables"),
    ],
)
def test_a_bad_vm_section_is_explained(tmp_path: Path, vm: str, message: str) -> None:
    with pytest.raises(ValueError, match=r"fly\.toml") as raised:
        FlyToml.load(_fly_toml(tmp_path, vm))
    assert message in str(raised.value)


def test_memory_sizes_read_as_fly_writes_them() -> None:
    assert [parse_memory(v) for v in ("256mb", "1gb", "2GB", "512", 512, "1g")] == [256, 1024, 2048, 512, 512, 1024]
    assert VmSize().source.startswith("no [[vm]]")


@pytest.mark.parametrize(
    ("vm", "cmd_workers", "option", "workers", "source"),
    [
        ("", None, None, 1, "one per CPU: no [[vm]]"),
        ("[[vm]]\n  cpus = 3", None, None, 3, "one per CPU: fly.toml [[vm]] cpus = 3"),
        ("[[vm]]\n  cpus = 3", "2", None, 2, "the Dockerfile CMD's --workers"),
        ("[[vm]]\n  cpus = 3", "2", "4", 4, "--workers"),
    ],
)
def test_workers_per_machine_are_what_fly_would_run(
    tmp_path: Path, vm: str, cmd_workers: str | None, option: str | None, workers: int, source: str
) -> None:
    cmd = ["python", "-m", "fly_replay_router.serve", "app.main:app", "--port", "8080"]
    cmd += ["--workers", cmd_workers] if cmd_workers else []
    argv = ["--fly-toml", str(_fly_toml(tmp_path, vm, cmd))] + (["--workers", option] if option else [])
    plan = plan_launch(build_parser().parse_args(argv))
    assert plan.workers == workers
    assert plan.workers_source.startswith(source)
    machine_argv = plan.command.argv(app="app.main:app", app_dir=None, port=9000, metrics_port=None, workers=workers)
    assert machine_argv[machine_argv.index("--workers") + 1] == str(workers)
    assert machine_argv.count("--workers") == 1


@pytest.mark.parametrize("option", ["0", "257"])
def test_a_bad_workers_option_is_refused_before_any_machine_starts(tmp_path: Path, option: str) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fly_replay_router.edge",
            "--fly-toml",
            str(_fly_toml(tmp_path, "")),
            "--workers",
            option,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"--workers {option} must be from 1 to 256" in result.stderr


# --- a running fleet of two-worker machines ------------------------------------------------


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    """Two probe machines, 2 CPUs and 1 GB each from fly.toml, run by the launcher (no Dockerfile beside it)."""
    directory = tmp_path_factory.mktemp("workers")
    fly_toml = _fly_toml(directory, '[[vm]]\n  cpus = 2\n  memory = "1gb"')
    args = ["--machines", "2", "--app", PROBE, "--fly-toml", str(fly_toml), "--autostop-interval", "600"]
    with running_fleet(args, directory / "edge.log") as process:
        deadline = time.monotonic() + 60
        while not all(len(m["worker_pids"]) == 2 for m in process.status()["machines"]):
            assert time.monotonic() < deadline, process.status()
            time.sleep(0.2)
        yield process


def _children(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                children.add(int(entry.name))
    return children


def _states(pids: list[int], wanted: set[str]) -> set[str]:
    """The processes' states (proc(5): R, S, T ...) once all are in ``wanted``, or after 5 s (signals take a moment)."""
    deadline = time.monotonic() + 5
    while True:
        states = {Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] for pid in pids}
        if states <= wanted or time.monotonic() > deadline:
            return states
        time.sleep(0.05)


def test_banner_status_and_environment_show_the_workers(fleet: FleetProcess) -> None:
    text = fleet.text()
    assert "workers:  2 worker processes per machine (one per CPU: fly.toml [[vm]] cpus = 2" in text
    assert "FLY_VM_MEMORY_MB=1024" in text
    assert "worker kill <id> <pid>" in text
    for machine in fleet.status()["machines"]:
        assert machine["workers"] == 2
        pids = machine["worker_pids"]
        assert len(set(pids)) == 2
        assert machine["pid"] not in pids
        # The supervisor's children that serve the port; not multiprocessing's resource tracker.
        assert set(pids) < _children(machine["pid"])
        env = httpx.get(f"{fleet.url}/env", headers={"fly-force-instance-id": machine["id"]}).json()
        assert env["FLY_VM_MEMORY_MB"] == "1024"
        assert env["AFFINITY_WORKERS"] == "2"  # the launcher really ran two workers


def test_worker_kill_verb_kills_one_worker_and_the_supervisor_replaces_it(fleet: FleetProcess) -> None:
    machine, other = fleet.status()["machines"]
    victim, sibling = machine["worker_pids"]
    verb = ["worker", "kill", machine["id"], str(victim), "--edge", fleet.url]
    result = subprocess.run(
        [sys.executable, "-m", "fly_replay_router.edge", *verb],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["killed_worker"] == victim
    assert answer["state"] == "started"
    assert not wait_gone([victim])
    assert alive(sibling)
    assert all(alive(pid) for pid in other["worker_pids"])  # other machines untouched
    deadline = time.monotonic() + 30
    while True:
        pids = next(m for m in fleet.status()["machines"] if m["id"] == machine["id"])["worker_pids"]
        if len(pids) == 2:
            break
        assert time.monotonic() < deadline, pids
        time.sleep(0.2)
    assert victim not in pids
    assert sibling in pids
    events = fleet.status()["recent_events"]
    assert {"kind": "kill worker", "detail": f"{victim} of {machine['id']}"} in [
        {"kind": e["kind"], "detail": e["detail"]} for e in events
    ]


def test_only_a_worker_of_that_machine_can_be_killed(fleet: FleetProcess) -> None:
    first, second = fleet.status()["machines"]
    with httpx.Client(base_url=fleet.url, timeout=30) as edge:
        for pid in (first["pid"], second["worker_pids"][0], fleet.process.pid, os.getpid(), 1, 0):
            refused = edge.post(f"/_edge/machines/{first['id']}/workers/{pid}/kill")
            assert refused.status_code == 404, refused.text
            assert f"process {pid} is not a worker of machine {first['id']}" in refused.json()["error"]
        assert edge.post(f"/_edge/machines/{first['id']}/workers/-1/kill").status_code == 404
        # Digits int() takes but HTTP's grammar does not (Arabic-Indic, superscript, fullwidth): 404, never 500.
        for pid in ("\u0661\u0662", "\u00b2", "\uff11", "1" * 40):
            refused = edge.post(f"/_edge/machines/{first['id']}/workers/{pid}/kill")
            assert refused.status_code == 404, refused.text
        assert edge.post(f"/_edge/machines/0123456789abcd/workers/{first['worker_pids'][0]}/kill").status_code == 404
        assert edge.get(f"/_edge/machines/{first['id']}/workers/{first['worker_pids'][0]}/kill").status_code == 405
    for pid in (first["pid"], *first["worker_pids"], *second["worker_pids"], fleet.process.pid):
        assert alive(pid)


def test_suspend_and_resume_reach_every_worker(fleet: FleetProcess) -> None:
    machine = fleet.status()["machines"][0]
    with httpx.Client(base_url=fleet.url, timeout=30) as edge:
        assert edge.post(f"/_edge/machines/{machine['id']}/suspend").json()["state"] == "suspended"
        assert _states([machine["pid"], *machine["worker_pids"]], {"T"}) == {"T"}
        killed = edge.post(f"/_edge/machines/{machine['id']}/workers/{machine['worker_pids'][0]}/kill")
        assert killed.status_code == 200  # a stopped process dies of SIGKILL too
        assert edge.post(f"/_edge/machines/{machine['id']}/start").json()["state"] == "started"
        assert _states([machine["pid"], machine["worker_pids"][1]], {"S", "R"}) <= {"S", "R"}


def test_a_supervisor_that_dies_takes_its_workers_with_it(fleet: FleetProcess) -> None:
    machine = fleet.status()["machines"][1]
    workers = machine["worker_pids"]
    os.kill(machine["pid"], signal.SIGKILL)  # the machine's main process crashes; its workers are orphans
    assert not wait_gone(workers)  # as on Fly, where the VM stops with its main process
    deadline = time.monotonic() + 10
    while (entry := next(m for m in fleet.status()["machines"] if m["id"] == machine["id"]))["state"] != "stopped":
        assert time.monotonic() < deadline, entry
        time.sleep(0.1)
    assert entry["worker_pids"] == []
    with httpx.Client(base_url=fleet.url, timeout=60) as edge:  # and it starts again on its own port
        started = edge.post(f"/_edge/machines/{machine['id']}/start").json()
    assert started["state"] == "started"
    assert started["pid"] != machine["pid"]
    fleet.machine_pids.append(started["pid"])


@pytest.mark.anyio
async def test_the_page_shows_each_machines_workers_and_kills_one(
    fleet: FleetProcess, chromium: Path, tmp_path: Path
) -> None:
    machine = fleet.status()["machines"][0]
    victim, sibling = machine["worker_pids"]
    async with browser_page(chromium, tmp_path / "profile") as page:
        await page.goto(f"{fleet.url}/_edge/")
        cell = page.locator(f'tr[data-machine="{machine["id"]}"] td.workers')
        await expect(cell.locator(".worker-count")).to_have_text("2/2")
        await expect(cell.locator("button")).to_have_text([f"kill {victim}", f"kill {sibling}"])
        await cell.locator(f'button[data-pid="{victim}"]').click()
        await expect(cell.locator(f'button[data-pid="{victim}"]')).to_have_count(0)
        await expect(cell.locator(f'button[data-pid="{sibling}"]')).to_have_count(1)
        await expect(cell.locator(".worker-count")).to_have_text("2/2", timeout=30_000)  # a new worker took its place
    assert not wait_gone([victim])
    assert alive(sibling)
