"""Subscription: our sync client against the official ``convex`` client, same backend, same jobs.

The measurement is :mod:`subscription_latency` (each client in its own
process; a job committed through the control API -> the client sees it), put
in the suite's shape. The floor is the official client.
"""

from __future__ import annotations

import subscription_latency

from benchkit import BenchResult, Metric

NAME = "subscription"
GOAL_RATIO = subscription_latency.GOAL_RATIO
FULL_JOBS = 200


async def run(jobs: int = FULL_JOBS, warmup: int = 10) -> BenchResult:
    figures = await subscription_latency.measure(jobs, warmup)
    ours, official = figures["ours"], figures["official"]
    metrics = [Metric("median_ms", "ms", ours["median_ms"], official["median_ms"]),
               Metric("p99_ms", "ms", ours["p99_ms"], official["p99_ms"])]
    ratio = metrics[0].ratio or float("inf")
    met = ratio <= GOAL_RATIO
    notes = []
    if jobs < FULL_JOBS:
        notes.append(f"quick: {jobs} jobs, fewer than the {FULL_JOBS} of a full run")
    if not met:
        notes.append(f"GOAL MISSED: median ratio {ratio:.2f} (goal <= {GOAL_RATIO})")
    return BenchResult(
        NAME, f"median ours / official <= {GOAL_RATIO}", met, metrics,
        "the official convex Python client, in its own process, same jobs",
        details={"jobs": figures["jobs"], "warmup": warmup, "ours_ms": ours, "official_ms": official,
                 "measured": "commit request sent -> the client yields a result holding the job"},
        notes=notes,
    )
