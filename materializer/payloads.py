"""What the Display sidebar is told about a job: the ``media.materialized`` and ``media.failed`` payloads.

``media.materialized`` is the desktop's ``DisplayPayload`` of kind ``media``
(``packages/contracts/desktop/display-payload.ts``), exactly as the desktop's
own materializer builds it (``packages/desktop-ui/src/app/media/
use-media-materializer.js``)::

    {"kind": "media", "asset": {...}, "jobId": "...", "capability": "...", "prompt": "...", "createdAt": 1.7e12}

- ``asset`` is one ``MediaAsset``: ``{kind: "image", filePaths}`` (plus this
  project's ``thumbnailPaths``, see :func:`media_asset`),
  ``{kind: "video" | "audio", filePath}``, ``{kind: "model3d", filePath,
  label}``, ``{kind: "download", filePath, label}`` or ``{kind: "text", text}``,
  with absolute paths;
- ``capability`` is left out when the job names none, ``prompt`` when it is
  missing or empty (the desktop spreads it in only when truthy; the type is
  ``prompt?: string``, so ``null`` is never sent);
- ``createdAt`` is ``completedAt``, else ``updatedAt`` (the desktop's
  ``completedAt ?? updatedAt``), always a finite number: the validator
  drops a payload whose ``createdAt`` is not a number.

``media.failed`` is this project's notice (the desktop shows a toast instead)::

    {"jobId", "capability", "status", "message", "code", "detail"}

``message`` is the desktop's friendly copy for image capabilities
(``friendlyImageGenerationFailure`` in ``packages/desktop-ui/src/app/media/
media-error-copy.ts``), else a sentence naming the capability; ``detail`` is
the provider's own message, ``status`` is ``failed`` or ``unknown`` (the
backend's ``listFailedSince`` returns both), so the sidebar can decide what
to show: the desktop toasts only image capabilities.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from materializer.jobs import AssetChoice, Job
from materializer.ledger import OutputFile

__all__ = [
    "IMAGE_CAPABILITIES",
    "MODEL3D_EXTENSIONS",
    "failed_payload",
    "friendly_image_failure",
    "materialized_payload",
    "media_asset",
]

#: The capabilities whose failures the desktop announces, with friendly copy.
IMAGE_CAPABILITIES = frozenset({"text_to_image", "image_edit", "icon"})

#: Downloads whose file ends in one of these are shown as 3D models (the desktop's ``toMediaAsset``).
MODEL3D_EXTENSIONS = frozenset({"glb", "gltf", "obj", "stl"})


def media_asset(choice: AssetChoice, files: Mapping[int, OutputFile], outputs_base: Path,
                thumbnails: Mapping[int, str | None] | None = None) -> dict[str, Any]:
    """The ``MediaAsset`` for a chosen output whose files (``files``, by index) are committed.

    ``thumbnails`` (by index, relative to ``outputs_base``, None where there is none) adds
    ``thumbnailPaths`` to an image asset: one absolute path or null per entry of ``filePaths``.
    It is this project's addition to the desktop's type; the desktop's reader passes the payload
    through as it is (``normalizeDisplayPayload`` returns the very object, ``isMediaAsset`` checks
    only ``filePaths``), so a sidebar that does not know it ignores it.
    """
    paths = [str(outputs_base / files[index].path) for index in choice.indices]
    if choice.kind == "image":
        asset: dict[str, Any] = {"kind": "image", "filePaths": paths}
        if thumbnails is not None:
            found = [thumbnails.get(index) for index in choice.indices]
            asset["thumbnailPaths"] = [None if path is None else str(outputs_base / path) for path in found]
        return asset
    if choice.kind == "text":
        assert choice.text is not None
        return {"kind": "text", "text": choice.text}
    [path] = paths
    if choice.kind == "download":
        kind = "model3d" if path.rsplit(".", 1)[-1].lower() in MODEL3D_EXTENSIONS else "download"
        return {"kind": kind, "filePath": path, "label": choice.label}
    return {"kind": choice.kind, "filePath": path}


def materialized_payload(job: Job, asset: dict[str, Any]) -> dict[str, Any]:
    """The ``media.materialized`` payload: a ``DisplayPayload`` of kind ``media``."""
    created_at = job.completed_at if job.completed_at is not None else job.updated_at
    if created_at is None:  # Job.from_document refuses a succeeded job without a finite completedAt
        raise ValueError(f"job {job.job_id!r} has neither completedAt nor updatedAt")
    payload: dict[str, Any] = {"kind": "media", "asset": asset, "jobId": job.job_id}
    if job.capability is not None:
        payload["capability"] = job.capability
    if job.prompt:
        payload["prompt"] = job.prompt
    payload["createdAt"] = created_at
    return payload


def failed_payload(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The ``media.failed`` payload for a job the backend lists as ``failed`` or ``unknown``."""
    found = doc.get("error")
    error: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    detail = error.get("message") if isinstance(error.get("message"), str) else None
    capability = doc.get("capability") if isinstance(doc.get("capability"), str) else None
    status = doc.get("status") if isinstance(doc.get("status"), str) else None
    if capability in IMAGE_CAPABILITIES:
        message = friendly_image_failure(error)
    else:
        what = capability.replace("_", " ") if capability else "media"
        ended = "ended in an unknown state" if status == "unknown" else "failed"
        message = f"Your {what} job {ended}: {detail or 'the provider gave no reason.'}"
    return {
        "jobId": doc.get("jobId"),
        "capability": capability,
        "status": status,
        "message": message,
        "code": error.get("code") if isinstance(error.get("code"), str) else None,
        "detail": detail,
    }


#: ``friendlyImageGenerationFailure``: error codes first, then words in the message, then the default.
_COPY_BY_CODE: dict[str, str] = {
    "request_timeout": "Image generation took too long",
    "timeout": "Image generation took too long",
    "startup_timeout": "Image generation took too long to start",
    "runner_scheduling_failure": "Image service is busy",
    "runner_connection_timeout": "Image service is busy",
    "runner_disconnected": "Image service is busy",
    "runner_connection_refused": "Image service is busy",
    "runner_connection_error": "Image service is busy",
    "runner_incomplete_response": "Image result could not be read",
    "payload_error": "Image result could not be read",
    "runner_server_error": "Image service hit a temporary error",
    "internal_error": "Image service hit a temporary error",
    "bad_request": "Image request was invalid",
    "client_cancelled": "Image generation was canceled",
    "client_disconnected": "Image generation was interrupted",
}
_COPY_BY_WORDS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(rf"\b({words})\b", re.IGNORECASE | re.ASCII), copy)  # JavaScript's \b is ASCII-only
    for words, copy in (
        ("policy|safety|moderation|blocked|nsfw", "Image request was blocked"),
        ("rate|429|concurrency|busy|capacity", "Image service is busy"),
        ("auth|api key|unauthorized|forbidden|401|403", "Image service is not configured"),
        ("required|invalid|validation|422|bad request", "Image request was invalid"),
        ("timeout|timed out|deadline", "Image generation took too long"),
    )
)
_DEFAULT_IMAGE_COPY = "Image generation failed"


def friendly_image_failure(error: object) -> str:
    """The desktop's title for a failed image job, from its ``error`` (``{message?, code?}``)."""
    fields = error if isinstance(error, Mapping) else {}
    code = fields.get("code")
    copy = _COPY_BY_CODE.get(code.strip().lower()) if isinstance(code, str) else None
    if copy is not None:
        return copy
    message = fields.get("message")
    text = message.lower() if isinstance(message, str) else ""
    return next((copy for pattern, copy in _COPY_BY_WORDS if pattern.search(text)), _DEFAULT_IMAGE_COPY)
