"""``materializer repair``: move a damaged ledger aside and rebuild it from the files on disk and the backend.

A ledger that is there but damaged (empty, truncated, garbled, another program's database) is never
replaced silently: ``materializer run`` stops with exit code 4 and names this command. Repair, with
the root's instance lock held (no daemon may run meanwhile):

1. opens the ledger to see what it is: absent (rebuilt, a fresh root needs no repair but may have
   files), healthy (nothing to do) or damaged;
2. lists the outputs on disk (``outputs/<jobId>_<index>.<ext>``) and the jobs of ``gallery.json``
   where it is usable;
3. asks the backend with the real queries, as ``replay`` does: the jobs completed since ``--since``
   (the page query where there is one, else ``listSucceededSince``), and ``getByJobId`` for each job
   found on disk or in the gallery that the listing did not bring. Nothing has changed yet: when the
   backend cannot be asked, repair stops here;
4. moves the damaged file, with its ``-wal`` and ``-shm``, aside to
   ``materializer.db.damaged-<UTC time>`` (kept, never deleted) and opens a fresh ledger;
5. records every job the backend gave; each job with files on disk goes through the normal
   pipeline, which finds its files in place and checks them (decoded, or named by their bytes)
   instead of fetching them; a job the backend no longer has but ``gallery.json`` lists is restored
   from its entry when its files match their recorded SHA-256; jobs the backend listed that never
   reached the disk are left pending for the daemon;
6. writes ``gallery.json`` from the new ledger.

No file in the outputs folder is removed; one that no job claims stays where it is and is named in
the summary. The new ledger has a new event log: sidebar clients resuming with an old ``since`` are
told to start over (see :mod:`materializer.display`), and each restored job is announced once in it.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TextIO

from materializer import exits
from materializer.convex.http import ConvexAuthError, ConvexHttpClient, ConvexHttpError
from materializer.daemon import AUTH_ACTION
from materializer.feed import Gap
from materializer.gallery import MANIFEST_NAME, MANIFEST_VERSION
from materializer.jobs import AssetChoice, Job, JobRejected, safe_job_id
from materializer.layout import AlreadyRunning, InstanceLock, Layout
from materializer.ledger import Ledger, LedgerDamagedError, LedgerError, LedgerOpenError, OutputFile
from materializer.materialize import Workspace
from materializer.options import DaemonOptions
from materializer.payloads import materialized_payload, media_asset
from materializer.queries import JOB_QUERY
from materializer.replay import ReplaySummary, SignInNeeded, find_jobs
from materializer.tokens import TokenProvider

__all__ = ["RepairSummary", "gallery_jobs", "moved_aside_name", "repair", "scan_outputs"]

REPAIR_LEASE_PREFIX = "repair:"
#: ``<jobId>_<index>.<ext>``: the job id is everything before the last ``_<digits>.``.
_OUTPUT_NAME = re.compile(r"^(?P<job>.+)_(?P<index>\d{1,9})\.(?P<ext>[A-Za-z0-9]{1,10})$")
_RESTORED_FROM_GALLERY = "gallery.json"


@dataclass
class RepairSummary:
    """What a repair found and did (``--json`` prints :meth:`as_json`)."""

    ledger: Literal["absent", "healthy", "damaged"] = "absent"
    problem: str | None = None
    moved_aside: list[str] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)
    from_gallery: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    untracked: list[str] = field(default_factory=list)
    uncovered: list[Gap] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "ledger": self.ledger,
            "problem": self.problem,
            "movedAside": self.moved_aside,
            "restored": self.restored,
            "restoredFromGallery": self.from_gallery,
            "pending": self.pending,
            "failed": [{"jobId": job_id, "reason": reason} for job_id, reason in self.failed],
            "untracked": self.untracked,
            "uncovered": [{"fromMs": gap.from_ms, "untilMs": gap.until_ms, "jobsAtLeast": gap.jobs_at_least}
                          for gap in self.uncovered],
        }


# -- what is on disk (pure) -------------------------------------------------------------------------------


def scan_outputs(names: Iterable[str]) -> tuple[dict[str, dict[int, str]], list[str]]:
    """The outputs among a folder's file names, by job and index, and the visible names that are none.

    Hidden names (temporary files) and the manifest are neither.
    """
    jobs: dict[str, dict[int, str]] = {}
    others: list[str] = []
    for name in sorted(names):
        if name.startswith(".") or name == MANIFEST_NAME:
            continue
        match = _OUTPUT_NAME.match(name)
        try:
            job_id = safe_job_id(match.group("job")) if match else None
        except JobRejected:
            job_id = None
        if match is None or job_id is None:
            others.append(name)
            continue
        index = int(match.group("index"))
        if index in jobs.get(job_id, {}):
            others.append(name)  # a second file for one output (another extension): kept, not claimed
        else:
            jobs.setdefault(job_id, {})[index] = name
    return jobs, others


def gallery_jobs(data: bytes) -> dict[str, dict[str, Any]] | None:
    """The entries of a ``gallery.json`` by job id, or None when it is not a usable manifest."""
    try:
        manifest = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(manifest, dict) or manifest.get("version") != MANIFEST_VERSION:
        return None
    entries = manifest.get("jobs")
    if not isinstance(entries, list):
        return None
    return {entry["jobId"]: entry for entry in entries
            if isinstance(entry, dict) and isinstance(entry.get("jobId"), str) and isinstance(entry.get("files"), list)}


def moved_aside_name(name: str, when: float, taken: Iterable[str]) -> str:
    """``<name>.damaged-<UTC time>`` (with ``-2``, ``-3``, ... when that is taken)."""
    base = f"{name}.damaged-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(when))}"
    taken = set(taken)
    candidate, n = base, 1
    while any(f"{candidate}{suffix}" in taken for suffix in ("", "-wal", "-shm")):
        n += 1
        candidate = f"{base}-{n}"
    return candidate


def _gallery_files(entry: Mapping[str, Any]) -> list[OutputFile]:
    """An entry's files as the ledger keeps them (ValueError when a field is unusable)."""
    files = []
    for f in entry["files"]:
        if not isinstance(f, dict):
            raise ValueError("a file of the entry is not an object")
        try:
            files.append(OutputFile(index=f["index"], path=f["path"], mime_type=f["mimeType"], width=f.get("width"),
                                    height=f.get("height"), size_bytes=f["bytes"], sha256=f["sha256"]))
        except KeyError as exc:
            raise ValueError(f"a file of the entry has no {exc}") from None
    return files


def _gallery_asset(files: list[OutputFile], text: str | None) -> AssetChoice:
    """What the sidebar shows for files restored from the gallery, in the desktop's order of kinds."""
    indices = tuple(sorted(f.index for f in files))
    if all(f.mime_type.startswith("image/") for f in files):
        return AssetChoice("image", indices)
    first = min(files, key=lambda f: f.index)
    for prefix, kind in (("video/", "video"), ("audio/", "audio")):
        if first.mime_type.startswith(prefix):
            return AssetChoice(kind, (first.index,))  # type: ignore[arg-type]
    if first.mime_type == "text/plain" and text is not None:
        return AssetChoice("text", (first.index,), text=text)
    return AssetChoice("download", (first.index,), label="Download result")


# -- the command --------------------------------------------------------------------------------------------


def _diagnose(path: Path, summary: RepairSummary) -> LedgerOpenError | None:
    """Say what the ledger is (``summary.ledger``); return the error when it is unusable but not damaged."""
    if not path.exists() and not Path(f"{path}-wal").exists():
        summary.ledger = "absent"
        return None
    try:
        Ledger(path, create=False).close()
    except LedgerDamagedError as exc:
        summary.ledger, summary.problem = "damaged", str(exc)
        return None
    except LedgerOpenError as exc:
        return exc
    summary.ledger = "healthy"
    return None


def _move_aside(path: Path, summary: RepairSummary) -> None:
    folder = path.parent
    target = moved_aside_name(path.name, time.time(), os.listdir(folder))
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            destination = folder / f"{target}{suffix}"
            os.rename(source, destination)
            summary.moved_aside.append(str(destination))
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def _ask_backend(options: DaemonOptions, token: str, since: float, wanted: Iterable[str],
                       summary: RepairSummary, out: TextIO) -> list[dict[str, Any]]:
    """The jobs since ``since`` and the ``wanted`` ones, as the backend has them (succeeded only)."""
    listing = ReplaySummary()
    async with ConvexHttpClient(options.convex_url) as http:
        docs = await find_jobs(http, token, since, None, [], listing, out, "repair")
        listed = {doc.get("jobId") for doc in docs}
        for job_id in wanted:
            if job_id in listed:
                continue
            try:
                doc = await http.query(JOB_QUERY, {"jobId": job_id}, token)
            except ConvexAuthError as exc:
                raise SignInNeeded(str(exc)) from None
            if isinstance(doc, dict) and doc.get("status") == "succeeded":
                docs.append(doc)
    summary.uncovered = listing.uncovered
    return docs


async def repair(options: DaemonOptions, tokens: TokenProvider, *, since: float,
                 out: TextIO = sys.stderr) -> tuple[int, RepairSummary]:
    """Run a repair; returns (exit code, summary). Notes go to ``out``."""
    summary = RepairSummary()
    layout = options.layout
    lock = InstanceLock(layout)
    try:
        lock.acquire()
    except AlreadyRunning as exc:
        print(f"repair: {exc}; stop it first", file=out)
        return exits.FAILED, summary
    try:
        return await _repair_locked(options, layout, tokens, since, summary, out), summary
    finally:
        lock.release()


async def _repair_locked(options: DaemonOptions, layout: Layout, tokens: TokenProvider, since: float,
                         summary: RepairSummary, out: TextIO) -> int:
    unusable = _diagnose(layout.ledger, summary)
    if unusable is not None:
        print(f"repair: {unusable}; repair cannot help with that, and left it as it is", file=out)
        return exits.LEDGER_DAMAGED
    if summary.ledger == "healthy":
        print(f"repair: the ledger {layout.ledger} is healthy: nothing to repair", file=out)
        return exits.OK
    names = [entry.name for entry in os.scandir(layout.outputs) if entry.is_file(follow_symlinks=False)] \
        if layout.outputs.is_dir() else []
    on_disk, summary.untracked = scan_outputs(names)
    manifest = layout.outputs / MANIFEST_NAME
    gallery = gallery_jobs(manifest.read_bytes()) if manifest.is_file() else None
    if gallery is None and manifest.exists():
        print(f"repair: {manifest} is not a usable manifest; rebuilding from the files and the backend", file=out)
    gallery = gallery or {}
    token = await tokens.get()
    if token is None:
        print(f"repair: sign-in needed (nothing was changed). {AUTH_ACTION}", file=out)
        return exits.SIGN_IN_NEEDED
    try:
        docs = await _ask_backend(options, token, since, sorted({*on_disk, *gallery}), summary, out)
    except SignInNeeded:
        print(f"repair: the token was refused: sign-in needed (nothing was changed). {AUTH_ACTION}", file=out)
        return exits.SIGN_IN_NEEDED
    except ConvexHttpError as exc:
        print(f"repair: could not list jobs: {exc} (nothing was changed)", file=out)
        return exits.FAILED
    if summary.ledger == "damaged":
        _move_aside(layout.ledger, summary)
    worker = Workspace(options, owner=f"{REPAIR_LEASE_PREFIX}{os.getpid()}:{secrets.token_hex(4)}")
    try:
        await worker.db(worker.ledger.ensure_cursor, since)
        await worker.db(worker.ledger.ensure_cursor, since, "failed")
        await worker.observe(docs)
        known = {doc["jobId"] for doc in docs if isinstance(doc.get("jobId"), str)}
        await _restore_from_files(worker, [job_id for job_id in on_disk if job_id in known], summary)
        for job_id in sorted(set(gallery) - known):
            await _restore_from_gallery(worker, gallery[job_id], summary)
        summary.pending = sorted(known - set(on_disk))
        # Files of jobs the new ledger does not know (the backend has them no more, the gallery did not
        # vouch for them) stay on disk too.
        summary.untracked += [name for job_id, files in on_disk.items()
                              if job_id not in known and job_id not in summary.from_gallery for name in files.values()]
        summary.untracked.sort()
        await worker.write_gallery()
    finally:
        await worker.aclose()
    return exits.FAILED if summary.failed or summary.uncovered else exits.OK


async def _restore_from_files(worker: Workspace, job_ids: list[str], summary: RepairSummary) -> None:
    """Materialize the jobs through the pipeline, which takes their files from disk where they are valid."""
    slots = asyncio.Semaphore(2 * worker.options.download_concurrency)

    async def restore(job_id: str) -> None:
        async with slots:
            job = await worker.db(worker.ledger.job, job_id)
            if job is None or job.status != "pending":
                return
            if not await worker.db(worker.ledger.try_claim, job_id, worker.runner.owner, worker.options.lease_seconds):
                summary.failed.append((job_id, "another process holds it"))
                return
            result = await worker.runner.attempt(job_id, job.doc, job.attempts)
            if result.outcome == "materialized":
                summary.restored.append(job_id)
            else:
                summary.failed.append((job_id, result.reason or result.outcome))

    await asyncio.gather(*(restore(job_id) for job_id in job_ids))
    summary.restored.sort()


async def _restore_from_gallery(worker: Workspace, entry: Mapping[str, Any], summary: RepairSummary) -> None:
    """Restore a job the backend no longer has from its gallery entry, if its files are all there as listed."""
    job_id = entry["jobId"]
    try:
        files = _gallery_files(entry)
        if not files:
            return
        problem = await asyncio.to_thread(worker.materializer.files_problem, files, hashes=True)
        if problem is not None:
            summary.failed.append((job_id, f"listed in {MANIFEST_NAME} but not restored: {problem}"))
            return
        doc: dict[str, Any] = {"jobId": job_id, "status": "succeeded", "capability": entry.get("capability"),
                               "profile": entry.get("profile"), "completedAt": entry.get("completedAt"),
                               "restoredFrom": _RESTORED_FROM_GALLERY}
        if isinstance(entry.get("prompt"), str):
            doc["request"] = {"prompt": entry["prompt"]}
        job = Job.from_document(doc)
        text_file = min(files, key=lambda f: f.index)
        text = (worker.store.path / text_file.path).read_text("utf-8", "replace") \
            if text_file.mime_type == "text/plain" else None
        asset = media_asset(_gallery_asset(files, text), {f.index: f for f in files}, worker.materializer.outputs_base)
        await worker.db(worker.ledger.observe_jobs, [doc])
        await worker.db(worker.ledger.mark_materialized, job_id, files, materialized_payload(job, asset))
    except (ValueError, LedgerError, OSError) as exc:  # JobRejected is a ValueError
        summary.failed.append((job_id, f"listed in {MANIFEST_NAME} but not restored: {exc}"))
        return
    summary.from_gallery.append(job_id)


def print_summary(summary: RepairSummary, as_json: bool, out: TextIO) -> None:
    if as_json:
        out.write(json.dumps(summary.as_json()) + "\n")
        return
    if summary.moved_aside:
        out.write(f"moved the damaged ledger aside to {summary.moved_aside[0]} ({summary.problem})\n")
    out.write(f"restored {len(summary.restored)} job(s) from their files and {len(summary.from_gallery)} from "
              f"{MANIFEST_NAME}; {len(summary.pending)} job(s) listed by the backend wait for the daemon; "
              f"failed {len(summary.failed)}\n")
    for job_id, reason in summary.failed:
        out.write(f"  failed {job_id}: {reason}\n")
    for gap in summary.uncovered:
        out.write(f"not covered: jobs completed from {gap.from_ms:.0f} until {gap.until_ms:.0f} (Unix ms) may be "
                  f"missing: the backend lists only the newest of at least {gap.jobs_at_least}\n")
    if summary.untracked:
        out.write(f"kept {len(summary.untracked)} file(s) in the outputs folder that no job claims:"
                  f" {' '.join(summary.untracked[:10])}{' ...' if len(summary.untracked) > 10 else ''}\n")
