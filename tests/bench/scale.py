"""The scale run: many sessions over many machines through the local edge, each making calls.

Not part of the default benchmark run (``python -m tests.bench --scale``): 10,000 sessions over 8
machines takes a few minutes and about 2 GB of memory on this machine. Every session initializes,
then calls ``count`` twice and ``whoami`` once; a call is misrouted when ``whoami`` is not the
machine its token names or the count is not 1 then 2. Reports RSS per machine and per session.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from fly_replay_router.protocol import owner_of
from tests.bench.processes import edge_status, running, start_edge
from tests.mcp_http import INITIALIZE, JSON_AND_SSE, session_headers, tool_call, tool_text


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def scale_run(sessions: int = 10_000, machines: int = 8, concurrency: int = 100) -> dict[str, Any]:
    """Open ``sessions`` sessions through an edge of ``machines`` machines and count what went wrong."""
    edge = start_edge(machines=machines)
    with running(edge):
        status = edge_status(edge)
        baseline = {m["id"]: _rss_mb(m["pid"]) for m in status["machines"] if m["pid"]}
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            gate = asyncio.Semaphore(concurrency)
            url = f"{edge.url}/mcp"

            async def one() -> None:
                async with gate:
                    try:
                        answer = await http.post(url, headers=JSON_AND_SSE, json=INITIALIZE)
                        token = answer.headers["mcp-session-id"]
                        initialized = {"jsonrpc": "2.0", "method": "notifications/initialized"}
                        await http.post(url, headers=session_headers(token), json=initialized)
                        counts = []
                        for number in (2, 3):
                            called = await http.post(
                                url, headers=session_headers(token), json=tool_call("count", request_id=number)
                            )
                            counts.append(tool_text(called))
                        whoami = await http.post(
                            url, headers=session_headers(token), json=tool_call("whoami", request_id=4)
                        )
                        outcomes["calls"] += 3
                        if counts != ["1", "2"] or tool_text(whoami) != owner_of(token):
                            outcomes["misrouted"] += 1
                    except (httpx.HTTPError, KeyError, ValueError) as exc:
                        outcomes[f"error {type(exc).__name__}"] += 1

            await asyncio.gather(*(one() for _ in range(sessions)))
        seconds = time.monotonic() - started
        status = edge_status(edge)
        rss = {m["id"]: round(_rss_mb(m["pid"]), 1) for m in status["machines"] if m["pid"]}
    grown = sum(rss[machine] - baseline.get(machine, 0.0) for machine in rss)
    return {
        "sessions": sessions,
        "machines": machines,
        "seconds": round(seconds, 1),
        "calls": outcomes["calls"],
        "misrouted": outcomes["misrouted"],
        "errors": sum(count for key, count in outcomes.items() if key.startswith("error")),
        "error_kinds": {key: count for key, count in outcomes.items() if key.startswith("error")},
        "replays": status["replays"],
        "rss_mb_per_machine": rss,
        "kb_per_session": round(grown * 1024 / sessions, 1),
    }
