"""Realtime: a stream of 10 frames a second (512x512 JPEG) through the daemon.

Frames are submitted through the real media API
(``POST /api/media/v1/generate``, capability ``realtime``) on a fixed
10-per-second schedule, whatever the daemon does; the backend draws each and
commits it as succeeded. Latency per frame: from its ``completedAt`` (stamped
in the call that commits it, on this machine's clock) to the arrival of its
``media.materialized`` line at a sidebar client. Backlog: frames submitted but
not yet announced, sampled at every tick of the schedule (it includes the
backend's own few milliseconds of drawing); the stream must not leave a
growing backlog behind (the mean over the second half of the stream may not
exceed the first half's by more than one frame, and every frame is announced
within two seconds of the last submission).

Floors, for the same frames, as in the latency benchmark: durable (the goal's) is,
per frame, the official ``convex`` client's push (subscribed beside the daemon in
the same run) plus a GET, a full Pillow decode and a crash-safe write (temporary
file, fsync, rename, folder fsync); old is the GET, decode and a plain write.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from benchkit import (
    BenchResult,
    Metric,
    OfficialPush,
    Sidebar,
    cpu_seconds,
    daemon_process,
    distribution,
    fetch_decode_durable,
    fetch_decode_write,
    scratch_backend,
    succeeded_docs,
)

NAME = "realtime"
FPS = 10
#: p99 as a multiple of the durable floor's p99 (issue: "Fast as a durable write allows").
GOAL_P99_RATIO = 1.5
FULL_SECONDS = 60.0
DRAIN_SECONDS = 2.0


async def run(seconds: float = FULL_SECONDS) -> BenchResult:
    with scratch_backend("realtime") as (folder, backend):
        return await _run(folder, backend, seconds)


async def _run(folder: Path, backend: Any, seconds: float) -> BenchResult:
    frames = int(seconds * FPS)
    started_ms = time.time() * 1000
    job_ids: list[str] = []
    backlog: list[int] = []
    official = await OfficialPush.start(backend, started_ms)
    try:
        with daemon_process(folder / "root", backend) as daemon:
            sidebar = await Sidebar.connect(daemon.root, daemon=daemon)
            await sidebar.wait_connected()
            async with httpx.AsyncClient(base_url=backend.url, timeout=30.0,
                                         headers={"Authorization": f"Bearer {backend.token}"}) as http:

                async def submit(i: int) -> None:
                    answer = await http.post("/api/media/v1/generate",
                                             json={"capability": "realtime", "prompt": f"frame {i}"})
                    answer.raise_for_status()
                    job_ids.append(answer.json()["jobId"])

                submissions = []
                cpu_before = cpu_seconds(daemon.pid)
                start = time.monotonic()
                for i in range(frames):
                    await asyncio.sleep(max(0.0, start + i / FPS - time.monotonic()))  # the 10/s schedule
                    backlog.append(i - sum(1 for j in job_ids if j in sidebar.materialized))
                    submissions.append(asyncio.create_task(submit(i)))
                await asyncio.gather(*submissions)
                last_submitted = time.monotonic()
                with contextlib.suppress(TimeoutError):  # frames still missing then are reported as missing
                    await sidebar.wait_materialized(job_ids, timeout=30, what="every frame")
                drained_after = time.monotonic() - last_submitted
                daemon_cpu_percent = (cpu_seconds(daemon.pid) - cpu_before) / (time.monotonic() - start) * 100
            await sidebar.close()
        with contextlib.suppress(TimeoutError):  # the floor covers the frames the official client saw
            await official.wait_seen(job_ids, timeout=30)
    finally:
        await official.close()
    docs = await succeeded_docs(backend, started_ms)
    ours = [sidebar.materialized[j] * 1000 - docs[j]["completedAt"] for j in job_ids if j in sidebar.materialized]
    seen = [j for j in job_ids if j in official.first_seen]
    push = [official.first_seen[j] * 1000 - docs[j]["completedAt"] for j in seen]
    durable_io, old_floor = await asyncio.to_thread(
        _floors, [docs[j]["output"]["images"][0]["url"] for j in seen], folder / "floor")
    durable = [p + io for p, io in zip(push, durable_io, strict=True)]
    ours_d, durable_d, old_d = distribution(ours), distribution(durable), distribution(old_floor)
    half = len(backlog) // 2
    first_half, second_half = statistics.fmean(backlog[:half]), statistics.fmean(backlog[half:])
    growing = second_half > first_half + 1 or drained_after > DRAIN_SECONDS
    materialized = sum(1 for j in job_ids if j in sidebar.materialized)
    metrics = [Metric(f"{p}_ms", "ms", ours_d[p], durable_d[p]) for p in ("p50", "p99")]
    metrics += [Metric(f"{p}_ms_old_floor", "ms", ours_d[p], old_d[p]) for p in ("p50", "p99")]
    p99_ratio = metrics[1].ratio or float("inf")
    met = materialized == frames and p99_ratio <= GOAL_P99_RATIO and not growing
    notes = []
    if seconds < FULL_SECONDS:
        notes.append(f"quick: {seconds:g} s of frames instead of {FULL_SECONDS:g} s")
    if materialized < frames:
        notes.append(f"GOAL MISSED: {materialized} of {frames} frames materialized")
    if p99_ratio > GOAL_P99_RATIO:
        notes.append(f"GOAL MISSED: p99 {p99_ratio:.2f}x the durable floor's (goal <= {GOAL_P99_RATIO})")
    if growing:
        notes.append("GOAL MISSED: the backlog grew (see details.backlog)")
    return BenchResult(
        NAME, f"all frames, p99 <= {GOAL_P99_RATIO}x the durable floor, no growing backlog", met, metrics,
        "durable: official convex client's push + httpx GET + Pillow decode + temp file, fsync, rename, folder "
        "fsync, per frame; old (_old_floor rows): GET + decode + plain write",
        details={"frames": frames, "materialized": materialized, "fps": FPS, "image": "512x512 JPEG (realtime)",
                 "ours_ms": ours_d, "durable_floor_ms": durable_d, "official_push_ms": distribution(push),
                 "old_floor_ms": old_d, "daemon_cpu_percent": daemon_cpu_percent,
                 "backlog": {"max": max(backlog), "mean_first_half": first_half, "mean_second_half": second_half,
                             "drained_seconds_after_last_submit": drained_after, "growing": growing}},
        notes=notes,
    )


def _floors(urls: list[str], folder: Path) -> tuple[list[float], list[float]]:
    """Per frame: the durable GET/decode/write and the old plain one, in ms, on one warm connection."""
    folder.mkdir()
    durable, old = [], []
    with httpx.Client(timeout=30.0) as client:
        fetch_decode_durable(client, urls[0], folder / "warmup")
        for i, url in enumerate(urls):
            durable.append(fetch_decode_durable(client, url, folder / f"{i}.jpg") * 1000)
            old.append(fetch_decode_write(client, url, folder / f"{i}.old.jpg") * 1000)
    return durable, old
