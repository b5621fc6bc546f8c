"""What a check reports: pass, fail or unknown, the evidence, and on failure the likely cause and where the fix is."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

Outcome = Literal["pass", "fail", "unknown"]

# The page and section of the project's documentation that fixes each failure (docs/deploy.md).
FIXES = {
    "reachable": "deploy.md#the-endpoint-does-not-answer",
    "host_allowed": "deploy.md#allow-your-host-names",
    "handshake": "deploy.md#put-the-layer-in-front-of-the-mcp-routes",
    "sessions_stick": "deploy.md#one-secret-for-every-machine",
    "replays": "deploy.md#replays-and-the-replay-cache",
    "headers_survive_replay": "deploy.md#headers-on-a-replay",
    "large_bodies": "deploy.md#the-private-network",
    "event_streams": "deploy.md#event-streams",
    "refusals": "deploy.md#refusals",
    "metrics_private": "deploy.md#keep-metrics-private",
}


@dataclass
class CheckResult:
    """One check's verdict. ``evidence`` holds what was measured (status codes, counts, milliseconds)."""

    name: str
    outcome: Outcome
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    cause: str | None = None

    @property
    def fix(self) -> str | None:
        """The documentation section to read, for a failure."""
        return FIXES.get(self.name) if self.outcome == "fail" else None

    def to_json(self) -> dict[str, Any]:
        """The result as the ``--json`` report holds it: cause and fix only on a failure."""
        document: dict[str, Any] = {
            "check": self.name,
            "outcome": self.outcome,
            "summary": self.summary,
            "evidence": self.evidence,
        }
        if self.outcome == "fail":
            document["cause"] = self.cause
            document["fix"] = self.fix
        return document


def passed(name: str, summary: str, **evidence: Any) -> CheckResult:
    """A passing result."""
    return CheckResult(name, "pass", summary, evidence)


def failed(name: str, summary: str, cause: str, **evidence: Any) -> CheckResult:
    """A failing result, with its most likely cause (the fix follows from ``name``)."""
    return CheckResult(name, "fail", summary, evidence, cause)


def unknown(name: str, summary: str, **evidence: Any) -> CheckResult:
    """A result the doctor could not decide (not a failure)."""
    return CheckResult(name, "unknown", summary, evidence)


def milliseconds(seconds: list[float]) -> float | None:
    """The median of ``seconds`` in milliseconds, one decimal; None for no samples."""
    return round(statistics.median(seconds) * 1000, 1) if seconds else None


def status_counts(statuses: list[str]) -> dict[str, int]:
    """``{"200": 20, "404": 3}``: how often each status (or transport error) came back."""
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))
