"""Hand-over between worker processes of one machine: two real processes sharing a socket directory.

Each worker listens on its own port here, so a test picks which worker a request reaches; the
kernel would pick for ``uvicorn --workers N`` (``test_workers_e2e.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fly_replay_router import AffinitySettings, wrap_mcp_app
from fly_replay_router.affinity.decision import Reject, Serve
from fly_replay_router.affinity.handover import Outcome, hand_over
from fly_replay_router.affinity.siblings import Siblings
from fly_replay_router.affinity.token import TokenCodec
from fly_replay_router.affinity.workers import HandOver, decide_worker
from fly_replay_router.protocol import SESSION_NOT_FOUND_BODY
from tests.conftest import APP_NAME, SECRET, Machine, start_machine

pytestmark = pytest.mark.anyio

MACHINE = "c0c0c0c0c0c0c0"
INNER = "7da4e80665bd4c6fb73231d63f0c227f"


def test_a_tag_of_this_worker_is_served_here_with_the_inner_servers_id() -> None:
    assert decide_worker(f"0123abcd~{INNER}", this_worker="0123abcd", handed_over=False) == Serve(INNER)


def test_a_sibling_workers_tag_is_handed_over_once_and_never_again() -> None:
    assert decide_worker(f"89abcdef~{INNER}", this_worker="0123abcd", handed_over=False) == HandOver("89abcdef")
    assert decide_worker(f"89abcdef~{INNER}", this_worker="0123abcd", handed_over=True) == Reject("already_handed_over")


@pytest.mark.parametrize("inner", [INNER, "abc~def", "../../etc~x", "0123abcd"])
def test_an_id_without_a_worker_tag_is_served_as_it_is(inner: str) -> None:
    # Tokens minted before workers were named; and ids whose "~" does not follow a tag.
    assert decide_worker(inner, this_worker="0123abcd", handed_over=False) == Serve(inner)


@pytest.fixture(scope="module")
def socket_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="workers-") as directory:
        path = Path(directory) / "sockets"
        yield path


@pytest.fixture(scope="module")
def workers(socket_dir: Path) -> Iterator[tuple[Machine, Machine]]:
    """Workers A and B of one machine: one machine id, one socket directory, two ports."""
    env = {"AFFINITY_WORKER_SOCKET_DIR": str(socket_dir)}
    started: list[Machine] = []
    try:
        for _ in range(2):
            started.append(start_machine(MACHINE, app="tests.workers_app:app", extra_env=env))
        yield started[0], started[1]
    finally:
        for machine in started:
            machine.stop()


async def open_session(client: httpx.AsyncClient, worker: Machine) -> str:
    response = await client.post(f"{worker.url}/open")
    assert response.status_code == 200
    assert response.text == str(worker.process.pid)
    return response.headers["mcp-session-id"]


async def test_a_session_of_a_sibling_worker_is_served_by_its_owner(workers: tuple[Machine, Machine]) -> None:
    a, b = workers
    async with httpx.AsyncClient(timeout=10) as client:
        token = await open_session(client, b)
        response = await client.get(f"{a.url}/disconnects", headers={"mcp-session-id": token})
    assert response.status_code == 200
    assert response.headers["x-worker-pid"] == str(b.process.pid)
    assert response.text == "0"
    assert response.headers["affinity-served-by"].endswith(";via=handover")
    # Counted, but no line at info: a machine with N workers hands over (N - 1) / N of its requests.
    assert "outcome=handed_over" not in a.log()


def test_the_socket_directory_is_private_and_holds_one_socket_per_worker(
    workers: tuple[Machine, Machine], socket_dir: Path
) -> None:
    assert socket_dir.stat().st_mode & 0o777 == 0o700
    sockets = sorted(socket_dir.glob("*.sock"))
    assert len(sockets) == 2
    assert {path.stat().st_mode & 0o777 for path in sockets} == {0o600}


async def _read_until(reader: asyncio.StreamReader, wanted: bytes) -> bytes:
    seen = b""
    async with asyncio.timeout(10):
        while wanted not in seen:
            chunk = await reader.read(65536)
            assert chunk, f"connection closed before {wanted!r}; got {seen!r}"
            seen += chunk
    return seen


async def test_a_handed_over_request_streams_both_ways(workers: tuple[Machine, Machine]) -> None:
    """Each chunk of the body comes back before the next one is sent: nothing waits for the whole body."""
    a, b = workers
    async with httpx.AsyncClient(timeout=10) as client:
        token = await open_session(client, b)
    host, port = a.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /echo HTTP/1.1\r\nhost: {host}\r\nmcp-session-id: {token}\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        head = await _read_until(reader, b"\r\n\r\n")  # the answer starts before the body is complete
        assert head.startswith(b"HTTP/1.1 200")
        assert f"x-worker-pid: {b.process.pid}".encode() in head
        for word in (b"first-chunk", b"second-chunk", b"third-chunk"):
            writer.write(b"%x\r\n%s\r\n" % (len(word), word))
            await writer.drain()
            await _read_until(reader, word)
        writer.write(b"0\r\n\r\n")
        await _read_until(reader, b"0\r\n\r\n")
    finally:
        writer.close()


async def test_a_long_answer_streams_and_the_owner_sees_the_client_leave(workers: tuple[Machine, Machine]) -> None:
    a, b = workers
    async with httpx.AsyncClient(timeout=10) as client:
        token = await open_session(client, b)
        headers = {"mcp-session-id": token}
        async with client.stream("GET", f"{a.url}/ticks", headers=headers) as response:
            assert response.headers["x-worker-pid"] == str(b.process.pid)
            lines = response.aiter_lines()
            assert await lines.__anext__() == "tick 1"
            assert await lines.__anext__() == "tick 2"
        # The client left while the owner was still streaming: the owner's app hears of it.
        deadline = time.monotonic() + 10
        while (await client.get(f"{b.url}/disconnects", headers=headers)).text != "1":
            assert time.monotonic() < deadline, "the owner never saw the client leave"
            await asyncio.sleep(0.05)


async def test_a_large_body_is_handed_over_whole(workers: tuple[Machine, Machine]) -> None:
    a, b = workers
    body = os.urandom(3 * 1024 * 1024)
    async with httpx.AsyncClient(timeout=30) as client:
        token = await open_session(client, b)
        response = await client.post(f"{a.url}/echo", headers={"mcp-session-id": token}, content=body)
    assert response.status_code == 200
    assert response.content == body


async def test_an_answer_that_does_not_wait_for_the_body_reaches_the_client(
    workers: tuple[Machine, Machine],
) -> None:
    """The owner answers before it has read the body (``/disconnects`` never reads it)."""
    a, b = workers
    async with httpx.AsyncClient(timeout=30) as client:
        token = await open_session(client, b)
        for _ in range(3):
            response = await client.post(
                f"{a.url}/disconnects", headers={"mcp-session-id": token}, content=b"x" * (3 * 1024 * 1024)
            )
            assert response.status_code == 200
            assert response.headers["x-worker-pid"] == str(b.process.pid)
            assert response.text == "0"


async def test_a_forged_hand_over_mark_only_gets_the_client_a_404(workers: tuple[Machine, Machine]) -> None:
    """Also once A has handed the session over before (and remembers whose it is)."""
    a, b = workers
    async with httpx.AsyncClient(timeout=10) as client:
        token = await open_session(client, b)
        handed = await client.get(f"{a.url}/disconnects", headers={"mcp-session-id": token})
        assert handed.headers["x-worker-pid"] == str(b.process.pid)
        response = await client.get(
            f"{a.url}/disconnects", headers={"mcp-session-id": token, "affinity-handed-over": "0123abcd"}
        )
    assert response.status_code == 404
    assert response.content == SESSION_NOT_FOUND_BODY


async def test_a_handed_over_request_for_another_worker_is_not_handed_over_again(
    workers: tuple[Machine, Machine], socket_dir: Path
) -> None:
    """Straight to B's socket, as a sibling would send it, with a token of A: B answers 404 itself."""
    a, b = workers
    async with httpx.AsyncClient(timeout=10) as client:
        token = await open_session(client, a)
        b_tag = _worker_tag(await open_session(client, b))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/disconnects",
        "query_string": b"",
        "headers": [(b"mcp-session-id", token.encode())],
    }
    siblings = Siblings()
    outcome = await hand_over(
        scope,
        receive,
        send,
        siblings=siblings,
        socket_path=str(socket_dir / f"{b_tag}.sock"),
        sender="feedf00d",
        busy_timeout=5,
    )
    siblings.close()
    assert outcome is Outcome.ANSWERED
    assert sent[0]["status"] == 404
    assert b"".join(message.get("body", b"") for message in sent[1:]) == SESSION_NOT_FOUND_BODY
    assert "reason=already_handed_over" in b.log()


def _worker_tag(token: str) -> str:
    """The worker a token names (the part of its inner id before ``~``)."""
    inner = TokenCodec((SECRET,), app_name=APP_NAME).verify(token, now=time.time()).inner_session_id
    return inner.split("~")[0]


@contextlib.contextmanager
def _two_workers(socket_dir: Path, **env: str) -> Iterator[tuple[Machine, Machine]]:
    """Two workers of one machine of their own (a test that kills one, or sets its own options)."""
    env = {"AFFINITY_WORKER_SOCKET_DIR": str(socket_dir), **env}
    a = start_machine(MACHINE, app="tests.workers_app:app", extra_env=env)
    try:
        b = start_machine(MACHINE, app="tests.workers_app:app", extra_env=env)
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


async def test_a_worker_that_is_gone_means_404_at_once(socket_dir: Path) -> None:
    with _two_workers(socket_dir) as (a, b):
        async with httpx.AsyncClient(timeout=10) as client:
            token = await open_session(client, b)
            # Handed over once first: A remembers the session is B's, and still finds B gone.
            handed = await client.get(f"{a.url}/disconnects", headers={"mcp-session-id": token})
            assert handed.headers["x-worker-pid"] == str(b.process.pid)
            b.process.send_signal(signal.SIGKILL)
            b.process.wait()
            # The client's 10 s timeout would fail the test if the answer hung.
            response = await client.get(f"{a.url}/disconnects", headers={"mcp-session-id": token})
        assert response.status_code == 404
        assert response.content == SESSION_NOT_FOUND_BODY
        assert "reason=worker_gone" in a.log()


async def test_a_sibling_workers_session_is_refused_once_its_token_is_too_old(socket_dir: Path) -> None:
    """A remembers that the session is B's, and only until the token's age runs out: then 404."""
    with _two_workers(socket_dir, AFFINITY_MAX_TOKEN_AGE="2") as (a, b):
        async with httpx.AsyncClient(timeout=10) as client:
            token = await open_session(client, b)
            for _ in range(3):
                handed = await client.get(f"{a.url}/disconnects", headers={"mcp-session-id": token})
                assert handed.headers["x-worker-pid"] == str(b.process.pid)
            await asyncio.sleep(2.2)
            response = await client.get(f"{a.url}/disconnects", headers={"mcp-session-id": token})
        assert response.status_code == 404
        assert response.content == SESSION_NOT_FOUND_BODY
        assert "reason=token_expired" in a.log()


async def _lifespan_only(scope: dict[str, Any], receive: Any, send: Any) -> None:
    while (await receive())["type"] != "lifespan.shutdown":
        await send({"type": "lifespan.startup.complete"})
    await send({"type": "lifespan.shutdown.complete"})


async def test_a_mounted_app_opens_its_worker_socket_from_the_parents_lifespan(tmp_path: Path) -> None:
    """``FlyMCPApp.lifespan`` (passed to the parent app) opens this worker's socket and removes it at shutdown."""
    directory = str(tmp_path / "sockets")
    settings = AffinitySettings(
        machine_id=MACHINE, secret_keys=(SECRET,), app_name=APP_NAME, worker_socket_dir=directory
    )
    wrapped = wrap_mcp_app(_lifespan_only, settings=settings)
    socket_path = os.path.join(directory, f"{wrapped.middleware.workers.tag}.sock")
    async with wrapped.lifespan():
        assert os.path.exists(socket_path)  # noqa: ASYNC240
    assert not os.path.exists(socket_path)  # noqa: ASYNC240
