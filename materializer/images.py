"""Decide whether downloaded bytes are an image we keep, and what kind.

:func:`validate_image` is the gate between a download and the outputs folder.
The bytes alone decide: the URL and the declared content type are never
consulted. In order, it

1. maps the file (at most ``max_file_bytes``) to sniff, walk and hash it, and
   has Pillow decode it from the file a block at a time afterwards, so its
   bytes and its pixels are never held at once (the file is the process's
   own: the bytes checked and hashed are the bytes decoded);
2. sniffs the real format from magic bytes (PNG, JPEG, WebP, GIF; anything
   else is refused saying what it is, e.g. "bytes are HTML, not a PNG, JPEG,
   WebP or GIF image");
3. walks the container structure itself: PNG chunks with their CRCs up to
   ``IEND``, JPEG markers and entropy-coded data up to ``EOI``, the RIFF
   chunks of WebP, GIF blocks up to the trailer. This yields the canvas size
   and frame count *before* Pillow parses anything, catches truncation and
   corruption Pillow lets through (a PNG without ``IEND``, a bad ``IDAT`` CRC,
   a GIF without its trailer) and finds bytes after the end of the image;
4. checks the limits on those header values;
5. decodes every frame with Pillow, restricted to the sniffed format,
   re-checking the limits on what Pillow reports.

Memory. A full decode holds width x height x 4 bytes per frame (an RGB
pixel takes four), so :func:`inspect_image` reads the structure of a file
first, mapped rather than read, and :func:`memory_needed` says what its
validation will hold; the pipeline reserves that much of its memory budget
(:mod:`materializer.resources`) before :func:`validate_image` runs. An image
whose full decode needs more than ``full_decode_limit`` (the whole budget) is
decoded in bounded memory where the format allows it, so that it neither
waits for a machine-sized budget nor takes the machine's memory: a still PNG
is inflated and checked row by row (the zlib stream must inflate to every row
its header declares, each with a valid filter type: what Pillow's decoder
checks, without keeping the pixels), after Pillow has read its header; a
sequential JPEG is decoded by Pillow at 1/8 scale, which still decodes every
byte of its entropy-coded data. Other images (animations, WebP, GIF,
progressive JPEG) are always decoded whole.

JPEG and WebP carry no checksum, so bytes flipped inside their compressed
data can decode to a damaged picture without any error; truncation and
structural damage are always caught.

Polyglots: bytes after the end of the image (after PNG ``IEND``, JPEG
``EOI``, the RIFF size of WebP, the GIF trailer) are refused. An image
generator never writes them, and a file that is also HTML, a ZIP or a script
should not land in the outputs folder under an image extension. This refuses
multi-picture JPEG (MPO) too, which is not one of the allowed formats.

Decompression bombs and warnings: the limits are enforced by explicit checks
on the header values before Pillow sees the file, so Pillow's own
decompression-bomb check (which reads the process-global
``Image.MAX_IMAGE_PIXELS`` and reports through the process-global,
thread-unsafe ``warnings`` machinery) never decides anything for images over
our limits. This module changes neither. Pillow's ``DecompressionBombError``
still applies as a backstop, and if the process has escalated its
``DecompressionBombWarning`` to an error (it fires for images between
``MAX_IMAGE_PIXELS``, about 89.5 MP by default, and our ``max_pixels``), that
too becomes a refusal.

Safe to call from several worker threads at once: no global state is changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import mmap
import os
import re
import struct
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Literal

from PIL import (
    GifImagePlugin,
    Image,
    ImageFile,
    JpegImagePlugin,
    PngImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from materializer.limits import MAX_DECODED_BYTES, MAX_DOWNLOAD_BYTES, MAX_EDGE, MAX_FRAMES, MAX_PIXELS

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_MIME_TYPES", "ImageFormat", "ImageHeader", "ImageInfo", "ImageLimits",
           "ImageRejected", "first_frame_memory", "inspect_image", "memory_needed", "open_first_frame", "probe_image",
           "validate_image"]

ImageFormat = Literal["png", "jpeg", "webp", "gif"]

#: format -> (Pillow format name, file extension, MIME type)
_FORMATS: dict[ImageFormat, tuple[str, str, str]] = {
    "png": (PngImagePlugin.PngImageFile.format, "png", "image/png"),
    "jpeg": (JpegImagePlugin.JpegImageFile.format, "jpg", "image/jpeg"),
    "webp": (WebPImagePlugin.WebPImageFile.format, "webp", "image/webp"),
    "gif": (GifImagePlugin.GifImageFile.format, "gif", "image/gif"),
}

#: The extensions a validated image can have, in no particular order.
IMAGE_EXTENSIONS: tuple[str, ...] = tuple(ext for _, ext, _ in _FORMATS.values())
#: The MIME type of each of those extensions.
IMAGE_MIME_TYPES: dict[str, str] = {ext: mime for _, ext, mime in _FORMATS.values()}

#: Bytes per pixel in the decoded-size limit: RGBA, as a viewer holds every frame.
_DECODED_BYTES_PER_PIXEL = 4
#: Most bytes one inflate step of a bounded PNG check produces (it holds about this much).
_INFLATE_STEP = 1 << 20
#: What a bounded PNG check holds besides the file: inflate output and zlib's own state.
_BOUNDED_PNG_BYTES = 2 * _INFLATE_STEP
#: How much smaller a bounded JPEG decode is per edge (libjpeg's smallest DCT scale).
_JPEG_SCALE = 8
#: JPEG frame markers of sequential (not progressive) Huffman coding: one scan at a time, no coefficient buffer.
_JPEG_SEQUENTIAL = frozenset({0xC0, 0xC1})
#: Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: In JPEG entropy-coded data, 0xFF followed by one of these is not a marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


class ImageRejected(ValueError):
    """Bytes that are not an image we keep, with the reason why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """Limits on one image; defaults match the desktop app's.

    ``max_decoded_bytes`` bounds width x height x 4 (RGBA) x frames: the
    memory a viewer needs for the whole animation, and the decoding work we
    do. ``max_file_bytes`` bounds the file itself (the download cap).
    """

    max_edge: int = MAX_EDGE
    max_pixels: int = MAX_PIXELS
    max_frames: int = MAX_FRAMES
    max_decoded_bytes: int = MAX_DECODED_BYTES
    max_file_bytes: int = MAX_DOWNLOAD_BYTES

    def __post_init__(self) -> None:
        for name in ("max_edge", "max_pixels", "max_frames", "max_decoded_bytes", "max_file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImageLimits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """A validated image.

    ``ext`` is what its file name must end with; ``bytes`` is the file size
    and ``sha256`` the hex digest of exactly the bytes validated.
    """

    format: ImageFormat
    ext: str
    mime: str
    width: int
    height: int
    frames: int
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class _Header:
    """What the container structure says, read without Pillow."""

    width: int
    height: int
    frames: int
    #: Whether Pillow can check it in bounded memory: a still PNG, a sequential JPEG.
    boundable: bool = False


@dataclass(frozen=True, slots=True)
class ImageHeader:
    """What an image file's structure says it is, before anything is decoded (:func:`inspect_image`)."""

    format: ImageFormat
    width: int
    height: int
    frames: int
    #: Whether it can be decoded in bounded memory (a still PNG, a sequential JPEG).
    boundable: bool

    @property
    def decoded_bytes(self) -> int:
        """The memory a full decode is weighted at: width x height x 4 x frames."""
        return self.width * self.height * _DECODED_BYTES_PER_PIXEL * self.frames

    def decode_bytes(self, full_decode_limit: int | None) -> int:
        """The memory its decode holds at once: the full decode, or a bounded one when that is over the limit."""
        if full_decode_limit is None or self.decoded_bytes <= full_decode_limit or not self.boundable:
            return self.decoded_bytes
        if self.format == "jpeg":
            return _scaled(self.width) * _scaled(self.height) * _DECODED_BYTES_PER_PIXEL
        return _BOUNDED_PNG_BYTES

    def first_frame_bytes(self, draft_edge: int | None) -> int:
        """The memory decoding its first frame alone holds (:func:`open_first_frame`): a sequential JPEG at
        the DCT scale ``draft_edge`` allows, anything else whole."""
        scale = 1
        if draft_edge is not None and self.format == "jpeg" and self.boundable:
            ratio = max(self.width, self.height) // max(1, draft_edge)
            scale = next(step for step in (8, 4, 2, 1) if ratio >= step)
        return -(-self.width // scale) * -(-self.height // scale) * _DECODED_BYTES_PER_PIXEL


def inspect_image(source: str | os.PathLike[str] | BinaryIO, limits: ImageLimits = ImageLimits()) -> ImageHeader:
    """Read an image file's format, size and frames from its structure, without decoding it or reading it into memory.

    The file is mapped, not read (its pages are the page cache's, not the process's). Raises
    :class:`ImageRejected` for what :func:`validate_image` refuses on structure or limits alone
    (PNG chunk checksums excepted: validation checks them, on the same bytes, so the sizes read
    here are the ones it finds).
    """
    with _mapped(source, limits.max_file_bytes) as data:
        image_format = _sniff(data[:_DESCRIBED_BYTES])
        header = _probe_png(data, check_crc=False) if image_format == "png" else _PROBES[image_format](data)
    _check_limits(header.width, header.height, header.frames, limits)
    return ImageHeader(image_format, header.width, header.height, header.frames, header.boundable)


def memory_needed(source: str | os.PathLike[str] | BinaryIO, limits: ImageLimits, full_decode_limit: int | None) -> int:
    """The bytes :func:`validate_image` holds at once for this file: the file itself, and its decode.

    A file that :func:`inspect_image` refuses needs only itself: validating it stops at the same refusal.
    """
    size = _size_of(source) if not isinstance(source, (str, os.PathLike)) else os.stat(source).st_size
    try:
        header = inspect_image(source, limits)
    except ImageRejected:
        return size
    return size + header.decode_bytes(full_decode_limit)


def first_frame_memory(source: str | os.PathLike[str] | BinaryIO, limits: ImageLimits, draft_edge: int | None,
                       max_decode_bytes: int | None) -> int:
    """The bytes :func:`open_first_frame` holds at once for this file: the file itself, and its first frame
    (unless that frame needs more than ``max_decode_bytes``: then it is refused, not decoded)."""
    size = _size_of(source) if not isinstance(source, (str, os.PathLike)) else os.stat(source).st_size
    try:
        frame = inspect_image(source, limits).first_frame_bytes(draft_edge)
    except ImageRejected:
        return size
    return size if max_decode_bytes is not None and frame > max_decode_bytes else size + frame


def validate_image(source: str | os.PathLike[str] | BinaryIO, limits: ImageLimits = ImageLimits(),
                   on_first_frame: Callable[[Image.Image], None] | None = None, *,
                   full_decode_limit: int | None = None) -> ImageInfo:
    """Validate an image file (a path, or a binary file open for reading); raise :class:`ImageRejected`.

    A file object is read from its start and left open. The file is mapped, not read, to be
    sniffed, walked and hashed (at most ``limits.max_file_bytes``), and Pillow decodes it from the
    file, a block at a time: its bytes and its pixels are never held at once (a large PNG is
    mostly its pixels' size again). The file is this process's own (a download's temporary file,
    or one it committed), so the bytes hashed and checked are the bytes decoded. An image whose
    full decode would need more than ``full_decode_limit`` bytes is decoded in bounded memory
    where its format allows (see the module docstring).

    ``on_first_frame`` is handed the first frame once Pillow has decoded it (to make a thumbnail
    from pixels already decoded, not decode them twice); a JPEG decoded in bounded memory hands
    its 1/8-scale frame, a PNG checked row by row none. It must not raise, keep or change the
    image: the decoder moves on to the next frame when it returns.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Process-wide Pillow setting that makes it accept truncated images; someone turned it on.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; refusing to validate images")
    with contextlib.ExitStack() as stack:
        file = stack.enter_context(open(source, "rb")) if isinstance(source, (str, os.PathLike)) else source
        with _mapped(file, limits.max_file_bytes) as data:
            image_format = _sniff(data[:_DESCRIBED_BYTES])
            header = _PROBES[image_format](data)
            _check_limits(header.width, header.height, header.frames, limits)
            summary = ImageHeader(image_format, header.width, header.height, header.frames, header.boundable)
            size, sha256 = len(data), hashlib.sha256(data).hexdigest()
            bounded = summary.decode_bytes(full_decode_limit) < summary.decoded_bytes
            if bounded:
                width, height, frames = _decode_bounded(data, summary, limits, on_first_frame)
            elif isinstance(data, bytes):  # a file object without a descriptor, read into memory
                width, height, frames = _decode(io.BytesIO(data), image_format, limits, on_first_frame)
        if not bounded and not isinstance(data, bytes):
            with open(file.fileno(), "rb", buffering=_DECODE_BUFFER, closefd=False) as reader:
                width, height, frames = _decode(reader, image_format, limits, on_first_frame)
    _, ext, mime = _FORMATS[image_format]
    return ImageInfo(format=image_format, ext=ext, mime=mime, width=width, height=height, frames=frames,
                     bytes=size, sha256=sha256)


#: The reads Pillow's decode makes of a file (its own blocks are 64 KiB; PNG chunk headers are 8 bytes).
_DECODE_BUFFER = 1 << 16


def _read_all(source: str | os.PathLike[str] | BinaryIO, max_bytes: int) -> bytes:
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as file:
            data = file.read(max_bytes + 1)
    else:
        source.seek(0)
        # One read of the size the file has, when it has one: reading in pieces and joining them
        # would hold the file twice at the peak (four large images at once: tens of megabytes).
        first = min(_size_of(source), max_bytes) + 1
        chunks: list[bytes] = []
        remaining = max_bytes + 1
        while remaining > 0 and (chunk := source.read(min(remaining, first if not chunks else 1 << 20))):
            chunks.append(chunk)
            remaining -= len(chunk)
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if len(data) > max_bytes:
        raise ImageRejected(f"file is larger than the {max_bytes:,} byte limit")
    return data


@contextlib.contextmanager
def _mapped(source: str | os.PathLike[str] | BinaryIO, max_bytes: int) -> Iterator[bytes]:
    """The file's bytes, mapped read-only (typed as bytes: the probes read it through the buffer protocol).

    A file object without a descriptor (already in memory) is read instead.
    """
    with contextlib.ExitStack() as stack:
        if isinstance(source, (str, os.PathLike)):
            fd = stack.enter_context(open(source, "rb")).fileno()
        else:
            try:
                fd = source.fileno()
            except (AttributeError, OSError, io.UnsupportedOperation):
                yield _read_all(source, max_bytes)
                return
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise ImageRejected(f"file is larger than the {max_bytes:,} byte limit")
        if size == 0:
            yield b""
            return
        mapped = stack.enter_context(mmap.mmap(fd, size, access=mmap.ACCESS_READ))
        try:
            yield mapped  # type: ignore[misc]
        except BaseException as exc:
            # The frames a refusal was raised from may still hold views of the mapping (a piece of a
            # PNG's image data), and a mapping cannot close while a view of it lives: let them go.
            traceback.clear_frames(exc.__traceback__)
            raise


def _size_of(source: BinaryIO) -> int:
    """The size of an open file (a guess for the first read; 1 MiB when it has no descriptor)."""
    try:
        return os.fstat(source.fileno()).st_size
    except (AttributeError, OSError, io.UnsupportedOperation):
        return 1 << 20


# --- sniffing -------------------------------------------------------------------------------

_HTML_STARTS = (
    b"<!doctype html", b"<html", b"<head", b"<body", b"<script", b"<iframe", b"<title", b"<div",
    b"<table", b"<style", b"<meta", b"<link", b"<p>", b"<p ", b"<a ", b"<br", b"<h1", b"<!--",
)  # fmt: skip

#: Leading bytes of formats that are not allowed, and what to call them.
_OTHER_FORMATS: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "a PDF document"),
    (b"II*\x00", "a TIFF image"),
    (b"MM\x00*", "a TIFF image"),
    (b"\x00\x00\x01\x00", "an ICO icon"),
    (b"\xff\x0a", "a JPEG XL image"),
    (b"\x00\x00\x00\x0cJXL ", "a JPEG XL image"),
    (b"8BPS", "a Photoshop document"),
    (b"\x1f\x8b", "gzip-compressed data"),
    (b"PK\x03\x04", "a ZIP archive"),
    (b"BM", "a BMP image"),
)


def _sniff(data: bytes) -> ImageFormat:
    """The allowed format ``data`` starts as, or :class:`ImageRejected` describing what it is instead."""
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if not data:
        raise ImageRejected("file is empty")
    raise ImageRejected(f"bytes are {_describe(data)}, not a PNG, JPEG, WebP or GIF image")


#: How much of the bytes :func:`_describe` looks at.
_DESCRIBED_BYTES = 512


def _describe(data: bytes) -> str:
    """A short description of what non-image bytes look like (from their first :data:`_DESCRIBED_BYTES`)."""
    text = data[:512].lstrip(b"\xef\xbb\xbf\t\n\f\r ").lower()
    if text.startswith(_HTML_STARTS):
        return "HTML"
    if text.startswith((b"<?xml", b"<svg")):
        return "SVG or XML"
    if text.startswith(b"<"):
        return "markup (HTML or XML)"
    if text.startswith((b"{", b"[")):
        return "JSON"
    if data.startswith(b"RIFF"):
        return f"a RIFF {data[8:12]!r} file"
    if data[4:8] == b"ftyp":
        brand = data[8:12]
        if brand in (b"avif", b"avis"):
            return "an AVIF image"
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "a HEIF image"
        return "an MP4/QuickTime file"
    for magic, name in _OTHER_FORMATS:
        if data.startswith(magic):
            return name
    if _PNG_SIGNATURE.startswith(data[:8]) or data.startswith(b"\xff\xd8"):
        return "a cut-off image signature"
    if all(32 <= byte < 127 or byte in b"\t\n\r" for byte in data[:512]):
        return "text"
    return f"unknown data (starting {data[:8].hex(' ')})"


# --- container structure --------------------------------------------------------------------


def _truncated(what: str) -> ImageRejected:
    return ImageRejected(f"truncated: {what}")


def _broken(what: str) -> ImageRejected:
    return ImageRejected(f"corrupt: {what}")


def _refuse_trailing(data: bytes, end: int, name: str) -> None:
    if end < len(data):
        extra = len(data) - end
        raise ImageRejected(
            f"{name} image is followed by {extra:,} bytes of {_describe(data[end:end + _DESCRIBED_BYTES])}; "
            "files that are also something else (polyglots) are refused"
        )


def _probe_png(data: bytes, check_crc: bool = True) -> _Header:
    """Walk every chunk, checking its CRC (unless only the structure's sizes are wanted), up to IEND."""
    with memoryview(data) as view:  # released on the way out, even by an exception (data may be a mapping)
        return _walk_png(data, view, check_crc)


def _walk_png(data: bytes, view: memoryview, check_crc: bool) -> _Header:
    pos, size, frames, seen_idat, animated = len(_PNG_SIGNATURE), None, 1, False, False
    while True:
        if pos + 8 > len(data):
            raise _truncated("PNG ends before its IEND chunk")
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        name = chunk_type.decode("ascii", "backslashreplace")
        start, end = pos + 8, pos + 8 + length
        if length > 0x7FFF_FFFF:
            raise _broken(f"PNG chunk {name!r} at offset {pos:,} has an impossible length")
        if end + 4 > len(data):
            raise _truncated(f"PNG chunk {name!r} at offset {pos:,} is cut off")
        if check_crc and zlib.crc32(view[pos + 4 : end]) != struct.unpack_from(">I", data, end)[0]:
            raise _broken(f"PNG chunk {name!r} at offset {pos:,} fails its CRC check")
        if size is None:
            if chunk_type != b"IHDR" or length != 13:
                raise _broken("PNG does not start with its IHDR chunk")
            size = struct.unpack_from(">II", data, start)
        elif chunk_type == b"acTL" and length >= 8 and not seen_idat:
            frames, animated = struct.unpack_from(">I", data, start)[0], True
        seen_idat = seen_idat or chunk_type == b"IDAT"
        pos = end + 4
        if chunk_type == b"IEND":
            break
    if not seen_idat:
        raise _broken("PNG has no image data (IDAT chunk)")
    _refuse_trailing(data, pos, "PNG")
    return _Header(size[0], size[1], frames, boundable=not animated)


def _probe_jpeg(data: bytes) -> _Header:
    """Walk the markers and entropy-coded segments up to EOI."""
    pos, size, n, sequential = 2, None, len(data), False
    while True:
        if pos >= n:
            raise _truncated("JPEG ends before its end-of-image marker")
        if data[pos] != 0xFF:
            raise _broken(f"JPEG has no marker at offset {pos:,}")
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            raise _truncated("JPEG ends before its end-of-image marker")
        marker = data[pos]
        pos += 1
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # standalone markers
            continue
        if marker in (0x00, 0xD8):
            raise _broken(f"JPEG has an unexpected marker 0x{marker:02X} at offset {pos - 1:,}")
        if pos + 2 > n:
            raise _truncated("JPEG ends inside a marker segment")
        segment_end = pos + struct.unpack_from(">H", data, pos)[0]
        if segment_end < pos + 2:
            raise _broken(f"JPEG marker 0x{marker:02X} at offset {pos - 2:,} has an impossible length")
        if segment_end > n:
            raise _truncated(f"JPEG marker segment 0x{marker:02X} at offset {pos - 2:,} is cut off")
        if marker in _JPEG_SOF_MARKERS and size is None:
            if segment_end - pos < 8:
                raise _broken("JPEG frame header is too short")
            height, width = struct.unpack_from(">HH", data, pos + 3)
            size, sequential = (width, height), marker in _JPEG_SEQUENTIAL
        pos = segment_end
        if marker == 0xDA:  # start of scan: entropy-coded data runs to the next real marker
            if size is None:
                raise _broken("JPEG scan comes before any frame header")
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                raise _truncated("JPEG scan data ends before its end-of-image marker")
            pos = found.start()
    if size is None:
        raise _broken("JPEG has no frame header")
    _refuse_trailing(data, pos, "JPEG")
    return _Header(size[0], size[1], 1, boundable=sequential)


def _probe_webp(data: bytes) -> _Header:
    """Check the RIFF size, walk the chunks, read the canvas from the first one, count frames."""
    riff_end = 8 + struct.unpack_from("<I", data, 4)[0]
    if riff_end > len(data):
        raise _truncated(f"WebP declares {riff_end:,} bytes but the file has {len(data):,}")
    pos, size, animated, frames = 12, None, False, 0
    while pos < riff_end:
        if pos + 8 > riff_end:
            raise _broken(f"WebP chunk header at offset {pos:,} is cut off")
        fourcc, length = struct.unpack_from("<4sI", data, pos)
        start, end = pos + 8, pos + 8 + length
        if end > riff_end:
            raise _broken(f"WebP chunk {fourcc!r} at offset {pos:,} runs past the end of the RIFF data")
        if size is None:
            size, animated = _webp_canvas(fourcc, data[start:min(end, start + _WEBP_CANVAS_BYTES)])
        if fourcc == b"ANMF":
            frames += 1
        pos = end + (length & 1)
    if size is None:
        raise _broken("WebP has no image chunk")
    if animated and frames == 0:
        raise _broken("animated WebP has no frames")
    _refuse_trailing(data, riff_end, "WebP")
    return _Header(size[0], size[1], frames if animated else 1)


#: How much of the first WebP chunk :func:`_webp_canvas` needs.
_WEBP_CANVAS_BYTES = 16


def _webp_canvas(fourcc: bytes, chunk: bytes) -> tuple[tuple[int, int], bool]:
    """``((width, height), animated)`` from (the first :data:`_WEBP_CANVAS_BYTES` of) the first chunk of a WebP file."""
    if fourcc == b"VP8X" and len(chunk) >= 10:
        width = 1 + int.from_bytes(chunk[4:7], "little")
        height = 1 + int.from_bytes(chunk[7:10], "little")
        return (width, height), bool(chunk[0] & 0x02)
    if fourcc == b"VP8L" and len(chunk) >= 5 and chunk[0] == 0x2F:
        bits = int.from_bytes(chunk[1:5], "little")
        return ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1), False
    if fourcc == b"VP8 " and len(chunk) >= 10 and chunk[3:6] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", chunk, 6)
        return (width & 0x3FFF, height & 0x3FFF), False
    raise _broken(f"WebP starts with a malformed or unknown {fourcc!r} chunk")


def _probe_gif(data: bytes) -> _Header:
    """Walk the blocks up to the trailer; frames outside the logical screen grow the canvas, as in Pillow."""
    n = len(data)
    if n < 13:
        raise _truncated("GIF ends inside its header")
    width, height, flags = struct.unpack_from("<HHB", data, 6)
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0
    while True:
        if pos >= n:
            raise _truncated("GIF ends before its trailer")
        block = data[pos]
        pos += 1
        if block == 0x3B:  # trailer
            break
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_gif_sub_blocks(data, pos + 1)
        elif block == 0x2C:  # image descriptor
            if pos + 9 > n:
                raise _truncated("GIF ends inside an image descriptor")
            left, top, frame_width, frame_height, frame_flags = struct.unpack_from("<HHHHB", data, pos)
            pos += 9 + (3 << ((frame_flags & 7) + 1) if frame_flags & 0x80 else 0)
            pos = _skip_gif_sub_blocks(data, pos + 1)  # after the LZW minimum code size
            width, height = max(width, left + frame_width), max(height, top + frame_height)
            frames += 1
        else:
            raise _broken(f"GIF has an unknown block 0x{block:02X} at offset {pos - 1:,}")
    if frames == 0:
        raise _broken("GIF contains no image")
    _refuse_trailing(data, pos, "GIF")
    return _Header(width, height, frames)


def _skip_gif_sub_blocks(data: bytes, pos: int) -> int:
    while True:
        if pos >= len(data):
            raise _truncated("GIF ends inside a data block")
        length = data[pos]
        pos += 1 + length
        if length == 0:
            return pos


_PROBES = {"png": _probe_png, "jpeg": _probe_jpeg, "webp": _probe_webp, "gif": _probe_gif}


# --- limits and decoding --------------------------------------------------------------------


def _check_limits(width: int, height: int, frames: int, limits: ImageLimits) -> None:
    if width < 1 or height < 1:
        raise _broken(f"image is {width}x{height} pixels")
    if frames < 1:
        raise _broken("image declares no frames")
    if max(width, height) > limits.max_edge:
        raise ImageRejected(f"image is {width}x{height} pixels, an edge over the {limits.max_edge:,} pixel limit")
    pixels = width * height
    if pixels > limits.max_pixels:
        raise ImageRejected(
            f"image is {width}x{height} = {pixels:,} pixels, over the {limits.max_pixels:,} limit "
            "(a decompression bomb?)"
        )
    if frames > limits.max_frames:
        raise ImageRejected(f"image has {frames:,} frames, over the {limits.max_frames:,} limit")
    decoded = pixels * _DECODED_BYTES_PER_PIXEL * frames
    if decoded > limits.max_decoded_bytes:
        raise ImageRejected(
            f"decoding needs {decoded:,} bytes ({width}x{height} RGBA x {frames} frames), "
            f"over the {limits.max_decoded_bytes:,} limit"
        )


def _decode(file: BinaryIO, image_format: ImageFormat, limits: ImageLimits,
            on_first_frame: Callable[[Image.Image], None] | None = None) -> tuple[int, int, int]:
    """Decode every frame of ``file`` (read from its start) with Pillow; return ``(width, height, frames)``."""
    pil_format = _FORMATS[image_format][0]
    file.seek(0)
    with _pillow_errors(image_format), Image.open(file, formats=[pil_format]) as image:
        if image.format != pil_format:
            raise ImageRejected(f"Pillow reads the {image_format.upper()} bytes as {image.format}")
        frames = getattr(image, "n_frames", 1)
        _check_limits(*image.size, frames, limits)
        for frame in range(frames):
            image.seek(frame)
            _check_limits(*image.size, frames, limits)  # a GIF frame can grow the canvas
            image.load()
            if frame == 0 and on_first_frame is not None:
                on_first_frame(image)
        return image.size[0], image.size[1], frames


@contextlib.contextmanager
def _pillow_errors(image_format: ImageFormat) -> Iterator[None]:
    """Whatever Pillow raises on these bytes, as an :class:`ImageRejected` saying why."""
    pil_format = _FORMATS[image_format][0]
    try:
        yield
    except ImageRejected:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"Pillow refused it as a decompression bomb: {exc}") from None
    except Image.DecompressionBombWarning as exc:  # only raised when the process made the warning an error
        raise ImageRejected(f"Pillow warned of a decompression bomb: {exc}") from None
    except EOFError:
        raise _truncated("animation ends before its declared last frame") from None
    except UnidentifiedImageError:
        raise ImageRejected(f"Pillow cannot read the {pil_format} header") from None
    except Exception as exc:
        # Hostile bytes can make a decoder raise almost anything (OSError for truncated or
        # broken data, SyntaxError for broken PNG structure, ValueError, struct.error, ...).
        # Whatever it is, these bytes are refused.
        raise ImageRejected(f"Pillow cannot decode it: {type(exc).__name__}: {exc}") from None


def _scaled(edge: int) -> int:
    """An edge at the bounded JPEG decode's scale."""
    return max(1, edge // _JPEG_SCALE)


def _decode_bounded(data: bytes, header: ImageHeader, limits: ImageLimits,
                    on_first_frame: Callable[[Image.Image], None] | None) -> tuple[int, int, int]:
    """Check an image too large to decode whole in bounded memory; return ``(width, height, frames)``.

    Pillow reads the header (and, for a JPEG, decodes every scan at 1/8 scale, the frame handed to
    ``on_first_frame``); a PNG's image data is then inflated and checked here, row by row, holding
    about a megabyte at a time.
    """
    pil_format = _FORMATS[header.format][0]
    with _pillow_errors(header.format), Image.open(io.BytesIO(data), formats=[pil_format]) as image:
        if image.format != pil_format:
            raise ImageRejected(f"Pillow reads the {header.format.upper()} bytes as {image.format}")
        if image.size != (header.width, header.height) or getattr(image, "n_frames", 1) != 1:
            raise _broken(f"Pillow reads a {image.size[0]}x{image.size[1]} image, the structure says "
                          f"{header.width}x{header.height}")
        _check_limits(*image.size, 1, limits)
        if header.format == "jpeg":
            image.draft(image.mode, (_scaled(header.width), _scaled(header.height)))
            image.load()
            if on_first_frame is not None:
                on_first_frame(image)
    if header.format == "png":
        _inflate_png_rows(data, header)
    return header.width, header.height, 1


def _png_rows(width: int, height: int, bits_per_pixel: int, interlaced: bool) -> Iterator[int]:
    """The length of every row of a PNG's filtered image data (filter byte included), in order."""
    passes = _ADAM7 if interlaced else ((0, 0, 1, 1),)
    for first_column, first_row, column_step, row_step in passes:
        columns = (width - first_column + column_step - 1) // column_step
        rows = (height - first_row + row_step - 1) // row_step
        if columns > 0 and rows > 0:  # an empty pass has no rows at all, not even filter bytes
            length = 1 + (columns * bits_per_pixel + 7) // 8
            for _ in range(rows):
                yield length


def _inflate_png_rows(data: bytes, header: ImageHeader) -> None:
    """Inflate a still PNG's image data a step at a time: every declared row must be there, with a known filter.

    What Pillow's decoder refuses, this refuses (a broken zlib stream, an unknown filter type, data
    that ends early), and more strictly: a stream that ends cleanly short of the last row is refused
    too. Data past the last row is ignored, as Pillow ignores it.
    """
    depth, color_type, _, _, interlace = struct.unpack_from(">BBBBB", data, 24)
    if color_type not in _PNG_CHANNELS:
        raise _broken(f"PNG has an unknown color type {color_type}")
    lengths = list(_png_rows(header.width, header.height, _PNG_CHANNELS[color_type] * depth, interlace == 1))
    needed = sum(lengths)
    inflater = zlib.decompressobj()
    row = row_start = produced = 0  # the next row to check, where it starts, and the bytes inflated so far
    with memoryview(data) as view:
        for piece in _idat_pieces(data, view):
            pending: bytes | memoryview = piece
            while pending and produced < needed and not inflater.eof:
                try:
                    out = inflater.decompress(pending, _INFLATE_STEP)
                except zlib.error as exc:
                    raise _broken(f"PNG image data does not inflate (row {row + 1:,} of {len(lengths):,}): "
                                  f"{exc}") from None
                pending = inflater.unconsumed_tail
                while row < len(lengths) and row_start < produced + len(out):
                    if (filter_type := out[row_start - produced]) > 4:
                        raise _broken(f"PNG row {row + 1:,} of {len(lengths):,} has an unknown filter type "
                                      f"{filter_type}")
                    row_start += lengths[row]
                    row += 1
                produced += len(out)
            if produced >= needed or inflater.eof:
                break
    if produced < needed:
        raise _truncated(f"PNG image data {'ends' if inflater.eof else 'is cut off'} after {produced:,} of the "
                         f"{needed:,} bytes its {len(lengths):,} rows need")


def _idat_pieces(data: bytes, view: memoryview) -> Iterator[memoryview]:
    """The image data of a PNG whose chunks are already checked, in pieces of at most 64 KiB."""
    pos = len(_PNG_SIGNATURE)
    while True:
        length, chunk_type = struct.unpack_from(">I4s", data, pos)
        if chunk_type == b"IEND":
            return
        if chunk_type == b"IDAT":
            for start in range(pos + 8, pos + 8 + length, 1 << 16):
                yield view[start : min(start + (1 << 16), pos + 8 + length)]
        pos += 12 + length


# --- first frames and headers, for thumbnails -----------------------------------------------


def probe_image(data: bytes) -> tuple[ImageFormat, int, int, int]:
    """``(format, width, height, frames)`` as the container structure says, without decoding any pixels.

    The same sniffing and structure walk as :func:`validate_image` (so truncation, bad chunk sizes and
    trailing bytes are refused); cheap enough to check many small files.
    """
    image_format = _sniff(data)
    header = _PROBES[image_format](data)
    return image_format, header.width, header.height, header.frames


def open_first_frame(source: str | os.PathLike[str] | BinaryIO, limits: ImageLimits = ImageLimits(), *,
                     draft_edge: int | None = None, max_decode_bytes: int | None = None) -> Image.Image:
    """The first frame of an image file, decoded under ``limits``; raise :class:`ImageRejected`.

    The structure and the limits are checked as :func:`validate_image` checks them, before Pillow
    decodes anything; only the first frame is decoded. ``draft_edge`` lets a JPEG decode at a
    reduced DCT scale (1/2 to 1/8) whose longest edge stays at least that long: a fraction of the
    work, for a thumbnail. A first frame whose decode would hold more than ``max_decode_bytes``
    (the memory budget) is refused rather than decoded. The caller closes the image.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this process; refusing to decode images")
    data = _read_all(source, limits.max_file_bytes)
    image_format = _sniff(data)
    header = _PROBES[image_format](data)
    width, height, frames = header.width, header.height, header.frames
    _check_limits(width, height, frames, limits)
    if max_decode_bytes is not None:
        needed = ImageHeader(image_format, width, height, frames, header.boundable).first_frame_bytes(draft_edge)
        if needed > max_decode_bytes:
            raise ImageRejected(f"its first frame needs {needed:,} bytes decoded, more than the memory budget "
                                f"({max_decode_bytes:,} bytes)")
    pil_format = _FORMATS[image_format][0]
    with _pillow_errors(image_format):
        image = Image.open(io.BytesIO(data), formats=[pil_format])
        try:
            if image.format != pil_format:
                raise ImageRejected(f"Pillow reads the {image_format.upper()} bytes as {image.format}")
            _check_limits(*image.size, frames, limits)
            if draft_edge is not None and image_format == "jpeg":
                longest = max(image.size)
                image.draft(None, (max(1, image.size[0] * draft_edge // longest),
                                   max(1, image.size[1] * draft_edge // longest)))
            image.load()
        except BaseException:
            image.close()
            raise
        return image
