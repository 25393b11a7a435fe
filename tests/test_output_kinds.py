"""Every output kind through the real pipeline: the local backend serves the files, the daemon names them.

Jobs are inserted through the backend's ``/_dev/jobs`` with the output
documents of the wider media API (video, audio, music, 3D, downloads, text),
their files written to the backend's ``files/`` folder. Each test checks what
the sidebar gets (against the desktop's validator, see ``test_payloads.py``),
what lands on disk, and what the ledger and gallery record.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from test_daemon_pipeline import FAST, backend_doc, quarantine_reasons, small_png, wait_finished, wait_materialized
from test_media_files import HTML, glb_file, iso_file, mp3_frames, wav_file
from test_payloads import desktop_accepts, matches_media_type, over_the_socket

from stella_devbackend.control import DevBackend

from helpers import gallery, ledger_events, output_files, partial_files, running_daemon

ZIP = b"PK\x03\x04\x14\x00\x00\x00\x00\x00" + bytes(20)
OBJ = b"# a triangle\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"


def serve(backend: DevBackend, name: str, data: bytes) -> str:
    """Put a file where the backend serves it (``/files/<name>``); return its URL."""
    folder = backend.data_dir / "files"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
    return f"{backend.url}/files/{name}"


def insert(backend: DevBackend, capability: str, output: Any, prompt: str = "a test prompt") -> str:
    [job_id] = backend.create_jobs(capability=capability, prompt=prompt, width=8, height=8,
                                   doc={"output": output, "request": {"prompt": prompt}})
    return job_id


def announcement(root: Path, job_id: str) -> dict[str, Any]:
    [event] = [e for e in ledger_events(root, "media.materialized") if e.payload["jobId"] == job_id]
    return event.payload


def thumbnail_of(path: str) -> str:
    """Where the thumbnail of an image output lives: ``<outputs>/.thumbs/<jobId>_<index>.webp``."""
    folder, name = path.rsplit("/", 1)
    return f"{folder}/.thumbs/{name.rsplit('.', 1)[0]}.webp"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_every_output_kind_is_materialized_and_announced_as_the_desktop_shows_it(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    png, mp4, wav, mp3, glb = small_png(16, 12), iso_file(b"isom", b"mp41"), wav_file(), mp3_frames(), glb_file()
    # (capability, output, the files expected in index order as (ext, bytes), the asset given the files' paths)
    cases: list[tuple[str, Any, list[tuple[str, bytes]], Callable[[list[str]], dict[str, Any]]]] = [
        ("text_to_video", {"video": {"url": serve(backend, "clip", mp4), "content_type": "video/mp4"}},
         [("mp4", mp4)], lambda paths: {"kind": "video", "filePath": paths[0]}),
        ("text_to_speech", {"audio_file": {"url": serve(backend, "speech", wav)}},
         [("wav", wav)], lambda paths: {"kind": "audio", "filePath": paths[0]}),
        ("text_to_music", {"audio": {"url": serve(backend, "song", mp3), "mimeType": "audio/mpeg"},
                           "promptLabel": "Night drive", "textParts": ["[Verse]", "Neon on the river"]},
         [("mp3", mp3), ("txt", b"[Verse]\n\nNeon on the river")],
         lambda paths: {"kind": "audio", "filePath": paths[0]}),
        ("text_to_3d", {"model_mesh": {"url": serve(backend, "mesh", glb), "file_size": len(glb)}},
         [("glb", glb)], lambda paths: {"kind": "model3d", "filePath": paths[0], "label": "Download 3D model"}),
        ("image_to_3d", {"model_mesh": {"url": serve(backend, "mesh.obj", OBJ)}},
         [("obj", OBJ)], lambda paths: {"kind": "model3d", "filePath": paths[0], "label": "Download 3D model"}),
        ("export", {"seed": 7, "result": {"url": serve(backend, "bundle", ZIP), "content_type": "application/zip"}},
         [("bin", ZIP)], lambda paths: {"kind": "download", "filePath": paths[0], "label": "Download result"}),
        ("caption", {"text": "Rain on tin roofs,\nthe harbour hums."},
         [("txt", b"Rain on tin roofs,\nthe harbour hums.")],
         lambda _: {"kind": "text", "text": "Rain on tin roofs,\nthe harbour hums."}),
        ("text_to_image", {"images": [{"url": serve(backend, "still", png), "content_type": "image/png"}],
                           "video": {"url": serve(backend, "preview", mp4)}},
         [("png", png), ("mp4", mp4)],
         lambda paths: {"kind": "image", "filePaths": paths[:1], "thumbnailPaths": [thumbnail_of(paths[0])]}),
    ]
    job_ids = [insert(backend, capability, output, prompt=f"{capability} prompt") for capability, output, _, _ in cases]
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, job_ids)
        folder = daemon.work.materializer.outputs_base
        jobs = {job_id: daemon.ledger.job(job_id) for job_id in job_ids}
    entries = {entry["jobId"]: entry for entry in gallery(root)["jobs"]}
    for job_id, (capability, _, files, asset) in zip(job_ids, cases, strict=True):
        names = [f"{job_id}_{index}.{ext}" for index, (ext, _) in enumerate(files)]
        assert [name for name in output_files(root) if name.startswith(f"{job_id}_")] == names
        assert [(folder / name).read_bytes() for name in names] == [data for _, data in files]
        payload = over_the_socket(announcement(root, job_id))
        doc = backend_doc(backend, job_id)
        expected = asset([str(folder / name) for name in names])
        assert payload == {"kind": "media", "asset": expected, "jobId": job_id, "capability": capability,
                           "prompt": f"{capability} prompt", "createdAt": doc["completedAt"]}
        assert desktop_accepts(payload) and matches_media_type(payload), payload
        assert [(f["path"], f["bytes"], f["sha256"]) for f in entries[job_id]["files"]] == [
            (name, len(data), sha256(data)) for name, (_, data) in zip(names, files, strict=True)]
        job = jobs[job_id]
        assert job is not None and (job.attempts, job.last_error) == (0, None)
    mime_types = {f["path"].rsplit(".", 1)[1]: f["mimeType"] for entry in entries.values() for f in entry["files"]}
    assert mime_types == {"mp4": "video/mp4", "wav": "audio/wav", "mp3": "audio/mpeg", "txt": "text/plain",
                          "glb": "model/gltf-binary", "obj": "model/obj", "bin": "application/octet-stream",
                          "png": "image/png"}
    assert partial_files(root) == []


async def test_extra_files_that_fail_are_recorded_and_do_not_hold_back_the_asset(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    png = small_png(20, 10)
    output = {
        "images": [{"url": serve(backend, "keeper", png), "content_type": "image/png"}],
        "audio": {"url": serve(backend, "voice.mp3", HTML)},  # a CDN error page where audio should be
        "thumbnail": {"url": "[data-uri omitted]"},  # what the real backend stores instead of a data URI
        "video": {"url": f"{backend.url}/files/gone"},  # 404
        "zip": {"url": serve(backend, "empty-extra", b"")},  # empty, but it never claimed to be media: kept
    }
    job_id = insert(backend, "text_to_image", output, prompt="keep what you can")
    async with running_daemon(root, backend, **FAST) as daemon:
        await wait_materialized(daemon, [job_id])
        job = daemon.ledger.job(job_id)
        folder = daemon.work.materializer.outputs_base
    assert job is not None and (job.status, job.attempts) == ("materialized", 0)  # announced at the first attempt
    assert job.last_error == (
        "materialized without 3 extra output(s): "
        "audio: bytes are HTML, not media (an audio output); "
        "thumbnail: the backend omitted this output's data ([data-uri omitted]); it cannot be fetched; "
        "video: HTTP 404 Not Found"
    )
    payload = over_the_socket(announcement(root, job_id))
    assert payload["asset"] == {"kind": "image", "filePaths": [str(folder / f"{job_id}_0.png")],
                                "thumbnailPaths": [str(folder / ".thumbs" / f"{job_id}_0.webp")]}
    assert desktop_accepts(payload) and matches_media_type(payload)
    assert [name for name in output_files(root) if name.startswith(job_id)] == [f"{job_id}_0.png", f"{job_id}_4.bin"]
    [entry] = [e for e in gallery(root)["jobs"] if e["jobId"] == job_id]
    assert [f["path"] for f in entry["files"]] == [f"{job_id}_0.png", f"{job_id}_4.bin"]
    assert partial_files(root) == []


async def test_an_asset_whose_data_the_backend_omitted_is_quarantined_at_once_with_the_reason(
    backend: DevBackend, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    omitted = insert(backend, "text_to_image", {"images": [{"url": "[data-uri omitted]", "content_type": "image/png"}]})
    music = insert(backend, "text_to_music", {"audio": {"url": "[data-uri omitted]", "mimeType": "audio/wav"},
                                              "textParts": ["la"]})
    async with running_daemon(root, backend, **FAST) as daemon:
        jobs = await wait_finished(daemon, [omitted, music])
    assert {job_id: (job.status, job.attempts) for job_id, job in jobs.items()} == {
        omitted: ("quarantined", 1), music: ("quarantined", 1)}  # permanent: never retried
    assert quarantine_reasons(root) == {
        omitted: "images[0]: the backend omitted this output's data ([data-uri omitted]); it cannot be fetched",
        music: "audio: the backend omitted this output's data ([data-uri omitted]); it cannot be fetched",
    }
    assert ledger_events(root, "media.materialized") == []
    assert output_files(root) == []


async def test_a_video_that_is_an_error_page_is_retried_then_quarantined(backend: DevBackend, tmp_path: Path) -> None:
    root = tmp_path / "root"
    job_id = insert(backend, "text_to_video", {"video": {"url": serve(backend, "clip", HTML),
                                                         "content_type": "video/mp4"}})
    async with running_daemon(root, backend, **{**FAST, "max_attempts": 3}) as daemon:
        jobs = await wait_finished(daemon, [job_id])
    assert (jobs[job_id].status, jobs[job_id].attempts) == ("quarantined", 3)
    assert quarantine_reasons(root) == {
        job_id: "gave up after 3 attempts: video: bytes are HTML, not media (declared video/mp4)"}
    assert output_files(root) == []
    assert partial_files(root) == []
