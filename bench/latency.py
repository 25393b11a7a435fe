"""Latency: a job succeeds on the backend -> its file is committed and the sidebar has the event.

Jobs go through the real media API (``POST /api/media/v1/generate``,
``text_to_image``/``best``: one 1024x1024 PNG each), one at a time: the next
is submitted once the sidebar has the previous one, so every job meets an
idle daemon.

What is measured, per job: from the job's ``completedAt`` to the moment the
benchmark's sidebar client (a Unix-socket client of
``<root>/state/media/display.sock``, in this process) reads the job's
``media.materialized`` line. ``completedAt`` is stamped by the backend's job
runner in the very call that writes the succeeded document to its table
(the commit the sync protocol pushes), on this machine's wall clock, which
the sidebar client reads too. The daemon sends that line only after the file
is fsynced, renamed into place, the folder fsynced and the ledger committed,
so the figure covers: the sync push, the download, Pillow validation, the
atomic commit, the ledger and the sidebar socket.

Floors, for the same jobs and bytes, measured in the same run:

- durable (the goal's): the official ``convex`` Python client, subscribed beside
  the daemon in its own process, is timed from the same ``completedAt`` to the
  moment it yields the job (the push); then, in this process, an ``httpx`` GET of
  the same URL on a warm connection, a full Pillow decode, and a crash-safe write
  (temporary file in the same folder, fsync, rename, fsync of the folder). Per
  job, push + GET/decode/write: what no crash-safe materializer can go below.
- old: the GET, decode and a plain write (no push, no fsync), kept beside it so
  both ratios are visible.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from benchkit import (
    BenchResult,
    Metric,
    OfficialPush,
    Sidebar,
    daemon_process,
    distribution,
    fetch_decode_durable,
    fetch_decode_write,
    scratch_backend,
    succeeded_docs,
)

NAME = "latency"
#: Goals, as ratios to the durable floor (issue: "Fast as a durable write allows").
GOAL_P50_RATIO = 1.15
GOAL_P99_RATIO = 1.3
FULL_JOBS = 200


async def run(jobs: int = FULL_JOBS, warmup: int = 5) -> BenchResult:
    with scratch_backend("latency") as (folder, backend):
        return await _run(folder, backend, jobs, warmup)


async def _run(folder: Path, backend: Any, jobs: int, warmup: int) -> BenchResult:
    started_ms = time.time() * 1000
    job_ids = []
    official = await OfficialPush.start(backend, started_ms)
    try:
        with daemon_process(folder / "root", backend) as daemon:
            sidebar = await Sidebar.connect(daemon.root, daemon=daemon)
            await sidebar.wait_connected()
            async with httpx.AsyncClient(base_url=backend.url, timeout=30.0,
                                         headers={"Authorization": f"Bearer {backend.token}"}) as http:
                for i in range(warmup + jobs):
                    answer = await http.post("/api/media/v1/generate",
                                             json={"capability": "text_to_image", "profile": "best",
                                                   "prompt": f"latency benchmark {i}"})
                    answer.raise_for_status()
                    job_id = answer.json()["jobId"]
                    job_ids.append(job_id)
                    await sidebar.wait_materialized([job_id], what=f"job {job_id}")
                    await official.wait_seen([job_id])
            await sidebar.close()
    finally:
        await official.close()
    docs = await succeeded_docs(backend, started_ms)
    measured = job_ids[warmup:]
    ours = [sidebar.materialized[j] * 1000 - docs[j]["completedAt"] for j in measured]
    push = [official.first_seen[j] * 1000 - docs[j]["completedAt"] for j in measured]
    urls = [docs[j]["output"]["images"][0]["url"] for j in measured]
    sizes = [docs[j]["output"]["images"][0]["file_size"] for j in measured]
    durable_io, old_floor = await asyncio.to_thread(_floors, urls, folder / "floor", warmup)
    durable = [p + io for p, io in zip(push, durable_io, strict=True)]
    ours_d, durable_d, old_d = distribution(ours), distribution(durable), distribution(old_floor)
    metrics = [Metric(f"{p}_ms", "ms", ours_d[p], durable_d[p]) for p in ("p50", "p95", "p99")]
    metrics += [Metric(f"{p}_ms_old_floor", "ms", ours_d[p], old_d[p]) for p in ("p50", "p99")]
    p50_ratio, p99_ratio = metrics[0].ratio or float("inf"), metrics[2].ratio or float("inf")
    met = p50_ratio <= GOAL_P50_RATIO and p99_ratio <= GOAL_P99_RATIO
    notes = []
    if jobs < FULL_JOBS:
        notes.append(f"quick: {jobs} jobs measured, fewer than the {FULL_JOBS} the goal names")
    if p50_ratio > GOAL_P50_RATIO:
        notes.append(f"GOAL MISSED: p50 {p50_ratio:.2f}x the durable floor (goal <= {GOAL_P50_RATIO})")
    if p99_ratio > GOAL_P99_RATIO:
        notes.append(f"GOAL MISSED: p99 {p99_ratio:.2f}x the durable floor (goal <= {GOAL_P99_RATIO})")
    return BenchResult(
        NAME, f"p50 <= {GOAL_P50_RATIO}x, p99 <= {GOAL_P99_RATIO}x the durable floor", met, metrics,
        "durable: official convex client's push + httpx GET + Pillow decode + temp file, fsync, rename, folder "
        "fsync, per job; old (_old_floor rows): GET + decode + plain write",
        details={"jobs": len(measured), "warmup": warmup, "image": "1024x1024 PNG (text_to_image/best)",
                 "mean_file_bytes": sum(sizes) / len(sizes), "ours_ms": ours_d, "durable_floor_ms": durable_d,
                 "official_push_ms": distribution(push), "durable_io_ms": distribution(durable_io),
                 "old_floor_ms": old_d},
        notes=notes,
    )


def _floors(urls: list[str], folder: Path, warmup: int) -> tuple[list[float], list[float]]:
    """Per URL: the durable GET/decode/write and the old plain one, in ms (alternating, on one warm connection)."""
    folder.mkdir()
    durable, old = [], []
    with httpx.Client(timeout=30.0) as client:
        for url in urls[:warmup]:
            fetch_decode_durable(client, url, folder / "warmup")
        for i, url in enumerate(urls):
            durable.append(fetch_decode_durable(client, url, folder / f"{i}.png") * 1000)
            old.append(fetch_decode_write(client, url, folder / f"{i}.old.png") * 1000)
    return durable, old
