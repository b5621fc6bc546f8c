"""The doctor's verdicts on answers no local fleet gives: a proxy that drops credentials on replays, Fly's
replay cache, a layer without the served-by header. The verdicts are pure functions of the answers."""

from __future__ import annotations

import httpx
import pytest

from fly_replay_router.doctor.refusals import foreign, forged
from fly_replay_router.doctor.replays import judge_headers, judge_replays, replay_cache_state
from fly_replay_router.doctor.served_by import ServedBy
from fly_replay_router.doctor.sticking import SessionRun, judge_sticking
from fly_replay_router.doctor.wire import Exchange

OWNER = "aaaaaaaaaaaaaa"
TOKEN = f"{OWNER}.2.{'A' * 60}"


def answer(status: int, via: str | None, machine: str = OWNER, seconds: float = 0.01) -> Exchange:
    headers = httpx.Headers()
    if via is not None:
        headers["affinity-served-by"] = f"machine={machine};worker=0a1b2c3d;via={via}"
    return Exchange("ping", status=status, seconds=seconds, headers=headers)


def session(*requests: Exchange) -> SessionRun:
    opening = answer(200, "direct")
    opening.headers["mcp-session-id"] = TOKEN
    return SessionRun(opening, list(requests))


def test_served_by_reads_the_layers_header_and_refuses_what_it_does_not_know() -> None:
    replayed = ServedBy.parse("machine=aaaaaaaaaaaaaa;worker=0a1b2c3d;via=replay")
    assert replayed == ServedBy("aaaaaaaaaaaaaa", "0a1b2c3d", ("replay",))
    assert replayed.via == "replay"
    direct = ServedBy.parse("via=direct ; worker=01234567 ;machine=b1")
    assert direct == ServedBy("b1", "01234567", ())
    assert direct.via == "direct"
    # Hops in the order they happened: a replay that a sibling worker then served is still a replay.
    both = ServedBy.parse("machine=b1;worker=01234567;via=replay+handover")
    assert both is not None
    assert both.via == "replay"
    assert both.hops == ("replay", "handover")
    handed = ServedBy.parse("machine=b1;worker=01234567;via=handover")
    assert handed is not None
    assert handed.via == "direct"
    assert ServedBy.parse("machine=aaaaaaaaaaaaaa;via=teleport") is None
    assert ServedBy.parse("machine=aaaaaaaaaaaaaa;via=replay+teleport") is None
    assert ServedBy.parse("worker=0a1b2c3d;via=direct") is None
    assert ServedBy.parse(None) is None


def test_credentials_refused_only_on_replayed_requests_mean_the_proxy_dropped_them() -> None:
    runs = [session(answer(200, "direct"), answer(401, None), answer(200, "direct"), answer(401, None))]
    for run in runs:  # the 401s came from the owner, which saw no Authorization on the replay
        for exchange in run.requests:
            if exchange.status == 401:
                exchange.headers["affinity-served-by"] = f"machine={OWNER};worker=0a1b2c3d;via=replay"
    verdict = judge_headers(runs, ["Authorization"])
    assert verdict.outcome == "fail"
    assert "dropped Authorization on the replay" in verdict.cause
    assert verdict.fix == "deploy.md#headers-on-a-replay"
    # The same answers with no replay among them say nothing about replays.
    direct_only = [session(answer(200, "direct"), answer(401, "direct"))]
    assert judge_headers(direct_only, ["Authorization"]).outcome == "unknown"
    assert judge_headers(runs, []).outcome == "unknown"


def test_a_replay_followed_only_by_direct_answers_is_the_replay_cache() -> None:
    cached = [session(answer(200, "replay"), *[answer(200, "direct") for _ in range(4)])]
    assert replay_cache_state(cached) == ("in use", 4, 0)
    uncached = [session(answer(200, "replay"), answer(200, "direct"), answer(200, "replay"), answer(200, "direct"))]
    assert replay_cache_state(uncached) == ("not in use", 3, 1)
    assert replay_cache_state([session(answer(200, "replay"), answer(200, "direct"))])[0] == "unknown"


def test_replay_latency_is_the_median_of_replayed_against_direct() -> None:
    runs = [
        session(
            answer(200, "direct", seconds=0.010),
            answer(200, "replay", seconds=0.050),
            answer(200, "direct", seconds=0.012),
            answer(200, "replay", seconds=0.070),
            answer(200, "replay", seconds=0.060),
        )
    ]
    verdict = judge_replays(runs)
    assert verdict.outcome == "pass"
    assert verdict.evidence["median_ms_direct"] == 11.0
    assert verdict.evidence["median_ms_replayed"] == 60.0
    assert "median 60.0 ms replayed, 11.0 ms direct" in verdict.summary


def test_answers_without_the_served_by_header_leave_stickiness_unknown_not_passed() -> None:
    opening = Exchange("initialize", status=200, headers=httpx.Headers({"mcp-session-id": TOKEN}))
    run = SessionRun(opening, [Exchange("ping", status=200)])
    assert judge_sticking([run]).outcome == "unknown"


def test_an_answer_from_another_machine_is_a_failure_even_when_it_is_200() -> None:
    verdict = judge_sticking([session(answer(200, "direct"), answer(200, "direct", machine="bbbbbbbbbbbbbb"))])
    assert verdict.outcome == "fail"
    assert verdict.evidence["answered_by_owner"] == 1


@pytest.mark.parametrize("position", range(5))
def test_forged_and_foreign_tokens_differ_from_the_real_one(position: int) -> None:
    token = f"{OWNER}.2.{'abcdefghij-_' * 6}{position}"
    assert forged(token) != token
    assert len(forged(token)) == len(token)
    assert foreign(token).split(".", 1)[1] == token.split(".", 1)[1]
    assert foreign(token).split(".", 1)[0] != OWNER


def test_a_stream_is_judged_on_its_encoding_first_then_on_its_keep_alive() -> None:
    from fly_replay_router.doctor.streams import judge_event_streams

    stream_answer = Exchange("initialize", status=200, headers=httpx.Headers({"content-type": "text/event-stream"}))
    silent = {"status": 200, "headers_s": 0.02, "content_encoding": "none", "first_bytes_s": None}
    assert judge_event_streams([stream_answer], silent, wait=2).outcome == "unknown"  # waited too little to say
    verdict = judge_event_streams([stream_answer], silent, wait=35)
    assert verdict.outcome == "fail"
    assert "idle_timeout" in verdict.cause
    brotli = Exchange(
        "ping", status=200, headers=httpx.Headers({"content-type": "text/event-stream", "content-encoding": "br"})
    )
    kept_alive = {**silent, "first_bytes_s": 15.0}
    assert judge_event_streams([stream_answer], kept_alive, wait=35).outcome == "pass"
    verdict = judge_event_streams([stream_answer, brotli], kept_alive, wait=35)
    assert verdict.outcome == "fail"
    assert "Content-Encoding: br" in verdict.summary
