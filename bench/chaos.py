"""Run the four chaos suites and print what they counted: every count must be zero.

    python bench/chaos.py [--quick] [--suite NAME ...] [--seed N] [--rounds N] [--jobs N]
                          [--examples N] [--json]

The suites are the ``chaos``-marked tests in ``tests/test_chaos.py`` (see its
docstring); this runs each suite as its own ``pytest -m chaos`` process, so
each gets its wall time, and collects the figures every test records:

``sigkill``  50 rounds of SIGKILL during a 300-job burst, then a last run to the end
``faults``   every fault of the local backend, alone and mixed, during a burst
``hostile``  the named hostile inputs and loads of ``docs/hostile-inputs.md``
``fuzz``     hypothesis on the sync protocol, job documents and the observe-and-materialize path

``--quick`` runs small sizes (5 rounds of 60 jobs, short faults, 300 examples) in
a few minutes; the full run takes about a quarter of an hour on two cores.
Prints a table, then the whole report as one JSON object (``--json``: the JSON
only). Exits 0 when every suite passed and every count is zero, else 1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
#: suite -> the tests (pytest ``-k``) that make it up.
SUITES = {
    "sigkill": "sigkill_rounds",
    "faults": "faults_clear",
    "hostile": "hostile_input or hostile_load",
    "fuzz": "fuzz_",
}


def run_suite(name: str, environment: dict[str, str], workdir: Path, echo: Any) -> dict[str, Any]:
    """Run one suite in its own pytest process; return its figures, its test results and its wall time."""
    report = workdir / f"{name}.jsonl"
    junit = workdir / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "tests/test_chaos.py", "-m", "chaos", "-k", SUITES[name],
               "-q", "-p", "no:cacheprovider", "-n", "0", f"--junitxml={junit}", f"--basetemp={workdir / name}"]
    started = time.monotonic()
    completed = subprocess.run(command, cwd=REPO, env={**environment, "MATERIALIZER_CHAOS_REPORT": str(report)},
                               stdout=echo, stderr=subprocess.STDOUT, check=False)
    seconds = time.monotonic() - started
    records = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    tests = failed = 0
    if junit.exists():
        suite = ElementTree.parse(junit).getroot().find("testsuite")
        if suite is not None:
            tests = int(suite.get("tests", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
    counts: Counter[str] = Counter()
    for record in records:
        counts.update(record["counts"])
    result: dict[str, Any] = {
        "seconds": round(seconds, 1), "pytest_exit_code": completed.returncode, "tests": tests,
        "failed_tests": failed, "counts": dict(sorted(counts.items())),
    }
    if name == "sigkill" and records:
        result["info"] = records[0]["info"]
    elif name == "faults":
        result["scenarios"] = {r["case"]: {key: r["info"][key] for key in (
            "jobs", "fault_applications", "drops", "backend_restarts", "faulty_seconds", "cpu_per_wall_second",
            "cpu_ms_per_fault")} for r in records}
        result["max_cpu_per_wall_second"] = max((r["info"]["cpu_per_wall_second"] for r in records), default=None)
    elif name == "hostile":
        result["cases"] = len(records)
        result["outcomes"] = dict(Counter(r["info"]["outcome"] for r in records))
    elif name == "fuzz":
        result["targets"] = {r["case"]: {"examples": r["info"]["examples"], "seconds": r["info"]["seconds"]}
                             for r in records}
    return result


def print_table(report: dict[str, Any]) -> None:
    rows: list[tuple[str, str, str]] = []
    for name, suite in report["suites"].items():
        status = "passed" if suite["pytest_exit_code"] == 0 else f"FAILED (pytest exit {suite['pytest_exit_code']})"
        rows.append((name, f"{suite['tests']} tests, {suite['seconds']} s", status))
        rows.append((name, "failed_tests", str(suite["failed_tests"])))
        rows += [(name, figure, str(value)) for figure, value in suite["counts"].items()]
        if name == "sigkill" and "info" in suite:
            info = suite["info"]
            rows.append((name, "(run)", f"{info['rounds']} rounds x {info['jobs_per_round']} jobs, "
                                        f"{info['kills']} kills, {info['images']} images, seed {info['seed']}"))
        if name == "faults":
            rows.append((name, "(max CPU while faulty)", f"{suite['max_cpu_per_wall_second']} core"))
        if name == "hostile":
            rows.append((name, "(cases)", f"{suite['cases']}: {suite['outcomes']}"))
        if name == "fuzz":
            rows += [(name, f"(examples: {target})", str(figures["examples"]))
                     for target, figures in suite["targets"].items()]
    width = [max(len(row[column]) for row in rows) for column in range(2)]
    print(f"{'suite':<{width[0]}}  {'figure (counts must be 0)':<{width[1]}}  value")
    for suite, figure, value in rows:
        print(f"{suite:<{width[0]}}  {figure:<{width[1]}}  {value}")
    print(f"\nall zero: {report['all_zero']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a few minutes in all")
    parser.add_argument("--suite", action="append", choices=list(SUITES), help="run only this suite (repeatable)")
    parser.add_argument("--seed", type=int, help="seed of every random choice (default: random, printed)")
    parser.add_argument("--rounds", type=int, help="SIGKILL rounds (default 50, quick 5)")
    parser.add_argument("--jobs", type=int, help="jobs per SIGKILL round (default 300, quick 60)")
    parser.add_argument("--examples", type=int, help="hypothesis examples per fuzz target (default 10000, quick 300)")
    parser.add_argument("--json", action="store_true", help="print only the JSON report")
    args = parser.parse_args(argv)

    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    environment = {**os.environ, "MATERIALIZER_CHAOS_SEED": str(seed)}
    environment.pop("MATERIALIZER_CHAOS_REPORT", None)
    if args.quick:
        environment["MATERIALIZER_CHAOS_QUICK"] = "1"
    for option, variable in (("rounds", "ROUNDS"), ("jobs", "JOBS"), ("examples", "EXAMPLES")):
        if getattr(args, option) is not None:
            environment[f"MATERIALIZER_CHAOS_{variable}"] = str(getattr(args, option))
    echo = sys.stderr if args.json else sys.stdout
    print(f"chaos: seed {seed}{' (quick)' if args.quick else ''}", file=echo, flush=True)

    suites: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="materializer-chaos-") as workdir:
        for name in args.suite or list(SUITES):
            print(f"chaos: running the {name} suite", file=echo, flush=True)
            suites[name] = run_suite(name, environment, Path(workdir), echo)
    report = {
        "seed": seed,
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "system": platform.platform()},
        "suites": suites,
        "all_zero": all(s["pytest_exit_code"] == 0 and s["failed_tests"] == 0 and not any(s["counts"].values())
                        and s["tests"] > 0 for s in suites.values()),
    }
    if not args.json:
        print()
        print_table(report)
    print(json.dumps(report, sort_keys=True))
    return 0 if report["all_zero"] else 1


if __name__ == "__main__":
    sys.exit(main())
