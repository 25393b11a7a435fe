"""The feed cannot be blocked by size or by dates, and time comes from the server (issue 13, parts 1 and 6).

Each case runs the real daemon process against the local backend, which fails a query that reads more
than its budget as Convex does (``TooManyBytesRead``; ``--max-read-bytes`` makes the budget small enough
for a fast test, the default is Convex's 16 MiB) and keeps a clock of its own (``--clock-offset``), so
that the daemon's clock can be wrong relative to the server's without touching the daemon. The full-size
cases (40 jobs of 900 KB, 250 jobs ten years ahead) are in the chaos suite's hostile inputs.
"""

from __future__ import annotations

import io
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from materializer.layout import default_layout
from materializer.materialize import Workspace
from materializer.options import DaemonOptions
from stella_devbackend.control import DevBackend

from helpers import DaemonProcess, ledger_events, ledger_jobs, wait_until
from hostile_server import HostileConvex

YEAR_MS = 365.25 * 86_400_000
DAY_MS = 86_400_000.0
FAST_JOBS = ["--job-delay", "0.01"]


@dataclass(frozen=True)
class Endpoint:
    """A backend's URL with a token of our choosing."""

    url: str
    token: str


def config(path: Path, **daemon: Any) -> list[str]:
    """``--config`` with these ``[daemon]`` keys."""
    path.write_text("[daemon]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in daemon.items()))
    return ["--config", str(path)]


def materialized(root: Path, job_ids: list[str]) -> bool:
    statuses = ledger_jobs(root)
    return all(statuses.get(job_id) == "materialized" for job_id in job_ids)


def state_events(root: Path, state: str) -> list[dict[str, Any]]:
    return [e.payload for e in ledger_events(root, "materializer.state") if e.payload.get("state") == state]


def log_lines(daemon: DaemonProcess, text: str) -> list[str]:
    return [line for line in daemon.log.read_text(errors="replace").splitlines() if text in line]


# -- size ------------------------------------------------------------------------------------------------------


def test_a_window_too_large_to_read_shrinks_and_every_job_materializes_with_the_page_query(tmp_path: Path) -> None:
    """Twelve 50 KB jobs while the daemon was down: a window of 200 reads 600 KB, over the budget of 200 KB, and
    fails on the server. The window halves until it is answered, the jobs below it are listed with the page query
    (its pages shrink the same way), and the jobs that come later flow too."""
    args = [*FAST_JOBS, "--max-read-bytes", "200000"]
    with DevBackend.start(tmp_path / "backend", extra_args=args, extensions=["page-query"]) as backend:
        backlog = backend.create_jobs(count=12, share_files=True, width=8, height=8, prompt="p" * 50_000)
        root = tmp_path / "root"
        with DaemonProcess(root, backend) as daemon:
            wait_until(lambda: materialized(root, backlog), what="the backlog")
            later = backend.create_jobs(count=2, share_files=True, width=8, height=8)
            wait_until(lambda: materialized(root, later), what="the jobs after it")
        assert log_lines(daemon, "Too many bytes read in a single function execution")
        assert log_lines(daemon, "asking for the newest 100 instead")
        assert state_events(root, "gap") == []


def test_with_only_the_real_queries_the_jobs_that_fit_flow_and_the_rest_is_a_reported_range(tmp_path: Path) -> None:
    """No public query lists what is older than a window (listSucceededSince has no upper bound): the newest jobs
    that fit in the read budget and every later job materialize; the range below them is reported once."""
    args = [*FAST_JOBS, "--max-read-bytes", "200000"]
    with DevBackend.start(tmp_path / "backend", extra_args=args) as backend:
        backlog = backend.create_jobs(count=12, share_files=True, width=8, height=8, prompt="p" * 50_000,
                                      completedAtStep=1000)
        root = tmp_path / "root"
        with DaemonProcess(root, backend):
            wait_until(lambda: materialized(root, backlog[-2:]), what="the newest jobs of the backlog")
            [gap] = wait_until(lambda: state_events(root, "gap"), what="the report of the range below the window")
            later = backend.create_jobs(count=2, share_files=True, width=8, height=8)
            wait_until(lambda: materialized(root, later), what="the jobs after it")
        statuses = ledger_jobs(root)
        listed = [job_id for job_id in backlog if statuses.get(job_id) == "materialized"]
        assert listed == backlog[-len(listed):] and len(listed) < 12
        assert gap["jobsAtLeast"] == len(listed) and gap["reason"].startswith("the backend has no gap-free page query")


def test_the_first_query_set_holds_both_subscriptions(tmp_path: Path) -> None:
    """The daemon subscribes to both feeds before its socket can open: one ModifyQuerySet, whenever it connects
    (a socket opened between the two, on a busy machine, used to send them one by one)."""
    first_sets: list[list[str]] = []

    def record(state: Any) -> list[Any]:
        first_sets.append(sorted(path for path, _ in state.queries.values()))
        return []

    with HostileConvex(files={"good.png": _png()}, script=record) as server:
        good = {"url": f"{server.url}/files/good.png", "content_type": "image/png"}
        server.docs = [_doc("job_fine", time.time() * 1000 - 1_000, good)]
        root = tmp_path / "root"
        with DaemonProcess(root, Endpoint(server.url, "any")):
            wait_until(lambda: ledger_jobs(root).get("job_fine") == "materialized", what="a job")
    assert first_sets == [["media_jobs:listFailedSince", "media_jobs:listSucceededSince"]]


def test_a_document_too_large_to_keep_is_quarantined_and_the_rest_flow(tmp_path: Path) -> None:
    """A server that sends one job document of 17 MB (no Convex deployment can: a query answer holds 16 MiB)."""
    good = {"url": "", "content_type": "image/png"}
    with HostileConvex(files={"good.png": _png()}) as server:
        good["url"] = f"{server.url}/files/good.png"
        now = time.time() * 1000
        server.docs = [_doc("job_huge", now - 2_000, good, prompt="p" * 17_000_000),
                       _doc("job_fine", now - 1_000, good)]
        root = tmp_path / "root"
        with DaemonProcess(root, Endpoint(server.url, "any")):
            wait_until(lambda: ledger_jobs(root).get("job_fine") == "materialized", what="the normal job")
            wait_until(lambda: ledger_jobs(root).get("job_huge") == "quarantined", what="the huge one given up")
        [quarantined] = [e for e in state_events(root, "quarantined") if e["jobId"] == "job_huge"]
        assert quarantined["reason"].startswith("job document is 17,000,")
        assert "over the 16,777,216 the ledger keeps" in quarantined["reason"]


# -- dates -------------------------------------------------------------------------------------------------------


def test_jobs_dated_in_the_future_hide_no_honest_job_and_are_each_reported_once(tmp_path: Path) -> None:
    """Eight jobs ten years ahead fill a window of five: no answer shows an honest job again, nor changes when one
    completes. The daemon lists the honest range with the page query on every answer and on a timer; each
    future-dated job is reported once (a restart does not report it again), and all of them materialize."""
    with DevBackend.start(tmp_path / "backend", extra_args=FAST_JOBS, extensions=["page-query"]) as backend:
        future = backend.create_jobs(count=8, share_files=True, width=8, height=8,
                                     completedAt=time.time() * 1000 + 10 * YEAR_MS)
        root = tmp_path / "root"
        settings = config(tmp_path / "daemon.toml", subscription_limit=5)
        with DaemonProcess(root, backend, settings) as daemon:
            honest = backend.create_jobs(count=1, share_files=True, width=8, height=8)
            wait_until(lambda: materialized(root, honest + future), what="the honest job and the future-dated ones")
            honest += backend.create_jobs(count=1, share_files=True, width=8, height=8)
            wait_until(lambda: materialized(root, honest), what="a second honest job (a later round of the timer)")
        with DaemonProcess(root, backend, settings):
            honest += backend.create_jobs(count=1, share_files=True, width=8, height=8)
            wait_until(lambda: materialized(root, honest), what="an honest job after a restart")
        anomalies = state_events(root, "anomaly")
        assert sorted(a["jobId"] for a in anomalies) == sorted(future)
        assert all(a["reason"].startswith("completedAt is 3652.") and "days after the server's now" in a["reason"]
                   for a in anomalies)
        assert len(log_lines(daemon, "is an anomaly: completedAt is")) == 8
        # The cursor stays by the server's now, not ten years ahead.
        assert abs((cursor_of_root(root) or 0) - time.time() * 1000) < DAY_MS


def test_without_a_page_query_the_range_hidden_behind_future_dated_jobs_is_reported_once(tmp_path: Path) -> None:
    with DevBackend.start(tmp_path / "backend", extra_args=FAST_JOBS) as backend:
        future = backend.create_jobs(count=8, share_files=True, width=8, height=8,
                                     completedAt=time.time() * 1000 + 10 * YEAR_MS)
        root = tmp_path / "root"
        with DaemonProcess(root, backend, config(tmp_path / "daemon.toml", subscription_limit=5)):
            wait_until(lambda: materialized(root, future[-5:]), what="the window's jobs")
            [gap] = wait_until(lambda: state_events(root, "gap"), what="the report")
            wait_until(lambda: len(state_events(root, "anomaly")) == 5, what="the anomalies of the window")
        assert "the newest 5 jobs are all dated after the server's now" in gap["reason"]
        assert len(state_events(root, "gap")) == 1


def test_jobs_dated_at_or_before_1970_are_materialized_and_reported_once(tmp_path: Path) -> None:
    """No real query lists them (its ``since`` is after 1970); a backend that ignores ``since`` does."""
    good = {"url": "", "content_type": "image/png"}
    with HostileConvex(files={"good.png": _png()}, ignores_since=True) as server:
        good["url"] = f"{server.url}/files/good.png"
        server.docs = [_doc("job_zero", 0.0, good), _doc("job_negative", -5.0, good),
                       _doc("job_honest", time.time() * 1000 - 1_000, good)]
        root = tmp_path / "root"
        with DaemonProcess(root, Endpoint(server.url, "any")) as daemon:
            wait_until(lambda: materialized(root, ["job_zero", "job_negative", "job_honest"]), what="the three jobs")
            wait_until(lambda: len(state_events(root, "anomaly")) == 2, what="two anomalies")
        reasons = {a["jobId"]: a["reason"] for a in state_events(root, "anomaly")}
        assert reasons == {"job_zero": "completedAt is 0, not a moment after 1970",
                           "job_negative": "completedAt is -5, not a moment after 1970"}
        assert len(log_lines(daemon, "not a moment after 1970")) == 2


# -- time comes from the server -------------------------------------------------------------------------------


def test_a_first_start_with_the_local_clock_a_year_ahead_takes_its_cursor_from_the_server(tmp_path: Path) -> None:
    """The backend's clock is a year behind the machine's, so the daemon's is a year ahead of the server's. The
    token lives two years: a five-minute token stamped by the server's clock looks expired to a clock a year
    ahead before the first socket reports the skew (token timing, outside this case)."""
    with DevBackend.start(tmp_path / "backend", extra_args=[*FAST_JOBS, "--clock-offset", str(-YEAR_MS / 1000)]) as b:
        endpoint = Endpoint(b.url, b.mint_token(ttl=2 * YEAR_MS / 1000))
        server_now = time.time() * 1000 - YEAR_MS
        earlier = b.create_jobs(count=2, share_files=True, width=8, height=8, completedAt=server_now - 3_600_000)
        root = tmp_path / "root"
        with DaemonProcess(root, endpoint) as daemon:
            wait_until(lambda: materialized(root, earlier), what="the jobs of the last hour (server time)")
            later = b.create_jobs(count=1, share_files=True, width=8, height=8)
            wait_until(lambda: materialized(root, later), what="a new job")
        [line] = log_lines(daemon, "the succeeded cursor starts at")
        assert "the local clock is 365.2 days ahead of the server's" in line
        assert abs((cursor_of_root(root) or 0) - server_now) < DAY_MS


def test_a_stored_cursor_after_the_servers_now_is_pulled_back_at_start(tmp_path: Path) -> None:
    """What a first start with the clock a year ahead left behind (a cursor a year in the future)."""
    with DevBackend.start(tmp_path / "backend", extra_args=FAST_JOBS) as backend:
        root = tmp_path / "root"
        with DaemonProcess(root, backend):
            wait_until(lambda: cursor_of_root(root) is not None, what="the first cursor")
        _sql(root, "UPDATE cursors SET since_ms = since_ms + ?", YEAR_MS)
        jobs = backend.create_jobs(count=2, share_files=True, width=8, height=8)
        with DaemonProcess(root, backend) as daemon:
            wait_until(lambda: materialized(root, jobs), what="the jobs behind the stored cursor")
        assert log_lines(daemon, "after the server's now: pulled back to its look-back")


def test_a_retry_left_a_day_ahead_by_a_clock_stepped_back_comes_on_time(tmp_path: Path) -> None:
    """Retries are scheduled on a steady clock; what a step left in the ledger (the retry time a day ahead) is
    pulled back at start to the longest wait the retry policy has."""
    with DevBackend.start(tmp_path / "backend", extra_args=FAST_JOBS) as backend:
        backend.set_faults([{"kind": "http_error", "status": 503}])
        [job] = backend.create_jobs(count=1, share_files=True, width=8, height=8)
        root = tmp_path / "root"
        settings = config(tmp_path / "daemon.toml", retry_base_seconds=0.2, retry_max_seconds=0.2)
        with DaemonProcess(root, backend, settings):
            wait_until(lambda: _sql(root, "SELECT attempts FROM jobs WHERE attempts > 0"), what="a failed attempt")
        _sql(root, "UPDATE jobs SET next_attempt_at = next_attempt_at + 86400")
        backend.clear_faults()
        with DaemonProcess(root, backend, settings) as daemon:
            wait_until(lambda: materialized(root, [job]), what="the retry")
        assert log_lines(daemon, "pulled back 1 retry time(s) or lease(s)")


# -- helpers ---------------------------------------------------------------------------------------------------


def cursor_of_root(root: Path) -> float | None:
    rows = _sql(root, "SELECT since_ms FROM cursors WHERE feed = 'succeeded'")
    return rows[0][0] if rows else None


def _sql(root: Path, statement: str, *params: Any) -> list[Any]:
    path = default_layout(root).ledger
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=30) as conn:
        return conn.execute(statement, params).fetchall()


def _png() -> bytes:
    data = io.BytesIO()
    Image.new("RGB", (8, 8), "teal").save(data, "PNG")
    return data.getvalue()


def _doc(job_id: str, completed_at: float, image: dict[str, Any], prompt: str = "p") -> dict[str, Any]:
    return {"jobId": job_id, "status": "succeeded", "completedAt": completed_at, "capability": "text_to_image",
            "request": {"prompt": prompt}, "output": {"images": [dict(image)]}}


async def test_a_document_that_grows_past_the_ledger_limit_between_answers_is_still_quarantined(
        tmp_path: Path) -> None:
    """The documents of the last answer are not sized again (Workspace.observe); a changed one is."""
    work = Workspace(DaemonOptions(root=tmp_path / "root", convex_url="http://127.0.0.1:9"), owner="test")
    try:
        image = {"url": "http://127.0.0.1:9/files/a.png"}
        small, other = _doc("job_grows", 1_000.0, image), _doc("job_other", 2_000.0, image)
        assert (await work.observe([small, other]))[0] == ["job_grows", "job_other"]
        assert (await work.observe([small, other]))[0] == []  # the same answer again: nothing new
        await work.observe([_doc("job_grows", 1_000.0, image, prompt="p" * 17_000_000), other])
        grown = work.ledger.job("job_grows")
        assert grown is not None and grown.status == "quarantined"
        assert grown.last_error is not None and "over the 16,777,216 the ledger keeps" in grown.last_error
        kept = work.ledger.job("job_other")
        assert kept is not None and kept.status == "pending"
    finally:
        await work.aclose()
