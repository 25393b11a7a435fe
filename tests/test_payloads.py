"""Sidebar payloads: the desktop's DisplayPayload ``media`` kind for every output kind, and failure notices.

``desktop_accepts`` below mirrors the desktop's validator line by line
(``isDisplayPayload`` / ``isMediaAsset`` in ruuxi/stella-v2
``packages/contracts/desktop/display-payload.ts``); ``matches_media_type``
checks the declared TypeScript type of the ``media`` kind and of
``MediaAsset`` in the same file, which is stricter (no unknown keys, optional
keys absent rather than null, a finite ``createdAt``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from test_daemon_pipeline import FAST

from materializer.jobs import AssetChoice, Job, choose_asset, extract_outputs
from materializer.ledger import Ledger, OutputFile
from materializer.payloads import failed_payload, friendly_image_failure, materialized_payload, media_asset
from stella_devbackend.control import DevBackend

from helpers import async_wait_until, ledger_events, running_daemon

# -- the desktop's rules, mirrored ----------------------------------------------------------------------------


def is_record(value: Any) -> bool:
    """``Boolean(value) && typeof value === "object"``: objects and arrays."""
    return isinstance(value, (dict, list))


def is_number(value: Any) -> bool:
    """``typeof value === "number"`` for a value decoded from JSON."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_media_asset(value: Any) -> bool:
    if not isinstance(value, dict):
        return False
    kind = value.get("kind")
    if kind == "image":
        return isinstance(value.get("filePaths"), list) and all(isinstance(p, str) for p in value["filePaths"])
    if kind in ("video", "audio", "model3d", "download"):
        return isinstance(value.get("filePath"), str)
    if kind == "text":
        return isinstance(value.get("text"), str)
    return False


def desktop_accepts(payload: Any) -> bool:
    """``isDisplayPayload`` for ``kind: "media"``: a MediaAsset and a numeric createdAt."""
    return (is_record(payload) and isinstance(payload, dict) and payload.get("kind") == "media"
            and is_media_asset(payload.get("asset")) and is_number(payload.get("createdAt")))


#: MediaAsset's variants: required keys and optional keys, every value a string (filePaths: strings).
#: ``thumbnailPaths`` (strings or nulls, one per file path) is this project's addition: the desktop's
#: reader passes a payload through unchanged (``normalizeDisplayPayload`` returns the very object) and
#: ``isMediaAsset`` looks at ``filePaths`` only, so a sidebar that does not know it ignores it.
ASSET_KEYS: dict[str, tuple[set[str], set[str]]] = {
    "image": ({"kind", "filePaths"}, {"thumbnailPaths"}),
    "video": ({"kind", "filePath"}, set()),
    "audio": ({"kind", "filePath"}, set()),
    "model3d": ({"kind", "filePath"}, {"label"}),
    "download": ({"kind", "filePath", "label"}, set()),
    "text": ({"kind", "text"}, set()),
}
#: The ``media`` variant of DisplayPayload: optional keys and their JSON types.
MEDIA_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "jobId": str, "capability": str, "prompt": str, "aspectRatio": str, "requestedSize": dict,
    "presentation": str, "imageIndex": (int, float), "numImages": (int, float),
}


def matches_media_type(payload: dict[str, Any]) -> bool:
    """The declared type: exactly the allowed keys, optional ones absent or of their type, finite createdAt."""
    asset = payload.get("asset")
    if not desktop_accepts(payload) or not isinstance(asset, dict):
        return False
    required, optional = ASSET_KEYS[asset["kind"]]
    if not required <= set(asset) <= required | optional:
        return False
    if not all(isinstance(asset[key], str) for key in asset if key not in ("filePaths", "thumbnailPaths")):
        return False
    thumbnails = asset.get("thumbnailPaths", [])
    if "thumbnailPaths" in asset and not (isinstance(thumbnails, list) and len(thumbnails) == len(asset["filePaths"])
                                          and all(p is None or isinstance(p, str) for p in thumbnails)):
        return False
    if not set(payload) - {"kind", "asset", "createdAt"} <= set(MEDIA_OPTIONAL):
        return False
    optional_ok = all(isinstance(payload[key], MEDIA_OPTIONAL[key]) for key in payload if key in MEDIA_OPTIONAL)
    return optional_ok and math.isfinite(payload["createdAt"])


def over_the_socket(payload: dict[str, Any]) -> Any:
    """The payload as a sidebar client decodes it (the ledger and the socket carry strict JSON)."""
    return json.loads(json.dumps(payload, allow_nan=False))


def test_the_mirrored_validator_refuses_what_the_desktop_refuses() -> None:
    good = {"kind": "media", "asset": {"kind": "video", "filePath": "/o/j_0.mp4"}, "jobId": "j", "createdAt": 1}
    assert desktop_accepts(good) and matches_media_type(good)
    for bad in (
        {**good, "asset": {"kind": "file", "filePaths": ["/o/j_0.bin"]}},  # the old, invalid "file" kind
        {**good, "asset": {"kind": "image", "filePaths": ["/o/a", 3]}},
        {**good, "asset": {"kind": "audio", "filePaths": ["/o/a"]}},
        {**good, "asset": {"kind": "text", "text": None}},
        {**good, "createdAt": None},
        {**good, "createdAt": "1700000000000"},
        {**good, "kind": "image"},
    ):
        assert not desktop_accepts(bad), bad
    # Passed by the validator, but not the declared type: what a careful producer never sends.
    for loose in ({**good, "prompt": None}, {**good, "capability": 3}, {**good, "extra": 1},
                  {**good, "asset": {"kind": "download", "filePath": "/o/x"}}, {**good, "createdAt": math.inf}):
        assert desktop_accepts(loose) and not matches_media_type(loose), loose


# -- materialized payloads for every output kind --------------------------------------------------------------

BASE = Path("/home/me/.stella/state/media/outputs")


def job_of(output: Any, **fields: Any) -> Job:
    doc = {"jobId": "job_k", "status": "succeeded", "capability": "text_to_video", "profile": "best",
           "request": {"prompt": "a slow pan over a harbour"}, "output": output,
           "createdAt": 1_700_000_000_000, "updatedAt": 1_700_000_009_000, "completedAt": 1_700_000_008_000}
    return Job.from_document({**doc, **fields})


def committed(job: Job, names: dict[int, str]) -> dict[int, OutputFile]:
    return {index: OutputFile(index, name, "application/octet-stream", None, None, 1, "0" * 64)
            for index, name in names.items()}


URL = "https://cdn.example.com/out"


@pytest.mark.parametrize(
    ("output", "names", "asset"),
    [
        ({"images": [{"url": URL}, {"url": URL}]}, {0: "job_k_0.png", 1: "job_k_1.webp"},
         {"kind": "image", "filePaths": [f"{BASE}/job_k_0.png", f"{BASE}/job_k_1.webp"]}),
        ({"video": {"url": URL}, "images": []}, {0: "job_k_0.mp4"},
         {"kind": "video", "filePath": f"{BASE}/job_k_0.mp4"}),
        ({"audio_file": {"url": URL}}, {0: "job_k_0.wav"}, {"kind": "audio", "filePath": f"{BASE}/job_k_0.wav"}),
        ({"audio": {"url": URL, "mimeType": "audio/mpeg"}, "promptLabel": "Night drive", "textParts": ["la la"]},
         {0: "job_k_0.mp3", 1: "job_k_1.txt"}, {"kind": "audio", "filePath": f"{BASE}/job_k_0.mp3"}),
        ({"model_mesh": {"url": URL}}, {0: "job_k_0.glb"},
         {"kind": "model3d", "filePath": f"{BASE}/job_k_0.glb", "label": "Download 3D model"}),
        ({"model_mesh": {"url": URL}}, {0: "job_k_0.bin"},
         {"kind": "download", "filePath": f"{BASE}/job_k_0.bin", "label": "Download 3D model"}),
        ({"result": {"url": URL}}, {0: "job_k_0.stl"},
         {"kind": "model3d", "filePath": f"{BASE}/job_k_0.stl", "label": "Download result"}),
        ({"result": {"url": URL}}, {0: "job_k_0.bin"},
         {"kind": "download", "filePath": f"{BASE}/job_k_0.bin", "label": "Download result"}),
        ({"text": "Rain on tin roofs", "model_mesh": {"url": URL}}, {0: "job_k_0.bin", 1: "job_k_1.txt"},
         {"kind": "text", "text": "Rain on tin roofs"}),
    ],
    ids=["image", "video", "audio", "music", "model3d", "model as download", "model3d by extension", "download",
         "text"],
)
def test_every_output_kind_makes_a_payload_the_desktop_accepts(
    output: Any, names: dict[int, str], asset: dict[str, Any]
) -> None:
    job = job_of(output)
    choice = choose_asset(job, extract_outputs(job))
    payload = over_the_socket(materialized_payload(job, media_asset(choice, committed(job, names), BASE)))
    assert payload == {"kind": "media", "asset": asset, "jobId": "job_k", "capability": "text_to_video",
                       "prompt": "a slow pan over a harbour", "createdAt": 1_700_000_008_000}
    assert desktop_accepts(payload) and matches_media_type(payload)


@pytest.mark.parametrize(
    ("fields", "left_out"),
    [
        ({"request": {}}, {"prompt"}),
        ({"request": {"prompt": ""}}, {"prompt"}),  # the desktop spreads the prompt in only when truthy
        ({"request": {"prompt": None}}, {"prompt"}),
        ({"request": "not an object"}, {"prompt"}),
        ({"capability": None}, {"capability"}),
        ({"capability": 7, "request": {"prompt": 7}}, {"capability", "prompt"}),
    ],
)
def test_optional_keys_are_left_out_never_null(fields: dict[str, Any], left_out: set[str]) -> None:
    job = job_of({"video": {"url": URL}}, **fields)
    payload = materialized_payload(job, {"kind": "video", "filePath": f"{BASE}/job_k_0.mp4"})
    assert left_out.isdisjoint(payload) and {"kind", "asset", "jobId", "createdAt"} <= set(payload)
    assert matches_media_type(over_the_socket(payload))


def test_created_at_is_completed_at_else_updated_at_and_never_missing() -> None:
    asset = {"kind": "text", "text": "t"}
    job = job_of({"text": "t"})
    assert materialized_payload(job, asset)["createdAt"] == 1_700_000_008_000  # not createdAt: completedAt
    # ``completedAt ?? updatedAt``; a succeeded document always has completedAt (Job.from_document insists),
    # so the fallback only serves Job values built otherwise.
    failed = Job.from_document({"jobId": "job_f", "status": "failed", "updatedAt": 5.0})
    assert materialized_payload(failed, asset)["createdAt"] == 5.0
    with pytest.raises(ValueError, match="neither completedAt nor updatedAt"):
        materialized_payload(Job.from_document({"jobId": "job_f", "status": "failed"}), asset)


def test_a_text_asset_carries_the_documents_text() -> None:
    job = job_of({"text": "line one\nline two \u2014 caf\u00e9"})
    choice = choose_asset(job, extract_outputs(job))
    assert choice == AssetChoice("text", (0,), text="line one\nline two \u2014 caf\u00e9")
    assert media_asset(choice, committed(job, {0: "job_k_0.txt"}), BASE) == {
        "kind": "text", "text": "line one\nline two \u2014 caf\u00e9"}


# -- failure notices --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "copy"),
    [
        # friendlyImageGenerationFailure (packages/desktop-ui/src/app/media/media-error-copy.ts): codes first ...
        ({"code": "request_timeout"}, "Image generation took too long"),
        ({"code": " TIMEOUT "}, "Image generation took too long"),
        ({"code": "startup_timeout"}, "Image generation took too long to start"),
        ({"code": "runner_disconnected", "message": "blocked by policy"}, "Image service is busy"),
        ({"code": "payload_error"}, "Image result could not be read"),
        ({"code": "internal_error"}, "Image service hit a temporary error"),
        ({"code": "bad_request"}, "Image request was invalid"),
        ({"code": "client_cancelled"}, "Image generation was canceled"),
        ({"code": "client_disconnected"}, "Image generation was interrupted"),
        # ... then words in the message, in the desktop's order ...
        ({"code": "content_policy", "message": "Blocked by the SAFETY filter"}, "Image request was blocked"),
        ({"message": "NSFW content detected; rate limited"}, "Image request was blocked"),
        ({"message": "429 Too Many Requests"}, "Image service is busy"),
        ({"message": "Provider at capacity"}, "Image service is busy"),
        ({"message": "Unauthorized: bad API key"}, "Image service is not configured"),
        ({"message": "prompt is required"}, "Image request was invalid"),
        ({"message": "Upstream timed out"}, "Image generation took too long"),
        # ... whole words only (moderate is not moderation, rates is not rate), else the default.
        ({"message": "moderate rates"}, "Image generation failed"),
        ({"message": "The provider is down."}, "Image generation failed"),
        ({}, "Image generation failed"),
        (None, "Image generation failed"),
        ("a string", "Image generation failed"),
        ({"code": 5, "message": ["timeout"]}, "Image generation failed"),
    ],
)
def test_the_desktops_friendly_copy_for_failed_image_jobs(error: Any, copy: str) -> None:
    assert friendly_image_failure(error) == copy


@pytest.mark.parametrize("status", ["failed", "unknown"])
@pytest.mark.parametrize("capability", ["text_to_image", "image_edit", "icon"])
def test_failed_and_unknown_image_jobs_get_the_friendly_copy(status: str, capability: str) -> None:
    doc = {"jobId": "job_f", "status": status, "capability": capability,
           "error": {"message": "Request blocked by moderation", "code": "provider_error"}}
    assert failed_payload(doc) == {"jobId": "job_f", "capability": capability, "status": status,
                                   "message": "Image request was blocked", "code": "provider_error",
                                   "detail": "Request blocked by moderation"}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"status": "failed", "capability": "text_to_video", "error": {"message": "GPU lost."}},
         "Your text to video job failed: GPU lost."),
        ({"status": "unknown", "capability": "text_to_music"},
         "Your text to music job ended in an unknown state: the provider gave no reason."),
        ({"status": "failed", "error": "not an object"}, "Your media job failed: the provider gave no reason."),
    ],
)
def test_other_capabilities_are_named_in_the_notice(doc: dict[str, Any], message: str) -> None:
    payload = failed_payload({"jobId": "job_f", **doc})
    assert payload["message"] == message
    assert payload["capability"] == doc.get("capability") and payload["status"] == doc["status"]


def test_an_unknown_job_is_noted_once_with_its_status(tmp_path: Path) -> None:
    doc = {"jobId": "job_u", "status": "unknown", "capability": "icon", "updatedAt": 1_700_000_000_000}
    with Ledger(tmp_path / "ledger.db") as ledger:
        event = ledger.note_failed_job(doc, failed_payload(doc))
        assert ledger.note_failed_job({**doc, "status": "failed"}, failed_payload({**doc, "status": "failed"})) is None
        [only] = ledger.events_after(0, 10).events
    assert event is not None and only == event
    assert (event.type, event.payload) == ("media.failed", {
        "jobId": "job_u", "capability": "icon", "status": "unknown", "message": "Image generation failed",
        "code": None, "detail": None})


async def test_failed_and_unknown_jobs_from_the_feed_each_get_one_notice(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    [unknown] = backend.create_jobs(status="unknown", capability="text_to_image", prompt="lost upstream")
    [video] = backend.create_jobs(status="failed", capability="text_to_video", message="GPU lost.", code="gpu")
    [icon] = backend.create_jobs(status="failed", capability="icon", message="Rate limit exceeded", code="x")
    async with running_daemon(root, backend, **FAST):
        notices = await async_wait_until(
            lambda: (found := ledger_events(root, "media.failed")) and len(found) == 3 and found, 10,
            what="three media.failed notices")
    assert {event.payload["jobId"]: event.payload for event in notices} == {
        unknown: {"jobId": unknown, "capability": "text_to_image", "status": "unknown",
                  "message": "Image generation failed", "code": None, "detail": None},
        video: {"jobId": video, "capability": "text_to_video", "status": "failed",
                "message": "Your text to video job failed: GPU lost.", "code": "gpu", "detail": "GPU lost."},
        icon: {"jobId": icon, "capability": "icon", "status": "failed", "message": "Image service is busy",
               "code": "x", "detail": "Rate limit exceeded"},
    }


def test_an_image_asset_lists_its_thumbnails_one_per_file_and_null_where_there_is_none() -> None:
    job = job_of({"images": [{"url": URL}, {"url": URL}]})
    choice = choose_asset(job, extract_outputs(job))
    files = committed(job, {0: "job_k_0.png", 1: "job_k_1.webp"})
    asset = media_asset(choice, files, BASE, {0: ".thumbs/job_k_0.webp", 1: None})
    assert asset == {"kind": "image", "filePaths": [f"{BASE}/job_k_0.png", f"{BASE}/job_k_1.webp"],
                     "thumbnailPaths": [f"{BASE}/.thumbs/job_k_0.webp", None]}
    payload = over_the_socket(materialized_payload(job, asset))
    assert desktop_accepts(payload) and matches_media_type(payload)
    # Only images have thumbnails; a list that does not pair up with filePaths is not the type.
    video = job_of({"video": {"url": URL}})
    assert "thumbnailPaths" not in media_asset(choose_asset(video, extract_outputs(video)), {0: files[0]}, BASE,
                                               {0: ".thumbs/job_k_0.webp"})
    assert not matches_media_type({**payload, "asset": {**asset, "thumbnailPaths": [None]}})
