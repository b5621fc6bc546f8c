"""The example client (``python -m fly_replay_router.client``) as the README's walkthrough uses it, on a real fleet."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT
from tests.edge.edge_cli import FleetProcess, running_fleet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    with running_fleet(["--machines", "3"], tmp_path_factory.mktemp("client") / "edge.log") as process:
        yield process


def start_client(*args: str, output: Path) -> subprocess.Popen[bytes]:
    with output.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "fly_replay_router.client", *args], cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT
        )


def owner_once_started(output: Path) -> str:
    deadline = time.monotonic() + 30
    while not (match := re.search(r"\(owner ([0-9a-f]+)\).*\n  call 1:", output.read_text())):
        assert time.monotonic() < deadline, output.read_text()
        time.sleep(0.05)
    return match.group(1)


def test_sessions_stick_and_the_client_says_so(fleet: FleetProcess, tmp_path: Path) -> None:
    output = tmp_path / "client.out"
    client = start_client("--url", fleet.url, "--sessions", "3", "--calls", "3", output=output)
    assert client.wait(60) == 0, output.read_text()
    text = output.read_text()
    assert text.count("count=3") == 3
    assert "every session stuck to its machine" in text


def test_a_suspended_owner_is_resumed_and_the_session_counts_on(fleet: FleetProcess, tmp_path: Path) -> None:
    output = tmp_path / "client.out"
    client = start_client("--url", fleet.url, "--sessions", "1", "--calls", "6", "--pause", "0.5", output=output)
    owner = owner_once_started(output)
    resumed = f"autostart: resuming machine {owner}"
    resumed_before = fleet.text().count(resumed)
    assert httpx.post(f"{fleet.url}/_edge/machines/{owner}/suspend").json()["state"] == "suspended"
    # The suspend landed inside the session: calls were still to come when the owner stopped.
    calls_before_suspend = len(re.findall(r"whoami=\w+ count=\d", output.read_text()))
    assert calls_before_suspend < 6, output.read_text()
    assert client.wait(60) == 0, output.read_text()
    assert re.findall(r"whoami=(\w+) count=(\d)", output.read_text()) == [(owner, str(n)) for n in range(1, 7)]
    # ... and a later call found the owner suspended and the edge resumed it, as Fly's proxy does.
    assert fleet.text().count(resumed) == resumed_before + 1, fleet.text()


def test_a_stopped_owner_loses_the_session_and_the_client_says_so(fleet: FleetProcess, tmp_path: Path) -> None:
    output = tmp_path / "client.out"
    client = start_client("--url", fleet.url, "--sessions", "1", "--calls", "6", "--pause", "0.5", output=output)
    owner = owner_once_started(output)
    assert httpx.post(f"{fleet.url}/_edge/machines/{owner}/stop").json()["state"] == "stopped"
    assert client.wait(60) == 1, output.read_text()
    text = output.read_text()
    assert "failed: Session not found" in text
    assert "1 session(s) lost" in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--url", "http://127.0.0.1:1"], "cannot reach http://127.0.0.1:1"),
        (["--url", "ftp://example"], "is not an http(s) URL"),
        (["--calls", "0"], "must be at least 1"),
    ],
)
def test_bad_arguments_and_no_fleet_give_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    output = tmp_path / "client.out"
    assert start_client(*args, output=output).wait(60) == 2
    assert message in output.read_text()
    assert "Traceback" not in output.read_text()
