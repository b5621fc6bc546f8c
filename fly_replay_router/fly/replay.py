"""``fly-replay``: an app's instruction to the proxy, in its header and JSON forms.

Reference: "Dynamic request routing with fly-replay" (https://fly.io/docs/networking/dynamic-request-routing/):
the fields, the JSON form (``application/vnd.fly.replay+json``) with ``transform`` and ``cache``,
and error PA03 for an instruction the proxy cannot follow.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from fly_replay_router.fly.fields import InvalidReplay, format_duration, format_fields, parse_duration, parse_fields
from fly_replay_router.fly.names import MACHINE_ID_PATTERN, MAX_HEADER_VALUE, NAME, STATE, Fallback


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
        if self.state is not None and not STATE.fullmatch(self.state):
            raise InvalidReplay("state must be visible ASCII without ';' or '\"'")
        if any(not NAME.fullmatch(region) for region in self.regions):
            raise InvalidReplay("a region must be letters, digits, '-' or '_'")
        if self.app is not None and not NAME.fullmatch(self.app):
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
        return format_fields(pairs)


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
