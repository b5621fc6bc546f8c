"""Replay caching at the edge against Fly's own documented strings: an oracle the edge did not write.

Each row is a literal from "Dynamic request routing with fly-replay"
(https://fly.io/docs/networking/dynamic-request-routing/, "Replay Caching"), with the meaning the
page gives it. A known difference between the edge and Fly would be marked ``xfail(strict=True)``, so that the
run fails as soon as the edge does what the page says (none is left).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import httpx
import pytest

from fly_replay_router.edge.config import FlyToml

ROUTING = "https://fly.io/docs/networking/dynamic-request-routing/"
HOST = "example.com"

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "pattern",
    [
        # "Set fly-replay-cache: /some/path/*": cache the replay for requests under /some/path/.
        "/some/path/*",
        # "This needs to be a path-matching pattern, and implicitly ends with a wildcard /*".
        "/some/path",
        # "The domain may also be set explicitly: example.com/some/path/*".
        f"{HOST}/some/path/*",
    ],
)
async def test_a_path_pattern_from_fly_docs_sends_later_requests_straight_to_the_target(
    make_probes, make_edge, pattern: str
) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    async with httpx.AsyncClient(base_url=edge.url, headers={"host": HOST}) as client:
        # Machine a replays to b and asks the proxy to cache that for the pattern
        # ("Set fly-replay-cache-ttl-secs: number_of_seconds").
        replay = {
            "fly-force-instance-id": a.id,
            f"x-probe-replay-{a.id}": f"instance={b.id}",
            f"x-probe-cache-{a.id}": pattern,
            "x-probe-cache-ttl": "60",
        }
        assert (await client.get("/some/path/one", headers=replay)).json()["machine"] == b.id
        seen_by_a = len(a.machine.seen)
        for path in ("/some/path/two", "/some/path/three/four"):
            answer = (await client.get(path)).json()
            # "hit: the request did use the replay cache! It never reached the source app or machine".
            assert (answer["machine"], answer["headers"].get("fly-replay-cache-status")) == (b.id, "hit"), ROUTING
        assert len(a.machine.seen) == seen_by_a
        # "The pattern must also match the current request": other paths are balanced as before.
        assert (await client.get("/other", headers={"fly-force-instance-id": a.id})).json()["machine"] == a.id
        # A pattern that names the domain matches only requests for it; one without, any host.
        other_host = (await client.get("/some/path/two", headers={"host": "other.example"})).json()
        hit = other_host["headers"].get("fly-replay-cache-status") == "hit"
        assert hit is (not pattern.startswith(HOST)), other_host


async def test_fly_replay_cache_invalidate_from_the_target_ends_the_cached_replay(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    async with httpx.AsyncClient(base_url=edge.url, headers={"host": HOST}) as client:
        cache = {
            "fly-force-instance-id": a.id,
            f"x-probe-replay-{a.id}": f"instance={b.id}",
            f"x-probe-cache-{a.id}": "/some/path/*",
        }
        await client.get("/some/path/one", headers=cache)
        assert (await client.get("/some/path/two")).json()["headers"].get("fly-replay-cache-status") == "hit"
        # "the replay target may proactively invalidate the cache by: Issuing a fly-replay back to the
        # origin; Setting fly-replay-cache: invalidate".
        back = {f"x-probe-replay-{b.id}": f"instance={a.id}", f"x-probe-cache-{b.id}": "invalidate"}
        assert (await client.get("/some/path/three", headers=back)).json()["machine"] == a.id
        later = [(await client.get("/some/path/four")).json() for _ in range(12)]
    assert all(answer["headers"].get("fly-replay-cache-status") != "hit" for answer in later), ROUTING
    assert {answer["machine"] for answer in later} == {a.id, b.id}  # balanced again


SESSION_RULES = """
[http_service]
  internal_port = 8080
  force_https = true

  [[http_service.http_options.replay_cache]]
    path_prefix = "/"
    ttl_seconds = 300
    type = "cookie"
    name = "session_id"

  [[http_service.http_options.replay_cache]]
    path_prefix = "/api"
    ttl_seconds = 600
    type = "header"
    name = "Authorization"
"""
# The page shows only the path_prefix line of this rule; the other keys are the first rule's.
HOSTNAME_RULE = """
[http_service]
  [[http_service.http_options.replay_cache]]
    path_prefix = "api.example.com/api"
    ttl_seconds = 600
    type = "header"
    name = "Authorization"
"""


def test_fly_docs_session_cache_rules_read_as_the_page_says(tmp_path: Path) -> None:
    # The page's fly.toml: replays under / cached 5 minutes by the session_id cookie, under /api
    # 10 minutes by the Authorization header.
    path = tmp_path / "fly.toml"
    path.write_text(SESSION_RULES)
    rules = {(rule.path_prefix, rule.ttl_seconds, rule.type, rule.name) for rule in FlyToml.load(path).replay_cache}
    assert rules == {("/", 300, "cookie", "session_id"), ("/api", 600, "header", "Authorization")}, ROUTING


def test_fly_docs_session_cache_rule_with_a_hostname_is_accepted(tmp_path: Path) -> None:
    # "you can narrow the configuration by specifying a hostname in path_prefix".
    assert tomllib.loads(HOSTNAME_RULE)  # the snippet itself is valid TOML
    path = tmp_path / "fly.toml"
    path.write_text(HOSTNAME_RULE)
    (rule,) = FlyToml.load(path).replay_cache
    assert rule.path_prefix == "api.example.com/api", ROUTING
