"""What the layer tells an operator, as plain figures: summed across workers, then turned into metric families.

``Figures`` is one process's counts (or a machine's, once added up): decisions by (machine, outcome,
reason), the hand-over latency histogram per machine, and the sessions held against each cap. The
metric families an operator reads are views of those figures, computed at scrape time, so the
hot path counts each decision once:

- ``affinity_decisions_total`` (counter): every request the layer routed, by outcome and reason;
- ``affinity_handover_duration_seconds`` (histogram): requests handed to their owner worker, until
  its answer ended;
- ``affinity_handover_failures_total`` (counter): hand-overs that could not be made, by reason;
- ``affinity_forward_failures_total`` (counter): forwards to an owner machine that failed, by reason;
- ``affinity_new_sessions_refused_total`` (counter): new sessions refused (429 too fast, 503 all full);
- ``affinity_new_sessions_sent_elsewhere_total`` (counter): new sessions replayed away from a full machine;
- ``affinity_sessions_held`` (gauge): sessions held now, by transport; ``affinity_sessions_max``
  (gauge): the cap on them (absent when uncapped);
- ``affinity_worker_processes`` (gauge): live worker processes whose figures this scrape sums.

Counters of a fixed label set start at 0, so that a rate exists before the first event.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from fly_replay_router.affinity import forward
from fly_replay_router.affinity.capacity import Full, RateLimited

# Seconds, for the hand-over histogram: a few milliseconds for a call, minutes for a held stream.
HANDOVER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
STREAMABLE_HTTP = "streamable_http"
LEGACY_SSE = "sse"
# Rejections that are a hand-over that could not be made (the owner worker is gone; never twice).
HANDOVER_FAILURES = ("worker_gone", "worker_busy", "already_handed_over")
# Forwards that failed: refused ones, and the one answered but cut short.
FORWARD_FAILURES = tuple(
    outcome.reason
    for outcome in (
        forward.BAD_TARGET,
        forward.UNREACHABLE,
        forward.BUSY,
        forward.TIMED_OUT,
        forward.FAILED,
        forward.CLIENT_LEFT,
        forward.CLIENT_STALLED,
        forward.ANSWER_CUT,
    )
)
REFUSALS = ((RateLimited.reason, RateLimited.status), (Full.reason, Full.status))

Decisions = dict[tuple[str, str, str], int]
Histograms = dict[str, tuple[list[int], float]]
Sessions = dict[tuple[str, str], tuple[int, int | None]]


@dataclass(slots=True)
class Figures:
    """Counts of one process or one machine (see the module docstring)."""

    decisions: Decisions = field(default_factory=dict)
    handovers: Histograms = field(default_factory=dict)
    sessions: Sessions = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "decisions": [[*key, value] for key, value in self.decisions.items()],
            "handovers": {machine: [buckets, total] for machine, (buckets, total) in self.handovers.items()},
            "sessions": [[*key, held, cap] for key, (held, cap) in self.sessions.items()],
        }

    @classmethod
    def from_json(cls, document: Mapping[str, Any]) -> Figures:
        """The inverse of ``to_json``; ``ValueError`` (or ``TypeError``) when it is not one."""
        decisions = {(str(m), str(o), str(r)): int(n) for m, o, r, n in document["decisions"]}
        handovers: Histograms = {}
        for machine, (buckets, total) in document["handovers"].items():
            if len(buckets) != len(HANDOVER_BUCKETS) + 1:
                raise ValueError("a hand-over histogram of other buckets")
            handovers[str(machine)] = ([int(n) for n in buckets], float(total))
        sessions = {
            (str(m), str(t)): (int(held), None if cap is None else int(cap)) for m, t, held, cap in document["sessions"]
        }
        return cls(decisions, handovers, sessions)


def add_up(parts: Iterable[Figures], *, sessions_of: Iterable[Figures] | None = None) -> Figures:
    """The sum of ``parts``; the sessions of ``sessions_of`` only (default: the same parts).

    Counters of a worker that is gone still count (a counter never goes down); what it held does not.
    """
    parts = list(parts)
    total = Figures()
    for part in parts:
        for key, value in part.decisions.items():
            total.decisions[key] = total.decisions.get(key, 0) + value
        for machine, (buckets, seconds) in part.handovers.items():
            summed, summed_seconds = total.handovers.get(machine, ([0] * len(buckets), 0.0))
            total.handovers[machine] = ([a + b for a, b in zip(summed, buckets, strict=True)], summed_seconds + seconds)
    for part in parts if sessions_of is None else sessions_of:
        for where, (held, cap) in part.sessions.items():
            held_before, cap_before = total.sessions.get(where, (0, 0))
            capped = None if cap is None or cap_before is None else cap_before + cap
            total.sessions[where] = (held_before + held, capped)
    return total


def metric_families(figures: Figures, workers: int) -> Iterator[Any]:
    """The metric families of ``figures``, the sum of ``workers`` live worker processes."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    machines = sorted({key[0] for key in figures.decisions} | set(figures.handovers))
    decisions = figures.decisions
    family = CounterMetricFamily(
        "affinity_decisions",
        "Requests seen by the affinity layer, by routing outcome (and reason, for rejections).",
        labels=["machine", "outcome", "reason"],
    )
    for labels, value in sorted(decisions.items()):
        family.add_metric(list(labels), value)
    yield family

    histogram = HistogramMetricFamily(
        "affinity_handover_duration_seconds",
        "Requests handed over to the worker process that owns their session: seconds until its answer ended.",
        labels=["machine"],
    )
    for machine, (buckets, seconds) in sorted(figures.handovers.items()):
        cumulative, points = 0, []
        for bound, count in zip([*map(_bound, HANDOVER_BUCKETS), "+Inf"], buckets, strict=True):
            cumulative += count
            points.append((bound, cumulative))
        histogram.add_metric([machine], points, sum_value=seconds)
    yield histogram

    yield _by_reason(
        "affinity_handover_failures",
        "Requests for another worker's session that could not be handed over (answered 404), by reason.",
        machines,
        decisions,
        [("rejected", reason) for reason in HANDOVER_FAILURES],
    )
    yield _by_reason(
        "affinity_forward_failures",
        "Forwards to a session's owner machine that failed, by reason (answer_cut_short: it had begun; "
        "owner_unreachable also counts replays Fly could not deliver).",
        machines,
        decisions,
        [("forwarded" if reason == forward.ANSWER_CUT.reason else "rejected", reason) for reason in FORWARD_FAILURES],
    )
    refused = CounterMetricFamily(
        "affinity_new_sessions_refused",
        "Requests that would have opened a session, refused: 429 (this client is too fast), 503 (all full).",
        labels=["machine", "reason", "status"],
    )
    for machine in machines:
        for reason, status in REFUSALS:
            refused.add_metric([machine, reason, str(status)], decisions.get((machine, "rejected", reason), 0))
    yield refused
    elsewhere = CounterMetricFamily(
        "affinity_new_sessions_sent_elsewhere",
        "New sessions this machine was too full to open, replayed by Fly's proxy to another machine.",
        labels=["machine"],
    )
    for machine in machines:
        elsewhere.add_metric([machine], decisions.get((machine, "replayed", Full.reason), 0))
    yield elsewhere

    held = GaugeMetricFamily(
        "affinity_sessions_held",
        "Sessions this machine holds now (streamable_http: minted and not idle; sse: open legacy streams).",
        labels=["machine", "transport"],
    )
    cap = GaugeMetricFamily(
        "affinity_sessions_max",
        "The most sessions this machine opens (beyond it, new ones go elsewhere); absent when uncapped.",
        labels=["machine", "transport"],
    )
    for (machine, transport), (count, limit) in sorted(figures.sessions.items()):
        held.add_metric([machine, transport], count)
        if limit is not None:
            cap.add_metric([machine, transport], limit)
    yield held
    yield cap
    processes = GaugeMetricFamily(
        "affinity_worker_processes", "Live worker processes whose figures this answer sums.", labels=["machine"]
    )
    for machine in machines:
        processes.add_metric([machine], workers)
    yield processes


def _by_reason(
    name: str, documentation: str, machines: list[str], decisions: Decisions, keys: list[tuple[str, str]]
) -> Any:
    from prometheus_client.core import CounterMetricFamily

    family = CounterMetricFamily(name, documentation, labels=["machine", "reason"])
    for machine in machines:
        for outcome, reason in keys:
            family.add_metric([machine, reason], decisions.get((machine, outcome, reason), 0))
    return family


def _bound(seconds: float) -> str:
    return repr(float(seconds))
