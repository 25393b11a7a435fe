"""Idle CPU: what the daemon costs while connected with nothing to do.

The daemon runs as ``python -m materializer run`` with a sidebar client
connected; once it is connected, the user + system CPU time of its process
(``/proc/<pid>/stat``, all threads) is read at the start and the end of the
window, and divided by the window. The backend sends its usual sync Pings
(every 15 s) meanwhile.

Floor: the official ``convex`` Python client, in its own process, subscribed
to the same two queries on the same backend and measured over the same window
at the same time: the cost of merely holding such subscriptions open. Both
figures have the resolution of the kernel's clock tick (10 ms per process).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchkit import BenchResult, Metric, Sidebar, clean_env, cpu_seconds, daemon_process, scratch_backend

NAME = "idle_cpu"
GOAL_PERCENT = 0.3
FULL_SECONDS = 60.0
HARNESS = Path(__file__).with_name("harness.py")


async def run(seconds: float = FULL_SECONDS) -> BenchResult:
    with scratch_backend("idle") as (folder, backend):
        return await _run(folder, backend, seconds)


async def _run(folder: Path, backend: Any, seconds: float) -> BenchResult:
    official = await asyncio.create_subprocess_exec(
        sys.executable, str(HARNESS), "idle", backend.url, stdout=subprocess.PIPE,
        env=clean_env(STELLA_TOKEN=backend.token))
    try:
        with daemon_process(folder / "root", backend) as daemon:
            sidebar = await Sidebar.connect(daemon.root, daemon=daemon)
            await sidebar.wait_connected()
            assert official.stdout is not None
            async with asyncio.timeout(60):
                await official.stdout.readline()  # subscribed
            ours_start, floor_start = cpu_seconds(daemon.pid), cpu_seconds(official.pid)
            started = time.monotonic()
            await asyncio.sleep(seconds)  # the measurement window
            elapsed = time.monotonic() - started
            ours = cpu_seconds(daemon.pid) - ours_start
            floor = cpu_seconds(official.pid) - floor_start
            daemon.check_alive()
            await sidebar.close()
    finally:
        official.kill()
        await official.wait()
    metric = Metric("cpu_percent", "% of one core", ours / elapsed * 100, floor / elapsed * 100)
    met = metric.ours <= GOAL_PERCENT
    notes = []
    if seconds < FULL_SECONDS:
        notes.append(f"quick: {seconds:g} s window instead of {FULL_SECONDS:g} s")
    if not met:
        notes.append(f"GOAL MISSED: {metric.ours:.2f}% of one core (goal <= {GOAL_PERCENT}%)")
    if metric.floor == 0:
        notes.append("the floor used less than one clock tick: no ratio")
    return BenchResult(
        NAME, f"<= {GOAL_PERCENT}% of one core", met, [metric],
        "official convex client, same two subscriptions, same window",
        details={"window_seconds": elapsed, "ours_cpu_seconds": ours, "floor_cpu_seconds": floor},
        notes=notes,
    )
