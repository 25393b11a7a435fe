"""Job documents and their outputs: what is kept, what is refused, and why."""

from __future__ import annotations

import base64
import dataclasses
import io
import math
import os
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from materializer.convex.values import Int64
from materializer.jobs import (
    MAX_JOB_ID_LENGTH,
    AssetChoice,
    Job,
    JobRejected,
    OutputRef,
    choose_asset,
    extract_outputs,
    safe_job_id,
)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (3, 2), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()


def document(**overrides: Any) -> dict[str, Any]:
    """A succeeded job as the backend returns it (see the job contract)."""
    doc: dict[str, Any] = {
        "jobId": "job_7Qx9",
        "capability": "text_to_image",
        "profile": "best",
        "request": {
            "prompt": "cinematic rainy Tokyo alley at night",
            "aspectRatio": "9:16",
            "input": {"num_images": 2},
        },
        "status": "succeeded",
        "upstreamStatus": "OK",
        "queuePosition": None,
        "output": {
            "images": [
                {
                    "url": "https://cdn.example.com/a.png",
                    "content_type": "image/png",
                    "width": 1024,
                    "height": 1792,
                    "file_name": "a.png",
                    "file_size": 1234567,
                },
                {"url": "https://cdn.example.com/b.webp", "mimeType": "image/webp"},
            ]
        },
        "createdAt": 1_700_000_000_000.0,
        "updatedAt": 1_700_000_005_000.0,
        "startedAt": 1_700_000_001_000.0,
        "completedAt": 1_700_000_004_500.0,
    }
    doc.update(overrides)
    return doc


def outputs(output: Any, **limits: int) -> list[OutputRef]:
    return extract_outputs(Job.from_document(document(output=output)), **limits)


# --- job ids --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "job_id",
    ["job_123", "j", "a.b-c_D9", "x" * MAX_JOB_ID_LENGTH, "jd7f3k2m9n8p1q4r5s6t7u8v9w0x1y2z", "1.5"],
)
def test_safe_job_ids_are_returned_unchanged(job_id: str) -> None:
    assert safe_job_id(job_id) == job_id


@pytest.mark.parametrize(
    ("job_id", "expected"),
    [
        ("../x", "job id contains the path separator '/'"),
        ("a/b", "job id contains the path separator '/'"),
        ("a\\b", "job id contains the path separator '\\\\'"),
        ("..", "job id '..' contains '..'"),
        ("a..b", "job id 'a..b' contains '..'"),
        ("job\x00.png", "job id contains a NUL character"),
        ("job\nx", "job id contains the control character U+000A"),
        ("job\x7f", "job id contains the control character U+007F"),
        ("x" * 500, "job id is 500 characters long (at most 128 allowed)"),
        ("", "job id is empty"),
        (".hidden", "job id '.hidden' starts with '.'"),
        ("-rf", "job id '-rf' starts with '-'"),
        ("c:evil", "job id 'c:evil' contains ':'; allowed are ASCII letters, digits, '_', '-' and '.'"),
        ("job 1", "job id 'job 1' contains ' '; allowed are ASCII letters, digits, '_', '-' and '.'"),
        ("jоb", "job id 'jоb' contains 'о'; allowed are ASCII letters, digits, '_', '-' and '.'"),  # Cyrillic o
        ("job\u202egnp",
         "job id 'job\\u202egnp' contains '\\u202e'; allowed are ASCII letters, digits, '_', '-' and '.'"),
        (42, "job id is int, not a string"),
        (None, "job id is NoneType, not a string"),
    ],
)
def test_unsafe_job_ids_are_refused_with_the_exact_reason(job_id: object, expected: str) -> None:
    with pytest.raises(JobRejected) as refused:
        safe_job_id(job_id)
    assert refused.value.reason == expected
    assert refused.value.job_id == (job_id if isinstance(job_id, str) else None)


@given(st.text(max_size=200))
@settings(max_examples=500)
def test_any_accepted_job_id_makes_a_plain_file_name(job_id: str) -> None:
    try:
        safe_job_id(job_id)
    except JobRejected as refused:
        assert refused.reason.startswith("job id ")
        return
    name = f"{job_id}_0.png"
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}", job_id)
    assert os.path.basename(name) == name == os.path.normpath(name)
    assert ".." not in job_id and len(os.fsencode(name)) < 255


# --- job documents --------------------------------------------------------------------------


def test_a_contract_document_becomes_a_job() -> None:
    doc = document()
    job = Job.from_document(doc)
    assert job == Job(
        job_id="job_7Qx9",
        status="succeeded",
        capability="text_to_image",
        profile="best",
        prompt="cinematic rainy Tokyo alley at night",
        request=doc["request"],
        output=doc["output"],
        error_message=None,
        error_code=None,
        created_at=1_700_000_000_000.0,
        updated_at=1_700_000_005_000.0,
        started_at=1_700_000_001_000.0,
        completed_at=1_700_000_004_500.0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.job_id = "other"  # type: ignore[misc]


def test_a_failed_job_keeps_its_error_and_needs_no_completion_time() -> None:
    doc = document(status="failed", error={"message": "Content policy violation", "code": "policy"}, output=None)
    del doc["completedAt"]
    job = Job.from_document(doc)
    assert (job.status, job.error_message, job.error_code, job.completed_at) == (
        "failed", "Content policy violation", "policy", None,
    )  # fmt: skip


def test_integer_timestamps_are_accepted() -> None:
    job = Job.from_document(document(completedAt=Int64(1_700_000_004_500), createdAt=1_700_000_000_000))
    assert (job.completed_at, job.created_at) == (1_700_000_004_500.0, 1_700_000_000_000.0)


def test_informational_fields_of_the_wrong_type_are_dropped_not_fatal() -> None:
    job = Job.from_document(
        document(capability=5, profile=None, request="prompt?", createdAt="yesterday", startedAt=math.inf, error="x")
    )
    assert (job.capability, job.profile, job.prompt, job.request) == (None, None, None, {})
    assert (job.created_at, job.started_at, job.error_message) == (None, None, None)


@pytest.mark.parametrize(
    ("doc", "expected", "job_id"),
    [
        (["not", "a", "dict"], "job document is list, not an object", None),
        ({k: v for k, v in document().items() if k != "jobId"}, "job document has no jobId", None),
        (document(jobId=12), "job id is int, not a string", None),
        (document(jobId="../../etc/passwd"), "job id contains the path separator '/'", "../../etc/passwd"),
        (document(status=None), "job status is NoneType, not a string", "job_7Qx9"),
        (document(completedAt="1700000000000"), "completedAt is '1700000000000', not a finite number of milliseconds",
         "job_7Qx9"),
        (document(completedAt=True), "completedAt is True, not a finite number of milliseconds", "job_7Qx9"),
        (document(completedAt=math.nan), "completedAt is nan, not a finite number of milliseconds", "job_7Qx9"),
        (document(completedAt=-math.inf), "completedAt is -inf, not a finite number of milliseconds", "job_7Qx9"),
        (document(completedAt=None), "completedAt is missing, not a finite number of milliseconds", "job_7Qx9"),
        (document(status="failed", completedAt="soon"), "completedAt is 'soon', not a finite number of milliseconds",
         "job_7Qx9"),
    ],
)  # fmt: skip
def test_documents_that_cannot_be_materialized_are_refused(doc: object, expected: str, job_id: str | None) -> None:
    with pytest.raises(JobRejected) as refused:
        Job.from_document(doc)
    assert (refused.value.reason, refused.value.job_id) == (expected, job_id)


# --- outputs --------------------------------------------------------------------------------


def test_contract_images_become_indexed_refs() -> None:
    refs = extract_outputs(Job.from_document(document()))
    assert refs == [
        OutputRef(
            job_id="job_7Qx9", index=0, where="images[0]", key="images", media_kind="image", source="url",
            url="https://cdn.example.com/a.png", declared_mime="image/png",
            declared_width=1024, declared_height=1792, declared_size=1234567,
        ),
        OutputRef(
            job_id="job_7Qx9", index=1, where="images[1]", key="images", media_kind="image", source="url",
            url="https://cdn.example.com/b.webp", declared_mime="image/webp",
        ),
    ]  # fmt: skip
    assert [ref.stem for ref in refs] == ["job_7Qx9_0", "job_7Qx9_1"]


def test_content_type_wins_over_mime_type() -> None:
    [ref] = outputs({"images": [{"url": "https://x/a", "content_type": "image/jpeg", "mimeType": "image/png"}]})
    assert ref.declared_mime == "image/jpeg"


def test_a_base64_data_uri_is_decoded_to_its_bytes() -> None:
    png = png_bytes()
    [ref] = outputs({"images": [{"url": "data:image/png;base64," + base64.b64encode(png).decode()}]})
    assert (ref.source, ref.data, ref.url, ref.declared_mime, ref.error) == ("data", png, None, "image/png", None)
    assert "data=" not in repr(ref)  # bytes stay out of logs


def test_a_data_uri_tolerates_whitespace_missing_padding_and_an_uppercase_scheme() -> None:
    text = base64.b64encode(b"hello!!").decode()  # "aGVsbG8hIQ=="
    uri = "DATA:image/gif;BASE64," + text[:5] + "\n  " + text[5:].rstrip("=")
    [ref] = outputs([{"url": uri, "content_type": "image/webp"}])
    assert (ref.data, ref.declared_mime, ref.error) == (b"hello!!", "image/webp", None)


def test_a_percent_encoded_data_uri_is_decoded() -> None:
    [ref] = outputs({"images": ["data:,GIF89a%00%01"]})
    assert (ref.data, ref.declared_mime) == (b"GIF89a\x00\x01", None)


@pytest.mark.parametrize(
    ("uri", "content", "mime"),
    [
        ("data:;base64,aGVs%0AbG8%3D", b"hello", None),  # percent-encoded base64, with a newline and padding
        ("data:text/plain,hello%20world%00", b"hello world\x00", "text/plain"),
        ("data:,", b"", None),
    ],
)
def test_data_uris_decode_percent_escapes_and_empty_data(uri: str, content: bytes, mime: str | None) -> None:
    [ref] = outputs({"images": [uri]})
    assert (ref.source, ref.data, ref.declared_mime, ref.error) == ("data", content, mime, None)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("data:image/png;base64,iVBO!!!!", "images[0]: malformed base64 in data URI: Only base64 data is allowed"),
        ("data:image/png;base64,iVBOR", "images[0]: malformed base64 in data URI: Invalid base64-encoded string"),
        ("data:image/png;base64,AA==AA==", "images[0]: malformed base64 in data URI: Excess data after padding"),
        ("data:image/png;base64,aG=VsbG8=", "images[0]: malformed base64 in data URI: Discontinuous padding"),
        ("data:image/png;base64,iVBO-_", "images[0]: malformed base64 in data URI: Only base64 data is allowed"),
        ("data:image/png;base64", "images[0]: malformed data URI: no ',' before the data"),
        ("data:image/png;base64,iVBO\u00e9", "images[0]: malformed data URI: the data holds non-ASCII characters"),
    ],
)
def test_malformed_data_uris_are_per_output_errors(uri: str, expected: str) -> None:
    [ref] = outputs({"images": [{"url": uri}]})
    assert ref.error is not None and ref.error.startswith(expected)
    assert (ref.source, ref.data, ref.url) == ("data", None, None)


def test_an_oversized_data_uri_is_refused_before_it_is_decoded() -> None:
    big = "data:image/png;base64," + base64.b64encode(bytes(3000)).decode()
    small = "data:image/png;base64," + base64.b64encode(bytes(30)).decode()
    text = "data:text/plain," + "a" * 43
    refs = outputs({"images": [big, small, text]}, max_data_bytes=40)
    assert refs[0].error == "images[0]: data URI holds about 3,000 bytes, over the 40 limit"
    assert (refs[1].error, refs[1].data) == (None, bytes(30))
    assert refs[2].error == "images[2]: data URI holds 43 bytes, over the 40 limit"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("file:///etc/passwd", "refused URL scheme 'file'"),
        ("FILE:///etc/shadow", "refused URL scheme 'file'"),
        ("ftp://example.com/a.png", "refused URL scheme 'ftp'"),
        ("javascript:alert(1)", "refused URL scheme 'javascript'"),
        ("gopher://127.0.0.1:6379/_FLUSHALL", "refused URL scheme 'gopher'"),
        ("ws://example.com/a.png", "refused URL scheme 'ws'"),
        ("//cdn.example.com/a.png", "refused URL: it has no scheme"),
        ("a.png", "refused URL: it has no scheme"),
        ("", "refused URL: it has no scheme"),
        ("http:///a.png", "refused URL: it has no host"),
        ("https://exa mple.com/a.png", "refused URL: it contains whitespace or control characters"),
        (" https://example.com/a.png", "refused URL: it contains whitespace or control characters"),
        ("https://example.com/a\r\nHost: evil", "refused URL: it contains whitespace or control characters"),
        ("http://[::1/a.png", "refused URL: it is malformed"),
    ],
)
def test_urls_that_must_not_be_fetched_carry_a_reason_and_no_url(url: str, expected: str) -> None:
    [ref] = outputs({"images": [{"url": url, "content_type": "image/png"}]})
    assert (ref.error, ref.url, ref.data, ref.source) == (f"images[0]: {expected}", None, None, "url")


def test_other_media_kinds_are_files_and_texts_are_saved_too() -> None:
    refs = outputs(
        {
            "video": {"url": "https://x/v.mp4", "content_type": "video/mp4"},
            "audio_file": {"url": "https://x/a.wav"},
            "audio": {"url": "https://x/b.mp3"},
            "model_mesh": {"url": "https://x/m.glb", "file_size": 99},
            "thumbnail": {"url": "https://x/t.webp", "content_type": "image/webp"},
            "archive": {"url": "https://x/z.zip", "content_type": "application/zip"},
            "videos": [{"url": "https://x/v1.mp4"}, {"not": "a file"}, 3, {"url": "https://x/v2.mp4"}],
            "text": "a caption",
            "caption": "words under another key are not an output",
            "timings": {"inference": 1.5},
            "seed": 42,
            "has_nsfw_concepts": [False],
        }
    )
    assert [(ref.index, ref.where, ref.key, ref.media_kind, ref.url) for ref in refs] == [
        (0, "archive", "archive", "file", "https://x/z.zip"),
        (1, "audio", "audio", "audio", "https://x/b.mp3"),
        (2, "audio_file", "audio_file", "audio", "https://x/a.wav"),
        (3, "model_mesh", "model_mesh", "model", "https://x/m.glb"),
        (4, "text", "text", "text", None),
        (5, "thumbnail", "thumbnail", "image", "https://x/t.webp"),
        (6, "video", "video", "video", "https://x/v.mp4"),
        (7, "videos[0]", "videos", "video", "https://x/v1.mp4"),
        (8, "videos[3]", "videos", "video", "https://x/v2.mp4"),
    ]
    assert refs[3].declared_size == 99
    assert (refs[4].source, refs[4].data, refs[4].declared_mime) == ("data", b"a caption", "text/plain")


def test_images_come_first_whatever_the_key_order() -> None:
    video = {"url": "https://x/v.mp4"}
    refs = outputs({"video": video, "images": [{"url": "https://x/0.png"}, {"url": "https://x/1.png"}]})
    assert [(ref.index, ref.where) for ref in refs] == [(0, "images[0]"), (1, "images[1]"), (2, "video")]


def test_a_malformed_image_entry_keeps_its_index_and_says_why() -> None:
    refs = outputs({"images": [{"url": "https://x/0.png"}, None, {"url": 5}, {}, "https://x/4.png", {"url": None}]})
    assert [(ref.index, ref.url, ref.error) for ref in refs] == [
        (0, "https://x/0.png", None),
        (1, None, "images[1] is a NoneType, not an object with a url"),
        (2, None, "images[2]: url is a int, not a string"),
        (3, None, "images[3]: url is missing"),
        (4, "https://x/4.png", None),
        (5, None, "images[5]: url is missing"),
    ]


def test_a_single_image_object_and_a_bare_list_are_tolerated() -> None:
    assert [ref.url for ref in outputs({"images": {"url": "https://x/only.png"}})] == ["https://x/only.png"]
    assert [ref.url for ref in outputs({"image": {"url": "https://x/one.png"}})] == ["https://x/one.png"]
    assert [ref.where for ref in outputs([{"url": "https://x/0.png"}, {"url": "https://x/1.png"}])] == [
        "images[0]",
        "images[1]",
    ]


def test_texts_become_text_outputs_in_key_order() -> None:
    refs = outputs({"audio": {"url": "https://x/song", "mimeType": "audio/wav"}, "promptLabel": "Night drive",
                    "textParts": ["[Verse]", "Neon on the river"]})
    assert [(ref.index, ref.where, ref.media_kind, ref.source) for ref in refs] == [
        (0, "audio", "audio", "url"), (1, "textParts", "text", "data")]
    assert refs[1].data == b"[Verse]\n\nNeon on the river"
    [empty] = outputs({"text": ""})
    assert (empty.media_kind, empty.data, empty.error) == ("text", b"", None)
    [hostile] = outputs({"text": "caf\u00e9 \ud800"})  # a lone surrogate, as hostile JSON can carry
    assert hostile.data == "caf\u00e9 ?".encode()
    assert [ref.where for ref in outputs({"images": [{"url": "https://x/a.png"}], "textParts": ["a", 3]})] == [
        "images[0]"]  # a list that is not all text is not a text


def test_a_text_over_the_data_limit_is_refused() -> None:
    [ref] = outputs({"text": "x" * 50}, max_data_bytes=40)
    assert (ref.error, ref.data) == ("text: text holds 50 bytes, over the 40 limit", None)


@pytest.mark.parametrize("placeholder", ["[data-uri omitted]", "[base64 omitted]", " [data-uri omitted] "])
def test_the_backends_omitted_data_placeholder_is_a_permanent_refusal(placeholder: str) -> None:
    refs = outputs({"images": [{"url": placeholder, "content_type": "image/png"}, placeholder],
                    "video": {"url": placeholder}})
    shown = placeholder.strip()
    assert [(ref.error, ref.url, ref.data) for ref in refs] == [
        (f"images[0]: the backend omitted this output's data ({shown}); it cannot be fetched", None, None),
        (f"images[1]: the backend omitted this output's data ({shown}); it cannot be fetched", None, None),
        (f"video: the backend omitted this output's data ({shown}); it cannot be fetched", None, None),
    ]


def asset(output: Any) -> AssetChoice:
    job = Job.from_document(document(output=output))
    return choose_asset(job, extract_outputs(job))


URL = {"url": "https://x/file"}


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        # extractOutput's order (packages/desktop-ui/src/app/media/media-store.js): images first...
        ({"video": URL, "images": [URL, URL], "text": "t"}, AssetChoice("image", (0, 1))),
        ([URL, URL], AssetChoice("image", (0, 1))),  # a bare list is the images
        ({"images": URL}, AssetChoice("image", (0,))),
        ({"images": [{"url": ""}, URL]}, AssetChoice("image", (0, 1))),  # one URL makes it images: all of them
        # ... then video, audio_file, audio, text, model_mesh, each only with a truthy URL ...
        ({"images": [], "audio": URL, "video": URL}, AssetChoice("video", (1,))),
        ({"images": [{"url": ""}], "video": URL}, AssetChoice("video", (1,))),
        ({"audio": URL, "audio_file": URL}, AssetChoice("audio", (1,))),
        ({"audio": URL, "video": {"url": ""}}, AssetChoice("audio", (0,))),
        ({"audio": {"url": "https://x/a", "mimeType": "audio/wav"}, "promptLabel": "p", "textParts": ["la"]},
         AssetChoice("audio", (0,))),
        ({"model_mesh": URL, "text": "a poem"}, AssetChoice("text", (1,), text="a poem")),
        ({"text": ""}, AssetChoice("text", (0,), text="")),
        ({"model_mesh": URL, "zip": URL}, AssetChoice("download", (0,), label="Download 3D model")),
        # ... then the first object with a URL in the document's own order ...
        ({"zeta": URL, "alpha": URL}, AssetChoice("download", (1,), label="Download result")),
        ({"alpha": {"url": None}, "zeta": URL}, AssetChoice("download", (1,), label="Download result")),
        ({"video": [URL], "result": URL}, AssetChoice("download", (0,), label="Download result")),
        # ... and, where the desktop would show nothing, the first file of a list.
        ({"videos": [URL, URL]}, AssetChoice("download", (0,), label="Download result")),
        ({"images": [{}], "seed": 3}, AssetChoice("download", (0,), label="Download result")),
    ],
)
def test_the_asset_is_chosen_in_the_desktops_order(output: Any, expected: AssetChoice) -> None:
    assert asset(output) == expected


def test_a_job_with_only_texts_the_sidebar_cannot_show_is_refused() -> None:
    with pytest.raises(JobRejected) as refused:
        asset({"textParts": ["words"]})
    assert refused.value.reason == "job output names nothing the sidebar can show"


def test_declared_numbers_are_informational_and_only_kept_when_sane() -> None:
    [ref] = outputs({"images": [{"url": "https://x/a", "width": True, "height": 512.0, "file_size": -1}]})
    assert (ref.declared_width, ref.declared_height, ref.declared_size) == (None, 512, None)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"status": "failed"}, "job status is 'failed'; only succeeded jobs are materialized"),
        ({"status": "running", "completedAt": None}, "job status is 'running'; only succeeded jobs are materialized"),
        ({"output": None}, "job output is missing, not an object"),
        ({"output": "https://x/a.png"}, "job output is a str, not an object"),
        ({"output": {"caption": "just words", "images": []}}, "job output names no files and no text"),
        ({"output": {}}, "job output names no files and no text"),
        ({"output": {"textParts": []}}, "job output names no files and no text"),
    ],
)
def test_jobs_without_files_to_materialize_are_refused(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(JobRejected) as refused:
        extract_outputs(Job.from_document(document(**overrides)))
    assert (refused.value.reason, refused.value.job_id) == (expected, "job_7Qx9")


JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=20,
)
URLS = st.sampled_from(
    ["https://x/a.png", "data:image/png;base64,iVBORw0KGgo=", "data:;base64,%%%", "file:///x", "", "http://[", "data:"]
)
ENTRY_KEYS = st.sampled_from(["url", "content_type", "mimeType", "width"])
ENTRIES = st.one_of(JSON, URLS, st.dictionaries(ENTRY_KEYS, URLS | JSON))
OUTPUT_KEYS = st.sampled_from(["images", "video", "audio", "text", "x"])


@given(
    doc=st.one_of(
        JSON,
        st.fixed_dictionaries(
            {
                "jobId": st.one_of(st.text(max_size=20), st.just("job_1"), JSON),
                "status": st.one_of(st.just("succeeded"), JSON),
                "completedAt": st.one_of(st.floats(), st.integers(), JSON),
                "output": st.one_of(
                    JSON,
                    st.lists(ENTRIES, max_size=4),
                    st.dictionaries(OUTPUT_KEYS, st.lists(ENTRIES) | ENTRIES),
                ),
            }
        ),
    )
)
@settings(max_examples=400)
def test_hostile_documents_end_as_refs_or_a_rejection_never_a_crash(doc: object) -> None:
    try:
        refs = extract_outputs(Job.from_document(doc))
    except JobRejected as refused:
        assert refused.reason
        return
    assert [ref.index for ref in refs] == list(range(len(refs)))
    for ref in refs:
        assert (ref.error is not None) + (ref.data is not None) + (ref.url is not None) == 1
        assert ref.url is None or ref.url.startswith(("http://", "https://"))
