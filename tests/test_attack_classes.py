"""Each attack class that once broke a promise, against real processes: the launcher, two workers, mcp 1.x.

The model fleet (``tests/test_invariants.py``) proves the invariants over every path in-process;
these show the same classes where users meet them: the image's own command (with one worker and
with two), and a user's mcp 1.x project in its own environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator

import httpx
import pytest

from fly_replay_router.affinity.token import InvalidToken, TokenCodec
from tests.compat.envs import MCP1, prepared
from tests.conftest import APP_NAME, ROOT, SECRET, Machine, free_port, machine_command, start_machine
from tests.mcp_http import INITIALIZE, JSON_AND_SSE, open_session, session_headers

pytestmark = pytest.mark.anyio
MACHINE = "a1a1a1a1a1a1a1"
CODEC = TokenCodec((SECRET,), app_name=APP_NAME)
_ENDPOINT_ID = re.compile(r"session_id=([^&\s]+)")


def sealed(token: str) -> bool:
    try:
        CODEC.verify(token, now=time.time())
    except InvalidToken:
        return False
    return True


@pytest.fixture
def capped(request: pytest.FixtureRequest) -> Iterator[Machine]:
    """The demo under the image's command, with tiny caps; ``workers`` from the test's parameter."""
    workers = getattr(request, "param", 1)
    port = free_port()
    env = {"AFFINITY_MAX_SESSIONS": "1", "AFFINITY_MAX_LEGACY_SESSIONS": "2", "AFFINITY_NEW_SESSION_BURST": "50"}
    command = machine_command("app.main:app", port, free_port(), workers=workers)
    machine = start_machine(MACHINE, extra_env=env, port=port, command=command)
    try:
        yield machine
    finally:
        machine.stop()


async def first_event(client: httpx.AsyncClient, url: str, **kw: object) -> tuple[httpx.Response, str]:
    """Open a legacy stream and read its first event; the stream stays open until the response is closed.

    The chunk iterator stays referenced on the response: a dropped one is finalised later, and
    httpx then closes the stream (which would free the stream's place while the test counts it).
    """
    request = client.build_request("GET", url, **kw)  # type: ignore[arg-type]
    response = await client.send(request, stream=True)
    text = ""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        chunks = response.aiter_text()
        response.extensions["test_chunks"] = chunks
        async for chunk in chunks:
            text += chunk
            if "\n\n" in text.replace("\r\n", "\n"):
                break
    return response, text


@pytest.mark.parametrize("capped", [1, 2], indirect=True)
async def test_a_legacy_stream_opened_with_a_token_is_sealed_and_counted(capped: Machine) -> None:
    """GET /sse with a valid token (query or header) opens an SDK session: its id leaves sealed, and the cap holds."""
    async with httpx.AsyncClient(timeout=30) as client:
        token = await open_session(client, f"{capped.url}/mcp")
        held: list[httpx.Response] = []
        endpoints: list[str] = []
        try:
            for carrier in ("query", "header") * 5:
                params = {"session_id": token} if carrier == "query" else {}
                headers = {"mcp-session-id": token} if carrier == "header" else {}
                response, text = await first_event(client, f"{capped.url}/sse", params=params, headers=headers)
                held.append(response)
                assert response.status_code < 500, text
                found = _ENDPOINT_ID.search(text)
                if found:
                    endpoints.append(found.group(1))
            assert endpoints, "no legacy stream was opened at all"
            assert all(sealed(value) for value in endpoints), endpoints
            workers = int(capped.process.args[capped.process.args.index("--workers") + 1])  # type: ignore[union-attr,index]
            assert len(endpoints) <= 2 * workers, f"{len(endpoints)} legacy sessions past a cap of 2 per worker"
        finally:
            for response in held:
                await response.aclose()


async def test_another_routes_404_does_not_free_a_sessions_place(capped: Machine) -> None:
    """Another route's 404, sent with a live session's token, leaves the session counted: a new one goes elsewhere."""
    async with httpx.AsyncClient(timeout=30) as client:
        token = await open_session(client, f"{capped.url}/mcp")
        other = await client.get(f"{capped.url}/no-such-route", headers=session_headers(token))
        assert other.status_code == 404
        again = await client.post(f"{capped.url}/mcp", headers=JSON_AND_SSE, json=INITIALIZE)
        assert again.status_code == 307, again.text  # full: replayed elsewhere, not the SDK's own 503
        assert "elsewhere=true" in again.headers["fly-replay"]
        call = await client.post(
            f"{capped.url}/mcp", headers=session_headers(token), json={"jsonrpc": "2.0", "id": 5, "method": "ping"}
        )
        assert call.status_code == 200, call.text


async def test_an_opening_the_sdk_refused_takes_no_place(capped: Machine) -> None:
    """A 400 opening (which may still name a session id) is not a session: the one place stays free."""
    async with httpx.AsyncClient(timeout=30) as client:
        for body in (b"{", b"[]", json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list"}).encode()):
            refused = await client.post(f"{capped.url}/mcp", headers=JSON_AND_SSE, content=body)
            assert 400 <= refused.status_code < 500, refused.text
            if "mcp-session-id" in refused.headers:
                assert sealed(refused.headers["mcp-session-id"])
        opened = await client.post(f"{capped.url}/mcp", headers=JSON_AND_SSE, json=INITIALIZE)
        assert opened.status_code == 200, opened.text


async def test_unicode_digits_in_parsed_headers_give_no_5xx(capped: Machine) -> None:
    """Python's int() takes any Unicode digit; the layer reads only ASCII ones."""
    async with httpx.AsyncClient(timeout=30) as client:
        for state in ("full-\u00b2", "full-\u0663", "full-1\u0661", "full-99999999"):
            source = f"instance=b1b1b1b1b1b1b1;state={state}".encode()
            answer = await client.post(
                f"{capped.url}/mcp",
                headers={**JSON_AND_SSE, "fly-replay-src": source},
                json=INITIALIZE,  # type: ignore[dict-item]
            )
            assert answer.status_code == 200, answer.text  # a garbled hop count is not a full fleet here
            ended = await client.delete(f"{capped.url}/mcp", headers=session_headers(answer.headers["mcp-session-id"]))
            assert ended.status_code == 200  # the one place is free again for the next


async def test_the_limiter_keys_on_fly_client_ip_never_x_forwarded_for() -> None:
    """A caller cannot buy fresh buckets with X-Forwarded-For; an IPv6 /64 is one client."""
    port = free_port()
    env = {"AFFINITY_NEW_SESSION_BURST": "2", "AFFINITY_NEW_SESSION_RATE": "0.01"}
    machine = start_machine(MACHINE, extra_env=env, port=port)
    try:
        async with httpx.AsyncClient(timeout=30) as client:

            async def opening(**headers: str) -> int:
                answer = await client.post(f"{machine.url}/mcp", headers={**JSON_AND_SSE, **headers}, json=INITIALIZE)
                return answer.status_code

            statuses = [await opening(**{"x-forwarded-for": f"198.51.100.{n}"}) for n in range(3)]
            assert statuses == [200, 200, 429]
            same_64 = [await opening(**{"fly-client-ip": f"2001:db8:1:2::{n}"}) for n in range(1, 4)]
            assert same_64 == [200, 200, 429]
            assert await opening(**{"fly-client-ip": "2001:db8:1:3::1"}) == 200  # another /64
            assert await opening(**{"fly-client-ip": "x" * 4000}) == 429  # not an address: the shared bucket
    finally:
        machine.stop()


@pytest.fixture
def mcp1_server() -> Iterator[str]:
    """A user's mcp 1.x project (tests/compat/apps/mcp1_notes.py) with this checkout's layer, under uvicorn."""
    project = prepared(MCP1)
    port = free_port()
    apps = ROOT / "tests" / "compat" / "apps"
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{apps}",
        "FLY_MACHINE_ID": MACHINE,
        "FLY_APP_NAME": APP_NAME,
        "AFFINITY_SECRET": SECRET,
        "AFFINITY_MAX_SESSIONS": "3",
    }
    command = [str(project.python), "-m", "uvicorn", "mcp1_notes:api", "--host", "127.0.0.1", "--port", str(port)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, cwd=apps, env=env, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    httpx.get(f"{url}/notes/mcp", timeout=1)
                    break
                except httpx.TransportError:
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise AssertionError(f"the mcp 1.x project did not start:\n{log.read().decode()}") from None
                    time.sleep(0.05)
            yield url
        finally:
            process.terminate()
            process.wait(timeout=10)


def test_mcp1_minting_for_a_sessionless_claim_is_sealed_and_capped(mcp1_server: str) -> None:
    """mcp 1.x opens a stateful session whatever version the request claims: sealed, counted, capped."""
    headers = {**JSON_AND_SSE, "mcp-protocol-version": "2026-07-28", "host": "127.0.0.1:8080"}
    opened = 0
    for _ in range(8):
        answer = httpx.post(f"{mcp1_server}/notes/mcp", headers=headers, json=INITIALIZE, timeout=30)
        assert answer.status_code < 500 or "retry-after" in answer.headers, answer.text
        minted = answer.headers.get("mcp-session-id")
        if minted is not None:
            assert sealed(minted), minted
        opened += answer.status_code == 200 and minted is not None
    assert 1 <= opened <= 3, f"{opened} sessions opened past a cap of 3"
