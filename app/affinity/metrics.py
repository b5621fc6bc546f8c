"""Prometheus counters of the affinity layer (served by the app at ``/metrics``).

The hot path adds to plain integers (a ``prometheus_client`` counter's ``inc()`` costs more than
the rest of serving a request); a collector registered with ``prometheus_client`` reads them when
``/metrics`` is scraped, as ``affinity_decisions_total``.

Labels stay bounded: ``machine`` is this process's own id, ``outcome`` one of five words and
``reason`` one of the decision's fixed codes. Owners are not labels: machine ids come and go with
every blue-green deploy.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client.core import REGISTRY, CounterMetricFamily
from prometheus_client.registry import Collector


class DecisionCounts:
    """One middleware's decisions: ``served`` and ``passed`` as attributes, the rest by (outcome, reason)."""

    __slots__ = ("__weakref__", "machine", "other", "passed", "served")

    def __init__(self, machine: str) -> None:
        self.machine = machine
        self.served = 0
        self.passed = 0
        self.other: dict[tuple[str, str], int] = {}
        _COLLECTOR.counts.add(self)

    def add(self, outcome: str, reason: str) -> None:
        key = (outcome, reason)
        self.other[key] = self.other.get(key, 0) + 1


class _DecisionCollector(Collector):
    def __init__(self) -> None:
        self.counts: weakref.WeakSet[DecisionCounts] = weakref.WeakSet()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "affinity_decisions",
            "Requests seen by the affinity layer, by routing outcome (and reason, for rejections).",
            labels=["machine", "outcome", "reason"],
        )
        totals: dict[tuple[str, str, str], int] = {}
        for counts in list(self.counts):
            pairs = [(("served", ""), counts.served), (("passed", ""), counts.passed), *counts.other.items()]
            for (outcome, reason), value in pairs:
                key = (counts.machine, outcome, reason)
                totals[key] = totals.get(key, 0) + value
        for labels, value in sorted(totals.items()):
            family.add_metric(list(labels), value)
        yield family


_COLLECTOR = _DecisionCollector()
REGISTRY.register(_COLLECTOR)
