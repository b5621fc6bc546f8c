"""fly-replay as the edge follows it: every field of the header and JSON forms, limits, errors."""

from __future__ import annotations

import json

import httpx
import pytest

from fly_replay_router import fly
from tests.edge.edge_probe import dead_url

pytestmark = pytest.mark.anyio


async def get(url: str, headers: dict[str, str], path: str = "/echo", **kwargs: object) -> httpx.Response:
    async with httpx.AsyncClient(timeout=30) as client:
        return await client.request(str(kwargs.pop("method", "GET")), url + path, headers=headers, **kwargs)  # type: ignore[arg-type]


async def test_replayed_request_is_the_original_plus_replay_src(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    body = b'{"jsonrpc":"2.0","id":1}' * 10
    headers = {"x-probe-replay-" + a.id: f"instance={b.id}", "fly-force-instance-id": a.id, "x-custom": "kept"}
    response = await get(edge.url, headers, "/some/path", method="POST", params={"q": "1 2"}, content=body)
    assert response.status_code == 200
    assert response.json()["machine"] == b.id  # the replay answer (307) never reached the client
    first, replayed = a.machine.seen[-1], b.machine.seen[-1]
    assert (replayed["method"], replayed["path"], replayed["query"], replayed["body"]) == (
        "POST",
        "/some/path",
        "q=1+2",
        body,
    )
    assert replayed["headers"]["x-custom"] == "kept"
    source = fly.parse_replay_src(replayed["headers"]["fly-replay-src"])
    assert source.instance == a.id
    assert source.region == "lcl"
    assert source.t is not None
    assert "fly-replay-src" not in first["headers"]
    status = (await get(edge.url, {}, "/_edge/status")).json()
    assert status["replays"] == 1


async def test_state_is_echoed_in_replay_src(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    headers = {f"x-probe-replay-{a.id}": f"instance={b.id};state=step-2", "fly-force-instance-id": a.id}
    response = await get(edge.url, headers)
    assert fly.parse_replay_src(response.json()["headers"]["fly-replay-src"]).state == "step-2"


async def test_prefer_instance_falls_to_another_machine_with_unavailable_header(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge({a.id: a.url, b.id: b.url, "0badc0ffee0000": dead_url()})
    headers = {f"x-probe-replay-{a.id}": "prefer_instance=0badc0ffee0000", "fly-force-instance-id": a.id}
    response = await get(edge.url, headers)
    assert response.status_code == 200
    assert response.json()["headers"]["fly-preferred-instance-unavailable"] == "0badc0ffee0000"
    # ... and a preferred machine that is up gets the request without that header.
    headers = {f"x-probe-replay-{a.id}": f"prefer_instance={b.id}", "fly-force-instance-id": a.id}
    response = await get(edge.url, headers)
    assert response.json()["machine"] == b.id
    assert "fly-preferred-instance-unavailable" not in response.json()["headers"]


@pytest.mark.parametrize("region", ["lcl", "local", '"sjc,lcl"', '"sjc,any"', "any"])
async def test_region_local_and_any_are_served(make_probes, make_edge, region: str) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    headers = {f"x-probe-replay-{a.id}": f"region={region}", "fly-force-instance-id": a.id}
    # A region replay may land on the replaying machine again, which replays again: elsewhere avoids it.
    headers[f"x-probe-replay-{a.id}"] += ";elsewhere=true"
    response = await get(edge.url, headers)
    assert response.status_code == 200
    assert response.json()["machine"] == b.id


async def test_region_without_machines_is_an_error(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    response = await get(edge.url, {f"x-probe-replay-{a.id}": "region=sjc", "fly-force-instance-id": a.id})
    assert response.status_code == 502
    assert "region" in response.text


async def test_elsewhere_never_returns_to_the_replaying_machine(make_probes, make_edge) -> None:
    a, b, c = make_probes(3)
    edge = make_edge([a, b, c])
    for _ in range(10):
        response = await get(edge.url, {f"x-probe-replay-{a.id}": "elsewhere=true", "fly-force-instance-id": a.id})
        assert response.json()["machine"] in (b.id, c.id)


async def test_app_field_own_app_is_followed_and_unknown_app_is_an_error(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b], app_name="my-app")
    ok = await get(edge.url, {f"x-probe-replay-{a.id}": "app=my-app;elsewhere=true", "fly-force-instance-id": a.id})
    assert ok.json()["machine"] == b.id
    bad = await get(edge.url, {f"x-probe-replay-{a.id}": "app=other-app", "fly-force-instance-id": a.id})
    assert bad.status_code == 502
    assert "other-app" in bad.text


async def test_unreachable_instance_without_fallback_is_a_502(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge({a.id: a.url, "0badc0ffee0000": dead_url()})
    response = await get(
        edge.url, {f"x-probe-replay-{a.id}": "instance=0badc0ffee0000;timeout=300ms", "fly-force-instance-id": a.id}
    )
    assert response.status_code == 502
    assert "0badc0ffee0000" in response.text


async def test_force_self_fallback_brings_the_request_back_with_replay_failed(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge({a.id: a.url, b.id: b.url, "0badc0ffee0000": dead_url()})
    instruction = "instance=0badc0ffee0000;timeout=300ms;fallback=force_self"
    response = await get(edge.url, {f"x-probe-replay-{a.id}": instruction, "fly-force-instance-id": a.id})
    assert response.status_code == 200
    assert response.json()["machine"] == a.id
    failed = fly.parse_replay_failed(response.json()["headers"]["fly-replay-failed"])
    assert failed.instance == "0badc0ffee0000"
    assert failed.replay_source == a.id
    assert failed.reason == "timeout"
    assert failed.elapsed_ms is not None
    assert failed.elapsed_ms >= 300
    assert (await get(edge.url, {}, "/_edge/status")).json()["fallbacks"] == 1


async def test_prefer_self_fallback_goes_to_the_replayer_or_any_machine(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge({a.id: a.url, b.id: b.url})
    instruction = "instance=0badc0ffee0000;fallback=prefer_self"  # no such machine: no candidate
    response = await get(edge.url, {f"x-probe-replay-{a.id}": instruction, "fly-force-instance-id": a.id})
    assert response.json()["machine"] == a.id
    assert fly.parse_replay_failed(response.json()["headers"]["fly-replay-failed"]).reason == "no_candidate"


async def test_a_fallback_request_is_never_replayed_again(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge({a.id: a.url, "0badc0ffee0000": dead_url()})
    headers = {
        f"x-probe-replay-{a.id}": "instance=0badc0ffee0000;timeout=200ms;fallback=force_self",
        "x-probe-replay-on-fallback": "1",
        "fly-force-instance-id": a.id,
    }
    response = await get(edge.url, headers)
    assert response.status_code == 502
    assert len(a.machine.seen) == 2  # the first request and the fallback, nothing after


async def test_an_error_response_from_the_target_is_not_a_failure(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    headers = {
        f"x-probe-replay-{a.id}": f"instance={b.id};fallback=force_self",
        f"x-probe-status-{b.id}": "503",
        "fly-force-instance-id": a.id,
    }
    response = await get(edge.url, headers)
    assert response.status_code == 503
    assert response.json()["machine"] == b.id
    assert "fly-replay-failed" not in response.json()["headers"]


async def test_json_form_with_transform(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    document = {
        "instance": b.id,
        "state": "s1",
        "transform": {
            "path": "/rewritten",
            "set_headers": [{"name": "x-added", "value": "yes"}],
            "delete_headers": ["x-secret"],
        },
    }
    headers = {f"x-probe-json-{a.id}": json.dumps(document), "fly-force-instance-id": a.id, "x-secret": "s"}
    response = await get(edge.url, headers, "/original?keep=1")
    assert response.status_code == 200
    echo = response.json()
    assert (echo["machine"], echo["path"], echo["query"]) == (b.id, "/rewritten", "keep=1")
    assert echo["headers"]["x-added"] == "yes"
    assert "x-secret" not in echo["headers"]
    assert fly.parse_replay_src(echo["headers"]["fly-replay-src"]).state == "s1"


@pytest.mark.parametrize(
    "value", ["instance=NOT-AN-ID", "nonsense=1", "fallback=maybe;instance=148e272a6d4689", "timeout=5;elsewhere=true"]
)
async def test_invalid_instruction_is_pa03(make_probes, make_edge, value: str) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    response = await get(edge.url, {f"x-probe-replay-{a.id}": value})
    assert response.status_code == 502
    assert response.text.startswith("PA03")
    assert (await get(edge.url, {}, "/_edge/status")).json()["errors"]["PA03"] == 1


async def test_invalid_json_instruction_is_pa03(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a])
    response = await get(edge.url, {f"x-probe-json-{a.id}": "{not json"})
    assert response.status_code == 502
    assert response.text.startswith("PA03")


async def test_eleventh_replay_is_pa02(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    headers = {
        f"x-probe-replay-{a.id}": f"instance={b.id}",
        f"x-probe-replay-{b.id}": f"instance={a.id}",
        "fly-force-instance-id": a.id,
    }
    response = await get(edge.url, headers)
    assert response.status_code == 502
    assert response.text.startswith("PA02")
    assert len(a.machine.seen) + len(b.machine.seen) == 11  # the first request and ten replays


async def test_body_over_one_mib_cannot_be_replayed_pa01(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    headers = {f"x-probe-replay-{a.id}": f"instance={b.id}", "fly-force-instance-id": a.id}
    big = b"x" * (1024 * 1024 + 1)
    response = await get(edge.url, headers, method="POST", content=big)
    assert response.status_code == 502
    assert response.text.startswith("PA01")
    # Exactly 1 MiB is still replayed.
    response = await get(edge.url, headers, method="POST", content=big[:-1])
    assert response.json()["machine"] == b.id
    assert response.json()["body_len"] == 1024 * 1024


async def test_chunked_body_cannot_be_replayed_pa01(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])

    async def chunks():
        yield b"small"

    headers = {f"x-probe-replay-{a.id}": f"instance={b.id}", "fly-force-instance-id": a.id}
    response = await get(edge.url, headers, method="POST", content=chunks())
    assert response.status_code == 502
    assert response.text.startswith("PA01")
    # Without a replay, the same chunked body goes through.
    response = await get(edge.url, {"fly-force-instance-id": b.id}, method="POST", content=chunks())
    assert response.json()["body_len"] == 5


async def test_json_cache_directive_sets_a_path_rule(make_probes, make_edge) -> None:
    a, b = make_probes(2)
    edge = make_edge([a, b])
    document = {"instance": b.id, "cache": {"prefix": "/j/", "ttl": 30}}
    await get(edge.url, {f"x-probe-json-{a.id}": json.dumps(document), "fly-force-instance-id": a.id}, "/j/1")
    for _ in range(5):
        response = await get(edge.url, {}, "/j/2")
        assert response.json()["machine"] == b.id
        assert response.json()["headers"]["fly-replay-cache-status"] == "hit"


async def test_a_machine_that_does_not_answer_in_time_is_a_504(make_probes, make_edge) -> None:
    (a,) = make_probes(1)
    edge = make_edge([a], idle_timeout=0.3)
    response = await get(edge.url, {}, "/slow", params={"seconds": "1"})
    assert response.status_code == 504
    assert response.text.startswith("upstream_timeout")
