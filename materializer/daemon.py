"""The materializer daemon: feeds in, files out, nothing lost.

Data path, one stage per module:

    SyncClient (convex/) -> SucceededFeed / FailedFeed (feed.py: what to observe, gaps, the cursor)
    -> Ledger.observe_jobs (ledger.py) -> scheduler (here) -> JobRunner / JobMaterializer
    (materialize.py: jobs.py -> fetch.py -> images.py, media_files.py -> store.py, thumbnails.py -> payloads.py)
    -> Ledger.mark_materialized -> DisplayServer (display.py) -> gallery.json (gallery.py)

This module only wires them: it carries out the feeds' decisions, runs the
loops, and holds the instance lock.

The ledger is the single source of truth. The subscription only *observes*
jobs; workers materialize whatever the ledger says is due; the sidebar is fed
from the ledger's event log in ``seq`` order (so events written by a
concurrent ``materializer replay`` reach it too). A crash at any point
leaves either a committed file or nothing, and the job stays pending until
all of its outputs are committed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import functools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from materializer.convex.http import ConvexAuthError, ConvexFunctionError, ConvexHttpClient, ConvexHttpError
from materializer.convex.protocol import QueryFailure, QueryValue
from materializer.convex.transport import ConnectionState, Subscription, SyncClient
from materializer.feed import (
    AdvanceCursor,
    CursorStart,
    Decision,
    FailedFeed,
    FillGap,
    GapOutcome,
    Narrow,
    NoteFailed,
    Observe,
    ReportAnomalies,
    ReportGap,
    StartCursor,
    SucceededFeed,
)
from materializer.finite import is_finite_number
from materializer.layout import InstanceLock
from materializer.ledger import Event, Job, OutputFile
from materializer.materialize import FILES_VANISHED, Workspace, printable
from materializer.options import LIVE_OPTIONS, DaemonOptions
from materializer.payloads import failed_payload
from materializer.queries import (
    FAILED_QUERY,
    JOB_QUERY,
    SUCCEEDED_QUERY,
    PageQueryBroken,
    is_missing_function,
    succeeded_pages,
)
from materializer.tokens import TokenProvider

__all__ = ["AUTH_ACTION", "Materializer"]

log = logging.getLogger(__name__)

DAEMON_LEASE_PREFIX = "daemon:"
#: Shown to the person, verbatim, when the token is refused (the media API's ``action`` text).
AUTH_ACTION = (
    "Ask the user to open the Stella desktop app and finish signing in (Settings \u2192 Account, or the "
    "welcome screen on first launch). Once they're signed in, retry the same request \u2014 no payload "
    "changes needed."
)

#: The least time between two rewrites of gallery.json (each reads, renders and fsyncs up to
#: ``gallery_size`` jobs): a burst rewrites it a few times a second instead of once per job.
GALLERY_MIN_INTERVAL = 0.25

#: How many reported gaps the ledger keeps for ``status`` (the event log keeps every one).
MAX_GAPS_KEPT = 20
#: How many job ids reported as anomalies the ledger keeps, so that a restart does not report them
#: again (more than a window holds: the jobs that can come back in one).
MAX_ANOMALIES_KEPT = 1000
#: The feed timer never wakes more often than this (a guard: it sleeps until the feeds' next moment).
FEED_TIMER_MIN_SECONDS = 0.05

#: How often the outputs folder at its path is compared with the one held open (two syscalls), to notice
#: it removed, replaced or moved even when no job is committing (every commit checks it too).
OUTPUTS_CHECK_INTERVAL = 2.0
#: Materialized jobs read per ledger call when checking that their files are still there.
_CHECK_PAGE = 500

class Materializer:
    """The daemon. ``await run()`` until :meth:`stop`; also used one-shot by ``replay``."""

    def __init__(self, options: DaemonOptions, token_provider: TokenProvider | None,
                 display_factory: Callable[..., Any] | None = None) -> None:
        self.options = options
        self.tokens = token_provider
        self.owner = f"{DAEMON_LEASE_PREFIX}{os.getpid()}:{secrets.token_hex(4)}"
        self.work = Workspace(options, self.owner)
        self.ledger, self.db = self.work.ledger, self.work.db
        self.on_state: Callable[[dict[str, Any]], None] | None = None
        self._display_factory = display_factory
        self.display: Any = None
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._no_jobs = asyncio.Event()  # set while no attempt is under way: derived work waits for it
        self._no_jobs.set()
        self._work = asyncio.Event()
        self._announce = asyncio.Event()
        self._feeds_changed = asyncio.Event()  # the feed timer looks again at when to tick
        self._anomalies_kept = asyncio.Lock()  # the feed loops and the timer report anomalies concurrently
        self._gallery_dirty = asyncio.Event()
        self._thumbnails_wanted = asyncio.Event()
        self._stopping = asyncio.Event()
        self._announced_seq = 0
        self._feed = SucceededFeed(options.subscription_limit)
        self._failed_feed = FailedFeed(options.subscription_limit, options.cursor_overlap_ms)
        self._subscriptions: dict[str, Subscription] = {}
        self.client: SyncClient | None = None
        self.materialized_count = 0

    # -- plumbing --------------------------------------------------------------------------

    def apply_live(self, options: DaemonOptions) -> None:
        """Take the values of a reloaded configuration that can change without a restart."""
        self.work.apply_live(options)
        for name in LIVE_OPTIONS:
            setattr(self.options, name, getattr(options, name))
        self._failed_feed.overlap_ms = options.cursor_overlap_ms
        self._work.set()

    def stop(self) -> None:
        self._stopping.set()

    async def aclose(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        await self.work.aclose()

    # -- the daemon -------------------------------------------------------------------------

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run until :meth:`stop`. Holds the root's instance lock for its whole life."""
        lock = InstanceLock(self.options.layout)
        lock.acquire()
        try:
            await self._run(on_ready)
        finally:
            lock.release()

    async def _run(self, on_ready: Callable[[], None] | None) -> None:
        freed = await self.db(self.ledger.release_claims_by_prefix, DAEMON_LEASE_PREFIX)
        if freed:
            log.info("took back %d job(s) from a daemon that stopped without finishing them", freed)
        # With the instance lock held, a partial file belongs to a dead daemon, unless a replay
        # process is working right now (it holds leases): then only old partials are surely stale.
        max_age = 0.0 if await self.db(self.ledger.live_leases) == 0 else 600.0
        removed = await asyncio.to_thread(self.work.store.cleanup_stale_partials, max_age)
        if self.work.thumbnails is not None:
            removed += await asyncio.to_thread(self.work.thumbnails.cleanup_stale_partials, max_age)
        if removed:
            log.info("removed %d partial file(s) left by an earlier run", removed)
        # Retry times and leases later than could have been set come from a clock stepped back since.
        now = self.ledger.now()
        clamped = await self.db(self.ledger.clamp_schedule, now + self.work.runner.retry.longest_seconds,
                                now + self.options.lease_seconds)
        if clamped:
            log.warning("pulled back %d retry time(s) or lease(s) set further ahead than any wait (the clock was "
                        "stepped back)", clamped)
        # The cursors as stored; the first answers check them against the server's clock (feed.CursorStart).
        lookback_ms = self.options.lookback_hours * 3_600_000
        start = CursorStart(await self.db(self.ledger.cursor, "succeeded"), lookback_ms)
        failed_start = CursorStart(await self.db(self.ledger.cursor, "failed"), lookback_ms)
        since, failed_since = start.provisional(time.time() * 1000), failed_start.provisional(time.time() * 1000)
        self._announced_seq = await self.db(self.ledger.last_seq)
        await self.db(self.ledger.set_state, "daemon", {"pid": os.getpid(), "started_at": time.time()})
        if self._display_factory is not None:
            # The announcer below follows the ledger, so the server need not poll it too.
            self.display = self._display_factory(self.options.layout.display_socket, self.ledger,
                                                 poll_interval=None, executor=self.work.ledger_executor,
                                                 max_clients=self.options.max_sidebar_clients)
            await self.display.start()
        limit = self.options.subscription_limit
        kept = await self.db(self.ledger.get_state, "gaps", [])
        anomalies = await self.db(self.ledger.get_state, "anomalies", [])
        self._feed = SucceededFeed(limit, [
            (g["fromMs"], g["coveredUntilMs"]) for g in (kept if isinstance(kept, list) else [])
            if isinstance(g, dict) and is_finite_number(g.get("fromMs")) and is_finite_number(g.get("coveredUntilMs"))],
            anomalies=[a for a in (anomalies if isinstance(anomalies, list) else []) if isinstance(a, str)],
            start=start)
        self._failed_feed = FailedFeed(limit, self.options.cursor_overlap_ms, start=failed_start)
        # Started right before both subscriptions, with no await in between: the first ModifyQuerySet
        # holds both queries, whenever the socket opens.
        self.client = SyncClient(self.options.convex_url, self.tokens,
                                 inactivity_timeout=self.options.inactivity_timeout)
        self.client.start()
        succeeded = self.client.subscribe(SUCCEEDED_QUERY, {"since": since, "limit": limit})
        failed = self.client.subscribe(FAILED_QUERY, {"since": failed_since, "limit": limit})
        self._subscriptions = {"succeeded": succeeded, "failed": failed}
        self._gallery_dirty.set()  # a daemon killed before its last rewrite left gallery.json behind the ledger
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "succeeded feed": lambda: self._follow_succeeded(succeeded),
            "failed feed": lambda: self._follow_failed(failed),
            "feed timer": self._feed_timer,
            "scheduler": self._schedule,
            "announcer": self._announcer,
            "gallery writer": self._gallery_writer,
            "thumbnail keeper": self._keep_thumbnails,
            "connection watcher": self._watch_connection,
            "outputs watcher": self._watch_outputs,
        }
        tasks = [asyncio.create_task(self._supervised(name, loop), name=name) for name, loop in loops.items()]
        if on_ready is not None:
            on_ready()
        try:
            await self._stopping.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.client.close()
            for task in list(self._in_flight.values()):
                task.cancel()
            await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
            await self.work.write_gallery()
            if self.display is not None:
                await self.display.close()
            await self.db(self.ledger.set_state, "connection", {"state": "stopped", "at": time.time()})

    async def _supervised(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        """Run one of the daemon's loops; after an unexpected error, log it and start the loop again.

        A bug or a passing fault (a ledger busy for too long, a full disk under the manifest) in one
        loop must not take the daemon down: everything it does is idempotent and driven by the ledger,
        so starting over is always safe.
        """
        delay = 1.0
        while True:
            try:
                await loop()
                return
            except Exception:
                log.exception("the %s failed; restarting it in %.0fs", name, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    # -- feeds -------------------------------------------------------------------------------

    async def _follow_succeeded(self, subscription: Subscription) -> None:
        async for result in subscription:
            since, limit = float(result.args["since"]), int(result.args.get("limit", 50))
            answer = _answer(result)
            if isinstance(answer, str):
                await self._carry_out(self._feed.failed(since, limit, answer, self._server_now_ms()))
            else:
                await self._carry_out(self._feed.answer(since, limit, answer, self._server_now_ms()))

    async def _follow_failed(self, subscription: Subscription) -> None:
        async for result in subscription:
            since, limit = float(result.args["since"]), int(result.args.get("limit", 50))
            answer = _answer(result)
            if isinstance(answer, str):
                await self._carry_out(self._failed_feed.failed(since, limit, answer, self._server_now_ms()))
                continue
            if sum(isinstance(d, dict) for d in answer) < len(answer):
                log.warning("ignoring %d item(s) that are not job documents in an answer of %s",
                            len(answer) - sum(isinstance(d, dict) for d in answer), FAILED_QUERY)
            await self._carry_out(self._failed_feed.answer(since, answer, self._server_now_ms(), limit))

    async def _feed_timer(self) -> None:
        """Tick the feeds when they asked to be (a window to grow back, a hidden range to list again)."""
        while True:
            due = [t for t in (self._feed.next_tick_ms(), self._failed_feed.next_tick_ms()) if t is not None]
            timeout = None if not due else max(FEED_TIMER_MIN_SECONDS, (min(due) - self._server_now_ms()) / 1000)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):  # not wait_for: see _schedule
                    await self._feeds_changed.wait()
            self._feeds_changed.clear()
            now = self._server_now_ms()
            await self._carry_out([*self._feed.tick(now), *self._failed_feed.tick(now)])
            self._feeds_changed.clear()  # its own decisions: the next round looks again anyway

    def _server_now_ms(self) -> float:
        """The server's clock as the sync protocol tells it; before any word, the ledger's steady clock."""
        told = self.client.server_now_ms() if self.client is not None else None
        return told if told is not None else self.ledger.now() * 1000

    async def _carry_out(self, decisions: list[Decision]) -> None:
        """Do what the feeds decided, in order, telling them how each step went."""
        if not decisions:
            return
        queue = collections.deque(decisions)
        while queue:
            decision = queue.popleft()
            if isinstance(decision, Observe):
                new = await self.observe(list(decision.docs)) if decision.docs else []
                queue.extend(self._feed.observed(len(new)))
            elif isinstance(decision, NoteFailed):
                await self._note_failed(decision.docs)
            elif isinstance(decision, FillGap):
                outcome, reason = await self._fill_gap(decision)
                if decision.hidden:
                    queue.extend(self._feed.hidden_outcome(decision.gap, outcome, reason))
                else:
                    queue.extend(self._feed.gap_outcome(decision.gap, outcome, reason))
            elif isinstance(decision, ReportGap):
                await self._report_gap(decision)
            elif isinstance(decision, ReportAnomalies):
                await self._report_anomalies(decision)
            elif isinstance(decision, StartCursor):
                if decision.why:
                    log.warning("the %s cursor starts at %s: %s", decision.feed, _iso_ms(decision.since_ms),
                                decision.why)
                await self.db(self.ledger.place_cursor, decision.since_ms, decision.feed)
            elif isinstance(decision, AdvanceCursor):
                cursor = await self.db(self.ledger.advance_cursor, decision.covered_from_ms, decision.covered_until_ms,
                                       feed=decision.feed, overlap_ms=self.options.cursor_overlap_ms)
                feed = self._feed if decision.feed == "succeeded" else self._failed_feed
                queue.extend(feed.cursor_moved(cursor))
            else:
                assert isinstance(decision, Narrow)
                if decision.why:
                    log.warning("%s: %s", SUCCEEDED_QUERY if decision.feed == "succeeded" else FAILED_QUERY,
                                decision.why)
                self._subscriptions[decision.feed].update_args({"since": decision.since_ms, "limit": decision.limit})
        self._feeds_changed.set()

    async def _note_failed(self, docs: tuple[Mapping[str, Any], ...]) -> None:
        for doc in docs:
            try:
                event = await self.db(self.ledger.note_failed_job, doc, failed_payload(doc))
            except ValueError as exc:
                log.warning("ignoring a failed-job document the ledger cannot keep: %s", exc)
                continue
            if event is not None:
                self._announce.set()

    async def observe(self, docs: list[Any]) -> list[str]:
        """Record jobs from a query answer in the ledger and start what is due, leased in the same commit."""
        room = self._room()
        new, leased = await self.work.observe(docs, claim=room)
        self._start(leased)
        if new and (not leased or len(leased) >= room):
            # Nothing was leased (no room, or the documents were taken one by one), or as much as there was
            # room for and more may be due: the scheduler takes them as room frees.
            self._work.set()
        return new

    async def _fill_gap(self, fill: FillGap) -> tuple[GapOutcome, str]:
        """List the gap's jobs with the page query (where the backend has one) and observe them.

        A hidden range (behind a window of future-dated jobs) is listed again and again: logged at debug level.
        """
        gap = fill.gap
        log.log(logging.DEBUG if fill.hidden else logging.INFO, "%s: catching up on jobs from %s until %s",
                "the window is full of jobs dated in the future" if fill.hidden else "the subscription window is full",
                _iso_ms(gap.from_ms), "the last one" if fill.list_all else _iso_ms(gap.until_ms))
        try:
            async with ConvexHttpClient(self.options.convex_url) as http:
                async for page in succeeded_pages(http, self._token, gap.from_ms,
                                                  None if fill.list_all else gap.until_ms):
                    await self.observe(page)
                    await self._carry_out(self._feed.listed(page, self._server_now_ms()))
        except ConvexFunctionError as exc:
            first_line = exc.error_message.splitlines()[0][:200] if exc.error_message else ""
            if not is_missing_function(exc):
                log.warning("catching up on jobs from %s until %s failed on the server (%s); trying again later",
                            _iso_ms(gap.from_ms), _iso_ms(gap.until_ms), printable(first_line))
                return "failed", first_line
            return "absent", f"the backend has no gap-free page query ({first_line})"
        except PageQueryBroken as exc:
            return "absent", f"catching up failed: {exc}"
        except (ConvexAuthError, ConvexHttpError, OSError) as exc:
            log.warning("catching up on jobs from %s until %s failed (%s); trying again with the next answer",
                        _iso_ms(gap.from_ms), _iso_ms(gap.until_ms), exc)
            return "failed", str(exc)
        return "filled", ""

    async def _report_gap(self, report: ReportGap) -> None:
        gap = report.gap
        log.error("jobs completed from %s until %s may be missing: at least %d jobs completed since then and the "
                  "backend lists only the newest of them; %s", _iso_ms(gap.from_ms), _iso_ms(gap.until_ms),
                  gap.jobs_at_least, report.reason)
        public = {"fromMs": gap.from_ms, "untilMs": gap.until_ms, "jobsAtLeast": gap.jobs_at_least,
                  "reason": report.reason}
        kept = await self.db(self.ledger.get_state, "gaps", [])
        gaps = [g for g in kept if isinstance(g, dict)] if isinstance(kept, list) else []
        record = {**public, "coveredUntilMs": report.covered_until_ms, "at": time.time()}
        await self.db(self.ledger.set_state, "gaps", [*gaps[-(MAX_GAPS_KEPT - 1):], record])
        await self._state_event({"state": "gap", **public})

    async def _report_anomalies(self, report: ReportAnomalies) -> None:
        """Log each anomaly and tell the sidebar; keep the job ids so that a restart does not report them again."""
        for anomaly in report.anomalies:
            payload: dict[str, Any] = {"state": "anomaly", "reason": anomaly.reason,
                                       "serverNowMs": anomaly.server_now_ms}
            if anomaly.job_id is None:
                log.error("%s", anomaly.reason)
            else:
                log.warning("job %s is an anomaly: %s (it is materialized like any other)", printable(anomaly.job_id),
                            anomaly.reason)
                payload["jobId"] = anomaly.job_id
            if anomaly.completed_at_ms is not None:
                payload["completedAtMs" if anomaly.job_id is not None else "sinceMs"] = anomaly.completed_at_ms
            await self._state_event(payload)
        ids = [a.job_id for a in report.anomalies if a.job_id is not None]
        if ids:
            async with self._anomalies_kept:
                kept = await self.db(self.ledger.get_state, "anomalies", [])
                known = [a for a in kept if isinstance(a, str)] if isinstance(kept, list) else []
                await self.db(self.ledger.set_state, "anomalies", [*known, *ids][-MAX_ANOMALIES_KEPT:])

    async def _token(self) -> str | None:
        return await self.tokens.get() if self.tokens is not None else None

    async def _advance_cursor(self) -> None:
        """Jobs finished: let the succeeded feed move the cursor (and narrow its subscription)."""
        await self._carry_out(self._feed.progress())

    # -- workers ----------------------------------------------------------------------------------

    async def _schedule(self) -> None:
        """Start every due job (bounded by the download slots); sleep until more work or a retry is due."""
        while True:
            self._work.clear()
            room = self._room()
            # Read and leased in one ledger transaction (one commit for a burst, not one per job).
            if room > 0:
                self._start(await self.db(self.ledger.claim_due, room, self.owner, self.options.lease_seconds))
            next_due = await self.db(self.ledger.next_due_at)
            timeout = None if next_due is None else max(0.05, next_due - time.time())
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that lands as the
            # event fires, and the daemon would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._work.wait()

    def _room(self) -> int:
        """How many more jobs may be under way: four per download slot (their downloads wait for a slot)."""
        return max(0, self.options.download_concurrency * 4 - len(self._in_flight))

    def _start(self, leased: list[Job]) -> None:
        """Start an attempt at each job leased to this daemon; one still under way is tried again once its
        attempt is over (the new lease is ours: nobody else would try it before the lease lapses)."""
        for job in leased:
            if (running := self._in_flight.get(job.job_id)) is not None:
                # Leased again while its attempt is finishing: its files vanished right after their commit
                # and it is due again, or its lease lapsed during a long attempt.
                running.add_done_callback(functools.partial(self._start_after, job))
                continue
            task = asyncio.create_task(self._materialize_claimed(job))
            self._in_flight[job.job_id] = task
            self._no_jobs.clear()
            task.add_done_callback(functools.partial(self._job_done, job.job_id))

    def _start_after(self, job: Job, _previous: asyncio.Task[None]) -> None:
        if not self._stopping.is_set():
            self._start([job])

    def _job_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(job_id, None)
        if not self._in_flight:
            self._no_jobs.set()
        self._work.set()
        if not task.cancelled() and task.exception() is not None:
            # Its lease lapses and the job is tried again; say why it stopped.
            log.error("job %s stopped unexpectedly", printable(job_id), exc_info=task.exception())

    async def _materialize_claimed(self, job: Job) -> None:
        doc = job.doc
        if job.attempts == 0 and (job.last_error or "").startswith(FILES_VANISHED):
            doc = await self._current_document(job.job_id, doc)
        result = await self.work.runner.attempt(job.job_id, doc, job.attempts)
        if result.event is not None:
            self.materialized_count += 1
            if self.display is not None:
                self.display.publish(result.event)  # now, not on the announcer's next round (which skips it)
        if result.outcome == "materialized":
            self._gallery_dirty.set()  # also for a job whose vanished files came back (announced before)
        if result.outcome != "retry":
            self._announce.set()
        await self._advance_cursor()

    async def _current_document(self, job_id: str, stored: dict[str, Any]) -> dict[str, Any]:
        """The job's document as the backend has it now (``getByJobId``), else the stored one.

        A materialized job's stored document keeps its URLs without their query (a presigned
        URL's signature is a secret), so a job whose files vanished needs today's URLs to be
        downloaded again. The fresh document is kept for the job's further attempts.
        """
        try:
            async with ConvexHttpClient(self.options.convex_url) as http:
                current = await http.query(JOB_QUERY, {"jobId": job_id}, await self._token())
        except ConvexHttpError as exc:
            log.warning("job %s: its document could not be read again (%s); trying the stored one",
                        printable(job_id), printable(str(exc))[:300])
            return stored
        if not (isinstance(current, dict) and current.get("jobId") == job_id and current.get("status") == "succeeded"):
            log.warning("job %s: the backend no longer lists it as succeeded; trying the stored document",
                        printable(job_id))
            return stored
        await self.observe([current])
        return current

    # -- sidebar, gallery, state -------------------------------------------------------------------

    async def _announcer(self) -> None:
        """Push ledger events to the sidebar in ``seq`` order, including other processes' events."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):  # not wait_for: see _schedule
                    await self._announce.wait()
            self._announce.clear()
            while True:
                page = await self.db(self.ledger.events_after, self._announced_seq, 500)
                for event in page.events:
                    if self.display is not None:
                        self.display.publish(event)
                    self._announced_seq = event.seq
                    if event.type == "media.materialized":
                        self._gallery_dirty.set()
                if len(page.events) < 500:
                    break

    async def _gallery_writer(self) -> None:
        while True:
            await self._gallery_dirty.wait()
            self._gallery_dirty.clear()
            started = time.monotonic()
            if await self.work.write_gallery():
                self._thumbnails_wanted.set()
            # A rate limit, so that a burst rewrites the manifest a few times a second, not once per job.
            await asyncio.sleep(GALLERY_MIN_INTERVAL - (time.monotonic() - started))

    async def _watch_outputs(self) -> None:
        """Keep what the ledger calls materialized on disk, and materialize again what is not.

        At start, the gallery's jobs (the newest ``gallery_size``) are checked against their
        recorded SHA-256. Then the outputs folder is checked every :data:`OUTPUTS_CHECK_INTERVAL`
        (and by every commit): once it is found removed, replaced or moved and opened again,
        every materialized job whose files are not in it is made pending again.
        """
        store = self.work.store
        seen = store.generation
        newest = await self.db(self.ledger.gallery_entries, self.options.gallery_size)
        await self._files_checked([(entry.job_id, entry.files) for entry in newest], hashes=True,
                                  why="files changed or removed while the daemon was stopped")
        while True:
            await asyncio.sleep(OUTPUTS_CHECK_INTERVAL)
            await asyncio.to_thread(store.check_folder)
            if store.generation == seen:
                continue
            seen = store.generation
            log.warning("the outputs folder %s was removed, replaced or moved: it is open again at its path",
                        store.path)
            self._gallery_dirty.set()  # the folder there now needs its manifest
            after, vanished = "", 0
            while page := await self.db(self.ledger.materialized_outputs, after, _CHECK_PAGE):
                after = page[-1][0]
                vanished += await self._files_checked(page, hashes=False, why=None)
            await self._files_missing(vanished, f"the outputs folder {store.path} was removed, replaced or moved")

    async def _files_checked(self, jobs: list[tuple[str, list[OutputFile]]], *, hashes: bool, why: str | None) -> int:
        """Check ``jobs``' files (see Workspace.check_files); wake the workers for those made pending again."""
        vanished = await self.work.check_files(jobs, hashes=hashes)
        if vanished:
            self._work.set()
            self._gallery_dirty.set()
            if why is not None:
                await self._files_missing(len(vanished), why)
        return len(vanished)

    async def _files_missing(self, count: int, why: str) -> None:
        detail = f"{why}: {count} job(s) whose files are gone are being materialized again"
        log.warning("%s", detail)
        await self._state_event({"state": "files_missing", "jobs": count, "detail": detail})
    async def _keep_thumbnails(self) -> None:
        """Rebuild missing or broken thumbnails, off the jobs' path: every image of the gallery's jobs at
        start-up, then those a gallery write finds missing; the gallery is rewritten to list them. Each
        rebuild waits until no job is under way: a new job is never slowed by an old one's thumbnail."""
        entries = await self.db(self.ledger.gallery_entries, self.options.gallery_size)
        files: list[OutputFile] | None = [f for entry in entries for f in entry.files]
        while True:
            if await self.work.repair_thumbnails(files, before_each=self._no_jobs.wait):
                self._gallery_dirty.set()
            files = None
            await self._thumbnails_wanted.wait()
            self._thumbnails_wanted.clear()

    async def _state_event(self, payload: dict[str, Any]) -> Event:
        event = await self.db(self.ledger.append_event, "materializer.state", payload)
        self._announce.set()
        return event

    async def _watch_connection(self) -> None:
        assert self.client is not None
        async for change in self.client.state_changes():
            payload: dict[str, Any] = {"state": change.state.value}
            if change.detail:
                payload["detail"] = change.detail
            if change.state is ConnectionState.AUTH_REQUIRED:
                payload["action"] = AUTH_ACTION
                log.error("sign-in needed: %s", change.detail or "the token was refused")
            elif change.state is ConnectionState.TOKEN_NEEDED:
                log.warning("waiting for a fresh token: %s", change.detail or "the token source has none")
            elif change.state is ConnectionState.CONNECTED:
                self._feed.connected()
                self._feeds_changed.set()
                log.info("connected to %s", self.options.convex_url)
            elif change.state is ConnectionState.DISCONNECTED:
                log.info("disconnected: %s", change.detail or "")
            if change.state in (ConnectionState.CONNECTING, ConnectionState.CLOSED):
                continue
            if self.on_state is not None:
                self.on_state(payload)
            await self.db(self.ledger.set_state, "connection", {**payload, "at": time.time()})
            await self._state_event(payload)


# -- helpers ----------------------------------------------------------------------------------------------






def _answer(result: QueryValue | QueryFailure) -> list[Any] | str:
    """The jobs in a feed's answer, or why there are none (logged): the function threw, the answer was too
    large to take, or it is not a list."""
    if isinstance(result, QueryFailure):
        if result.too_large:
            log.warning("%s: %s", result.udf_path, result.error_message)
        else:
            log.warning("%s failed on the server: %s", result.udf_path, result.error_message)
        return printable(result.error_message.splitlines()[0][:200] if result.error_message else "failed")
    if not isinstance(result.value, list):
        log.warning("%s answered %s, not a list of jobs: ignoring the answer", result.udf_path,
                    type(result.value).__name__)
        return f"it answered {type(result.value).__name__}, not a list of jobs"
    return result.value




def _iso_ms(ms: float) -> str:
    """A Unix-milliseconds moment as local ISO time, for log lines a person reads."""
    try:
        return datetime.datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{ms:.0f} ms"


