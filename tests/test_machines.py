"""Two real machines of app.main:app (one app, one secret, two ids) and the official MCP client.

No edge here: requests sent to the wrong machine show the raw ``fly-replay`` answer that Fly's
proxy would act on.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import httpx
import pytest
from mcp import Client
from mcp.client.sse import sse_client

from fly_replay_router.affinity.token import TokenCodec
from tests.conftest import APP_NAME, SECRET, Machine, free_port, start_machine
from tests.mcp_http import (
    HANDSHAKE,
    INITIALIZE,
    JSON_AND_SSE,
    call_count_message,
    client_recording_tokens,
    measure_body,
    open_session,
    read_rpc_result,
    session_headers,
)

pytestmark = pytest.mark.anyio


def tool_text(result: Any) -> str:
    return str(result.content[0].text)


async def test_a_session_counts_on_its_machine_and_the_other_machine_replays_it(
    two_machines: tuple[Machine, Machine],
) -> None:
    machine_a, machine_b = two_machines
    async with client_recording_tokens(f"{machine_a.url}/mcp") as (client, tokens):
        assert tool_text(await client.call_tool("whoami", {})) == machine_a.machine_id
        assert [tool_text(await client.call_tool("count", {})) for _ in range(3)] == ["1", "2", "3"]
        assert tokens
        assert len(set(tokens)) == 1  # one session, one token, on every response
        token = tokens[0]
        assert token.startswith(machine_a.machine_id + ".")

        # The same session's next request, landing on B: B answers for Fly's proxy, not for the client.
        async with httpx.AsyncClient(timeout=10) as raw:
            landed_on_b = await raw.post(
                f"{machine_b.url}/mcp",
                headers={**JSON_AND_SSE, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE},
                json=call_count_message(99),
            )
        assert landed_on_b.status_code == 307
        assert landed_on_b.headers["fly-replay"] == f"instance={machine_a.machine_id};timeout=5s;fallback=force_self"

        # B did not touch the session: A still counts on from 3.
        assert tool_text(await client.call_tool("count", {})) == "4"


async def test_a_replayed_request_that_fly_brought_back_gets_404(two_machines: tuple[Machine, Machine]) -> None:
    machine_a, machine_b = two_machines
    async with httpx.AsyncClient(timeout=10) as raw:
        token = await open_session(raw, f"{machine_a.url}/mcp")
        failed = f"instance={machine_a.machine_id};reason=timeout;elapsed_ms=5001"
        fell_back = await raw.post(
            f"{machine_b.url}/mcp",
            headers=session_headers(token, **{"fly-replay-failed": failed}),
            json=call_count_message(2),
        )
    assert fell_back.status_code == 404
    assert fell_back.json()["error"]["message"] == "Session not found"


def rejected_count(text: str, machine_id: str, reason: str) -> float:
    """A machine's ``affinity_decisions_total`` for rejected requests with ``reason``, from its metrics page."""
    wanted = {"machine": machine_id, "outcome": "rejected", "reason": reason}
    total = 0.0
    for match in re.finditer(r"^affinity_decisions_total\{([^}]*)\} (\S+)$", text, re.MULTILINE):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
        if all(labels.get(name) == value for name, value in wanted.items()):
            total += float(match.group(2))
    return total


async def test_a_token_of_another_fleet_gets_404_on_every_machine(two_machines: tuple[Machine, Machine]) -> None:
    # Current tokens, well formed, naming this fleet's own machines: sealed under another secret of
    # the same app, and under this secret for another app. Only the seal tells them apart.
    foreign_codecs = (
        TokenCodec(("another-fleets-secret-0123456789abcdef",), app_name=APP_NAME),
        TokenCodec((SECRET,), app_name="another-app"),
    )
    own = TokenCodec((SECRET,), app_name=APP_NAME)
    inner = "7da4e80665bd4c6fb73231d63f0c227f"
    async with httpx.AsyncClient(timeout=10) as raw:
        for machine in two_machines:
            other = next(m for m in two_machines if m is not machine)
            # The same token sealed by this fleet is routed to its owner: the foreign ones differ only in the seal.
            genuine = own.issue(other.machine_id, inner, now=time.time())
            answered = await raw.post(
                f"{machine.url}/mcp",
                headers={**JSON_AND_SSE, "mcp-session-id": genuine, "mcp-protocol-version": HANDSHAKE},
                json=call_count_message(1),
            )
            assert answered.status_code == 307
            assert machine.metrics_url is not None
            before = (await raw.get(f"{machine.metrics_url}/metrics")).text
            sent = 0
            for codec in foreign_codecs:
                for owner in two_machines:
                    foreign = codec.issue(owner.machine_id, inner, now=time.time())
                    assert len(foreign) == len(genuine)
                    response = await raw.post(
                        f"{machine.url}/mcp",
                        headers={**JSON_AND_SSE, "mcp-session-id": foreign, "mcp-protocol-version": HANDSHAKE},
                        json=call_count_message(1),
                    )
                    sent += 1
                    assert response.status_code == 404
                    assert "fly-replay" not in response.headers
                    assert response.json()["error"]["message"] == "Session not found"
            after = (await raw.get(f"{machine.metrics_url}/metrics")).text
            # Refused for its seal, after the keys were tried; not as malformed before any key was.
            seal = "bad_signature"
            assert (
                rejected_count(after, machine.machine_id, seal) - rejected_count(before, machine.machine_id, seal)
                == sent
            )
            malformed = "malformed_token"
            assert rejected_count(after, machine.machine_id, malformed) == rejected_count(
                before, machine.machine_id, malformed
            )


async def test_legacy_sse_endpoint_carries_a_token_and_a_message_posted_to_the_other_machine_is_replayed(
    two_machines: tuple[Machine, Machine],
) -> None:
    machine_a, machine_b = two_machines
    session_ids: list[str] = []
    async with Client(
        sse_client(f"{machine_a.url}/sse", on_session_created=session_ids.append), mode="legacy"
    ) as client:
        assert [tool_text(await client.call_tool("count", {})) for _ in range(3)] == ["1", "2", "3"]
        assert tool_text(await client.call_tool("whoami", {})) == machine_a.machine_id
        assert len(session_ids) == 1
        token = session_ids[0]
        assert token.startswith(machine_a.machine_id + ".")

        async with httpx.AsyncClient(timeout=10) as raw:
            landed_on_b = await raw.post(
                f"{machine_b.url}/messages/",
                params={"session_id": token},
                headers={"content-type": "application/json"},
                content=json.dumps(call_count_message(50)),
            )
        assert landed_on_b.status_code == 307
        assert landed_on_b.headers["fly-replay"].startswith(f"instance={machine_a.machine_id};")
        assert tool_text(await client.call_tool("count", {})) == "4"


async def test_modern_clients_are_served_by_whichever_machine_they_hit(two_machines: tuple[Machine, Machine]) -> None:
    for machine in two_machines:
        async with Client(f"{machine.url}/mcp") as client:
            assert tool_text(await client.call_tool("whoami", {})) == machine.machine_id
            assert tool_text(await client.call_tool("measure", {"data": "héllo"})) == "5"


async def test_health_check_answers_on_every_machine(two_machines: tuple[Machine, Machine]) -> None:
    async with httpx.AsyncClient(timeout=10) as raw:
        for machine in two_machines:
            response = await raw.get(f"{machine.url}/healthz")
            assert (response.status_code, response.text) == (200, "ok")


async def test_a_body_fly_cannot_replay_is_forwarded_to_the_owner_and_answered(
    two_machines: tuple[Machine, Machine],
) -> None:
    machine_a, machine_b = two_machines
    three_mib = 3 * 1024 * 1024
    async with httpx.AsyncClient(timeout=30) as raw:
        token = await open_session(raw, f"{machine_a.url}/mcp")
        headers = {**JSON_AND_SSE, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE}
        with_length = await raw.post(f"{machine_b.url}/mcp", headers=headers, content=measure_body(three_mib))
        assert with_length.status_code == 200
        assert read_rpc_result(with_length)["content"][0]["text"] == str(three_mib)

        async def chunked() -> Any:
            body = measure_body(three_mib)
            for start in range(0, len(body), 256 * 1024):
                yield body[start : start + 256 * 1024]

        without_length = await raw.post(f"{machine_b.url}/mcp", headers=headers, content=chunked())
        assert without_length.status_code == 200
        assert read_rpc_result(without_length)["content"][0]["text"] == str(three_mib)

        # At most 1 MiB with a known length: Fly can replay it, so B replays.
        small = await raw.post(f"{machine_b.url}/mcp", headers=headers, content=measure_body(1000))
        assert small.status_code == 307
    assert "outcome=forwarded" in machine_b.log()


def posts_from_ipv6_peers(machine: Machine) -> int:
    return len(re.findall(r'INFO: +::1:\d+ - "POST /mcp HTTP/1.1" 200', machine.log()))


async def test_a_body_forwarded_to_its_owner_travels_over_ipv6_as_on_flys_private_network(
    two_machines: tuple[Machine, Machine],
) -> None:
    machine_a, machine_b = two_machines
    async with httpx.AsyncClient(timeout=30) as raw:
        # The client reaches both machines over IPv4, as Fly's proxy does.
        token = await open_session(raw, f"{machine_a.url}/mcp")
        before = posts_from_ipv6_peers(machine_a)
        headers = {**JSON_AND_SSE, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE}
        forwarded = await raw.post(f"{machine_b.url}/mcp", headers=headers, content=measure_body(2 * 1024 * 1024))
    assert forwarded.status_code == 200
    assert read_rpc_result(forwarded)["content"][0]["text"] == str(2 * 1024 * 1024)
    assert posts_from_ipv6_peers(machine_a) == before + 1


async def test_a_forwarded_request_is_never_forwarded_again(two_machines: tuple[Machine, Machine]) -> None:
    machine_a, machine_b = two_machines
    async with httpx.AsyncClient(timeout=30) as raw:
        token = await open_session(raw, f"{machine_a.url}/mcp")
        looped = await raw.post(
            f"{machine_b.url}/mcp",
            headers={
                **JSON_AND_SSE,
                "mcp-session-id": token,
                "mcp-protocol-version": HANDSHAKE,
                "affinity-forwarded-from": "cccccccccccccc",
            },
            content=measure_body(2 * 1024 * 1024),
        )
    assert looped.status_code == 404


async def test_an_owner_that_cannot_be_reached_for_a_forward_gives_404(tmp_path: Any) -> None:
    closed_port = free_port()
    peers = f"bbbbbbbbbbbbbb=http://127.0.0.1:1,dddddddddddddd=http://127.0.0.1:{closed_port}"
    machine = start_machine("eeeeeeeeeeeeee", extra_env={"AFFINITY_PEERS": peers})
    try:
        token = TokenCodec((SECRET,), app_name=APP_NAME).issue("dddddddddddddd", "0" * 32, now=time.time())
        async with httpx.AsyncClient(timeout=30) as raw:
            response = await raw.post(
                f"{machine.url}/mcp",
                headers={**JSON_AND_SSE, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE},
                content=measure_body(2 * 1024 * 1024),
            )
        assert response.status_code == 404
        assert response.json()["error"]["message"] == "Session not found"
        assert "reason=owner_unreachable" in machine.log()
    finally:
        machine.stop()


async def test_metrics_count_decisions_by_outcome(two_machines: tuple[Machine, Machine]) -> None:
    machine_a, machine_b = two_machines
    async with httpx.AsyncClient(timeout=10) as raw:
        token = await open_session(raw, f"{machine_a.url}/mcp")
        headers = {**JSON_AND_SSE, "mcp-session-id": token, "mcp-protocol-version": HANDSHAKE}
        for _ in range(3):
            assert (
                await raw.post(f"{machine_b.url}/mcp", headers=headers, json=call_count_message(3))
            ).status_code == 307
        assert machine_b.metrics_url is not None
        metrics = (await raw.get(f"{machine_b.metrics_url}/metrics")).text
    replayed = [
        line for line in metrics.splitlines()
        if line.startswith('affinity_decisions_total{machine="bbbbbbbbbbbbbb",outcome="replayed"')
    ]  # fmt: skip
    assert len(replayed) == 1
    assert float(replayed[0].rsplit(" ", 1)[1]) >= 3


async def test_event_streams_are_marked_uncompressed_for_flys_proxy(two_machines: tuple[Machine, Machine]) -> None:
    machine_a, _ = two_machines
    async with httpx.AsyncClient(timeout=10) as raw, raw.stream("GET", f"{machine_a.url}/sse") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert stream.headers["content-encoding"] == "none"
    async with httpx.AsyncClient(timeout=10) as raw:
        health = await raw.get(f"{machine_a.url}/healthz")
    assert "content-encoding" not in health.headers


def test_on_fly_without_a_secret_the_app_refuses_to_start_and_says_why() -> None:
    with pytest.raises(RuntimeError, match="exited during start") as error:
        start_machine("abcdefabcdef01", secret="")
    assert "AFFINITY_SECRET is not set" in str(error.value)
    assert "fly secrets set AFFINITY_SECRET=" in str(error.value)
    assert "Traceback" not in str(error.value)


async def test_the_public_fly_host_and_allowed_hosts_pass_the_sdks_host_check() -> None:
    machine = start_machine("abcdefabcdef02", extra_env={"AFFINITY_ALLOWED_HOSTS": "mcp.example.com"})
    try:
        async with httpx.AsyncClient(timeout=10) as raw:
            for host, status in ((f"{APP_NAME}.fly.dev", 200), ("mcp.example.com", 200), ("evil.example", 421)):
                response = await raw.post(f"{machine.url}/mcp", headers={**JSON_AND_SSE, "host": host}, json=INITIALIZE)
                assert response.status_code == status, host
    finally:
        machine.stop()
