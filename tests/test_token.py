"""The session token codec: round trip, tampering, keys, age, size, app binding."""

from __future__ import annotations

import base64
import re
import string

import pytest

from fly_replay_router.affinity.token import MAX_TOKEN_LENGTH, VERIFIED_TOKENS_KEPT, InvalidToken, TokenCodec

KEY_1 = "first-key-0123456789abcdef"
KEY_2 = "second-key-0123456789abcdef"
OWNER = "148e272a6d4689"
INNER = "7da4e80665bd4c6fb73231d63f0c227f"
NOW = 1_795_000_000.0


def codec(*keys: str, app_name: str = "app-one") -> TokenCodec:
    return TokenCodec(keys or (KEY_1,), app_name=app_name)


def test_round_trip_gives_back_owner_and_inner_id() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    session = codec().verify(token, now=NOW + 5)
    assert (session.owner_machine_id, session.inner_session_id, session.issued_at) == (OWNER, INNER, int(NOW))


def test_token_is_short_url_safe_visible_ascii() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    assert len(token) <= 84
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token)


def spellings(inner: str) -> list[str]:
    """Ways a token could show an inner id: as is, hex, base64 and base32 of every kind."""
    raw = inner.encode()
    encoded = [raw.hex(), inner.upper()]
    for encode in (base64.b64encode, base64.urlsafe_b64encode, base64.b32encode, base64.b16encode):
        encoded.append(encode(raw).decode().rstrip("="))
    if len(inner) == 32:
        packed = bytes.fromhex(inner)
        encoded += [base64.urlsafe_b64encode(packed).decode().rstrip("="), base64.b64encode(packed).decode()[:-2]]
    # Any 12-character stretch of one of them would already leak most of the id.
    return [spelling[start : start + 12] for spelling in {inner, *encoded} for start in range(len(spelling) - 11)]


@pytest.mark.parametrize("inner", [INNER, "session-secret-of-the-server", "x" * 128])
def test_a_token_does_not_show_its_inner_id_in_any_encoding(inner: str) -> None:
    token = codec().issue(OWNER, inner, now=NOW)
    assert not [piece for piece in spellings(inner) if piece in token]
    # The id is not derivable either: the same session sealed twice shares no stretch of the seal.
    again = codec().issue(OWNER, inner, now=NOW)
    sealed, sealed_again = token.rsplit(".", 1)[1], again.rsplit(".", 1)[1]
    assert not any(sealed[start : start + 8] in sealed_again for start in range(len(sealed) - 7))
    assert codec().verify(again, now=NOW).inner_session_id == inner


def test_the_owner_is_readable_and_bound_to_the_seal() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    assert token.split(".")[:2] == [OWNER, "2"]
    moved = "b" * len(OWNER) + token[len(OWNER) :]
    with pytest.raises(InvalidToken, match="bad_signature"):
        codec().verify(moved, now=NOW)


def test_a_token_of_the_signed_only_format_is_refused() -> None:
    readable_v1 = (
        "148e272a6d4689.N2RhNGU4MDY2NWJkNGM2ZmI3MzIzMWQ2M2YwYzIyN2Y.awIoYA.o_lsb25IJNGzr0mevP5LEzeqMtBQ4HjtuWyDZfCkWgg"
    )
    with pytest.raises(InvalidToken, match="malformed_token"):
        codec().verify(readable_v1, now=NOW)


@pytest.mark.parametrize("inner", ["a", "x" * 128, "id.with.dots", "ab+/=?&%", string.punctuation])
def test_any_visible_ascii_inner_id_round_trips(inner: str) -> None:
    token = codec().issue(OWNER, inner, now=NOW)
    assert codec().verify(token, now=NOW).inner_session_id == inner
    assert re.fullmatch(r"[A-Za-z0-9_.-]+", token)
    assert len(token) <= MAX_TOKEN_LENGTH


@pytest.mark.parametrize("inner", ["", "has space", "tab\t", "é", "x" * 129])
def test_inner_ids_outside_mcps_rule_are_refused_at_issue(inner: str) -> None:
    with pytest.raises(ValueError, match="visible ASCII"):
        codec().issue(OWNER, inner, now=NOW)


def test_every_single_character_change_is_rejected() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    alphabet = string.ascii_letters + string.digits + "-_.~!"
    for position in range(len(token)):
        for replacement in alphabet:
            if replacement == token[position]:
                continue
            tampered = token[:position] + replacement + token[position + 1 :]
            with pytest.raises(InvalidToken):
                codec().verify(tampered, now=NOW)


def test_truncated_and_extended_tokens_are_rejected() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    for cut in range(len(token)):
        with pytest.raises(InvalidToken):
            codec().verify(token[:cut], now=NOW)
    for suffix in ("A", ".", "=", "==", " "):
        with pytest.raises(InvalidToken):
            codec().verify(token + suffix, now=NOW)


def test_token_sealed_with_unknown_key_is_rejected() -> None:
    token = codec(KEY_2).issue(OWNER, INNER, now=NOW)
    with pytest.raises(InvalidToken, match="bad_signature"):
        codec(KEY_1).verify(token, now=NOW)


def test_token_of_another_app_is_rejected_even_with_the_same_secret() -> None:
    token = codec(app_name="app-two").issue(OWNER, INNER, now=NOW)
    with pytest.raises(InvalidToken, match="bad_signature"):
        codec(app_name="app-one").verify(token, now=NOW)


def test_key_rotation_first_key_signs_every_key_verifies() -> None:
    old = codec(KEY_1).issue(OWNER, INNER, now=NOW)
    rotated = codec(KEY_2, KEY_1)
    assert rotated.verify(old, now=NOW).inner_session_id == INNER
    new = rotated.issue(OWNER, INNER, now=NOW)
    assert codec(KEY_2).verify(new, now=NOW).inner_session_id == INNER
    with pytest.raises(InvalidToken):
        codec(KEY_1).verify(new, now=NOW)
    with pytest.raises(InvalidToken):
        codec(KEY_2).verify(old, now=NOW)


def test_max_age() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    assert codec().verify(token, now=NOW + 3600, max_age=3600).owner_machine_id == OWNER
    with pytest.raises(InvalidToken, match="token_expired"):
        codec().verify(token, now=NOW + 3602, max_age=3600)
    assert codec().verify(token, now=NOW + 10**7).owner_machine_id == OWNER


def test_small_clock_skew_is_tolerated_a_token_from_the_future_is_not() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    assert codec().verify(token, now=NOW - 30, max_age=60).owner_machine_id == OWNER
    with pytest.raises(InvalidToken, match="token_from_future"):
        codec().verify(token, now=NOW - 3600)


@pytest.mark.parametrize(
    "garbage",
    ["", ".", "...", "a.b.c.d", "x" * (MAX_TOKEN_LENGTH + 1), "\x00\x01", "é" * 10, OWNER, INNER, "None"],
)
def test_garbage_is_rejected_without_other_exceptions(garbage: str) -> None:
    with pytest.raises(InvalidToken):
        codec().verify(garbage, now=NOW)


def test_over_long_token_is_rejected_before_any_signature_work() -> None:
    token = codec().issue(OWNER, INNER, now=NOW)
    with pytest.raises(InvalidToken, match="token_too_long"):
        codec().verify(token + "A" * MAX_TOKEN_LENGTH, now=NOW)


def test_codec_needs_a_key() -> None:
    with pytest.raises(ValueError, match="at least one secret key"):
        TokenCodec((), app_name="x")


def test_a_remembered_token_is_still_checked_for_age() -> None:
    remembering = codec()
    token = remembering.issue(OWNER, INNER, now=NOW)
    assert remembering.verify(token, now=NOW, max_age=3600).inner_session_id == INNER
    with pytest.raises(InvalidToken, match="token_expired"):
        remembering.verify(token, now=NOW + 3602, max_age=3600)
    with pytest.raises(InvalidToken, match="token_from_future"):
        remembering.verify(token, now=NOW - 3600)


def test_remembering_a_token_does_not_let_its_near_copies_through() -> None:
    remembering = codec()
    token = remembering.issue(OWNER, INNER, now=NOW)
    remembering.verify(token, now=NOW)
    for position in range(len(token)):
        replacement = "A" if token[position] != "A" else "B"
        with pytest.raises(InvalidToken):
            remembering.verify(token[:position] + replacement + token[position + 1 :], now=NOW)


def test_memory_for_verified_tokens_is_bounded_and_failures_are_never_kept() -> None:
    remembering = codec()
    for _ in range(100):
        with pytest.raises(InvalidToken):
            remembering.verify("148e272a6d4689.2." + "A" * 70, now=NOW)
    assert len(remembering._verified) == 0
    tokens = [remembering.issue(OWNER, f"session-{n}", now=NOW) for n in range(VERIFIED_TOKENS_KEPT + 50)]
    for token in tokens:
        remembering.verify(token, now=NOW)
    assert len(remembering._verified) == VERIFIED_TOKENS_KEPT
    assert remembering.verify(tokens[0], now=NOW).inner_session_id == "session-0"  # checked again, not lost
