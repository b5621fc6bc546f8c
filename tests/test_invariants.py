"""Every promise holds on every path into the server: the model fleet (``tests/model_fleet.py``) on both SDK eras.

Each era runs in a process of its own: the 2.x line from this environment, the 1.x line from a
user environment of its own (``tests/compat/envs.py``), with this checkout's layer on its path.
A broken promise fails with hypothesis's shortest sequence of requests that breaks it.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.compat.envs import ROOT, UserProject, prepared

# The 1.x line, and what the model itself needs there; the layer comes from this checkout.
MCP1_MODEL = UserProject(
    "mcp1-model", ("mcp>=1.30,<2", "hypothesis>=6.100", "cryptography>=42", "httpx>=0.27", "sniffio>=1.3"), sdk="mcp"
)
EXAMPLES, STEPS = 25, 25


def run_model(python: str) -> str:
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [python, "-m", "tests.model_fleet", "--examples", str(EXAMPLES), "--steps", str(STEPS)]
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"a promise broke:\n{result.stdout[-6000:]}\n{result.stderr[-12000:]}"
    assert "held every invariant" in result.stdout
    return result.stdout


@pytest.mark.parametrize("era", ["mcp2", "mcp1"])
def test_every_promise_holds_on_every_path(era: str) -> None:
    python = sys.executable if era == "mcp2" else str(prepared(MCP1_MODEL).python)
    version = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('mcp'))"], capture_output=True, text=True
    ).stdout.strip()
    assert version.startswith("2." if era == "mcp2" else "1."), f"{era} runs mcp {version}"
    print(run_model(python))
