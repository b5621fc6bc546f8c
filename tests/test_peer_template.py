"""The default peer address on Fly, end to end: ``http://<machine>.vm.<app>.internal:<service port>``.

Every other forwarding test names its peers (``AFFINITY_PEERS``); on Fly nothing does, and a body Fly
cannot replay (over 1 MiB) goes to its owner at the address ``DEFAULT_PEER_URL_TEMPLATE`` builds.
Here two machines run the image's command with no peer settings, each in its own network namespace
and mount namespace (``unshare``), on the same service port, as two Fly Machines do. A veth pair
joins them with 6PN-style addresses (``fdaa::1``, ``fdaa::2``), and each machine's private
``/etc/hosts`` resolves the other's ``.vm.<app>.internal`` name, so the name resolves through a
resolver the test controls; the host's own ``/etc/hosts`` and network are never touched. The
clients run inside the namespaces too (``nsenter``), where a machine's IPv4 port is the proxy's path.

References: "Private Networking" (https://fly.io/docs/networking/private-networking/): the
``<machine_id>.vm.<appname>.internal`` names and 6PN; unshare(1), nsenter(1), ip-link(8).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import APP_NAME, IMAGE_COMMAND, ROOT, SECRET

HERE, OWNER = "a1b2c3d4e5f607", "0f1e2d3c4b5a69"
ADDRESSES = {HERE: "fdaa::1", OWNER: "fdaa::2"}
# Not the Dockerfile's 8080: the peer address must follow the port the service really listens on.
SERVICE_PORT = 8123
METRICS_PORT = 9091
THREE_MIB = 3 * 1024 * 1024


def _missing() -> str | None:
    tools = [tool for tool in ("unshare", "nsenter", "ip") if shutil.which(tool) is None]
    if tools:
        return f"this test needs {', '.join(tools)} (util-linux, iproute2)"
    if os.geteuid() != 0:
        return "this test creates network and mount namespaces, which needs root (or CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    return None


@dataclass
class NamespacedMachine:
    machine_id: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def run(self, *command: str) -> str:
        """Run ``command`` in this machine's network namespace; its output."""
        result = subprocess.run(
            ["nsenter", "-t", str(self.process.pid), "-n", *command], capture_output=True, text=True, cwd=ROOT
        )
        assert result.returncode == 0, f"{' '.join(command)}:\n{result.stdout}{result.stderr}\n{self.log()}"
        return result.stdout


def _start(machine_id: str, peer_id: str, directory: Path) -> NamespacedMachine:
    hosts = directory / f"hosts-{machine_id}"
    hosts.write_text(
        "127.0.0.1 localhost\n::1 localhost\n"
        f"{ADDRESSES[peer_id]} {peer_id}.vm.{APP_NAME}.internal\n"
        f"{ADDRESSES[machine_id]} {machine_id}.vm.{APP_NAME}.internal\n"
    )
    command = IMAGE_COMMAND.for_machine(port=SERVICE_PORT, metrics_port=METRICS_PORT, workers=1)
    env = {key: value for key, value in os.environ.items() if not key.startswith("AFFINITY_")}
    env |= {"FLY_MACHINE_ID": machine_id, "FLY_APP_NAME": APP_NAME, "FLY_REGION": "lcl", "AFFINITY_SECRET": SECRET}
    log_path = directory / f"machine-{machine_id}.log"
    with log_path.open("wb") as log:
        # A private /etc/hosts (bind-mounted in the new mount namespace only) and loopback up, then the image's command.
        setup = 'mount --bind "$0" /etc/hosts && ip link set lo up && exec "$@"'
        process = subprocess.Popen(
            ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", setup, str(hosts), *command],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return NamespacedMachine(machine_id, process, log_path)


def _wire(here: NamespacedMachine, owner: NamespacedMachine) -> None:
    """A veth pair between the two namespaces, created inside them: the host never holds either end."""
    here.run("ip", "link", "add", "peer0", "type", "veth", "peer", "name", "peer0", "netns", str(owner.process.pid))
    for machine in (here, owner):
        machine.run("ip", "addr", "add", f"{ADDRESSES[machine.machine_id]}/64", "dev", "peer0", "nodad")
        machine.run("ip", "link", "set", "peer0", "up")


# What a client inside a machine's namespace runs: wait until the machine answers, then one step.
CLIENT = """
import asyncio, json, sys, time
import httpx
from tests.mcp_http import measure_body, open_session, session_headers

async def main(step, url, token):
    async with httpx.AsyncClient(timeout=60) as raw:
        deadline = time.monotonic() + 30
        while True:
            try:
                await raw.get(url + "/healthz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the machine never answered"
                await asyncio.sleep(0.1)
        if step == "open":
            print(json.dumps({"token": await open_session(raw, url + "/mcp")}))
        else:
            answer = await raw.post(url + "/mcp", headers=session_headers(token), content=measure_body(int(step)))
            print(json.dumps({"status": answer.status_code, "text": answer.text}))

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture
def machines(tmp_path: Path) -> Iterator[tuple[NamespacedMachine, NamespacedMachine]]:
    missing = _missing()
    assert missing is None, missing
    started = [_start(HERE, OWNER, tmp_path), _start(OWNER, HERE, tmp_path)]
    try:
        for machine in started:
            _until_namespaced(machine)
        _wire(started[0], started[1])
        yield started[0], started[1]
    finally:
        for machine in started:
            machine.process.terminate()
            try:
                machine.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                machine.process.kill()
                machine.process.wait()


def _until_namespaced(machine: NamespacedMachine) -> None:
    """Wait until the process runs in its own network namespace (unshare has done its part)."""
    deadline = time.monotonic() + 10
    ours = os.readlink("/proc/self/ns/net")
    while True:
        assert machine.process.poll() is None, f"machine {machine.machine_id} exited:\n{machine.log()}"
        try:
            if os.readlink(f"/proc/{machine.process.pid}/ns/net") != ours:
                return
        except FileNotFoundError:
            pass
        assert time.monotonic() < deadline, f"machine {machine.machine_id} never left the host's network namespace"
        time.sleep(0.02)


def test_a_large_body_reaches_its_owner_at_the_default_peer_address(
    machines: tuple[NamespacedMachine, NamespacedMachine],
) -> None:
    here, owner = machines
    local = f"http://127.0.0.1:{SERVICE_PORT}"  # each machine's IPv4 port in its own namespace: the proxy's path
    # The session belongs to the owner: opened there, as Fly's proxy would have balanced it.
    token = json.loads(owner.run(sys.executable, "-c", CLIENT, "open", local, "")).get("token")
    assert token.startswith(OWNER + ".")
    # Over 1 MiB, Fly cannot replay: the machine it lands on forwards it to the owner itself, at
    # http://<owner>.vm.<app>.internal:<its service port>, which only the private /etc/hosts resolves.
    answer = json.loads(here.run(sys.executable, "-c", CLIENT, str(THREE_MIB), local, token))
    assert answer["status"] == 200, (answer, here.log(), owner.log())
    assert f'"text":"{THREE_MIB}"' in answer["text"].replace(" ", "")
    assert "outcome=forwarded" in here.log()
    assert f"owner={OWNER}" in here.log()
    # The owner served it, reached over the veth from the other machine's 6PN address.
    assert ADDRESSES[HERE] in owner.log(), owner.log()
