"""Running ``python -m fly_replay_router.edge`` as a real process for the tests, and checking it left nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = Path(__file__).resolve().parent


class FleetProcess:
    """``python -m fly_replay_router.edge ...`` with its output in a file (a pipe nobody reads would block it)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.log = log
        self.output = log.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "fly_replay_router.edge", "--port", "0", *args],
            cwd=ROOT,
            stdout=self.output,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        self.url = ""
        self.machine_pids: list[int] = []

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while not (match := re.search(r"^edge: +(http://\S+)", self.text(), re.MULTILINE)):
            if self.process.poll() is not None:
                raise AssertionError(f"edge exited with {self.process.returncode}:\n{self.text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"edge not ready:\n{self.text()}")
            time.sleep(0.05)
        self.url = match.group(1)
        self.machine_pids = [m["pid"] for m in self.status()["machines"] if m["pid"]]
        return self.url

    def status(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/_edge/status", timeout=10) as response:
            return json.loads(response.read())

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
            self.output.close()
        return code

    def known_pids(self) -> list[int]:
        """Every machine pid this edge ever reported (its log names them on start)."""
        return self.machine_pids


@contextlib.contextmanager
def running_fleet(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[FleetProcess]:
    """``python -m fly_replay_router.edge ...`` ready for requests; on exit it stops cleanly, no machine left."""
    process = FleetProcess(args, log, env)
    try:
        process.wait_ready()
        yield process
    finally:
        pids = list(process.machine_pids)
        with contextlib.suppress(OSError):  # a dead edge has no status to give; its failure is reported
            pids += [m["pid"] for m in process.status()["machines"] if m["pid"]] if process.url else []
        assert process.stop() == 0
        assert not wait_gone(pids)


def alive(pid: int) -> bool:
    """True if ``pid`` is a live process (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_gone(pids: list[int], timeout: float = 10) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def probe_fleet_args(machines: int = 2) -> list[str]:
    return ["--machines", str(machines), "--app", "tests.edge.edge_probe:app"]
