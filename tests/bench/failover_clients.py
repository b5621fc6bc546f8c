"""What each real MCP client does when the machine holding its session goes away, in each failover mode.

Command (from the repository root; not part of the test run)::

    .venv/bin/python -m tests.bench.failover_clients [--clients mcp1,mcp2,fastmcp,ts-sdk,mcp-remote]
        [--modes safe,cached,prefer] [--losses crash,stop,destroy,unreachable] [--out failover.json]

Needs the compatibility environments (``.compat-envs/mcp1`` and ``.compat-envs/fastmcp``, built by
``tests/compat/envs.py``) and ``npm install @modelcontextprotocol/sdk mcp-remote`` in
``.compat-envs/node``; mcp 2.x is this project's own environment. A client whose environment is
missing is reported as such, not skipped silently.

For every mode, a local fleet of two demo machines behind the edge (round-robin, so that requests
land on the machine without the session half the time) with ``AFFINITY_FAILOVER`` set; ``cached``
also has fly.toml's session replay cache rule. For every client and every loss, one round:

1. the client opens a session and calls ``whoami`` (which names the session's owner);
2. the owner goes away: ``crash`` is SIGKILL (``machine kill``), ``stop`` a graceful stop (``machine
   stop``, SIGTERM then SIGKILL after kill_timeout); both come back when Fly's proxy autostarts them
   for a replay, with empty memory. ``destroy`` kills the machine and removes its id from the app,
   with a replacement under a new id (``failover_clients_edge.py``: blue-green deploys, scale-downs,
   ``fly machine destroy``). ``unreachable`` is a machine that keeps its id but never answers again:
   stopped in a fleet with ``auto_start_machines = false``;
3. the client calls again, up to three times: the first call's time and outcome, and whether a later
   call works in the same client (it "recovers after N errors"), or never does ("stays broken": only a
   restart of the client helps). A first call that succeeds means the client started a new session
   by itself.

Prints one table per mode and writes every round to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
ENVS = ROOT / ".compat-envs"
NODE_DIR = ENVS / "node"
CALLS_AFTER_LOSS = 3
READY_TIMEOUT = 60.0
CALL_WAIT = 45.0  # a driver call times out at 30 s by itself

FLY_TOML = """\
app = "failover-bench"
primary_region = "lcl"
kill_timeout = 5

[env]
  AFFINITY_FAILOVER = "{mode}"
  AFFINITY_REPLAY_TIMEOUT = "5s"

[http_service]
  internal_port = 8080
  auto_stop_machines = "off"
  auto_start_machines = {autostart}
  min_machines_running = 0
{cache}
  [[http_service.checks]]
    method = "GET"
    path = "/healthz"
    interval = "15s"
    timeout = "2s"
    grace_period = "10s"
"""
CACHE_RULE = """\
  [[http_service.http_options.replay_cache]]
    path_prefix = "/"
    ttl_seconds = 300
    type = "header"
    name = "Mcp-Session-Id"
    allow_bypass = false
"""


def client_commands() -> dict[str, list[str]]:
    """How to start each client's driver; the interpreter or node of the environment that has it."""
    python_driver = str(HERE / "failover_clients_driver.py")
    node_driver = str(HERE / "failover_clients_driver.mjs")
    return {
        "mcp1": [str(ENVS / "mcp1" / "bin" / "python"), python_driver, "mcp1"],
        "mcp2": [sys.executable, python_driver, "mcp2"],
        "fastmcp": [str(ENVS / "fastmcp" / "bin" / "python"), python_driver, "fastmcp"],
        "ts-sdk": ["node", node_driver, "ts-sdk"],
        "mcp-remote": ["node", node_driver, "mcp-remote"],
    }


def missing_environment(client: str) -> str | None:
    """Why ``client`` cannot be driven here, or None."""
    if client in ("mcp1", "fastmcp") and not (ENVS / client / "bin" / "python").exists():
        return f"{ENVS / client} is missing: build it with tests/compat/envs.py"
    if client in ("ts-sdk", "mcp-remote"):
        package = "@modelcontextprotocol/sdk" if client == "ts-sdk" else "mcp-remote"
        if not (NODE_DIR / "node_modules" / package).exists():
            return f"{package} is not installed: npm install @modelcontextprotocol/sdk mcp-remote in {NODE_DIR}"
    return None


@dataclass
class Round:
    """One client, one mode, one loss: what the calls after the loss answered."""

    client: str
    mode: str
    loss: str
    owner: str = ""
    calls: list[dict[str, Any]] = field(default_factory=list)
    outcome: str = ""
    first_call_seconds: float | None = None
    note: str = ""


class Edge:
    """``python -m fly_replay_router.edge`` for one fleet, and its control endpoints."""

    def __init__(self, fly_toml: Path, mode: str, log: Path) -> None:
        self.log = log
        self.output = log.open("wb")
        env = {**os.environ, "AFFINITY_FAILOVER": mode}
        argv = [sys.executable, "-m", "tests.bench.failover_clients_edge", "--port", "0", "--machines", "2"]
        argv += ["--balance", "round-robin", "--fly-toml", str(fly_toml), "--dockerfile", str(ROOT / "Dockerfile")]
        self.process = subprocess.Popen(argv, cwd=ROOT, stdout=self.output, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while not (match := re.search(r"^edge: +(http://\S+)", log.read_text(errors="replace"), re.MULTILINE)):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the edge did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        self.url = match.group(1)

    def control(self, machine_id: str, verb: str) -> int:
        request = urllib.request.Request(f"{self.url}/_edge/machines/{machine_id}/{verb}", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def state(self, machine_id: str) -> str:
        with urllib.request.urlopen(f"{self.url}/_edge/status", timeout=10) as response:
            machines = json.loads(response.read())["machines"]
        return next(str(machine["state"]) for machine in machines if machine["id"] == machine_id)

    def destroy(self, machine_id: str) -> int:
        request = urllib.request.Request(f"{self.url}/_bench/machines/{machine_id}/destroy", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=90) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return exc.code

    def restore(self, machine_id: str) -> None:
        if self.control(machine_id, "start") >= 500:
            raise RuntimeError(f"machine {machine_id} failed to start again")
        deadline = time.monotonic() + 60
        while self.state(machine_id) != "started":
            if time.monotonic() > deadline:
                raise RuntimeError(f"machine {machine_id} did not start again")
            time.sleep(0.2)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.output.close()


class FleetHolder:
    """One fleet for a mode; started again from scratch when a machine it stopped cannot start again.

    The edge keeps a stopped machine's port, as Fly keeps its address; on a shared host another
    process can take that port meanwhile, and then the machine cannot start (a fact of this host,
    not of the client being measured).
    """

    def __init__(self, mode: str, autostart: bool, workdir: Path) -> None:
        self.mode, self.autostart, self.workdir = mode, autostart, workdir
        self.fly_toml = workdir / f"fly.{mode}.{'autostart' if autostart else 'noautostart'}.toml"
        cache = CACHE_RULE if mode == "cached" else ""
        self.fly_toml.write_text(FLY_TOML.format(mode=mode, autostart=str(autostart).lower(), cache=cache))
        self.starts = 0
        self.edge = self._start()

    def _start(self) -> Edge:
        self.starts += 1
        return Edge(self.fly_toml, self.mode, self.workdir / f"edge.{self.fly_toml.stem}.{self.starts}.log")

    def play(self, client: str, loss: str) -> Round:
        record = play_round(self.edge, client, self.mode, loss, self.workdir)
        if record.owner and loss != "destroy":  # a destroyed machine was replaced already
            try:
                self.edge.restore(record.owner)
            except RuntimeError as exc:  # the owner could not start again: a new fleet for the next round
                print(f"({exc}: starting the fleet again)", flush=True)
                self.edge.close()
                self.edge = self._start()
        return record

    def __enter__(self) -> FleetHolder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.edge.close()


class Driver:
    """One client process: its commands on stdin, one JSON line per answer on stdout."""

    def __init__(self, client: str, url: str, log: Path) -> None:
        self.stderr = log.open("wb")
        env = {**os.environ, "FAILOVER_NODE_DIR": str(NODE_DIR)}
        self.process = subprocess.Popen(
            [*client_commands()[client], url],
            cwd=HERE,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env=env,
        )

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        import selectors

        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if selector.select(timeout=max(0.0, deadline - time.monotonic())):
                    line = self.process.stdout.readline()
                    if not line:
                        return {"fatal": f"the client exited ({self.process.wait()})"}
                    with contextlib.suppress(ValueError):
                        return dict(json.loads(line))
        return {"fatal": f"no answer in {timeout:g} s"}

    def call(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        started = time.perf_counter()
        try:
            self.process.stdin.write("call\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            return {"ok": False, "fatal": "the client had exited", "seconds": 0.0}
        answer = self.read(CALL_WAIT)
        answer.setdefault("seconds", round(time.perf_counter() - started, 3))
        answer.setdefault("ok", False)
        return answer

    def close(self) -> None:
        with contextlib.suppress(BrokenPipeError, OSError):
            assert self.process.stdin is not None
            self.process.stdin.write("quit\n")
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


def machine_of(result: str) -> str:
    match = re.search(r"[0-9a-f]{14}", result)
    return match.group(0) if match else result


def play_round(edge: Edge, client: str, mode: str, loss: str, workdir: Path) -> Round:
    record = Round(client, mode, loss)
    driver = Driver(client, f"{edge.url}/mcp", workdir / f"{client}.{mode}.{loss}.stderr")
    try:
        ready = driver.read(READY_TIMEOUT)
        if not ready.get("ready"):
            record.outcome, record.note = "could not start", str(ready.get("fatal", ready))
            return record
        first = driver.call()
        if not first.get("ok"):
            record.outcome, record.note = "first call failed", str(first)
            return record
        record.owner = machine_of(str(first["result"]))
        if loss == "destroy":
            edge.destroy(record.owner)
        else:
            edge.control(record.owner, "kill" if loss == "crash" else "stop")
        for _ in range(CALLS_AFTER_LOSS):
            answer = driver.call()
            record.calls.append(answer)
            if answer.get("ok") or "fatal" in answer:
                break
        record.first_call_seconds = record.calls[0]["seconds"]
        record.outcome = classify(record.calls, record.owner)
    finally:
        driver.close()
    return record


def classify(calls: list[dict[str, Any]], owner: str) -> str:
    """new session by itself / recovers after N errors / stays broken (client crashed)."""
    if calls[0].get("ok"):
        return "new session by itself"
    for index, answer in enumerate(calls):
        if answer.get("ok"):
            return f"recovers after {index} error{'s' if index != 1 else ''}"
        if "fatal" in answer:
            return "client crashed"
    return "stays broken"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="mcp1,mcp2,fastmcp,ts-sdk,mcp-remote")
    parser.add_argument("--modes", default="safe,cached,prefer")
    parser.add_argument("--losses", default="crash,stop,destroy,unreachable")
    parser.add_argument("--out", type=Path, default=Path("failover-clients.json"))
    args = parser.parse_args(argv)
    clients, modes, losses = (value.split(",") for value in (args.clients, args.modes, args.losses))
    rounds: list[Round] = []
    workdir = Path(tempfile.mkdtemp(prefix="failover-bench-"))
    drivable = []
    for client in clients:
        why = missing_environment(client)
        if why:
            rounds += [
                Round(client, mode, loss, outcome="not installed", note=why) for mode in modes for loss in losses
            ]
        else:
            drivable.append(client)
    started = time.monotonic()
    for mode in modes:
        for autostart in (True, False):
            fleet_losses = [loss for loss in losses if (loss != "unreachable") == autostart]
            if not fleet_losses:
                continue
            with FleetHolder(mode, autostart, workdir) as holder:
                for loss in fleet_losses:
                    for client in drivable:
                        record = holder.play(client, loss)
                        rounds.append(record)
                        print(
                            f"{mode:<7} {loss:<8} {client:<11} {record.outcome:<24} first call after the loss "
                            f"{record.first_call_seconds if record.first_call_seconds is not None else '-'} s",
                            flush=True,
                        )
    document = {
        "command": " ".join([Path(sys.executable).name, "-m", "tests.bench.failover_clients", *(argv or sys.argv[1:])]),
        "seconds": round(time.monotonic() - started, 1),
        "logs": str(workdir),
        "rounds": [asdict(record) for record in rounds],
    }
    args.out.write_text(json.dumps(document, indent=2))
    print_table(rounds)
    print(f"\nrounds: {args.out}; logs: {workdir}")


def print_table(rounds: list[Round]) -> None:
    print(
        f"\n{'client':<11} {'mode':<7} {'loss':<8} {'after the loss':<26} {'first call':>10}  error of the first call"
    )
    for record in sorted(rounds, key=lambda r: (r.client, r.mode, r.loss)):
        first = record.calls[0] if record.calls else {}
        seconds = f"{record.first_call_seconds:.2f} s" if record.first_call_seconds is not None else "-"
        error = str(first.get("error") or first.get("fatal") or record.note)[:70]
        print(f"{record.client:<11} {record.mode:<7} {record.loss:<8} {record.outcome:<26} {seconds:>10}  {error}")


if __name__ == "__main__":
    main()
