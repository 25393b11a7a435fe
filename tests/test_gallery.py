"""The gallery manifest's bytes, and what its writer keeps between rewrites (plain data, no daemon)."""

from __future__ import annotations

import json

from materializer.gallery import MANIFEST_VERSION, THUMBNAIL_RECHECK_SECONDS, GalleryManifest, render_manifest
from materializer.ledger import GalleryEntry, GalleryHead, OutputFile


def entry(job_id: str, materialized_at: float, files: int = 1, prompt: str | None = "a prompt") -> GalleryEntry:
    return GalleryEntry(job_id, "text_to_image", "best", prompt, 1_000.0 + materialized_at, materialized_at,
                        [OutputFile(i, f"{job_id}_{i}.png", "image/png", 64, 32, 100 + i, f"{i:064x}")
                         for i in reversed(range(files))])


def head(e: GalleryEntry) -> GalleryHead:
    return GalleryHead(e.job_id, e.materialized_at)


def whole(entries: list[GalleryEntry], generated_at_ms: float, thumbnails: dict[str, str]) -> bytes:
    """The manifest as one json.dumps of the whole object: what the reused fragments must add up to."""
    jobs = [{
        "jobId": e.job_id, "capability": e.capability, "profile": e.profile, "prompt": e.prompt,
        "completedAt": e.completed_at_ms, "materializedAt": round(e.materialized_at * 1000, 3),
        "files": [{"index": f.index, "path": f.path, "mimeType": f.mime_type, "width": f.width, "height": f.height,
                   "bytes": f.size_bytes, "sha256": f.sha256, "thumbnail": thumbnails.get(f.path)}
                  for f in sorted(e.files, key=lambda f: f.index)],
    } for e in entries]
    return (json.dumps({"version": MANIFEST_VERSION, "generatedAt": generated_at_ms, "jobs": jobs},
                       ensure_ascii=False) + "\n").encode()


def test_the_manifest_is_exactly_the_json_of_the_whole() -> None:
    entries = [entry("job_b", 2.5, files=3, prompt="caf\u00e9 \u2603 \"quoted\""), entry("job_a", 1.0, prompt=None)]
    thumbnails = {"job_b_1.png": ".thumbs/job_b_1.webp"}
    assert render_manifest(entries, 1234.5, thumbnails) == whole(entries, 1234.5, thumbnails)
    assert render_manifest([], 7.0) == whole([], 7.0, {})
    assert json.loads(render_manifest(entries, 1.0))["jobs"][0]["files"][0]["index"] == 0  # files by index


def test_a_rewrite_reads_and_renders_only_what_changed() -> None:
    manifest = GalleryManifest()
    a, b = entry("job_a", 1.0), entry("job_b", 2.0)
    assert manifest.known() == frozenset()
    assert manifest.update([head(b), head(a)], {head(a): a, head(b): b}) == [b, a]
    assert manifest.known() == {head(a), head(b)}
    first = manifest.render([b, a], 10.0, {})
    assert first == whole([b, a], 10.0, {})

    # The next answer names the known heads without their entries (the ledger did not read them).
    c = entry("job_c", 3.0)
    entries = manifest.update([head(c), head(b), head(a)], {head(c): c})
    assert entries == [c, b, a]
    thumbnails = {"job_a_0.png": ".thumbs/job_a_0.webp"}  # a thumbnail made since: job_a rendered again
    assert manifest.render(entries, 11.0, thumbnails) == whole(entries, 11.0, thumbnails)
    assert manifest.render(entries, 12.0, {}) == whole(entries, 12.0, {})  # and gone again

    # job_b materialized again (new files, a new head); job_a no longer among the newest: forgotten.
    b2 = entry("job_b", 4.0, files=2)
    entries = manifest.update([head(b2), head(c)], {head(b2): b2})
    assert entries == [b2, c]
    assert manifest.known() == {head(b2), head(c)}
    assert manifest.render(entries, 13.0, {}) == whole([b2, c], 13.0, {})


def test_thumbnails_found_are_looked_up_again_only_after_the_recheck_interval() -> None:
    manifest = GalleryManifest()
    a, b = entry("job_a", 1.0, files=2), entry("job_b", 2.0)
    images = [*a.files, *b.files]
    on_disk = {"job_a_0.png": ".thumbs/job_a_0.webp", "job_b_0.png": ".thumbs/job_b_0.webp"}
    asked: list[str] = []

    def look_up(path: str) -> str | None:
        asked.append(path)
        return on_disk.get(path)

    assert manifest.thumbnails(images, look_up, now=100.0) == on_disk
    assert sorted(asked) == sorted(f.path for f in images)  # the first rewrite looks every one up

    asked.clear()
    on_disk["job_a_1.png"] = ".thumbs/job_a_1.webp"  # rebuilt since
    del on_disk["job_b_0.png"]  # removed behind the daemon's back
    found = manifest.thumbnails(images, look_up, now=100.0 + THUMBNAIL_RECHECK_SECONDS - 1)
    assert asked == ["job_a_1.png"]  # only the one that had none
    assert found == {"job_a_0.png": ".thumbs/job_a_0.webp", "job_a_1.png": ".thumbs/job_a_1.webp",
                     "job_b_0.png": ".thumbs/job_b_0.webp"}  # the removed one: listed until the recheck

    asked.clear()
    found = manifest.thumbnails(images, look_up, now=100.0 + THUMBNAIL_RECHECK_SECONDS)
    assert sorted(asked) == sorted(f.path for f in images)
    assert found == on_disk

    asked.clear()
    c = entry("job_c", 3.0)  # a new job's image: looked up at once
    assert manifest.thumbnails([*images, *c.files], look_up, now=100.0 + THUMBNAIL_RECHECK_SECONDS + 1) == on_disk
    assert asked == ["job_b_0.png", "job_c_0.png"]
