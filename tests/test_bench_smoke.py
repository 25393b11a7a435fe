"""The benchmark suite runs: every benchmark at its smallest size yields a well-formed, sane result.

No timing thresholds: the figures themselves are the benchmarks' business
(``python bench/run.py``). This checks that each benchmark runs end to end
against the local backend and reports what the table and the JSON need.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parents[1] / "bench"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # the suite runs as `python bench/run.py`: its modules are top-level

import idle_cpu  # noqa: E402
import latency  # noqa: E402
import memory  # noqa: E402
import realtime  # noqa: E402
import run  # noqa: E402
import scale  # noqa: E402
import startup  # noqa: E402
import subscription  # noqa: E402
import throughput  # noqa: E402
import thumbnails  # noqa: E402

from materializer.layout import default_layout  # noqa: E402
from materializer.ledger import Ledger  # noqa: E402

from benchkit import BenchResult, percentile  # noqa: E402
from ledger_checks import check_integrity  # noqa: E402

#: name -> (the benchmark, the smallest arguments that still exercise all of it)
TINY: dict[str, tuple[Callable[..., Awaitable[BenchResult]], dict[str, Any]]] = {
    "latency": (latency.run, {"jobs": 3, "warmup": 1}),
    "throughput": (throughput.run, {"jobs": 6}),
    "memory": (memory.run, {"jobs": 2, "edge": 64, "idle_seconds": 0.1}),
    "idle_cpu": (idle_cpu.run, {"seconds": 0.3}),
    "scale": (scale.run, {"jobs": 3, "bursts": 1, "histories": (0, 50)}),
    "realtime": (realtime.run, {"seconds": 0.5}),
    "subscription": (subscription.run, {"jobs": 3, "warmup": 1}),
    "startup": (startup.run, {"runs": 1}),
    "thumbnails": (thumbnails.run, {"jobs": 2, "warmup": 1}),
}


def test_every_benchmark_of_the_suite_has_a_smoke_run() -> None:
    assert sorted(TINY) == sorted(bench.name for bench in run.BENCHMARKS)


@pytest.mark.parametrize("name", sorted(TINY))
async def test_benchmark_runs_and_reports_sane_figures(name: str) -> None:
    function, arguments = TINY[name]
    result = await function(**arguments)

    assert result.name == name
    report = json.loads(json.dumps(result.as_json()))  # what --json prints, through a JSON round trip
    assert set(report) == {"goal", "goal_met", "floor", "metrics", "details", "notes"}
    assert isinstance(report["goal_met"], bool)
    assert report["goal"] and report["floor"]
    assert report["metrics"]
    for label, metric in report["metrics"].items():
        assert set(metric) == {"unit", "ours", "floor", "ratio"}, label
        assert metric["ours"] >= 0, label
        assert metric["floor"] is None or metric["floor"] >= 0, label
        assert metric["ratio"] is None or metric["ratio"] >= 0, label
    assert any("quick" in note for note in report["notes"])  # smaller than a full run, and it says so
    if not report["goal_met"]:
        assert any("GOAL MISSED" in note for note in report["notes"])

    rendered = run.table({name: {**report, "seconds": 0.0}}, quick=True)
    assert name in rendered and report["goal"] in rendered


async def test_latency_and_realtime_time_every_job_they_submit() -> None:
    timed = await latency.run(jobs=2, warmup=1)
    details = timed.details
    assert details["jobs"] == details["ours_ms"]["n"] == details["durable_floor_ms"]["n"] == 2
    assert details["official_push_ms"]["n"] == details["old_floor_ms"]["n"] == 2
    # The durable floor is the official client's push plus the crash-safe fetch/decode/write, per job.
    assert details["durable_floor_ms"]["p50"] > details["official_push_ms"]["p50"] > 0

    stream = await realtime.run(seconds=0.5)
    assert stream.details["frames"] == stream.details["materialized"] == 5
    frames = stream.details
    assert frames["ours_ms"]["n"] == frames["durable_floor_ms"]["n"] == frames["old_floor_ms"]["n"] == 5
    assert stream.details["backlog"]["max"] >= 0


def test_prefilled_history_is_a_consistent_ledger(tmp_path: Path) -> None:
    last_seq = scale.prefill(tmp_path / "root", 120)

    with Ledger(default_layout(tmp_path / "root").ledger) as ledger:
        # The files are on disk as recorded: a daemon started on it has nothing to materialize again.
        assert check_integrity(ledger, default_layout(tmp_path / "root").outputs) == []
        status = ledger.status()
        assert status.counts == {"pending": 0, "materialized": 120, "quarantined": 0}
        assert last_seq == ledger.last_seq() == 120
        assert len(ledger.gallery_entries(1000)) == 120


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 0.5), percentile(values, 0.99), percentile(values, 1.0)) == (50.0, 99.0, 100.0)
    assert percentile([3.0], 0.99) == 3.0
    with pytest.raises(ValueError):
        percentile([], 0.5)


def test_repetitions_give_medians_the_ratio_spread_and_met_only_if_met_every_time() -> None:
    def one(ours: float, floor: float, met: bool) -> dict[str, Any]:
        return {"goal": "g", "goal_met": met, "floor": "f", "details": {},
                "notes": ["quick"] + ([] if met else ["GOAL MISSED"]),
                "metrics": {"p50_ms": {"unit": "ms", "ours": ours, "floor": floor, "ratio": ours / floor},
                            "rss": {"unit": "MB", "ours": ours, "floor": None, "ratio": None}}}

    result = run.aggregate([one(12.0, 10.0, True), one(30.0, 10.0, False), one(11.0, 10.0, True)])
    p50 = result["metrics"]["p50_ms"]
    assert (p50["ours"], p50["floor"], p50["ratio"]) == (12.0, 10.0, 1.2)
    assert (p50["ratio_min"], p50["ratio_max"]) == (1.1, 3.0)
    assert result["metrics"]["rss"]["ratio"] is None and result["metrics"]["rss"]["ratio_min"] is None
    assert (result["goal_met"], result["met_in"], result["repetitions"]) == (False, 2, 3)
    assert result["notes"] == ["quick", "GOAL MISSED"]
    rendered = run.table({"latency": {**result, "seconds": 1.0}}, quick=False)
    assert "1.10-3.00" in rendered and "NO 2/3" in rendered
