"""Naming non-image outputs: signatures on real byte samples, then URL, declared type and refusals."""

from __future__ import annotations

import io
import json
import struct
import wave

import pytest
from PIL import Image

from materializer.media_files import (
    BINARY,
    MEDIA_TYPES,
    SNIFF_BYTES,
    TEXT,
    FileType,
    MediaRejected,
    looks_like_image,
    media_claim,
    needs_whole_file,
    output_type,
    sniff,
)

# -- real byte samples ---------------------------------------------------------------------------------


def box(kind: bytes, payload: bytes) -> bytes:
    """An ISO base media box (MP4, QuickTime, M4A)."""
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def iso_file(brand: bytes, *compatible: bytes) -> bytes:
    """An ``ftyp`` box with ``brand`` and its compatible brands, then an empty ``mdat``."""
    return box(b"ftyp", brand + struct.pack(">I", 0x200) + b"".join(compatible)) + box(b"mdat", b"")


def ebml_element(element_id: int, payload: bytes) -> bytes:
    """One EBML element with a one-byte size (payloads under 127 bytes)."""
    size = len(payload)
    assert size < 127
    return element_id.to_bytes((element_id.bit_length() + 7) // 8, "big") + bytes([0x80 | size]) + payload


def matroska(doc_type: bytes | None) -> bytes:
    """An EBML header (version, read version, DocType) followed by the start of a Segment."""
    children = ebml_element(0x4286, b"\x01") + ebml_element(0x42F7, b"\x01")
    if doc_type is not None:
        children += ebml_element(0x4282, doc_type) + ebml_element(0x4287, b"\x04")
    return ebml_element(0x1A45DFA3, children) + b"\x18\x53\x80\x67\x01\x00\x00\x00\x00\x00\x00\x00"


def wav_file() -> bytes:
    """A real 10 ms mono 8 kHz WAV file, written by the standard library."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(8000)
        writer.writeframes(b"\x00\x10" * 80)
    return buffer.getvalue()


def mp3_frames(count: int = 3) -> bytes:
    """MPEG-1 Layer III frames at 128 kbit/s, 44.1 kHz: each header FF FB 90 00 and 417 bytes long."""
    return (b"\xff\xfb\x90\x00" + bytes(413)) * count


def id3_mp3() -> bytes:
    """An ID3v2.4 tag with one text frame, then the MP3 frames."""
    frame = b"TIT2" + struct.pack(">I", 6) + b"\x00\x00" + b"\x03Song\x00"
    return b"ID3\x04\x00\x00" + bytes([0, 0, 0, len(frame)]) + frame + mp3_frames()


def adts_aac() -> bytes:
    """An AAC ADTS frame header (sync word, but layer bits 00): not MP3."""
    return b"\xff\xf1\x50\x80\x02\x1f\xfc" + bytes(9)


def ogg_crc(page: bytes) -> int:
    """Ogg's CRC-32: polynomial 0x04C11DB7, not reflected, no final xor."""
    crc = 0
    for byte in page:
        crc ^= byte << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    return crc


def ogg_opus() -> bytes:
    """The first page of an Ogg Opus stream: a beginning-of-stream page holding the OpusHead packet."""
    packet = b"OpusHead" + struct.pack("<BBHIhB", 1, 1, 312, 48000, 0, 0)
    header = b"OggS" + struct.pack("<BBqIII", 0, 2, 0, 0x1234, 0, 0) + bytes([1, len(packet)])
    page = header + packet
    return page[:22] + struct.pack("<I", ogg_crc(page)) + page[26:]


def flac_file() -> bytes:
    """``fLaC`` then the last (and only) metadata block, a STREAMINFO of 34 bytes."""
    streaminfo = struct.pack(">HH", 4096, 4096) + bytes(6) + (44100 << 44 | 1 << 41 | 15 << 36).to_bytes(8, "big")
    streaminfo += bytes(16)  # the MD5 of the (absent) audio
    assert len(streaminfo) == 34
    return b"fLaC" + bytes([0x80]) + len(streaminfo).to_bytes(3, "big") + streaminfo


def gltf_document() -> dict[str, object]:
    return {"asset": {"version": "2.0", "generator": "test"}, "scenes": [{"nodes": []}], "scene": 0}


def glb_file() -> bytes:
    """A binary glTF 2.0: the 12-byte header, then one JSON chunk padded with spaces."""
    text = json.dumps(gltf_document()).encode()
    text += b" " * (-len(text) % 4)
    chunk = struct.pack("<I4s", len(text), b"JSON") + text
    return struct.pack("<4sII", b"glTF", 2, 12 + len(chunk)) + chunk


def png_file() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (2, 2)).save(buffer, "PNG")
    return buffer.getvalue()


HTML = b"<!DOCTYPE html><html><head><title>403 Forbidden</title></head><body>Access denied</body></html>"


# -- signatures ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        pytest.param(iso_file(b"isom", b"isom", b"iso2", b"avc1", b"mp41"), "mp4", id="mp4 isom"),
        pytest.param(iso_file(b"mp42", b"mp42", b"isom"), "mp4", id="mp4 mp42"),
        pytest.param(iso_file(b"qt  ", b"qt  "), "mov", id="quicktime"),
        pytest.param(iso_file(b"M4A ", b"M4A ", b"mp42", b"isom"), "m4a", id="m4a"),
        pytest.param(iso_file(b"heic", b"mif1", b"heic"), None, id="heif still image"),
        pytest.param(iso_file(b"avif", b"avif", b"mif1"), None, id="avif still image"),
        pytest.param(matroska(b"webm"), "webm", id="webm"),
        pytest.param(matroska(b"matroska"), "mkv", id="matroska"),
        pytest.param(matroska(b"other"), None, id="ebml of another doc type"),
        pytest.param(matroska(None), None, id="ebml without a doc type"),
        pytest.param(matroska(b"webm")[:12], None, id="ebml header cut off"),
        pytest.param(id3_mp3(), "mp3", id="mp3 with id3"),
        pytest.param(mp3_frames(), "mp3", id="mp3 frame sync"),
        pytest.param(adts_aac(), None, id="aac adts is not mp3"),
        pytest.param(b"\xff\xfb\xf0\x00" + bytes(60), None, id="mpeg header with a forbidden bitrate"),
        pytest.param(wav_file(), "wav", id="wav"),
        pytest.param(b"RIFF\x24\x00\x00\x00AVI LIST", None, id="riff avi"),
        pytest.param(ogg_opus(), "ogg", id="ogg opus"),
        pytest.param(flac_file(), "flac", id="flac"),
        pytest.param(glb_file(), "glb", id="binary gltf"),
        pytest.param(b"glTF\x07\x00\x00\x00\x0c\x00\x00\x00", None, id="glb of an unknown version"),
        pytest.param(json.dumps(gltf_document()).encode(), "gltf", id="gltf json"),
        pytest.param(b"\xef\xbb\xbf\n  " + json.dumps(gltf_document()).encode(), "gltf", id="gltf json after a bom"),
        pytest.param(b'{"asset": "2.0"}', None, id="json whose asset is no object"),
        pytest.param(b'{"asset": {"generator": "x"}}', None, id="json asset without a version"),
        pytest.param(b'{"error": "expired"}', None, id="json error body"),
        pytest.param(b"{" * 100_000, None, id="json nested too deep"),
        pytest.param(b"[" + json.dumps(gltf_document()).encode() + b"]", None, id="json list"),
        pytest.param(png_file(), None, id="png is for the image validator"),
        pytest.param(HTML, None, id="html"),
        pytest.param(b"", None, id="empty"),
        pytest.param(b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n", None, id="obj has no signature"),
    ],
)
def test_signatures_name_the_bytes(sample: bytes, expected: str | None) -> None:
    assert sniff(sample) == (None if expected is None else FileType(expected, MEDIA_TYPES[expected]))


def test_a_signature_needs_only_the_head_of_a_file_but_gltf_json_needs_all_of_it() -> None:
    big_video = iso_file(b"isom") + bytes(3 * SNIFF_BYTES)
    assert sniff(big_video[:SNIFF_BYTES]) == FileType("mp4", "video/mp4")
    gltf = json.dumps({**gltf_document(), "padding": "x" * SNIFF_BYTES}).encode()
    assert needs_whole_file(gltf[:SNIFF_BYTES])
    assert sniff(gltf[:SNIFF_BYTES]) is None  # a cut-off JSON document proves nothing
    assert sniff(gltf) == FileType("gltf", "model/gltf+json")
    assert not needs_whole_file(glb_file()) and not needs_whole_file(HTML)


@pytest.mark.parametrize(
    ("sample", "expected"),
    [
        (png_file(), True),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", True),
        (b"GIF89a\x01\x00", True),
        (b"GIF87a\x01\x00", True),
        (b"RIFF\x1a\x00\x00\x00WEBPVP8 ", True),
        (wav_file(), False),
        (mp3_frames(), False),
        (b"", False),
    ],
)
def test_image_bytes_are_recognised_for_the_validator(sample: bytes, expected: bool) -> None:
    assert looks_like_image(sample) is expected


# -- URL, declared type, fallback ---------------------------------------------------------------------------


UNKNOWN = b"\x00\x01\x02 no signature here"


@pytest.mark.parametrize(
    ("data", "kind", "url", "declared", "expected"),
    [
        # The bytes win over the URL and the declared type.
        (iso_file(b"isom"), "video", "https://cdn/x/out.webm", "video/webm", FileType("mp4", "video/mp4")),
        (wav_file(), "audio", "https://cdn/x/a.mp3", "audio/mpeg", FileType("wav", "audio/wav")),
        (glb_file(), "model", "https://cdn/x/mesh.obj", "model/obj", FileType("glb", "model/gltf-binary")),
        # Then a media extension in the URL path (not its query), whatever its case or encoding.
        (UNKNOWN, "model", "https://cdn/x/mesh.obj", "application/octet-stream", FileType("obj", "model/obj")),
        (UNKNOWN, "file", "https://cdn/x/part.STL?sig=a.mp4", None, FileType("stl", "model/stl")),
        (UNKNOWN, "file", "https://cdn/x/clip%2Emov", None, FileType("mov", "video/quicktime")),
        # Then the declared type, with its parameters and aliases.
        (UNKNOWN, "audio", "https://cdn/x/render.php", "audio/x-wav", FileType("wav", "audio/wav")),
        (UNKNOWN, "audio", "https://cdn/api/storage/1f0c", "Audio/MPEG; charset=binary", FileType("mp3", "audio/mpeg")),
        (UNKNOWN, "file", None, "model/gltf-binary", FileType("glb", "model/gltf-binary")),
        # Else bin: an extension or type that is not media says nothing.
        (UNKNOWN, "file", "https://cdn/x/archive.zip", "application/zip", BINARY),
        (UNKNOWN, "file", "https://cdn/x/archive", None, BINARY),
        (b"", "file", "https://cdn/x/empty", None, BINARY),
        (HTML, "file", "https://cdn/x/page", "text/html", BINARY),
        # Text outputs come from the document itself: always txt.
        (b"OggS looks like ogg", "text", None, "text/plain", TEXT),
        (b"", "text", None, "text/plain", TEXT),
    ],
)
def test_output_type_precedence(data: bytes, kind: str, url: str | None, declared: str | None,
                                expected: FileType) -> None:
    assert output_type(data, media_kind=kind, url=url, declared_mime=declared) == expected


@pytest.mark.parametrize(
    ("data", "kind", "url", "declared", "reason"),
    [
        (b"", "video", "https://cdn/x/v", None, "file is empty"),
        (b"", "file", "https://cdn/x/v.mp4", None, "file is empty"),
        (HTML, "file", "https://cdn/x/v", "video/mp4", "bytes are HTML, not media (declared video/mp4)"),
        (HTML, "audio", "https://cdn/x/a", None, "bytes are HTML, not media (an audio output)"),
        (HTML, "model", "https://cdn/x/m", "application/octet-stream", "bytes are HTML, not media (a model output)"),
        (HTML, "file", "https://cdn/x/mesh.glb", None, "bytes are HTML, not media (its URL ends in .glb)"),
        (b"\n\n  <HTML><body>503</body></HTML>", "file", None, "audio/ogg; codecs=opus",
         "bytes are HTML, not media (declared audio/ogg)"),
    ],
)
def test_claimed_media_that_is_empty_or_html_is_refused_with_the_reason(
    data: bytes, kind: str, url: str | None, declared: str | None, reason: str
) -> None:
    with pytest.raises(MediaRejected) as refused:
        output_type(data, media_kind=kind, url=url, declared_mime=declared)
    assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("kind", "url", "declared", "claim"),
    [
        ("file", None, "image/png", "declared image/png"),
        ("file", "https://x/a.wav", "video/mp4", "declared video/mp4"),
        ("video", "https://x/a.wav", None, "a video output"),
        ("file", "https://x/a.wav", "application/octet-stream", "its URL ends in .wav"),
        ("file", "https://x/a.zip", "application/zip", None),
        ("file", "http://[", None, None),
        ("text", None, "text/plain", None),
    ],
)
def test_what_makes_an_output_claim_to_be_media(kind: str, url: str | None, declared: str | None,
                                                claim: str | None) -> None:
    assert media_claim(media_kind=kind, url=url, declared_mime=declared) == claim


def test_the_samples_are_what_they_say() -> None:
    """The hand-built samples are valid files of their format, so the table above tests real bytes."""
    with wave.open(io.BytesIO(wav_file())) as reader:
        assert (reader.getnchannels(), reader.getframerate(), reader.getnframes()) == (1, 8000, 80)
    page = ogg_opus()
    assert struct.unpack_from("<I", page, 22)[0] == ogg_crc(page[:22] + bytes(4) + page[26:])
    glb = glb_file()
    assert struct.unpack_from("<I", glb, 8)[0] == len(glb)
    assert json.loads(glb[20:]) == gltf_document()
    mp4 = iso_file(b"isom", b"isom")
    assert struct.unpack_from(">I", mp4)[0] == 20 and mp4[20 + 4 : 20 + 8] == b"mdat"
