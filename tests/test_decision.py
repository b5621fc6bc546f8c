"""The routing decision, branch by branch, with no server."""

from __future__ import annotations

import pytest

from fly_replay_router.affinity.decision import Arrival, Forward, Reject, Replay, Serve, decide
from fly_replay_router.affinity.token import TokenCodec

HERE = "aaaaaaaaaaaaaa"
OTHER = "bbbbbbbbbbbbbb"
INNER = "7da4e80665bd4c6fb73231d63f0c227f"
NOW = 1_795_000_000.0
KEY = "decision-test-key-0123456789"
CODEC = TokenCodec((KEY,), app_name="app-one")


def token_owned_by(owner: str) -> str:
    return CODEC.issue(owner, INNER, now=NOW)


def test_owner_here_is_served_with_the_inner_id() -> None:
    assert decide(token_owned_by(HERE), machine_id=HERE, codec=CODEC, now=NOW) == Serve(INNER)


def test_owner_elsewhere_is_replayed_to_the_owner() -> None:
    assert decide(token_owned_by(OTHER), machine_id=HERE, codec=CODEC, now=NOW) == Replay(OTHER)


def test_owner_elsewhere_with_a_body_fly_cannot_replay_is_forwarded() -> None:
    arrival = Arrival(body_replayable=False)
    assert decide(token_owned_by(OTHER), machine_id=HERE, codec=CODEC, now=NOW, arrival=arrival) == Forward(OTHER)


@pytest.mark.parametrize(
    ("arrival", "reason"),
    [
        (Arrival(replay_failed=True), "owner_unreachable"),
        (Arrival(preferred_unavailable=True), "owner_unavailable"),
        (Arrival(replayed_from=OTHER), "already_replayed"),
        (Arrival(replayed_from=""), "already_replayed"),
        (Arrival(replayed_from=HERE, replay_failed=True), "owner_unreachable"),
        (Arrival(forwarded_from=OTHER), "already_forwarded"),
        (Arrival(forwarded_from=OTHER, body_replayable=False), "already_forwarded"),
    ],
)
def test_owner_elsewhere_after_fly_already_tried_is_rejected_never_replayed_again(
    arrival: Arrival, reason: str
) -> None:
    decision = decide(token_owned_by(OTHER), machine_id=HERE, codec=CODEC, now=NOW, arrival=arrival)
    assert isinstance(decision, Reject)
    assert decision.reason == reason
    assert decision.owner_machine_id == OTHER


@pytest.mark.parametrize(
    "arrival",
    [
        Arrival(replay_failed=True),
        Arrival(preferred_unavailable=True),
        Arrival(replayed_from=OTHER),
        Arrival(forwarded_from=OTHER),
        Arrival(body_replayable=False),
    ],
)
def test_owner_here_is_served_however_the_request_arrived(arrival: Arrival) -> None:
    assert decide(token_owned_by(HERE), machine_id=HERE, codec=CODEC, now=NOW, arrival=arrival) == Serve(INNER)


def test_expired_token_is_rejected_even_for_this_machine() -> None:
    decision = decide(token_owned_by(HERE), machine_id=HERE, codec=CODEC, now=NOW + 120, max_age=60)
    assert decision == Reject("token_expired")


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "malformed_token"),
        (INNER, "malformed_token"),
        ("x" * 300, "token_too_long"),
        (
            TokenCodec(("another-key-0123456789abcdef",), app_name="app-one").issue(OTHER, INNER, now=NOW),
            "bad_signature",
        ),
        (
            TokenCodec(("decision-test-key-0123456789",), app_name="app-two").issue(OTHER, INNER, now=NOW),
            "bad_signature",
        ),
    ],
    ids=["empty", "inner-id", "too-long", "other-key", "other-app"],  # tokens differ per run (nonce)
)
def test_tokens_that_prove_nothing_are_rejected_never_replayed(token: str, reason: str) -> None:
    decision = decide(token, machine_id=HERE, codec=CODEC, now=NOW)
    assert decision == Reject(reason)
