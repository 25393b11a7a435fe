"""Start-up: ``materializer status`` and ``materializer --version`` as whole processes.

Each command is a fresh ``python -m materializer ...`` process, timed from
spawn to exit; ``status`` reads a real root whose ledger holds 100 materialized
jobs (with the daemon stopped, the way a person or a script calls it). The
floor is a bare ``python -c "import sqlite3, json"`` (the least any Python
command that reads a ledger and prints JSON can do), timed in the same run,
the runs of all three interleaved. Figures are medians of the runs.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import scale

from benchkit import BenchResult, Metric, clean_env

NAME = "startup"
#: Each command's median wall time as a multiple of the bare interpreter's.
GOAL_RATIO = 2.0
FULL_RUNS = 5


async def run(runs: int = FULL_RUNS) -> BenchResult:
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        root = Path(folder) / "root"
        scale.prefill(root, 100)
        env = clean_env(XDG_CONFIG_HOME=str(Path(folder) / "config"))
        commands = {
            "bare_python": [sys.executable, "-c", "import sqlite3, json"],
            "version": [sys.executable, "-m", "materializer", "--version"],
            "status": [sys.executable, "-m", "materializer", "status", "--root", str(root), "--json"],
        }
        for command in commands.values():  # warm the page cache and the byte-code caches
            subprocess.run(command, check=True, capture_output=True, env=env, timeout=60)
        seconds: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(runs):
            for name, command in commands.items():
                started = time.perf_counter()
                subprocess.run(command, check=True, capture_output=True, env=env, timeout=60)
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) * 1000 for name, values in seconds.items()}
    metrics = [Metric(f"{name}_ms", "ms", median[name], median["bare_python"]) for name in ("status", "version")]
    missed = [metric for metric in metrics if (metric.ratio or float("inf")) > GOAL_RATIO]
    notes = [f"GOAL MISSED: {metric.label} {metric.ratio or 0:.1f}x the bare interpreter (goal <= {GOAL_RATIO:g}x)"
             for metric in missed]
    if runs < FULL_RUNS:
        notes.append(f"quick: {runs} runs of each, fewer than the {FULL_RUNS} of a full run")
    return BenchResult(
        NAME, f"each <= {GOAL_RATIO:g}x a bare python -c 'import sqlite3, json'", not missed, metrics,
        "python -c 'import sqlite3, json', same interpreter, same run, interleaved",
        details={"runs": runs, "median_ms": median, "seconds": seconds},
        notes=notes,
    )
