"""Scale: does a job cost more when the ledger already holds a long history?

For each history size (0, 10,000 and 100,000 jobs) a fresh root gets a ledger
pre-filled with that many materialized jobs (each with its output row and its
announcement event, as the daemon leaves them; written in bulk, see
:func:`prefill`), older than the subscription's window. A daemon per root then
runs as ``python -m materializer run``, all of them at once, each signed in as
a user of its own, so that each sees only its own jobs. Once they are
connected, bursts of new single-image 256x256 PNG jobs are stored on the
backend for one user at a time, the histories taking turns (in a rotating
order: whatever the machine does in the background falls on every history
alike), each daemon's bursts at least the cursor overlap (plus half a second)
apart, so that its subscription's window never holds more than two bursts.
Per-job cost = (arrival of the burst's last ``media.materialized`` line at a
sidebar client - the moment the backend answered the request that stored the
burst) / jobs; the median over the bursts is taken. Each daemon's CPU time per
job (``/proc/<pid>/stat``) over the bursts is reported beside it.

Floor: the per-job cost with an empty ledger; the ratio is history / empty.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import sqlite3
import statistics
import time
from pathlib import Path
from typing import Any

from PIL import Image

from materializer.layout import THUMBNAILS_DIR, default_layout
from materializer.ledger import Ledger
from materializer.options import DaemonOptions
from materializer.thumbnails import THUMBNAIL_METHOD, THUMBNAIL_QUALITY, shrink, thumbnail_name

from benchkit import BenchResult, Metric, Sidebar, cpu_seconds, daemon_process, scratch_backend

NAME = "scale"
GOAL_RATIO = 1.1
HISTORIES = (0, 10_000, 100_000)
FULL_JOBS = 90
FULL_BURSTS = 9
BURST_SPACING_SECONDS = DaemonOptions.cursor_overlap_ms / 1000 + 0.5
_OBSERVE_CHUNK = 5_000


async def run(jobs: int = FULL_JOBS, bursts: int = FULL_BURSTS, histories: tuple[int, ...] = HISTORIES) -> BenchResult:
    with scratch_backend("scale") as (folder, backend):
        per_job, cpu_per_job = await _measure(folder, backend, histories, jobs, bursts)
    medians = {history: statistics.median(costs) for history, costs in per_job.items()}
    empty, largest = histories[0], histories[-1]
    metrics = [Metric(f"per_job_ms_{history}", "ms/job", medians[history], medians[empty]) for history in histories]
    ratio = metrics[-1].ratio or float("inf")
    met = ratio <= GOAL_RATIO
    notes = []
    if jobs < FULL_JOBS or bursts < FULL_BURSTS:
        notes.append(f"quick: {bursts} bursts of {jobs} jobs per history size "
                     f"(full: {FULL_BURSTS} of {FULL_JOBS})")
    if not met:
        notes.append(f"GOAL MISSED: {largest:,}/{empty} ratio {ratio:.2f} (goal <= {GOAL_RATIO})")
    return BenchResult(
        NAME, f"per-job cost with {largest:,} jobs / with {empty} <= {GOAL_RATIO}", met, metrics,
        "per-job cost with an empty ledger",
        details={"jobs_per_burst": jobs, "bursts": bursts, "image": "256x256 PNG",
                 "per_job_ms": {str(history): costs for history, costs in per_job.items()},
                 "daemon_cpu_ms_per_job": {str(history): cpu for history, cpu in cpu_per_job.items()}},
        notes=notes,
    )


async def _measure(folder: Path, backend: Any, histories: tuple[int, ...], jobs: int,
                   bursts: int) -> tuple[dict[int, list[float]], dict[int, float]]:
    """Per-job wall-clock cost of each burst (ms) and the daemon's CPU time per job over its bursts (ms),
    by history size."""
    roots = {history: folder / f"h{history}" / "root" for history in histories}
    last_seqs = {history: await asyncio.to_thread(prefill, roots[history], history) for history in histories}
    costs: dict[int, list[float]] = {history: [] for history in histories}
    cpu_used: dict[int, float] = {}
    with contextlib.ExitStack() as stack:
        daemons, sidebars = {}, {}
        for history in histories:
            daemon = daemon_process(roots[history], backend)
            daemon.token_file.write_text(backend.mint_token(_user(history)))  # its own user: its own jobs
            daemons[history] = stack.enter_context(daemon)
        for history in histories:
            sidebars[history] = await Sidebar.connect(roots[history], since=last_seqs[history],
                                                      daemon=daemons[history])
            await sidebars[history].wait_connected()
        cpu_before = {history: cpu_seconds(daemons[history].pid) for history in histories}
        stored = dict.fromkeys(histories, 0.0)
        for burst in range(bursts):
            turn = burst % len(histories)
            for history in histories[turn:] + histories[:turn]:
                # Pacing: a burst's jobs leave the subscription's window only once a later job is more than
                # the cursor overlap newer, and a window of more than the subscription limit (3 x 90 jobs)
                # would add a catch-up query to the measurement.
                await asyncio.sleep(max(0.0, stored[history] + BURST_SPACING_SECONDS - time.time()))
                job_ids = await asyncio.to_thread(backend.create_jobs, count=jobs, width=256, height=256,
                                                  format="png", owner=_user(history),
                                                  prompt=f"scale {history} burst {burst}")
                stored[history] = time.time()
                sidebar = sidebars[history]
                await sidebar.wait_materialized(job_ids, timeout=300, what=f"a burst of {jobs} jobs")
                done = max(sidebar.materialized[j] for j in job_ids)
                costs[history].append((done - stored[history]) * 1000 / jobs)
        for history in histories:
            cpu_used[history] = (cpu_seconds(daemons[history].pid) - cpu_before[history]) * 1000 / (jobs * bursts)
            await sidebars[history].close()
    return costs, cpu_used


def _user(history: int) -> str:
    return f"scale-{history}"


def prefill(root: Path, count: int) -> int:
    """Give ``root`` a ledger holding ``count`` materialized jobs, older than a day; return the last event seq.

    Jobs are observed through :meth:`Ledger.observe_jobs` (in chunks); their output rows and
    announcement events are then written with plain SQL in one transaction, the way
    :meth:`Ledger.mark_materialized` writes them (one per job would take an fsync each). The
    cursors are set to now, so the daemon's subscription starts after them, and after the jobs
    earlier measurements stored on the same backend. The newest ``gallery_size`` jobs get their
    file on disk, as recorded, and its thumbnail: the daemon checks those against their SHA-256 at
    start and would materialize again any that is missing (the older ones it checks only if the
    folder is replaced), and would make every missing thumbnail again.
    """
    now = time.time()
    path = default_layout(root).ledger
    path.parent.mkdir(parents=True, exist_ok=True)
    with Ledger(path) as ledger:
        docs = [_history_doc(i, now) for i in range(count)]
        for start in range(0, count, _OBSERVE_CHUNK):
            ledger.observe_jobs(docs[start:start + _OBSERVE_CHUNK])
        for feed in ("succeeded", "failed"):
            ledger.ensure_cursor(now * 1000, feed)  # type: ignore[arg-type]
    outputs = default_layout(root).outputs
    outputs.mkdir(mode=0o700, exist_ok=True)
    picture = Image.new("RGB", (256, 256), (40, 90, 160))
    image, thumbnail = io.BytesIO(), io.BytesIO()
    picture.save(image, "PNG")
    shrink(picture).save(thumbnail, "WEBP", quality=THUMBNAIL_QUALITY, method=THUMBNAIL_METHOD)
    thumbnails = outputs / THUMBNAILS_DIR
    thumbnails.mkdir(mode=0o700, exist_ok=True)
    on_disk = {doc["jobId"] for doc in docs[-DaemonOptions.gallery_size:]}
    for job_id in on_disk:
        (outputs / f"{job_id}_0.png").write_bytes(image.getvalue())
        # Its thumbnail too, as the daemon leaves it: else the measured bursts would share the
        # machine with a one-time rebuild of a thousand thumbnails at start.
        (thumbnails / thumbnail_name(f"{job_id}_0.png")).write_bytes(thumbnail.getvalue())
    size, digest = len(image.getvalue()), hashlib.sha256(image.getvalue()).hexdigest()
    base = outputs.resolve()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO outputs (job_id, idx, path, mime_type, width, height, size_bytes, sha256)"
            " VALUES (?, 0, ?, 'image/png', 256, 256, ?, ?)",
            ((doc["jobId"], f"{doc['jobId']}_0.png", *((size, digest) if doc["jobId"] in on_disk else
                                                       (40000, hashlib.sha256(doc["jobId"].encode()).hexdigest())))
             for doc in docs))
        conn.executemany(
            "INSERT INTO events (type, job_id, payload, created_at) VALUES ('media.materialized', ?, ?, ?)",
            ((doc["jobId"], _payload(doc, base), now) for doc in docs))
        conn.execute(
            "UPDATE jobs SET status = 'materialized', materialized_at = ?, event_seq = (SELECT seq FROM events e"
            " WHERE e.job_id = jobs.job_id AND e.type = 'media.materialized')", (now,))
        conn.execute("COMMIT")
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    finally:
        conn.close()
    # The disk must not still be writing the history back when the daemon's first fsyncs come.
    os.sync()
    return row[0] if row else 0


def _history_doc(i: int, now: float) -> dict[str, Any]:
    completed = (now - 2 * 86400) * 1000 + i
    job_id = f"job_history_{i:08d}"
    return {
        "_id": hashlib.md5(job_id.encode()).hexdigest(), "_creationTime": completed - 2000, "jobId": job_id,
        "capability": "text_to_image", "profile": "best", "request": {"prompt": f"history job {i}"},
        "status": "succeeded", "upstreamStatus": "OK", "queuePosition": None, "createdAt": completed - 2000,
        "updatedAt": completed, "startedAt": completed - 1500, "completedAt": completed,
        "output": {"images": [{"url": f"https://cdn.example.com/{job_id}.png", "content_type": "image/png",
                               "width": 256, "height": 256, "file_name": "output_0.png", "file_size": 40000}]},
    }


def _payload(doc: dict[str, Any], base: Path) -> str:
    return json.dumps({
        "kind": "media", "asset": {"kind": "image", "filePaths": [str(base / f"{doc['jobId']}_0.png")]},
        "jobId": doc["jobId"], "capability": doc["capability"], "prompt": doc["request"]["prompt"],
        "createdAt": doc["createdAt"],
    }, sort_keys=True, separators=(",", ":"))
