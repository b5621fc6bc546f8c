"""The edge's control surface answers only requests addressed to it, and listens remotely only when asked.

Through a real ``python -m fly_replay_router.edge`` process: a web page reaching the edge by DNS
rebinding (a foreign ``Host``) or by a cross-origin request (a foreign ``Origin``) must not drive it.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.edge.conftest import Probe
from tests.edge.edge_cli import ROOT, FleetProcess, running_fleet


@pytest.fixture
def edge(tmp_path: Path, make_probes) -> Iterator[tuple[FleetProcess, list[Probe]]]:
    probes = make_probes(2)
    args = [arg for probe in probes for arg in ("--backend", f"{probe.id}={probe.url}")]
    with running_fleet(args, tmp_path / "edge.log") as process:
        yield process, probes


def _states(process: FleetProcess) -> dict[str, str]:
    return {m["id"]: m["state"] for m in process.status()["machines"]}


def test_a_foreign_host_cannot_suspend_a_machine_or_read_status(edge) -> None:
    process, (a, _) = edge
    with httpx.Client(base_url=process.url) as client:
        rebound = {"host": "attacker.example:80"}
        suspend = client.post(f"/_edge/machines/{a.id}/suspend", headers=rebound)
        status = client.get("/_edge/status", headers=rebound)
        page = client.get("/_edge/", headers=rebound)
        wrong_port = client.get("/_edge/status", headers={"host": "127.0.0.1:1"})
    for response in (suspend, status, page, wrong_port):
        assert response.status_code == 403
        assert "not this edge's address" in response.json()["error"]
    assert _states(process)[a.id] == "started"


def test_a_foreign_origin_cannot_drive_the_edge(edge) -> None:
    process, (a, _) = edge
    with httpx.Client(base_url=process.url) as client:
        for origin in ("http://attacker.example", "null", "http://127.0.0.1:1"):
            refused = client.post(f"/_edge/machines/{a.id}/suspend", headers={"origin": origin})
            assert refused.status_code == 403
            assert "foreign" in refused.json()["error"]
        assert _states(process)[a.id] == "started"
        # The edge's own page (its own origin) and tools without an Origin are served.
        own = client.post(f"/_edge/machines/{a.id}/suspend", headers={"origin": process.url})
        assert own.status_code == 200
        assert client.post(f"/_edge/machines/{a.id}/start").status_code == 200
        via_localhost = client.get("/_edge/status", headers={"host": process.url.replace("127.0.0.1", "localhost")[7:]})
        assert via_localhost.status_code == 200


def test_proxied_requests_are_not_the_edges_to_refuse(edge) -> None:
    process, probes = edge
    with httpx.Client(base_url=process.url) as client:
        response = client.get("/echo", headers={"host": "mcp.example.com", "origin": "https://elsewhere.example"})
    assert response.status_code == 200
    assert response.json()["machine"] in {probe.id for probe in probes}


def test_a_non_loopback_host_needs_allow_remote() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "fly_replay_router.edge", "--host", "0.0.0.0", "--port", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "refusing to listen on 0.0.0.0" in result.stderr
    assert "--allow-remote" in result.stderr


def test_allow_remote_warns_and_shows_the_real_address(tmp_path: Path, make_probes) -> None:
    (a,) = make_probes(1)
    args = ["--host", "0.0.0.0", "--allow-remote", "--backend", f"{a.id}={a.url}"]
    with running_fleet(args, tmp_path / "edge.log") as process:
        text = process.text()
        port = process.url.rsplit(":", 1)[1]
    assert f"listen:   0.0.0.0:{port}   WARNING:" in text
    assert "warning: the edge listens on every interface" in text
