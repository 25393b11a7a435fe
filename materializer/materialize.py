"""One job, from its document to committed files and a recorded outcome: the daemon's workers and ``replay`` alike.

:class:`JobMaterializer` is the per-job pipeline, with its collaborators
explicit: it extracts a job's outputs (:mod:`materializer.jobs`), fetches
them (:mod:`materializer.fetch`), decides what each is from its bytes
(:mod:`materializer.images`, :mod:`materializer.media_files`), commits them
(:mod:`materializer.store`) and builds the sidebar payload
(:mod:`materializer.payloads`). What goes wrong is classified: a
:class:`Permanent` refusal, or a :class:`Retry` with the server's wish.

:class:`JobRunner` runs one attempt at a claimed job through it and records
the outcome in the ledger: materialized (announced exactly once), retried on
a jittered exponential schedule that honours ``Retry-After``, or quarantined
with its reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from materializer.clock import SteadyClock
from materializer.fetch import Fetcher, FetchError
from materializer.finite import finite_number
from materializer.gallery import MANIFEST_NAME, GalleryManifest
from materializer.images import IMAGE_EXTENSIONS, ImageInfo, ImageLimits, ImageRejected, memory_needed, validate_image
from materializer.jobs import Job, JobRejected, OutputRef, choose_asset, extract_outputs
from materializer.layout import secure_layout
from materializer.ledger import Event, GalleryEntry, Ledger, OutputFile
from materializer.ledger import Job as LedgerJob
from materializer.ledger_thread import Checkpointer, LedgerThread
from materializer.limits import MAX_JOB_DOCUMENT_BYTES
from materializer.media_files import (
    BINARY,
    MEDIA_TYPES,
    SNIFF_BYTES,
    TEXT,
    MediaRejected,
    looks_like_image,
    needs_whole_file,
    output_type,
)
from materializer.options import DaemonOptions
from materializer.payloads import materialized_payload, media_asset
from materializer.resources import DownloadSlots, MemoryBudget
from materializer.store import FolderReplaced, OutputStore, PartialFile, StorageError
from materializer.thumbnails import FirstFrame, Thumbnails, is_image

__all__ = ["FILES_VANISHED", "Attempt", "JobMaterializer", "JobRunner", "Materialized", "Permanent", "Retry",
           "RetryPolicy", "Workspace", "printable"]

log = logging.getLogger("materializer.daemon")

#: How the reason of a job made pending again because its files are gone begins (``Workspace.check_files``).
FILES_VANISHED = "its files vanished"
#: The most memory parsing JSON takes per byte of it: the decoded text, and CPython's objects (``{},`` is
#: 3 bytes, an empty dict and its reference 72). A JSON output read whole to tell glTF is weighted so.
_PARSED_JSON_WEIGHT = 25
#: The extensions a committed output can have, by what the output is (the bytes decide among them).
_TEXT_EXTENSIONS = (TEXT.ext,)
_ANY_EXTENSIONS = (*IMAGE_EXTENSIONS, *MEDIA_TYPES, BINARY.ext)
#: How many times one attempt writes an output when the outputs folder is found replaced at its commit.
_FOLDER_REPLACED_TRIES = 3
T = TypeVar("T")
LedgerCall = Callable[..., Awaitable[Any]]


class Permanent(Exception):
    """An output that will never materialize: the job is quarantined at once with this reason."""


class Retry(Exception):
    """An output that may materialize later; ``retry_after`` is the server's wish, if any."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Materialized:
    """A job whose asset is committed: every file kept, its sidebar payload, and the extra outputs not kept."""

    files: list[OutputFile]
    payload: dict[str, Any]
    missing: list[str]


@dataclass(frozen=True)
class Attempt:
    """How one attempt at a job ended; ``event`` is the announcement a materialized job got (once)."""

    outcome: Literal["materialized", "retry", "quarantined"]
    reason: str | None = None
    event: Event | None = None


#: A retry's delay is scaled by a random factor in this range, so that failed jobs do not retry in step.
RETRY_JITTER = (0.5, 1.5)


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a job is tried (``daemon.max_attempts``, ``daemon.retry_*_seconds``)."""

    max_attempts: int = 8
    base_seconds: float = 2.0
    max_seconds: float = 600.0

    @property
    def longest_seconds(self) -> float:
        """The longest :meth:`delay` can be (its jitter included)."""
        return self.max_seconds * RETRY_JITTER[1]

    def delay(self, attempts: int, retry_after: float | None, rng: random.Random) -> float:
        delay = min(self.max_seconds, self.base_seconds * 2**attempts) * rng.uniform(*RETRY_JITTER)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_seconds))
        return float(delay)


class JobMaterializer:
    """Commits a job's files and builds its sidebar payload; raises :class:`Permanent` or :class:`Retry`.

    ``fetcher``, ``image_limits``, ``max_data_bytes`` and ``max_outputs`` may be replaced while running
    (a reload); a download under way finishes with what it started with. Outputs share ``concurrency``
    download slots fairly among jobs, and validate within ``memory_budget`` bytes of memory
    (:mod:`materializer.resources`). With ``thumbnails``, each image gets its thumbnail right after
    its file commits, made from the pixels validation decoded; one that cannot be made is left out
    and never fails the job.
    """

    def __init__(self, store: OutputStore, fetcher: Fetcher, image_limits: ImageLimits, max_data_bytes: int,
                 concurrency: int, thumbnails: Thumbnails | None = None, *, max_outputs: int,
                 memory_budget: int) -> None:
        self.store = store
        self.thumbnails = thumbnails
        self.fetcher = fetcher
        self.image_limits = image_limits
        self.max_data_bytes = max_data_bytes
        self.max_outputs = max_outputs
        self.outputs_base = store.path.resolve()  # for the sidebar's absolute paths (resolving costs lstats)
        self.memory = MemoryBudget(memory_budget)
        self._slots = DownloadSlots(concurrency)

    async def materialize(self, doc: dict[str, Any]) -> Materialized:
        """Commit a job's asset and what extra files can be; raise Permanent or Retry when the asset cannot be.

        The asset (what the sidebar shows) is all-or-nothing: the job is announced only once every one of
        its files is committed. Every other output is an extra file, tried in the same attempt; one that
        cannot be kept is recorded with its reason and does not hold the announcement back.
        """
        try:
            job = Job.from_document(doc)
            refs = extract_outputs(job, max_data_bytes=self.max_data_bytes)
            choice = choose_asset(job, refs)
        except JobRejected as exc:
            raise Permanent(str(exc)) from None
        if len(refs) > self.max_outputs:
            raise Permanent(f"job has {len(refs)} outputs; the limit is {self.max_outputs} (max_outputs_per_job)")
        refused = [refs[index].error for index in choice.indices if refs[index].error]
        if refused:
            raise Permanent(refused[0])  # already names its output ("images[1]: ...")
        wanted = [ref for ref in refs if ref.error is None]
        outcomes = await asyncio.gather(*(self._materialize_output(job.job_id, ref) for ref in wanted),
                                        return_exceptions=True)
        results: dict[int, OutputFile | BaseException] = dict(zip((ref.index for ref in wanted), outcomes, strict=True))
        asset = [results[index] for index in choice.indices]
        for result in asset:
            if isinstance(result, Permanent):
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
            if isinstance(outcome, Exception) and not isinstance(outcome, (Permanent, Retry)):
                log.error("job %s: unexpected error on %s", printable(job.job_id), ref.where, exc_info=outcome)
            reason = _not_kept(ref, outcome)
            log.warning("job %s: extra output not kept: %s", printable(job.job_id), printable(reason))
            missing.append(reason)
        files = {index: result for index, result in results.items() if isinstance(result, OutputFile)}
        thumbnails = None
        if self.thumbnails is not None:
            thumbnails = {index: self.thumbnails.path_of(files[index].path) for index in choice.indices
                          if is_image(files[index])}
        payload = materialized_payload(job, media_asset(choice, files, self.outputs_base, thumbnails))
        return Materialized(sorted(files.values(), key=lambda f: f.index), payload, missing)

    async def _materialize_output(self, job_id: str, ref: OutputRef) -> OutputFile:
        async with self._slots.slot(job_id):
            try:
                for _ in range(_FOLDER_REPLACED_TRIES - 1):
                    # The folder at the path is open again: write the file there now. A folder that
                    # someone replaces over and over makes this a failed attempt, counted as any other.
                    with contextlib.suppress(FolderReplaced):
                        return await self._output(ref)
                return await self._output(ref)
            except FetchError as exc:
                if exc.retryable:
                    raise Retry(f"{ref.where}: {exc.reason}", exc.retry_after) from None
                raise Permanent(f"{ref.where}: {exc.reason}") from None
            except StorageError as exc:
                if exc.retryable:
                    raise Retry(f"{ref.where}: {exc.reason}") from None
                raise Permanent(f"{ref.where}: {exc.reason}") from None
            except (ImageRejected, MediaRejected) as exc:
                # A CDN can serve an error page or a broken body once: try again, then give up.
                raise Retry(f"{ref.where}: {exc}") from None

    async def _output(self, ref: OutputRef) -> OutputFile:
        # A few stat calls, on the loop like the temporary file's creation below (a thread trip costs more).
        existing = self._existing(ref)
        if existing is not None:
            committed = await self._within_budget(existing, ref, functools.partial(self._committed, ref, existing))
            if committed is not None:
                return committed
        with self.store.temp_file(ref.stem) as partial:
            if ref.data is not None:
                await asyncio.to_thread(partial.write, ref.data)
                fetched_sha = None
            else:
                assert ref.url is not None
                fetched_sha = (await self.fetcher.fetch(ref.url, partial)).sha256
            return await self._within_budget(partial, ref,
                                             functools.partial(self._validate_and_commit, partial, ref, fetched_sha))

    async def _within_budget(self, source: PartialFile | Path, ref: OutputRef, check: Callable[[], T]) -> T:
        """Run ``check`` of a file on a worker thread while holding the file's share of the memory budget.

        In one trip to the thread when the budget grants the share at once (the usual case); else
        the file waits for its share on disk, not in memory, and is checked in a second trip.
        """
        loop = asyncio.get_running_loop()

        def at_once() -> tuple[int, list[T]]:
            needed = self._memory_needed(source, ref)
            with self.memory.hold_now(needed, loop) as held:
                return needed, [check()] if held else []

        needed, done = await asyncio.to_thread(at_once)
        if done:
            return done[0]
        async with self.memory.reserve(needed):
            return await asyncio.to_thread(check)

    def _memory_needed(self, source: PartialFile | Path, ref: OutputRef) -> int:
        """What checking this file holds in memory (:meth:`_validate_and_commit`, :meth:`_committed`; in a thread).

        An image: the file and its decode. A file read whole to be named (JSON, to tell glTF) is parsed
        too, and parsed JSON takes up to :data:`_PARSED_JSON_WEIGHT` times its text. A file compared with
        the output's data: itself. Anything else: its head.
        """
        with contextlib.ExitStack() as stack:
            file = stack.enter_context(open(source, "rb")) if isinstance(source, Path) else source
            head = os.pread(file.fileno(), SNIFF_BYTES, 0)
            size = os.fstat(file.fileno()).st_size
            if ref.media_kind == "image" or (ref.media_kind != "text" and looks_like_image(head)):
                return memory_needed(file, self.image_limits, self.memory.capacity)
        if needs_whole_file(head):
            return size * (1 + _PARSED_JSON_WEIGHT)
        return size if ref.data is not None else len(head)

    def _existing(self, ref: OutputRef) -> Path | None:
        """The file already committed under this output's name, if any (see :meth:`_committed`)."""
        extensions = _TEXT_EXTENSIONS if ref.media_kind == "text" else \
            IMAGE_EXTENSIONS if ref.media_kind == "image" else _ANY_EXTENSIONS
        return self.store.existing(ref.stem, extensions)

    def _committed(self, ref: OutputRef, path: Path) -> OutputFile | None:
        """The file already committed for this output at ``path``, if it is one this output would give; else None.

        An attempt cut short after its commits, or a ledger rebuilt by ``materializer repair``,
        finds the files in place: they are checked as a download would be (an image decoded, other
        bytes named by their signature, the text or data compared) instead of fetched again.
        """
        ext = path.suffix[1:]
        try:
            if ext in IMAGE_EXTENSIONS:
                info = self._validate_existing(path)  # its thumbnail made again too
                if info.ext == ext and (ref.data is None or hashlib.sha256(ref.data).hexdigest() == info.sha256):
                    return _output_file(ref.index, path.name, info.mime, info.width, info.height, info.bytes,
                                        info.sha256)
            else:
                with open(path, "rb") as handle:
                    data = handle.read(self.max_data_bytes + 1 if ref.data is not None else SNIFF_BYTES)
                    if ref.data is None and needs_whole_file(data):
                        data += handle.read(self.max_data_bytes)
                kind = output_type(data, media_kind=ref.media_kind, url=ref.url, declared_mime=ref.declared_mime)
                if kind.ext == ext and (ref.data is None or data == ref.data):
                    return _output_file(ref.index, path.name, kind.mime, None, None, path.stat().st_size,
                                        _sha256_file(path))
        except (ImageRejected, MediaRejected, OSError) as exc:
            log.warning("replacing %s: %s", path.name, exc)
            return None
        log.warning("replacing %s: it is not what %s gives", path.name, ref.where)
        return None

    def files_problem(self, files: list[OutputFile], *, hashes: bool) -> str | None:
        """Why committed files are not all in the outputs folder as recorded, or None (OutputStore.file_problem)."""
        for f in files:
            problem = self.store.file_problem(f.path, f.size_bytes, f.sha256 if hashes else None)
            if problem is not None:
                return problem
        return None

    def _validate_and_commit(self, partial: PartialFile, ref: OutputRef, fetched_sha: str | None) -> OutputFile:
        """Decide what a written output is from its bytes and commit it under that name (one worker-thread trip).

        Image bytes, whatever the output claimed, are validated and named as images: an image extension
        in the outputs folder always means a validated image. Anything else is named by media_files.
        """
        head = os.pread(partial.fileno(), SNIFF_BYTES, 0)
        if ref.media_kind == "image" or (ref.media_kind != "text" and looks_like_image(head)):
            frame = FirstFrame() if self.thumbnails is not None else None
            info = validate_image(partial, self.image_limits, frame, full_decode_limit=self.memory.capacity)
            name = f"{ref.stem}.{info.ext}"
            # Encoded and committed beside the file's commit (which waits on fsyncs), not after it.
            thumbnail = self.thumbnails.save_soon(name, frame) if self.thumbnails and frame else None
            try:
                path = self.store.commit(partial, name)
            finally:
                if thumbnail is not None:
                    thumbnail.result()
            return _output_file(ref.index, path.name, info.mime, info.width, info.height, info.bytes, info.sha256)
        size = os.fstat(partial.fileno()).st_size
        data = os.pread(partial.fileno(), size, 0) if needs_whole_file(head) else head
        kind = output_type(data, media_kind=ref.media_kind, url=ref.url, declared_mime=ref.declared_mime)
        path = self.store.commit(partial, f"{ref.stem}.{kind.ext}")
        return _output_file(ref.index, path.name, kind.mime, None, None, size, fetched_sha or _sha256_file(path))


    def _validate_existing(self, path: Path) -> ImageInfo:
        """Validate an image already in place (a retry after a crash) and make its thumbnail again."""
        frame = FirstFrame() if self.thumbnails is not None else None
        info = validate_image(path, self.image_limits, frame, full_decode_limit=self.memory.capacity)
        if self.thumbnails is not None and frame is not None:
            self.thumbnails.save(path.name, frame)
        return info


class JobRunner:
    """One attempt at a claimed job through a :class:`JobMaterializer`, its outcome recorded in the ledger.

    ``db`` runs a ledger call off the event loop (on the ledger's own thread); ``owner`` is the
    claim the attempt runs under. ``retry`` may be replaced while running (a reload).
    """

    def __init__(self, ledger: Ledger, db: LedgerCall, materializer: JobMaterializer, owner: str,
                 retry: RetryPolicy, rng: random.Random | None = None) -> None:
        self.ledger = ledger
        self.db = db
        self.materializer = materializer
        self.owner = owner
        self.retry = retry
        self._rng = rng or random.Random()

    async def attempt(self, job_id: str, doc: dict[str, Any], attempts: int) -> Attempt:
        """Try to materialize a job this process has claimed, and record the outcome in the ledger."""
        try:
            done = await self.materializer.materialize(doc)
        except Permanent as exc:
            return await self._give_up(job_id, str(exc))
        except Exception as exc:  # a bug or an unforeseen fault: counted like a failed download, never a hot loop
            if not isinstance(exc, Retry):
                log.exception("job %s: unexpected error", printable(job_id))
                exc = Retry(f"unexpected error: {type(exc).__name__}: {exc}")
            if attempts + 1 >= self.retry.max_attempts:
                return await self._give_up(job_id, f"gave up after {attempts + 1} attempts: {exc}")
            delay = self.retry.delay(attempts, exc.retry_after, self._rng)
            log.info("job %s will be retried in %.1fs: %s", printable(job_id), delay, exc)
            await self.db(self.ledger.record_failure, job_id, str(exc), self.ledger.now() + delay, owner=self.owner)
            return Attempt("retry", str(exc))
        event, problem = await self.db(self._record, job_id, done)
        if problem is not None:  # pending again and due now, in the folder as it is: not the job's failure
            reason = f"its files vanished right after they were committed ({problem})"
            await self.db(self.ledger.mark_vanished, {job_id: reason})
            return Attempt("retry", reason, event=event)
        return Attempt("materialized", event=event)

    def _record(self, job_id: str, done: Materialized) -> tuple[Event | None, str | None]:
        """Record a materialized job; then why its files are not where they were committed, or None.

        The outputs folder may have been removed or moved between a commit and this record: then the
        files are not at their paths, and the job is done again (see Workspace.check_files). Both
        steps in one trip to the ledger's thread (the check is a few stat calls).
        """
        event = self.ledger.mark_materialized(job_id, done.files, done.payload, done.missing)
        return event, self.materializer.files_problem(done.files, hashes=False)

    async def _give_up(self, job_id: str, reason: str) -> Attempt:
        log.warning("job %s given up: %s", printable(job_id), reason)
        await self.db(self.ledger.quarantine, job_id, reason)
        await self.db(self.ledger.append_event, "materializer.state",
                      {"state": "quarantined", "jobId": job_id, "reason": reason})
        return Attempt("quarantined", reason)


class Workspace:
    """What a process that materializes jobs holds: the ledger (on a thread of its own), the outputs
    folder, a fetcher, and the pipeline through them. The daemon and ``replay`` each open one."""

    def __init__(self, options: DaemonOptions, owner: str) -> None:
        self.options = options
        layout = options.layout
        secure_layout(layout, options.root)  # UntrustedPath: refused before anything is opened in it
        # Attempt times and leases on a clock that wall-clock steps do not move (see materializer.clock).
        self.ledger = Ledger(layout.ledger, clock=SteadyClock(), background_checkpoints=True)
        self.store = OutputStore(layout.outputs)
        self.thumbnails = (Thumbnails(layout.thumbnails, options.image_limits, options.download_concurrency,
                                      max_decode_bytes=options.memory_budget_bytes)
                           if options.thumbnails else None)
        self._thumbnails_missing: list[OutputFile] = []
        self._gallery = GalleryManifest()
        self._gallery_lock = asyncio.Lock()
        self._sized: dict[Any, dict[str, Any]] = {}  # the documents of the last answer, by job id, within the size
        self._thumbnails_tried: set[str] = set()
        #: The ledger's own thread: every ledger call, in order, those that queue up committed together
        #: (the sidebar server reads through it too).
        self.ledger_executor = LedgerThread(self.ledger)
        self._checkpointer = Checkpointer(self.ledger)
        self._retired_fetchers: list[Fetcher] = []
        self.materializer = JobMaterializer(self.store, _fetcher(options), options.image_limits,
                                            options.fetch_max_bytes, options.download_concurrency, self.thumbnails,
                                            max_outputs=options.max_outputs_per_job,
                                            memory_budget=options.memory_budget_bytes)
        self.runner = JobRunner(self.ledger, self.db, self.materializer, owner, _retry_policy(options))

    async def db(self, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a ledger call on the ledger's own thread (ordered, never on the event loop)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.ledger_executor, lambda: function(*args, **kwargs))

    async def observe(self, docs: list[Any], *, claim: int = 0) -> tuple[list[str], list[LedgerJob]]:
        """Record jobs from a query answer in the ledger; return the ids of those it did not have, and the
        jobs leased to this process for an attempt: up to ``claim`` due ones, in the same transaction."""
        usable = [d for d in docs if isinstance(d, dict) and d.get("status", "succeeded") == "succeeded"]
        if len(usable) < len(docs):
            log.warning("ignoring %d item(s) that are not job documents of succeeded jobs", len(docs) - len(usable))
        # The documents of the last answer were sized already: a window lists the same jobs on every
        # answer, and serialising each to learn its size is most of an answer's cost on the event loop.
        sized, self._sized = self._sized, {}
        kept = []
        for doc in usable:
            if sized.get(doc.get("jobId")) != doc and await self._quarantined_for_size(doc):
                continue
            kept.append(doc)
            self._sized[doc.get("jobId")] = doc
        usable = kept
        try:
            if claim > 0:
                observed: tuple[list[str], list[LedgerJob]] = await self.db(
                    self.ledger.observe_and_claim, usable, claim, self.runner.owner, self.options.lease_seconds)
                return observed
            new: list[str] = await self.db(self.ledger.observe_jobs, usable)
        except ValueError:
            # One unusable document must not hide the others: observe them one by one.
            new = []
            for doc in usable:
                try:
                    new += await self.db(self.ledger.observe_jobs, [doc])
                except ValueError as exc:
                    log.warning("ignoring a job document the ledger cannot keep: %s", exc)
        return new, []

    async def check_files(self, jobs: list[tuple[str, list[OutputFile]]], *, hashes: bool) -> list[str]:
        """Make the materialized ``jobs`` whose files are not in the outputs folder as recorded pending again.

        ``hashes`` also compares every file with its recorded SHA-256 (at start, and for ``replay``'s
        "already present"), not only its presence and size. Returns the jobs made pending again;
        they keep their announcement and are materialized again at the same paths.
        """
        problems = await asyncio.to_thread(self._problems, jobs, hashes)
        if not problems:
            return []
        for job_id, problem in problems.items():
            log.warning("job %s: %s; materializing it again", printable(job_id), problem)
        reasons = {job_id: f"{FILES_VANISHED} ({problem}); materializing it again"
                   for job_id, problem in problems.items()}
        vanished: list[str] = await self.db(self.ledger.mark_vanished, reasons)
        return vanished

    def _problems(self, jobs: list[tuple[str, list[OutputFile]]], hashes: bool) -> dict[str, str]:
        found = {}
        for job_id, files in jobs:
            problem = self.materializer.files_problem(files, hashes=hashes)
            if problem is not None:
                found[job_id] = problem
        return found

    async def _quarantined_for_size(self, doc: dict[str, Any]) -> bool:
        """Quarantine a document too large to keep (over MAX_JOB_DOCUMENT_BYTES); whether it was."""
        try:
            size = len(json.dumps(doc, separators=(",", ":")).encode("utf-8", "replace"))
        except (TypeError, ValueError):
            return False  # not plain JSON: the ledger refuses it, with its reason
        job_id, completed_at = doc.get("jobId"), finite_number(doc.get("completedAt"))
        if size <= MAX_JOB_DOCUMENT_BYTES or not isinstance(job_id, str) or not job_id or completed_at is None:
            return False
        reason = f"job document is {size:,} bytes, over the {MAX_JOB_DOCUMENT_BYTES:,} the ledger keeps"
        if await self.db(self.ledger.quarantine_unkept, job_id, completed_at, reason):
            log.warning("job %s given up: %s", printable(job_id), reason)
            await self.db(self.ledger.append_event, "materializer.state",
                          {"state": "quarantined", "jobId": job_id, "reason": reason})
        return True

    async def write_gallery(self) -> bool:
        """Rewrite gallery.json; True when it found images without a thumbnail that
        :meth:`repair_thumbnails` has not tried yet."""
        async with self._gallery_lock:
            heads, read = await self.db(self.ledger.gallery_changes, self.options.gallery_size, self._gallery.known())
            entries = self._gallery.update(heads, read)
            try:
                await asyncio.to_thread(self._write_manifest, entries, time.time() * 1000)
            except StorageError as exc:
                log.error("could not write %s: %s (will try again with the next job)", MANIFEST_NAME, exc)
        return bool(self._thumbnails_missing)

    def _write_manifest(self, entries: list[GalleryEntry], generated_at_ms: float) -> None:
        """Render and replace the manifest (in a worker thread: a thousand jobs take milliseconds)."""
        thumbnails: dict[str, str] = {}
        missing: list[OutputFile] = []
        if self.thumbnails is not None:
            images = [f for entry in entries for f in entry.files if is_image(f)]
            thumbnails = self._gallery.thumbnails(images, self.thumbnails.path_of, time.monotonic())
            missing = [f for f in images if f.path not in thumbnails and f.path not in self._thumbnails_tried]
        self._thumbnails_missing = missing
        self.store.atomic_write_bytes(MANIFEST_NAME, self._gallery.render(entries, generated_at_ms, thumbnails))

    async def repair_thumbnails(self, files: list[OutputFile] | None = None, *,
                                before_each: Callable[[], Awaitable[object]] | None = None) -> int:
        """Rebuild missing or broken thumbnails, off the jobs' path; return how many were made.

        ``files`` are checked (the gallery's jobs at start-up, the jobs a replay covered); by default,
        the images the last gallery write found without one. Each file is tried once per process, so
        a file that cannot be thumbnailed does not make every gallery write try again. Each rebuild
        first awaits ``before_each`` (the daemon's: until no job is under way, so that a thousand
        rebuilds after an upgrade do not slow the jobs arriving meanwhile).
        """
        if self.thumbnails is None:
            return 0
        if files is None:
            files, self._thumbnails_missing = self._thumbnails_missing, []
        todo = [f for f in files if f.path not in self._thumbnails_tried]
        self._thumbnails_tried.update(f.path for f in todo)
        thumbnails, memory = self.thumbnails, self.materializer.memory
        made = 0
        for file in await asyncio.to_thread(thumbnails.needing_repair, todo) if todo else []:
            if before_each is not None:
                await before_each()
            # Each rebuild decodes a first frame: it takes its share of the memory budget like a download.
            async with memory.reserve(await asyncio.to_thread(thumbnails.rebuild_memory, file.path)):
                made += await asyncio.to_thread(thumbnails.rebuild, file.path)
        return made

    def apply_live(self, options: DaemonOptions) -> None:
        """Take what a reloaded configuration may change while running (fetch and image limits, retries)."""
        fetch_fields = ("fetch_max_bytes", "connect_timeout", "read_timeout", "total_timeout")
        if any(getattr(options, name) != getattr(self.options, name) for name in fetch_fields):
            # Downloads under way finish with the old limits; new ones use the new.
            self._retired_fetchers.append(self.materializer.fetcher)
            self.materializer.fetcher = _fetcher(options)
        self.materializer.image_limits = options.image_limits
        if self.thumbnails is not None:
            self.thumbnails.limits = options.image_limits
        self.materializer.max_data_bytes = options.fetch_max_bytes
        self.materializer.max_outputs = options.max_outputs_per_job
        self.runner.retry = _retry_policy(options)

    async def aclose(self) -> None:
        for fetcher in (self.materializer.fetcher, *self._retired_fetchers):
            await fetcher.aclose()
        self.ledger_executor.shutdown(wait=True)
        self._checkpointer.close()
        if self.thumbnails is not None:
            self.thumbnails.close()
        self.store.close()
        self.ledger.close()


def _fetcher(options: DaemonOptions) -> Fetcher:
    origin = urlsplit(options.convex_url)
    return Fetcher(
        allowed_origins=[f"{origin.scheme}://{origin.netloc}"],
        max_bytes=options.fetch_max_bytes,
        connect_timeout=options.connect_timeout,
        read_timeout=options.read_timeout,
        total_timeout=options.total_timeout,
        max_connections=max(4, options.download_concurrency * 2),
    )


def _retry_policy(options: DaemonOptions) -> RetryPolicy:
    return RetryPolicy(options.max_attempts, options.retry_base_seconds, options.retry_max_seconds)


def printable(text: str) -> str:
    """Untrusted text (a job id, a reason) made safe for one log line."""
    return text.encode("unicode_escape").decode("ascii")[:200]


def _not_kept(ref: OutputRef, result: BaseException | None) -> str:
    """Why an extra output was not kept: its refusal (never fetched), or how its attempt ended."""
    if result is None:
        assert ref.error is not None
        return ref.error
    if isinstance(result, (Permanent, Retry)):
        return str(result)  # already names its output
    return f"{ref.where}: unexpected error: {type(result).__name__}: {result}"


def _output_file(index: int, name: str, mime: str, width: int | None, height: int | None, size: int,
                 sha256: str) -> OutputFile:
    return OutputFile(index=index, path=name, mime_type=mime, width=width, height=height, size_bytes=size,
                      sha256=sha256)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
