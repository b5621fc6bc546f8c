"""The live edge page in a real browser (headless Chromium from Debian, driven by Playwright).

A user opens ``/_edge/`` on a running fleet, runs an MCP session, and sees its machine's session
count and the replays appear, in the table and in the charts; presses "suspend" and sees the state
change; the session then continues. Under a load, the charts draw requests and replays per second
per machine, from the page alone (nothing fetched but the edge's own files).
``EDGE_PAGE_SCREENSHOT=path`` keeps a screenshot of the page (the README's picture).
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from playwright.async_api import expect

from fly_replay_router.edge.page import FEED_INTERVAL, FEED_ROUTES
from tests.edge.browser import browser_page
from tests.edge.edge_cli import FleetProcess, probe_fleet_args, running_fleet, wait_gone
from tests.mcp_http import JSON_AND_SSE, call_count_message, tool_text

pytestmark = pytest.mark.anyio


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[FleetProcess]:
    with running_fleet(["--machines", "3"], tmp_path / "edge.log") as process:
        yield process


def _text(result: Any) -> str:
    return str(result.content[0].text)


async def _count_through(edge_url: str, token: str, machine_id: str) -> str:
    """One ``count`` call of the session ``token`` sent to ``machine_id`` first: a wrong landing, replayed."""
    headers = {**JSON_AND_SSE, "mcp-session-id": token, "fly-force-instance-id": machine_id}
    async with httpx.AsyncClient(base_url=edge_url, timeout=30) as raw:
        response = await raw.post("/mcp", headers=headers, json=call_count_message(99))
    assert response.status_code == 200, response.text
    return tool_text(response)


async def test_watch_a_session_stick_then_suspend_its_machine(
    fleet: FleetProcess, chromium: Path, tmp_path: Path
) -> None:
    machines = [m["id"] for m in fleet.status()["machines"]]
    tokens: list[str] = []

    async def note_token(response: httpx2.Response) -> None:
        if token := response.headers.get("mcp-session-id"):
            tokens.append(token)

    async with browser_page(chromium, tmp_path / "profile") as page:
        await page.goto(f"{fleet.url}/_edge/")
        await expect(page.locator("#connection")).to_have_text("live")
        await expect(page.locator("#machines tbody tr")).to_have_count(3)
        for machine_id in machines:
            await expect(page.locator(f'tr[data-machine="{machine_id}"] .state')).to_have_text("started")

        http = httpx2.AsyncClient(timeout=httpx2.Timeout(30, read=300), event_hooks={"response": [note_token]})
        async with http, Client(streamable_http_client(f"{fleet.url}/mcp", http_client=http), mode="legacy") as client:
            owner = _text(await client.call_tool("whoami", {}))
            assert [_text(await client.call_tool("count", {})) for _ in range(3)] == ["1", "2", "3"]
            row = page.locator(f'tr[data-machine="{owner}"]')
            await expect(row.locator(".sessions")).to_have_text("1")
            held = page.locator(f'#chart-sessions polyline[data-machine="{owner}"]')
            await expect(held).to_have_attribute("data-last", "1")

            # One call lands on another machine: the page shows it replayed to the owner.
            other = next(m for m in machines if m != owner)
            assert await _count_through(fleet.url, tokens[-1], other) == "4"
            replayed = page.locator(f'#routes tbody tr[data-replayed="yes"]:has-text("{other}")').first
            await expect(replayed).to_contain_text(owner)
            await expect(page.locator("#total-replays")).not_to_have_text("0")

            await row.locator('button[data-verb="suspend"]').click()
            await expect(row.locator(".state")).to_have_text("suspended")
            await expect(row.locator(".sessions")).to_have_text("1")  # suspend keeps memory
            await expect(row.locator('button[data-verb="start"]')).to_be_enabled()
            await page.wait_for_timeout(1300)  # the new rows' highlight fades first
            screenshot = Path(os.environ.get("EDGE_PAGE_SCREENSHOT", tmp_path / "edge-page.png"))
            await page.screenshot(path=str(screenshot), full_page=True)

            # The next call of the session resumes the owner (autostart) and the count goes on.
            with anyio.fail_after(20):
                assert _text(await client.call_tool("count", {})) == "5"
            await expect(row.locator(".state")).to_have_text("started")
            await expect(page.locator("#total-autostarts")).not_to_have_text("0")
        await expect(row.locator(".sessions")).to_have_text("0")  # the client ended its session


# A page frozen by the flood would not answer for many seconds; one that keeps up answers in a few
# hundredths. The bound sits between, with room for a busy 2-core machine running Chromium beside the edge.
RESPONSIVE_SECONDS = 2.0
# Under the flood: how many feed messages the coalescing is measured over.
FEED_MESSAGES = 9


async def _feed_under_flood(edge_url: str) -> tuple[list[dict[str, Any]], float]:
    """``FEED_MESSAGES`` messages of the page feed, and the seconds from the first to the last."""
    messages: list[dict[str, Any]] = []
    with anyio.fail_after(30):
        async with (
            httpx.AsyncClient(base_url=edge_url, timeout=10) as client,
            client.stream("GET", "/_edge/events") as feed,
        ):
            async for line in feed.aiter_lines():
                if line.startswith("data: "):
                    if not messages:
                        first = time.monotonic()
                    messages.append(json.loads(line[6:]))
                    if len(messages) == FEED_MESSAGES:
                        return messages, time.monotonic() - first
    raise AssertionError(f"the feed ended after {len(messages)} messages")


async def test_the_page_stays_bounded_and_responsive_at_a_thousand_events_per_second(
    make_probes, make_edge, chromium: Path, tmp_path: Path
) -> None:
    probes = make_probes(2)
    edge = make_edge(probes)
    stop = threading.Event()

    def flood() -> None:
        # 1,000 routing events a second, straight into the edge's trail (faster than a test client could send).
        a, b = probes[0].id, probes[1].id
        while not stop.is_set():
            started = time.monotonic()
            for n in range(100):
                edge.proxy.status.route("POST", "/mcp", (a, b) if n % 2 else (a,), 200, False)
            time.sleep(max(0.0, 0.1 - (time.monotonic() - started)))

    async with browser_page(chromium, tmp_path / "profile") as page:
        await page.goto(f"{edge.url}/_edge/")
        await expect(page.locator("#connection")).to_have_text("live")
        flooding = threading.Thread(target=flood, daemon=True)
        flooding.start()
        try:
            # The flood has reached the page once the page says it showed only part of an update.
            await expect(page.locator("#routes-note")).to_contain_text("more in the last update", timeout=30_000)
            answers: list[float] = []
            for _ in range(5):
                started = time.monotonic()
                rows = await page.locator("#routes tbody tr").count()
                answers.append(time.monotonic() - started)
                assert 0 < rows <= 60  # sampled: the page never holds more than its 60 newest rows
            messages, elapsed = await _feed_under_flood(edge.url)
        finally:
            stop.set()
            flooding.join()
    assert sorted(answers)[len(answers) // 2] < RESPONSIVE_SECONDS, answers
    # The feed coalesces: under 1,000 events a second it still sends one message per interval at most,
    # each with at most FEED_ROUTES routing events, and the flood filled them.
    assert elapsed >= (FEED_MESSAGES - 1) * FEED_INTERVAL * 0.9, elapsed
    assert all(len(message["routes"]) <= FEED_ROUTES for message in messages)
    assert sum(len(message["routes"]) == FEED_ROUTES for message in messages) >= FEED_MESSAGES // 2


def test_stopping_the_edge_ends_an_open_page_feed(tmp_path: Path) -> None:
    process = FleetProcess(probe_fleet_args(1), tmp_path / "edge.log")
    process.wait_ready()
    with httpx.Client(base_url=process.url, timeout=10) as client, client.stream("GET", "/_edge/events") as feed:
        lines = feed.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["machines"][0]["state"] == "started"
        started = time.monotonic()
        assert process.stop() == 0
        stopping = time.monotonic() - started
        # Reading to the end returns only because the edge ended the feed; an open one would raise ReadTimeout.
        for _ in lines:
            pass
    assert not wait_gone(process.machine_pids)
    assert stopping < 1.5, f"the edge took {stopping:.1f}s to stop with a page open"


async def test_the_page_shows_a_machine_near_its_soft_limit(
    make_probes, make_edge, chromium: Path, tmp_path: Path
) -> None:
    (probe,) = make_probes(1)
    edge = make_edge([probe], soft_limit=5, hard_limit=10)
    forced = {"fly-force-instance-id": probe.id}
    async with browser_page(chromium, tmp_path / "profile") as page:
        await page.goto(f"{edge.url}/_edge/")
        load = page.locator(f'tr[data-machine="{probe.id}"] .load')
        await expect(load).to_have_text("")
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client, anyio.create_task_group() as group:
            for _ in range(4):  # 4 of a soft limit of 5 in flight
                group.start_soon(functools.partial(client.get, "/slow?seconds=4", headers=forced))
            await expect(load).to_have_text("near soft limit")
            title = await load.get_attribute("title")
        await expect(load).to_have_text("")
    assert title == "soft limit 5, hard limit 10 (fly.toml)"


async def test_the_charts_draw_requests_and_replays_per_second_per_machine(
    make_probes, make_edge, chromium: Path, tmp_path: Path
) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    # Every request lands on a, which answers fly-replay: the edge replays it to b.
    replayed = {"fly-force-instance-id": a.id, f"x-probe-replay-{a.id}": f"instance={b.id}"}
    fetched: list[str] = []
    busy = anyio.Event()

    async def load(client: httpx.AsyncClient) -> None:
        while not busy.is_set():
            assert (await client.get("/work", headers=replayed)).status_code == 200

    def line(chart: str, machine_id: str) -> Any:
        return page.locator(f'#chart-{chart} polyline[data-machine="{machine_id}"]')

    async with browser_page(chromium, tmp_path / "profile") as page:
        page.on("request", lambda request: fetched.append(request.url))
        await page.goto(f"{edge.url}/_edge/")
        await expect(page.locator("#connection")).to_have_text("live")
        await expect(page.locator("#chart-legend li")).to_have_count(2)
        moving = re.compile(r"^[1-9][0-9.]*$")  # a rate above zero
        async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client, anyio.create_task_group() as group:
            group.start_soon(load, client)
            await expect(line("requests", a.id)).to_have_attribute("data-last", moving)
            await expect(line("requests", b.id)).to_have_attribute("data-last", moving)
            await expect(line("replays", a.id)).to_have_attribute("data-last", moving)
            await expect(line("replays", b.id)).to_have_attribute("data-last", "0")  # b served, never replayed
            await expect(page.locator("#chart-requests")).to_have_attribute("data-top", moving)
            points = int(await line("requests", a.id).get_attribute("data-points") or 0)
            busy.set()
        # The load stopped: the rate falls back to zero, the line goes on with new points.
        await expect(line("requests", a.id)).to_have_attribute("data-last", "0", timeout=15_000)
        assert int(await line("requests", a.id).get_attribute("data-points") or 0) > points
        drawn = await line("requests", a.id).get_attribute("points")
    assert drawn is not None
    assert len(drawn.split()) > points
    # Drawn by the page itself: nothing but the edge's own page, files and feed was fetched.
    assert fetched, "the page fetched nothing"
    assert all(url.startswith(f"{edge.url}/_edge/") for url in fetched), fetched
