"""The media API (``POST /api/media/v1/generate``) and the job runner behind it.

Jobs go ``queued`` -> ``running`` -> ``succeeded`` (or ``failed``) on their
own, like the cloud's, and every step is a write to the job table, which the
sync sessions push to subscribers. Ids, request summaries and outputs are
stored as the real backend stores them (:mod:`stella_devbackend.stored`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from stella_devbackend import imaging
from stella_devbackend.db import JobTable
from stella_devbackend.faults import Faults
from stella_devbackend.stored import new_job_id, sanitize_json_value, summarize_request

__all__ = ["SIGNATURE_PARAM", "BadRequest", "MediaService", "PROFILES"]

log = logging.getLogger(__name__)

#: capability -> (profiles, default profile)
PROFILES: dict[str, tuple[tuple[str, ...], str]] = {
    "text_to_image": (("best", "fast"), "best"),
    "icon": (("default",), "default"),
    "image_edit": (("default",), "default"),
    "realtime": (("default",), "default"),
}
#: (capability, profile) -> long edge in pixels
LONG_EDGE = {
    ("text_to_image", "best"): 1024,
    ("text_to_image", "fast"): 768,
    ("icon", "default"): 512,
    ("image_edit", "default"): 1024,
    ("realtime", "default"): 512,
}
MAX_BODY_BYTES = 20 * 1024 * 1024
#: The query parameter of a signed file URL (``signed-urls``): named as S3's presigned URLs name theirs.
SIGNATURE_PARAM = "X-Amz-Signature"
#: A finished job's ``status`` -> the provider status stored beside it. ``unknown`` is a status the
#: reference contract names (``listFailedSince`` returns it with ``failed``); the provider status
#: shown for it is this backend's choice.
UPSTREAM_STATUS = {"succeeded": "OK", "failed": "ERROR", "unknown": "UNKNOWN", "canceled": "CANCELED"}
QUALITIES = {"low", "medium", "high"}


class BadRequest(ValueError):
    """A generate request the API answers with 400 and this message."""


@dataclass(frozen=True)
class GenerateRequest:
    capability: str
    profile: str
    prompt: str
    aspect_ratio: str | None
    num_images: int
    output_format: str
    size: tuple[int, int] | None
    source: bytes | None
    summary: dict[str, Any]


def _whole_number(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        return None
    return int(value)


def _decode_data_uri(uri: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not uri.startswith("data:") or not comma or not header.endswith(";base64"):
        raise BadRequest("source must be a base64 data: URI or {base64, mimeType}")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error:
        raise BadRequest("source data URI is not valid base64") from None


class MediaService:
    """Validates generate requests, stores jobs, and runs them to completion."""

    def __init__(self, table: JobTable, files_dir: Path, faults: Faults, job_delay: float,
                 url_signing_key: bytes | None = None) -> None:
        self.table = table
        self.files_dir = files_dir
        self.faults = faults
        self.job_delay = job_delay
        #: With the ``signed-urls`` extension: the key of the signature each file URL carries.
        self.url_signing_key = url_signing_key
        self.base_url = ""
        self._tasks: set[asyncio.Task[None]] = set()

    # -- request validation --------------------------------------------------------

    def parse(self, body: bytes) -> GenerateRequest:
        if len(body) > MAX_BODY_BYTES:
            raise BadRequest(f"request body exceeds {MAX_BODY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise BadRequest("request body must be a JSON object")
        capability = data.get("capability")
        if not isinstance(capability, str) or not capability:
            raise BadRequest("capability is required")
        if capability not in PROFILES:
            raise BadRequest(f"unknown capability {capability!r} (known: {', '.join(PROFILES)})")
        profiles, default_profile = PROFILES[capability]
        profile = data.get("profile", default_profile)
        if profile not in profiles:
            raise BadRequest(f"unknown profile {profile!r} for {capability} (known: {', '.join(profiles)})")
        prompt = data.get("prompt", "")
        if not isinstance(prompt, str):
            raise BadRequest("prompt must be a string")
        aspect_ratio = data.get("aspectRatio")
        if aspect_ratio is not None:
            if capability == "icon":
                raise BadRequest("aspectRatio is not accepted for icon: icons are always square")
            if aspect_ratio not in imaging.ASPECT_RATIOS:
                raise BadRequest(f"unsupported aspectRatio {aspect_ratio!r}")
        raw_input = data.get("input", {})
        if not isinstance(raw_input, dict):
            raise BadRequest("input must be an object")
        num_images = _whole_number(raw_input.get("num_images", 1))
        if num_images is None or not 1 <= num_images <= 4:
            raise BadRequest("input.num_images must be a whole number from 1 to 4")
        default_format = "jpeg" if capability == "realtime" else "png"
        output_format = raw_input.get("output_format", default_format)
        if output_format not in imaging.FORMATS:
            raise BadRequest(f"unknown input.output_format {output_format!r} (png, jpeg or webp)")
        quality = raw_input.get("quality")
        if quality is not None and quality not in QUALITIES:
            raise BadRequest(f"unknown input.quality {quality!r} (low, medium or high)")
        size = self._parse_size(raw_input.get("image_size"))
        source = self._parse_source(data)
        if capability == "image_edit" and source is None:
            raise BadRequest("image_edit requires source or sourceUrl")
        sources = data.get("sources")
        if sources is not None and (
            not isinstance(sources, dict) or not all(isinstance(v, str) for v in sources.values())
        ):
            raise BadRequest("sources must be an object of data: URIs")
        summary = summarize_request(data)
        return GenerateRequest(
            capability, profile, prompt, aspect_ratio, num_images, output_format, size, source, summary
        )

    @staticmethod
    def _parse_size(value: Any) -> tuple[int, int] | None:
        if value is None:
            return None
        if isinstance(value, dict):
            width, height = _whole_number(value.get("width")), _whole_number(value.get("height"))
            if width and height and 16 <= width <= 4096 and 16 <= height <= 4096:
                return width, height
        raise BadRequest("input.image_size must be {width, height} between 16 and 4096")

    def _parse_source(self, data: dict[str, Any]) -> bytes | None:
        source, source_url = data.get("source"), data.get("sourceUrl")
        if source is not None:
            if isinstance(source, str):
                raw = _decode_data_uri(source)
            elif isinstance(source, dict) and isinstance(source.get("base64"), str):
                try:
                    raw = base64.b64decode(source["base64"], validate=True)
                except binascii.Error:
                    raise BadRequest("source.base64 is not valid base64") from None
            else:
                raise BadRequest("source must be a data: URI string or {base64, mimeType}")
            self._check_image(raw)
            return raw
        if source_url is not None:
            if not isinstance(source_url, str) or urlsplit(source_url).scheme not in ("http", "https"):
                raise BadRequest("sourceUrl must be an http(s) URL")
            raw = self._own_file(source_url)
            self._check_image(raw)
            return raw
        return None

    def _own_file(self, url: str) -> bytes:
        """This backend can fetch only its own files (it has no outside network)."""
        parts = urlsplit(url)
        if f"{parts.scheme}://{parts.netloc}" != self.base_url or not parts.path.startswith("/files/"):
            raise BadRequest("sourceUrl could not be fetched: only this backend's /files/ URLs are reachable")
        name = parts.path[len("/files/") :]
        path = self.files_dir / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise BadRequest("sourceUrl could not be fetched: no such file")
        return path.read_bytes()

    @staticmethod
    def _check_image(raw: bytes) -> None:
        try:
            imaging.decode_source(raw)
        except imaging.SourceError as exc:
            raise BadRequest(str(exc)) from None

    # -- jobs ----------------------------------------------------------------------------

    def submit(self, owner: str, request: GenerateRequest) -> dict[str, Any]:
        """Store a queued job and start running it; returns the 202 body."""
        now = self.table.clock.time_ms()
        job_id = new_job_id()
        doc = {
            "jobId": job_id,
            "capability": request.capability,
            "profile": request.profile,
            "request": request.summary,
            "status": "queued",
            "upstreamStatus": "IN_QUEUE",
            "queuePosition": len(self._tasks),
            "createdAt": now,
            "updatedAt": now,
        }
        self.table.put(owner, doc)
        self._start(owner, doc, request)
        return {
            "jobId": job_id,
            "capability": request.capability,
            "profile": request.profile,
            "status": "queued",
            "upstreamStatus": "IN_QUEUE",
            "subscription": {"query": "api.media_jobs.getByJobId", "args": {"jobId": job_id}},
        }

    def _start(self, owner: str, doc: dict[str, Any], request: GenerateRequest) -> None:
        task = asyncio.get_running_loop().create_task(self._run(owner, doc, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def resume(self) -> None:
        """Restart jobs that were queued or running when the backend stopped."""
        for owner, doc in self.table.unfinished():
            summary = doc.get("request", {})
            request = GenerateRequest(
                doc["capability"], doc["profile"], summary.get("prompt", ""), summary.get("aspectRatio"),
                int(summary.get("input", {}).get("num_images", 1)),
                summary.get("input", {}).get("output_format", "jpeg" if doc["capability"] == "realtime" else "png"),
                None, None, summary,
            )
            self._start(owner, doc, request)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self, owner: str, doc: dict[str, Any], request: GenerateRequest) -> None:
        delay = self.job_delay / 5 if request.capability == "realtime" else self.job_delay
        await asyncio.sleep(delay)
        doc = self._update(owner, doc, status="running", upstreamStatus="IN_PROGRESS", queuePosition=None,
                           startedAt=self.table.clock.time_ms())
        await asyncio.sleep(delay)
        failure = self.faults.take({"fail_jobs"})
        if failure is not None:
            error = {"message": str(failure.params.get("message", "Upstream provider error")),
                     "code": str(failure.params.get("code", "upstream_error"))}
            status = failure.params.get("status", "failed")
            self._update(owner, doc, status=status, upstreamStatus=UPSTREAM_STATUS[status],
                         error=error if status == "failed" else None, completedAt=self.table.clock.time_ms())
            return
        try:
            images = await asyncio.to_thread(self._draw, doc["jobId"], request)
        except Exception as exc:  # a bug here must still finish the job visibly
            log.exception("job %s failed to render", doc["jobId"])
            self._update(owner, doc, status="failed", upstreamStatus="ERROR",
                         error={"message": f"render failed: {exc}", "code": "internal"},
                         completedAt=self.table.clock.time_ms())
            return
        self._update(owner, doc, status="succeeded", upstreamStatus="OK",
                     output=self.stored_output({"images": images}), completedAt=self.table.clock.time_ms())

    def _update(self, owner: str, doc: dict[str, Any], **fields: Any) -> dict[str, Any]:
        doc = {**doc, **fields, "updatedAt": self.table.clock.time_ms()}
        doc = {key: value for key, value in doc.items() if value is not None or key == "queuePosition"}
        self.table.put(owner, doc)
        return doc

    def _draw(self, job_id: str, request: GenerateRequest) -> list[dict[str, Any]]:
        long_edge = LONG_EDGE[(request.capability, request.profile)]
        if request.size is not None:
            size = request.size
        elif request.capability == "icon":
            size = (long_edge, long_edge)
        elif request.source is not None and request.aspect_ratio in (None, "auto"):
            source = imaging.decode_source(request.source)
            scale = min(1.0, long_edge / max(source.size))
            size = (max(16, int(source.width * scale)), max(16, int(source.height * scale)))
        else:
            size = imaging.size_for(request.aspect_ratio, long_edge)
        outputs = []
        for index in range(request.num_images):
            if request.source is not None:
                data = imaging.edit(imaging.decode_source(request.source), request.prompt,
                                    request.output_format, size, index)
            else:
                data = imaging.render(request.prompt, size[0], size[1], request.output_format, index)
            outputs.append(self.publish(data, request.output_format, size, index))
        return outputs

    def url_signature(self, name: str) -> str:
        """The signature a file's URL carries with the ``signed-urls`` extension."""
        assert self.url_signing_key is not None
        return hmac.new(self.url_signing_key, name.encode("ascii"), hashlib.sha256).hexdigest()

    def stored_output(self, output: Any) -> Any:
        """The output as ``markGenerated`` writes it: sanitized, unless the ``data_uri`` fault bypasses that."""
        return output if self.faults.output_mode == "data_uri" else sanitize_json_value(output)

    def publish(self, data: bytes, output_format: str, size: tuple[int, int], index: int) -> dict[str, Any]:
        """Store image bytes and describe them the way a provider does."""
        _, mime, ext = imaging.FORMATS[output_format]
        name = f"{secrets.token_hex(12)}.{ext}"
        if self.faults.output_mode == "data_uri":
            url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        else:
            (self.files_dir / name).write_bytes(data)
            url = f"{self.base_url}/files/{name}"
            if self.url_signing_key is not None:
                url += f"?{SIGNATURE_PARAM}={self.url_signature(name)}"
        return {"url": url, "content_type": mime, "width": size[0], "height": size[1],
                "file_name": f"output_{index}.{ext}", "file_size": len(data)}

    def build_jobs(self, spec: dict[str, Any], default_owner: str) -> tuple[str, list[dict[str, Any]]]:
        """Finished jobs for the ``/_dev/jobs`` control API (bursts, sizes, hostile fields): (owner, docs).

        Drawn images, and a provider answer given as ``output``, are stored the
        way the backend stores outputs (:meth:`stored_output`). ``doc`` fields
        replace the built document's verbatim, as an edit in the dashboard
        would: that is how tests plant hostile documents (ids included).
        Raises ValueError for a status the backend does not use. Runs in a
        worker thread (it draws images), so it only builds; the caller stores.
        """
        owner = spec.get("owner", default_owner)
        count = int(spec.get("count", 1))
        status = spec.get("status", "succeeded")
        if status not in UPSTREAM_STATUS:
            raise ValueError(f"unknown status {status!r} (known: {', '.join(UPSTREAM_STATUS)})")
        capability = spec.get("capability", "text_to_image")
        profile = spec.get("profile", PROFILES.get(capability, ((), "default"))[1])
        output_format = spec.get("format", "png")
        width, height = int(spec.get("width", 256)), int(spec.get("height", 256))
        images = int(spec.get("images", 1))
        prompt = spec.get("prompt", "a generated test image")
        shared: Any = None
        now = self.table.clock.time_ms()
        completed_at: Callable[[int], float]
        base = spec.get("completedAt")
        step = float(spec.get("completedAtStep", 1.0))
        completed_at = (lambda i: now + i * step / 1000) if base is None else (lambda i: float(base) + i * step)
        docs = []
        for i in range(count):
            if "output" in spec:
                shared = self.stored_output(spec["output"])
            elif status == "succeeded" and (shared is None or not spec.get("share_files", False)):
                shared = self.stored_output({"images": [
                    self.publish(imaging.render(f"{prompt} #{i}", width, height, output_format, k,
                                                noise=bool(spec.get("noise", False))),
                                 output_format, (width, height), k)
                    for k in range(images)
                ]})
            doc: dict[str, Any] = {
                "jobId": new_job_id(), "capability": capability, "profile": profile,
                "request": {"prompt": prompt}, "status": status, "upstreamStatus": UPSTREAM_STATUS[status],
                "queuePosition": None, "createdAt": now - 1000, "updatedAt": now, "startedAt": now - 500,
                "completedAt": completed_at(i),
            }
            if shared is not None:
                doc["output"] = shared
            if status == "failed":
                doc["error"] = {"message": spec.get("message", "The provider refused the prompt."),
                                "code": spec.get("code", "content_policy")}
            doc.update(spec.get("doc", {}))
            docs.append(doc)
        return owner, docs
