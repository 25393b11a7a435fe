"""The materializer daemon: feeds in, files out, nothing lost.

Data path, one stage per module:

    SyncClient (convex/)  ->  Ledger.observe_jobs (ledger.py)  ->  scheduler
    -> extract_outputs (jobs.py) -> Fetcher (fetch.py) -> validate_image (images.py)
    -> OutputStore.commit (store.py) -> Ledger.mark_materialized -> DisplayServer (display.py)
    -> gallery.json (gallery.py)

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
import fcntl
import logging
import os
import random
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from materializer import jobs as jobs_module
from materializer.config import Settings
from materializer.convex.http import ConvexAuthError, ConvexFunctionError, ConvexHttpClient, ConvexHttpError
from materializer.convex.protocol import QueryFailure, QueryValue
from materializer.convex.transport import ConnectionState, Subscription, SyncClient
from materializer.feed import (
    AdvanceCursor,
    Decision,
    FailedFeed,
    FillGap,
    Gap,
    GapOutcome,
    Narrow,
    NoteFailed,
    Observe,
    ReportGap,
    SucceededFeed,
    is_finite_number,
)
from materializer.fetch import Fetcher, FetchError
from materializer.gallery import MANIFEST_NAME, render_manifest
from materializer.images import ImageLimits, ImageRejected, validate_image
from materializer.jobs import JobRejected, OutputRef, choose_asset, extract_outputs
from materializer.layout import Layout, resolve_state_dir
from materializer.ledger import Event, GalleryEntry, Ledger, OutputFile
from materializer.media_files import SNIFF_BYTES, MediaRejected, looks_like_image, needs_whole_file, output_type
from materializer.payloads import failed_payload, materialized_payload, media_asset
from materializer.queries import FAILED_QUERY, SUCCEEDED_QUERY, succeeded_pages
from materializer.store import OutputStore, PartialFile, StorageError
from materializer.tokens import TokenProvider

__all__ = ["AUTH_ACTION", "AlreadyRunning", "DaemonOptions", "Materializer"]

log = logging.getLogger(__name__)
T = TypeVar("T")

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

#: DaemonOptions fields a configuration reload applies at once (fetch limits too, see apply_live).
LIVE_OPTIONS = ("max_attempts", "retry_base_seconds", "retry_max_seconds", "gallery_size", "cursor_overlap_ms",
                "image_limits")


@dataclass
class DaemonOptions:
    """Everything the daemon needs to know; built from the configuration by the CLI."""

    root: Path
    convex_url: str
    #: The Stella state folder; None: ``STELLA_DATA_DIR``, else ``<root>/state`` (see :mod:`materializer.layout`).
    state_dir: Path | None = None
    lookback_hours: float = 24.0
    subscription_limit: int = 200
    cursor_overlap_ms: float = 2000.0
    max_attempts: int = 8
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 600.0
    download_concurrency: int = 4
    lease_seconds: float = 120.0
    gallery_size: int = 1000
    inactivity_timeout: float = 60.0
    fetch_max_bytes: int = 64 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 300.0
    image_limits: ImageLimits = field(default_factory=ImageLimits)
    layout: Layout = field(init=False)

    def __post_init__(self) -> None:
        self.layout = Layout(resolve_state_dir(self.root, self.state_dir))

    @classmethod
    def from_settings(cls, settings: Settings) -> DaemonOptions:
        d, f = settings.daemon, settings.fetch
        return cls(
            root=d.root, convex_url=d.require_convex_url(), state_dir=d.state_dir, lookback_hours=d.lookback_hours,
            subscription_limit=d.subscription_limit, cursor_overlap_ms=d.cursor_overlap_ms,
            max_attempts=d.max_attempts, retry_base_seconds=d.retry_base_seconds,
            retry_max_seconds=d.retry_max_seconds, download_concurrency=d.download_concurrency,
            lease_seconds=d.lease_seconds, gallery_size=d.gallery_size,
            inactivity_timeout=d.inactivity_timeout_seconds, fetch_max_bytes=f.max_bytes,
            connect_timeout=f.connect_timeout, read_timeout=f.read_timeout, total_timeout=f.total_timeout,
            image_limits=ImageLimits(**settings.images.model_dump(), max_file_bytes=f.max_bytes),
        )


class AlreadyRunning(RuntimeError):
    """Another daemon holds this root."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(f"another materializer is already running for this root (pid {pid or 'unknown'})")
        self.pid = pid


@dataclass(frozen=True)
class Attempt:
    """How one attempt at a job ended: ``materialized``, ``retry`` (scheduled again) or ``quarantined``."""

    outcome: str
    reason: str | None = None


class _Permanent(Exception):
    """An output that will never materialize: the job is quarantined at once with this reason."""


class _Retry(Exception):
    """An output that may materialize later; ``retry_after`` is the server's wish, if any."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class _Materialized:
    """A job whose asset is committed: every file kept, its sidebar payload, and the extra outputs not kept."""

    files: list[OutputFile]
    payload: dict[str, Any]
    missing: list[str]


class InstanceLock:
    """One daemon per state folder: an advisory lock on ``materializer.lock`` holding the owner's pid."""

    def __init__(self, layout: Layout) -> None:
        self.path = layout.lock
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise AlreadyRunning(int(text) if text.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(layout: Layout) -> int | None:
        """The pid of the running daemon for this state folder, or None when none runs."""
        path = layout.lock
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.pread(fd, 32, 0).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        finally:
            os.close(fd)
        return None


class Materializer:
    """The daemon. ``await run()`` until :meth:`stop`; also used one-shot by ``replay``."""

    def __init__(self, options: DaemonOptions, token_provider: TokenProvider | None,
                 display_factory: Callable[[Path, Ledger], Any] | None = None,
                 lease_prefix: str = DAEMON_LEASE_PREFIX) -> None:
        self.options = options
        self.tokens = token_provider
        self.owner = f"{lease_prefix}{os.getpid()}:{secrets.token_hex(4)}"
        layout = options.layout
        layout.media.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.ledger = Ledger(layout.ledger)
        self.store = OutputStore(layout.outputs)
        self.outputs_base = self.store.path.resolve()  # for the sidebar's absolute paths (resolving costs lstats)
        self.fetcher = self._make_fetcher()
        self._retired_fetchers: list[Fetcher] = []
        self.on_state: Callable[[dict[str, Any]], None] | None = None
        self._db_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._display_factory = display_factory
        self.display: Any = None
        self._slots = asyncio.Semaphore(options.download_concurrency)
        self._in_flight: dict[str, asyncio.Task[None]] = {}
        self._work = asyncio.Event()
        self._announce = asyncio.Event()
        self._gallery_dirty = asyncio.Event()
        self._stopping = asyncio.Event()
        self._announced_seq = 0
        self._feed = SucceededFeed(options.subscription_limit)
        self._failed_feed = FailedFeed(options.subscription_limit, options.cursor_overlap_ms)
        self._subscriptions: dict[str, Subscription] = {}
        self._rng = random.Random()
        self.client: SyncClient | None = None
        self.materialized_count = 0

    # -- plumbing --------------------------------------------------------------------------

    def _make_fetcher(self) -> Fetcher:
        origin = urlsplit(self.options.convex_url)
        return Fetcher(
            allowed_origins=[f"{origin.scheme}://{origin.netloc}"],
            max_bytes=self.options.fetch_max_bytes,
            connect_timeout=self.options.connect_timeout,
            read_timeout=self.options.read_timeout,
            total_timeout=self.options.total_timeout,
            max_connections=max(4, self.options.download_concurrency * 2),
        )

    def apply_live(self, options: DaemonOptions) -> None:
        """Take the values of a reloaded configuration that can change without a restart."""
        fetch_fields = ("fetch_max_bytes", "connect_timeout", "read_timeout", "total_timeout")
        fetch_changed = any(getattr(options, name) != getattr(self.options, name) for name in fetch_fields)
        for name in (*LIVE_OPTIONS, *fetch_fields):
            setattr(self.options, name, getattr(options, name))
        if fetch_changed:
            # Downloads under way finish with the old limits; new ones use the new.
            self._retired_fetchers.append(self.fetcher)
            self.fetcher = self._make_fetcher()
        self._work.set()

    async def db(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a ledger call on the ledger's own thread (ordered, never on the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._db_executor, lambda: function(*args, **kwargs))

    def stop(self) -> None:
        self._stopping.set()

    async def aclose(self) -> None:
        for task in list(self._in_flight.values()):
            task.cancel()
        await asyncio.gather(*self._in_flight.values(), return_exceptions=True)
        for fetcher in (self.fetcher, *self._retired_fetchers):
            await fetcher.aclose()
        self._db_executor.shutdown(wait=True)
        self.store.close()
        self.ledger.close()

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
        removed = await asyncio.to_thread(self.store.cleanup_stale_partials, max_age)
        if removed:
            log.info("removed %d partial file(s) left by an earlier run", removed)
        lookback_ms = (time.time() - self.options.lookback_hours * 3600) * 1000
        since = await self.db(self.ledger.ensure_cursor, lookback_ms)
        failed_since = await self.db(self.ledger.ensure_cursor, lookback_ms, "failed")
        self._announced_seq = await self.db(self.ledger.last_seq)
        await self.db(self.ledger.set_state, "daemon", {"pid": os.getpid(), "started_at": time.time()})
        if self._display_factory is not None:
            # The announcer below follows the ledger, so the server need not poll it too.
            self.display = self._display_factory(self.options.layout.display_socket, self.ledger,
                                                 poll_interval=None, executor=self._db_executor)
            await self.display.start()
        self.client = SyncClient(self.options.convex_url, self.tokens,
                                 inactivity_timeout=self.options.inactivity_timeout)
        self.client.start()
        limit = self.options.subscription_limit
        kept = await self.db(self.ledger.get_state, "gaps", [])
        self._feed = SucceededFeed(limit, [
            (g["fromMs"], g["coveredUntilMs"]) for g in (kept if isinstance(kept, list) else [])
            if isinstance(g, dict) and is_finite_number(g.get("fromMs")) and is_finite_number(g.get("coveredUntilMs"))])
        succeeded = self.client.subscribe(SUCCEEDED_QUERY, {"since": since, "limit": limit})
        failed = self.client.subscribe(FAILED_QUERY, {"since": failed_since, "limit": limit})
        self._subscriptions = {"succeeded": succeeded, "failed": failed}
        loops: dict[str, Callable[[], Awaitable[None]]] = {
            "succeeded feed": lambda: self._follow_succeeded(succeeded),
            "failed feed": lambda: self._follow_failed(failed),
            "scheduler": self._schedule,
            "announcer": self._announcer,
            "gallery writer": self._gallery_writer,
            "connection watcher": self._watch_connection,
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
            await self.write_gallery()
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
            docs = _job_list(result)
            if docs is not None:
                since, limit = float(result.args["since"]), int(result.args.get("limit", 50))
                await self._carry_out(self._feed.answer(since, limit, docs, time.time() * 1000))

    async def _follow_failed(self, subscription: Subscription) -> None:
        async for result in subscription:
            answer = _job_list(result)
            if answer is None:
                continue
            if sum(isinstance(d, dict) for d in answer) < len(answer):
                log.warning("ignoring %d item(s) that are not job documents in an answer of %s",
                            len(answer) - sum(isinstance(d, dict) for d in answer), FAILED_QUERY)
            await self._carry_out(self._failed_feed.answer(float(result.args["since"]), answer, time.time() * 1000))

    async def _carry_out(self, decisions: list[Decision]) -> None:
        """Do what the feeds decided, in order, telling them how each step went."""
        queue = collections.deque(decisions)
        while queue:
            decision = queue.popleft()
            if isinstance(decision, Observe):
                new = await self.observe(list(decision.docs)) if decision.docs else []
                queue.extend(self._feed.observed(len(new)))
            elif isinstance(decision, NoteFailed):
                await self._note_failed(decision.docs)
            elif isinstance(decision, FillGap):
                outcome, reason = await self._fill_gap(decision.gap)
                queue.extend(self._feed.gap_outcome(decision.gap, outcome, reason))
            elif isinstance(decision, ReportGap):
                await self._report_gap(decision)
            elif isinstance(decision, AdvanceCursor):
                cursor = await self.db(self.ledger.advance_cursor, decision.covered_from_ms, decision.covered_until_ms,
                                       feed=decision.feed, overlap_ms=self.options.cursor_overlap_ms)
                feed = self._feed if decision.feed == "succeeded" else self._failed_feed
                queue.extend(feed.cursor_moved(cursor))
            else:
                assert isinstance(decision, Narrow)
                self._subscriptions[decision.feed].update_args({"since": decision.since_ms, "limit": decision.limit})

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
        """Record jobs from a query answer in the ledger; wake the workers for new ones."""
        usable = [d for d in docs if isinstance(d, dict) and d.get("status", "succeeded") == "succeeded"]
        if len(usable) < len(docs):
            log.warning("ignoring %d item(s) that are not job documents of succeeded jobs", len(docs) - len(usable))
        try:
            new = await self.db(self.ledger.observe_jobs, usable)
        except ValueError:
            # One unusable document must not hide the others: observe them one by one.
            new = []
            for doc in usable:
                try:
                    new += await self.db(self.ledger.observe_jobs, [doc])
                except ValueError as exc:
                    log.warning("ignoring a job document the ledger cannot keep: %s", exc)
        if new:
            self._work.set()
        return new

    async def _fill_gap(self, gap: Gap) -> tuple[GapOutcome, str]:
        """List the gap's jobs with the page query (where the backend has one) and observe them."""
        log.info("the subscription window is full: catching up on jobs from %s until %s", _iso_ms(gap.from_ms),
                 _iso_ms(gap.until_ms))
        try:
            async with ConvexHttpClient(self.options.convex_url) as http:
                async for page in succeeded_pages(http, self._token, gap.from_ms, gap.until_ms):
                    await self.observe(page)
        except ConvexFunctionError as exc:
            return "absent", f"the backend has no gap-free page query ({exc.error_message.splitlines()[0][:200]})"
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
            room = self.options.download_concurrency * 4 - len(self._in_flight)
            due = await self.db(self.ledger.due_jobs, room + len(self._in_flight)) if room > 0 else []
            for job in due:
                if job.job_id in self._in_flight:
                    continue
                if not await self.db(self.ledger.try_claim, job.job_id, self.owner, self.options.lease_seconds):
                    continue
                task = asyncio.create_task(self._materialize_claimed(job.job_id, job.doc, job.attempts))
                self._in_flight[job.job_id] = task
                task.add_done_callback(lambda done, job_id=job.job_id: self._job_done(job_id, done))
            next_due = await self.db(self.ledger.next_due_at)
            timeout = None if next_due is None else max(0.05, next_due - time.time())
            # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancellation that lands as the
            # event fires, and the daemon would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._work.wait()

    def _job_done(self, job_id: str, task: asyncio.Task[None]) -> None:
        self._in_flight.pop(job_id, None)
        self._work.set()
        if not task.cancelled() and task.exception() is not None:
            # Its lease lapses and the job is tried again; say why it stopped.
            log.error("job %s stopped unexpectedly", _printable(job_id), exc_info=task.exception())

    async def _materialize_claimed(self, job_id: str, doc: dict[str, Any], attempts: int) -> None:
        await self.attempt(job_id, doc, attempts)
        await self._advance_cursor()

    async def attempt(self, job_id: str, doc: dict[str, Any], attempts: int) -> Attempt:
        """Try to materialize a job this process has claimed, and record the outcome in the ledger."""
        try:
            done = await self.materialize_job(doc)
        except _Permanent as exc:
            return await self._give_up(job_id, str(exc))
        except Exception as exc:  # a bug or an unforeseen fault: counted like a failed download, never a hot loop
            if not isinstance(exc, _Retry):
                log.exception("job %s: unexpected error", _printable(job_id))
                exc = _Retry(f"unexpected error: {type(exc).__name__}: {exc}")
            if attempts + 1 >= self.options.max_attempts:
                return await self._give_up(job_id, f"gave up after {attempts + 1} attempts: {exc}")
            delay = self._backoff(attempts, exc.retry_after)
            log.info("job %s will be retried in %.1fs: %s", job_id, delay, exc)
            await self.db(self.ledger.record_failure, job_id, str(exc), time.time() + delay, owner=self.owner)
            return Attempt("retry", str(exc))
        event = await self.db(self.ledger.mark_materialized, job_id, done.files, done.payload, done.missing)
        if event is not None:
            self.materialized_count += 1
            if self.display is not None:
                self.display.publish(event)  # now, not on the announcer's next round (which skips it)
            self._announce.set()
            self._gallery_dirty.set()
        return Attempt("materialized")

    async def _give_up(self, job_id: str, reason: str) -> Attempt:
        log.warning("job %s given up: %s", _printable(job_id), reason)
        await self.db(self.ledger.quarantine, job_id, reason)
        await self._state_event({"state": "quarantined", "jobId": job_id, "reason": reason})
        return Attempt("quarantined", reason)

    def _backoff(self, attempts: int, retry_after: float | None) -> float:
        delay = min(self.options.retry_max_seconds, self.options.retry_base_seconds * 2**attempts)
        delay *= self._rng.uniform(0.5, 1.5)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.options.retry_max_seconds))
        return delay

    async def materialize_job(self, doc: dict[str, Any]) -> _Materialized:
        """Commit a job's asset and what extra files can be; raise _Permanent or _Retry when the asset cannot be.

        The asset (what the sidebar shows) is all-or-nothing: the job is announced only once every one of
        its files is committed. Every other output is an extra file, tried in the same attempt; one that
        cannot be kept is recorded with its reason and does not hold the announcement back.
        """
        try:
            job = jobs_module.Job.from_document(doc)
            refs = extract_outputs(job, max_data_bytes=self.options.fetch_max_bytes)
            choice = choose_asset(job, refs)
        except JobRejected as exc:
            raise _Permanent(str(exc)) from None
        refused = [refs[index].error for index in choice.indices if refs[index].error]
        if refused:
            raise _Permanent(refused[0])  # already names its output ("images[1]: ...")
        wanted = [ref for ref in refs if ref.error is None]
        outcomes = await asyncio.gather(*(self._materialize_output(ref) for ref in wanted), return_exceptions=True)
        results: dict[int, OutputFile | BaseException] = dict(zip((ref.index for ref in wanted), outcomes, strict=True))
        asset = [results[index] for index in choice.indices]
        for result in asset:
            if isinstance(result, _Permanent):
                raise result
        for result in asset:
            if isinstance(result, BaseException):
                raise result
        missing: list[str] = []
        for ref in refs:
            outcome = results.get(ref.index)
            if isinstance(outcome, OutputFile):
                continue
            if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                raise outcome  # a cancellation
            if isinstance(outcome, Exception) and not isinstance(outcome, (_Permanent, _Retry)):
                log.error("job %s: unexpected error on %s", _printable(job.job_id), ref.where, exc_info=outcome)
            reason = _not_kept(ref, outcome)
            log.warning("job %s: extra output not kept: %s", _printable(job.job_id), _printable(reason))
            missing.append(reason)
        files = {index: result for index, result in results.items() if isinstance(result, OutputFile)}
        payload = materialized_payload(job, media_asset(choice, files, self.outputs_base))
        return _Materialized(sorted(files.values(), key=lambda f: f.index), payload, missing)

    async def _materialize_output(self, ref: OutputRef) -> OutputFile:
        async with self._slots:
            try:
                return await self._output(ref)
            except FetchError as exc:
                if exc.retryable:
                    raise _Retry(f"{ref.where}: {exc.reason}", exc.retry_after) from None
                raise _Permanent(f"{ref.where}: {exc.reason}") from None
            except StorageError as exc:
                if exc.retryable:
                    raise _Retry(f"{ref.where}: {exc.reason}") from None
                raise _Permanent(f"{ref.where}: {exc.reason}") from None
            except (ImageRejected, MediaRejected) as exc:
                # A CDN can serve an error page or a broken body once: try again, then give up.
                raise _Retry(f"{ref.where}: {exc}") from None

    async def _output(self, ref: OutputRef) -> OutputFile:
        if ref.media_kind == "image":
            existing = await asyncio.to_thread(self.store.existing, ref.stem)
            if existing is not None:
                try:
                    info = await asyncio.to_thread(validate_image, existing, self.options.image_limits)
                    return _output_file(ref.index, existing.name, info.mime, info.width, info.height, info.bytes,
                                        info.sha256)
                except ImageRejected:
                    log.warning("replacing invalid existing file %s", existing.name)
        with self.store.temp_file(ref.stem) as partial:
            if ref.data is not None:
                await asyncio.to_thread(partial.write, ref.data)
                fetched_sha = None
            else:
                assert ref.url is not None
                fetched_sha = (await self.fetcher.fetch(ref.url, partial)).sha256
            return await asyncio.to_thread(self._validate_and_commit, partial, ref, fetched_sha)

    def _validate_and_commit(self, partial: PartialFile, ref: OutputRef, fetched_sha: str | None) -> OutputFile:
        """Decide what a written output is from its bytes and commit it under that name (one worker-thread trip).

        Image bytes, whatever the output claimed, are validated and named as images: an image extension
        in the outputs folder always means a validated image. Anything else is named by media_files.
        """
        head = os.pread(partial.fileno(), SNIFF_BYTES, 0)
        if ref.media_kind == "image" or (ref.media_kind != "text" and looks_like_image(head)):
            info = validate_image(partial, self.options.image_limits)
            path = self.store.commit(partial, f"{ref.stem}.{info.ext}")
            return _output_file(ref.index, path.name, info.mime, info.width, info.height, info.bytes, info.sha256)
        size = os.fstat(partial.fileno()).st_size
        data = os.pread(partial.fileno(), size, 0) if needs_whole_file(head) else head
        kind = output_type(data, media_kind=ref.media_kind, url=ref.url, declared_mime=ref.declared_mime)
        path = self.store.commit(partial, f"{ref.stem}.{kind.ext}")
        return _output_file(ref.index, path.name, kind.mime, None, None, size, fetched_sha or _sha256_file(path))

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
            await self.write_gallery()
            # A rate limit, so that a burst rewrites the manifest a few times a second, not once per job.
            await asyncio.sleep(GALLERY_MIN_INTERVAL - (time.monotonic() - started))

    async def write_gallery(self) -> None:
        entries = await self.db(self.ledger.gallery_entries, self.options.gallery_size)
        try:
            await asyncio.to_thread(self._write_manifest, entries, time.time() * 1000)
        except StorageError as exc:
            log.error("could not write %s: %s (will try again with the next job)", MANIFEST_NAME, exc)

    def _write_manifest(self, entries: list[GalleryEntry], generated_at_ms: float) -> None:
        """Render and replace the manifest (in a worker thread: a thousand jobs take milliseconds)."""
        self.store.atomic_write_bytes(MANIFEST_NAME, render_manifest(entries, generated_at_ms))

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






def _job_list(result: QueryValue | QueryFailure) -> list[Any] | None:
    """The jobs in a feed's answer, or None (logged) when the function threw or answered something else."""
    if isinstance(result, QueryFailure):
        log.warning("%s failed on the server: %s", result.udf_path, result.error_message)
        return None
    if not isinstance(result.value, list):
        log.warning("%s answered %s, not a list of jobs: ignoring the answer", result.udf_path,
                    type(result.value).__name__)
        return None
    return result.value




def _iso_ms(ms: float) -> str:
    """A Unix-milliseconds moment as local ISO time, for log lines a person reads."""
    try:
        return datetime.datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{ms:.0f} ms"


def _printable(text: str) -> str:
    return text.encode("unicode_escape").decode("ascii")[:200]


def _not_kept(ref: OutputRef, result: BaseException | None) -> str:
    """Why an extra output was not kept: its refusal (never fetched), or how its attempt ended."""
    if result is None:
        assert ref.error is not None
        return ref.error
    if isinstance(result, (_Permanent, _Retry)):
        return str(result)  # already names its output
    return f"{ref.where}: unexpected error: {type(result).__name__}: {result}"


def _output_file(index: int, name: str, mime: str, width: int | None, height: int | None, size: int,
                 sha256: str) -> OutputFile:
    return OutputFile(index=index, path=name, mime_type=mime, width=width, height=height, size_bytes=size,
                      sha256=sha256)


def _sha256_file(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
