"""``materializer replay``: fetch missed jobs with one-shot HTTP queries and materialize what is missing.

Safe while the daemon runs: both work through the same ledger, so a job is
claimed by one process at a time (a job the daemon is busy with is waited
for, not done twice), each job is announced to the sidebar exactly once
(the daemon pushes the events replay writes), and the gallery manifest is
rebuilt from the ledger and replaced atomically by whoever writes last.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

from materializer import exits
from materializer.convex.http import ConvexAuthError, ConvexFunctionError, ConvexHttpClient, ConvexHttpError
from materializer.daemon import AUTH_ACTION
from materializer.feed import Gap
from materializer.finite import is_finite_number
from materializer.materialize import Workspace
from materializer.options import DaemonOptions
from materializer.queries import JOB_QUERY, SUCCEEDED_QUERY, WINDOW_MAX, succeeded_pages
from materializer.tokens import TokenProvider

__all__ = ["ReplaySummary", "SignInNeeded", "find_jobs", "parse_when", "replay"]

REPLAY_LEASE_PREFIX = "replay:"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_when(text: str, now: float | None = None) -> float:
    """A moment as Unix milliseconds: a duration back from now (``2h``, ``7d``) or an ISO date/time."""
    now = time.time() if now is None else now
    match = _DURATION.match(text)
    if match:
        return (now - float(match.group(1)) * _UNIT_SECONDS[match.group(2)]) * 1000
    try:
        moment = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither a duration like 2h or 7d nor an ISO date like 2026-11-24") from None
    if moment.tzinfo is None:
        moment = moment.astimezone()  # a naive time is local time
    return moment.timestamp() * 1000


@dataclass
class ReplaySummary:
    materialized: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    planned: list[str] = field(default_factory=list)
    uncovered: list[Gap] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "materialized": self.materialized,
            "alreadyPresent": self.present,
            "failed": [{"jobId": job_id, "reason": reason} for job_id, reason in self.failed],
            "wouldMaterialize": self.planned,
            "uncovered": [{"fromMs": gap.from_ms, "untilMs": gap.until_ms, "jobsAtLeast": gap.jobs_at_least}
                          for gap in self.uncovered],
        }


class SignInNeeded(Exception):
    """The backend refused the token: a person must sign in again."""


async def find_jobs(http: ConvexHttpClient, token: str | None, since: float, until: float | None,
                    job_ids: list[str], summary: ReplaySummary, out: TextIO,
                    command: str = "replay") -> list[dict[str, Any]]:
    """The succeeded jobs named by ``job_ids`` (``getByJobId``), else those of ``[since, until]``.

    Listed with the page query where the backend has one, else ``listSucceededSince`` (a range it
    cannot list goes to ``summary.uncovered``). Raises :class:`SignInNeeded`, or
    :class:`~materializer.convex.http.ConvexHttpError` when a request fails.
    """
    try:
        if job_ids:
            docs = []
            for job_id in job_ids:
                doc = await http.query(JOB_QUERY, {"jobId": job_id}, token)
                if doc is None:
                    print(f"replay: job {job_id} not found (or not yours)", file=out)
                elif not isinstance(doc, dict):
                    raise ConvexHttpError(f"{JOB_QUERY} answered {type(doc).__name__}, not a job document")
                elif doc.get("status") != "succeeded":
                    print(f"replay: job {job_id} is {doc.get('status')}, nothing to materialize", file=out)
                else:
                    docs.append(doc)
            return docs
        try:
            return await _page_through(http, token, since, until)
        except ConvexFunctionError as exc:
            print(f"{command}: no page query on this backend ({exc.error_message.splitlines()[0][:200]}); "
                  f"listing with {SUCCEEDED_QUERY}, which returns the newest {WINDOW_MAX} jobs", file=out)
        docs, gap = await _list_window(http, token, since, until)
        if gap is not None:
            summary.uncovered.append(gap)
        return docs
    except ConvexAuthError as exc:
        raise SignInNeeded(str(exc)) from None


async def _list_window(http: ConvexHttpClient, token: str | None, since: float,
                       until: float | None) -> tuple[list[dict[str, Any]], Gap | None]:
    """The jobs of ``[since, until]`` that ``listSucceededSince`` can list, and the range it cannot.

    It lists the newest ``WINDOW_MAX`` jobs from ``since`` on; when that many come back and the
    oldest of them completed after ``since``, older jobs may exist that no public query reaches.
    """
    answer = await http.query(SUCCEEDED_QUERY, {"since": since, "limit": WINDOW_MAX}, token)
    if not isinstance(answer, list):
        raise ConvexHttpError(f"{SUCCEEDED_QUERY} answered {type(answer).__name__}, not a list of jobs")
    docs = [d for d in answer if isinstance(d, dict)]
    completed = [d["completedAt"] for d in docs if is_finite_number(d.get("completedAt"))]
    gap = None
    if len(answer) >= WINDOW_MAX and completed and min(completed) > since:
        gap = Gap(since, min(min(completed), until) if until is not None else min(completed), len(answer))
    return [d for d in docs if _not_after(d, until)], gap


def _not_after(doc: dict[str, Any], until: float | None) -> bool:
    """Whether a job is inside the replay's range (one without a usable completedAt is let through)."""
    return until is None or not is_finite_number(doc.get("completedAt")) or doc["completedAt"] <= until


async def _page_through(http: ConvexHttpClient, token: str | None, since: float,
                        until: float | None) -> list[dict[str, Any]]:
    async def same_token() -> str | None:
        return token

    docs: list[dict[str, Any]] = []
    async for page in succeeded_pages(http, same_token, since, until):
        docs.extend(d for d in page if isinstance(d, dict) and _not_after(d, until))
    return docs


async def replay(options: DaemonOptions, tokens: TokenProvider, *, since: float, until: float | None,
                 job_ids: list[str], dry_run: bool, out: TextIO = sys.stderr) -> tuple[int, ReplaySummary]:
    """Run a replay; returns (exit code, summary). Progress and notes go to ``out``."""
    summary = ReplaySummary()
    token = await tokens.get()
    if token is None:
        print(f"replay: sign-in needed. {AUTH_ACTION}", file=out)
        return exits.SIGN_IN_NEEDED, summary
    async with ConvexHttpClient(options.convex_url) as http:
        try:
            docs = await find_jobs(http, token, since, until, job_ids, summary, out)
        except SignInNeeded:
            print(f"replay: the token was refused: sign-in needed. {AUTH_ACTION}", file=out)
            return exits.SIGN_IN_NEEDED, summary
        except ConvexHttpError as exc:
            print(f"replay: could not list jobs: {exc}", file=out)
            return exits.FAILED, summary
    worker = Workspace(options, owner=f"{REPLAY_LEASE_PREFIX}{os.getpid()}:{secrets.token_hex(4)}")
    try:
        await worker.observe(docs)
        ids = [d["jobId"] for d in docs if isinstance(d, dict) and isinstance(d.get("jobId"), str)]
        todo = []
        known = await worker.db(worker.ledger.jobs, ids)
        for job_id in ids:
            job = known.get(job_id)
            if job is None:
                summary.failed.append((job_id, "the ledger could not keep this job document"))
            elif job.status == "materialized" and (problem := await _files_problem(worker, job_id)) is None:
                summary.present.append(job_id)  # its files are there, byte for byte as committed
            elif job.status == "materialized" and not dry_run:
                await worker.db(worker.ledger.mark_vanished, {job_id: f"its files vanished ({problem})"})
                again = await worker.db(worker.ledger.job, job_id)
                todo.append(again if again is not None else job)
            else:
                todo.append(job)
        if dry_run:
            summary.planned = [job.job_id for job in todo]
            return (exits.FAILED if summary.uncovered else exits.OK), summary
        await worker.db(worker.ledger.requeue, [job.job_id for job in todo if job.status == "quarantined"])
        progress = _Progress(len(todo), out)
        # A few jobs ahead of the downloads, not all of them: claiming every job first would hold the
        # ledger's thread (an fsync per claim) before the first download, and let early leases lapse.
        in_flight = asyncio.Semaphore(2 * options.download_concurrency)

        async def replay_one(job_id: str, doc: dict[str, Any]) -> None:
            async with in_flight:
                await _replay_one(worker, job_id, doc, summary, progress)

        await asyncio.gather(*(replay_one(job.job_id, job.doc) for job in todo))
        progress.finish()
        # Jobs materialized before thumbnails existed (or whose thumbnail broke) get theirs now.
        present = [f for job_id in summary.present for f in await worker.db(worker.ledger.outputs, job_id)]
        if await worker.repair_thumbnails(present) or summary.materialized:
            await worker.write_gallery()
    finally:
        await worker.aclose()
    return (exits.FAILED if summary.failed or summary.uncovered else exits.OK), summary


async def _files_problem(worker: Workspace, job_id: str) -> str | None:
    """Why a materialized job's files are not in the outputs folder as committed (SHA-256 and all), or None."""
    files = await worker.db(worker.ledger.outputs, job_id)
    return await asyncio.to_thread(worker.materializer.files_problem, files, hashes=True)


async def _replay_one(worker: Workspace, job_id: str, doc: dict[str, Any], summary: ReplaySummary,
                      progress: _Progress) -> None:
    ledger = worker.ledger
    deadline = time.monotonic() + worker.options.lease_seconds
    while (claimed := await worker.db(ledger.claim, job_id, worker.runner.owner, worker.options.lease_seconds)) is None:
        job = await worker.db(ledger.job, job_id)
        if job is not None and job.status != "pending":
            break  # the daemon finished it meanwhile
        if time.monotonic() > deadline:
            summary.failed.append((job_id, "another process kept working on it"))
            progress.step()
            return
        await asyncio.sleep(0.1)
    else:
        result = await worker.runner.attempt(job_id, doc, claimed.attempts)
        if result.outcome != "materialized":
            summary.failed.append((job_id, result.reason or result.outcome))
        else:
            summary.materialized.append(job_id)
        progress.step()
        return
    job = await worker.db(ledger.job, job_id)
    if job is not None and job.status == "materialized":
        summary.present.append(job_id)
    else:
        summary.failed.append((job_id, (job.last_error if job else None) or "not materialized"))
    progress.step()


def _iso(ms: float) -> str:
    return dt.datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")


class _Progress:
    """A one-line progress bar, only on a terminal."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.done, self.out = total, 0, out
        self.enabled = total > 0 and out.isatty()

    def step(self) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            self.out.write(f"\r[{'#' * filled}{' ' * (30 - filled)}] {self.done}/{self.total}")
            self.out.flush()

    def finish(self) -> None:
        if self.enabled:
            self.out.write("\n")


def print_summary(summary: ReplaySummary, dry_run: bool, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(summary.as_json()) + "\n")
        return
    for gap in summary.uncovered:
        out.write(f"not covered: jobs completed from {_iso(gap.from_ms)} until {_iso(gap.until_ms)} may be missing: "
                  f"at least {gap.jobs_at_least} jobs completed since then and the backend lists only the newest "
                  f"{WINDOW_MAX} (it has no page query)\n")
    if dry_run:
        out.write(f"would materialize {len(summary.planned)} job(s); {len(summary.present)} already present\n")
        for job_id in summary.planned:
            out.write(f"  {job_id}\n")
        return
    out.write(f"materialized {len(summary.materialized)}, already present {len(summary.present)}, "
              f"failed {len(summary.failed)}\n")
    for job_id, reason in summary.failed:
        out.write(f"  failed {job_id}: {reason}\n")
