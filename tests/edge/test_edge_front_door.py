"""The edge as a front door: a request's head has a size limit (431) and a deadline (408), through a real edge."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from tests.edge.edge_cli import FleetProcess, probe_fleet_args, running_fleet

HEAD_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    log = tmp_path_factory.mktemp("door") / "edge.log"
    with running_fleet([*probe_fleet_args(1), "--header-timeout", str(HEAD_TIMEOUT)], log) as process:
        yield process


def _address(edge: FleetProcess) -> tuple[str, int]:
    parts = urlsplit(edge.url)
    assert parts.hostname is not None
    assert parts.port is not None
    return parts.hostname, parts.port


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _send_head_and_read(edge: FleetProcess, head: bytes, header_value_size: int) -> bytes:
    """Send ``head`` then a header value of ``header_value_size`` bytes while reading the answer."""
    reader, writer = await asyncio.open_connection(*_address(edge))

    async def write() -> None:
        writer.write(head)
        chunk = b"a" * (1 << 20)
        with contextlib.suppress(ConnectionError):
            for _ in range(header_value_size // len(chunk)):
                writer.write(chunk)
                await writer.drain()

    sending = asyncio.ensure_future(write())
    try:
        return await asyncio.wait_for(reader.read(4096), 30)
    finally:
        sending.cancel()
        writer.close()


@pytest.mark.anyio
async def test_a_huge_header_gets_431_and_never_reaches_a_machine(edge: FleetProcess) -> None:
    before = edge.status()
    rss = _rss_mb(edge.process.pid)
    head = b"POST /mcp HTTP/1.1\r\nHost: edge\r\nMcp-Session-Id: "
    answer = await _send_head_and_read(edge, head, 64 << 20)
    assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n")
    assert b"connection: close" in answer
    after = edge.status()
    assert after["requests"] == before["requests"]  # nothing was forwarded
    assert after["machines"][0]["requests"] == before["machines"][0]["requests"]
    assert after["errors"].get("header_too_large", 0) == before["errors"].get("header_too_large", 0) + 1
    # A 64 MB header costs the edge its limit, not 64 MB.
    assert _rss_mb(edge.process.pid) - rss < 20


def test_too_many_header_fields_get_431_and_a_large_but_allowed_head_passes(edge: FleetProcess) -> None:
    many = {f"x-field-{index}": "1" for index in range(150)}
    refused = httpx.get(edge.url + "/echo", headers=many)
    assert refused.status_code == 431
    assert "header fields" in refused.text
    # 60 KiB of cookies fits the 64 KiB limit: an ordinary (if heavy) browser request still goes through.
    allowed = httpx.get(edge.url + "/echo", headers={"cookie": "c=" + "v" * 60_000})
    assert allowed.status_code == 200
    assert len(allowed.json()["headers"]["cookie"]) == 60_002


@pytest.mark.anyio
async def test_trickling_heads_are_answered_408_and_closed_not_held(edge: FleetProcess) -> None:
    host, port = _address(edge)
    connections = []
    for _ in range(3000):
        # The head starts at once: opening 3000 connections can take longer than HEAD_TIMEOUT, and a
        # connection that has sent nothing by then is a silent one (closed without an answer).
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /echo HTTP/1.1\r\nHost: edge\r\nX-Slow: ")
        connections.append((reader, writer))
    silent = [await asyncio.open_connection(host, port) for _ in range(20)]  # never send a byte
    stop = asyncio.Event()

    async def trickle(writer: asyncio.StreamWriter) -> None:
        while not stop.is_set():
            await asyncio.sleep(0.5)
            try:
                writer.write(b"a")
                await writer.drain()
            except ConnectionError:
                return

    trickling = [asyncio.ensure_future(trickle(writer)) for _, writer in connections]
    try:
        # Generous: the deadline is HEAD_TIMEOUT; this only checks that nothing is held forever.
        answers = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in connections)), 60)
        closed = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in silent)), 60)
    finally:
        stop.set()
        for task in trickling:
            task.cancel()
        for _, writer in [*connections, *silent]:
            writer.close()
    assert all(answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n") for answer in answers), Counter(
        answer[:40] for answer in answers
    )
    assert closed == [b""] * len(silent)  # closed without an answer: nothing was asked
    # The edge still serves.
    async with httpx.AsyncClient() as client:
        assert (await client.get(edge.url + "/echo")).status_code == 200


@pytest.mark.anyio
async def test_the_asterisk_form_is_answered_by_the_edge_without_an_internal_address(edge: FleetProcess) -> None:
    """``OPTIONS *`` names no resource of a machine (RFC 9112 section 3.2.4): the edge answers it, revealing nothing."""
    reader, writer = await asyncio.open_connection(*_address(edge))
    try:
        for method in (b"OPTIONS", b"GET"):
            writer.write(method + b" * HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            length = int(
                next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")).split(b":")[1]
            )
            body = await asyncio.wait_for(reader.readexactly(length), 30)
            status = int(head.split(b" ", 2)[1])
            assert status == (204 if method == b"OPTIONS" else 400), head
            assert b"127.0.0.1" not in head + body
            assert b"http://" not in head + body
    finally:
        writer.close()
