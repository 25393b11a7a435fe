"""Stella media jobs as the materializer sees them, and the files a job's output names.

A job document comes from Convex and is untrusted: :meth:`Job.from_document`
keeps only what the pipeline needs and refuses, with a precise reason, a
document that cannot be materialized. :func:`extract_outputs` turns a
succeeded job's ``output`` into one :class:`OutputRef` per file (and per
text: ``text``, and a music job's ``textParts``, are saved as ``.txt``), in a
stable order whose position is the ``<index>`` of ``<jobId>_<index>.<ext>``.
An output that can never be fetched (a ``file:`` URL, malformed base64, an
entry without a URL, the backend's ``[data-uri omitted]`` placeholder) still
gets its index and carries the reason in ``error``, so the job is never
silently marked done with fewer files than it has.

:func:`choose_asset` then picks the one output the Display sidebar shows, by
the desktop app's rules (``extractOutput`` in
``packages/desktop-ui/src/app/media/media-store.js``); every other output is
an extra file.

Typical use::

    job = Job.from_document(doc)          # JobRejected: record the reason, move on
    refs = extract_outputs(job)           # JobRejected: same
    asset = choose_asset(job, refs)       # JobRejected: nothing the sidebar could show
    for ref in refs:
        if ref.error: ...                 # permanent: record it, do not fetch
        elif ref.data is not None: ...    # data URI or text: the bytes are already here
        else: ...                         # fetch ref.url
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote_to_bytes, urlsplit

from materializer.finite import finite_number
from materializer.limits import MAX_DOWNLOAD_BYTES

__all__ = [
    "DOWNLOAD_MODEL_LABEL",
    "DOWNLOAD_RESULT_LABEL",
    "MAX_JOB_ID_LENGTH",
    "OMITTED_DATA_PLACEHOLDERS",
    "AssetChoice",
    "AssetKind",
    "Job",
    "JobRejected",
    "MediaKind",
    "OutputRef",
    "choose_asset",
    "extract_outputs",
    "safe_job_id",
]

#: Longest job id accepted as part of a file name (``<jobId>_<index>.<ext>`` stays far below 255 bytes).
MAX_JOB_ID_LENGTH = 128

MediaKind = Literal["image", "video", "audio", "model", "file", "text"]
AssetKind = Literal["image", "video", "audio", "text", "download"]

#: The desktop's labels for the two kinds of download (``extractOutput``, media-store.js).
DOWNLOAD_MODEL_LABEL = "Download 3D model"
DOWNLOAD_RESULT_LABEL = "Download result"

#: What the real backend stores instead of inline data (``redactLargeString`` in
#: backend/convex/media_jobs.ts): such an output's bytes are gone for good.
OMITTED_DATA_PLACEHOLDERS = frozenset({"[data-uri omitted]", "[base64 omitted]"})

#: How the parts of a music job's ``textParts`` are joined in its ``.txt`` file.
_TEXT_PARTS_SEPARATOR = "\n\n"

_JOB_ID_CHARS = re.compile(r"[A-Za-z0-9_.\-]+")
_URL_FORBIDDEN = re.compile(r"[\x00-\x20\x7f]")
_ASCII_WHITESPACE = re.compile(rb"[\t\n\f\r ]+")

#: Output keys whose value names files of a known kind; any other key holding an
#: object (or list of objects) with a ``url`` is a file too, its kind read from its MIME type.
_KIND_BY_KEY: dict[str, MediaKind] = {
    "images": "image",
    "image": "image",
    "video": "video",
    "videos": "video",
    "audio": "audio",
    "audio_file": "audio",
    "audios": "audio",
    "model_mesh": "model",
    "model": "model",
}
_KIND_BY_MIME_TYPE: dict[str, MediaKind] = {"image": "image", "video": "video", "audio": "audio", "model": "model"}


class JobRejected(ValueError):
    """A job document (or its output) that cannot be materialized, with the reason why.

    ``job_id`` is the document's ``jobId`` when it was a string, safe or not:
    enough to record the refusal, never to be used as a path.
    """

    def __init__(self, reason: str, *, job_id: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.job_id = job_id


def _preview(text: str, limit: int = 40) -> str:
    """A short, escaped rendering of untrusted text for an error message."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def safe_job_id(job_id: object) -> str:
    """Return ``job_id`` if it is safe as the start of a file name, else raise :class:`JobRejected`.

    Allowed: 1 to 128 ASCII letters, digits, ``_``, ``-`` and ``.``; not
    starting with ``.`` (hidden, and our temporary files start with one) or
    ``-`` (reads as a command-line option); no ``..`` anywhere. ``:`` is
    refused: it separates streams and drives on Windows and shows as ``/`` on
    macOS, and these names are shared with the desktop app on those systems.
    """
    if not isinstance(job_id, str):
        raise JobRejected(f"job id is {type(job_id).__name__}, not a string")
    if not job_id:
        raise JobRejected("job id is empty", job_id=job_id)
    if len(job_id) > MAX_JOB_ID_LENGTH:
        raise JobRejected(
            f"job id is {len(job_id)} characters long (at most {MAX_JOB_ID_LENGTH} allowed)", job_id=job_id
        )
    for char in job_id:
        if char == "\x00":
            raise JobRejected("job id contains a NUL character", job_id=job_id)
        if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0:
            raise JobRejected(f"job id contains the control character U+{ord(char):04X}", job_id=job_id)
        if char in "/\\":
            raise JobRejected(f"job id contains the path separator {char!r}", job_id=job_id)
    if ".." in job_id:
        raise JobRejected(f"job id {_preview(job_id)} contains '..'", job_id=job_id)
    if job_id[0] in ".-":
        raise JobRejected(f"job id {_preview(job_id)} starts with {job_id[0]!r}", job_id=job_id)
    if not _JOB_ID_CHARS.fullmatch(job_id):
        bad = next(char for char in job_id if not _JOB_ID_CHARS.fullmatch(char))
        raise JobRejected(
            f"job id {_preview(job_id)} contains {bad!r}; allowed are ASCII letters, digits, '_', '-' and '.'",
            job_id=job_id,
        )
    return job_id


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Job:
    """The fields of a job document the pipeline uses.

    Timestamps are Unix milliseconds. ``completed_at`` is always set for a
    succeeded job (it drives the cursor); the other timestamps are
    informational and None when missing or not a finite number. ``request``
    and ``output`` are the document's own values, not copies.
    """

    job_id: str
    status: str
    capability: str | None
    profile: str | None
    prompt: str | None
    request: Mapping[str, Any]
    output: Any
    error_message: str | None
    error_code: str | None
    created_at: float | None
    updated_at: float | None
    started_at: float | None
    completed_at: float | None

    @classmethod
    def from_document(cls, doc: object) -> Job:
        """Build a job from a raw document; raise :class:`JobRejected` if it cannot be materialized.

        Refused: not an object; ``jobId`` missing, not a string or not a safe
        file name (see :func:`safe_job_id`); ``status`` missing or not a
        string; ``completedAt`` present but not a finite number, or missing
        on a succeeded job.
        """
        if not isinstance(doc, Mapping):
            raise JobRejected(f"job document is {type(doc).__name__}, not an object")
        if "jobId" not in doc:
            raise JobRejected("job document has no jobId")
        job_id = safe_job_id(doc["jobId"])
        status = doc.get("status")
        if not isinstance(status, str):
            raise JobRejected(f"job status is {type(status).__name__}, not a string", job_id=job_id)
        completed_at = finite_number(doc.get("completedAt"))
        if completed_at is None and (doc.get("completedAt") is not None or status == "succeeded"):
            found = "missing" if doc.get("completedAt") is None else repr(doc.get("completedAt"))[:40]
            raise JobRejected(f"completedAt is {found}, not a finite number of milliseconds", job_id=job_id)
        request = doc.get("request")
        request = request if isinstance(request, Mapping) else {}
        error = doc.get("error")
        error = error if isinstance(error, Mapping) else {}
        return cls(
            job_id=job_id,
            status=status,
            capability=_optional_str(doc.get("capability")),
            profile=_optional_str(doc.get("profile")),
            prompt=_optional_str(request.get("prompt")),
            request=request,
            output=doc.get("output"),
            error_message=_optional_str(error.get("message")),
            error_code=_optional_str(error.get("code")),
            created_at=finite_number(doc.get("createdAt")),
            updated_at=finite_number(doc.get("updatedAt")),
            started_at=finite_number(doc.get("startedAt")),
            completed_at=completed_at,
        )


@dataclass(frozen=True, slots=True)
class OutputRef:
    """One output of a job, to be saved as ``<job_id>_<index>.<ext>``.

    Exactly one of these holds: ``error`` is set (a permanent refusal, never
    fetch), ``data`` holds the bytes (a decoded data URI, or the UTF-8 of a
    text output, whose ``media_kind`` is ``text``), or ``url`` is an
    ``http``/``https`` URL to fetch. ``key`` is the output key it came from
    (``images`` for a bare list) and ``where`` says which part of the output
    (``images[2]``, ``video``) for messages. The declared MIME type and sizes
    are what the document claims; only the bytes are trusted.
    """

    job_id: str
    index: int
    where: str
    key: str
    media_kind: MediaKind
    source: Literal["url", "data"]
    url: str | None = None
    data: bytes | None = field(default=None, repr=False)
    declared_mime: str | None = None
    declared_width: int | None = None
    declared_height: int | None = None
    declared_size: int | None = None
    error: str | None = None

    @property
    def stem(self) -> str:
        """The file name without extension: ``<job_id>_<index>``."""
        return f"{self.job_id}_{self.index}"


@dataclass(frozen=True, slots=True)
class AssetChoice:
    """The output the sidebar shows for a job: which refs (by index) make it up, and how.

    ``label`` is set for downloads, ``text`` for text assets. A download
    whose file turns out to be a 3D model is shown as one (see
    :mod:`materializer.payloads`).
    """

    kind: AssetKind
    indices: tuple[int, ...]
    label: str | None = None
    text: str | None = None


def _output_mapping(job: Job) -> Mapping[str, Any]:
    """A succeeded job's output as a mapping (a bare list is its ``images``), or :class:`JobRejected`."""
    if job.status != "succeeded":
        reason = f"job status is {_preview(job.status)}; only succeeded jobs are materialized"
        raise JobRejected(reason, job_id=job.job_id)
    output = job.output
    if isinstance(output, list):
        return {"images": output}
    if not isinstance(output, Mapping):
        found = "missing" if output is None else f"a {type(output).__name__}"
        raise JobRejected(f"job output is {found}, not an object", job_id=job.job_id)
    return output


def _text_of(key: str, value: object) -> str | None:
    """The text a value holds as a text output: ``text`` as a string, ``textParts`` as a list of strings."""
    if key == "text" and isinstance(value, str):
        return value
    if key == "textParts" and isinstance(value, list) and value and all(isinstance(part, str) for part in value):
        return _TEXT_PARTS_SEPARATOR.join(value)
    return None


def extract_outputs(job: Job, *, max_data_bytes: int = MAX_DOWNLOAD_BYTES) -> list[OutputRef]:
    """Every file and text in a succeeded job's output, indexed ``0..n-1``.

    ``images`` come first in their own order (so ``images[i]`` is index
    ``i``), then, by key name, every other key holding an object with a
    ``url`` or a list of them, and the texts (see :func:`_text_of`). Other
    values (numbers, captions under other keys) are not outputs. Raises
    :class:`JobRejected` if the job did not succeed or names no file and no text.
    """
    output = _output_mapping(job)
    entries: list[tuple[str, str, MediaKind | None, object]] = []
    images = output.get("images")
    if isinstance(images, list):
        entries.extend((f"images[{i}]", "images", "image", item) for i, item in enumerate(images))
    elif images is not None:
        entries.append(("images", "images", "image", images))
    for key in sorted(k for k in output if k != "images" and isinstance(k, str)):
        value, kind = output[key], _KIND_BY_KEY.get(key)
        text = _text_of(key, value)
        if text is not None:
            entries.append((key, key, "text", text))
        elif isinstance(value, Mapping) and "url" in value:
            entries.append((key, key, kind, value))
        elif isinstance(value, list):
            entries.extend(
                (f"{key}[{i}]", key, kind, item)
                for i, item in enumerate(value)
                if isinstance(item, Mapping) and "url" in item
            )
    if not entries:
        raise JobRejected("job output names no files and no text", job_id=job.job_id)
    return [
        _text_ref(job.job_id, index, where, key, entry, max_data_bytes)
        if kind == "text" and isinstance(entry, str)
        else _output_ref(job.job_id, index, where, key, kind, entry, max_data_bytes)
        for index, (where, key, kind, entry) in enumerate(entries)
    ]


def _js_truthy(value: object) -> bool:
    """JavaScript's truthiness, which the desktop's ``if (url)`` tests: objects and NaN differ from Python's."""
    if isinstance(value, (Mapping, list)):
        return True
    return bool(value) and value == value  # NaN != NaN


def _has_url(value: object) -> bool:
    """The desktop's test for a file: an object whose ``url`` is truthy."""
    return isinstance(value, Mapping) and _js_truthy(value.get("url"))


#: The keys the desktop plays, in the order it looks for them, after ``images``.
_PLAYABLE_KEYS: tuple[tuple[str, AssetKind], ...] = (("video", "video"), ("audio_file", "audio"), ("audio", "audio"))


def choose_asset(job: Job, refs: Sequence[OutputRef]) -> AssetChoice:
    """The output the sidebar shows, in the desktop's order (``extractOutput``, media-store.js).

    1. ``images`` when one of them has a URL: all of them, one image asset;
    2. ``video``, 3. ``audio_file`` then ``audio``, each an object with a URL;
    4. ``text`` when it is a string; 5. ``model_mesh`` ("Download 3D model");
    6. the first value, in document order, that is an object with a URL
       ("Download result").

    Beyond the desktop, which would show nothing: a job whose only files are
    in lists under other keys (``videos: [...]``) shows its first file as a
    download, so that files are never materialized without an announcement.
    ``refs`` are :func:`extract_outputs` of the same job. Raises
    :class:`JobRejected` when there is nothing to show.
    """
    output = _output_mapping(job)
    by_key: dict[str, list[int]] = {}
    for ref in refs:
        by_key.setdefault(ref.key, []).append(ref.index)
    images = output.get("images")
    candidates = images if isinstance(images, list) else [images]
    if "images" in by_key and any(_has_url(item) or isinstance(item, str) and item for item in candidates):
        return AssetChoice("image", tuple(by_key["images"]))
    for key, kind in _PLAYABLE_KEYS:
        if _has_url(output.get(key)):
            return AssetChoice(kind, tuple(by_key[key]))
    text = output.get("text")
    if isinstance(text, str):
        return AssetChoice("text", tuple(by_key["text"]), text=_storable(text))
    if _has_url(output.get("model_mesh")):
        return AssetChoice("download", tuple(by_key["model_mesh"]), label=DOWNLOAD_MODEL_LABEL)
    for key, value in output.items():
        if key in by_key and _has_url(value):
            return AssetChoice("download", tuple(by_key[key]), label=DOWNLOAD_RESULT_LABEL)
    files = [ref.index for ref in refs if ref.media_kind != "text"]
    if files:
        return AssetChoice("download", (files[0],), label=DOWNLOAD_RESULT_LABEL)
    raise JobRejected("job output names nothing the sidebar can show", job_id=job.job_id)


def _declared_int(entry: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = entry.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, float) and value.is_integer() and value >= 0:
            return int(value)
    return None


def _storable(text: str) -> str:
    """``text`` as a file and a JSON payload can hold it: lone surrogates (hostile JSON) become '?'."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _text_ref(job_id: str, index: int, where: str, key: str, text: str, max_data_bytes: int) -> OutputRef:
    data = _storable(text).encode("utf-8")
    if len(data) > max_data_bytes:
        error = f"{where}: text holds {len(data):,} bytes, over the {max_data_bytes:,} limit"
        return OutputRef(job_id, index, where, key, "text", "data", declared_mime="text/plain", error=error)
    return OutputRef(job_id, index, where, key, "text", "data", data=data, declared_mime="text/plain")


def _output_ref(
    job_id: str, index: int, where: str, key: str, kind: MediaKind | None, entry: object, max_data_bytes: int
) -> OutputRef:
    error: str | None
    if isinstance(entry, str):
        entry = {"url": entry}
    if not isinstance(entry, Mapping):
        error = f"{where} is a {type(entry).__name__}, not an object with a url"
        return OutputRef(job_id, index, where, key, kind or "file", "url", error=error)
    mime = _optional_str(entry.get("content_type")) or _optional_str(entry.get("mimeType"))
    url = entry.get("url")
    source: Literal["url", "data"] = "url"
    fetch_url: str | None = None
    data: bytes | None = None
    if not isinstance(url, str):
        error = "url is missing" if url is None else f"url is a {type(url).__name__}, not a string"
    elif url.strip() in OMITTED_DATA_PLACEHOLDERS:
        error = f"the backend omitted this output's data ({url.strip()}); it cannot be fetched"
    elif url[:5].lower() == "data:":
        source = "data"
        data_mime, data, error = _decode_data_uri(url, max_data_bytes)
        mime = mime or data_mime
    else:
        error = _url_error(url)
        fetch_url = url if error is None else None
    return OutputRef(
        job_id=job_id,
        index=index,
        where=where,
        key=key,
        media_kind=kind or _kind_for(mime),
        source=source,
        url=fetch_url,
        data=data,
        declared_mime=mime,
        declared_width=_declared_int(entry, "width"),
        declared_height=_declared_int(entry, "height"),
        declared_size=_declared_int(entry, "file_size", "size"),
        error=None if error is None else f"{where}: {error}",
    )


def _kind_for(mime: str | None) -> MediaKind:
    top = (mime or "").split("/", 1)[0].strip().lower()
    return _KIND_BY_MIME_TYPE.get(top, "file")


def _url_error(url: str) -> str | None:
    """Why ``url`` must not be fetched, or None for an absolute http(s) URL with a host."""
    if _URL_FORBIDDEN.search(url):
        return "refused URL: it contains whitespace or control characters"
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        return "refused URL: it is malformed"
    if not parts.scheme:
        return "refused URL: it has no scheme"
    if parts.scheme not in ("http", "https"):
        return f"refused URL scheme {parts.scheme[:20]!r}"
    if not host:
        return "refused URL: it has no host"
    return None


def _decode_data_uri(uri: str, max_bytes: int) -> tuple[str | None, bytes | None, str | None]:
    """``(media type, bytes, None)`` for a well-formed data URI, else ``(media type, None, reason)``."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        return None, None, "malformed data URI: no ',' before the data"
    params = [part.strip() for part in header.split(";")]
    mime = params[0].lower() if "/" in params[0] else None
    is_base64 = len(params) > 1 and params[-1].lower() == "base64"
    if not payload.isascii():
        return mime, None, "malformed data URI: the data holds non-ASCII characters"
    raw = unquote_to_bytes(payload) if "%" in payload else payload.encode("ascii")
    if not is_base64:
        if len(raw) > max_bytes:
            return mime, None, f"data URI holds {len(raw):,} bytes, over the {max_bytes:,} limit"
        return mime, raw, None
    raw = _ASCII_WHITESPACE.sub(b"", raw)
    if len(raw) // 4 * 3 > max_bytes:
        return mime, None, f"data URI holds about {len(raw) // 4 * 3:,} bytes, over the {max_bytes:,} limit"
    try:
        # Strict: only the standard alphabet, padding only at the end (which may be left out).
        data = binascii.a2b_base64(raw + b"=" * (-len(raw) % 4), strict_mode=True)
    except binascii.Error as exc:
        return mime, None, f"malformed base64 in data URI: {exc}"
    if len(data) > max_bytes:
        return mime, None, f"data URI holds {len(data):,} bytes, over the {max_bytes:,} limit"
    return mime, data, None
