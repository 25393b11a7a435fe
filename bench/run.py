"""Run the benchmark suite against the local backend on loopback and print a table (or one JSON object).

    python bench/run.py [--quick] [--json] [--only NAME ...] [--repeat N]

Every benchmark prints its figures beside a floor measured in the same run,
the ratio ours / floor, its goal and whether the goal is met (a missed goal
is said in words too). ``--quick`` runs smaller counts and shorter windows
(the whole run stays under three minutes on two cores) and says so in each
benchmark's notes. Each benchmark runs ``--repeat`` times (default 3, quick 1)
and each figure is printed as the median of the repetitions with the ratio's
min and max beside it; a goal counts as met only when every repetition met it.
``--json`` prints one JSON object with one key per
benchmark on stdout; progress goes to stderr. The exit code is 1 when a
benchmark could not run, 0 otherwise (missed goals included: they are
findings, not failures).

Benchmarks (each its own module in this folder): latency, throughput, memory,
idle_cpu, scale, realtime, subscription, startup, thumbnails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import idle_cpu
import latency
import memory
import realtime
import scale
import startup
import subscription
import throughput
import thumbnails

from stella_devbackend.harness import compile_packages

from benchkit import BenchResult


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[..., Coroutine[Any, Any, BenchResult]]
    full: dict[str, Any]
    quick: dict[str, Any]


BENCHMARKS = [
    Benchmark(latency.NAME, latency.run, {"jobs": latency.FULL_JOBS}, {"jobs": latency.FULL_JOBS}),
    Benchmark(throughput.NAME, throughput.run, {"jobs": throughput.FULL_JOBS}, {"jobs": 1000}),
    Benchmark(memory.NAME, memory.run, {"jobs": memory.FULL_JOBS}, {"jobs": 10}),
    Benchmark(idle_cpu.NAME, idle_cpu.run, {"seconds": idle_cpu.FULL_SECONDS}, {"seconds": 10.0}),
    Benchmark(scale.NAME, scale.run, {"jobs": scale.FULL_JOBS, "bursts": scale.FULL_BURSTS}, {"jobs": 50, "bursts": 3}),
    Benchmark(realtime.NAME, realtime.run, {"seconds": realtime.FULL_SECONDS}, {"seconds": 10.0}),
    Benchmark(subscription.NAME, subscription.run, {"jobs": subscription.FULL_JOBS}, {"jobs": subscription.FULL_JOBS}),
    Benchmark(startup.NAME, startup.run, {"runs": startup.FULL_RUNS}, {"runs": 3}),
    Benchmark(thumbnails.NAME, thumbnails.run, {"jobs": thumbnails.FULL_JOBS}, {"jobs": 50}),
]


def machine() -> str:
    """``2 x AMD EPYC, Python 3.11.7, Linux 6.1``: where the figures come from."""
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()} x {model}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def run_all(selected: list[Benchmark], quick: bool, progress: Callable[[str], None],
            repeat: int = 1) -> dict[str, Any]:
    """Run each benchmark ``repeat`` times, each in its own event loop; a failing benchmark is reported, not fatal."""
    results: dict[str, Any] = {}
    for bench in selected:
        started = time.monotonic()
        runs: list[dict[str, Any]] = []
        result: dict[str, Any] = {}
        for number in range(1, repeat + 1):
            progress(f"running {bench.name} ({number} of {repeat}) ...")
            try:
                runs.append(asyncio.run(bench.run(**(bench.quick if quick else bench.full))).as_json())
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                progress(traceback.format_exc())
                result = {"error": f"{type(exc).__name__}: {exc}", "goal_met": False}
                break
        else:
            result = aggregate(runs)
        result["seconds"] = round(time.monotonic() - started, 1)
        results[bench.name] = result
        progress(f"{bench.name}: done in {result['seconds']} s")
    return results


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from repetitions of a benchmark: medians, the ratio's spread, met only if met every time."""
    first = runs[0]
    metrics: dict[str, Any] = {}
    for label, metric in first["metrics"].items():
        values = {key: [run["metrics"][label][key] for run in runs if run["metrics"][label][key] is not None]
                  for key in ("ours", "floor", "ratio")}
        ratios = values["ratio"]
        metrics[label] = {
            "unit": metric["unit"],
            **{key: statistics.median(found) if found else None for key, found in values.items()},
            "ratio_min": min(ratios) if ratios else None, "ratio_max": max(ratios) if ratios else None,
        }
    met_in = sum(bool(run["goal_met"]) for run in runs)
    notes = list(dict.fromkeys(note for run in runs for note in run["notes"]))  # each said once, in order
    return {"goal": first["goal"], "goal_met": met_in == len(runs), "met_in": met_in, "repetitions": len(runs),
            "floor": first["floor"], "metrics": metrics, "notes": notes, "runs": runs}


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(results: dict[str, Any], quick: bool) -> str:
    lines = [f"stella-materializer benchmarks ({'quick' if quick else 'full'} run) on {machine()}", ""]
    header = f"{'benchmark':<13}{'metric':<22}{'ours':>9}{'floor':>9}{'ratio':>7}{'min-max':>13}  {'met':<5}goal"
    lines += [header, "-" * len(header)]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name:<13}ERROR: {result['error']}")
            continue
        met = ("yes" if result["goal_met"] else "NO") + (
            f" {result['met_in']}/{result['repetitions']}" if result.get("repetitions", 1) > 1 else "")
        for i, (label, metric) in enumerate(result["metrics"].items()):
            first = i == 0
            spread = (f"{_number(metric['ratio_min'])}-{_number(metric['ratio_max'])}"
                      if metric.get("ratio_min") is not None else "")
            lines.append(
                f"{name if first else '':<13}{label:<22}{_number(metric['ours']):>9}{_number(metric['floor']):>9}"
                f"{_number(metric['ratio']):>7}{spread:>13}  {met if first else '':<5}"
                f"{'  ' + result['goal'] if first else ''}"
            )
    lines += ["", "floors:"]
    lines += [f"  {name}: {result['floor']}" for name, result in results.items() if "floor" in result]
    notes = [f"  {name}: {note}" for name, result in results.items() for note in result.get("notes", [])]
    if notes:
        lines += ["", "notes:", *notes]
    lines += ["", "seconds: " + ", ".join(f"{name} {result['seconds']}" for name, result in results.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller counts and windows (under 3 minutes)")
    parser.add_argument("--json", action="store_true", help="print one JSON object, one key per benchmark")
    names = [bench.name for bench in BENCHMARKS]
    parser.add_argument("--only", action="append", choices=names, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(names)}")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="repetitions of each benchmark (default 3; quick 1)")
    options = parser.parse_args(argv)
    repeat = options.repeat if options.repeat is not None else (1 if options.quick else 3)
    if repeat < 1:
        parser.error("--repeat must be at least 1")
    selected = [bench for bench in BENCHMARKS if not options.only or bench.name in options.only]

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    progress(f"{'quick' if options.quick else 'full'} run, {repeat} repetition(s), on {machine()}")
    compile_packages()  # every process measured starts as from an installed package, with its bytecode
    results = run_all(selected, options.quick, progress, repeat)
    print(json.dumps(results, indent=1) if options.json else table(results, options.quick))
    return 1 if any("error" in result for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
