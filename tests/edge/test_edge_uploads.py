"""Uploads that pause, through a real edge process: the machine answers them; past idle_timeout the edge answers 408."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from tests.edge.edge_cli import FleetProcess, probe_fleet_args, running_fleet

# A pause of 6 s outlasts the machine's keep-alive timeout (uvicorn's 5 s; a loaded machine only makes
# the pause longer), and the edge's idle timeout stays 6 s beyond it, a margin a busy machine keeps.
KEEP_ALIVE_PAUSE = 6.0
IDLE_TIMEOUT = 12


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetProcess]:
    directory = tmp_path_factory.mktemp("uploads")
    fly_toml = directory / "fly.toml"
    fly_toml.write_text(f'app = "uploads"\n[http_service.http_options]\n  idle_timeout = {IDLE_TIMEOUT}\n')
    with running_fleet([*probe_fleet_args(1), "--fly-toml", str(fly_toml)], directory / "edge.log") as process:
        yield process


async def _paused_upload(edge: FleetProcess, pause: float | None, *, chunked: bool) -> bytes:
    """A PUT whose headers go at once and whose body follows after ``pause`` seconds (never: ``None``); the answer."""
    parts = urlsplit(edge.url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    body = b"x" * 100_000
    framing = b"transfer-encoding: chunked" if chunked else b"content-length: %d" % len(body)
    try:
        # A first request on the edge's pooled connection to the machine, so that the upload reuses it.
        writer.write(b"GET /echo HTTP/1.1\r\nhost: edge\r\n\r\n")
        await _response(reader)
        name = b"%d-%d" % (chunked, (pause or 0) * 1000)  # the probe adds up uploads of one name
        writer.write(b"PUT /upload?name=" + name + b" HTTP/1.1\r\nhost: edge\r\n" + framing + b"\r\n\r\n")
        await writer.drain()
        if pause is None:
            return await asyncio.wait_for(_response(reader), IDLE_TIMEOUT + 30)
        await asyncio.sleep(pause)  # the pause is what the test is about, not a wait for something
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body)
        await writer.drain()
        return await asyncio.wait_for(_response(reader), 30)
    finally:
        writer.close()


async def _response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    return head + await reader.readexactly(length)


@pytest.mark.anyio
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
async def test_an_upload_paused_longer_than_the_machines_keep_alive_gets_the_machines_answer(
    edge: FleetProcess, chunked: bool
) -> None:
    answer = await _paused_upload(edge, KEEP_ALIVE_PAUSE, chunked=chunked)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n"), answer[:300]
    echo = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert echo["body_len"] == 100_000


@pytest.mark.anyio
async def test_an_upload_silent_past_idle_timeout_gets_408_before_reaching_a_machine(edge: FleetProcess) -> None:
    before = edge.status()["machines"][0]["requests"]
    started = time.monotonic()
    answer = await _paused_upload(edge, None, chunked=True)  # the body never comes: the edge must answer
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert time.monotonic() - started >= IDLE_TIMEOUT - 0.5  # not before the idle timeout
    assert b"client_idle_timeout" in answer
    status = edge.status()
    assert status["errors"]["client_idle_timeout"] == 1
    assert status["machines"][0]["requests"] == before + 1  # only the GET before it reached the machine
