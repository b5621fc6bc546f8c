"""Fixtures for the edge tests: probe machines and edges on real uvicorn servers on loopback.

Probe machines and in-process edges run in threads, each with its own event loop, so that the
test's own client talks to them over real sockets (streaming is real, nothing is buffered by a
test transport).
"""

from __future__ import annotations

import secrets
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from fly_replay_router.edge.config import EdgeConfig, FlyToml
from fly_replay_router.edge.fleet import Fleet
from fly_replay_router.edge.proxy import EdgeProxy
from fly_replay_router.edge.serve import edge_server
from tests.edge.edge_probe import ProbeMachine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def chromium() -> Path:
    """Debian's Chromium, installed with apt on first use when missing (root only); a failure, never a skip."""
    from tests.edge.browser import ensure_chromium

    try:
        path, install_seconds = ensure_chromium()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    if install_seconds:
        print(f"\ninstalled Chromium in {install_seconds:.1f}s", file=sys.stderr)
    return path


class ThreadServer:
    """A uvicorn server in a thread, on a port the OS chose."""

    def __init__(self, make_server: Callable[[int], uvicorn.Server]) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        server = make_server(self.port)
        self.server = server
        self.thread = threading.Thread(target=server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert self.thread.is_alive(), "server thread died"
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.005)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@dataclass
class Probe:
    """A probe machine and where it listens."""

    id: str
    machine: ProbeMachine
    url: str
    server: ThreadServer


@dataclass
class Edge:
    """An in-process edge and its fleet."""

    url: str
    proxy: EdgeProxy
    fleet: Fleet


@pytest.fixture
def servers() -> Iterator[list[ThreadServer]]:
    started: list[ThreadServer] = []
    yield started
    for server in started:  # all at once: each uvicorn takes ~0.2 s to wind down
        server.server.should_exit = True
    for server in reversed(started):
        server.stop()


def _probe_server(app: Any) -> uvicorn.Server:
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on", http="httptools")
    return uvicorn.Server(config)


@pytest.fixture
def make_probes(servers: list[ThreadServer]) -> Callable[[int], list[Probe]]:
    """``make_probes(n)``: n probe machines with fresh 14-hex ids, running."""

    def make(count: int) -> list[Probe]:
        probes = []
        for _ in range(count):
            machine_id = secrets.token_hex(7)
            machine = ProbeMachine(machine_id)
            server = ThreadServer(lambda _port, machine=machine: _probe_server(machine))
            server.start()
            servers.append(server)
            probes.append(Probe(machine_id, machine, server.url, server))
        return probes

    return make


@pytest.fixture
def make_edge(servers: list[ThreadServer]) -> Callable[..., Edge]:
    """``make_edge(backends, **config)``: an edge in front of ``{id: url}`` (or probes)."""

    def make(backends: dict[str, str] | list[Probe], **config: Any) -> Edge:
        if isinstance(backends, list):
            backends = {probe.id: probe.url for probe in backends}
        fleet = Fleet.from_backends(backends)
        proxies: list[EdgeProxy] = []
        # What fly.toml sets goes to FlyToml (which EdgeConfig holds), the rest to EdgeConfig.
        toml = {name: config.pop(name) for name in list(config) if name in FlyToml.__dataclass_fields__}

        def build(port: int) -> uvicorn.Server:
            proxies.append(EdgeProxy(fleet, EdgeConfig(fly_toml=FlyToml(**toml), edge_port=port, **config)))
            return edge_server(proxies[0])

        server = ThreadServer(build)
        server.start()
        servers.append(server)
        return Edge(server.url, proxies[0], fleet)

    return make
