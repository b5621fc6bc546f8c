"""The Grafana dashboard in docs/grafana/ asks only for metrics the layer exports (from a real scrape).

A panel whose query names a metric nobody exports shows "No data" forever, and nothing else says
so: a renamed metric would silently blank the operator's view. The names come from scraping the
image's command, not from a list kept beside the dashboard. The metrics reference in
docs/operate.md is checked against the same scrape, both ways.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, Machine, start_machine

DASHBOARD = ROOT / "docs" / "grafana" / "fly-replay-router.json"
OPERATE = ROOT / "docs" / "operate.md"
_HISTOGRAM_SAMPLES = ("_bucket", "_sum", "_count")
# What is left of a PromQL expression once strings, label matchers, ranges and grouping are removed:
# functions (followed by "("), operators' keywords, and metric names.
_STRIPPED = (
    r'"(?:[^"\\]|\\.)*"',
    r"\{[^}]*\}",
    r"\[[^\]]*\]",
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}
# Fly's Prometheus adds these to every scraped series (the layer does not); the dashboard filters on them.
FLY_LABELS = {"app", "region"}


@pytest.fixture(scope="module")
def exported() -> tuple[set[str], set[str]]:
    """Sample names and label names of one scrape of the image's command (with a session budget)."""
    machine: Machine = start_machine("d1d1d1d1d1d1d1", extra_env={"FLY_VM_MEMORY_MB": "512"})
    try:
        assert machine.metrics_url is not None
        text = httpx.get(f"{machine.metrics_url}/metrics", timeout=10).text
    finally:
        machine.stop()
    names: set[str] = set()
    labels: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.add(sample.name)
            labels.update(sample.labels)
    return names, labels


def metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    for pattern in _STRIPPED:
        expression = re.sub(pattern, " ", expression)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*(?P<call>\s*\()?", expression):
        word = match.group(0).rstrip("( \t")
        if not match["call"] and word not in _KEYWORDS:
            names.add(word)
    return names


def _label_names(expression: str) -> set[str]:
    found = set()
    for matchers in re.findall(r"\{([^}]*)\}", expression):
        found.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expression):
        found.update(name.strip() for name in grouping.split(",") if name.strip())
    return found


def _queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            yield f"variable {variable['name']}", inner.group(1) if inner else query


def test_the_expression_parser_finds_metric_names_and_only_those() -> None:
    expression = (
        'histogram_quantile(0.95, sum by (le, machine) (rate(a_seconds_bucket{app=~"$app", x="sum(y)"}[5m])))'
        " / ignoring (le) b_total or vector(0)"
    )
    assert metric_names(expression) == {"a_seconds_bucket", "b_total"}


def test_every_panel_names_metrics_and_labels_the_layer_exports(exported: tuple[set[str], set[str]]) -> None:
    names, labels = exported
    dashboard = json.loads(DASHBOARD.read_text())
    queries = list(_queries(dashboard))
    assert len(queries) >= 12
    for where, expression in queries:
        used = metric_names(expression)
        assert used, f"{where}: {expression} names no metric"
        assert used <= names, f"{where}: {sorted(used - names)} not in a scrape of the image's command"
        assert _label_names(expression) - {"le"} <= labels | FLY_LABELS, f"{where}: {expression}"


def test_the_dashboard_shows_what_the_operator_needs() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = " ".join(expression for _, expression in _queries(dashboard))
    for metric in (
        "affinity_decisions_total",
        "affinity_handover_duration_seconds_bucket",
        "affinity_sessions_held",
        "affinity_sessions_max",
        "affinity_new_sessions_refused_total",
        "affinity_new_sessions_sent_elsewhere_total",
        "affinity_forward_failures_total",
        "affinity_handover_failures_total",
    ):
        assert metric in expressions, metric
    # Every panel reads the data source the importer chooses (Fly's is "Prometheus on Fly").
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} == {"datasource", "app", "region", "machine"}


def test_the_metrics_reference_lists_every_metric_the_layer_exports_and_no_other(
    exported: tuple[set[str], set[str]],
) -> None:
    names, _ = exported
    layer = {name for name in names if name.startswith("affinity_")}
    rows = re.findall(r"^\| `(affinity_[a-z_]+)` \| (counter|gauge|histogram) \|", OPERATE.read_text(), re.MULTILINE)
    documented = {name: kind for name, kind in rows}
    covered: set[str] = set()
    for name, kind in documented.items():
        samples = {name + suffix for suffix in _HISTOGRAM_SAMPLES} if kind == "histogram" else {name}
        assert samples <= layer, f"docs/operate.md lists {name}, which a scrape does not have"
        covered |= samples
    assert layer <= covered, f"not in docs/operate.md: {sorted(layer - covered)}"
