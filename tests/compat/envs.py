"""User environments for the compatibility matrix: a venv per SDK, reused between runs.

Each environment is what a user's project has before adding this library (an MCP SDK, FastAPI,
uvicorn); the built wheel is then installed into it the way a user would, dependencies and all.
An environment is rebuilt only when its requirements change; the wheel is reinstalled every run.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENVS = ROOT / ".compat-envs"


@dataclass(frozen=True)
class UserProject:
    """A user's project: its requirements, and the SDK distribution whose version must not move."""

    name: str
    requirements: tuple[str, ...]
    sdk: str

    @property
    def path(self) -> Path:
        return ENVS / self.name

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def script(self, name: str) -> Path:
        return self.path / "bin" / name


MCP1 = UserProject("mcp1", ("mcp>=1.30,<2", "fastapi", "uvicorn"), sdk="mcp")
MCP2 = UserProject("mcp2", ("mcp>=2.3,<3", "fastapi", "uvicorn"), sdk="mcp")
FASTMCP = UserProject("fastmcp", ("fastmcp", "fastapi", "uvicorn"), sdk="fastmcp")


def clean_env() -> dict[str, str]:
    """The environment a user's shell would have: none of this test run's Python settings."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["AFFINITY_SECRET"] = "compat-matrix-secret-0123456789"
    return env


def run(command: list[str], **kwargs: object) -> str:
    """Run ``command``; on failure raise with everything it printed."""
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, command))} exited {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return str(result.stdout)


def build_wheel(out: Path) -> Path:
    """The project's wheel, built as ``pip wheel`` builds it for a user."""
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(ROOT)])
    return next(out.glob("fly_replay_router-*.whl"))


@contextmanager
def exclusive(project: UserProject) -> Iterator[None]:
    """Hold the project's lock: test processes running side by side (pytest-xdist) build, change or run
    from one environment at a time. Hold it from ``install_wheel`` to the last use of what it
    installed (another test may install a build with other extras). Not reentrant."""
    ENVS.mkdir(exist_ok=True)
    with open(ENVS / f"{project.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def prepared(project: UserProject) -> UserProject:
    """The project's environment, created (or rebuilt, if its requirements changed) with its own packages."""
    marker = project.path / "requirements.txt"
    spec = "\n".join(project.requirements) + "\n"
    with exclusive(project):
        if not (marker.exists() and marker.read_text() == spec and project.python.exists()):
            shutil.rmtree(project.path, ignore_errors=True)
            run([sys.executable, "-m", "venv", str(project.path)])
            run([str(project.python), "-m", "pip", "install", "-q", *project.requirements])
            marker.write_text(spec)
    return project


def installed_version(project: UserProject, distribution: str) -> str | None:
    """The version of ``distribution`` in the project's environment, or None."""
    code = (
        "import importlib.metadata as m, sys\n"
        f"try: print(m.version({distribution!r}))\n"
        "except m.PackageNotFoundError: print('-')"
    )
    found = run([str(project.python), "-c", code]).strip()
    return None if found == "-" else found


def install_wheel(project: UserProject, wheel: Path, extras: str = "edge") -> None:
    """``pip install <wheel>[extras]`` into the project, replacing an earlier build of it (hold
    ``exclusive`` around it and what uses it)."""
    run([str(project.python), "-m", "pip", "uninstall", "-q", "-y", "fly-replay-router"])
    run([str(project.python), "-m", "pip", "install", "-q", f"{wheel}[{extras}]"])
