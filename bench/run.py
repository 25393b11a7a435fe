"""Run the benchmark suite against the local backend on loopback and print a table (or one JSON object).

    python bench/run.py [--quick] [--json] [--only NAME ...]

Every benchmark prints its figures beside a floor measured in the same run,
the ratio ours / floor, its goal and whether the goal is met (a missed goal
is said in words too). ``--quick`` runs smaller counts and shorter windows
(the whole run stays under three minutes on two cores) and says so in each
benchmark's notes. ``--json`` prints one JSON object with one key per
benchmark on stdout; progress goes to stderr. The exit code is 1 when a
benchmark could not run, 0 otherwise (missed goals included: they are
findings, not failures).

Benchmarks (each its own module in this folder): latency, throughput, memory,
idle_cpu, scale, realtime, subscription, thumbnails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import idle_cpu
import latency
import memory
import realtime
import scale
import subscription
import throughput
import thumbnails

from benchkit import BenchResult


@dataclass(frozen=True)
class Benchmark:
    name: str
    run: Callable[..., Awaitable[BenchResult]]
    full: dict[str, Any]
    quick: dict[str, Any]


BENCHMARKS = [
    Benchmark(latency.NAME, latency.run, {"jobs": latency.FULL_JOBS}, {"jobs": latency.FULL_JOBS}),
    Benchmark(throughput.NAME, throughput.run, {"jobs": throughput.FULL_JOBS}, {"jobs": 1000}),
    Benchmark(memory.NAME, memory.run, {"jobs": memory.FULL_JOBS}, {"jobs": 10}),
    Benchmark(idle_cpu.NAME, idle_cpu.run, {"seconds": idle_cpu.FULL_SECONDS}, {"seconds": 10.0}),
    Benchmark(scale.NAME, scale.run, {"jobs": scale.FULL_JOBS, "bursts": scale.FULL_BURSTS}, {"jobs": 50, "bursts": 2}),
    Benchmark(realtime.NAME, realtime.run, {"seconds": realtime.FULL_SECONDS}, {"seconds": 10.0}),
    Benchmark(subscription.NAME, subscription.run, {"jobs": subscription.FULL_JOBS}, {"jobs": subscription.FULL_JOBS}),
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


def run_all(selected: list[Benchmark], quick: bool, progress: Callable[[str], None]) -> dict[str, Any]:
    """Run each benchmark in its own event loop; a benchmark that fails is reported, not fatal."""
    results: dict[str, Any] = {}
    for bench in selected:
        progress(f"running {bench.name} ...")
        started = time.monotonic()
        try:
            result = asyncio.run(bench.run(**(bench.quick if quick else bench.full))).as_json()
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            progress(traceback.format_exc())
            result = {"error": f"{type(exc).__name__}: {exc}", "goal_met": False}
        result["seconds"] = round(time.monotonic() - started, 1)
        results[bench.name] = result
        progress(f"{bench.name}: done in {result['seconds']} s")
    return results


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
    header = f"{'benchmark':<13}{'metric':<20}{'ours':>9}{'floor':>9}{'ratio':>7}  {'met':<5}goal"
    lines += [header, "-" * len(header)]
    for name, result in results.items():
        if "error" in result:
            lines.append(f"{name:<13}ERROR: {result['error']}")
            continue
        for i, (label, metric) in enumerate(result["metrics"].items()):
            first = i == 0
            lines.append(
                f"{name if first else '':<13}{label:<20}{_number(metric['ours']):>9}{_number(metric['floor']):>9}"
                f"{_number(metric['ratio']):>7}  {('yes' if result['goal_met'] else 'NO') if first else '':<5}"
                f"{result['goal'] if first else ''}"
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
    options = parser.parse_args(argv)
    selected = [bench for bench in BENCHMARKS if not options.only or bench.name in options.only]

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    progress(f"{'quick' if options.quick else 'full'} run on {machine()}")
    results = run_all(selected, options.quick, progress)
    print(json.dumps(results, indent=1) if options.json else table(results, options.quick))
    return 1 if any("error" in result for result in results.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
