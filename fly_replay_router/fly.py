"""Fly Proxy's header grammar, in both directions.

The affinity layer writes ``fly-replay`` and reads ``fly-replay-src`` / ``fly-replay-failed``;
the simulated edge reads ``fly-replay`` (header and JSON forms) and writes the others. Both import
this module and nothing else of each other, so the two sides cannot drift apart.

Reference: Fly's "Dynamic request routing with fly-replay" and "Proxy error codes" pages, as
summarised in ``shared/reference/fly-proxy.md``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Literal

# Response headers an app sends to the proxy.
FLY_REPLAY = "fly-replay"
FLY_REPLAY_CACHE = "fly-replay-cache"
FLY_REPLAY_CACHE_TTL_SECS = "fly-replay-cache-ttl-secs"
REPLAY_JSON_CONTENT_TYPE = "application/vnd.fly.replay+json"

# Request headers the proxy adds.
FLY_REPLAY_SRC = "fly-replay-src"
FLY_REPLAY_FAILED = "fly-replay-failed"
FLY_PREFERRED_INSTANCE_UNAVAILABLE = "fly-preferred-instance-unavailable"
FLY_REPLAY_CACHE_STATUS = "fly-replay-cache-status"
FLY_REQUEST_ID = "fly-request-id"
FLY_CLIENT_IP = "fly-client-ip"
FLY_REGION = "fly-region"
FLY_FORWARDED_PORT = "fly-forwarded-port"

# Request headers a client may send.
FLY_FORCE_INSTANCE_ID = "fly-force-instance-id"
FLY_PREFER_INSTANCE_ID = "fly-prefer-instance-id"
FLY_REPLAY_CACHE_CONTROL = "fly-replay-cache-control"

Fallback = Literal["force_self", "prefer_self"]
FailureReason = Literal["timeout", "retries_exhausted", "no_candidate"]

MACHINE_ID_PATTERN = re.compile(r"[0-9a-z]{1,32}")
# Values the header grammar can carry unchanged: no separators, quotes or spaces.
_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
_STATE = re.compile(r"[\x21\x23-\x3a\x3c-\x7e]{1,512}")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
# Longer than any proxy keeps trying, and short enough to stay an exact float of milliseconds.
MAX_DURATION_SECONDS = 24 * 3600
# A header value longer than this is not a replay instruction anyone meant to send.
MAX_HEADER_VALUE = 4096
# Fly's proxy buffers at most this much of a request body for a replay; a larger body, or one of
# unknown length (chunked), cannot be replayed (error PA01).
REPLAY_BODY_LIMIT = 1024 * 1024
# RFC 9110 section 7.6.1: meaningful for one connection only, so never passed on by a proxy. Also
# "expect": whoever reads the body (the edge, or the layer forwarding it) answers 100-continue itself.
HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
     "trailer", "transfer-encoding", "upgrade", "expect"}
)  # fmt: skip
# The region of a machine outside Fly (the layer's logs, the local fleet): a code shaped like Fly's.
DEFAULT_REGION = "lcl"


class InvalidReplay(ValueError):
    """A ``fly-replay`` instruction the proxy cannot follow (Fly's error PA03)."""


def parse_fields(value: str) -> dict[str, str]:
    """Split ``key=value;key="a,b"`` into a dict; the last of repeated keys wins.

    Lenient on purpose (spaces, empty segments, unknown keys): the callers decide which keys
    matter. A segment without ``=`` maps to the empty string.
    """
    fields: dict[str, str] = {}
    for segment in _split_outside_quotes(value, ";"):
        key, _, raw = segment.partition("=")
        key = key.strip().lower()
        if not key:
            continue
        raw = raw.strip()
        if len(raw) >= 2 and raw[0] == raw[-1] == '"':
            raw = raw[1:-1]
        fields[key] = raw
    return fields


def _split_outside_quotes(value: str, separator: str) -> list[str]:
    parts: list[str] = []
    start = 0
    quoted = False
    for index, char in enumerate(value):
        if char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append(value[start:index])
            start = index + 1
    parts.append(value[start:])
    return parts


def _format_fields(pairs: list[tuple[str, str]]) -> str:
    return ";".join(f'{key}="{value}"' if "," in value else f"{key}={value}" for key, value in pairs)


def _join_present(**fields: str | int | None) -> str:
    return ";".join(f"{key}={value}" for key, value in fields.items() if value is not None)


def parse_duration(text: str) -> float:
    """``800ms`` / ``10s`` / ``1.5m`` -> seconds. Raises ``InvalidReplay`` on anything else."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise InvalidReplay(f"timeout {text[:40]!r} is not a duration such as 800ms or 10s")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION_SECONDS:
        raise InvalidReplay(f"timeout {text[:40]!r} is longer than {MAX_DURATION_SECONDS // 3600} hours")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds -> the shortest exact ``ms`` or ``s`` form Fly accepts."""
    milliseconds = round(seconds * 1000)
    if milliseconds % 1000 == 0:
        return f"{milliseconds // 1000}s"
    return f"{milliseconds}ms"


@dataclass(frozen=True, slots=True)
class ReplayTransform:
    """The JSON form's ``transform``: rewrite the replayed request."""

    path: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    delete_headers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ReplayCacheDirective:
    """The JSON form's ``cache``: a path-based replay cache rule, or an invalidation."""

    prefix: str | None = None
    ttl_seconds: int | None = None
    invalidate: bool = False


@dataclass(frozen=True, slots=True)
class ReplayInstruction:
    """One ``fly-replay`` instruction: where the proxy must send the original request next."""

    instance: str | None = None
    prefer_instance: str | None = None
    regions: tuple[str, ...] = ()
    app: str | None = None
    elsewhere: bool = False
    state: str | None = None
    timeout: float | None = None
    fallback: Fallback | None = None
    transform: ReplayTransform | None = None
    cache: ReplayCacheDirective | None = field(default=None)

    def __post_init__(self) -> None:
        for name, machine_id in (("instance", self.instance), ("prefer_instance", self.prefer_instance)):
            if machine_id is not None and not MACHINE_ID_PATTERN.fullmatch(machine_id):
                raise InvalidReplay(f"{name}={machine_id!r} is not a machine id")
        if self.instance is not None and self.prefer_instance is not None:
            raise InvalidReplay("instance and prefer_instance exclude each other")
        if self.timeout is not None and not self.timeout >= 0.001:
            raise InvalidReplay("timeout must be positive, at least 1ms")
        if self.state is not None and not _STATE.fullmatch(self.state):
            raise InvalidReplay("state must be visible ASCII without ';' or '\"'")
        if any(not _NAME.fullmatch(region) for region in self.regions):
            raise InvalidReplay("a region must be letters, digits, '-' or '_'")
        if self.app is not None and not _NAME.fullmatch(self.app):
            raise InvalidReplay("app must be letters, digits, '-' or '_'")

    def to_header(self) -> str:
        """The header form, e.g. ``instance=148e272a6d4689;timeout=5s;fallback=force_self``."""
        if self.transform is not None or self.cache is not None:
            raise ValueError("transform and cache exist only in the JSON form")
        pairs: list[tuple[str, str]] = []
        if self.instance is not None:
            pairs.append(("instance", self.instance))
        if self.prefer_instance is not None:
            pairs.append(("prefer_instance", self.prefer_instance))
        if self.regions:
            pairs.append(("region", ",".join(self.regions)))
        if self.app is not None:
            pairs.append(("app", self.app))
        if self.elsewhere:
            pairs.append(("elsewhere", "true"))
        if self.state is not None:
            pairs.append(("state", self.state))
        if self.timeout is not None:
            pairs.append(("timeout", format_duration(self.timeout)))
        if self.fallback is not None:
            pairs.append(("fallback", self.fallback))
        return _format_fields(pairs)


_KNOWN_FIELDS = frozenset({"instance", "prefer_instance", "region", "app", "elsewhere", "state", "timeout", "fallback"})


def parse_replay_header(value: str) -> ReplayInstruction:
    """Parse the header form. Raises ``InvalidReplay`` naming the rule it breaks."""
    if len(value) > MAX_HEADER_VALUE:
        raise InvalidReplay("fly-replay value is too long")
    fields = parse_fields(value)
    unknown = sorted(set(fields) - _KNOWN_FIELDS)
    if unknown:
        raise InvalidReplay(f"unknown field {unknown[0]!r}")
    return _instruction_from_fields(fields, transform=None, cache=None)


def parse_replay_json(body: bytes) -> ReplayInstruction:
    """Parse the JSON form (``application/vnd.fly.replay+json``)."""
    if len(body) > 16 * MAX_HEADER_VALUE:
        raise InvalidReplay("fly-replay JSON body is too long")
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise InvalidReplay("fly-replay JSON body is not JSON") from exc
    if not isinstance(document, dict):
        raise InvalidReplay("fly-replay JSON body is not an object")
    unknown = sorted(set(document) - _KNOWN_FIELDS - {"transform", "cache"})
    if unknown:
        raise InvalidReplay(f"unknown field {unknown[0]!r}")
    fields: dict[str, str] = {}
    for key in _KNOWN_FIELDS & set(document):
        raw = document[key]
        if isinstance(raw, bool):
            fields[key] = "true" if raw else "false"
        elif isinstance(raw, int | float) and key == "timeout":
            fields[key] = f"{raw}s"
        elif isinstance(raw, list) and key == "region" and all(isinstance(item, str) for item in raw):
            fields[key] = ",".join(raw)
        elif isinstance(raw, str):
            fields[key] = raw
        else:
            raise InvalidReplay(f"field {key!r} has the wrong type")
    return _instruction_from_fields(
        fields,
        transform=_transform_from_json(document.get("transform")),
        cache=_cache_from_json(document.get("cache")),
    )


def _instruction_from_fields(
    fields: dict[str, str], *, transform: ReplayTransform | None, cache: ReplayCacheDirective | None
) -> ReplayInstruction:
    elsewhere = fields.get("elsewhere", "false").lower()
    if elsewhere not in ("true", "false"):
        raise InvalidReplay("elsewhere must be true or false")
    fallback = fields.get("fallback")
    if fallback not in (None, "force_self", "prefer_self"):
        raise InvalidReplay(f"fallback {fallback!r} is not force_self or prefer_self")
    regions = tuple(region.strip() for region in fields["region"].split(",")) if "region" in fields else ()
    if any(not region for region in regions):
        raise InvalidReplay("region list has an empty entry")
    # Fly's durations count whole milliseconds: keep what the header form can say again.
    timeout = round(parse_duration(fields["timeout"]) * 1000) / 1000 if "timeout" in fields else None
    instruction = ReplayInstruction(
        instance=fields.get("instance"),
        prefer_instance=fields.get("prefer_instance"),
        regions=regions,
        app=fields.get("app") or None,
        elsewhere=elsewhere == "true",
        state=fields.get("state"),
        timeout=timeout,
        fallback=fallback,  # type: ignore[arg-type]  # checked against the Literal above
        transform=transform,
        cache=cache,
    )
    targets = sum(
        (
            instruction.instance is not None,
            instruction.prefer_instance is not None,
            bool(instruction.regions),
            instruction.app is not None,
            instruction.elsewhere,
        )
    )
    if targets == 0 and cache is None:
        raise InvalidReplay("no target: give instance, prefer_instance, region, app or elsewhere")
    return instruction


def _transform_from_json(raw: object) -> ReplayTransform | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidReplay("transform must be an object")
    path = raw.get("path")
    if path is not None and (not isinstance(path, str) or not path.startswith("/")):
        raise InvalidReplay("transform.path must be a string starting with '/'")
    set_headers = raw.get("set_headers", [])
    delete_headers = raw.get("delete_headers", [])
    pairs: list[tuple[str, str]] = []
    if isinstance(set_headers, dict):
        set_headers = [{"name": name, "value": value} for name, value in set_headers.items()]
    if not isinstance(set_headers, list):
        raise InvalidReplay("transform.set_headers must be a list of {name, value}")
    for item in set_headers:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str) and isinstance(item.get("value"), str)):
            raise InvalidReplay("transform.set_headers must be a list of {name, value}")
        pairs.append((item["name"], item["value"]))
    if not (isinstance(delete_headers, list) and all(isinstance(name, str) for name in delete_headers)):
        raise InvalidReplay("transform.delete_headers must be a list of names")
    return ReplayTransform(path=path, set_headers=tuple(pairs), delete_headers=tuple(delete_headers))


def _cache_from_json(raw: object) -> ReplayCacheDirective | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise InvalidReplay("cache must be an object")
    if raw.get("invalidate") is True:
        return ReplayCacheDirective(invalidate=True)
    prefix, ttl = raw.get("prefix"), raw.get("ttl")
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise InvalidReplay("cache.prefix must be a path starting with '/'")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 10:
        raise InvalidReplay("cache.ttl must be a whole number of seconds, at least 10")
    return ReplayCacheDirective(prefix=prefix, ttl_seconds=ttl)


@dataclass(frozen=True, slots=True)
class ReplaySource:
    """``fly-replay-src``: which machine replayed the request to this one."""

    instance: str | None = None
    region: str | None = None
    t: int | None = None
    state: str | None = None

    def to_header(self) -> str:
        return _join_present(instance=self.instance, region=self.region, t=self.t, state=self.state)


def parse_replay_src(value: str) -> ReplaySource:
    """Parse ``fly-replay-src`` in any field order, with fields missing. Never raises."""
    fields = parse_fields(value[:MAX_HEADER_VALUE])
    t = fields.get("t", "")
    return ReplaySource(
        instance=fields.get("instance") or None,
        region=fields.get("region") or None,
        t=int(t) if t.isascii() and t.isdigit() and len(t) <= 20 else None,
        state=fields.get("state"),
    )


@dataclass(frozen=True, slots=True)
class ReplayFailure:
    """``fly-replay-failed``: a replay whose target could not be reached, sent back by fallback."""

    instance: str | None = None
    app: str | None = None
    region: str | None = None
    replay_source: str | None = None
    reason: str | None = None
    elapsed_ms: int | None = None

    def to_header(self) -> str:
        return _join_present(
            instance=self.instance,
            app=self.app,
            region=self.region,
            replay_source=self.replay_source,
            reason=self.reason,
            elapsed_ms=self.elapsed_ms,
        )


def parse_replay_failed(value: str) -> ReplayFailure:
    """Parse ``fly-replay-failed`` leniently. Never raises."""
    fields = parse_fields(value[:MAX_HEADER_VALUE])
    elapsed = fields.get("elapsed_ms", "")
    return ReplayFailure(
        instance=fields.get("instance") or None,
        app=fields.get("app") or None,
        region=fields.get("region") or None,
        replay_source=fields.get("replay_source") or None,
        reason=fields.get("reason") or None,
        elapsed_ms=int(elapsed) if elapsed.isascii() and elapsed.isdigit() and len(elapsed) <= 12 else None,
    )
