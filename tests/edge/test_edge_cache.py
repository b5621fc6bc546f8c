"""Replay caches: session rules from fly.toml, path rules from responses, invalidation, TTL."""

from __future__ import annotations

import httpx
import pytest

from fly_replay_router.edge.cache import ReplayCache
from fly_replay_router.edge.config import SessionCacheRule

SESSION_RULE = SessionCacheRule(path_prefix="/", ttl_seconds=300, type="header", name="Mcp-Session-Id")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_session_entry_expires_after_its_ttl() -> None:
    clock = Clock()
    cache = ReplayCache((SESSION_RULE,), clock=clock)
    lookup = cache.lookup("/mcp", {"mcp-session-id": "abc"})
    assert lookup.session_key is not None
    assert lookup.target is None
    cache.remember_session(lookup.session_key, "148e272a6d4689")
    assert cache.lookup("/mcp", {"mcp-session-id": "abc"}).target == "148e272a6d4689"
    assert cache.lookup("/mcp", {"mcp-session-id": "other"}).target is None
    clock.now += 301
    assert cache.lookup("/mcp", {"mcp-session-id": "abc"}).target is None


def test_longest_prefix_rule_wins_and_cookies_are_keys() -> None:
    rules = (
        SESSION_RULE,
        SessionCacheRule(path_prefix="/app/", ttl_seconds=60, type="cookie", name="sid", allow_bypass=True),
    )
    cache = ReplayCache(rules, clock=Clock())
    # Under /app/ the cookie rule applies, so the header alone does not make a key.
    assert cache.lookup("/app/x", {"mcp-session-id": "abc"}).session_key is None
    lookup = cache.lookup("/app/x", {"cookie": "a=1; sid=s-42"})
    assert lookup.session_key is not None
    assert lookup.session_key.value == "s-42"
    cache.remember_session(lookup.session_key, "148e272a6d4689")
    assert cache.lookup("/app/y", {"cookie": "sid=s-42"}).target == "148e272a6d4689"
    assert cache.lookup("/app/y", {"cookie": "sid=s-42"}, skip_requested=True).bypass
    # Bypass is honoured only where the rule allows it.
    cache.remember_session(cache.lookup("/mcp", {"mcp-session-id": "abc"}).session_key, "0badc0ffee0000")  # type: ignore[arg-type]
    assert cache.lookup("/mcp", {"mcp-session-id": "abc"}, skip_requested=True).target == "0badc0ffee0000"


def test_a_rule_or_pattern_that_names_a_host_applies_to_that_host_only() -> None:
    # Fly: "you can narrow the configuration by specifying a hostname in path_prefix", and a
    # fly-replay-cache pattern's "domain may also be set explicitly".
    narrowed = SessionCacheRule(path_prefix="API.example.com/api", ttl_seconds=60, type="header", name="Authorization")
    cache = ReplayCache((SESSION_RULE, narrowed), clock=Clock())
    headers = {"authorization": "Bearer t", "mcp-session-id": "s"}
    for host in ("api.example.com", "API.Example.com:8443"):  # the host without its port, in any case
        assert cache.lookup("/api/x", {**headers, "host": host}).session_key.scope == narrowed.path_prefix  # type: ignore[union-attr]
    assert cache.lookup("/api/x", {**headers, "host": "other.example"}).session_key.scope == "/"  # type: ignore[union-attr]
    cache.remember_path("example.com/docs/*", 60, "148e272a6d4689")
    cache.remember_path("/docs/", 60, "3d8d9930b23e89")
    assert cache.lookup("/docs/a", {"host": "example.com"}).target == "148e272a6d4689"  # the host's entry first
    assert cache.lookup("/docs/a", {"host": "other.example"}).target == "3d8d9930b23e89"
    for bad in ("example.com", " example.com/x"):  # no path; a host with a space
        with pytest.raises(ValueError, match="is not a path"):
            cache.remember_path(bad, 60, "148e272a6d4689")
    with pytest.raises(ValueError, match="must be a path"):
        SessionCacheRule(path_prefix="api.example.com", ttl_seconds=60, type="header", name="Authorization")


def test_path_rules_and_invalidation() -> None:
    cache = ReplayCache(clock=Clock())
    cache.remember_path("/files/*", 60, "148e272a6d4689")
    cache.remember_path("/files/big/*", 60, "0badc0ffee0000")
    assert cache.lookup("/files/a", {}).target == "148e272a6d4689"
    hit = cache.lookup("/files/big/b", {})
    assert hit.target == "0badc0ffee0000"
    assert hit.hit is not None
    cache.invalidate(hit.hit)
    assert cache.lookup("/files/big/b", {}).target == "148e272a6d4689"
    assert cache.lookup("/other", {}).target is None


def test_expired_entries_leave_the_cache_without_being_looked_up() -> None:
    """An edge that sees many short sessions holds the live ones, not every session it ever cached."""
    clock = Clock()
    cache = ReplayCache((SESSION_RULE,), clock=clock)
    for index in range(5000):
        cache.remember_session(cache.lookup("/mcp", {"mcp-session-id": f"old-{index}"}).session_key, "a" * 14)  # type: ignore[arg-type]
    clock.now += 301  # every old entry expired; none is ever asked for again
    for index in range(5000):
        clock.now += 0.001
        cache.remember_session(cache.lookup("/mcp", {"mcp-session-id": f"new-{index}"}).session_key, "b" * 14)  # type: ignore[arg-type]
    assert len(cache) == 5000
    assert len(cache._entries) == 5000  # held in memory: the old ones were swept as new ones came
    assert cache.lookup("/mcp", {"mcp-session-id": "new-4999"}).target == "b" * 14


def test_path_entries_of_many_lengths_expire_and_the_longest_live_prefix_wins() -> None:
    clock = Clock()
    cache = ReplayCache(clock=clock)
    cache.remember_path("/a/*", 100, "11111111111111")
    cache.remember_path("/a/b/*", 10, "22222222222222")
    cache.remember_path("/a/b/c/*", 100, "33333333333333")
    assert cache.lookup("/a/b/c/d", {}).target == "33333333333333"
    assert cache.lookup("/a/b/x", {}).target == "22222222222222"
    clock.now += 11  # /a/b/ expired: /a/b/x falls back to /a/
    assert cache.lookup("/a/b/x", {}).target == "11111111111111"
    assert cache.lookup("/a", {}).target is None  # shorter than every prefix
    assert len(cache) == 2


@pytest.mark.anyio
async def test_session_cache_through_the_edge(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b], replay_cache=(SESSION_RULE,))
    replay = {f"x-probe-replay-{a.id}": f"instance={b.id}", "mcp-session-id": "s-1"}
    async with httpx.AsyncClient(base_url=edge.url) as client:
        first = await client.get("/mcp", headers={**replay, "fly-force-instance-id": a.id})
        assert first.json()["machine"] == b.id
        assert first.json()["headers"]["fly-replay-cache-status"] == "miss"
        assert "fly-replay-src" in first.json()["headers"]
        for _ in range(5):  # wherever the balancer would send it, the cache sends it to b
            again = await client.get("/mcp", headers=replay)
            assert again.json()["machine"] == b.id
            assert again.json()["headers"]["fly-replay-cache-status"] == "hit"
            assert "fly-replay-src" not in again.json()["headers"]
        status = (await client.get("/_edge/status")).json()
    assert status["replay_cache_hits"] == 5
    assert status["replays"] == 1
    assert len(a.machine.seen) == 1


@pytest.mark.anyio
async def test_replays_with_fallback_or_timeout_are_not_cached(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b], replay_cache=(SESSION_RULE,))
    replay = {f"x-probe-replay-{a.id}": f"instance={b.id};timeout=5s;fallback=force_self", "mcp-session-id": "s-2"}
    async with httpx.AsyncClient(base_url=edge.url) as client:
        for _ in range(3):
            response = await client.get("/mcp", headers={**replay, "fly-force-instance-id": a.id})
            assert response.json()["headers"]["fly-replay-cache-status"] == "miss"
        assert (await client.get("/_edge/status")).json()["replay_cache_hits"] == 0


@pytest.mark.anyio
async def test_path_cache_and_invalidate_through_the_edge(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    async with httpx.AsyncClient(base_url=edge.url) as client:
        headers = {
            "fly-force-instance-id": a.id,
            f"x-probe-replay-{a.id}": f"instance={b.id}",
            f"x-probe-cache-{a.id}": "/docs/*",
            "x-probe-cache-ttl": "30",
        }
        first = await client.get("/docs/one", headers=headers)
        assert first.json()["machine"] == b.id
        assert "fly-replay-cache" not in first.headers  # addressed to the proxy, not the client
        for path in ("/docs/two", "/docs/three"):
            hit = await client.get(path)
            assert hit.json()["machine"] == b.id
            assert hit.json()["headers"]["fly-replay-cache-status"] == "hit"
        assert (await client.get("/elsewhere", headers={"fly-force-instance-id": a.id})).json()["machine"] == a.id
        # The target replays back with invalidate: the entry is gone, the request goes where it says.
        back = {f"x-probe-replay-{b.id}": f"instance={a.id}", f"x-probe-cache-{b.id}": "invalidate"}
        moved = await client.get("/docs/four", headers=back)
        assert moved.json()["machine"] == a.id
        machines = {(await client.get("/docs/five")).json()["machine"] for _ in range(12)}
        assert machines == {a.id, b.id}  # balanced again


@pytest.mark.anyio
async def test_bypass_only_when_allowed(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    rule = SessionCacheRule(path_prefix="/", ttl_seconds=60, type="header", name="x-key", allow_bypass=True)
    edge = make_edge([a, b], replay_cache=(rule,))
    replay = {f"x-probe-replay-{a.id}": f"instance={b.id}", "x-key": "k", "fly-force-instance-id": a.id}
    async with httpx.AsyncClient(base_url=edge.url) as client:
        await client.get("/x", headers=replay)
        skipped = await client.get("/x", headers={**replay, "fly-replay-cache-control": "skip"})
    assert skipped.json()["headers"]["fly-replay-cache-status"] == "bypass"
    assert len(a.machine.seen) == 2  # the skip went through the app again
