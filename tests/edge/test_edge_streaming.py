"""Streaming through the edge, both ways, on real sockets: nothing is held back."""

from __future__ import annotations

import hashlib
import threading
import time

import anyio
import httpx
import pytest

from tests.edge.edge_probe import GATES, SENT_SECOND, UPLOADS

pytestmark = pytest.mark.anyio


async def test_sse_event_reaches_the_client_before_the_stream_ends(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    gate = GATES.setdefault("sse-first", threading.Event())
    sent_second = SENT_SECOND.setdefault("sse-first", threading.Event())
    # The machine holds its second event for up to 30 s (until the gate opens): a client timeout beyond
    # that lets an edge that buffers the stream fail on the assertion below rather than on a timeout.
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=60) as client,
        client.stream("GET", "/stream", params={"gate": "sse-first"}) as response,
    ):
        assert response.headers["content-type"] == "text/event-stream"
        chunks = response.aiter_raw()
        first = await chunks.__anext__()
        assert b"event: first" in first
        # The first event came while the machine still held its second one (and the stream's end).
        assert not sent_second.is_set(), "the first event reached the client only after the machine sent the second"
        gate.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert b"event: second" in rest
    assert sent_second.is_set()


async def test_upload_streams_to_the_machine(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    sizes = UPLOADS.setdefault("upload-1", [])
    chunk = b"u" * 64 * 1024

    async def body():
        yield chunk
        # The machine has the first chunk before the client sent the second one.
        deadline = time.monotonic() + 10
        while not sizes:
            assert time.monotonic() < deadline, "first chunk never reached the machine"
            await anyio.sleep(0.01)
        for _ in range(40):  # 2.5 MiB in all: more than the edge would ever buffer
            yield chunk

    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        response = await client.post("/upload", params={"name": "upload-1"}, content=body())
    assert response.status_code == 200
    assert response.json()["body_len"] == 41 * len(chunk)


async def test_large_known_length_body_streams_and_arrives_intact(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    body = bytes(range(256)) * 8192  # 2 MiB
    async with httpx.AsyncClient(base_url=edge.url, timeout=30) as client:
        response = await client.post("/upload", params={"name": "upload-2"}, content=body)
    assert response.json()["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_idle_timeout_ends_a_silent_stream(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a], idle_timeout=0.5)
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=edge.url, timeout=10) as client:
        async with client.stream("GET", "/stream", params={"hang": "1"}) as response:
            received = b"".join([chunk async for chunk in response.aiter_raw()])
        status = (await client.get("/_edge/status")).json()
    assert b"event: first" in received
    assert time.monotonic() - started < 5
    assert status["errors"]["idle_timeout"] == 1


async def test_client_disconnect_closes_the_machine_stream(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    async with (
        httpx.AsyncClient(base_url=edge.url, timeout=10) as client,
        client.stream("GET", "/stream", params={"hang": "1"}) as response,
    ):
        await response.aiter_raw().__anext__()
        machine = edge.fleet.machines[a.id]
        assert machine.in_flight == 1
    deadline = time.monotonic() + 5
    while machine.in_flight:
        assert time.monotonic() < deadline, "the edge kept the machine's stream open"
        await anyio.sleep(0.02)
