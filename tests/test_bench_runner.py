"""The benchmark runner: a group that crashes does not cost the others their figures.

The groups here are stand-ins (the real ones start servers for minutes); what is under test is
the runner around them: the JSON it writes, the table it prints, its exit status.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bench import __main__ as bench


async def _fine(report: bench.Report, quick: bool, throughput: bench.Budget) -> None:
    report.results["fine_ratio"] = 1.25


async def _crashing(report: bench.Report, quick: bool, throughput: bench.Budget) -> None:
    report.results["crash_half_done"] = 3.0  # written before the crash: must not be reported
    raise RuntimeError("the server did not start")


async def _fine_later(report: bench.Report, quick: bool, throughput: bench.Budget) -> None:
    report.results["later_us"] = 7.0


def test_a_crashing_group_is_named_with_its_reason_and_the_others_are_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench, "GROUP_RUNS", {"fine": _fine, "crash": _crashing, "later": _fine_later})
    monkeypatch.setattr(
        bench, "GROUPS", {"fine": ("fine_ratio",), "crash": ("crash_half_done",), "later": ("later_us",)}
    )
    monkeypatch.setattr(
        bench,
        "TARGETS",
        {
            "fine_ratio": bench.Target(">=", 1.0, ""),
            "crash_half_done": bench.Target("", None, ""),
            "later_us": bench.Target("<=", 10, " µs"),
        },
    )
    out = tmp_path / "results.json"

    status = bench.main(["--out", str(out)])

    document = json.loads(out.read_text())
    assert status == 1
    assert document["results"] == {"fine_ratio": 1.25, "later_us": 7.0}
    assert document["failed"] == {"crash": "RuntimeError: the server did not start"}
    assert any("the server did not start" in line for line in document["details"]["failed_crash"]["traceback"])
    printed = capsys.readouterr().out
    assert "FAILED group crash (keys crash_half_done left out): RuntimeError: the server did not start" in printed
    assert "later_us" in printed


def test_a_run_without_failures_exits_0(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(bench, "GROUP_RUNS", {"fine": _fine})
    monkeypatch.setattr(bench, "GROUPS", {"fine": ("fine_ratio",)})
    monkeypatch.setattr(bench, "TARGETS", {"fine_ratio": bench.Target(">=", 1.0, "")})
    out = tmp_path / "results.json"
    assert bench.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["failed"] == {}


def test_the_crossing_floor_runs_in_every_placement() -> None:
    """The floor under the hand-over figures (``crossing.py``), in a short real run: the echoing
    process starts, is pinned, answers, and reports its CPU, in each placement."""
    from tests.bench import crossing

    figures = crossing.round_trips(blocks=2, round_trips=200)
    assert figures["round_trips_each"] == 400
    for placement in ("apart", "together", "unpinned"):
        assert 0 < figures[f"{placement}_us"] < 100_000
        assert figures[f"{placement}_cpu_us"] > 0
