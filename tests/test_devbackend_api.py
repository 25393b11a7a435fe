"""The local backend's HTTP surface: media API, /api/query, stored documents, files and HTTP faults.

Rules that mirror a real system name its source file.
"""

from __future__ import annotations

import base64
import io
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from stella_devbackend.app import AUTH_REQUIRED_BODY
from stella_devbackend.control import DevBackend

from helpers import wait_until


def png_data_uri(size: tuple[int, int] = (64, 48)) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize(
    ("body", "pil_format", "count", "square"),
    [
        ({"capability": "text_to_image", "prompt": "a fox", "input": {"num_images": 4}}, "PNG", 4, True),
        ({"capability": "text_to_image", "profile": "fast", "aspectRatio": "16:9",
          "input": {"output_format": "jpeg", "num_images": 2.0}}, "JPEG", 2, False),
        ({"capability": "icon", "prompt": "a rocket", "input": {"output_format": "webp"}}, "WEBP", 1, True),
        ({"capability": "realtime", "prompt": "frame"}, "JPEG", 1, True),
    ],
)
def test_generate_produces_real_images(backend: DevBackend, body: dict[str, Any], pil_format: str, count: int,
                                       square: bool) -> None:
    response = backend.generate(body)
    assert response.status_code == 202
    accepted = response.json()
    assert accepted["status"] == "queued" and accepted["upstreamStatus"] == "IN_QUEUE"
    assert accepted["subscription"] == {"query": "api.media_jobs.getByJobId", "args": {"jobId": accepted["jobId"]}}
    doc = backend.wait_for_job(accepted["jobId"])
    assert doc["status"] == "succeeded"
    assert doc["createdAt"] <= doc["startedAt"] <= doc["completedAt"]
    images = doc["output"]["images"]
    assert len(images) == count
    for entry in images:
        data = httpx.get(entry["url"]).content
        image = decode(data)
        assert image.format == pil_format
        assert image.size == (entry["width"], entry["height"])
        assert len(data) == entry["file_size"]
        assert (image.width == image.height) == square
    if body.get("aspectRatio") == "16:9":
        assert images[0]["width"] * 9 == pytest.approx(images[0]["height"] * 16, rel=0.02)


def test_image_edit_transforms_its_source(backend: DevBackend) -> None:
    first = backend.wait_for_job(backend.generate({"capability": "icon", "prompt": "source"}).json()["jobId"])
    source_url = first["output"]["images"][0]["url"]
    edit = backend.generate({"capability": "image_edit", "prompt": "make it blue", "sourceUrl": source_url})
    assert edit.status_code == 202
    doc = backend.wait_for_job(edit.json()["jobId"])
    assert doc["request"]["source"] == {"kind": "url", "url": source_url}
    original = decode(httpx.get(source_url).content).convert("RGB")
    edited = decode(httpx.get(doc["output"]["images"][0]["url"]).content).convert("RGB")
    assert edited.size == original.size
    assert edited.tobytes() != original.tobytes()

    inline = backend.generate({"capability": "image_edit", "prompt": "p",
                               "source": {"base64": png_data_uri().split(",", 1)[1], "mimeType": "image/png"}})
    assert inline.status_code == 202
    assert decode(httpx.get(backend.wait_for_job(inline.json()["jobId"])["output"]["images"][0]["url"]).content)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"capability": "text_to_video"}, "unknown capability"),
        ({"prompt": "no capability"}, "capability is required"),
        ({"capability": "text_to_image", "profile": "ultra"}, "unknown profile"),
        ({"capability": "icon", "aspectRatio": "16:9"}, "aspectRatio is not accepted for icon"),
        ({"capability": "image_edit", "prompt": "x"}, "image_edit requires source"),
        ({"capability": "text_to_image", "input": {"num_images": 0}}, "num_images"),
        ({"capability": "text_to_image", "input": {"num_images": 5}}, "num_images"),
        ({"capability": "text_to_image", "input": {"num_images": 1.5}}, "num_images"),
        ({"capability": "text_to_image", "input": {"output_format": "bmp"}}, "output_format"),
        ({"capability": "image_edit", "source": "data:image/png;base64,aGVsbG8="}, "not a decodable image"),
        ({"capability": "image_edit", "source": "data:image/png;base64,!!!"}, "not valid base64"),
        ({"capability": "image_edit", "sourceUrl": "file:///etc/passwd"}, "http(s) URL"),
    ],
)
def test_generate_rejects_bad_requests(backend: DevBackend, body: dict[str, Any], message: str) -> None:
    response = backend.generate(body)
    assert response.status_code == 400
    assert set(response.json()) == {"error"}
    assert message in response.json()["error"]


def test_generate_rejects_malformed_and_oversized_bodies(backend: DevBackend) -> None:
    headers = {"Authorization": f"Bearer {backend.token}", "Content-Type": "application/json"}
    url = f"{backend.url}/api/media/v1/generate"
    malformed = httpx.post(url, content=b"{not json", headers=headers)
    assert malformed.status_code == 400 and "not valid JSON" in malformed.json()["error"]
    array = httpx.post(url, content=b"[1, 2]", headers=headers)
    assert array.status_code == 400 and "JSON object" in array.json()["error"]
    huge = httpx.post(url, content=b'{"prompt": "' + b"x" * (21 * 1024 * 1024) + b'"}', headers=headers,
                      timeout=60)
    assert huge.status_code == 400 and "exceeds" in huge.json()["error"]


@pytest.mark.parametrize("kind", ["missing", "malformed", "wrong-signature", "expired", "not-bearer"])
def test_generate_401_is_exactly_the_documented_body(backend: DevBackend, kind: str) -> None:
    valid = backend.mint_token("someone", 60)
    header, payload, _signature = valid.split(".")
    tokens: dict[str, str | None] = {
        "missing": None,
        "malformed": "Bearer not-a-jwt",
        "wrong-signature": f"Bearer {header}.{payload}.{base64.urlsafe_b64encode(b'x' * 32).decode().rstrip('=')}",
        "expired": f"Bearer {backend.mint_token('someone', -5)}",
        "not-bearer": f"Basic {valid}",
    }
    token = tokens[kind]
    headers = {} if token is None else {"Authorization": token}
    response = httpx.post(f"{backend.url}/api/media/v1/generate", json={"capability": "icon"}, headers=headers)
    assert response.status_code == 401
    assert response.json() == AUTH_REQUIRED_BODY
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="stella-media"'


def test_http_query_shapes_and_owner_scoping(backend: DevBackend) -> None:
    job_id = backend.generate({"capability": "icon", "prompt": "mine"}).json()["jobId"]
    assert backend.wait_for_job(job_id)["status"] == "succeeded"
    other = backend.mint_token("intruder", 60)

    mine = backend.query("media_jobs:getByJobId", {"jobId": job_id})
    assert mine.status_code == 200 and mine.json() == {"status": "success", "value": mine.json()["value"]}
    assert mine.json()["value"]["jobId"] == job_id
    assert backend.query("media_jobs:getByJobId", {"jobId": job_id}, other).json()["value"] is None
    assert backend.query("media_jobs:listSucceededSince", {"since": 0}, other).json()["value"] == []

    anonymous = httpx.post(f"{backend.url}/api/query", json={"path": "media_jobs:listSucceededSince",
                                                              "args": {"since": 0}, "format": "convex_encoded_json"})
    assert anonymous.status_code == 200 and anonymous.json()["value"] == []
    refused = backend.query("media_jobs:listSucceededSince", {"since": 0}, "garbage")
    assert refused.status_code == 401 and set(refused.json()) == {"code", "message"}


@pytest.mark.parametrize(("path", "args", "message"), [
    ("media_jobs:listSucceededSince", {"since": "yesterday"},
     'ArgumentValidationError: Value does not match validator.\nPath: .since\nValue: "yesterday"\n'
     "Validator: v.number()"),
    ("media_jobs:listSucceededSince", {"since": 0, "cursor": None},
     "ArgumentValidationError: Object contains extra field `cursor` that is not in the validator."),
    ("media_jobs:listFailedSince", {}, "ArgumentValidationError: Object is missing the required field `since`."),
    ("media_jobs:getByJobId", {"jobId": "x", "includeLogs": True},
     "ArgumentValidationError: Object contains extra field `includeLogs`"),
    ("media_jobs:listSucceededSince", {"since": 0, "limit": 2.5},
     "Uncaught TypeError: Arg 1 `n` to `take` must be a non-negative integer"),
    ("media_jobs:nope", {}, "Could not find public function for 'media_jobs:nope'."),
    ("media_jobs.js:nope", {}, "Could not find public function for 'media_jobs:nope'."),
    ("media_jobs:listSucceededPage", {"paginationOpts": {"numItems": 5, "cursor": None}},
     "Could not find public function for 'media_jobs:listSucceededPage'."),
])
def test_function_errors_are_http_200_error_answers(backend: DevBackend, path: str, args: dict[str, Any],
                                                    message: str) -> None:
    """crates/local_backend/src/public_api.rs public_query_post: the function's failure rides in a 200 answer;
    crates/udf/src/validation.rs words a missing function; UdfResponse leaves out empty logLines."""
    answer = backend.query(path, args)
    assert answer.status_code == 200
    assert set(answer.json()) == {"status", "errorMessage"} and answer.json()["status"] == "error"
    assert answer.json()["errorMessage"].startswith(message)


def test_list_queries_order_limit_and_failed_and_unknown(backend: DevBackend) -> None:
    """backend/convex/media_jobs.ts listSucceededSince: newest first, Math.max(1, Math.min(limit ?? 50, 200));
    listFailedSince (packages/contracts/convex-api.ts) the same over failed and unknown jobs."""
    ids = backend.create_jobs(count=230, share_files=True, completedAt=1_000_000, completedAtStep=10)
    failed = backend.create_jobs(count=3, status="failed", completedAt=2_000_000, completedAtStep=10)
    unknown = backend.create_jobs(count=2, status="unknown", completedAt=2_000_005, completedAtStep=10)
    newest = backend.query("media_jobs:listSucceededSince", {"since": 0}).json()["value"]
    assert [doc["jobId"] for doc in newest] == ids[::-1][:50]
    clamped = backend.query("media_jobs:listSucceededSince", {"since": 0, "limit": 1000}).json()["value"]
    assert len(clamped) == 200
    assert len(backend.query("media_jobs:listSucceededSince", {"since": 0, "limit": 0}).json()["value"]) == 1
    assert len(backend.query("media_jobs:listSucceededSince", {"since": 0, "limit": 7.0}).json()["value"]) == 7
    since = backend.query("media_jobs:listSucceededSince", {"since": 1_000_000 + 2200}).json()["value"]
    assert [doc["jobId"] for doc in since] == ids[220:][::-1]
    failures = backend.query("media_jobs:listFailedSince", {"since": 0}).json()["value"]
    # completedAt: failed 2_000_000, _010, _020; unknown 2_000_005, _015 -> interleaved, newest first
    assert [doc["jobId"] for doc in failures] == [failed[2], unknown[1], failed[1], unknown[0], failed[0]]
    assert [doc["status"] for doc in failures] == ["failed", "unknown", "failed", "unknown", "failed"]
    assert all(doc["error"]["message"] for doc in failures if doc["status"] == "failed")
    assert all("error" not in doc for doc in failures if doc["status"] == "unknown")
    two = backend.query("media_jobs:listFailedSince", {"since": 0, "limit": 2}).json()["value"]
    assert [doc["jobId"] for doc in two] == [failed[2], unknown[1]]


def test_logs_only_where_the_real_queries_return_them(backend: DevBackend) -> None:
    """backend/convex/media_jobs.ts: getByJobId always hydrates logs; the list queries only with includeLogs."""
    logs = [{"message": "step 1"}]
    [job_id] = backend.create_jobs(doc={"logs": logs})
    [quiet] = backend.create_jobs(doc={"logs": []})
    assert backend.query("media_jobs:getByJobId", {"jobId": job_id}).json()["value"]["logs"] == logs
    assert "logs" not in backend.query("media_jobs:getByJobId", {"jobId": quiet}).json()["value"]
    listed = {doc["jobId"]: doc for doc in backend.query("media_jobs:listSucceededSince", {"since": 0}).json()["value"]}
    assert "logs" not in listed[job_id]
    with_logs = backend.query("media_jobs:listSucceededSince", {"since": 0, "includeLogs": True}).json()["value"]
    assert {doc["jobId"]: doc.get("logs") for doc in with_logs} == {job_id: logs, quiet: None}


@pytest.fixture
def paged(tmp_path: Path) -> Iterator[DevBackend]:
    with DevBackend.start(tmp_path / "paged", extra_args=["--job-delay", "0.01"], extensions=["page-query"]) as b:
        yield b


def test_page_query_is_an_extension_that_walks_every_job_oldest_first(paged: DevBackend) -> None:
    """Not on the real backend (packages/contracts/convex-api.ts lists three queries): only with --extension."""
    ids = paged.create_jobs(count=125, share_files=True, completedAt=5_000, completedAtStep=0.5)
    seen: list[str] = []
    cursor = None
    while True:
        result = paged.query("media_jobs:listSucceededPage",
                             {"since": 0, "paginationOpts": {"numItems": 40, "cursor": cursor}}).json()["value"]
        seen += [doc["jobId"] for doc in result["page"]]
        cursor = result["continueCursor"]
        if result["isDone"]:
            break
    assert seen == ids
    later = paged.create_jobs(count=2, share_files=True, completedAt=9_000)
    result = paged.query("media_jobs:listSucceededPage",
                         {"paginationOpts": {"numItems": 40, "cursor": cursor}}).json()["value"]
    assert [doc["jobId"] for doc in result["page"]] == later and result["isDone"]
    bad = paged.query("media_jobs:listSucceededPage", {"paginationOpts": {"numItems": 5, "cursor": "%%%"}})
    assert bad.status_code == 200 and bad.json()["errorMessage"].startswith("Uncaught Error: invalid pagination")


def test_job_ids_are_uuids_unless_a_test_names_them(backend: DevBackend) -> None:
    """backend/convex/http_routes/media.ts: jobId = crypto.randomUUID()."""
    generated = backend.generate({"capability": "icon"}).json()["jobId"]
    created = backend.create_jobs(count=3)
    for job_id in (generated, *created):
        assert str(uuid.UUID(job_id)) == job_id and uuid.UUID(job_id).version == 4
    assert backend.create_jobs(doc={"jobId": "../../etc/passwd"}) == ["../../etc/passwd"]


def test_outputs_are_stored_through_the_sanitizer(backend: DevBackend) -> None:
    """backend/convex/media_jobs.ts sanitizeJsonValue / redactLargeString, as markGenerated stores outputs."""
    pixel = base64.b64encode(b"\x89PNG" + bytes(64)).decode()
    deep: Any = "bottom"
    for _ in range(7):
        deep = [deep]
    provider = {
        "images": [{"url": f"  data:image/png;base64,{pixel}", "content_type": " image/png "},
                   {"url": f"DATA:Image/PNG;BASE64,{pixel}"},
                   {"url": "data:image/png,not-base64"}],
        "blob": "QUJD" * 600,
        "short": "QUJD" * 10,
        "deep": deep,
        "n": 3, "ok": True, "none": None,
    }
    [job_id] = backend.create_jobs(output=provider)
    stored = backend.query("media_jobs:getByJobId", {"jobId": job_id}).json()["value"]["output"]
    assert stored["images"] == [{"url": "[data-uri omitted]", "content_type": "image/png"},
                                {"url": "[data-uri omitted]"}, {"url": "data:image/png,not-base64"}]
    assert stored["blob"] == "[base64 omitted]" and stored["short"] == "QUJD" * 10
    assert stored["deep"] == [[[[[[]]]]]]  # the container six levels down is emptied
    assert (stored["n"], stored["ok"], stored["none"]) == (3, True, None)


def test_generated_requests_are_summarized_as_the_backend_stores_them(backend: DevBackend) -> None:
    """backend/convex/media_jobs.ts summarizeMediaRequestForStorage and toSourceSummary."""
    source = png_data_uri()
    edit = backend.generate({"capability": "image_edit", "source": source,
                             "input": {"num_images": 1, "note": "  padded  "}}).json()["jobId"]
    stored = backend.wait_for_job(edit)["request"]
    assert stored == {"source": {"kind": "data_uri", "mimeType": "image/png"},
                      "input": {"num_images": 1, "note": "padded"}}  # no empty prompt, no bytes
    inline = backend.generate({"capability": "image_edit", "prompt": "p",
                               "source": {"base64": source.split(",", 1)[1], "mimeType": " image/png "}})
    assert backend.wait_for_job(inline.json()["jobId"])["request"]["source"] == {"kind": "base64_object",
                                                                                 "mimeType": "image/png"}


def test_unknown_jobs_from_the_fail_jobs_fault(backend: DevBackend) -> None:
    """An ``unknown`` job (listed by listFailedSince) can come out of the media API too."""
    backend.set_faults([{"kind": "fail_jobs", "status": "unknown", "times": 1}])
    doc = backend.wait_for_job(backend.generate({"capability": "icon"}).json()["jobId"])
    assert doc["status"] == "unknown" and "error" not in doc and "output" not in doc
    listed = backend.query("media_jobs:listFailedSince", {"since": 0}).json()["value"]
    assert [job["jobId"] for job in listed] == [doc["jobId"]]
    bad = httpx.post(f"{backend.url}/_dev/faults", json={"rules": [{"kind": "fail_jobs", "status": "lost"}]},
                     headers={"X-Dev-Admin-Key": backend.admin_key})
    assert bad.status_code == 400


def test_files_have_length_etag_and_ranges(backend: DevBackend) -> None:
    doc = backend.wait_for_job(backend.generate({"capability": "icon"}).json()["jobId"])
    url = doc["output"]["images"][0]["url"]
    full = httpx.get(url)
    assert full.status_code == 200
    assert int(full.headers["Content-Length"]) == len(full.content)
    assert full.headers["Accept-Ranges"] == "bytes" and full.headers["ETag"].startswith('"')
    etag = full.headers["ETag"]
    part = httpx.get(url, headers={"Range": "bytes=100-199"})
    assert part.status_code == 206 and part.content == full.content[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(full.content)}"
    tail = httpx.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == full.content[-10:]
    rest = httpx.get(url, headers={"Range": "bytes=1000-", "If-Range": etag})
    assert rest.status_code == 206 and rest.content == full.content[1000:]
    stale = httpx.get(url, headers={"Range": "bytes=1000-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == full.content
    beyond = httpx.get(url, headers={"Range": f"bytes={len(full.content)}-"})
    assert beyond.status_code == 416
    assert httpx.get(url, headers={"If-None-Match": etag}).status_code == 304
    assert httpx.get(f"{backend.url}/files/..%2Fjobs.sqlite3").status_code == 404
    assert httpx.get(f"{backend.url}/files/nope.png").status_code == 404


def test_data_uri_output_mode_is_a_fault_that_bypasses_the_sanitizer(backend: DevBackend) -> None:
    """Off by default, outputs are URLs; the fault stores data: URIs that sanitizeJsonValue would have replaced."""
    default = backend.wait_for_job(backend.generate({"capability": "icon"}).json()["jobId"])
    assert default["output"]["images"][0]["url"].startswith(f"{backend.url}/files/")
    backend.set_faults([], output_mode="data_uri")
    doc = backend.wait_for_job(backend.generate({"capability": "icon", "input": {"output_format": "png"}})
                               .json()["jobId"])
    url = doc["output"]["images"][0]["url"]
    assert url.startswith("data:image/png;base64,")
    assert decode(base64.b64decode(url.split(",", 1)[1])).format == "PNG"
    [raw] = backend.create_jobs(output={"images": [{"url": url}]})
    assert backend.query("media_jobs:getByJobId", {"jobId": raw}).json()["value"]["output"]["images"][0]["url"] == url


def test_http_faults(backend: DevBackend) -> None:
    doc = backend.wait_for_job(backend.generate({"capability": "icon"}).json()["jobId"])
    url = doc["output"]["images"][0]["url"]
    real = httpx.get(url).content

    backend.set_faults([{"kind": "http_error", "status": 429, "retry_after": "7", "times": 1}])
    limited = httpx.get(url)
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    assert httpx.get(url).content == real  # `times` ran out

    backend.set_faults([{"kind": "http_error", "status": 503, "match": "/api/query"}])
    assert backend.query("media_jobs:listSucceededSince", {"since": 0}).status_code == 503
    assert httpx.get(url).status_code == 200

    backend.set_faults([{"kind": "content_type", "value": "text/html"}])
    lying = httpx.get(url)
    assert lying.headers["Content-Type"].startswith("text/html") and lying.content == real

    backend.set_faults([{"kind": "corrupt"}])
    corrupt = httpx.get(url).content
    assert len(corrupt) == len(real) and corrupt != real

    backend.set_faults([{"kind": "oversize", "bytes": 5000}])
    assert len(httpx.get(url).content) == len(real) + 5000

    backend.set_faults([{"kind": "html"}])
    html = httpx.get(url)
    assert html.headers["Content-Type"] == "image/png" and html.content.startswith(b"<!doctype html>")

    backend.set_faults([{"kind": "empty"}])
    assert httpx.get(url).content == b""

    backend.set_faults([{"kind": "redirect", "location": "http://10.0.0.1/secret.png"}])
    redirect = httpx.get(url)
    assert redirect.status_code == 302 and redirect.headers["Location"] == "http://10.0.0.1/secret.png"

    backend.set_faults([{"kind": "truncate", "fraction": 0.25}])
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)

    backend.set_faults([{"kind": "huge_length", "length": 10**10}])
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)

    backend.set_faults([{"kind": "stall", "fraction": 0.5}])
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(url, timeout=httpx.Timeout(5.0, read=0.5))

    backend.set_faults([{"kind": "fail_jobs", "message": "The prompt was refused.", "code": "content_policy"}])
    failed = backend.wait_for_job(backend.generate({"capability": "icon"}).json()["jobId"])
    assert failed["status"] == "failed"
    assert failed["error"] == {"message": "The prompt was refused.", "code": "content_policy"}

    bad = httpx.post(f"{backend.url}/_dev/faults", json={"rules": [{"kind": "meteor"}]},
                     headers={"X-Dev-Admin-Key": backend.admin_key})
    assert bad.status_code == 400 and "unknown fault kind" in bad.json()["error"]
    assert httpx.post(f"{backend.url}/_dev/faults", json={}).status_code == 403


def test_jobs_and_files_survive_a_restart(backend: DevBackend) -> None:
    doc = backend.wait_for_job(backend.generate({"capability": "icon", "prompt": "keep me"}).json()["jobId"])
    url = doc["output"]["images"][0]["url"]
    before = httpx.get(url).content
    port = backend.port
    backend.restart()
    assert backend.port == port
    assert backend.query("media_jobs:getByJobId", {"jobId": doc["jobId"]}).json()["value"] == doc
    assert httpx.get(url).content == before


def test_reset_empties_a_running_backend_for_the_next_test(backend: DevBackend) -> None:
    """``POST /_dev/reset``: what the shared test backend does between tests (conftest ``backend``)."""
    other = backend.mint_token("someone-else", 600)
    [mine] = backend.create_jobs()
    [theirs] = backend.create_jobs(owner="someone-else")
    url = backend.query("media_jobs:getByJobId", {"jobId": mine}).json()["value"]["output"]["images"][0]["url"]
    backend.set_faults([{"kind": "stall", "fraction": 0.5}], output_mode="data_uri")
    with connect(backend.url.replace("http", "ws", 1) + "/api/sync") as socket, \
            httpx.Client(timeout=30.0) as client, client.stream("GET", url) as stalled:
        socket.send(json.dumps({"type": "Connect", "sessionId": str(uuid.uuid4()), "connectionCount": 0}))
        wait_until(lambda: backend.stats()["open_sessions"] == 1, what="the sync session")
        ts_before = backend.stats()["ts"]
        answer = backend.reset()
        with pytest.raises(httpx.RemoteProtocolError):  # the stalled body ends: cut short
            stalled.read()
        with pytest.raises(ConnectionClosed):  # the socket was cut
            while True:
                socket.recv(timeout=10)
    assert answer["dropped"] == 1 and answer["jobs"] == 2 and answer["files"] >= 1
    assert backend.token == answer["token"]  # freshly minted (the same as before within one second)
    stats = backend.stats()
    assert (stats["sync_connections"], stats["open_sessions"]) == (0, 0)
    assert stats["ts"] > ts_before  # a Convex timestamp never goes back
    assert backend.set_faults() == {"output_mode": "url", "rules": []}  # (the reset's faults: none)
    assert httpx.get(url).status_code == 404
    assert backend.query("media_jobs:getByJobId", {"jobId": mine}).json()["value"] is None
    assert backend.query("media_jobs:getByJobId", {"jobId": theirs}, other).json()["value"] is None
    assert backend.query("media_jobs:listSucceededSince", {"since": 0}).json()["value"] == []
    job_id = backend.generate({"capability": "icon"}).json()["jobId"]  # the fresh token works; jobs still run
    assert backend.wait_for_job(job_id)["status"] == "succeeded"
