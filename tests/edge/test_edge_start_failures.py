"""The fleet says why a machine fails to start: its exit code and its last log lines, as soon as it exits.

The case that used to take the whole health timeout: the image's command serves ``--metrics-port``
with several workers, and the machine cannot import ``prometheus-client``. Each worker died at
import and uvicorn's supervisor started another, forever; the edge said "not 2xx after 30s". Now
the launcher checks before it starts a worker, exits, and the edge reports that exit at once.
Without the package (which the ``edge`` extra now brings) is provoked by a module of that name
that refuses to import, first on the machine's path.
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path

from fly_replay_router.dockerfile import read_image_command
from tests.edge.edge_cli import ROOT, FleetProcess

PROBE = "tests.edge.edge_probe:app"
# FleetSpec.start_timeout: what a machine that never becomes healthy is given.
START_TIMEOUT = 30.0


def _without_prometheus_client(tmp_path: Path) -> dict[str, str]:
    hidden = tmp_path / "hidden"
    (hidden / "prometheus_client").mkdir(parents=True)
    (hidden / "prometheus_client" / "__init__.py").write_text(
        "raise ImportError(\"No module named 'prometheus_client'\")\n"
    )
    return {"PYTHONPATH": str(hidden)}


def test_a_machine_that_exits_while_starting_is_reported_at_once_with_its_code_and_log(tmp_path: Path) -> None:
    (tmp_path / "fly.toml").write_text('app = "image-app"\n')
    cmd = ["python", "-m", "fly_replay_router.serve", "app.main:app", "--port", "8080", "--metrics-port", "9091"]
    (tmp_path / "Dockerfile").write_text(f"FROM python:3.11-slim\nCMD {json.dumps(cmd)}\n")
    args = ["--machines", "2", "--workers", "2", "--app", PROBE, "--fly-toml", str(tmp_path / "fly.toml")]
    started = time.monotonic()
    fleet = FleetProcess(args, tmp_path / "edge.log", env=_without_prometheus_client(tmp_path))
    code = fleet.process.wait(START_TIMEOUT * 2)
    elapsed = time.monotonic() - started
    fleet.output.close()
    text = fleet.text()
    assert code == 1, text
    line = next(line for line in text.splitlines() if line.startswith("error: machine"))
    assert line.endswith("failed to start: process exited with code 1"), line
    # The end of the machine's log says what to install.
    assert "--metrics-port needs prometheus-client: pip install 'fly-replay-router[metrics]'" in text
    assert elapsed < START_TIMEOUT - 5, f"reported after {elapsed:.1f}s, as late as the health timeout"


def test_the_edge_extra_brings_what_the_images_command_needs() -> None:
    image = read_image_command(ROOT / "Dockerfile")
    assert image.metrics_port is not None  # the image serves metrics ...
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    # ... so the local fleet, installed with the edge extra alone, must be able to run it.
    assert any(requirement.startswith("prometheus-client") for requirement in extras["edge"])
