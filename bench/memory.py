"""Memory: the daemon process's resident set, idle and while materializing large images.

The daemon runs as ``python -m materializer run``. Once it is connected and
idle for a moment, its ``VmRSS`` is the idle figure. Then a burst of jobs
with four incompressible 1600x1600 PNGs each (about 7.7 MB per file; the
four files are shared by the jobs of the burst, but every job downloads,
validates and commits its own copies) is stored on the backend at once, and
the daemon materializes them with its default download concurrency; its
``VmHWM`` (peak RSS, kept by the kernel) afterwards is the peak figure.
``VmRSS`` after the burst, idle again, is reported too.

Floor: a bare Python process that imports the same runtime libraries (idle
figure), then holds four of the same files and their decoded pixels at once,
decoding them in four threads (peak figure): what any Python process
validating four such images at a time cannot do without.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit import (
    BenchResult,
    Metric,
    Sidebar,
    clean_env,
    daemon_process,
    proc_memory_kib,
    scratch_backend,
    succeeded_docs,
)

NAME = "memory"
GOAL_PEAK_MB = 100.0
GOAL_IDLE_MB = 45.0
FULL_JOBS = 50
IMAGES_PER_JOB = 4
EDGE = 1600
IDLE_SECONDS = 2.0
HARNESS = Path(__file__).with_name("harness.py")


async def run(jobs: int = FULL_JOBS, edge: int = EDGE, idle_seconds: float = IDLE_SECONDS) -> BenchResult:
    """``edge`` (image width and height) and ``idle_seconds`` are smaller only to test the benchmark itself."""
    with scratch_backend("memory") as (folder, backend):
        return await _run(folder, backend, jobs, edge, idle_seconds)


def _mb(kib: int) -> float:
    return kib * 1024 / 1e6


async def _run(folder: Path, backend: Any, jobs: int, edge: int, idle_seconds: float) -> BenchResult:
    with daemon_process(folder / "root", backend) as daemon:
        sidebar = await Sidebar.connect(daemon.root, daemon=daemon)
        await sidebar.wait_connected()
        await asyncio.sleep(idle_seconds)  # the measurement window: connected, nothing to do
        idle_before = proc_memory_kib(daemon.pid)["VmRSS"]
        since_ms = time.time() * 1000 - 1000
        job_ids = await asyncio.to_thread(backend.create_jobs, count=jobs, images=IMAGES_PER_JOB, noise=True,
                                          width=edge, height=edge, format="png", share_files=True)
        await sidebar.wait_materialized(job_ids, timeout=600, what=f"{jobs} jobs")
        peak = proc_memory_kib(daemon.pid)["VmHWM"]
        await asyncio.sleep(idle_seconds)
        idle_after = proc_memory_kib(daemon.pid)["VmRSS"]
        await sidebar.close()
    docs = await succeeded_docs(backend, since_ms)
    images = docs[job_ids[0]]["output"]["images"]
    floor = await asyncio.to_thread(_floor, [image["url"] for image in images])
    peak_metric = Metric("peak_rss_mb", "MB", _mb(peak), _mb(floor["peak_kib"]))
    idle_metric = Metric("idle_rss_mb", "MB", _mb(idle_before), _mb(floor["idle_kib"]))
    met = peak_metric.ours <= GOAL_PEAK_MB and idle_metric.ours <= GOAL_IDLE_MB
    notes = []
    if jobs < FULL_JOBS:
        notes.append(f"quick: {jobs} jobs x {IMAGES_PER_JOB} images, fewer than the {FULL_JOBS} the goal names")
    if peak_metric.ours > GOAL_PEAK_MB:
        notes.append(f"GOAL MISSED: peak {peak_metric.ours:.0f} MB (goal <= {GOAL_PEAK_MB:g} MB)")
    if idle_metric.ours > GOAL_IDLE_MB:
        notes.append(f"GOAL MISSED: idle {idle_metric.ours:.0f} MB (goal <= {GOAL_IDLE_MB:g} MB)")
    return BenchResult(
        NAME, f"peak <= {GOAL_PEAK_MB:g} MB and idle <= {GOAL_IDLE_MB:g} MB", met, [peak_metric, idle_metric],
        "bare Python with the same libraries (idle); + 4 such files and their pixels held at once (peak)",
        details={"jobs": jobs, "images_per_job": IMAGES_PER_JOB, "image": f"{edge}x{edge} PNG of noise",
                 "mean_file_bytes": sum(image["file_size"] for image in images) / len(images),
                 "idle_after_burst_rss_mb": _mb(idle_after)},
        notes=notes,
    )


def _floor(urls: list[str]) -> dict[str, int]:
    output = subprocess.run([sys.executable, str(HARNESS), "memory", *urls], capture_output=True, check=True,
                            timeout=300, env=clean_env()).stdout
    figures: dict[str, int] = {}
    for line in output.splitlines():
        figures.update(json.loads(line))
    return figures
