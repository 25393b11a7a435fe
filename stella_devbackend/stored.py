"""How the real backend stores a media job: its id, its request summary, and sanitized outputs.

Mirrors ruuxi/stella-v2 (the backend, before it moved to its own repository):

- ``backend/convex/http_routes/media.ts``: a job id is ``crypto.randomUUID()``;
- ``backend/convex/media_jobs.ts``: ``sanitizeJsonValue`` / ``redactLargeString``
  (every string trimmed; a ``data:<type>;base64,`` string becomes
  ``[data-uri omitted]``; a string of over 2048 base64 characters becomes
  ``[base64 omitted]``; arrays and objects nested six deep become empty),
  applied to outputs (``markGenerated``, ``applyFalWebhook``), error details
  and the request's ``input``; and ``summarizeMediaRequestForStorage`` /
  ``toSourceSummary`` for the stored ``request``.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

__all__ = ["new_job_id", "sanitize_json_value", "summarize_request"]

#: What JavaScript's ``String.prototype.trim`` and regex ``\s`` treat as white space.
_JS_SPACE = "\t\n\v\f\r \u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a" \
            "\u2028\u2029\u202f\u205f\u3000\ufeff"
_SPACE_CLASS = re.escape(_JS_SPACE)
# re.ASCII keeps IGNORECASE to ASCII letters, like a JavaScript /i regex without the u flag.
_DATA_URI = re.compile(rf"data:([^;,{_SPACE_CLASS}]+);base64,", re.IGNORECASE | re.ASCII)
_DATA_PREFIX = re.compile(r"data:", re.IGNORECASE | re.ASCII)
_BASE64ISH = re.compile(rf"[A-Za-z0-9+/={_SPACE_CLASS}]+")
DATA_URI_PLACEHOLDER = "[data-uri omitted]"
BASE64_PLACEHOLDER = "[base64 omitted]"
_BASE64_LENGTH = 2048
_MAX_DEPTH = 6


def new_job_id() -> str:
    """A job id as the media API makes one: a random UUID."""
    return str(uuid.uuid4())


def _redact_large_string(value: str) -> str:
    trimmed = value.strip(_JS_SPACE)
    if _DATA_URI.match(trimmed):
        return DATA_URI_PLACEHOLDER
    if len(trimmed) > _BASE64_LENGTH and _BASE64ISH.fullmatch(trimmed):
        return BASE64_PLACEHOLDER
    return trimmed


def sanitize_json_value(value: Any, depth: int = 0) -> Any:
    """``sanitizeJsonValue``: what the backend writes in place of a provider's JSON."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return _redact_large_string(value)
    if isinstance(value, list):
        return [] if depth >= _MAX_DEPTH else [sanitize_json_value(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {} if depth >= _MAX_DEPTH else {key: sanitize_json_value(item, depth + 1) for key, item in value.items()}
    return str(value)


def _source_summary(source: Any) -> dict[str, Any] | None:
    """``toSourceSummary``: what is kept of an edit source (never its bytes)."""
    if source is None:
        return None
    if isinstance(source, str):
        trimmed = source.strip(_JS_SPACE)
        if _DATA_PREFIX.match(trimmed):
            match = _DATA_URI.match(trimmed)
            return {"kind": "data_uri", **({"mimeType": match.group(1)} if match else {})}
        return {"kind": "url", "url": trimmed}
    mime = str(source.get("mimeType", "")).strip(_JS_SPACE)
    return {"kind": "base64_object", **({"mimeType": mime} if mime else {})}


def summarize_request(request: dict[str, Any]) -> dict[str, Any]:
    """``summarizeMediaRequestForStorage``: the stored ``request`` of a validated generate body."""
    source = _source_summary(request.get("source"))
    if source is None and request.get("sourceUrl"):
        source = {"kind": "url", "url": request["sourceUrl"]}
    sources = {name: kept for name, value in (request.get("sources") or {}).items()
               if (kept := _source_summary(value)) is not None}
    sanitized_input = sanitize_json_value(request.get("input"))
    summary: dict[str, Any] = {}
    if request.get("prompt"):
        summary["prompt"] = request["prompt"]
    if request.get("aspectRatio"):
        summary["aspectRatio"] = request["aspectRatio"]
    if source is not None:
        summary["source"] = source
    if sources:
        summary["sources"] = sources
    if isinstance(sanitized_input, dict) and sanitized_input:
        summary["input"] = sanitized_input
    return summary
