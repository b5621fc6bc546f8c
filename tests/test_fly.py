"""Fly's header grammar (the fly_replay_router.fly package), shared by the layer and the edge."""

from __future__ import annotations

import pytest

from fly_replay_router.fly import (
    InvalidReplay,
    ReplayCacheDirective,
    ReplayFailure,
    ReplayInstruction,
    ReplaySource,
    ReplayTransform,
    format_duration,
    parse_duration,
    parse_replay_failed,
    parse_replay_header,
    parse_replay_json,
    parse_replay_src,
)

MACHINE = "148e272a6d4689"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"instance={MACHINE}", ReplayInstruction(instance=MACHINE)),
        (
            f"instance={MACHINE};timeout=5s;fallback=force_self",
            ReplayInstruction(instance=MACHINE, timeout=5.0, fallback="force_self"),
        ),
        (f" prefer_instance = {MACHINE} ; ", ReplayInstruction(prefer_instance=MACHINE)),
        ('region="sjc,any"', ReplayInstruction(regions=("sjc", "any"))),
        ("region=ams;state=abc", ReplayInstruction(regions=("ams",), state="abc")),
        ("app=other-app", ReplayInstruction(app="other-app")),
        (
            "elsewhere=true;timeout=800ms;fallback=prefer_self",
            ReplayInstruction(elsewhere=True, timeout=0.8, fallback="prefer_self"),
        ),
    ],
)
def test_header_form_parses(header: str, expected: ReplayInstruction) -> None:
    assert parse_replay_header(header) == expected


@pytest.mark.parametrize(
    "instruction",
    [
        ReplayInstruction(instance=MACHINE, timeout=5.0, fallback="force_self"),
        ReplayInstruction(prefer_instance=MACHINE),
        ReplayInstruction(regions=("sjc", "ord", "any"), state="s1"),
        ReplayInstruction(elsewhere=True, timeout=0.25),
    ],
)
def test_header_form_round_trips(instruction: ReplayInstruction) -> None:
    assert parse_replay_header(instruction.to_header()) == instruction


@pytest.mark.parametrize(
    ("header", "rule"),
    [
        ("", "no target"),
        ("timeout=5s", "no target"),
        ("instance=NOT_AN_ID", "not a machine id"),
        (f"instance={MACHINE};prefer_instance={MACHINE}", "exclude each other"),
        (f"instance={MACHINE};timeout=soon", "not a duration"),
        (f"instance={MACHINE};timeout=0s", "positive"),
        (f"instance={MACHINE};fallback=somewhere", "fallback"),
        (f"instance={MACHINE};elsewhere=maybe", "elsewhere"),
        (f"instance={MACHINE};colour=blue", "unknown field"),
        ('region="ams,,any"', "empty entry"),
        ("instance=" + "a" * 5000, "too long"),
        ('region="Q,ZMvg"q"', "region"),
        ("app=a b", "app"),
        (f"instance={MACHINE};timeout=0.1ms", "at least 1ms"),
        (f"instance={MACHINE};timeout={'9' * 400}s", "longer than"),
        (f"instance={MACHINE};timeout=25h", "longer than"),
    ],
)
def test_invalid_header_names_the_rule(header: str, rule: str) -> None:
    with pytest.raises(InvalidReplay, match=rule):
        parse_replay_header(header)


def test_json_form_with_transform_and_cache() -> None:
    body = (
        b'{"instance": "148e272a6d4689", "timeout": 2, "fallback": "force_self",'
        b' "transform": {"path": "/new", "set_headers": [{"name": "x-a", "value": "1"}], "delete_headers": ["x-b"]}}'
    )
    assert parse_replay_json(body) == ReplayInstruction(
        instance=MACHINE,
        timeout=2.0,
        fallback="force_self",
        transform=ReplayTransform(path="/new", set_headers=(("x-a", "1"),), delete_headers=("x-b",)),
    )
    cached = parse_replay_json(b'{"region": ["ams", "any"], "cache": {"prefix": "/s/", "ttl": 60}}')
    assert cached.regions == ("ams", "any")
    assert cached.cache == ReplayCacheDirective(prefix="/s/", ttl_seconds=60)
    assert parse_replay_json(b'{"cache": {"invalidate": true}}').cache == ReplayCacheDirective(invalidate=True)


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        (b"not json", "not JSON"),
        (b"[1]", "not an object"),
        (b'{"instance": 5}', "wrong type"),
        (b'{"instance": "148e272a6d4689", "transform": {"path": "relative"}}', "transform.path"),
        (b'{"instance": "148e272a6d4689", "transform": {"set_headers": [1]}}', "set_headers"),
        (b'{"instance": "148e272a6d4689", "cache": {"prefix": "/x", "ttl": 5}}', "at least 10"),
        (b'{"instance": "148e272a6d4689", "surprise": 1}', "unknown field"),
        (b"[" * 100_000, "too long"),
        (b'{"instance": "148e272a6d4689", "timeout": 1e400}', "not a duration"),
        (b'{"instance": "148e272a6d4689", "timeout": 100000}', "longer than"),
    ],
)
def test_invalid_json_names_the_rule(body: bytes, rule: str) -> None:
    with pytest.raises(InvalidReplay, match=rule):
        parse_replay_json(body)


def test_transform_and_cache_have_no_header_form() -> None:
    with pytest.raises(ValueError, match="JSON form"):
        ReplayInstruction(instance=MACHINE, transform=ReplayTransform(path="/x")).to_header()


def test_replay_src_in_any_order_with_fields_missing() -> None:
    source = ReplaySource(instance=MACHINE, region="ams", t=1700000000000000, state="x")
    assert parse_replay_src(source.to_header()) == source
    assert parse_replay_src("t=12;state=s;instance=abc") == ReplaySource(instance="abc", t=12, state="s")
    assert parse_replay_src("region=ams") == ReplaySource(region="ams")
    assert parse_replay_src("garbage;;=;t=notanumber") == ReplaySource()


def test_replay_failed_round_trips_and_tolerates_garbage() -> None:
    failure = ReplayFailure(
        instance=MACHINE, app="a", region="ams", replay_source="bbbbbbbbbbbbbb", reason="timeout", elapsed_ms=5003
    )
    assert parse_replay_failed(failure.to_header()) == failure
    assert parse_replay_failed("elapsed_ms=-1;reason=") == ReplayFailure()


def test_timeouts_are_whole_milliseconds_so_the_header_form_round_trips() -> None:
    instruction = parse_replay_json(b'{"instance": "148e272a6d4689", "timeout": 1.23456}')
    assert instruction.timeout == 1.235
    assert parse_replay_header(instruction.to_header()) == instruction


@pytest.mark.parametrize(("text", "seconds"), [("800ms", 0.8), ("10s", 10.0), ("1.5m", 90.0), ("2h", 7200.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(("seconds", "text"), [(5.0, "5s"), (0.8, "800ms"), (1.25, "1250ms")])
def test_duration_formatting(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
