"""One client abusing the fleet through the real edge, while ordinary clients carry on.

The abuser (its own address, so its own ``Fly-Client-IP``) opens sessions and holds their event
streams as fast as it can for ``ABUSE_SECONDS``. Meanwhile 20 ordinary sessions of the official
client keep calling, and other clients keep starting new sessions. The promise (docs/operate.md "Capacity and sizing"):
the ordinary sessions see no error, new sessions of other clients start, the abuser is slowed to
its rate (429), and every machine stays within the VM memory fly.toml gives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
from mcp import Client

from tests.edge.edge_cli import FleetProcess, running_fleet
from tests.mcp_http import INITIALIZE, JSON_AND_SSE, open_session, session_headers, tool_call, tool_text

pytestmark = pytest.mark.anyio

ABUSE_SECONDS = 25.0
# The new-session limit, scaled down from the defaults (10 a second, bursts of 100) so that the
# abuser passes it even on a loaded runner, where it opens only a few sessions a second.
LIMITS = {"AFFINITY_NEW_SESSION_RATE": "2", "AFFINITY_NEW_SESSION_BURST": "20"}
ORDINARY_SESSIONS = 20
VM_MEMORY_MB = 512  # fly.toml's [[vm]] memory
ABUSER, NEWCOMER = "127.0.0.2", "127.0.0.3"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def client_at(address: str, connections: int = 100) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    return httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(local_address=address, limits=limits), timeout=30)


async def abuse(url: str, until: float, outcomes: Counter[str]) -> None:
    """Open sessions and hold their streams, 64 at a time, as fast as the fleet lets it."""
    async with client_at(ABUSER, 5000) as http, contextlib.AsyncExitStack() as held:

        async def one_after_another(legacy: bool) -> None:
            while time.monotonic() < until:
                try:
                    if legacy:
                        stream = await held.enter_async_context(http.stream("GET", f"{url}/sse"))
                    else:
                        answer = await http.post(f"{url}/mcp", headers=JSON_AND_SSE, json=INITIALIZE)
                        outcomes[f"initialize {answer.status_code}"] += 1
                        if answer.status_code != 200:
                            continue
                        headers = {**session_headers(answer.headers["mcp-session-id"]), "accept": "text/event-stream"}
                        stream = await held.enter_async_context(http.stream("GET", f"{url}/mcp", headers=headers))
                    outcomes[f"{'legacy' if legacy else 'session'} stream {stream.status_code}"] += 1
                except httpx.HTTPError as exc:
                    outcomes[type(exc).__name__] += 1

        await asyncio.gather(*(one_after_another(legacy=n % 4 == 0) for n in range(64)))


async def ordinary(url: str, until: float, problems: list[str], calls: Counter[str]) -> None:
    async with Client(f"{url}/mcp", mode="legacy", read_timeout_seconds=30) as client:
        expected = 1
        machine = ""
        while time.monotonic() < until:
            try:
                counted = int((await client.call_tool("count", {})).content[0].text)  # type: ignore[union-attr]
                answered = str((await client.call_tool("whoami", {})).content[0].text)  # type: ignore[union-attr]
            except Exception as exc:  # any failure is what this test exists to catch
                problems.append(f"ordinary session: {exc!r}")
                return
            machine = machine or answered
            if counted != expected or answered != machine:
                problems.append(f"ordinary session moved: count {counted} (expected {expected}) on {answered}")
                return
            expected += 1
            calls["ordinary"] += 1
            await asyncio.sleep(0.2)


async def newcomers(url: str, until: float, problems: list[str], calls: Counter[str]) -> None:
    async with client_at(NEWCOMER) as http:
        while time.monotonic() < until:
            try:
                token = await open_session(http, f"{url}/mcp")
                answer = await http.post(f"{url}/mcp", headers=session_headers(token), json=tool_call("count"))
                assert answer.status_code == 200, answer.text
                assert tool_text(answer) == "1"
                calls["newcomer"] += 1
            except (AssertionError, httpx.HTTPError, KeyError) as exc:
                problems.append(f"a new client's session failed: {exc!r}")
            await asyncio.sleep(1.0)


async def test_one_client_cannot_take_the_fleet(tmp_path: Path) -> None:
    fleet: FleetProcess
    with running_fleet(["--machines", "3"], tmp_path / "edge.log", env=LIMITS) as fleet:
        until = time.monotonic() + ABUSE_SECONDS
        outcomes: Counter[str] = Counter()
        calls: Counter[str] = Counter()
        problems: list[str] = []
        peak: dict[str, float] = {}
        reads: Counter[str] = Counter()
        machine_ids = {machine["id"] for machine in fleet.status()["machines"]}

        async def watch_memory() -> None:
            while time.monotonic() < until:
                for machine in fleet.status()["machines"]:
                    if machine["pid"]:
                        peak[machine["id"]] = max(peak.get(machine["id"], 0.0), rss_mb(machine["pid"]))
                        reads[machine["id"]] += 1
                await asyncio.sleep(1.0)

        await asyncio.gather(
            abuse(fleet.url, until, outcomes),
            newcomers(fleet.url, until, problems, calls),
            watch_memory(),
            *(ordinary(fleet.url, until, problems, calls) for _ in range(ORDINARY_SESSIONS)),
        )
        print(f"\nabuse: {dict(outcomes)}; ordinary calls {calls['ordinary']}, new sessions {calls['newcomer']}")
        print(f"abuse: peak RSS per machine (MB): { {k: round(v) for k, v in peak.items()} }")

    assert problems == []  # every ordinary call, and every new client's session, succeeded
    assert calls["newcomer"] >= 5  # and new clients kept trying throughout
    assert calls["ordinary"] >= ORDINARY_SESSIONS * 5
    # The memory bound holds only if it was measured: every machine's memory, read throughout the abuse
    # (about once a second), and a real process's size (a Python server holds tens of megabytes).
    assert len(machine_ids) == 3
    assert set(peak) == machine_ids, (peak, machine_ids)
    assert all(reads[machine_id] >= ABUSE_SECONDS / 4 for machine_id in machine_ids), reads
    assert all(10 < rss < VM_MEMORY_MB for rss in peak.values()), peak
    assert outcomes["initialize 429"] > 0, outcomes  # the abuser was held to its rate
