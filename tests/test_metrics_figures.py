"""What a scrape tells an operator: the budget, refusals, failures by reason, hand-over latency; workers summed.

In process, one worker (the cheap scrape-time collector), then the files of several worker
processes summed, with a real second process holding (or no longer holding) its lock.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from fly_replay_router import AffinityMiddleware, AffinitySettings
from fly_replay_router.affinity import figures as fig
from fly_replay_router.affinity.metrics import DecisionCounts, register_metrics
from fly_replay_router.affinity.worker_metrics import WorkerFigures
from tests.test_capacity import KEY, MintingApp, request

pytestmark = pytest.mark.anyio

MACHINE = "f1f1f1f1f1f1f1"
OTHER_WORKER = "0badf00d"


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted({"machine": MACHINE, **labels}.items())))]


async def test_one_worker_scrape_shows_the_budget_refusals_and_failures_by_reason() -> None:
    settings = AffinitySettings(
        machine_id=MACHINE, secret_keys=(KEY,), max_sessions=2, new_session_rate=0.001, new_session_burst=2
    )
    layer = AffinityMiddleware(MintingApp(), settings=settings)
    registry = CollectorRegistry()
    register_metrics(registry)
    client = [(b"fly-client-ip", b"203.0.113.7")]
    assert [(await request(layer, headers=client))[0] for _ in range(2)] == [200, 200]
    assert (await request(layer, headers=client))[0] == 429  # this client is too fast
    other = [(b"fly-client-ip", b"198.51.100.1")]
    assert (await request(layer, headers=other))[0] == 307  # full: replayed elsewhere
    full_twice = [*other, (b"fly-replay-src", b"instance=bbbbbbbbbbbbbb;state=full-2")]
    assert (await request(layer, headers=full_twice))[0] == 503  # every machine tried is full
    # A session of another worker of this machine that is not there to take it.
    foreign = layer._codec.issue(MACHINE, f"{OTHER_WORKER}~inner", now=time.time())
    assert (await request(layer, headers=[(b"mcp-session-id", foreign.encode())]))[0] == 404

    found = samples(registry)
    assert value(found, "affinity_sessions_held", transport="streamable_http") == 2
    assert value(found, "affinity_sessions_max", transport="streamable_http") == 2
    assert value(found, "affinity_sessions_held", transport="sse") == 0
    assert ("affinity_sessions_max", (("machine", MACHINE), ("transport", "sse"))) not in found  # uncapped
    assert value(found, "affinity_new_sessions_refused_total", reason="rate_limited", status="429") == 1
    assert value(found, "affinity_new_sessions_refused_total", reason="at_capacity", status="503") == 1
    assert value(found, "affinity_new_sessions_sent_elsewhere_total") == 1
    assert value(found, "affinity_handover_failures_total", reason="worker_gone") == 1
    assert value(found, "affinity_handover_failures_total", reason="already_handed_over") == 0
    assert value(found, "affinity_forward_failures_total", reason="owner_unreachable") == 0
    assert value(found, "affinity_decisions_total", outcome="passed", reason="") == 2
    assert value(found, "affinity_worker_processes") == 1


def test_hand_over_latency_is_a_histogram_in_seconds() -> None:
    counts = DecisionCounts(MACHINE + "h")
    for seconds in (0.0004, 0.003, 0.003, 0.2, 400.0):
        counts.handover(seconds)
    families = list(fig.metric_families(counts.figures(time.monotonic()), 1))
    (histogram,) = [family for family in families if family.name == "affinity_handover_duration_seconds"]
    by_bound = {s.labels["le"]: s.value for s in histogram.samples if s.name.endswith("_bucket")}
    assert (by_bound["0.001"], by_bound["0.005"], by_bound["0.25"], by_bound["300.0"]) == (1, 3, 4, 4)
    assert by_bound["+Inf"] == 5
    (total,) = [s.value for s in histogram.samples if s.name.endswith("_sum")]
    assert total == pytest.approx(400.2064)


def _figures(passed: int, held: int) -> fig.Figures:
    return fig.Figures(
        decisions={(MACHINE, "passed", ""): passed},
        handovers={MACHINE: ([0] * (len(fig.HANDOVER_BUCKETS) + 1), 0.0)},
        sessions={(MACHINE, fig.STREAMABLE_HTTP): (held, 100)},
    )


def _sibling(directory: Path, passed: int, held: int) -> subprocess.Popen[str]:
    """Another worker process: publishes its figures, says so, and lives until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from fly_replay_router.affinity import figures as fig
        from fly_replay_router.affinity.worker_metrics import WorkerFigures
        from tests.test_metrics_figures import _figures
        WorkerFigures({str(directory)!r}, lambda: _figures({passed}, {held})).publish()
        print("published", flush=True)
        sys.stdin.read()
    """)
    process = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "published"
    return process


def test_workers_add_up_and_a_dead_workers_counts_stay_but_not_its_sessions(tmp_path: Path) -> None:
    here = WorkerFigures(str(tmp_path), lambda: _figures(5, 1))
    sibling = _sibling(tmp_path, passed=7, held=3)
    try:
        summed, alive = here.machine_figures()
        assert alive == 2
        assert summed.decisions[(MACHINE, "passed", "")] == 12
        assert summed.sessions[(MACHINE, fig.STREAMABLE_HTTP)] == (4, 200)
    finally:
        assert sibling.stdin is not None
        sibling.stdin.close()
        sibling.wait(timeout=10)
        assert sibling.stdout is not None
        sibling.stdout.close()
    # The sibling died: its lock is free, its counts stay (a counter never goes down), its sessions leave.
    summed, alive = here.machine_figures()
    assert alive == 1
    assert summed.decisions[(MACHINE, "passed", "")] == 12
    assert summed.sessions[(MACHINE, fig.STREAMABLE_HTTP)] == (1, 100)


def test_a_stray_file_in_the_directory_does_not_fail_the_scrape(tmp_path: Path) -> None:
    (tmp_path / "stray.json").write_text('{"decisions": "not a list"}')
    summed, alive = WorkerFigures(str(tmp_path), lambda: _figures(2, 0)).machine_figures()
    assert (summed.decisions[(MACHINE, "passed", "")], alive) == (2, 1)


def test_a_directory_others_may_write_to_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o777)
    with pytest.raises(PermissionError, match="others must not write"):
        WorkerFigures(str(tmp_path), lambda: _figures(1, 0)).publish()


def test_forward_failures_are_the_forwards_refused_and_the_answers_cut_short() -> None:
    figures = fig.Figures(
        decisions={
            (MACHINE, "rejected", "owner_timeout"): 3,
            (MACHINE, "forwarded", "answer_cut_short"): 2,
            (MACHINE, "forwarded", ""): 9,  # answered in full: not a failure
            (MACHINE, "rejected", "expired"): 4,  # a token's reason: not a forward's
        }
    )
    (family,) = [f for f in fig.metric_families(figures, 1) if f.name == "affinity_forward_failures"]
    failures = {s.labels["reason"]: s.value for s in family.samples}
    assert failures["owner_timeout"] == 3
    assert failures["answer_cut_short"] == 2
    assert sum(failures.values()) == 5
    assert set(failures) == set(fig.FORWARD_FAILURES)
