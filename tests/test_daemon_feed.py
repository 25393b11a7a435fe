"""The succeeded feed against a backend with only the real queries, and against one with a page query.

The real backend has ``getByJobId``, ``listSucceededSince`` and ``listFailedSince`` and nothing
else (ruuxi/stella-v2 ``packages/contracts/convex-api.ts``); ``listSucceededSince`` returns the
newest ``limit`` jobs. The default local backend is the same; ``--extension page-query`` adds a
gap-free page query for the tests that close gaps with it.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import Any

from materializer.layout import default_layout
from materializer.ledger import Ledger
from materializer.options import DaemonOptions
from materializer.replay import print_summary, replay
from materializer.status import collect_status
from materializer.tokens import StaticTokenProvider
from stella_devbackend.control import DevBackend

from helpers import async_wait_until, ledger_events, output_files, running_daemon
from ledger_checks import cursor_of

FAST: dict[str, Any] = {"retry_base_seconds": 0.05, "retry_max_seconds": 0.2, "read_timeout": 1.0,
                        "total_timeout": 5.0}


def gap_events(root: Path) -> list[dict[str, Any]]:
    return [e.payload for e in ledger_events(root, "materializer.state") if e.payload.get("state") == "gap"]


def completed_at(backend: DevBackend, job_id: str) -> float:
    doc = backend.query("media_jobs:getByJobId", {"jobId": job_id}).json()["value"]
    return float(doc["completedAt"])


async def wait_materialized(daemon: Any, job_ids: list[str], timeout: float = 30.0) -> None:
    def done() -> bool:
        jobs = [daemon.ledger.job(job_id) for job_id in job_ids]
        return all(job is not None and job.status == "materialized" for job in jobs)

    await async_wait_until(done, timeout, what=f"{len(job_ids)} job(s) to materialize")


async def test_a_backlog_beyond_the_window_is_caught_up_with_a_page_query_where_there_is_one(
        paging_backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    job_ids = paging_backend.create_jobs(count=45, share_files=True, width=24, height=16, completedAtStep=1000)
    async with running_daemon(root, paging_backend, **FAST, subscription_limit=20) as daemon:
        await wait_materialized(daemon, job_ids)
    assert len(output_files(root)) == 45
    assert gap_events(root) == []


async def test_a_gap_the_real_queries_cannot_close_is_reported_once_with_its_range_then_given_up(
        backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    job_ids = backend.create_jobs(count=30, share_files=True, width=24, height=16, completedAtStep=1000)
    window = job_ids[10:]  # the newest 20: all that listSucceededSince(limit=20) can show
    started_ms = time.time() * 1000
    async with running_daemon(root, backend, **FAST, subscription_limit=20) as daemon:
        await wait_materialized(daemon, window)
        [gap] = await async_wait_until(lambda: gap_events(root), 10, what="the gap report")
        # Given up: the cursor moves past the gap once the window's jobs are done.
        await async_wait_until(lambda: (cursor_of(daemon.ledger) or 0) > gap["untilMs"] - 10_000, 10,
                               what="the cursor to move past the gap")
        status = collect_status(root, daemon.options.layout)
    # From the first start's cursor: the 24 h look-back.
    assert abs(gap["fromMs"] - (started_ms - 24 * 3600 * 1000)) < 60_000
    assert gap["untilMs"] == completed_at(backend, window[0])
    assert gap["jobsAtLeast"] == 20
    assert gap["reason"].startswith("the backend has no gap-free page query (Could not find public function")
    [kept] = status["gaps"]
    assert (kept["fromMs"], kept["untilMs"], kept["jobsAtLeast"]) == (gap["fromMs"], gap["untilMs"], 20)
    with Ledger(default_layout(root).ledger) as ledger:
        assert [job_id for job_id in job_ids if ledger.job(job_id) is not None] == window
    # A restart neither reports the same gap again nor loses a job completed meanwhile.
    [later] = backend.create_jobs(count=1)
    async with running_daemon(root, backend, **FAST, subscription_limit=20) as daemon:
        await wait_materialized(daemon, [later])
    assert len(gap_events(root)) == 1


async def test_a_window_that_fills_up_while_connected_is_no_gap(backend: DevBackend, tmp_path: Path) -> None:
    """Downloads stall, so the cursor cannot move and the window fills with 12 > 5 pending jobs.

    Each job was in an answer before a newer one pushed it out, so none is missing: no gap.
    """
    root = tmp_path / "root"
    backend.set_faults([{"kind": "http_error", "status": 503}])
    async with running_daemon(root, backend, **FAST, max_attempts=1000, subscription_limit=5) as daemon:
        job_ids: list[str] = []
        for _ in range(12):
            [job_id] = backend.create_jobs(count=1, share_files=True, width=8, height=8)
            job_ids.append(job_id)
            await async_wait_until(lambda: daemon.ledger.job(job_ids[-1]) is not None, 10, what="the job observed")
        backend.set_faults([])
        await wait_materialized(daemon, job_ids)
    assert gap_events(root) == []
    assert len(output_files(root)) == 12


def replay_options(root: Path, backend: DevBackend) -> DaemonOptions:
    return DaemonOptions(root=root, convex_url=backend.url, **FAST)


async def test_replay_with_the_real_queries_reports_the_range_it_cannot_list_and_exits_1(
        backend: DevBackend, tmp_path: Path) -> None:
    job_ids = backend.create_jobs(count=205, share_files=True, width=8, height=8, completedAtStep=10)
    since = completed_at(backend, job_ids[0]) - 1
    notes = io.StringIO()
    code, summary = await replay(replay_options(tmp_path / "root", backend), StaticTokenProvider(backend.token),
                                 since=since, until=None, job_ids=[], dry_run=True, out=notes)
    assert code == 1
    assert sorted(summary.planned) == sorted(job_ids[5:])
    [gap] = summary.as_json()["uncovered"]
    assert gap == {"fromMs": since, "untilMs": completed_at(backend, job_ids[5]), "jobsAtLeast": 200}
    assert "no page query on this backend (Could not find public function" in notes.getvalue()
    text = io.StringIO()
    print_summary(summary, True, False, text)
    assert text.getvalue().startswith("not covered: jobs completed from ")


async def test_replay_since_until_works_with_the_real_queries(backend: DevBackend, tmp_path: Path) -> None:
    job_ids = backend.create_jobs(count=6, share_files=True, width=8, height=8, completedAtStep=1000)
    since, until = completed_at(backend, job_ids[1]), completed_at(backend, job_ids[3])
    code, summary = await replay(replay_options(tmp_path / "root", backend), StaticTokenProvider(backend.token),
                                 since=since, until=until, job_ids=[], dry_run=False, out=io.StringIO())
    assert (code, summary.failed, summary.uncovered) == (0, [], [])
    assert sorted(summary.materialized) == sorted(job_ids[1:4])
    out = io.StringIO()
    print_summary(summary, False, True, out)
    assert json.loads(out.getvalue())["uncovered"] == []
