"""``python -m fly_replay_router.edge`` as a user runs it: real machine processes, signals, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.edge.edge_cli import ROOT, TESTS_DIR, FleetProcess, alive, probe_fleet_args, running_fleet, wait_gone


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    log = tmp_path_factory.mktemp("fleet") / "edge.log"
    args = [*probe_fleet_args(2), "--fly-toml", str(TESTS_DIR / "fly.probe.toml")]
    with running_fleet(args, log, env={"AFFINITY_SECRET": "", "AFFINITY_SET_BY_BOTH": "shell"}) as process:
        yield process


def test_help_explains_every_option() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fly_replay_router.edge", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0
    options = ("--machines", "--app", "--backend", "--port", "--host", "--balance", "--fly-toml", "--app-name")
    more = ("--autostop-interval", "--health-path", "--mcp-path", "--log-dir", "--app-dir", "--region", "--log-level")
    door = ("--dockerfile", "--max-header-bytes", "--header-timeout")
    for option in (*options, *more, *door):
        assert option in result.stdout
    # The console script is the same command.
    script = Path(sys.executable).with_name("fly-replay-edge")
    installed = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert installed.returncode == 0
    assert "--health-path" in installed.stdout


def test_startup_prints_the_fleet(fleet: FleetProcess) -> None:
    text = fleet.text()
    for machine in fleet.status()["machines"]:
        assert machine["id"] in text
        assert machine["url"] in text
    assert "Ctrl-C" in text
    assert "idle_timeout 30s" in text
    assert f"{fleet.url}/_edge/status" in text


def test_machines_get_the_fly_environment(fleet: FleetProcess) -> None:
    status = fleet.status()
    machines = status["machines"]
    envs = {}
    with httpx.Client(base_url=fleet.url) as client:
        for machine in machines:
            envs[machine["id"]] = client.get("/env", headers={"fly-force-instance-id": machine["id"]}).json()
    secrets = {env["AFFINITY_SECRET"] for env in envs.values()}
    assert len(secrets) == 1
    assert len(secrets.pop()) >= 32
    for machine_id, env in envs.items():
        assert env["FLY_MACHINE_ID"] == env["FLY_ALLOC_ID"] == machine_id
        assert len(machine_id) == 14
        assert int(machine_id, 16) >= 0
        assert env["FLY_APP_NAME"] == status["app"] == "probe-app"  # from fly.toml
        assert env["FLY_REGION"] == status["region"] == "lcl"
        assert env["AFFINITY_FROM_FLY_TOML"] == "yes"  # fly.toml's [env]
        assert env["AFFINITY_SET_BY_BOTH"] == "shell"  # the shell wins, as fly secrets do over [env]
        peers = dict(peer.split("=", 1) for peer in env["AFFINITY_PEERS"].split(","))
        # Peers over IPv6, as on Fly's private network; the edge over IPv4, as Fly's proxy.
        assert peers == {m["id"]: m["url"].replace("127.0.0.1", "[::1]") for m in machines}
        assert all(m["peer_url"] == peers[m["id"]] and m["url"].startswith("http://127.0.0.1:") for m in machines)


def test_kill_stop_start_and_autostart(fleet: FleetProcess) -> None:
    a, b = (m["id"] for m in fleet.status()["machines"])
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        killed = client.post(f"/_edge/machines/{a}/kill").json()
        assert killed["state"] == "stopped"
        assert {client.get("/echo").json()["machine"] for _ in range(10)} == {b}
        # A replay naming the stopped machine starts it again, with the same id and port.
        replayed = client.get("/echo", headers={"fly-force-instance-id": b, f"x-probe-replay-{b}": f"instance={a}"})
        assert replayed.json()["machine"] == a
        status = fleet.status()
        assert next(m for m in status["machines"] if m["id"] == a)["state"] == "started"
        assert status["autostarts"] == 1
        stopped = client.post(f"/_edge/machines/{b}/stop").json()
        assert stopped["state"] == "stopped"
        assert stopped["pid"] is None
    # The CLI verb talks to the running edge.
    verb = subprocess.run(
        [sys.executable, "-m", "fly_replay_router.edge", "machine", "start", b, "--edge", fleet.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert verb.returncode == 0, verb.stderr
    assert '"state": "started"' in verb.stdout


def test_a_crashed_machine_leaves_rotation(fleet: FleetProcess) -> None:
    machines = fleet.status()["machines"]
    victim = machines[0]
    fleet.machine_pids.append(victim["pid"])
    os.kill(victim["pid"], signal.SIGKILL)
    assert not wait_gone([victim["pid"]])
    with httpx.Client(base_url=fleet.url) as client:
        served = {client.get("/echo").json()["machine"] for _ in range(10)}
    assert served == {machines[1]["id"]}
    assert next(m for m in fleet.status()["machines"] if m["id"] == victim["id"])["state"] == "stopped"
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        client.post(f"/_edge/machines/{victim['id']}/start")


def test_when_every_machine_is_stopped_a_request_starts_one(fleet: FleetProcess) -> None:
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        for machine in fleet.status()["machines"]:
            client.post(f"/_edge/machines/{machine['id']}/stop")
        before = fleet.status()["autostarts"]
        response = client.get("/echo")
    assert response.status_code == 200
    status = fleet.status()
    assert status["autostarts"] == before + 1
    assert [m["state"] for m in status["machines"]].count("started") == 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_the_edge_and_every_machine(tmp_path: Path, signum: int) -> None:
    process = FleetProcess(probe_fleet_args(2), tmp_path / "edge.log")
    process.wait_ready()
    pids = process.machine_pids
    assert len(pids) == 2
    assert all(alive(pid) for pid in pids)
    assert process.stop(signum) == 0
    assert not wait_gone(pids)
    assert "stopped" in process.text()


def test_machines_die_with_a_killed_edge(tmp_path: Path) -> None:
    process = FleetProcess(probe_fleet_args(1), tmp_path / "edge.log")
    process.wait_ready()
    pids = process.machine_pids
    process.stop(signal.SIGKILL)  # no chance to clean up: the machines must still go (PR_SET_PDEATHSIG)
    assert not wait_gone(pids)


def test_a_machine_that_fails_to_start_is_reported_with_its_log(tmp_path: Path) -> None:
    process = FleetProcess(["--machines", "2", "--app", "no_such_module:app"], tmp_path / "edge.log")
    code = process.process.wait(60)
    process.output.close()
    text = process.text()
    assert code == 1
    assert "failed to start" in text
    assert "no_such_module" in text  # from the machine's own log


def test_a_bad_fly_toml_is_reported(tmp_path: Path) -> None:
    bad = tmp_path / "fly.toml"
    bad.write_text("[http_service.http_options]\nidle_timeout = 'soon'\n")
    result = subprocess.run(
        [sys.executable, "-m", "fly_replay_router.edge", "--fly-toml", str(bad)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr
    assert "idle_timeout" in result.stderr


def test_backends_started_elsewhere(tmp_path: Path, make_probes) -> None:
    a, b = make_probes(2)
    process = FleetProcess(
        ["--machines", "0", "--backend", f"{a.id}={a.url}", "--backend", f"{b.id}={b.url}"], tmp_path / "edge.log"
    )
    try:
        process.wait_ready()
        with httpx.Client(base_url=process.url) as client:
            served = {client.get("/echo").json()["machine"] for _ in range(20)}
        assert served == {a.id, b.id}
    finally:
        assert process.stop() == 0


USER_FLY_TOML = """
app = "notes"
[http_service]
  internal_port = 8080
  [[http_service.checks]]
    method = "GET"
    path = "/ready"
    interval = "15s"
"""


def test_a_user_app_with_its_own_health_path_and_mcp_path(tmp_path: Path) -> None:
    """fly.toml's check path decides health; the banner does not invent /mcp; --log-dir is created."""
    toml = tmp_path / "fly.toml"
    toml.write_text(USER_FLY_TOML)
    log_dir = tmp_path / "not" / "yet" / "there"
    args = ["--machines", "2", "--app", "tests.edge.plain_app:app", "--fly-toml", str(toml), "--log-dir", str(log_dir)]
    with running_fleet(args, tmp_path / "edge.log") as process:
        text = process.text()
        machines = process.status()["machines"]
        assert [m["state"] for m in machines] == ["started", "started"]
        with httpx.Client(base_url=process.url) as client:
            assert client.get("/notes/mcp").status_code == 200
    assert f"{process.url}/mcp" not in text  # nothing claims the demo's endpoint
    assert "give --mcp-path" in text
    assert "GET /ready" in text
    for machine in machines:
        log = (log_dir / f"{machine['id']}.log").read_text()
        assert "plain-app GET /ready" in log
        assert "/healthz" not in log


def test_backends_alone_mean_only_those_machines(tmp_path: Path, make_probes) -> None:
    a, b = make_probes(2)
    args = ["--backend", f"{a.id}={a.url}", "--backend", f"{b.id}={b.url}", "--mcp-path", "/notes/mcp"]
    with running_fleet(args, tmp_path / "edge.log") as process:
        assert {m["id"] for m in process.status()["machines"]} == {a.id, b.id}
        text = process.text()
    assert f"MCP:      {process.url}/notes/mcp" in text
    assert "legacy SSE" not in text


def test_an_app_without_http_checks_is_up_once_its_port_opens(tmp_path: Path) -> None:
    """No [[http_service.checks]] and no --health-path: a TCP connect check, no GET /healthz at all."""
    toml = tmp_path / "fly.toml"
    toml.write_text('app = "notes"\n')
    log_dir = tmp_path / "logs"
    args = ["--machines", "1", "--app", "tests.edge.plain_app:app", "--fly-toml", str(toml), "--log-dir", str(log_dir)]
    with running_fleet(args, tmp_path / "edge.log") as process:
        (machine,) = process.status()["machines"]
        assert "TCP connection" in process.text()
    assert "plain-app GET" not in (log_dir / f"{machine['id']}.log").read_text()
