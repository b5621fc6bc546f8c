"""The routing decision, branch by branch, with no server."""

from __future__ import annotations

import pytest

from app.affinity.decision import Arrival, Reject, Replay, Serve, decide
from app.affinity.token import TokenCodec

HERE = "aaaaaaaaaaaaaa"
OTHER = "bbbbbbbbbbbbbb"
INNER = "7da4e80665bd4c6fb73231d63f0c227f"
NOW = 1_795_000_000.0
CODEC = TokenCodec(("decision-test-key-0123456789",), app_name="app-one")


def token_owned_by(owner: str) -> str:
    return CODEC.issue(owner, INNER, now=NOW)


def test_owner_here_is_served_with_the_inner_id() -> None:
    assert decide(token_owned_by(HERE), machine_id=HERE, codec=CODEC, now=NOW) == Serve(INNER)


def test_owner_elsewhere_is_replayed_to_the_owner() -> None:
    assert decide(token_owned_by(OTHER), machine_id=HERE, codec=CODEC, now=NOW) == Replay(OTHER)


@pytest.mark.parametrize(
    ("arrival", "reason"),
    [
        (Arrival(replay_failed=True), "fly-replay-failed"),
        (Arrival(preferred_unavailable=True), "fly-preferred-instance-unavailable"),
        (Arrival(replayed_from=OTHER), "already replayed"),
        (Arrival(replayed_from=""), "already replayed"),
        (Arrival(replayed_from=HERE, replay_failed=True), "fly-replay-failed"),
    ],
)
def test_owner_elsewhere_after_fly_already_tried_is_rejected_never_replayed_again(
    arrival: Arrival, reason: str
) -> None:
    decision = decide(token_owned_by(OTHER), machine_id=HERE, codec=CODEC, now=NOW, arrival=arrival)
    assert isinstance(decision, Reject)
    assert reason in decision.reason
    assert decision.owner_machine_id == OTHER


@pytest.mark.parametrize(
    "arrival",
    [Arrival(replay_failed=True), Arrival(preferred_unavailable=True), Arrival(replayed_from=OTHER)],
)
def test_owner_here_is_served_however_the_request_arrived(arrival: Arrival) -> None:
    assert decide(token_owned_by(HERE), machine_id=HERE, codec=CODEC, now=NOW, arrival=arrival) == Serve(INNER)


def test_expired_token_is_rejected_even_for_this_machine() -> None:
    decision = decide(token_owned_by(HERE), machine_id=HERE, codec=CODEC, now=NOW + 120, max_age=60)
    assert decision == Reject("token expired")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "malformed"),
        (INNER, "malformed"),
        ("x" * 300, "too long"),
        (TokenCodec(("another-key-0123456789abcdef",), app_name="app-one").issue(OTHER, INNER, now=NOW), "signature"),
        (TokenCodec(("decision-test-key-0123456789",), app_name="app-two").issue(OTHER, INNER, now=NOW), "signature"),
    ],
)
def test_tokens_that_prove_nothing_are_rejected_never_replayed(token: str, reason: str) -> None:
    decision = decide(token, machine_id=HERE, codec=CODEC, now=NOW)
    assert isinstance(decision, Reject)
    assert reason in decision.reason
    assert decision.owner_machine_id is None
