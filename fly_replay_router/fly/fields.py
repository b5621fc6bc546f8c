"""The field grammar Fly's headers share: ``key=value;key="a,b"`` and durations such as ``800ms``.

Reference: "Dynamic request routing with fly-replay" (https://fly.io/docs/networking/dynamic-request-routing/).
"""

from __future__ import annotations

import math
import re

from fly_replay_router.fly.names import MAX_DURATION_SECONDS

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


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


def format_fields(pairs: list[tuple[str, str]]) -> str:
    return ";".join(f'{key}="{value}"' if "," in value else f"{key}={value}" for key, value in pairs)


def join_present(**fields: str | int | None) -> str:
    return ";".join(f"{key}={value}" for key, value in fields.items() if value is not None)


def ascii_decimal(text: str, *, max_digits: int) -> int | None:
    """``text`` as a non-negative decimal number of ASCII digits only (at most ``max_digits``), else None.

    ``int()`` and ``str.isdigit()`` accept any Unicode digit (``int("\u0663")`` is 3, ``"\u00b2".isdigit()``
    is true but ``int()`` refuses it); HTTP's grammar has only ASCII ``DIGIT`` (RFC 9110 section 5.6.1,
    RFC 5234 appendix B.1), so every number read from a header or a path goes through here.
    """
    if not 0 < len(text) <= max_digits or not text.isascii() or not text.isdigit():
        return None
    return int(text)


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
