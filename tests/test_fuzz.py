"""Fuzzing (hypothesis): the token codec, the routing decision, every Fly header parser, the ASGI layer.

Properties, each over ``FUZZ_EXAMPLES`` generated inputs (default 10,000; the documented longer
run is ``FUZZ_EXAMPLES=100000 .venv/bin/pytest tests/test_fuzz.py``); the ASGI test runs a tenth:

- no exception escapes but the one each function documents (``InvalidToken``, ``InvalidReplay``);
- a token verifies only if this key ring issued exactly it, and then proves what was signed;
- a replay or forward target only ever comes from a token signed with the right key for the right app;
- a valid ``fly-replay`` instruction, built on purpose and spelled as an app may spell it (header and
  JSON forms, any field order, quotes, spaces, duration units), parses to exactly that instruction;
  anything else parses or raises ``InvalidReplay``, and what parses survives ``to_header()`` and a
  second parse unchanged; each test asserts how many instructions it really checked;
- the layer answers only 404, 307 to a proven owner, or the inner app's own answer (a request that is
  this machine's, or that names no session). Half its cases are built to reach one outcome (served,
  replayed, forwarded, rejected, passed) and must reach it; each outcome has a floor.
  ``tests/test_carriers.py`` holds the differential test of session carriers against the parsing of
  the server behind the layer.

Hypothesis draws one 64-bit seed per example and ``Inputs`` builds the structured input from it
(a few microseconds, against milliseconds for composite strategies: 10,000 examples per test fit the
default run). A failure prints the seed and the generated input (``note``). Every test counts the
examples it ran and asserts the count, so a setting that silently runs fewer cannot pass.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import os
import random
import string
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import quote_from_bytes

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS

import fly_replay_router.affinity.middleware as middleware_module
from fly_replay_router.affinity.decision import Arrival, Forward, Reject, Replay, Serve, decide
from fly_replay_router.affinity.forward import FORWARDED_FROM, UNREACHABLE, ForwardOutcome
from fly_replay_router.affinity.middleware import AffinityMiddleware
from fly_replay_router.affinity.token import CLOCK_SKEW_SECONDS, InvalidToken, SessionToken, TokenCodec
from fly_replay_router.fly import (
    InvalidReplay,
    ReplayCacheDirective,
    ReplayFailure,
    ReplayInstruction,
    ReplaySource,
    ReplayTransform,
    parse_replay_failed,
    parse_replay_header,
    parse_replay_json,
    parse_replay_src,
)
from fly_replay_router.settings import AffinitySettings

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "10000"))
ASGI_EXAMPLES = max(EXAMPLES // 10, 100)

APP = "fuzz-app"
KEY_NEW = "fuzz-key-new-0123456789abcdef"
KEY_OLD = "fuzz-key-old-0123456789abcdef"
THIS_MACHINE = "aaaaaaaaaaaaaa"
OTHER_MACHINES = ("bbbbbbbbbbbbbb", "148e272a6d4689", "z")
NOW = 1_795_000_000.0

RING = TokenCodec((KEY_NEW, KEY_OLD), app_name=APP)
OLD_KEY_ONLY = TokenCodec((KEY_OLD,), app_name=APP)
WRONG_KEY = TokenCodec(("fuzz-key-wrong-0123456789abcdef",), app_name=APP)
OTHER_APP = TokenCodec((KEY_NEW, KEY_OLD), app_name="fuzz-app-2")
SIGNERS = (RING, OLD_KEY_ONLY, WRONG_KEY, OTHER_APP)

BASE64URL = string.ascii_letters + string.digits + "-_"
MACHINE_CHARS = string.digits + string.ascii_lowercase
VISIBLE_ASCII = "".join(chr(code) for code in range(0x21, 0x7F))
# Characters that trip parsers: separators, quotes, controls, non-ASCII digits ("²".isdigit() is
# True), spaces Python strips, a byte-order mark, astral characters.
TRICKY = ";,=\"'= \t\r\n\x00\x0b\x7f\x85\xa0²٣é\xffĀ\u200b\u2028\ufeff\uffff😀\U0010ffff"
UNICODE = "".join(chr(code) for code in range(128)) + TRICKY
# What a mutation may put into a token: its alphabet, its separator, base64's other spellings, junk.
MUTATION_CHARS = BASE64URL + ".=+/%~" + TRICKY

T = TypeVar("T")


class Inputs:
    """Structured random inputs from one seed, biased towards short values and boundaries."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)

    def below(self, n: int) -> int:
        return self._random.randrange(n) if n > 1 else 0

    def flag(self, chance: float = 0.5) -> bool:
        return self._random.random() < chance

    def pick(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def size(self, max_size: int, min_size: int = 0) -> int:
        roll = self._random.random()
        if roll < 0.1:
            return min_size
        if roll < 0.2:
            return max_size
        if roll < 0.7:
            return min(max_size, min_size + self.below(9))
        return min_size + self.below(max_size - min_size + 1)

    def text(self, alphabet: str, max_size: int, min_size: int = 0) -> str:
        return "".join(self._random.choices(alphabet, k=self.size(max_size, min_size)))

    def bytes(self, max_size: int, min_size: int = 0) -> bytes:
        return self._random.randbytes(self.size(max_size, min_size))

    def shuffle(self, items: list[Any]) -> None:
        self._random.shuffle(items)

    def integer(self, low: int, high: int) -> int:
        return self.pick((low, high)) if self.flag(0.1) else self._random.randint(low, high)

    def real(self, low: float, high: float) -> float:
        return self.pick((low, high)) if self.flag(0.1) else self._random.uniform(low, high)


def run_fuzz(build: Callable[[Inputs], T], check: Callable[[T], None], examples: int = EXAMPLES) -> int:
    """Run ``check`` over ``examples`` inputs made by ``build``; the number of inputs it checked."""
    checked = 0

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(st.integers(min_value=0, max_value=2**64 - 1))
    def run(seed: int) -> None:
        nonlocal checked
        value = build(Inputs(seed))
        note(f"input: {value!r}")
        checked += 1
        check(value)

    run()
    return checked


# --- tokens -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Minted:
    """A candidate token and what the right key ring proves with it (``None``: nothing)."""

    token: str
    proves: SessionToken | None


def machine_id(inputs: Inputs) -> str:
    if inputs.flag():
        return inputs.pick((THIS_MACHINE, *OTHER_MACHINES))
    return inputs.text(MACHINE_CHARS, 32, min_size=1)


def signed_token(inputs: Inputs) -> Minted:
    """A token signed by some codec: the ring's signing key, its older key, a wrong key, another app."""
    owner = machine_id(inputs)
    inner = uuid.UUID(int=inputs.below(2**128)).hex if inputs.flag() else inputs.text(VISIBLE_ASCII, 128, min_size=1)
    # From eleven days before NOW to five minutes after it (beyond the clock skew allowance).
    issued = inputs.integer(int(NOW) - 1_000_000, int(NOW) + 300)
    signer = inputs.pick(SIGNERS)
    token = signer.issue(owner, inner, now=issued)
    proven = signer is RING or signer is OLD_KEY_ONLY
    return Minted(token, SessionToken(owner, inner, issued) if proven else None)


def mutated_token(inputs: Inputs) -> Minted:
    original = signed_token(inputs)
    token = original.token
    for _ in range(1 + inputs.below(3)):
        index = inputs.below(len(token) + 1)
        kind = inputs.pick(("insert", "delete", "replace"))
        char = inputs.pick(MUTATION_CHARS)
        if kind == "insert":
            token = token[:index] + char + token[index:]
        elif kind == "delete":
            token = token[:index] + token[index + 1 :]
        else:
            token = token[:index] + char + token[index + 1 :]
    return Minted(token, original.proves if token == original.token else None)


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def token_shaped(inputs: Inputs) -> Minted:
    """Matches the token grammar (canonical base64url of a plausible length) but was never sealed."""
    return Minted(f"{machine_id(inputs)}.2.{b64(inputs.bytes(170, min_size=35))}", None)


def any_text(inputs: Inputs, max_size: int = 300) -> str:
    return inputs.text(UNICODE, max_size)


def candidate_token(inputs: Inputs) -> Minted:
    kind = inputs.below(4)
    if kind == 0:
        return Minted(any_text(inputs), None)
    if kind == 1:
        return token_shaped(inputs)
    if kind == 2:
        return signed_token(inputs)
    return mutated_token(inputs)


def expected_verify(minted: Minted, *, now: float, max_age: float | None) -> SessionToken | None:
    """What ``RING.verify`` must answer: the session, or ``None`` for ``InvalidToken``."""
    if minted.proves is None:
        return None
    age = now - minted.proves.issued_at
    if age < -CLOCK_SKEW_SECONDS or (max_age is not None and age > max_age):
        return None
    return minted.proves


def max_age(inputs: Inputs) -> float | None:
    return None if inputs.flag() else inputs.real(1, 2_000_000)


def test_verify_accepts_exactly_the_tokens_this_ring_signed() -> None:
    def check(case: tuple[Minted, float | None]) -> None:
        minted, age_limit = case
        expected = expected_verify(minted, now=NOW, max_age=age_limit)
        if expected is None:
            with pytest.raises(InvalidToken):
                RING.verify(minted.token, now=NOW, max_age=age_limit)
        else:
            assert RING.verify(minted.token, now=NOW, max_age=age_limit) == expected

    assert run_fuzz(lambda inputs: (candidate_token(inputs), max_age(inputs)), check) >= EXAMPLES


def test_every_single_edit_at_every_position_of_a_token_is_refused() -> None:
    token = RING.issue("148e272a6d4689", "7da4e80665bd4c6fb73231d63f0c227f", now=NOW)
    assert RING.verify(token, now=NOW).owner_machine_id == "148e272a6d4689"
    edits: set[str] = set()
    for index in range(len(token) + 1):
        edits.add(token[:index] + token[index + 1 :])
        for char in MUTATION_CHARS:
            edits.add(token[:index] + char + token[index:])
            edits.add(token[:index] + char + token[index + 1 :])
    edits.discard(token)
    for edited in edits:
        with pytest.raises(InvalidToken):
            RING.verify(edited, now=NOW)
    assert len(edits) > 100 * len(token)


# --- the routing decision -----------------------------------------------------------------------


def arrival(inputs: Inputs) -> Arrival:
    return Arrival(
        replayed_from=inputs.pick((None, None, "", machine_id(inputs), any_text(inputs, 20))),
        replay_failed=inputs.flag(0.2),
        preferred_unavailable=inputs.flag(0.2),
        forwarded_from=inputs.pick((None, None, machine_id(inputs), any_text(inputs, 20))),
        body_replayable=inputs.flag(0.7),
    )


@dataclass(frozen=True)
class DecideCase:
    minted: Minted
    arrival: Arrival
    now: float
    max_age: float | None


def test_decide_names_only_owners_that_a_genuine_token_proves() -> None:
    def check(case: DecideCase) -> None:
        decision = decide(
            case.minted.token,
            machine_id=THIS_MACHINE,
            codec=RING,
            now=case.now,
            max_age=case.max_age,
            arrival=case.arrival,
        )
        proven = expected_verify(case.minted, now=case.now, max_age=case.max_age)
        if proven is None:
            assert isinstance(decision, Reject), f"{decision} for a token that proves nothing"
            return
        if proven.owner_machine_id == THIS_MACHINE:
            assert decision == Serve(proven.inner_session_id)
            return
        assert not isinstance(decision, Serve)
        assert decision.owner_machine_id == proven.owner_machine_id
        came = case.arrival
        second_hop = came.replayed_from is not None or came.forwarded_from is not None
        if isinstance(decision, Replay | Forward):
            assert not second_hop, "a second hop could loop"
            assert not came.replay_failed
            assert not came.preferred_unavailable
            assert isinstance(decision, Forward) == (not came.body_replayable)
        else:
            assert second_hop or came.replay_failed or came.preferred_unavailable, decision.reason

    def build(inputs: Inputs) -> DecideCase:
        return DecideCase(candidate_token(inputs), arrival(inputs), inputs.real(NOW - 100, NOW + 2e6), max_age(inputs))

    assert run_fuzz(build, check) >= EXAMPLES


# --- Fly's header grammar -----------------------------------------------------------------------

FIELD_NAMES = (
    *("instance", "prefer_instance", "region", "app", "elsewhere", "state", "timeout", "fallback"),
    *("INSTANCE", " region ", "t", "reason", "elapsed_ms", "replay_source", "bogus", ""),
)
SAMPLE_VALUES = ("true", "false", "TRUE", "force_self", "prefer_self", "any", "sjc,any", "", '""', '"a,b"')


def field_value(inputs: Inputs) -> str:
    kind = inputs.below(6)
    if kind == 0:
        return machine_id(inputs)
    if kind == 1:
        number = inputs.text(string.digits, 6, min_size=1)
        fraction = "." + inputs.text(string.digits, 4, min_size=1) if inputs.flag(0.3) else ""
        return number + fraction + inputs.pick(("ms", "s", "m", "h", "", "S", "us"))
    if kind == 2:
        return inputs.text(string.digits, 25, min_size=1)
    if kind == 3:
        return inputs.pick(SAMPLE_VALUES)
    if kind == 4:
        return inputs.text(string.ascii_letters + string.digits + ' ;,="-_.', 20)
    return any_text(inputs, 20)


def duration(inputs: Inputs) -> str:
    # Now and then more digits than a float holds (1e400 seconds is infinity).
    number = inputs.text(string.digits, 400 if inputs.flag(0.1) else 6, min_size=1)
    fraction = "." + inputs.text(string.digits, 4, min_size=1) if inputs.flag(0.3) else ""
    return number + fraction + inputs.pick(("ms", "s", "m", "h"))


def plausible_instruction(inputs: Inputs) -> str:
    """Mostly what an app would send: a target, then any of the optional fields, in any order."""
    target = inputs.pick(("instance", "prefer_instance", "region", "app", "elsewhere"))
    value = {"region": inputs.pick(("sjc", "sjc,any", "ams,fra", "x y")), "elsewhere": "true"}.get(target)
    fields = [f"{target}={value or machine_id(inputs)}"]
    optional = {
        "timeout": lambda: duration(inputs),
        "fallback": lambda: inputs.pick(("force_self", "prefer_self")),
        "state": lambda: inputs.text(string.ascii_letters + string.digits + "-_:/ ", 30),
        "app": lambda: inputs.pick(("other-app", "x")),
    }
    fields += [f"{key}={make()}" for key, make in optional.items() if inputs.flag(0.4)]
    inputs.shuffle(fields)
    return ";".join(fields)


def header_value(inputs: Inputs) -> str:
    kind = inputs.below(4)
    if kind == 3:
        return plausible_instruction(inputs)
    if kind == 0:
        fields = []
        for _ in range(inputs.size(6)):
            key, value = inputs.pick(FIELD_NAMES), field_value(inputs)
            fields.append(f'{key}="{value}"' if inputs.flag(0.3) else f"{key}={value}")
        return inputs.pick((";", "; ", " ;")).join(fields)
    if kind == 1:
        return any_text(inputs)
    return inputs.text(';="=, \t', 40)


# --- valid instructions, built on purpose ------------------------------------------------------

NAME_CHARS = string.ascii_letters + string.digits + "-_"
# fly_replay_router.fly.names.STATE: visible ASCII but for '"' and ';'.
STATE_CHARS = "".join(chr(code) for code in range(0x21, 0x7F) if chr(code) not in '";')


def valid_instruction(inputs: Inputs, *, json_only: bool = False) -> ReplayInstruction:
    """An instruction Fly accepts: one or more targets, any optional fields; the JSON form's extras too."""
    instance = prefer_instance = None
    machine = inputs.text(MACHINE_CHARS, 32, min_size=1) if inputs.flag(0.5) else inputs.pick(OTHER_MACHINES)
    which = inputs.below(3)
    if which == 0:
        instance = machine
    elif which == 1:
        prefer_instance = machine
    regions = tuple(inputs.text(NAME_CHARS, 10, min_size=1) for _ in range(inputs.size(3))) if inputs.flag(0.4) else ()
    app = inputs.text(NAME_CHARS, 20, min_size=1) if inputs.flag(0.3) else None
    elsewhere = inputs.flag(0.2)
    cache = None
    if json_only and inputs.flag(0.4):
        if inputs.flag(0.3):
            cache = ReplayCacheDirective(invalidate=True)
        else:
            prefix = "/" + inputs.text(NAME_CHARS + "/*", 20)
            cache = ReplayCacheDirective(prefix=prefix, ttl_seconds=inputs.integer(10, 86_400))
    if not (instance or prefer_instance or regions or app or elsewhere or cache):
        app = "target-app"
    transform = None
    if json_only and inputs.flag(0.4):
        transform = ReplayTransform(
            path=("/" + inputs.text(NAME_CHARS + "/?=&", 20)) if inputs.flag() else None,
            set_headers=tuple(
                (inputs.text(NAME_CHARS, 12, min_size=1), inputs.text(VISIBLE_ASCII + " ", 20))
                for _ in range(inputs.size(3))
            ),
            delete_headers=tuple(inputs.text(NAME_CHARS, 12, min_size=1) for _ in range(inputs.size(3))),
        )
    return ReplayInstruction(
        instance=instance,
        prefer_instance=prefer_instance,
        regions=regions,
        app=app,
        elsewhere=elsewhere,
        state=inputs.text(STATE_CHARS, 40, min_size=1) if inputs.flag(0.3) else None,
        # Fly's durations count whole milliseconds, up to the grammar's 24 hours.
        timeout=inputs.integer(1, 86_400_000) / 1000 if inputs.flag(0.4) else None,
        fallback=inputs.pick((None, "force_self", "prefer_self")),
        transform=transform,
        cache=cache,
    )


def duration_spelling(inputs: Inputs, seconds: float) -> str:
    """One of the spellings of exactly ``seconds`` the grammar accepts (``800ms``, ``1.5s``, ``2m``, ``1h``)."""
    milliseconds = round(seconds * 1000)
    spellings = [f"{milliseconds}ms", f"{milliseconds / 1000}s"]
    if milliseconds % 1000 == 0:
        spellings.append(f"{milliseconds // 1000}s")
    if milliseconds % 60_000 == 0:
        spellings.append(f"{milliseconds // 60_000}m")
    if milliseconds % 3_600_000 == 0:
        spellings.append(f"{milliseconds // 3_600_000}h")
    return inputs.pick(spellings)


def spelled_header(inputs: Inputs, instruction: ReplayInstruction) -> str:
    """The header form as an app may write it: any field order, spaces, quotes, key case."""
    fields: list[tuple[str, str]] = []
    if instruction.instance is not None:
        fields.append(("instance", instruction.instance))
    if instruction.prefer_instance is not None:
        fields.append(("prefer_instance", instruction.prefer_instance))
    if instruction.regions:
        fields.append(("region", inputs.pick((",", ", ")).join(instruction.regions)))
    if instruction.app is not None:
        fields.append(("app", instruction.app))
    if instruction.elsewhere:
        fields.append(("elsewhere", inputs.pick(("true", "TRUE", "True"))))
    elif inputs.flag(0.1):
        fields.append(("elsewhere", "false"))
    if instruction.state is not None:
        fields.append(("state", instruction.state))
    if instruction.timeout is not None:
        fields.append(("timeout", duration_spelling(inputs, instruction.timeout)))
    if instruction.fallback is not None:
        fields.append(("fallback", instruction.fallback))
    inputs.shuffle(fields)
    parts = []
    for key, value in fields:
        key = key.upper() if inputs.flag(0.1) else key
        # A list must be quoted (Fly's "A comma-separated list of regions must be quoted"); any value may be.
        quoted = "," in value or inputs.flag(0.2)
        spaced = inputs.pick(("", " "))
        parts.append(f'{spaced}{key}{spaced}={spaced}"{value}"{spaced}' if quoted else f"{spaced}{key}={value}{spaced}")
    return inputs.pick((";", "; ")).join(parts) + inputs.pick(("", ";"))


def spelled_json(inputs: Inputs, instruction: ReplayInstruction) -> bytes:
    """The JSON form (``application/vnd.fly.replay+json``) as an app may write it."""
    document: dict[str, object] = {}
    if instruction.instance is not None:
        document["instance"] = instruction.instance
    if instruction.prefer_instance is not None:
        document["prefer_instance"] = instruction.prefer_instance
    if instruction.regions:
        document["region"] = list(instruction.regions) if inputs.flag() else ",".join(instruction.regions)
    if instruction.app is not None:
        document["app"] = instruction.app
    if instruction.elsewhere or inputs.flag(0.1):
        document["elsewhere"] = instruction.elsewhere
    if instruction.state is not None:
        document["state"] = instruction.state
    if instruction.timeout is not None:
        document["timeout"] = duration_spelling(inputs, instruction.timeout)
    if instruction.fallback is not None:
        document["fallback"] = instruction.fallback
    if instruction.transform is not None:
        transform: dict[str, object] = {}
        if instruction.transform.path is not None:
            transform["path"] = instruction.transform.path
        if instruction.transform.set_headers or inputs.flag():
            transform["set_headers"] = [
                {"name": name, "value": value} for name, value in instruction.transform.set_headers
            ]
        if instruction.transform.delete_headers or inputs.flag():
            transform["delete_headers"] = list(instruction.transform.delete_headers)
        document["transform"] = transform
    if instruction.cache is not None:
        cache = instruction.cache
        document["cache"] = (
            {"invalidate": True} if cache.invalidate else {"prefix": cache.prefix, "ttl": cache.ttl_seconds}
        )
    items = list(document.items())
    inputs.shuffle(items)
    return json.dumps(dict(items), indent=inputs.pick((None, 2))).encode()


@dataclass(frozen=True)
class Spelled:
    """A ``fly-replay`` value and, when it was built from one, the instruction it must parse to."""

    text: str | bytes
    meant: ReplayInstruction | None


@dataclass
class ParseCount:
    parsed: int = 0
    meant: int = 0


def check_parse(spelled: Spelled, parse: Callable[[Any], ReplayInstruction], count: ParseCount) -> None:
    try:
        instruction = parse(spelled.text)
    except InvalidReplay:
        assert spelled.meant is None, f"a valid instruction was refused: {spelled.meant}"
        return
    count.parsed += 1
    if spelled.meant is not None:
        assert instruction == spelled.meant
        count.meant += 1
    assert_round_trips(instruction)


def assert_round_trips(instruction: ReplayInstruction) -> None:
    if instruction.transform is not None or instruction.cache is not None:
        with pytest.raises(ValueError, match="JSON form"):
            instruction.to_header()
        return
    header = instruction.to_header()
    assert parse_replay_header(header) == instruction, f"{instruction} -> {header!r} parses differently"


def test_fly_replay_header_parses_or_raises_invalid_replay_and_round_trips() -> None:
    count = ParseCount()

    def build(inputs: Inputs) -> Spelled:
        if inputs.flag(0.4):
            instruction = valid_instruction(inputs)
            return Spelled(spelled_header(inputs, instruction), instruction)
        return Spelled(header_value(inputs), None)

    assert run_fuzz(build, lambda spelled: check_parse(spelled, parse_replay_header, count)) >= EXAMPLES
    # Four in ten were built valid on purpose and every one of them checked; the rest are mostly junk.
    assert count.meant >= EXAMPLES * 0.3, count
    assert count.parsed >= count.meant


def json_value(inputs: Inputs, depth: int = 0) -> object:
    kind = inputs.below(9 if depth < 3 else 7)
    if kind == 0:
        return None
    if kind == 1:
        return inputs.flag()
    if kind == 2:
        return inputs.integer(-(10**20), 10**20)
    if kind == 3:
        return inputs.pick((0.0, -0.0, 0.0001, 1.5, 1e308, 10**400, math.inf, math.nan, inputs.real(-1e6, 1e6)))
    if kind in (4, 5, 6):
        return field_value(inputs)
    if kind == 7:
        return [json_value(inputs, depth + 1) for _ in range(inputs.size(4))]
    return {inputs.pick(JSON_KEYS): json_value(inputs, depth + 1) for _ in range(inputs.size(4))}


JSON_KEYS = (*FIELD_NAMES, "transform", "cache", "path", "set_headers", "delete_headers", "prefix", "ttl", "invalidate")


def json_sub_object(inputs: Inputs) -> dict[str, object]:
    options: dict[str, Callable[[], object]] = {
        "path": lambda: inputs.pick(("/x", "x", "", 3, any_text(inputs, 8))),
        "set_headers": lambda: json_value(inputs, 1),
        "delete_headers": lambda: inputs.pick((["a"], [], [1], "a", json_value(inputs, 1))),
        "prefix": lambda: inputs.pick(("/p", "p", any_text(inputs, 8))),
        "ttl": lambda: inputs.pick((10, 9, 300, -5, 10.0, True, None, "10")),
        "invalidate": lambda: inputs.pick((True, False, 1, "true")),
    }
    return {key: make() for key, make in options.items() if inputs.flag(0.4)}


def json_body(inputs: Inputs) -> bytes:
    kind = inputs.below(5)
    if kind <= 1:
        document = {inputs.pick(JSON_KEYS): json_value(inputs) for _ in range(inputs.size(5))}
        return json.dumps(document).encode()
    if kind == 2:
        keys = ("instance", "region", "app", "elsewhere", "state", "timeout", "fallback", "transform", "cache")
        document = {
            key: json_sub_object(inputs) if key in ("transform", "cache") else json_value(inputs) for key in keys
        }
        return json.dumps({key: value for key, value in document.items() if inputs.flag(0.3)}).encode()
    if kind == 3:
        return inputs.bytes(200)
    depth = inputs.integer(0, 5000)
    return b"[" * depth + b"]" * depth


def test_fly_replay_json_parses_or_raises_invalid_replay_and_round_trips() -> None:
    count = ParseCount()
    transformed = cached = 0

    def build(inputs: Inputs) -> Spelled:
        nonlocal transformed, cached
        if inputs.flag(0.4):
            instruction = valid_instruction(inputs, json_only=True)
            transformed += instruction.transform is not None
            cached += instruction.cache is not None
            return Spelled(spelled_json(inputs, instruction), instruction)
        return Spelled(json_body(inputs), None)

    assert run_fuzz(build, lambda spelled: check_parse(spelled, parse_replay_json, count)) >= EXAMPLES
    assert count.meant >= EXAMPLES * 0.3, count
    # The JSON form's own parts, transform and cache, were among those checked, not only the header fields.
    assert transformed >= EXAMPLES * 0.1
    assert cached >= EXAMPLES * 0.1


def test_fly_replay_src_and_failed_parse_anything() -> None:
    def check(value: str) -> None:
        source = parse_replay_src(value)
        failure = parse_replay_failed(value)
        assert isinstance(source, ReplaySource)
        assert isinstance(failure, ReplayFailure)
        assert source.t is None or 0 <= source.t < 10**20
        assert failure.elapsed_ms is None or 0 <= failure.elapsed_ms < 10**12

    def build(inputs: Inputs) -> str:
        # Now and then longer than the parsers' 4,096-character cut.
        return header_value(inputs) if inputs.flag(0.98) else any_text(inputs, 4500)

    assert run_fuzz(build, check) >= EXAMPLES


# --- the ASGI layer -----------------------------------------------------------------------------

INNER_APP_STATUS = 299
MINTED_BY_INNER_APP = "fresh0123456789abcdef0123456789ab"
HANDSHAKE = [version.encode() for version in HANDSHAKE_PROTOCOL_VERSIONS]
# Bytes an HTTP server can hand over in a header value and in a query string.
HEADER_BYTES = bytes(b for b in range(256) if b not in b"\r\n\x00")
QUERY_BYTES = bytes(b for b in range(256) if 0x21 <= b <= 0x7E or b >= 0x80)


def header_bytes(inputs: Inputs, max_size: int = 120) -> bytes:
    return bytes(inputs.pick(HEADER_BYTES) for _ in range(inputs.size(max_size)))


@dataclass
class InnerApp:
    """The server behind the layer: records what it saw, answers 299, repeats or mints a session id."""

    scopes: list[dict[str, Any]]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.scopes.append(scope)
        session = next((value for name, value in scope["headers"] if name == b"mcp-session-id"), None)
        headers = [(b"mcp-session-id", session or MINTED_BY_INNER_APP.encode())]
        await send({"type": "http.response.start", "status": INNER_APP_STATUS, "headers": headers})
        await send({"type": "http.response.body", "body": b"inner"})


class RecordingForwarder:
    """Stands in for the network forwarder: records the owner it was asked to reach, reaches nobody."""

    def __init__(self) -> None:
        self.owners: list[str] = []

    async def forward(self, scope: Any, receive: Any, send: Any, *, owner_machine_id: str) -> ForwardOutcome:
        self.owners.append(owner_machine_id)
        return UNREACHABLE


class FrozenClock:
    """The layer's clock, stopped at NOW, so that a token's age is what the test computed."""

    @staticmethod
    def time() -> float:
        return NOW

    @staticmethod
    def monotonic() -> float:
        return NOW


@dataclass(frozen=True)
class AsgiCase:
    method: str
    headers: list[tuple[bytes, bytes]]
    query_string: bytes
    carried: tuple[Minted, ...]
    aim: str | None  # the outcome the case was built to reach, or None for an unsteered one
    # Header pairs given as lists, not tuples (ASGI allows any two-item iterable; a 500 before).
    list_pairs: bool = False


ROUTING_HEADERS = (
    b"fly-replay-src",
    b"fly-replay-failed",
    b"fly-preferred-instance-unavailable",
    FORWARDED_FROM,
    b"content-length",
    b"transfer-encoding",
    b"fly-request-id",
)


# What the layer can do with a request; the property counts each and asserts a floor per outcome.
OUTCOMES = ("served", "replayed", "forwarded", "rejected", "passed")


def genuine_token(inputs: Inputs, owner: str) -> Minted:
    """A token this fleet's ring signed for ``owner`` within the last hour: what a real client holds."""
    inner = uuid.UUID(int=inputs.below(2**128)).hex
    issued = int(NOW) - inputs.below(3600)
    return Minted(inputs.pick((RING, OLD_KEY_ONLY)).issue(owner, inner, now=issued), SessionToken(owner, inner, issued))


def other_machine(inputs: Inputs) -> str:
    owner = inputs.pick(OTHER_MACHINES) if inputs.flag() else inputs.text(MACHINE_CHARS, 32, min_size=1)
    return owner if owner != THIS_MACHINE else OTHER_MACHINES[0]


def asgi_case(inputs: Inputs) -> AsgiCase:
    """One request: half aimed at an outcome (built so that it must end there), half anything at all."""
    aim = inputs.pick(OUTCOMES) if inputs.flag() else None
    carried: list[Minted] = []
    headers: list[tuple[bytes, bytes]] = [(b"host", b"127.0.0.1:8080")]
    query = bytes(inputs.pick(QUERY_BYTES) for _ in range(inputs.size(60)))
    if aim is not None and aim != "passed":
        if aim == "served":
            minted = genuine_token(inputs, THIS_MACHINE)
        elif aim == "rejected":
            minted = inputs.pick((token_shaped, mutated_token, lambda i: Minted(any_text(i, 80), None)))(inputs)
            if expected_verify(minted, now=NOW, max_age=None) is not None:
                minted = token_shaped(inputs)
        else:
            minted = genuine_token(inputs, other_machine(inputs))
        carried.append(minted)
        if inputs.flag():
            headers.append((b"mcp-session-id", minted.token.encode("utf-8")))
        else:
            # The legacy SSE transport's carrier, as the official SDK reads it (?session_id=).
            query = b"session_id=" + quote_from_bytes(minted.token.encode("utf-8"), safe="").encode()
        if aim == "forwarded":
            # A body Fly cannot replay: over its 1 MB replay limit, or of unknown length.
            if inputs.flag():
                headers.append((b"content-length", str(inputs.integer(1024 * 1024 + 1, 3_000_000)).encode()))
            else:
                headers.append((b"transfer-encoding", b"chunked"))
        elif inputs.flag(0.5):
            headers.append((b"content-length", str(inputs.integer(0, 1024 * 1024)).encode()))
        if aim == "rejected" and inputs.flag(0.3):
            # A second hop names a genuine owner elsewhere: refused too, so that nothing loops.
            carried[-1] = genuine_token(inputs, other_machine(inputs))
            token = carried[-1].token.encode("utf-8")
            headers = [(name, token if name == b"mcp-session-id" else value) for name, value in headers]
            if query.startswith(b"session_id="):
                query = b"session_id=" + quote_from_bytes(token, safe="").encode()
            headers.append(
                (inputs.pick((b"fly-replay-src", FORWARDED_FROM)), b"instance=" + OTHER_MACHINES[1].encode())
            )
        version = inputs.pick((None, *HANDSHAKE, b"2026-07-28"))
        if version is not None:
            headers.append((b"mcp-protocol-version", version))
        inputs.shuffle(headers)
        return AsgiCase(inputs.pick(("POST", "GET", "DELETE")), headers, query, tuple(carried), aim)
    if aim == "passed":
        version = inputs.pick((None, *HANDSHAKE, b"2026-07-28"))
        if version is not None:
            headers.append((b"mcp-protocol-version", version))
        query = inputs.pick((b"", b"a=1", b"page=2&q=x"))
        return AsgiCase(inputs.pick(("POST", "GET", "DELETE")), headers, query, (), aim)

    def session_value() -> Minted:
        if inputs.flag(0.2):
            return Minted(header_bytes(inputs).decode("latin-1"), None)
        return candidate_token(inputs)

    for _ in range(inputs.pick((0, 1, 1, 1, 2))):
        minted = session_value()
        carried.append(minted)
        headers.append((b"mcp-session-id", minted.token.encode("utf-8")))
    version = inputs.pick((None, None, *HANDSHAKE, b"2026-07-28", header_bytes(inputs, 12)))
    if version is not None:
        headers.append((b"mcp-protocol-version", version))
    for _ in range(inputs.size(4)):
        name = inputs.pick(ROUTING_HEADERS)
        if name == b"content-length" and inputs.flag(0.8):
            value = str(inputs.integer(0, 3_000_000)).encode()
        elif name == b"transfer-encoding":
            value = b"chunked"
        else:
            value = header_bytes(inputs)
        headers.append((name, value))
    inputs.shuffle(headers)
    if inputs.flag():
        minted = session_value()
        carried.append(minted)
        encoded = quote_from_bytes(minted.token.encode("utf-8"), safe="").encode()
        query = inputs.pick((b"", b"a=1&")) + b"session_id=" + encoded + (b"&" + query if query else b"")
    return AsgiCase(inputs.pick(("POST", "GET", "DELETE")), headers, query, tuple(carried), None)


def asgi_case_any_pairs(inputs: Inputs) -> AsgiCase:
    """``asgi_case``, with its header pairs given as lists one time in five."""
    return replace(asgi_case(inputs), list_pairs=inputs.flag(0.2))


@contextmanager
def quiet_layer_logs() -> Iterator[None]:
    """The layer logs every refused token at info: thousands of lines that say nothing here."""
    logger = logging.getLogger("fly_replay_router.affinity")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def test_the_layer_answers_only_404_a_proven_replay_or_the_inner_app(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(middleware_module, "time", FrozenClock)
    layer_settings = AffinitySettings(machine_id=THIS_MACHINE, secret_keys=(KEY_NEW, KEY_OLD), app_name=APP)
    loop = asyncio.new_event_loop()

    def check(case: AsgiCase) -> None:
        inner = InnerApp([])
        layer = AffinityMiddleware(inner, settings=layer_settings)
        forwarder = RecordingForwarder()
        layer._forwarder = forwarder  # type: ignore[assignment]
        sent: list[dict[str, Any]] = []
        body = [{"type": "http.request", "body": b"{}", "more_body": False}, {"type": "http.disconnect"}]

        async def receive() -> dict[str, Any]:
            return body.pop(0) if len(body) > 1 else body[0]

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": case.method,
            "scheme": "http",
            "path": "/mcp",
            "raw_path": b"/mcp",
            "root_path": "",
            "query_string": case.query_string,
            "headers": [list(pair) for pair in case.headers] if case.list_pairs else case.headers,
            "client": ("127.0.0.1", 5000),
            "server": ("127.0.0.1", 8080),
        }
        loop.run_until_complete(layer(scope, receive, send))

        proven = [session for m in case.carried if (session := expected_verify(m, now=NOW, max_age=None))]
        proven_elsewhere = {session.owner_machine_id for session in proven} - {THIS_MACHINE}
        for owner in forwarder.owners:
            assert owner in proven_elsewhere, f"forwarded to {owner}"
        assert sent, "the layer sent no answer"
        start = sent[0]
        assert start["type"] == "http.response.start"
        status, headers = start["status"], dict(start["headers"])
        if status == 307:
            outcome = "replayed"
        elif status == 404:
            outcome = "forwarded" if forwarder.owners else "rejected"
        else:
            outcome = "served" if case.carried else "passed"
        reached[outcome] += 1
        if case.aim is not None:
            assert outcome == case.aim, f"built to be {case.aim}, was {outcome} ({status})"
        if outcome == "replayed":
            assert not inner.scopes
            instruction = parse_replay_header(headers[b"fly-replay"].decode("ascii"))
            assert (instruction.instance or instruction.prefer_instance) in proven_elsewhere
            return
        if status == 404:
            assert not inner.scopes
            assert json.loads(sent[1]["body"])["error"]["code"] == -32600
            if outcome == "forwarded":
                assert len(forwarder.owners) == 1
            return
        assert status == INNER_APP_STATUS, f"the layer answered {status}"
        assert len(inner.scopes) == 1
        seen = inner.scopes[0]
        seen_ids = [value for name, value in seen["headers"] if name == b"mcp-session-id"]
        versions = [value for name, value in case.headers if name == b"mcp-protocol-version"]
        # Only a sessionless modern-era POST passes untouched; any session carrier is routed.
        passed_through = not case.carried and bool(versions) and versions[0] not in HANDSHAKE
        if passed_through and case.method == "POST":
            return
        if case.carried:
            local = [
                session.inner_session_id.encode() for session in proven if session.owner_machine_id == THIS_MACHINE
            ]
            assert local, "the inner app was reached with a session this machine cannot prove"
            assert any(inner_id in seen_ids or inner_id in seen["query_string"] for inner_id in local)
        if not seen_ids:
            # A session id the inner app just minted leaves wrapped in a token naming this machine.
            answered = headers[b"mcp-session-id"].decode("ascii")
            assert RING.verify(answered, now=NOW).owner_machine_id == THIS_MACHINE

    reached = dict.fromkeys(OUTCOMES, 0)
    try:
        with quiet_layer_logs():
            assert run_fuzz(asgi_case_any_pairs, check, ASGI_EXAMPLES) >= ASGI_EXAMPLES
    finally:
        loop.close()
    # Half the cases aim at one of the five outcomes (a tenth each); each must have been reached often.
    for outcome, count in reached.items():
        assert count >= ASGI_EXAMPLES * 0.06, f"{outcome} reached {count} times of {ASGI_EXAMPLES}: {reached}"
