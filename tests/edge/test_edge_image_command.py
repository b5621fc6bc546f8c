"""The local fleet runs the image's own command, reached as Fly reaches machines: IPv4 for the proxy, IPv6 for peers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from fly_replay_router.dockerfile import read_image_command
from tests.edge.edge_cli import ROOT, FleetProcess, running_fleet

PROBE = "tests.edge.edge_probe:app"


def _project(tmp_path: Path, cmd: list[str] | None) -> Path:
    """A project directory holding a fly.toml and, when ``cmd`` is given, a Dockerfile with that CMD."""
    (tmp_path / "fly.toml").write_text('app = "image-app"\n')
    if cmd is not None:
        (tmp_path / "Dockerfile").write_text(f"FROM python:3.11-slim\nCMD {json.dumps(cmd)}\n")
    return tmp_path / "fly.toml"


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _failed_start(tmp_path: Path, cmd: list[str]) -> str:
    fly_toml = _project(tmp_path, cmd)
    process = FleetProcess(["--machines", "1", "--app", PROBE, "--fly-toml", str(fly_toml)], tmp_path / "edge.log")
    code = process.process.wait(60)
    process.output.close()
    assert code == 1, process.text()
    return process.text()


def test_each_machine_runs_the_dockerfiles_command_with_its_own_ports(tmp_path: Path) -> None:
    with running_fleet(["--machines", "2", "--app", PROBE], tmp_path / "edge.log") as fleet:
        machines = fleet.status()["machines"]
        image = read_image_command(ROOT / "Dockerfile")
        for machine in machines:
            port = int(machine["url"].rsplit(":", 1)[1])
            metrics_port = int(machine["metrics_url"].rsplit(":", 1)[1])
            assert _cmdline(machine["pid"]) == image.for_machine(
                port=port, metrics_port=metrics_port, app=PROBE, workers=1
            )
            # Metrics on the private port; through the edge, /metrics is the app's own path, not the metrics.
            private = httpx.get(machine["metrics_url"] + "/metrics")
            assert private.status_code == 200
            assert "# HELP" in private.text
            forced = {"fly-force-instance-id": machine["id"]}
            assert "# HELP" not in httpx.get(fleet.url + "/metrics", headers=forced).text
        assert len({m["metrics_url"] for m in machines}) == 2
        assert "command:  Dockerfile CMD" in fleet.text()


def test_without_a_dockerfile_machines_run_the_launcher_and_the_banner_says_so(tmp_path: Path) -> None:
    fly_toml = _project(tmp_path, None)
    args = ["--machines", "1", "--app", PROBE, "--fly-toml", str(fly_toml)]
    with running_fleet(args, tmp_path / "edge.log") as fleet:
        (machine,) = fleet.status()["machines"]
        argv = _cmdline(machine["pid"])
        assert argv[:4] == [sys.executable, "-m", "fly_replay_router.serve", PROBE]
        assert f"no Dockerfile at {tmp_path / 'Dockerfile'}" in fleet.text()
        assert httpx.get(machine["url"] + "/healthz").status_code == 200
        assert httpx.get(machine["peer_url"] + "/healthz").status_code == 200


def test_a_dockerfile_named_with_dockerfile_must_exist(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fly_replay_router.edge", "--dockerfile", str(tmp_path / "nope")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "nope: no such file" in result.stderr


@pytest.mark.parametrize(
    ("host", "answered", "silent", "who"),
    [
        ("::", "answered on IPv6 [::1]", "not on 127.0.0.1", "Fly's proxy"),
        ("127.0.0.1", "answered on 127.0.0.1", "not on IPv6 [::1]", "private network"),
    ],
)
def test_a_machine_listening_on_one_family_fails_the_start_naming_the_path(
    tmp_path: Path, host: str, answered: str, silent: str, who: str
) -> None:
    # uvicorn alone binds one address: with "::" asyncio sets IPV6_V6ONLY, so IPv4 is refused.
    cmd = ["python", "-m", "uvicorn", PROBE, "--host", host, "--port", "8080"]
    text = _failed_start(tmp_path, cmd)
    line = next(line for line in text.splitlines() if line.startswith("error: machine"))
    assert answered in line
    assert silent in line
    assert who in line
