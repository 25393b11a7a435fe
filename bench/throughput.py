"""Throughput: ``materializer replay`` of a backlog of single-image 512x512 PNG jobs.

The jobs are stored on the backend first (not timed). Then
:func:`materializer.replay.replay` runs in this process, exactly as the
``materializer replay --since ...`` command runs it: it lists the jobs with the
gap-free page query and materializes each (download, Pillow validation,
atomic commit, ledger, gallery) with the daemon's default download
concurrency. The time is the whole call, listing included.

Floors, over the same images, each run once before and once after the replay
(the faster run counts: the floor's noise is ours to bear):

- durable (the goal's): a plain ``httpx.AsyncClient`` GET, a full Pillow decode
  and a crash-safe write (temporary file in the same folder, fsync, rename,
  fsync of the folder; decode and write in worker threads, as the daemon does),
  by as many concurrent workers as the replay's download concurrency.
- CPU: the CPU seconds per job (this process's, all threads) of that durable
  run, against the replay's own, measured the same way.
- old: the same GET and decode with nothing written, kept beside them.
"""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import httpx

from materializer.layout import default_layout
from materializer.options import DaemonOptions
from materializer.replay import replay
from materializer.tokens import StaticTokenProvider

from benchkit import BenchResult, Metric, decode, durable_write, scratch_backend, succeeded_docs

NAME = "throughput"
#: Goals (issue: "Fast as a durable write allows"): jobs/s as a fraction of the durable floor's, and
#: CPU seconds per job as a multiple of the durable floor's.
GOAL_FRACTION = 0.90
GOAL_CPU_RATIO = 1.25
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

    floors = [await _floor(urls, None), await _floor(urls, folder / "floor")]

    root = folder / "root"
    options = DaemonOptions(root=root, convex_url=backend.url, state_dir=default_layout(root).state)
    started_wall, started, started_cpu = time.time(), time.perf_counter(), time.process_time()
    code, summary = await replay(options, StaticTokenProvider(backend.token), since=since_ms, until=None,
                                 job_ids=[], dry_run=False, out=io.StringIO())
    ours_seconds, ours_cpu = time.perf_counter() - started, time.process_time() - started_cpu
    if code != 0 or len(summary.materialized) != jobs:
        raise RuntimeError(f"replay materialized {len(summary.materialized)} of {jobs} jobs "
                           f"(exit {code}; failed: {summary.failed[:3]})")
    floors += [await _floor(urls, folder / "floor"), await _floor(urls, None)]
    old_seconds = min(run[0] for run in (floors[0], floors[3]))
    durable_seconds, durable_cpu = min((floors[1], floors[2]))
    files = [path.stat() for job_id in summary.materialized
             for path in default_layout(options.root).outputs.glob(f"{job_id}_*")]
    total_bytes = sum(stat.st_size for stat in files)
    megabytes = total_bytes / 1e6
    jobs_metric = Metric("jobs_per_s", "jobs/s", jobs / ours_seconds, jobs / durable_seconds)
    cpu_metric = Metric("cpu_ms_per_job", "CPU ms", ours_cpu / jobs * 1000, durable_cpu / jobs * 1000)
    mb_metric = Metric("mb_per_s", "MB/s", megabytes / ours_seconds, megabytes / durable_seconds)
    old_metric = Metric("jobs_per_s_old_floor", "jobs/s", jobs / ours_seconds, jobs / old_seconds)
    fraction, cpu_ratio = jobs_metric.ratio or 0.0, cpu_metric.ratio or float("inf")
    met = fraction >= GOAL_FRACTION and cpu_ratio <= GOAL_CPU_RATIO
    notes = []
    if jobs < FULL_JOBS:
        notes.append(f"quick: {jobs} jobs, fewer than the {FULL_JOBS} the goal names")
    if fraction < GOAL_FRACTION:
        notes.append(f"GOAL MISSED: {fraction:.0%} of the durable floor (goal >= {GOAL_FRACTION:.0%})")
    if cpu_ratio > GOAL_CPU_RATIO:
        notes.append(f"GOAL MISSED: {cpu_ratio:.2f}x the CPU floor per job (goal <= {GOAL_CPU_RATIO})")
    return BenchResult(
        NAME, f"jobs/s >= {GOAL_FRACTION:.0%} of the durable floor, CPU/job <= {GOAL_CPU_RATIO}x its",
        met, [jobs_metric, cpu_metric, mb_metric, old_metric],
        f"durable: httpx GET + Pillow decode + temp file, fsync, rename, folder fsync, {CONCURRENCY} concurrent; "
        "old (_old_floor row): the same GET + decode, nothing written",
        details={"jobs": jobs, "concurrency": CONCURRENCY, "mode": "materializer.replay.replay() in-process",
                 "image": "512x512 PNG", "bytes": total_bytes, "ours_seconds": ours_seconds,
                 "first_file_after_seconds": min(stat.st_mtime for stat in files) - started_wall,
                 "ours_cpu_seconds": ours_cpu,
                 "old_floor_seconds_runs": [floors[0][0], floors[3][0]],
                 "durable_floor_runs": [{"seconds": seconds, "cpu_seconds": cpu} for seconds, cpu in floors[1:3]]},
        notes=notes,
    )


async def _floor(urls: list[str], folder: Path | None) -> tuple[float, float]:
    """GET and decode every URL (and write each durably into ``folder``, if given); wall and CPU seconds."""
    if folder is not None:
        folder.mkdir(exist_ok=True)
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in enumerate(urls):
        queue.put_nowait(item)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            index, url = queue.get_nowait()
            response = await client.get(url)
            response.raise_for_status()
            await asyncio.to_thread(_keep, response.content, None if folder is None else folder / f"{index}.png")

    async with httpx.AsyncClient(limits=limits, timeout=60.0) as client:
        started, started_cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
        return time.perf_counter() - started, time.process_time() - started_cpu


def _keep(data: bytes, dest: Path | None) -> None:
    decode(data)
    if dest is not None:
        durable_write(dest, data)
