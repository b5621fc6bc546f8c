"""The affinity layer's figures, and their Prometheus exposition (``register_metrics``).

The hot path adds to plain integers (a ``prometheus_client`` counter's ``inc()`` costs more than
the rest of serving a request); a collector turns them into metric families when ``/metrics`` is
scraped. Nothing is registered at import: the app that serves metrics calls ``register_metrics()``
(``prometheus-client`` is the ``metrics`` extra). A machine of several worker processes is one
machine to the scraper: each worker publishes its figures to a file and whichever worker answers
sums them (``fly_replay_router.affinity.worker_metrics``).

Names follow Prometheus's conventions (``_total`` counters, ``_seconds`` in base units). Labels
stay bounded: ``machine`` is this process's own id, ``outcome`` one of six words, ``reason`` one of
the decision's fixed codes, ``transport`` one of two. Owners and sessions are never labels: machine
ids come and go with every blue-green deploy.

Reference: Prometheus "Metric and label naming" (https://prometheus.io/docs/practices/naming/) and
"Writing exporters" (https://prometheus.io/docs/instrumenting/writing_exporters/).
"""

from __future__ import annotations

import bisect
import time
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from fly_replay_router.affinity import figures as fig

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

# Every middleware's counts, for the collector; weak, so a discarded middleware is forgotten.
_ALL_COUNTS: weakref.WeakSet[DecisionCounts] = weakref.WeakSet()
_REGISTERED: set[int] = set()


class _Live(Protocol):
    legacy_streams: int

    def count(self, now: float) -> int: ...


class SessionBudget(Protocol):
    """What the collector reads of the layer's admission control at scrape time."""

    @property
    def live(self) -> _Live: ...

    @property
    def max_sessions(self) -> int | None: ...


class DecisionCounts:
    """One middleware's figures: ``served`` and ``passed`` as attributes, the rest by (outcome, reason).

    ``handover(seconds)`` adds one hand-over to the latency histogram; ``watch(admission)`` names the
    session budget the collector reads when scraped (held sessions and the caps).
    """

    __slots__ = ("__weakref__", "_budget", "handover_buckets", "handover_sum", "machine", "other", "passed", "served")

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self.served = 0
        self.passed = 0
        self.other: dict[tuple[str, str], int] = {}
        # Per bucket, not cumulative (the last one is +Inf); summed across workers as they are.
        self.handover_buckets = [0] * (len(fig.HANDOVER_BUCKETS) + 1)
        self.handover_sum = 0.0
        self._budget: SessionBudget | None = None
        _ALL_COUNTS.add(self)

    def add(self, outcome: str, reason: str) -> None:
        key = (outcome, reason)
        self.other[key] = self.other.get(key, 0) + 1

    def handover(self, seconds: float) -> None:
        """One request handed over to its owner worker took ``seconds`` until the owner's answer ended."""
        self.handover_buckets[bisect.bisect_left(fig.HANDOVER_BUCKETS, seconds)] += 1
        self.handover_sum += seconds

    def watch(self, budget: SessionBudget) -> None:
        """Read the sessions held and the caps from ``budget`` (``capacity.Admission``) when scraped."""
        self._budget = budget

    def figures(self, now: float) -> fig.Figures:
        """This middleware's figures at ``now`` (monotonic clock, for the idle sessions' horizon)."""
        decisions = {("served", ""): self.served, ("passed", ""): self.passed, **self.other}
        sessions: dict[str, tuple[int, int | None]] = {}
        budget = self._budget
        if budget is not None:
            live = budget.live
            sessions[fig.STREAMABLE_HTTP] = (live.count(now), budget.max_sessions)
            sessions[fig.LEGACY_SSE] = (live.legacy_streams, getattr(budget, "max_legacy_sessions", None))
        return fig.Figures(
            decisions={(self.machine, outcome, reason): n for (outcome, reason), n in decisions.items()},
            handovers={self.machine: (list(self.handover_buckets), self.handover_sum)},
            sessions={(self.machine, transport): held for transport, held in sessions.items()},
        )


def process_figures() -> fig.Figures:
    """The figures of every live middleware in this process, summed."""
    now = time.monotonic()
    return fig.add_up([counts.figures(now) for counts in list(_ALL_COUNTS)])


def totals() -> dict[tuple[str, str, str], int]:
    """Decisions of every live middleware in this process, by (machine, outcome, reason)."""
    return dict(process_figures().decisions)


def register_metrics(registry: CollectorRegistry | None = None, *, workers_dir: str | None = None) -> None:
    """Expose the layer's metrics on ``registry`` (``prometheus_client``'s global one by default).

    ``workers_dir``: the directory the worker processes of one machine share (see
    ``fly_replay_router.affinity.worker_metrics``); each scrape then sums every worker's figures.
    Without it, a scrape reads this process's figures only (one worker per machine).
    Call it once in the app that serves ``/metrics``; a second call for the same registry does nothing.
    """
    from prometheus_client.registry import REGISTRY, Collector

    target = REGISTRY if registry is None else registry
    if id(target) in _REGISTERED:
        return
    if workers_dir is not None:
        from fly_replay_router.affinity.worker_metrics import WorkerFigures

        shared = WorkerFigures.start(workers_dir, process_figures)

        def gather() -> tuple[fig.Figures, int]:
            return shared.machine_figures()

    else:

        def gather() -> tuple[fig.Figures, int]:
            return process_figures(), 1

    class AffinityCollector(Collector):
        def collect(self) -> Iterator[Any]:
            figures, workers = gather()
            yield from fig.metric_families(figures, workers)

    target.register(AffinityCollector())
    _REGISTERED.add(id(target))
