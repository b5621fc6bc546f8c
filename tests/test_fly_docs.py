"""Fly's header grammar against Fly's own documented examples: an oracle neither parser wrote.

The affinity layer and the simulated edge share one reading of ``fly-replay``, ``fly-replay-src`` and
``fly-replay-failed`` (``fly_replay_router.fly``), so a misreading shared by both passes every
end-to-end test. Each row below is a string copied verbatim from a Fly documentation page (the page
is named in the row), with the meaning that page gives it, written out by hand as the parsed value.
A row that fails means the shared parser disagrees with Fly, not with itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from fly_replay_router.fly import (
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

ROUTING = "https://fly.io/docs/networking/dynamic-request-routing/"
FALLBACKS = "https://community.fly.io/t/return-to-sender-fallbacks-for-fly-replay/27404"
JSON_FORM = "https://community.fly.io/t/new-in-fly-replay-request-transformation-and-json-configuration/25531"
POSTGRES = "https://fly.io/docs/postgres/advanced-guides/high-availability-and-global-replication/"


@dataclass(frozen=True)
class Example:
    """A literal from a Fly page and the instruction the page says it is."""

    page: str
    literal: str
    meaning: ReplayInstruction

    def __str__(self) -> str:  # the test id: the literal itself
        return self.literal


HEADER_EXAMPLES = [
    # "Route to a specific region"
    Example(ROUTING, "region=sjc", ReplayInstruction(regions=("sjc",))),
    # "Route to one of the given regions, in order of preference" (a list of regions must be quoted)
    Example(ROUTING, 'region="iad,ord,us,na"', ReplayInstruction(regions=("iad", "ord", "us", "na"))),
    # "Route to a preferred region, or fallback to any available machine"
    Example(ROUTING, 'region="sjc,any"', ReplayInstruction(regions=("sjc", "any"))),
    # "Route to specific Machine"
    Example(ROUTING, "instance=00bb33ff", ReplayInstruction(instance="00bb33ff")),
    # "Route to another app"
    Example(ROUTING, "app=target-app", ReplayInstruction(app="target-app")),
    # "You can combine multiple fields"
    Example(ROUTING, 'region="sjc,any";app=target-app', ReplayInstruction(regions=("sjc", "any"), app="target-app")),
    # "Route to another app with a timeout and fallback to the original Machine"
    Example(
        ROUTING,
        "app=my-worker;timeout=10s;fallback=force_self",
        ReplayInstruction(app="my-worker", timeout=10.0, fallback="force_self"),
    ),
    # A FaaS-style router replaying to a customer's app.
    Example(ROUTING, "app=customer-function-app", ReplayInstruction(app="customer-function-app")),
    # "On its own, setting a timeout just makes the replay fail faster."
    Example(FALLBACKS, "app=my-worker;timeout=2s", ReplayInstruction(app="my-worker", timeout=2.0)),
    Example(
        FALLBACKS,
        "app=my-worker;timeout=5s;fallback=force_self",
        ReplayInstruction(app="my-worker", timeout=5.0, fallback="force_self"),
    ),
    # A write caught on a read replica, replayed to the primary region.
    Example(POSTGRES, "region=scl", ReplayInstruction(regions=("scl",))),
]


@pytest.mark.parametrize("example", HEADER_EXAMPLES, ids=str)
def test_fly_replay_header_examples_mean_what_fly_says(example: Example) -> None:
    assert parse_replay_header(example.literal) == example.meaning, example.page


JSON_EXAMPLES = [
    # "Route to another app, and modify the request": path and query rewritten, two headers
    # deleted, two set (overwriting headers of the same name), regions as one comma-separated string.
    Example(
        ROUTING,
        """{
  "app": "target-app",
  "region": "iad,us",
  "transform": {
    "path": "/new/path?param=value",
    "delete_headers": ["x-unwanted-header", "cookie"],
    "set_headers": [
      { "name": "x-custom-header", "value": "new-value" },
      { "name": "authorization", "value": "Bearer token123" }
    ]
  }
}""",
        ReplayInstruction(
            app="target-app",
            regions=("iad", "us"),
            transform=ReplayTransform(
                path="/new/path?param=value",
                set_headers=(("x-custom-header", "new-value"), ("authorization", "Bearer token123")),
                delete_headers=("x-unwanted-header", "cookie"),
            ),
        ),
    ),
    # "Route to another app with a timeout and fallback": the duration is a string in JSON too.
    Example(
        ROUTING,
        """{
  "app": "my-worker",
  "timeout": "10s",
  "fallback": "force_self"
}""",
        ReplayInstruction(app="my-worker", timeout=10.0, fallback="force_self"),
    ),
    # Path-based replay caching in the JSON form: cache replays under /some/path/ for 60 seconds.
    Example(
        ROUTING,
        """{
  "app": "target-app",
  "cache": {
    "prefix": "/some/path/*",
    "ttl": 60
  }
}""",
        ReplayInstruction(app="target-app", cache=ReplayCacheDirective(prefix="/some/path/*", ttl_seconds=60)),
    ),
    # "Invalidating the Replay Cache", from the replay target back to the origin.
    Example(
        ROUTING,
        """{
  "app": "origin-app",
  "cache": {
    "invalidate": true
  }
}""",
        ReplayInstruction(app="origin-app", cache=ReplayCacheDirective(invalidate=True)),
    ),
    # The announcement's example, built in JavaScript and sent with JSON.stringify (compact JSON).
    Example(
        JSON_FORM,
        json.dumps({"app": "example-app", "region": "syd", "cache": {"prefix": "/some/path/*", "ttl": 30}}),
        ReplayInstruction(
            app="example-app", regions=("syd",), cache=ReplayCacheDirective(prefix="/some/path/*", ttl_seconds=30)
        ),
    ),
]


@pytest.mark.parametrize("example", JSON_EXAMPLES, ids=lambda example: example.meaning.app or "")
def test_fly_replay_json_examples_mean_what_fly_says(example: Example) -> None:
    assert parse_replay_json(example.literal.encode()) == example.meaning, example.page


def test_the_fly_replay_failed_example_means_what_fly_says() -> None:
    # The page's "Example header value": the replay targeted 00bb33ff of target-app in iad, was issued
    # by 11aa44ee, and gave up on a timeout after 10,000 ms.
    literal = "instance=00bb33ff;app=target-app;region=iad;replay_source=11aa44ee;reason=timeout;elapsed_ms=10000"
    assert parse_replay_failed(literal) == ReplayFailure(
        instance="00bb33ff",
        app="target-app",
        region="iad",
        replay_source="11aa44ee",
        reason="timeout",
        elapsed_ms=10_000,
    ), ROUTING


def test_fly_replay_src_fields_mean_what_fly_says() -> None:
    # The page gives fly-replay-src's fields (instance: the machine that sent fly-replay; region: where
    # it was replayed from; t: microseconds since the Unix epoch; state: the original state field) but
    # no literal value; this one is spelled with the fields, values and separators the same page uses
    # for fly-replay and fly-replay-failed ("semicolon-separated metadata").
    literal = "instance=00bb33ff;region=iad;t=1712345678901234;state=abc"
    source = parse_replay_src(literal)
    assert source == ReplaySource(instance="00bb33ff", region="iad", t=1_712_345_678_901_234, state="abc"), ROUTING
    # Microseconds, not milliseconds or seconds: the timestamp is in April 2024.
    assert 1_712_000_000 < source.t / 1_000_000 < 1_713_000_000  # type: ignore[operator]
