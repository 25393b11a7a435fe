"""Name a non-image output: what its bytes are, and which extension and MIME type it gets.

Files keep the contract name ``<jobId>_<index>.<ext>``; this module decides
``<ext>``. In order of trust:

1. the bytes, where a signature says what they are (:func:`sniff`): MP4,
   QuickTime and M4A ``ftyp`` brands, WebM and Matroska (the EBML header's
   DocType), MP3 (an ID3 tag or an MPEG Layer III frame header), WAV, Ogg,
   FLAC, binary glTF and glTF JSON;
2. the URL path's extension, when it is a media extension this module knows;
3. the declared MIME type (``content_type`` / ``mimeType``);
4. ``bin``.

Refusals. An output that *claims* to be media (a declared ``video/``,
``audio/``, ``model/`` or ``image/`` type, a media key such as ``video``, or a
media URL extension) whose bytes are empty or an HTML page is refused with
:class:`MediaRejected`. Like a rejected image, that is what a CDN error page
or an expired link looks like, so the pipeline retries it and quarantines the
job only after its last attempt. Anything else is kept: a file nobody
claimed to be media is the user's data whatever it holds.

Image bytes are not named here: the pipeline sends any output whose bytes
start like a PNG, JPEG, WebP or GIF (:func:`looks_like_image`) through
:func:`materializer.images.validate_image`, so an image extension in the
outputs folder always means a validated image.

Everything here is a pure function of bytes and strings.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

__all__ = [
    "BINARY",
    "MEDIA_TYPES",
    "SNIFF_BYTES",
    "TEXT",
    "FileType",
    "MediaRejected",
    "looks_like_image",
    "media_claim",
    "needs_whole_file",
    "output_type",
    "sniff",
]

#: How much of a file :func:`sniff` needs (except for glTF JSON, see :func:`needs_whole_file`).
SNIFF_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class FileType:
    """What a file is called: its extension (no dot) and MIME type."""

    ext: str
    mime: str


#: Every media type this module names, by extension: the one table the URL and declared rules read.
MEDIA_TYPES: dict[str, str] = {
    "mp4": "video/mp4",
    "mov": "video/quicktime",
    "webm": "video/webm",
    "mkv": "video/x-matroska",
    "m4a": "audio/mp4",
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "ogg": "audio/ogg",
    "flac": "audio/flac",
    "glb": "model/gltf-binary",
    "gltf": "model/gltf+json",
    "obj": "model/obj",
    "stl": "model/stl",
}

#: Declared types that name one of the above by another name.
_TYPE_ALIASES: dict[str, str] = {
    "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav", "audio/mp3": "mp3", "audio/x-mp3": "mp3",
    "audio/x-flac": "flac", "audio/x-m4a": "m4a", "audio/m4a": "m4a", "audio/webm": "webm", "video/ogg": "ogg",
    "application/ogg": "ogg", "video/x-m4v": "mp4", "application/sla": "stl", "model/x.stl-binary": "stl",
    "model/x.stl-ascii": "stl",
}  # fmt: skip
_EXT_BY_TYPE: dict[str, str] = {**{mime: ext for ext, mime in MEDIA_TYPES.items()}, **_TYPE_ALIASES}

TEXT = FileType("txt", "text/plain")
BINARY = FileType("bin", "application/octet-stream")

_MEDIA_TOP_LEVEL_TYPES = ("video", "audio", "model", "image")
_MEDIA_KINDS = ("video", "audio", "model")

#: ``ftyp`` major brands that are not plain MP4 video.
_QUICKTIME_BRANDS = frozenset({b"qt  "})
_AUDIO_BRANDS = frozenset({b"M4A ", b"M4B ", b"M4P "})
#: HEIF/AVIF still images and camera raw files share the ISO box format; they are no video.
_NOT_VIDEO_BRANDS = frozenset({b"avif", b"avis", b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1", b"crx "})

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_EBML_DOC_TYPE = 0x4282
_DOC_TYPES = {b"webm": "webm", b"matroska": "mkv"}

_LEADING_NOISE = b"\xef\xbb\xbf\t\n\f\r "
_HTML_STARTS = (
    b"<!doctype html", b"<html", b"<head", b"<body", b"<script", b"<iframe", b"<title", b"<meta", b"<style",
    b"<link", b"<div", b"<p>", b"<p ", b"<a ", b"<h1", b"<!--",
)  # fmt: skip


class MediaRejected(ValueError):
    """Bytes that cannot be what their output claims to be, with the reason why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _typed(ext: str) -> FileType:
    return FileType(ext, MEDIA_TYPES[ext])


# -- signatures --------------------------------------------------------------------------------


def sniff(data: bytes) -> FileType | None:
    """The media type ``data`` (a file's first :data:`SNIFF_BYTES`, or all of it) has a signature for."""
    if data[4:8] == b"ftyp":
        return _iso_brand(data[8:12])
    if data.startswith(_EBML_MAGIC):
        doc_type = _ebml_doc_type(data)
        return _typed(_DOC_TYPES[doc_type]) if doc_type in _DOC_TYPES else None
    if data[:4] in (b"RIFF", b"RF64") and data[8:12] == b"WAVE":
        return _typed("wav")
    if data.startswith(b"OggS"):
        return _typed("ogg")
    if data.startswith(b"fLaC"):
        return _typed("flac")
    if data.startswith(b"ID3") or _is_mp3_frame(data):
        return _typed("mp3")
    if data.startswith(b"glTF") and len(data) >= 12 and struct.unpack_from("<I", data, 4)[0] in (1, 2):
        return _typed("glb")
    if _is_gltf_json(data):
        return _typed("gltf")
    return None


def _iso_brand(brand: bytes) -> FileType | None:
    if brand in _QUICKTIME_BRANDS:
        return _typed("mov")
    if brand in _AUDIO_BRANDS:
        return _typed("m4a")
    if brand in _NOT_VIDEO_BRANDS or len(brand) < 4:
        return None
    return _typed("mp4")


def _vint(data: bytes, pos: int, *, keep_marker: bool) -> tuple[int, int] | None:
    """An EBML variable-length integer at ``pos``: (value, position after it), or None if cut off."""
    if pos >= len(data) or data[pos] == 0:
        return None
    first = data[pos]
    length = 9 - first.bit_length()
    if pos + length > len(data):
        return None
    value = first if keep_marker else first & ((1 << (8 - length)) - 1)
    for byte in data[pos + 1 : pos + length]:
        value = value << 8 | byte
    return value, pos + length


def _ebml_doc_type(data: bytes) -> bytes | None:
    """The DocType of the EBML header ``data`` starts with (``webm``, ``matroska``), or None."""
    size = _vint(data, len(_EBML_MAGIC), keep_marker=False)
    if size is None:
        return None
    header_size, pos = size
    end = min(len(data), pos + header_size)
    while pos < end:
        element = _vint(data, pos, keep_marker=True)
        length = None if element is None else _vint(data, element[1], keep_marker=False)
        if element is None or length is None:
            return None
        if element[0] == _EBML_DOC_TYPE:
            return data[length[1] : length[1] + length[0]].rstrip(b"\x00")
        pos = length[1] + length[0]
    return None


def _is_mp3_frame(data: bytes) -> bool:
    """Whether ``data`` starts with an MPEG audio Layer III frame header (no ID3 tag before it)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0:
        return False
    version, layer = (data[1] >> 3) & 3, (data[1] >> 1) & 3
    bitrate, sample_rate = data[2] >> 4, (data[2] >> 2) & 3
    return version != 1 and layer == 1 and bitrate != 15 and sample_rate != 3


def needs_whole_file(head: bytes) -> bool:
    """Whether :func:`sniff` must see the whole file: only JSON (glTF) is read to its end."""
    return head.lstrip(_LEADING_NOISE).startswith(b"{")


def _is_gltf_json(data: bytes) -> bool:
    """A JSON object whose ``asset`` is an object with a ``version``: the glTF 2.0 (and 1.0) marker."""
    if not needs_whole_file(data):
        return False
    try:
        document = json.loads(data.decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    asset = document.get("asset") if isinstance(document, dict) else None
    return isinstance(asset, dict) and "version" in asset


def looks_like_image(head: bytes) -> bool:
    """Whether the bytes start like one of the image formats :func:`materializer.images.validate_image` keeps."""
    return (
        head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a"))
        or (head.startswith(b"RIFF") and head[8:12] == b"WEBP")
    )


def _looks_like_html(head: bytes) -> bool:
    return head[:512].lstrip(_LEADING_NOISE).lower().startswith(_HTML_STARTS)


# -- metadata ------------------------------------------------------------------------------------


def _normalized_type(declared_mime: str | None) -> str:
    return (declared_mime or "").split(";", 1)[0].strip().lower()


def _url_extension(url: str | None) -> str | None:
    """The URL path's extension if it is one of :data:`MEDIA_TYPES`, else None."""
    if not url:
        return None
    try:
        path = urlsplit(url).path
    except ValueError:
        return None
    ext = PurePosixPath(unquote(path)).suffix[1:].lower()
    return ext if ext in MEDIA_TYPES else None


def media_claim(*, media_kind: str, url: str | None, declared_mime: str | None) -> str | None:
    """What makes an output claim to be media, worded for a refusal; None when nothing does."""
    declared = _normalized_type(declared_mime)
    if declared.split("/", 1)[0] in _MEDIA_TOP_LEVEL_TYPES:
        return f"declared {declared}"
    if media_kind in _MEDIA_KINDS:
        return f"{'an' if media_kind[0] in 'aeiou' else 'a'} {media_kind} output"
    ext = _url_extension(url)
    return None if ext is None else f"its URL ends in .{ext}"


def output_type(data: bytes, *, media_kind: str, url: str | None, declared_mime: str | None) -> FileType:
    """The name of a non-image output from its bytes, URL and declared type; :class:`MediaRejected` if refused.

    ``data`` is the file's first :data:`SNIFF_BYTES`, or all of it when
    :func:`needs_whole_file` says so. Text outputs (taken from the job
    document itself) are always ``txt``.
    """
    if media_kind == "text":
        return TEXT
    claim = media_claim(media_kind=media_kind, url=url, declared_mime=declared_mime)
    if claim is not None and not data:
        raise MediaRejected("file is empty")
    if claim is not None and _looks_like_html(data):
        raise MediaRejected(f"bytes are HTML, not media ({claim})")
    sniffed = sniff(data)
    if sniffed is not None:
        return sniffed
    ext = _url_extension(url) or _EXT_BY_TYPE.get(_normalized_type(declared_mime))
    return BINARY if ext is None else _typed(ext)
