"""The daemon end to end against the local backend, with real files.

Every test runs a real ``materializer dev-backend`` process and the daemon in
this event loop (so the ledger and the logs can be read), and checks what a
person would see: ``<jobId>_<i>.<ext>`` files that decode, one
``media.materialized`` event per job, a gallery entry with the right hashes,
and, for what cannot be materialized, a precise recorded reason with nothing
written anywhere else. The crash, burst-while-down, restart-mid-download and
full-disk scenarios live in ``test_daemon_crash.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hashlib
import io
import logging
import math
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from materializer.daemon import Materializer
from materializer.layout import default_layout
from materializer.ledger import Job, Ledger
from stella_devbackend.app import ADMIN_HEADER
from stella_devbackend.control import DevBackend

from helpers import async_wait_until, gallery, ledger_events, output_files, partial_files, running_daemon

#: Small retry schedule and timeouts: faults clear within a second or two.
FAST: dict[str, Any] = {"retry_base_seconds": 0.05, "retry_max_seconds": 0.5, "read_timeout": 1.0,
                        "total_timeout": 5.0}
PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "gif": "GIF"}
MIME_TYPES = {"png": "image/png", "jpg": "image/jpeg", "webp": "image/webp", "gif": "image/gif"}
LEDGER_FILES = {"materializer.db", "materializer.db-wal", "materializer.db-shm", "materializer.lock"}


# -- helpers -------------------------------------------------------------------------------------------


def backend_doc(backend: DevBackend, job_id: str) -> dict[str, Any]:
    """The backend's current document of a job."""
    response = backend.query("media_jobs:getByJobId", {"jobId": job_id})
    response.raise_for_status()
    doc = response.json()["value"]
    assert doc is not None, f"the backend has no job {job_id}"
    return doc


def file_name(backend: DevBackend, job_id: str) -> str:
    """The backend file name behind a job's first output (what fault rules ``match``)."""
    return backend_doc(backend, job_id)["output"]["images"][0]["url"].rsplit("/", 1)[1]


def fault_rules(backend: DevBackend) -> list[dict[str, Any]]:
    """The backend's active fault rules, with the ``times`` each has left."""
    response = httpx.get(f"{backend.url}/_dev/faults", headers={ADMIN_HEADER: backend.admin_key})
    response.raise_for_status()
    return response.json()["rules"]


def create_jobs_from_raw_json(backend: DevBackend, body: str) -> list[Any]:
    """``create_jobs`` with a body ``json=`` cannot write: ``1e999`` reads as infinity, which Convex carries."""
    response = httpx.post(f"{backend.url}/_dev/jobs", content=body,
                          headers={ADMIN_HEADER: backend.admin_key, "Content-Type": "application/json"})
    response.raise_for_status()
    return response.json()["jobs"]


def small_png(width: int = 64, height: int = 48) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 90)).save(buffer, "PNG")
    return buffer.getvalue()


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def wait_finished(daemon: Materializer, job_ids: list[str], timeout: float = 20.0) -> dict[str, Job]:
    """Wait until the ledger holds every job as materialized or quarantined; return them."""

    def finished() -> dict[str, Job] | None:
        jobs = {job_id: daemon.ledger.job(job_id) for job_id in job_ids}
        if any(job is None or job.status == "pending" for job in jobs.values()):
            return None
        return {job_id: job for job_id, job in jobs.items() if job is not None}

    return await async_wait_until(finished, timeout, what=f"{len(job_ids)} job(s) to finish")


async def wait_materialized(daemon: Materializer, job_ids: list[str], timeout: float = 20.0) -> None:
    """Wait until every job is materialized and listed in gallery.json."""
    jobs = await wait_finished(daemon, job_ids, timeout)
    stuck = {job_id: job.last_error for job_id, job in jobs.items() if job.status != "materialized"}
    assert not stuck, f"jobs quarantined instead of materialized: {stuck}"
    root = daemon.options.root

    def listed() -> bool:
        try:
            listed_ids = {entry["jobId"] for entry in gallery(root)["jobs"]}
        except (FileNotFoundError, ValueError):
            return False
        return set(job_ids) <= listed_ids

    await async_wait_until(listed, timeout, what="gallery.json to list the jobs")


def assert_materialized(root: Path, doc: dict[str, Any], ext: str, count: int) -> list[Path]:
    """The job is on disk as ``count`` valid ``<jobId>_<i>.<ext>`` files, announced once, in the gallery."""
    job_id = doc["jobId"]
    folder = default_layout(root).outputs
    names = [f"{job_id}_{index}.{ext}" for index in range(count)]
    assert [name for name in output_files(root) if name.startswith(f"{job_id}_")] == names
    sizes = []
    for name in names:
        with Image.open(folder / name) as image:
            assert image.format == PIL_FORMATS[ext], f"{name} holds {image.format} bytes"
            image.load()
            sizes.append(image.size)

    announcements = [e for e in ledger_events(root, "media.materialized") if e.payload["jobId"] == job_id]
    assert len(announcements) == 1, f"{job_id} announced {len(announcements)} times"
    payload = announcements[0].payload
    paths = payload["asset"]["filePaths"]
    assert paths == [str(folder.resolve() / name) for name in names]
    assert all(Path(path).is_absolute() and Path(path).is_file() for path in paths)
    assert payload["asset"]["kind"] == "image"
    thumbnails = [f".thumbs/{name.rsplit('.', 1)[0]}.webp" for name in names]
    assert payload["asset"]["thumbnailPaths"] == [str(folder.resolve() / thumb) for thumb in thumbnails]
    assert payload["capability"] == doc["capability"]
    assert payload["prompt"] == doc["request"]["prompt"]
    assert payload["createdAt"] == doc["completedAt"]  # the desktop's completedAt ?? updatedAt

    entries = [entry for entry in gallery(root)["jobs"] if entry["jobId"] == job_id]
    assert len(entries) == 1
    entry = entries[0]
    assert (entry["capability"], entry["profile"], entry["prompt"], entry["completedAt"]) == (
        doc["capability"], doc["profile"], doc["request"]["prompt"], doc["completedAt"])
    assert entry["files"] == [
        {"index": index, "path": name, "mimeType": MIME_TYPES[ext], "width": width, "height": height,
         "bytes": (folder / name).stat().st_size, "sha256": sha256_of(folder / name), "thumbnail": thumbnails[index]}
        for index, (name, (width, height)) in enumerate(zip(names, sizes, strict=True))
    ]
    for thumb, (width, height) in zip(thumbnails, sizes, strict=True):
        with Image.open(folder / thumb) as image:
            image.load()
            scale = min(1.0, 256 / max(width, height))  # the longest edge 256 px (or less), the aspect kept
            assert (image.format, image.size) == ("WEBP", (round(width * scale), round(height * scale)))
    return [folder / name for name in names]


def assert_nothing_else_written(root: Path, output_names: set[str]) -> None:
    """The root holds the ledger, gallery.json and exactly ``output_names`` with their images' thumbnails:
    nothing partial, nothing elsewhere."""
    media = Path("state/media")
    found = {path.relative_to(root) for path in root.rglob("*")}
    folders = {path for path in found if (root / path).is_dir() and not (root / path).is_symlink()}
    assert folders - {media / "outputs" / ".thumbs"} == {Path("state"), media, media / "outputs"}
    expected = {media / "outputs" / name for name in output_names | {"gallery.json"}}
    expected |= {media / "outputs" / ".thumbs" / f"{name.rsplit('.', 1)[0]}.webp" for name in output_names
                 if name.rsplit(".", 1)[-1] in MIME_TYPES}
    unexpected = {path for path in found - folders - expected if path.parent != media or path.name not in LEDGER_FILES}
    assert unexpected == set()
    assert expected <= found
    assert partial_files(root) == []


def quarantine_reasons(root: Path) -> dict[str, str | None]:
    with Ledger(default_layout(root).ledger) as ledger:
        return {job.job_id: job.reason for job in ledger.status(quarantined_limit=1000).quarantined}


@contextlib.contextmanager
def idle_listener() -> Iterator[socket.socket]:
    """A loopback port that accepts connections (so a fetch that got through would not fail fast)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        yield listener


def assert_never_connected(listener: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        listener.accept()


# -- every capability, count and format ----------------------------------------------------------------


async def test_every_capability_count_and_format_materializes(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    source = "data:image/png;base64," + base64.b64encode(small_png()).decode()
    requests: list[tuple[dict[str, Any], str, int]] = [
        ({"capability": "text_to_image", "profile": "best", "prompt": "a lighthouse at dusk"}, "png", 1),
        ({"capability": "text_to_image", "profile": "fast", "prompt": "a fox",
          "input": {"num_images": 2, "output_format": "jpeg"}}, "jpg", 2),
        ({"capability": "icon", "prompt": "a gear", "input": {"num_images": 3, "output_format": "webp"}}, "webp", 3),
        ({"capability": "image_edit", "prompt": "make it blue", "source": source, "input": {"num_images": 4}},
         "png", 4),
        ({"capability": "realtime", "prompt": "frame 1"}, "jpg", 1),
    ]
    async with running_daemon(root, backend, **FAST) as daemon:
        submitted = []
        for body, ext, count in requests:
            response = backend.generate(body)
            assert response.status_code == 202, response.text
            submitted.append((response.json()["jobId"], ext, count))
        await wait_materialized(daemon, [job_id for job_id, _, _ in submitted])
        names: set[str] = set()
        for job_id, ext, count in submitted:
            doc = backend_doc(backend, job_id)
            paths = assert_materialized(root, doc, ext, count)
            names |= {path.name for path in paths}
            declared = [(image["width"], image["height"]) for image in doc["output"]["images"]]
            entry = next(e for e in gallery(root)["jobs"] if e["jobId"] == job_id)
            assert [(f["width"], f["height"]) for f in entry["files"]] == declared
        assert daemon.materialized_count == len(requests)
    assert_nothing_else_written(root, names)
    # Newest first: the manifest's order follows completedAt.
    completed = [entry["completedAt"] for entry in gallery(root)["jobs"]]
    assert completed == sorted(completed, reverse=True)


async def test_data_uri_outputs_materialize_and_the_bytes_decide_the_extension(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    backend.set_faults([], output_mode="data_uri")
    png = base64.b64encode(small_png(40, 30)).decode()
    mislabelled = backend.create_jobs(doc={"output": {"images": [
        {"url": f"data:image/jpeg;base64,{png}", "content_type": "image/gif", "file_name": "output_0.gif"},
    ]}})[0]
    async with running_daemon(root, backend, **FAST) as daemon:
        submitted = []
        for output_format, ext, count in (("png", "png", 1), ("jpeg", "jpg", 2), ("webp", "webp", 4)):
            response = backend.generate({"capability": "text_to_image", "prompt": f"in {output_format}", "input": {
                "num_images": count, "output_format": output_format, "image_size": {"width": 96, "height": 64}}})
            assert response.status_code == 202, response.text
            submitted.append((response.json()["jobId"], ext, count))
        await wait_materialized(daemon, [job_id for job_id, _, _ in submitted] + [mislabelled])
        names: set[str] = set()
        for job_id, ext, count in submitted:
            doc = backend_doc(backend, job_id)
            assert all(image["url"].startswith("data:") for image in doc["output"]["images"])
            names |= {path.name for path in assert_materialized(root, doc, ext, count)}
        [path] = assert_materialized(root, backend_doc(backend, mislabelled), "png", 1)
        assert path.read_bytes() == base64.b64decode(png)
        names.add(path.name)
    assert_nothing_else_written(root, names)


# -- file faults ------------------------------------------------------------------------------------------


async def test_transient_file_faults_end_materialized_once_they_clear(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    cases: list[tuple[dict[str, Any], str | None]] = [
        # (fault rule limited in time, the reason recorded for the failed attempt; None: no attempt failed)
        ({"kind": "http_error", "status": 500, "times": 2}, "images[0]: HTTP 500 Internal Server Error"),
        ({"kind": "http_error", "status": 503, "times": 1}, "images[0]: HTTP 503 Service Unavailable"),
        ({"kind": "http_error", "status": 429, "retry_after": 0, "times": 1},
         "images[0]: HTTP 429 Too Many Requests (retry after 0s)"),
        ({"kind": "truncate", "fraction": 0.4, "times": 1}, None),  # resumed with Range in the same attempt
        ({"kind": "huge_length", "length": None, "times": 1}, None),  # resumed, then fetched whole
        ({"kind": "stall", "fraction": 0.5, "times": 1}, "images[0]: stalled: no bytes for 1s after"),
        ({"kind": "content_type", "value": "text/html", "times": 1}, None),  # the bytes decide
        ({"kind": "corrupt", "times": 1}, "images[0]: corrupt: "),
        ({"kind": "oversize", "bytes": 4096, "times": 1},
         "images[0]: PNG image is followed by 4,096 bytes of unknown data"),
        ({"kind": "redirect", "location": None, "times": 1}, None),  # to the same file on the backend
        ({"kind": "html", "times": 1}, "images[0]: bytes are HTML, not a PNG, JPEG, WebP or GIF image"),
        ({"kind": "empty", "times": 1}, "images[0]: file is empty"),
    ]
    job_ids = [backend.create_jobs(prompt=f"fault {rule['kind']}", noise=True)[0] for rule, _ in cases]
    rules = []
    for job_id, (rule, _) in zip(job_ids, cases, strict=True):
        doc = backend_doc(backend, job_id)
        image = doc["output"]["images"][0]
        rule = {**rule, "match": image["url"].rsplit("/", 1)[1]}
        if rule["kind"] == "huge_length":
            rule["length"] = image["file_size"] + 10_000
        if rule["kind"] == "redirect":
            rule["location"] = image["url"]
        rules.append(rule)
    backend.set_faults(rules)

    async with running_daemon(root, backend, **FAST) as daemon:
        jobs = await wait_finished(daemon, job_ids)
        await wait_materialized(daemon, job_ids)
    names: set[str] = set()
    for job_id, (rule, reason) in zip(job_ids, cases, strict=True):
        job = jobs[job_id]
        if reason is None:
            assert (job.attempts, job.last_error) == (0, None), rule
        else:
            assert job.attempts == rule["times"], (rule, job.attempts)
            assert job.last_error is not None and job.last_error.startswith(reason), (rule, job.last_error)
        names |= {path.name for path in assert_materialized(root, backend_doc(backend, job_id), "png", 1)}
    assert all(rule["times"] == 0 for rule in fault_rules(backend))
    assert_nothing_else_written(root, names)


async def test_permanent_refusals_quarantine_with_a_precise_reason(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    with idle_listener() as listener:
        other_port = listener.getsockname()[1]
        cases = [
            ({"kind": "redirect", "location": "http://10.0.0.1/x.png"},
             "images[0]: refused: address 10.0.0.1 is private"),
            ({"kind": "redirect", "location": "http://169.254.169.254/latest/meta-data/"},
             "images[0]: refused: address 169.254.169.254 is link-local"),
            ({"kind": "redirect", "location": "file:///etc/passwd"}, "images[0]: refused URL scheme 'file'"),
            ({"kind": "redirect", "location": f"http://127.0.0.1:{other_port}/x.png"},
             "images[0]: refused: address 127.0.0.1 is loopback"),
            ({"kind": "huge_length"}, "images[0]: body exceeds 67108864 bytes (declared 10737418240)"),
        ]
        job_ids = [backend.create_jobs(prompt=f"refused {i}")[0] for i in range(len(cases))]
        backend.set_faults([{**rule, "match": file_name(backend, job_id)}
                            for job_id, (rule, _) in zip(job_ids, cases, strict=True)])
        async with running_daemon(root, backend, **FAST) as daemon:
            jobs = await wait_finished(daemon, job_ids)
            # Alive and well: a normal job submitted afterwards still materializes.
            normal = backend.generate({"capability": "icon", "prompt": "after the refusals"}).json()["jobId"]
            await wait_materialized(daemon, [normal])
        assert_never_connected(listener)
    reasons = quarantine_reasons(root)
    for job_id, (rule, reason) in zip(job_ids, cases, strict=True):
        assert jobs[job_id].status == "quarantined", rule
        assert reasons[job_id] == reason
        assert jobs[job_id].attempts == 1, "a permanent refusal is not retried"
        assert not [name for name in output_files(root) if name.startswith(job_id)]
    [path] = assert_materialized(root, backend_doc(backend, normal), "png", 1)
    assert_nothing_else_written(root, {path.name})


async def test_retry_after_is_honoured_while_other_jobs_keep_flowing(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    [throttled] = backend.create_jobs(prompt="throttled")
    backend.set_faults([{"kind": "http_error", "status": 429, "retry_after": 30,
                         "match": file_name(backend, throttled)}])
    started = time.time()
    async with running_daemon(root, backend, **{**FAST, "retry_max_seconds": 60.0}) as daemon:
        job = await async_wait_until(lambda: (j := daemon.ledger.job(throttled)) and j.attempts == 1 and j,
                                     20, what="the first throttled attempt")
        assert job.last_error == "images[0]: HTTP 429 Too Many Requests (retry after 30s)"
        # Without Retry-After the next attempt would be due within 0.075 s of the failure.
        assert job.next_attempt_at >= started + 30
        [other] = backend.create_jobs(prompt="not throttled")
        await wait_materialized(daemon, [other])
        job = daemon.ledger.job(throttled)
        assert job is not None and (job.status, job.attempts) == ("pending", 1)
    [rule] = fault_rules(backend)
    assert rule["times"] is None
    assert_materialized(root, backend_doc(backend, other), "png", 1)


async def test_a_lasting_503_is_retried_on_the_backoff_schedule_then_quarantined(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    [job_id] = backend.create_jobs(prompt="always 503")
    backend.set_faults([{"kind": "http_error", "status": 503, "times": 1000, "match": file_name(backend, job_id)}])
    async with running_daemon(root, backend, **{**FAST, "retry_base_seconds": 0.2, "max_attempts": 4}) as daemon:
        jobs = await wait_finished(daemon, [job_id])
    assert jobs[job_id].status == "quarantined"
    assert jobs[job_id].attempts == 4
    assert quarantine_reasons(root) == {job_id: "gave up after 4 attempts: images[0]: HTTP 503 Service Unavailable"}
    # Exactly one file request per attempt: no hot loop, no hidden retries.
    [rule] = fault_rules(backend)
    assert rule["times"] == 1000 - 4
    quarantined = [e for e in ledger_events(root, "materializer.state") if e.payload.get("state") == "quarantined"]
    assert [e.payload["jobId"] for e in quarantined] == [job_id]
    assert_nothing_else_written(root, set())


# -- sync and job faults -------------------------------------------------------------------------------------


def connection_states(root: Path) -> list[str]:
    return [e.payload["state"] for e in ledger_events(root, "materializer.state")
            if e.payload.get("state") in ("connected", "disconnected")]


async def test_delayed_transitions_still_deliver(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    backend.set_faults([{"kind": "delay_transitions", "ms": 300}])
    async with running_daemon(root, backend, **FAST) as daemon:
        job_id = backend.generate({"capability": "text_to_image", "prompt": "slow news"}).json()["jobId"]
        await wait_materialized(daemon, [job_id])
    assert_materialized(root, backend_doc(backend, job_id), "png", 1)


async def test_withheld_transitions_deliver_once_released(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    async with running_daemon(root, backend, **FAST) as daemon:
        await async_wait_until(lambda: "connected" in connection_states(root), 10, what="the first connection")
        backend.set_faults([{"kind": "withhold_transitions"}])
        job_id = backend.generate({"capability": "text_to_image", "prompt": "held back"}).json()["jobId"]
        assert (await asyncio.to_thread(backend.wait_for_job, job_id))["status"] == "succeeded"
        backend.clear_faults()
        await wait_materialized(daemon, [job_id])
    assert_materialized(root, backend_doc(backend, job_id), "png", 1)


async def test_refused_sync_sockets_are_retried(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    [job_id] = backend.create_jobs(prompt="waiting behind a refusal")
    backend.set_faults([{"kind": "refuse_sync", "reason": "ServiceRestarting", "times": 2}])
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, [job_id])
        assert daemon.client is not None and daemon.client.connection_attempts == 3
    assert connection_states(root)[-1] == "connected"
    assert "disconnected" in connection_states(root)
    assert fault_rules(backend)[0]["times"] == 0
    assert_materialized(root, backend_doc(backend, job_id), "png", 1)


async def test_dropped_connections_reconnect_and_keep_delivering(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    async with running_daemon(root, backend, **FAST) as daemon:
        await async_wait_until(lambda: "connected" in connection_states(root), 10, what="the first connection")
        assert backend.drop_connections() == 1
        job_id = backend.generate({"capability": "text_to_image", "prompt": "after the drop"}).json()["jobId"]
        await wait_materialized(daemon, [job_id])
    states = connection_states(root)
    assert states[states.index("connected"):] == ["connected", "disconnected", "connected"]
    assert_materialized(root, backend_doc(backend, job_id), "png", 1)


async def test_upstream_failures_are_announced_once(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    backend.set_faults([{"kind": "fail_jobs", "message": "The provider is down.", "code": "provider_down",
                         "times": 1}])
    async with running_daemon(root, backend, **FAST) as daemon:
        failed = backend.generate({"capability": "icon", "prompt": "doomed"}).json()["jobId"]
        assert (await asyncio.to_thread(backend.wait_for_job, failed))["status"] == "failed"
        succeeded = backend.generate({"capability": "icon", "prompt": "fine"}).json()["jobId"]
        await wait_materialized(daemon, [succeeded])
        await async_wait_until(lambda: ledger_events(root, "media.failed"), 10, what="the media.failed event")
        assert daemon.ledger.job(failed) is None  # a failed job is never materialized
    [event] = ledger_events(root, "media.failed")
    assert event.payload == {"jobId": failed, "capability": "icon", "status": "failed", "code": "provider_down",
                             "message": "Image generation failed", "detail": "The provider is down."}
    assert_materialized(root, backend_doc(backend, succeeded), "png", 1)


async def test_failed_feed_is_announced_once_per_job_across_restarts(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    failed = backend.create_jobs(status="failed", count=3, capability="text_to_image",
                                 message="The prompt was refused.", code="content_policy")

    def failed_events() -> dict[str, int]:
        counts: dict[str, int] = {}
        for event in ledger_events(root, "media.failed"):
            counts[event.payload["jobId"]] = counts.get(event.payload["jobId"], 0) + 1
        return counts

    async with running_daemon(root, backend, **FAST):
        await async_wait_until(lambda: set(failed) <= set(failed_events()), 10, what="three media.failed events")
    async with running_daemon(root, backend, **FAST):
        # A new failure after the restart: once it is announced, the old ones were seen again too.
        [sentinel] = backend.create_jobs(status="failed", message="Another refusal.")
        await async_wait_until(lambda: sentinel in failed_events(), 10, what="the new failure's event")
    assert failed_events() == dict.fromkeys([*failed, sentinel], 1)
    payloads = {e.payload["jobId"]: e.payload for e in ledger_events(root, "media.failed")}
    assert payloads[failed[0]]["message"] == "Image generation failed"  # the desktop's copy for image jobs
    assert (payloads[failed[0]]["code"], payloads[failed[0]]["detail"]) == ("content_policy", "The prompt was refused.")
    assert output_files(root) == []


# -- hostile job documents -------------------------------------------------------------------------------------


async def test_hostile_job_fields_are_quarantined_with_reasons_and_write_nothing(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    with idle_listener() as listener:
        other_port = listener.getsockname()[1]

        def image(url: Any) -> dict[str, Any]:
            return {"output": {"images": [{"url": url, "content_type": "image/png"}]}}

        cases: list[tuple[dict[str, Any], str]] = [
            ({"jobId": "../../etc/x"}, "job id contains the path separator '/'"),
            ({"jobId": "a/b"}, "job id contains the path separator '/'"),
            ({"jobId": "a\\b"}, "job id contains the path separator '\\\\'"),
            ({"jobId": ".."}, "job id '..' contains '..'"),
            ({"jobId": "job\x00nul"}, "job id contains a NUL character"),
            ({"jobId": "job\nline"}, "job id contains the control character U+000A"),
            ({"jobId": "j" * 500}, "job id is 500 characters long (at most 128 allowed)"),
            ({"jobId": ".hidden"}, "job id '.hidden' starts with '.'"),
            (image("file:///etc/passwd"), "images[0]: refused URL scheme 'file'"),
            (image("ftp://example.com/x.png"), "images[0]: refused URL scheme 'ftp'"),
            (image("javascript:alert(1)"), "images[0]: refused URL scheme 'javascript'"),
            (image("http://10.0.0.1/x.png"), "images[0]: refused: address 10.0.0.1 is private"),
            (image("http://[::1]:9/x.png"), "images[0]: refused: address ::1 is loopback"),
            (image(f"http://127.0.0.1:{other_port}/x.png"), "images[0]: refused: address 127.0.0.1 is loopback"),
            (image("http://user:secret@example.com/x.png"), "images[0]: refused URL with embedded credentials"),
            (image(42), "images[0]: url is a float, not a string"),  # Convex numbers are floats
            (image("data:image/png;base64,!!!!"), "images[0]: malformed base64 in data URI"),
            ({"output": None}, "job output is missing, not an object"),
            ({"output": "garbage"}, "job output is a str, not an object"),
            ({"output": {"images": []}}, "job output names no files"),
            ({"output": {"images": [{"content_type": "image/png"}]}}, "images[0]: url is missing"),
        ]
        job_ids = [backend.create_jobs(doc=doc)[0] for doc, _ in cases]
        async with running_daemon(root, backend, **FAST) as daemon:
            jobs = await wait_finished(daemon, job_ids)
            normal = backend.generate({"capability": "text_to_image", "prompt": "still here"}).json()["jobId"]
            await wait_materialized(daemon, [normal])
        assert_never_connected(listener)
    reasons = quarantine_reasons(root)
    for job_id, (doc, reason) in zip(job_ids, cases, strict=True):
        assert jobs[job_id].status == "quarantined", doc
        assert (reasons[job_id] or "").startswith(reason), (doc, reasons[job_id])
        assert jobs[job_id].attempts == 1, doc
    state_reasons = {e.payload["jobId"]: e.payload["reason"] for e in ledger_events(root, "materializer.state")
                     if e.payload.get("state") == "quarantined"}
    assert state_reasons == reasons
    [path] = assert_materialized(root, backend_doc(backend, normal), "png", 1)
    assert_nothing_else_written(root, {path.name})
    assert sorted(p.name for p in tmp_path.iterdir() if p != backend.data_dir) == ["root"]


async def test_a_job_with_one_refused_output_is_not_materialized_with_the_rest(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    [donor] = backend.create_jobs(prompt="a fine image")
    good = backend_doc(backend, donor)["output"]["images"][0]
    [mixed] = backend.create_jobs(doc={"output": {"images": [
        good, {"url": "http://10.0.0.1/x.png", "content_type": "image/png"}]}})
    async with running_daemon(root, backend, **FAST) as daemon:
        jobs = await wait_finished(daemon, [donor, mixed])
        await wait_materialized(daemon, [donor])
    assert jobs[mixed].status == "quarantined"
    assert quarantine_reasons(root) == {mixed: "images[1]: refused: address 10.0.0.1 is private"}
    assert [e.payload["jobId"] for e in ledger_events(root, "media.materialized")] == [donor]
    assert [entry["jobId"] for entry in gallery(root)["jobs"]] == [donor]
    assert not [name for name in output_files(root) if name.startswith(f"{mixed}_1")]
    assert partial_files(root) == []


async def test_documents_the_ledger_cannot_keep_are_ignored_with_a_logged_reason(
    backend: DevBackend, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    caplog.set_level(logging.WARNING, logger="materializer.daemon")
    numeric_id = backend.create_jobs(doc={"jobId": 42})[0]
    empty_id = backend.create_jobs(doc={"jobId": ""})[0]
    [infinite] = create_jobs_from_raw_json(backend, '{"doc": {"completedAt": 1e999}}')
    [failed_infinite] = create_jobs_from_raw_json(backend, '{"status": "failed", "doc": {"completedAt": 1e999}}')
    assert backend_doc(backend, infinite)["completedAt"] == {"$float": "AAAAAAAA8H8="}  # +inf on the wire
    assert (numeric_id, empty_id) == (42, "")
    async with running_daemon(root, backend, **FAST) as daemon:
        normal = backend.generate({"capability": "text_to_image", "prompt": "unbothered"}).json()["jobId"]
        await wait_materialized(daemon, [normal])
        # This backend's index drops a completedAt that is not a number; Convex sorts strings after
        # numbers, so a string would reach the daemon there: feed one in by hand.
        bogus = {"jobId": "job_bogus_time", "status": "succeeded", "completedAt": "yesterday",
                 "output": {"images": [{"url": f"{backend.url}/files/x.png"}]}}
        assert await daemon.observe([bogus]) == []
        # Both feeds are still alive.
        [later] = backend.create_jobs(prompt="after the unusable documents")
        [later_failure] = backend.create_jobs(status="failed")
        await wait_materialized(daemon, [later])
        await async_wait_until(lambda: ledger_events(root, "media.failed"), 10, what="the later failure's event")
        with Ledger(default_layout(root).ledger) as ledger:
            status = ledger.status()
            assert status.counts == {"pending": 0, "materialized": 2, "quarantined": 0}
            assert all(c is not None and math.isfinite(c) and c <= time.time() * 1000 for c in status.cursors.values())
    ignored = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ignoring a ")]
    assert any("has no jobId string (got float)" in message for message in ignored)
    assert any("has no jobId string (got str)" in message for message in ignored)
    assert any(f"job '{infinite}': completedAt must be a finite number" in message for message in ignored)
    assert any("job 'job_bogus_time': completedAt must be a finite number, got str" in message for message in ignored)
    assert any(f"failed-job document the ledger cannot keep: job '{failed_infinite}' is not plain JSON" in message
               for message in ignored)
    assert [e.payload["jobId"] for e in ledger_events(root, "media.failed")] == [later_failure]
    names = {p.name for d in (normal, later) for p in assert_materialized(root, backend_doc(backend, d), "png", 1)}
    assert_nothing_else_written(root, names)


async def test_a_far_future_completed_at_does_not_stall_the_feed(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    far_future = time.time() * 1000 + 1000 * 86400 * 365 * 1000  # a thousand years from now
    [future] = backend.create_jobs(doc={"completedAt": far_future}, prompt="from the future")
    [future_failure] = backend.create_jobs(status="failed", doc={"completedAt": far_future})
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, [future])
        await async_wait_until(lambda: ledger_events(root, "media.failed"), 10, what="the failed job's event")
        # Jobs completing now must still be delivered: the cursors may not jump to the future job.
        [now] = backend.create_jobs(prompt="completed now")
        [now_failure] = backend.create_jobs(status="failed")
        await wait_materialized(daemon, [now])
        await async_wait_until(lambda: len(ledger_events(root, "media.failed")) == 2, 10,
                               what="the second failed job's event")
        cursors = daemon.ledger.status().cursors
        assert all(cursor is not None and cursor <= time.time() * 1000 for cursor in cursors.values())
    assert {e.payload["jobId"] for e in ledger_events(root, "media.failed")} == {future_failure, now_failure}
    for job_id in (future, now):
        assert_materialized(root, backend_doc(backend, job_id), "png", 1)


async def test_a_job_leased_again_while_its_attempt_finishes_is_tried_once_that_attempt_ends(
        backend: DevBackend, tmp_path: Path) -> None:
    """Files that vanish right after their commit make the job due again while its attempt is still ending;
    a claim then leases it to this daemon, which must not leave it leased and idle until the lease lapses
    (found by the chaos case outputs-churned-during-a-burst: three jobs idle for the 120 s of a lease)."""
    root = tmp_path / "root"
    [job_id] = backend.create_jobs(count=1)
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, [job_id])
        finishing = asyncio.Event()
        attempt = asyncio.create_task(finishing.wait())  # its attempt, not over yet, as Materializer._start keeps it
        daemon._in_flight[job_id] = attempt  # type: ignore[assignment]
        attempt.add_done_callback(functools.partial(daemon._job_done, job_id))
        (default_layout(root).outputs / f"{job_id}_0.png").unlink()
        assert await daemon.work.check_files([(job_id, daemon.ledger.outputs(job_id))], hashes=False) == [job_id]
        daemon._work.set()  # the scheduler leases the job, due again, while its attempt is in flight
        await async_wait_until(lambda: (job := daemon.ledger.job(job_id)) is not None
                               and job.lease_owner == daemon.owner, what="the job leased again")
        finishing.set()  # that attempt ends: the job is tried again, at once
        await wait_materialized(daemon, [job_id], timeout=10.0)
    assert (default_layout(root).outputs / f"{job_id}_0.png").is_file()
    assert len(ledger_events(root, "media.materialized")) == 1  # materialized again, announced once
