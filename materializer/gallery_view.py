"""What the gallery page is told: the ledger's jobs, failures, state and events as the page's JSON.

Pure functions of ledger records (no I/O but the ``thumbnail`` lookup they are
handed), so the shapes are tested with plain data; :mod:`materializer.gallery_server`
reads the ledger and serves them.

The page's model is keyed: a job by ``jobId`` (its files and thumbnails), a
failed job by ``jobId``, the daemon's connection and notices (gaps, quarantined
jobs) as state. Every message is an idempotent update of that model, so the
snapshot and the event stream may overlap (the stream resumes from a ``seq`` read
before the snapshot) without the page showing anything twice.

Server-sent events (``text/event-stream``), one per ledger event, with the
ledger's ``seq`` as the event id (an ``EventSource`` that reconnects sends it back
as ``Last-Event-ID`` and resumes right after it):

- ``job``: a materialized job, the shape of a snapshot's ``jobs[]``;
- ``failed``: a job that failed upstream, the shape of ``failed[]``;
- ``state``: a ``materializer.state`` payload (``connected``, ``disconnected``,
  ``auth_required`` with ``action``, ``token_needed``, ``gap``, ``quarantined``)
  with ``at`` (Unix ms);
- ``noop``: an event the page has nothing to show for (its id still counts).

And, without an id: ``daemon`` (``{"running", "pid"}``, when that changes) and
``reload`` (the page's position is gone from the ledger, pruned or from another
ledger: fetch the snapshot again).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from materializer.ledger import Event, FailedEntry, GalleryEntry, Job, OutputFile, QuarantinedJob
from materializer.payloads import failed_payload

__all__ = ["daemon_view", "event_message", "failed_entry_view", "failed_view", "gallery_entry", "job_view",
           "quarantined_view", "sse_frame"]

#: A file's thumbnail name in ``.thumbs`` (None when it has none).
ThumbnailLookup = Callable[[OutputFile], str | None]


def _file_view(file: OutputFile, thumbnail: ThumbnailLookup) -> dict[str, Any]:
    return {"index": file.index, "name": file.path, "mimeType": file.mime_type, "width": file.width,
            "height": file.height, "bytes": file.size_bytes, "thumbnail": thumbnail(file)}


def job_view(entry: GalleryEntry, thumbnail: ThumbnailLookup) -> dict[str, Any]:
    """A materialized job: what the page shows for it (times in Unix ms)."""
    return {
        "jobId": entry.job_id,
        "capability": entry.capability,
        "profile": entry.profile,
        "prompt": entry.prompt,
        "completedAt": entry.completed_at_ms,
        "materializedAt": round(entry.materialized_at * 1000, 3),
        "files": [_file_view(f, thumbnail) for f in sorted(entry.files, key=lambda f: f.index)],
    }


def gallery_entry(job: Job, files: Sequence[OutputFile]) -> GalleryEntry | None:
    """A ledger job and its files as a gallery entry, or None if it is not materialized."""
    if job.status != "materialized" or job.materialized_at is None:
        return None
    return GalleryEntry(job.job_id, job.capability, job.profile, job.prompt, job.completed_at_ms,
                        job.materialized_at, list(files))


def failed_view(job_id: str, payload: dict[str, Any], noted_at: float) -> dict[str, Any]:
    """A failed job's notice: the ``media.failed`` payload and when it was noted (Unix ms)."""
    return {**payload, "jobId": job_id, "notedAt": round(noted_at * 1000, 3)}


def failed_entry_view(entry: FailedEntry) -> dict[str, Any]:
    return failed_view(entry.job_id, failed_payload(entry.doc), entry.noted_at)


def quarantined_view(job: QuarantinedJob) -> dict[str, Any]:
    return {"jobId": job.job_id, "reason": job.reason, "attempts": job.attempts}


def daemon_view(daemon_state: Any, connection: Any, alive: Callable[[int], bool]) -> dict[str, Any]:
    """Whether a daemon runs for this root: the pid it recorded is alive and it did not say it stopped."""
    pid = daemon_state.get("pid") if isinstance(daemon_state, dict) else None
    stopped = isinstance(connection, dict) and connection.get("state") == "stopped"
    running = isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and not stopped and alive(pid)
    return {"running": running, "pid": pid if running else None}


def event_message(event: Event, job: Callable[[str], dict[str, Any] | None]) -> tuple[str, dict[str, Any]]:
    """The page's message for one ledger event: ``(event name, data)``; ``job`` looks a job's view up."""
    payload = event.payload
    job_id = payload.get("jobId")
    if event.type == "media.materialized" and isinstance(job_id, str):
        view = job(job_id)
        return ("job", view) if view is not None else ("noop", {})
    if event.type == "media.failed" and isinstance(job_id, str):
        return "failed", failed_view(job_id, payload, event.created_at)
    if event.type == "materializer.state":
        return "state", {**payload, "at": round(event.created_at * 1000, 3)}
    return "noop", {}


def sse_frame(name: str, data: Any, event_id: int | None = None) -> bytes:
    """One server-sent event. The data is one line of ASCII JSON: nothing in it can end the frame."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("ascii")
