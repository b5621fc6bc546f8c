"""Sessions as a budget: the per-process cap, the per-client new-session limit, legacy streams."""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from typing import Any

import pytest

from fly_replay_router import AffinityMiddleware, AffinitySettings
from fly_replay_router.affinity.capacity import (
    PLACE_STEP,
    Admission,
    Elsewhere,
    Full,
    Live,
    LiveSessions,
    NewSessionLimiter,
    RateLimited,
)
from fly_replay_router.settings import sessions_for_memory

HERE = "aaaaaaaaaaaaaa"
KEY = "capacity-test-key-0123456789"

pytestmark = pytest.mark.anyio


def test_live_sessions_drop_idle_ones_but_keep_those_with_a_request_in_flight() -> None:
    live = LiveSessions(idle_timeout=10)
    for name in (b"a", b"b", b"c"):
        live.minted(name, "/mcp", 0.0)
    stream = live.get(b"b")  # b holds an event stream
    assert stream is not None
    stream.start()
    assert live.get(b"x") is None  # not minted here: never counted
    assert live.count(5.0) == 3
    assert live.count(11.0) == 1  # a and c idled out; b's stream is still open
    stream.finish(30.0)
    assert live.count(35.0) == 1
    assert live.count(40.0 + PLACE_STEP + 0.01) == 0  # dropped at most PLACE_STEP after its timeout
    live.minted(b"d", "/mcp", 50.0)
    live.ended(b"d", "/other")  # another route's answer does not end it
    assert live.count(50.0) == 1
    live.ended(b"d", "/mcp")
    assert live.count(50.0) == 0


def test_a_session_in_use_is_never_dropped_and_an_idle_one_always_is() -> None:
    # Sessions used at random times, some holding a request across many counts: after every step, the
    # count is exactly the sessions seen within the timeout or in flight, give or take those whose
    # timeout passed less than PLACE_STEP ago.
    timeout = 10.0
    rng = random.Random(7)
    live = LiveSessions(idle_timeout=timeout)
    last: dict[bytes, float] = {}
    held: dict[bytes, list[Live]] = {}
    now = 0.0
    for step in range(5000):
        now += rng.choice((0.0, 0.01, 0.3, 1.7, 4.0))
        name = b"s%d" % rng.randrange(40)
        action = rng.random()
        if action < 0.1 and name not in last:
            live.minted(name, "/mcp", now)
            last[name] = now
        elif action < 0.6 and name in last and (session := live.get(name)) is not None:
            session.start()
            if rng.random() < 0.3:
                held.setdefault(name, []).append(session)  # a stream, finished later
            else:
                session.finish(now)
                last[name] = now
        elif action < 0.8 and held.get(name):
            held[name].pop().finish(now)
            last[name] = now
        count = live.count(now)
        surely = {n for n, at in last.items() if at > now - timeout or held.get(n)}
        maybe = {n for n, at in last.items() if at > now - timeout - PLACE_STEP}
        assert len(surely) <= count <= len(surely | maybe), f"step {step}: {count} of {sorted(surely)}"
        for name in list(last):
            if live.get(name) is None:
                assert name not in surely, f"step {step}: {name!r} dropped while in use"
                del last[name]  # dropped: it never counts again
                held.pop(name, None)


def test_the_limiter_allows_a_burst_then_the_rate_per_client() -> None:
    limiter = NewSessionLimiter(rate=1.0, burst=3)
    assert [limiter.take(b"1.2.3.4", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take(b"1.2.3.4", 0.0) == pytest.approx(1.0)
    assert limiter.take(b"5.6.7.8", 0.0) == 0.0  # another client has its own bucket
    assert limiter.take(b"1.2.3.4", 1.5) == 0.0  # a token came back after a second
    assert limiter.take(b"1.2.3.4", 1.5) > 0


def test_the_limiter_forgets_the_least_recent_client_beyond_its_size() -> None:
    limiter = NewSessionLimiter(rate=0.001, burst=1, max_clients=2)
    limiter.take(b"a", 0.0)
    limiter.take(b"b", 0.0)
    limiter.take(b"c", 0.0)  # a is forgotten
    assert limiter.take(b"a", 0.0) == 0.0
    assert limiter.take(b"c", 0.0) > 0


def test_admission_sends_elsewhere_then_gives_up_with_one_503() -> None:
    admission = Admission(max_sessions=1, max_legacy_sessions=1, idle_timeout=60, rate=None, burst=1)
    ask = {"client": b"c", "legacy": False, "replayable": True, "now": 0.0}
    assert admission.refusal(hops=0, **ask) is None  # type: ignore[arg-type]
    admission.live.minted(b"s1", "/mcp", 0.0)
    assert admission.refusal(hops=0, **ask) == Elsewhere(1)  # type: ignore[arg-type]
    assert admission.refusal(hops=1, **ask) == Elsewhere(2)  # type: ignore[arg-type]
    assert admission.refusal(hops=2, **ask) == Full()  # type: ignore[arg-type]
    assert admission.refusal(hops=0, client=b"c", legacy=False, replayable=False, now=0.0) == Full()
    assert admission.refusal(hops=0, client=b"c", legacy=True, replayable=True, now=0.0) is None
    admission.live.legacy_streams = 1
    assert admission.refusal(hops=0, client=b"c", legacy=True, replayable=True, now=0.0) == Elsewhere(1)


def test_the_rate_is_checked_before_the_cap() -> None:
    admission = Admission(max_sessions=None, max_legacy_sessions=None, idle_timeout=60, rate=1.0, burst=1)
    assert admission.refusal(client=b"c", legacy=False, hops=0, replayable=True, now=0.0) is None
    assert admission.refusal(client=b"c", legacy=False, hops=0, replayable=True, now=0.0) == RateLimited(1)


def test_the_default_cap_follows_the_vms_memory() -> None:
    assert sessions_for_memory(None) is None
    assert sessions_for_memory(256) == 942
    assert sessions_for_memory(512) == 2908
    assert sessions_for_memory(2048) == 14704
    settings = AffinitySettings.from_env({"FLY_MACHINE_ID": HERE, "AFFINITY_SECRET": KEY, "FLY_VM_MEMORY_MB": "512"})
    assert (settings.max_sessions, settings.max_legacy_sessions) == (2908, 2908)
    explicit = AffinitySettings.from_env(
        {"AFFINITY_SECRET": KEY, "FLY_VM_MEMORY_MB": "512", "AFFINITY_MAX_SESSIONS": "10",
         "AFFINITY_MAX_LEGACY_SESSIONS": "off", "AFFINITY_NEW_SESSION_RATE": "off"}
    )  # fmt: skip
    assert (explicit.max_sessions, explicit.max_legacy_sessions, explicit.new_session_rate) == (10, None, None)
    with pytest.raises(ValueError, match="AFFINITY_MAX_SESSIONS"):
        AffinitySettings.from_env({"AFFINITY_SECRET": KEY, "AFFINITY_MAX_SESSIONS": "-3"})


class MintingApp:
    """An inner MCP app: a POST without a session mints one; a GET without one opens a legacy stream."""

    def __init__(self) -> None:
        self.calls = 0
        self.stream_open = asyncio.Event()
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls += 1
        has_session = any(name == b"mcp-session-id" for name, _ in scope["headers"])
        if scope["method"] == "GET" and not has_session:
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/event-stream")]}
            )
            inner = uuid.uuid4().hex
            endpoint = f"event: endpoint\r\ndata: /messages/?session_id={inner}\r\n\r\n".encode()
            await send({"type": "http.response.body", "body": endpoint, "more_body": True})
            self.stream_open.set()
            await self.release.wait()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers = [(b"content-type", b"application/json")]
        if not has_session:
            headers.append((b"mcp-session-id", uuid.uuid4().hex.encode()))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"{}"})


async def request(
    layer: AffinityMiddleware, method: str = "POST", headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": method, "path": "/mcp", "raw_path": b"/mcp", "query_string": b"", "root_path": "",
        "headers": [(b"content-length", b"2"), *(headers or [])], "client": ("10.0.0.9", 5000),
    }  # fmt: skip
    await layer(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def layer_with(inner: MintingApp, **options: Any) -> AffinityMiddleware:
    return AffinityMiddleware(inner, settings=AffinitySettings(machine_id=HERE, secret_keys=(KEY,), **options))


async def test_a_full_machine_sends_new_sessions_elsewhere_and_keeps_serving_open_ones() -> None:
    inner = MintingApp()
    layer = layer_with(inner, max_sessions=2, new_session_rate=None)
    tokens = [(await request(layer))[1][b"mcp-session-id"] for _ in range(2)]
    status, headers, _ = await request(layer)
    assert status == 307
    assert headers[b"fly-replay"] == b"elsewhere=true;state=full-1"
    assert inner.calls == 2  # the inner app never saw it
    # Sessions already open are served as before.
    for token in tokens:
        assert (await request(layer, headers=[(b"mcp-session-id", token)]))[0] == 200
    # Replayed from two full machines already: one clear 503, no third hop.
    status, headers, body = await request(layer, headers=[(b"fly-replay-src", b"instance=bbbbbbbbbbbbbb;state=full-2")])
    assert status == 503
    assert headers[b"retry-after"] == b"30"
    assert json.loads(body)["error"]["message"].endswith("retry later")
    # A DELETE that succeeds frees a place.
    assert (await request(layer, "DELETE", [(b"mcp-session-id", tokens[0])]))[0] == 200
    assert (await request(layer))[0] == 200


async def test_one_client_past_its_rate_gets_429_and_others_do_not() -> None:
    layer = layer_with(MintingApp(), new_session_rate=0.5, new_session_burst=2)
    abuser = [(b"fly-client-ip", b"203.0.113.7")]
    assert [(await request(layer, headers=abuser))[0] for _ in range(2)] == [200, 200]
    status, headers, body = await request(layer, headers=abuser)
    assert status == 429
    assert headers[b"retry-after"] == b"2"
    assert b"Too many new sessions" in body
    assert (await request(layer, headers=[(b"fly-client-ip", b"198.51.100.1")]))[0] == 200
    token = (await request(layer, headers=[(b"fly-client-ip", b"198.51.100.1")]))[1][b"mcp-session-id"]
    # Requests of an open session are never charged, whoever sends them.
    assert (await request(layer, headers=[*abuser, (b"mcp-session-id", token)]))[0] == 200


async def test_legacy_streams_count_while_open() -> None:
    inner = MintingApp()
    layer = layer_with(inner, max_legacy_sessions=1, new_session_rate=None)
    first = asyncio.ensure_future(request(layer, "GET"))
    await asyncio.wait_for(inner.stream_open.wait(), 5)
    status, headers, _ = await request(layer, "GET")
    assert status == 307
    assert headers[b"fly-replay"] == b"elsewhere=true;state=full-1"
    inner.release.set()
    assert (await first)[0] == 200
    # The first stream ended: its place is free again.
    assert layer._admission.live.legacy_streams == 0
    assert (await request(layer, "GET"))[0] == 200


def test_workers_of_one_vm_share_its_session_budget() -> None:
    assert sessions_for_memory(2048, workers=2) == int((2048 * 0.75 - 200) * 1024 / 100 / 2)
    env = {"AFFINITY_SECRET": KEY, "FLY_VM_MEMORY_MB": "2048", "AFFINITY_WORKERS": "2"}
    assert AffinitySettings.from_env(env).max_sessions == sessions_for_memory(2048, workers=2)


def _scope(*headers: tuple[bytes, bytes]) -> dict[str, Any]:
    return {"type": "http", "headers": list(headers), "client": ("198.51.100.9", 5000)}


def test_the_client_key_is_flys_client_address_bounded_and_by_64_for_ipv6() -> None:
    from fly_replay_router.affinity.capacity import UNATTRIBUTED, client_key

    fly = b"fly-client-ip"
    assert client_key(_scope((fly, b"203.0.113.7"))) == bytes([203, 0, 113, 7])
    assert client_key(_scope((fly, b"::ffff:203.0.113.7"))) == bytes([203, 0, 113, 7])
    one = client_key(_scope((fly, b"2001:db8:1:2::1")))
    assert one == client_key(_scope((fly, b"2001:db8:1:2:ffff:ffff:ffff:ffff")))  # one subscriber's /64
    assert one != client_key(_scope((fly, b"2001:db8:1:3::1")))
    assert len(one) == 8
    # Never the peer, never X-Forwarded-For: without a valid Fly-Client-IP, one shared bucket.
    assert client_key(_scope((b"x-forwarded-for", b"192.0.2.1"))) == UNATTRIBUTED
    for garbage in (b"x" * 262_144, b"\xd9\xa3.0.0.1", b"1.2.3.4, 5.6.7.8", b"", b"fe80::1%eth0" + b"0" * 40):
        assert client_key(_scope((fly, garbage))) == UNATTRIBUTED


def test_the_limiter_stays_small_whatever_the_keys_sent() -> None:
    from fly_replay_router.affinity.capacity import client_key

    limiter = NewSessionLimiter(rate=1.0, burst=1)
    for n in range(400):
        limiter.take(client_key(_scope((b"fly-client-ip", b"%d" % n + b"a" * 262_144))), 0.0)
    assert len(limiter._buckets) == 1
    assert all(len(key) <= 16 for key in limiter._buckets)


def test_numbers_in_headers_are_ascii_digits_only() -> None:
    from fly_replay_router.affinity.capacity import MAX_FULL_HOPS, full_hops
    from fly_replay_router.fly import ascii_decimal

    assert ascii_decimal("42", max_digits=2) == 42
    for text in ("\u0663", "\u00b2", "\uff11", "4\u0662", "", "123", "-1", " 1", "1.0"):
        assert ascii_decimal(text, max_digits=2) is None, text
    assert full_hops("full-1") == 1
    assert full_hops("full-\u00b2") == MAX_FULL_HOPS  # unreadable: as many as the most, never a 500
