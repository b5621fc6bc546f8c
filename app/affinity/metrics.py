"""Prometheus counters of the affinity layer (served by the app at ``/metrics``).

Labels stay bounded: ``machine`` is this process's own id, ``outcome`` one of five words and
``reason`` one of the decision's fixed codes. Owners are not labels: machine ids come and go with
every blue-green deploy.
"""

from __future__ import annotations

from prometheus_client import Counter

OUTCOMES = ("served", "replayed", "forwarded", "rejected", "passed")

DECISIONS = Counter(
    "affinity_decisions",
    "Requests seen by the affinity layer, by routing outcome (and reason, for rejections).",
    ["machine", "outcome", "reason"],
)
