"""The gallery manifest: ``<outputs>/gallery.json``, the newest N materialized jobs, newest first.

Other programs (the sidebar, scripts) read it instead of the ledger, so its
shape is a contract: a ``version`` field, then one entry per job with the
files that belong to it. It is rebuilt from the ledger's indexed newest-N
query and replaced atomically, so its cost does not grow with history.

A running daemon rewrites it a few times a second while jobs arrive.
:class:`GalleryManifest` keeps, between rewrites, the entries it read and each
one's rendered JSON, so a rewrite reads and renders only the jobs that are new
or changed since the last one (:meth:`materializer.ledger.Ledger.gallery_changes`):
for a thousand jobs, the ledger's thread is busy for the heads alone instead of
every entry and file, and the rewrite's CPU is a join instead of a render.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from materializer.ledger import GalleryEntry, GalleryHead, OutputFile

__all__ = ["MANIFEST_NAME", "MANIFEST_VERSION", "THUMBNAIL_RECHECK_SECONDS", "GalleryManifest", "render_manifest"]

MANIFEST_NAME = "gallery.json"
MANIFEST_VERSION = 1


def _entry(entry: GalleryEntry, thumbnails: Mapping[str, str]) -> dict[str, Any]:
    return {
        "jobId": entry.job_id,
        "capability": entry.capability,
        "profile": entry.profile,
        "prompt": entry.prompt,
        "completedAt": entry.completed_at_ms,
        "materializedAt": round(entry.materialized_at * 1000, 3),
        "files": [
            {
                "index": f.index,
                "path": f.path,
                "mimeType": f.mime_type,
                "width": f.width,
                "height": f.height,
                "bytes": f.size_bytes,
                "sha256": f.sha256,
                "thumbnail": thumbnails.get(f.path),
            }
            for f in sorted(entry.files, key=lambda f: f.index)
        ],
    }


def render_manifest(entries: Sequence[GalleryEntry], generated_at_ms: float,
                    thumbnails: Mapping[str, str] | None = None) -> bytes:
    """The manifest's bytes for ``entries`` (already newest first).

    ``thumbnails`` maps a file's path to its thumbnail's (both relative to outputs), for the files
    that have one; every other file's ``thumbnail`` is null.
    """
    return GalleryManifest().render(entries, generated_at_ms, thumbnails or {})


#: An entry's rendered JSON is kept under its head and its files' thumbnails (which come and go).
_RenderKey = tuple[GalleryHead, tuple[str | None, ...]]
#: How long a thumbnail found in place is taken to be there still before it is looked up again. Those
#: not found are looked up at every rewrite (a rebuilt one is listed at the next); one removed behind
#: the daemon's back is listed until then at most (and rebuilt once noticed), as when no job comes.
THUMBNAIL_RECHECK_SECONDS = 30.0


class GalleryManifest:
    """gallery.json as its writer keeps it between rewrites: the entries read, and each one rendered.

    Not thread-safe: one rewrite at a time (the writer's own task, and its worker thread).
    """

    def __init__(self) -> None:
        self._entries: dict[GalleryHead, GalleryEntry] = {}
        self._rendered: dict[_RenderKey, str] = {}
        self._thumbnails: dict[str, str] = {}
        self._thumbnails_checked_at = float("-inf")

    def known(self) -> frozenset[GalleryHead]:
        """The heads whose entries this manifest holds (what the ledger need not read again)."""
        return frozenset(self._entries)

    def update(self, heads: Sequence[GalleryHead], read: Mapping[GalleryHead, GalleryEntry]) -> list[GalleryEntry]:
        """Take the ledger's answer (:meth:`~materializer.ledger.Ledger.gallery_changes` given :meth:`known`):
        the gallery's entries, newest first. Entries no longer among ``heads`` are forgotten."""
        self._entries = {head: self._entries[head] if head in self._entries else read[head] for head in heads}
        return list(self._entries.values())

    def thumbnails(self, images: Iterable[OutputFile], look_up: Callable[[str], str | None],
                   now: float) -> dict[str, str]:
        """The thumbnails of ``images`` (file path -> thumbnail path, for those that have one).

        ``look_up`` finds one on disk (:meth:`materializer.thumbnails.Thumbnails.path_of`: a
        ``stat``, a thousand per rewrite of a full gallery otherwise); it is asked only for the
        images without a thumbnail at the last rewrite, and for every image once
        :data:`THUMBNAIL_RECHECK_SECONDS` have passed since it last was (``now``: a monotonic clock).
        """
        recheck = now - self._thumbnails_checked_at >= THUMBNAIL_RECHECK_SECONDS
        if recheck:
            self._thumbnails_checked_at = now
        known = {} if recheck else self._thumbnails
        found: dict[str, str] = {}
        for image in images:
            thumbnail = known.get(image.path) or look_up(image.path)
            if thumbnail is not None:
                found[image.path] = thumbnail
        self._thumbnails = found
        return found

    def render(self, entries: Sequence[GalleryEntry], generated_at_ms: float, thumbnails: Mapping[str, str]) -> bytes:
        """The manifest's bytes, exactly ``json.dumps`` of the whole (no ``indent``: json's pure-Python
        encoder takes three times the C one); an entry rendered for an earlier rewrite is reused."""
        rendered: dict[_RenderKey, str] = {}
        for entry in entries:
            key = (GalleryHead(entry.job_id, entry.materialized_at), tuple(thumbnails.get(f.path) for f in entry.files))
            text = self._rendered.get(key)
            rendered[key] = text if text is not None else json.dumps(_entry(entry, thumbnails), ensure_ascii=False)
        self._rendered = rendered
        head = json.dumps({"version": MANIFEST_VERSION, "generatedAt": generated_at_ms}, ensure_ascii=False)
        return f'{head[:-1]}, "jobs": [{", ".join(rendered.values())}]}}\n'.encode()
