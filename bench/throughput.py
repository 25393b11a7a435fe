"""Throughput: ``materializer replay`` of a backlog of single-image 512x512 PNG jobs.

The jobs are stored on the backend first (not timed). Then
:func:`materializer.replay.replay` runs in this process, exactly as the
``materializer replay --since ...`` command runs it: it lists the jobs with the
gap-free page query and materializes each (download, Pillow validation,
atomic commit, ledger, gallery) with the daemon's default download
concurrency. The time is the whole call, listing included.

Floor: the same images downloaded with a plain ``httpx.AsyncClient`` and
decoded with Pillow (in worker threads, as the daemon decodes), by as many
concurrent workers as the replay's download concurrency; nothing written.
It runs once before and once after the replay; the faster run counts.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from materializer.layout import default_layout
from materializer.options import DaemonOptions
from materializer.replay import replay
from materializer.tokens import StaticTokenProvider

from benchkit import BenchResult, Metric, scratch_backend, succeeded_docs

NAME = "throughput"
GOAL_FRACTION = 0.85
FULL_JOBS = 2000
CONCURRENCY = DaemonOptions.download_concurrency  # the default the daemon and replay use
_BATCH = 250


async def run(jobs: int = FULL_JOBS) -> BenchResult:
    with scratch_backend("throughput") as (folder, backend):
        return await _run(folder, backend, jobs)


async def _run(folder: Path, backend: Any, jobs: int) -> BenchResult:
    since_ms = time.time() * 1000 - 1000
    for start in range(0, jobs, _BATCH):
        await asyncio.to_thread(backend.create_jobs, count=min(_BATCH, jobs - start), width=512, height=512,
                                format="png", prompt=f"throughput batch {start}")
    docs = await succeeded_docs(backend, since_ms)
    urls = [doc["output"]["images"][0]["url"] for doc in docs.values()]

    floor_runs = [await _floor(urls)]

    root = folder / "root"
    options = DaemonOptions(root=root, convex_url=backend.url, state_dir=default_layout(root).state)
    started_wall, started = time.time(), time.perf_counter()
    code, summary = await replay(options, StaticTokenProvider(backend.token), since=since_ms, until=None,
                                 job_ids=[], dry_run=False, out=io.StringIO())
    ours_seconds = time.perf_counter() - started
    if code != 0 or len(summary.materialized) != jobs:
        raise RuntimeError(f"replay materialized {len(summary.materialized)} of {jobs} jobs "
                           f"(exit {code}; failed: {summary.failed[:3]})")
    floor_runs.append(await _floor(urls))
    floor_seconds = min(floor_runs)  # the faster of a run before and one after ours: the floor's noise is ours to bear
    files = [path.stat() for job_id in summary.materialized
             for path in default_layout(options.root).outputs.glob(f"{job_id}_*")]
    total_bytes = sum(stat.st_size for stat in files)
    megabytes = total_bytes / 1e6
    jobs_metric = Metric("jobs_per_s", "jobs/s", jobs / ours_seconds, jobs / floor_seconds)
    mb_metric = Metric("mb_per_s", "MB/s", megabytes / ours_seconds, megabytes / floor_seconds)
    fraction = jobs_metric.ratio or 0.0
    met = fraction >= GOAL_FRACTION
    notes = []
    if jobs < FULL_JOBS:
        notes.append(f"quick: {jobs} jobs, fewer than the {FULL_JOBS} the goal names")
    if not met:
        notes.append(f"GOAL MISSED: {fraction:.0%} of the floor (goal >= {GOAL_FRACTION:.0%})")
    return BenchResult(
        NAME, f"ours >= {GOAL_FRACTION:.0%} of the floor (jobs/s)", met, [jobs_metric, mb_metric],
        f"plain httpx download + Pillow decode, {CONCURRENCY} concurrent, nothing written",
        details={"jobs": jobs, "concurrency": CONCURRENCY, "mode": "materializer.replay.replay() in-process",
                 "image": "512x512 PNG", "bytes": total_bytes, "ours_seconds": ours_seconds,
                 "first_file_after_seconds": min(stat.st_mtime for stat in files) - started_wall,
                 "floor_seconds_runs": floor_runs},
        notes=notes,
    )


async def _floor(urls: list[str]) -> float:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            response = await client.get(queue.get_nowait())
            response.raise_for_status()
            await asyncio.to_thread(_decode, response.content)

    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        return time.perf_counter() - started


def _decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as image:
        image.load()
