"""Thumbnails: what they cost per job, in latency and in CPU, against the same daemon without them.

The latency benchmark's scenario (``latency.py``: ``text_to_image``/``best`` jobs, one 1024x1024
PNG each, submitted one at a time through the media API, each timed from its ``completedAt`` to the
sidebar's ``media.materialized`` line), run twice against the same backend: by a daemon with
thumbnails (the default) and by one started with ``MATERIALIZER_DAEMON__THUMBNAILS=false``, in
alternating blocks so that a busy moment of the machine falls on both. The daemon's CPU time
(``/proc/<pid>/stat``, all its threads) over the measured jobs, divided by their number, is the CPU
per job.

"ours" is with thumbnails, the "floor" the same daemon without. Goal: the latency goal still holds
with thumbnails (p99 <= 60 ms).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from benchkit import (
    QUIET_DAEMON,
    BenchResult,
    DaemonProcess,
    Metric,
    Sidebar,
    cpu_seconds,
    distribution,
    scratch_backend,
    succeeded_docs,
)

NAME = "thumbnails"
GOAL_P99_MS = 60.0
FULL_JOBS = 200
#: Jobs per block; the variants alternate block by block.
BLOCK = 25


async def run(jobs: int = FULL_JOBS, warmup: int = 5) -> BenchResult:
    with scratch_backend("thumbnails") as (folder, backend):
        return await _run(folder, backend, jobs, warmup)


async def _run(folder: Path, backend: Any, jobs: int, warmup: int) -> BenchResult:
    started_ms = time.time() * 1000
    timed: dict[bool, list[tuple[str, float]]] = {True: [], False: []}
    cpu: dict[bool, float] = {True: 0.0, False: 0.0}
    done = {True: 0, False: 0}
    round_ = 0
    while min(done.values()) < jobs:
        for thumbnails in (True, False):
            count = min(BLOCK, jobs - done[thumbnails])
            if count <= 0:
                continue
            root = folder / f"root-{'with' if thumbnails else 'without'}-{round_}"
            env = {**QUIET_DAEMON, "MATERIALIZER_DAEMON__THUMBNAILS": "true" if thumbnails else "false"}
            with DaemonProcess(root, backend, env=env) as daemon:
                measured, seconds = await _block(daemon, backend, warmup, count, f"{thumbnails}-{round_}")
            timed[thumbnails] += measured
            cpu[thumbnails] += seconds
            done[thumbnails] += count
        round_ += 1
    docs = await succeeded_docs(backend, started_ms)
    latency = {variant: [at * 1000 - docs[job_id]["completedAt"] for job_id, at in timed[variant]]
               for variant in timed}
    ours, floor = distribution(latency[True]), distribution(latency[False])
    cpu_ms = {variant: cpu[variant] / done[variant] * 1000 for variant in cpu}
    metrics = [Metric(f"{p}_ms", "ms", ours[p], floor[p]) for p in ("p50", "p95", "p99")]
    metrics.append(Metric("cpu_ms_per_job", "ms", cpu_ms[True], cpu_ms[False]))
    met = ours["p99"] <= GOAL_P99_MS
    notes = [f"thumbnails add {ours['p50'] - floor['p50']:+.1f} ms at p50 and {cpu_ms[True] - cpu_ms[False]:+.1f} ms "
             "of daemon CPU per job (one 1024x1024 PNG)"]
    if jobs < FULL_JOBS:
        notes.append(f"quick: {jobs} jobs per variant, fewer than the {FULL_JOBS} of a full run")
    if not met:
        notes.append(f"GOAL MISSED: p99 {ours['p99']:.1f} ms with thumbnails (goal <= {GOAL_P99_MS:g} ms)")
    return BenchResult(
        NAME, f"p99 <= {GOAL_P99_MS:g} ms with thumbnails (the latency goal)", met, metrics,
        "the same daemon with daemon.thumbnails = false, in alternating blocks",
        details={"jobs_per_variant": jobs, "block": BLOCK, "image": "1024x1024 PNG (text_to_image/best)",
                 "with_ms": ours, "without_ms": floor, "cpu_ms_per_job": cpu_ms},
        notes=notes,
    )


async def _block(daemon: DaemonProcess, backend: Any, warmup: int, count: int,
                 label: str) -> tuple[list[tuple[str, float]], float]:
    """Run ``warmup`` then ``count`` jobs through a fresh daemon; the measured (job, sidebar time) and CPU."""
    sidebar = await Sidebar.connect(daemon.root, daemon=daemon)
    await sidebar.wait_connected()
    measured: list[tuple[str, float]] = []
    async with httpx.AsyncClient(base_url=backend.url, timeout=30.0,
                                 headers={"Authorization": f"Bearer {backend.token}"}) as http:
        for i in range(warmup + count):
            if i == warmup:
                cpu_start = cpu_seconds(daemon.pid)
            answer = await http.post("/api/media/v1/generate", json={
                "capability": "text_to_image", "profile": "best", "prompt": f"thumbnail benchmark {label} {i}"})
            answer.raise_for_status()
            job_id = answer.json()["jobId"]
            await sidebar.wait_materialized([job_id], what=f"job {job_id}")
            if i >= warmup:
                measured.append((job_id, sidebar.materialized[job_id]))
        cpu_used = cpu_seconds(daemon.pid) - cpu_start
    await sidebar.close()
    return measured, cpu_used
