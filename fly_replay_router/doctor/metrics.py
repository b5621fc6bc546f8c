"""Metrics are private: ``GET /metrics`` on the public URL does not answer with the layer's metrics.

Every port an ``[http_service]`` serves is public on Fly; the layer's counters name the machines and
the reasons tokens were refused (what a uniform 404 hides from a prober). Fly's managed Prometheus
scrapes fly.toml's ``[metrics]`` port over the private network instead.

Reference: Fly "Metrics on Fly.io" (https://fly.io/docs/monitoring/metrics/).
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

from fly_replay_router.doctor.results import CheckResult, failed, passed
from fly_replay_router.doctor.wire import Endpoint

# The layer's own metric family (fly_replay_router.affinity.metrics).
LAYER_METRIC = b"affinity_decisions"


def metrics_url(url: str, path: str = "/metrics") -> str:
    """``path`` on the origin of the MCP endpoint ``url``."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


async def check_metrics_private(endpoint: Endpoint) -> CheckResult:
    """``GET /metrics`` on the public origin: anything but the layer's metrics passes."""
    url = metrics_url(endpoint.url)
    exchange = await endpoint.get(url)
    prometheus = b"# TYPE " in exchange.body_start or b"# HELP " in exchange.body_start
    evidence = {"url": url, "status": exchange.describe(), "prometheus_text": prometheus}
    if exchange.ok and LAYER_METRIC in exchange.body_start:
        return failed(
            "metrics_private",
            f"GET {url} answered {exchange.status} with the layer's metrics",
            "the metrics are served on the public port: serve them on a port of their own that no [http_service] "
            "exposes (fly_replay_router.serve --metrics-port 9091, fly.toml [metrics] port = 9091)",
            **evidence,
        )
    note = " (other Prometheus metrics are public there)" if exchange.ok and prometheus else ""
    return passed("metrics_private", f"GET /metrics answered {exchange.describe()}{note}", **evidence)
