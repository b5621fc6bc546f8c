"""The affinity layer's decision counters, and their Prometheus exposition (``register_metrics``).

The hot path adds to plain integers (a ``prometheus_client`` counter's ``inc()`` costs more than
the rest of serving a request); a collector reads them when ``/metrics`` is scraped, as
``affinity_decisions_total``. Nothing is registered at import: the app that serves metrics calls
``register_metrics()`` (``prometheus-client`` is the ``metrics`` extra).

Labels stay bounded: ``machine`` is this process's own id, ``outcome`` one of five words and
``reason`` one of the decision's fixed codes. Owners are not labels: machine ids come and go with
every blue-green deploy.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client.registry import CollectorRegistry

# Every middleware's counts, for the collector; weak, so a discarded middleware is forgotten.
_ALL_COUNTS: weakref.WeakSet[DecisionCounts] = weakref.WeakSet()
_REGISTERED: set[int] = set()


class DecisionCounts:
    """One middleware's decisions: ``served`` and ``passed`` as attributes, the rest by (outcome, reason)."""

    __slots__ = ("__weakref__", "machine", "other", "passed", "served")

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self.served = 0
        self.passed = 0
        self.other: dict[tuple[str, str], int] = {}
        _ALL_COUNTS.add(self)

    def add(self, outcome: str, reason: str) -> None:
        key = (outcome, reason)
        self.other[key] = self.other.get(key, 0) + 1


def totals() -> dict[tuple[str, str, str], int]:
    """Decisions of every live middleware in this process, by (machine, outcome, reason)."""
    summed: dict[tuple[str, str, str], int] = {}
    for counts in list(_ALL_COUNTS):
        pairs = [(("served", ""), counts.served), (("passed", ""), counts.passed), *counts.other.items()]
        for (outcome, reason), value in pairs:
            key = (counts.machine, outcome, reason)
            summed[key] = summed.get(key, 0) + value
    return summed


def register_metrics(registry: CollectorRegistry | None = None) -> None:
    """Expose ``affinity_decisions_total`` on ``registry`` (``prometheus_client``'s global one by default).

    Call it once in the app that serves ``/metrics``; a second call for the same registry does nothing.
    """
    from prometheus_client.core import REGISTRY, CounterMetricFamily
    from prometheus_client.registry import Collector

    target = REGISTRY if registry is None else registry
    if id(target) in _REGISTERED:
        return

    class DecisionCollector(Collector):
        def collect(self) -> Iterator[Any]:
            family = CounterMetricFamily(
                "affinity_decisions",
                "Requests seen by the affinity layer, by routing outcome (and reason, for rejections).",
                labels=["machine", "outcome", "reason"],
            )
            for labels, value in sorted(totals().items()):
                family.add_metric(list(labels), value)
            yield family

    target.register(DecisionCollector())
    _REGISTERED.add(id(target))
