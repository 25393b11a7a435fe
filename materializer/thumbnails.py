"""Thumbnails: one small WebP per image output, ``<outputs>/.thumbs/<jobId>_<index>.webp``.

Why: a gallery (the desktop's sidebar, ``materializer gallery``) should not decode a
full-size file to draw a tile. Each thumbnail keeps the image's aspect with its longest
edge :data:`THUMBNAIL_EDGE` pixels (smaller images keep their size), has the EXIF
orientation applied (``PIL.ImageOps.exif_transpose``), and shows the first frame of an
animation.

They are derived data, so nothing here may hold a job back or fail it:

- the pipeline makes a thumbnail from the first frame validation has just decoded
  (:class:`FirstFrame`, the ``on_first_frame`` hook of
  :func:`materializer.images.validate_image`): no second decode, only a box-filter
  reduction and a fast WebP encode, on a thread of its own while the image's file
  commits (:meth:`Thumbnails.save_soon`: the encode overlaps the commit's fsyncs), and
  the job is announced once both are in place (``bench/thumbnails.py`` measures the
  cost per job);
- a thumbnail that cannot be made is logged and left out (the sidebar payload and
  ``gallery.json`` list only thumbnails that exist), and :meth:`Thumbnails.repair`
  rebuilds missing or broken ones from the file later (the daemon at start and whenever
  its gallery writer finds one missing; ``replay`` for the jobs it covers);
- rebuilding decodes the file's first frame only, under the configured image limits
  (:func:`materializer.images.open_first_frame`; a JPEG at a reduced DCT scale) and within the
  memory budget: a first frame that would take more is not decoded, and gets no thumbnail (the
  daemon reserves :meth:`Thumbnails.rebuild_memory` of its budget before each rebuild);
- they are committed like every other file (:class:`materializer.store.OutputStore`:
  temporary file, rename; a symlink at ``.thumbs`` is refused) but without its two fsyncs:
  a reader sees a whole thumbnail or none, and one that a power loss left missing, empty
  or short is what :meth:`Thumbnails.is_sound` finds broken when the daemon starts (the
  gallery's jobs: the newest, so the ones written just before the loss) and rebuilds. The
  fsyncs cost more than the encode and would wait on the journal beside the image's own;
- they count against nothing the user configured.

Methods block (decoding, encoding, fsync): call them in a worker thread. Safe from
several threads at once.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps

from materializer.images import ImageLimits, ImageRejected, first_frame_memory, open_first_frame, probe_image
from materializer.layout import THUMBNAILS_DIR
from materializer.ledger import OutputFile
from materializer.store import OutputStore, StorageError

__all__ = ["THUMBNAIL_EDGE", "FirstFrame", "Thumbnails", "fit", "is_image", "shrink", "thumbnail_name"]

log = logging.getLogger(__name__)

#: The longest edge of a thumbnail, in pixels.
THUMBNAIL_EDGE = 256
#: WebP quality, and libwebp's effort (0 = fastest: about a third of the default's time at this
#: size, for files a few hundred bytes larger).
THUMBNAIL_QUALITY = 80
THUMBNAIL_METHOD = 0
#: A thumbnail file is a few KB; anything much larger is not one of ours.
_MAX_THUMBNAIL_BYTES = 1 << 20
#: Modes Pillow's ``reduce`` takes.
_REDUCIBLE_MODES = frozenset({"L", "LA", "RGB", "RGBA"})
#: The image metadata that carries an orientation (``exif_transpose`` reads EXIF, then XMP).
_ORIENTATION_KEYS = ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp")


def thumbnail_name(file_name: str) -> str:
    """``<jobId>_<index>.webp`` for an output file named ``<jobId>_<index>.<ext>``."""
    return f"{file_name.rsplit('.', 1)[0]}.webp"


def is_image(file: OutputFile) -> bool:
    """Whether an output is a validated image (the only files that get thumbnails)."""
    return file.mime_type.startswith("image/")


def fit(width: int, height: int) -> tuple[int, int]:
    """The size of the thumbnail of a ``width`` x ``height`` image: aspect kept, longest edge at most 256."""
    longest = max(width, height)
    if longest <= THUMBNAIL_EDGE:
        return width, height
    scale = THUMBNAIL_EDGE / longest
    return max(1, round(width * scale)), max(1, round(height * scale))


def shrink(image: Image.Image) -> Image.Image:
    """A decoded frame as its thumbnail's pixels: RGB or RGBA, fitted, turned upright by its EXIF orientation.

    Reduces by the largest whole factor first (a box filter, cheap at any size), then resamples
    the rest of the way; ``image`` is left as it was.
    """
    has_alpha = "A" in image.getbands() or "transparency" in image.info
    mode = "RGBA" if has_alpha else "RGB"
    target = fit(*image.size)
    # Reduce before converting where the mode allows it (a palette does not): converting fewer pixels.
    small = image if image.mode in _REDUCIBLE_MODES and "transparency" not in image.info else image.convert(mode)
    factor = min(small.width // target[0], small.height // target[1])
    if factor >= 2:
        small = small.reduce(factor)
    if small.mode != mode:
        small = small.convert(mode)
    if small.size != target:
        small = small.resize(target, Image.Resampling.BICUBIC)
    if small is image:
        small = image.copy()
    small.info = {key: image.info[key] for key in _ORIENTATION_KEYS if key in image.info}
    ImageOps.exif_transpose(small, in_place=True)
    small.info = {}
    return small


def _encode(small: Image.Image) -> bytes:
    buffer = io.BytesIO()
    small.save(buffer, "WEBP", quality=THUMBNAIL_QUALITY, method=THUMBNAIL_METHOD)
    return buffer.getvalue()


class FirstFrame:
    """The ``on_first_frame`` hook of ``validate_image``: keeps the shrunk first frame, or why there is none.

    Never raises (an exception would make validation refuse a good image).
    """

    def __init__(self) -> None:
        self.small: Image.Image | None = None
        self.error: str | None = None

    def __call__(self, image: Image.Image) -> None:
        try:
            self.small = shrink(image)
        except Exception as exc:  # a thumbnail problem is never the image's problem
            self.error = f"{type(exc).__name__}: {exc}"


class Thumbnails:
    """The thumbnails of one outputs folder, in ``folder`` (``<outputs>/.thumbs``).

    ``limits`` bound the decoding of a file when a thumbnail is rebuilt from it (the image
    limits of the configuration; may be replaced while running), and so does
    ``max_decode_bytes`` (the memory budget: ``None``, none). ``workers`` threads make
    the thumbnails handed to :meth:`save_soon` (one per download slot).
    """

    def __init__(self, folder: Path, limits: ImageLimits, workers: int = 4, *,
                 max_decode_bytes: int | None = None) -> None:
        self.folder = Path(folder)
        self._folder_name = str(self.folder)
        self.outputs = self.folder.parent
        self.limits = limits
        self.max_decode_bytes = max_decode_bytes
        self._store: OutputStore | None = None
        self._lock = threading.Lock()
        self._failing = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumbnails")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    # -- making --------------------------------------------------------------------------------

    def save(self, file_name: str, frame: FirstFrame) -> bool:
        """Commit the thumbnail of ``file_name`` from the frame validation handed over; False (logged) if not made."""
        if frame.small is None:
            self._note_failure(file_name, frame.error or "no frame was decoded")
            return False
        return self._commit(file_name, frame.small)

    def save_soon(self, file_name: str, frame: FirstFrame) -> Future[bool]:
        """:meth:`save` on a thread of this object's own (a caller may wait for it from any thread)."""
        return self._pool.submit(self.save, file_name, frame)

    def rebuild(self, file_name: str) -> bool:
        """Make the thumbnail of ``<outputs>/file_name`` again from the file; False (logged) if it cannot be."""
        try:
            fd = os.open(self.outputs / file_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            self._note_failure(file_name, f"cannot open the file ({exc.strerror or exc})")
            return False
        try:
            with open(fd, "rb") as source:
                if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                    self._note_failure(file_name, "not a regular file")
                    return False
                with open_first_frame(source, self.limits, draft_edge=THUMBNAIL_EDGE,
                                      max_decode_bytes=self.max_decode_bytes) as image:
                    small = shrink(image)
        except ImageRejected as exc:
            self._note_failure(file_name, str(exc))
            return False
        except Exception as exc:  # derived data: whatever went wrong, the daemon goes on
            self._note_failure(file_name, f"{type(exc).__name__}: {exc}")
            return False
        return self._commit(file_name, small)

    def rebuild_memory(self, file_name: str) -> int:
        """What :meth:`rebuild` holds in memory for ``<outputs>/file_name``: the file and its first frame."""
        try:
            fd = os.open(self.outputs / file_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return 0
        with open(fd, "rb") as source:
            if not stat.S_ISREG(os.fstat(source.fileno()).st_mode):
                return 0
            return first_frame_memory(source, self.limits, THUMBNAIL_EDGE, self.max_decode_bytes)

    def _commit(self, file_name: str, small: Image.Image) -> bool:
        name = thumbnail_name(file_name)
        try:
            data = _encode(small)
            store = self._open_store()
            with store.temp_file(name) as partial:
                partial.write(data)
                store.commit(partial, name, durable=False)  # derived: checked at start, made again
        except (StorageError, OSError, ValueError) as exc:
            self._note_failure(file_name, str(exc))
            return False
        self._failing = False
        return True

    def _open_store(self) -> OutputStore:
        with self._lock:
            if self._store is None:
                self._store = OutputStore(self.folder)  # creates it 0700; refuses a symlink or another owner's
            return self._store

    def _note_failure(self, file_name: str, reason: str) -> None:
        # One warning while thumbnails keep failing (a read-only folder must not flood the log).
        level = logging.DEBUG if self._failing else logging.WARNING
        self._failing = True
        log.log(level, "no thumbnail for %s: %s", file_name.encode("unicode_escape").decode("ascii")[:200],
                reason[:300])

    # -- reading -------------------------------------------------------------------------------

    def path_of(self, file_name: str) -> str | None:
        """The thumbnail of ``file_name`` relative to the outputs folder (``.thumbs/<name>.webp``), if it exists."""
        name = thumbnail_name(file_name)
        try:
            info = os.stat(os.path.join(self._folder_name, name), follow_symlinks=False)  # a str: 2/3 of a Path's time
        except OSError:
            return None
        return f"{THUMBNAILS_DIR}/{name}" if stat.S_ISREG(info.st_mode) and info.st_size > 0 else None

    def is_sound(self, file_name: str) -> bool:
        """Whether the thumbnail of ``file_name`` exists and is one: a whole one-frame WebP within the edge.

        Reads the container structure only (no pixels): cheap enough for every thumbnail at start-up.
        """
        try:
            fd = os.open(self.folder / thumbnail_name(file_name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK
                         | os.O_CLOEXEC)
        except OSError:
            return False
        with open(fd, "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                return False
            data = file.read(_MAX_THUMBNAIL_BYTES + 1)
        try:
            image_format, width, height, frames = probe_image(data)
        except ImageRejected:
            return False
        return (len(data) <= _MAX_THUMBNAIL_BYTES and image_format == "webp" and frames == 1
                and max(width, height) <= THUMBNAIL_EDGE)

    # -- keeping -------------------------------------------------------------------------------

    def needing_repair(self, files: Iterable[OutputFile]) -> list[OutputFile]:
        """The images among ``files`` whose thumbnail is missing or broken."""
        return [file for file in files if is_image(file) and not self.is_sound(file.path)]

    def repair(self, files: Iterable[OutputFile]) -> int:
        """Rebuild the thumbnails of ``files`` that are missing or broken; return how many were made."""
        return sum(self.rebuild(file.path) for file in self.needing_repair(files))

    def cleanup_stale_partials(self, older_than_seconds: float) -> int:
        """Remove temporary thumbnail files left by a crash (see :meth:`OutputStore.cleanup_stale_partials`)."""
        if not self.folder.is_dir():
            return 0
        try:
            return self._open_store().cleanup_stale_partials(older_than_seconds)
        except StorageError as exc:
            log.warning("cannot clean up the thumbnails folder: %s", exc)
            return 0
