"""Subscription latency: a job is committed on the local backend -> a subscribed client sees it.

Our sync client and the official ``convex`` Python client subscribe side by
side to ``media_jobs:listSucceededSince`` on one local backend, each in its
own process running the same tiny harness (so neither competes for the
other's event loop or GIL, and both pay the same pipe). The benchmark then
commits jobs one at a time through the backend's control API and records,
on the system-wide monotonic clock, when each client first sees each job.
The next job is committed only after both clients saw the previous one.

Latency is measured from just before the commit request is sent, so it
includes one loopback HTTP request to the backend; that cost is the same
for both clients and cancels out of the comparison.

    python bench/subscription_latency.py [--jobs 200] [--warmup 10] [--json]

Prints medians, p99 and the ratio ours / official (goal: <= :data:`GOAL_RATIO`, 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

QUERY = "media_jobs:listSucceededSince"
#: The median of ours / official the issue asks for ("Fast as a durable write allows").
GOAL_RATIO = 0.9
CLIENTS = ("ours", "official")


# -- the harness each client runs in (a child process) ------------------------------------------


async def _harness(kind: str, url: str, since: float) -> None:
    """Subscribe and print ``{"t": monotonic, "ids": [...]}`` for every result, as soon as it arrives.

    The token comes in ``STELLA_TOKEN`` (never on a command line, where ``ps`` would show it).
    """
    args: dict[str, Any] = {"since": since, "limit": 50}
    token = os.environ["STELLA_TOKEN"]

    def emit(jobs: list[Any]) -> None:
        now = time.monotonic()
        print(json.dumps({"t": now, "ids": [job["jobId"] for job in jobs]}), flush=True)

    if kind == "ours":
        from materializer.convex.protocol import QueryValue
        from materializer.convex.transport import SyncClient
        from materializer.tokens import StaticTokenProvider

        async with SyncClient(url, StaticTokenProvider(token)) as client:
            async for result in client.subscribe(QUERY, args):
                if isinstance(result, QueryValue):
                    emit(result.value)
    else:
        from convex import ConvexClient

        official = ConvexClient(url)
        official.set_auth(token)
        async for value in official.subscribe(QUERY, args):
            assert isinstance(value, list)
            emit(value)


# -- the driver ----------------------------------------------------------------------------------------


class _Watcher:
    """Reads one client's harness output and remembers when each job id was first seen."""

    def __init__(self, name: str, process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.process = process
        self.first_seen: dict[str, float] = {}
        self.results = 0
        self.changed = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            record = json.loads(line)
            self.results += 1
            for job_id in record["ids"]:
                self.first_seen.setdefault(job_id, record["t"])
            event, self.changed = self.changed, asyncio.Event()
            event.set()

    async def wait_for(self, predicate: Any, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                await self.changed.wait()


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


async def measure(jobs: int = 200, warmup: int = 10) -> dict[str, Any]:
    """Run the comparison on a fresh local backend; return the figures (milliseconds)."""
    from stella_devbackend.control import DevBackend

    with tempfile.TemporaryDirectory() as folder:
        backend = DevBackend.start(Path(folder) / "backend", extra_args=["--job-delay", "0.01"], token_ttl=6 * 3600.0)
        try:
            return await _measure(backend, jobs, warmup)
        finally:
            backend.stop()


async def _measure(backend: Any, jobs: int, warmup: int) -> dict[str, Any]:
    since = time.time() * 1000
    watchers = []
    for name in CLIENTS:
        process = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--harness", name, backend.url, str(since),
            stdout=asyncio.subprocess.PIPE, env={**os.environ, "STELLA_TOKEN": backend.token},
        )
        watchers.append(_Watcher(name, process))
    try:
        for watcher in watchers:
            await watcher.wait_for(lambda w=watcher: w.results >= 1)  # subscribed: the empty first result
        sent: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=backend.url, headers={"X-Dev-Admin-Key": backend.admin_key},
                                     timeout=30.0) as http:
            for _ in range(warmup + jobs):
                started = time.monotonic()
                answer = await http.post("/_dev/jobs", json={"count": 1, "width": 8, "height": 8})
                answer.raise_for_status()
                [job_id] = answer.json()["jobs"]
                sent[job_id] = started
                for watcher in watchers:
                    await watcher.wait_for(lambda w=watcher, j=job_id: j in w.first_seen)
        measured = list(sent)[warmup:]
        figures: dict[str, Any] = {"jobs": len(measured)}
        for watcher in watchers:
            latencies = [(watcher.first_seen[j] - sent[j]) * 1000 for j in measured]
            figures[watcher.name] = {
                "median_ms": statistics.median(latencies),
                "p99_ms": _percentile(latencies, 0.99),
                "mean_ms": statistics.fmean(latencies),
            }
        figures["ratio_median"] = figures["ours"]["median_ms"] / figures["official"]["median_ms"]
        figures["ratio_p99"] = figures["ours"]["p99_ms"] / figures["official"]["p99_ms"]
        return figures
    finally:
        for watcher in watchers:
            watcher.process.terminate()
            await watcher.process.wait()
            watcher.task.cancel()


def _table(figures: dict[str, Any]) -> str:
    lines = [f"subscription latency, {figures['jobs']} jobs (commit request sent -> client sees the job)",
             f"{'client':<10}{'median ms':>12}{'p99 ms':>10}{'mean ms':>10}"]
    for name in CLIENTS:
        row = figures[name]
        lines.append(f"{name:<10}{row['median_ms']:>12.2f}{row['p99_ms']:>10.2f}{row['mean_ms']:>10.2f}")
    verdict = "goal met" if figures["ratio_median"] <= GOAL_RATIO else f"GOAL MISSED (ratio > {GOAL_RATIO})"
    lines.append(f"ratio ours/official: median {figures['ratio_median']:.2f}, p99 {figures['ratio_p99']:.2f} "
                 f"-> {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs measured (default 200)")
    parser.add_argument("--warmup", type=int, default=10, help="jobs committed first and not measured (default 10)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--harness", nargs=3, metavar=("CLIENT", "URL", "SINCE"), help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.harness:
        kind, url, since = options.harness
        asyncio.run(_harness(kind, url, float(since)))
        return 0
    figures = asyncio.run(measure(options.jobs, options.warmup))
    print(json.dumps(figures) if options.json else _table(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
