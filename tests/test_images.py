"""validate_image on real files: every allowed format, every way bytes can lie or break."""

from __future__ import annotations

import functools
import hashlib
import io
import random
import struct
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from materializer.images import (
    IMAGE_EXTENSIONS,
    ImageInfo,
    ImageLimits,
    ImageRejected,
    inspect_image,
    memory_needed,
    validate_image,
)

# --- building real images -------------------------------------------------------------------


def noise(size: tuple[int, int], mode: str = "RGB", seed: int = 1) -> Image.Image:
    """Incompressible pixels, so encoders emit real entropy-coded data."""
    bands = len(Image.new(mode, (1, 1)).getbands())
    return Image.frombytes(mode, size, random.Random(seed).randbytes(size[0] * size[1] * bands))


def encode(image: Image.Image, pil_format: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, pil_format, **options)
    return buffer.getvalue()


def animation(pil_format: str, frames: int, size: tuple[int, int] = (16, 16)) -> bytes:
    """An animation whose frames all differ, so no encoder merges them."""
    images = [noise(size, seed=i) for i in range(frames)]
    if pil_format == "GIF":
        images = [image.convert("P") for image in images]
    return encode(images[0], pil_format, save_all=True, append_images=images[1:], duration=40)


def png_chunk(chunk_type: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + chunk_type + data + struct.pack(">I", zlib.crc32(chunk_type + data))


def png_claiming(width: int, height: int) -> bytes:
    """A tiny, well-formed PNG whose header claims ``width`` x ``height`` (one row of real data)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def with_thumbnail(jpeg: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding a whole small JPEG (its own EOI included), as cameras write."""
    payload = b"Exif\x00\x00" + encode(noise((8, 8)), "JPEG")
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def write(tmp_path: Path, data: bytes, name: str = "download.png") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


DEFAULT_LIMITS = ImageLimits()


def reason(tmp_path: Path, data: bytes, limits: ImageLimits = DEFAULT_LIMITS) -> str:
    with pytest.raises(ImageRejected) as refused:
        validate_image(write(tmp_path, data), limits)
    return refused.value.reason


PNG = encode(noise((64, 48)), "PNG")
JPEG = encode(noise((64, 48)), "JPEG", quality=90)
WEBP = encode(noise((64, 48)), "WEBP")
WEBP_LOSSLESS = encode(noise((64, 48)), "WEBP", lossless=True)
GIF = encode(noise((64, 48)).convert("P"), "GIF")


# --- accepted -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "image_format", "ext", "mime"),
    [
        (PNG, "png", "png", "image/png"),
        (encode(noise((64, 48), "RGBA"), "PNG"), "png", "png", "image/png"),
        (encode(noise((64, 48), "L"), "PNG"), "png", "png", "image/png"),
        (encode(noise((64, 48)).convert("P"), "PNG"), "png", "png", "image/png"),
        (encode(Image.new("I;16", (64, 48), 40000), "PNG"), "png", "png", "image/png"),
        (encode(noise((64, 48)), "PNG", optimize=True), "png", "png", "image/png"),
        (JPEG, "jpeg", "jpg", "image/jpeg"),
        (encode(noise((64, 48)), "JPEG", progressive=True), "jpeg", "jpg", "image/jpeg"),
        (encode(noise((64, 48), "L"), "JPEG"), "jpeg", "jpg", "image/jpeg"),
        (encode(noise((64, 48), "CMYK"), "JPEG"), "jpeg", "jpg", "image/jpeg"),
        (encode(noise((64, 48)), "JPEG", restart_marker_blocks=1), "jpeg", "jpg", "image/jpeg"),
        (with_thumbnail(encode(noise((64, 48)), "JPEG")), "jpeg", "jpg", "image/jpeg"),
        (WEBP, "webp", "webp", "image/webp"),
        (WEBP_LOSSLESS, "webp", "webp", "image/webp"),
        (encode(noise((64, 48), "RGBA"), "WEBP"), "webp", "webp", "image/webp"),
        (GIF, "gif", "gif", "image/gif"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_allowed_formats_are_accepted_with_their_facts(
    tmp_path: Path, data: bytes, image_format: str, ext: str, mime: str
) -> None:
    info = validate_image(write(tmp_path, data), ImageLimits())
    assert info == ImageInfo(
        format=image_format,  # type: ignore[arg-type]
        ext=ext,
        mime=mime,
        width=64,
        height=48,
        frames=1,
        bytes=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
    )
    assert info.ext in IMAGE_EXTENSIONS


@pytest.mark.parametrize(("pil_format", "ext"), [("GIF", "gif"), ("WEBP", "webp"), ("PNG", "png")])
def test_animations_are_decoded_frame_by_frame(tmp_path: Path, pil_format: str, ext: str) -> None:
    info = validate_image(write(tmp_path, animation(pil_format, 7)))
    assert (info.ext, info.frames, info.width, info.height) == (ext, 7, 16, 16)


def test_the_bytes_decide_the_extension_not_the_name(tmp_path: Path) -> None:
    info = validate_image(write(tmp_path, JPEG, name="claims.png"))
    assert (info.format, info.ext, info.mime) == ("jpeg", "jpg", "image/jpeg")


def test_a_file_object_is_read_from_its_start_and_left_open(tmp_path: Path) -> None:
    with open(write(tmp_path, WEBP), "rb") as file:
        file.seek(10)
        info = validate_image(file)
        assert not file.closed
    assert (info.format, info.bytes) == ("webp", len(WEBP))


def test_limits_at_exactly_the_maximum_are_accepted(tmp_path: Path) -> None:
    limits = ImageLimits(max_edge=100, max_pixels=100 * 50, max_frames=3, max_decoded_bytes=100 * 50 * 4 * 3)
    still = encode(noise((100, 50)), "PNG")
    assert validate_image(write(tmp_path, still), limits).width == 100
    moving = animation("GIF", 3, size=(100, 50))
    assert validate_image(write(tmp_path, moving), limits).frames == 3


def test_three_hundred_frames_pass_the_default_limit(tmp_path: Path) -> None:
    assert validate_image(write(tmp_path, animation("GIF", 300, size=(2, 2)))).frames == 300


# --- not an image ---------------------------------------------------------------------------


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    assert reason(tmp_path, b"") == "file is empty"


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
        (b"\xef\xbb\xbf\n  <html lang=en><head><title>CDN error", "HTML"),
        (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "SVG or XML"),
        (b'{"error": "expired signature"}', "JSON"),
        (b"Access Denied\n", "text"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3", "a PDF document"),
        (encode(noise((8, 8)), "TIFF"), "a TIFF image"),
        (encode(noise((8, 8)), "BMP"), "a BMP image"),
        (b"PK\x03\x04\x14\x00\x00\x00", "a ZIP archive"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "a RIFF b'WAVE' file"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "an AVIF image"),
        (b"\x89PNG\r\n", "a cut-off image signature"),
        (bytes(range(200, 216)), "unknown data (starting c8 c9 ca cb cc cd ce cf)"),
    ],
)
def test_bytes_that_are_not_an_allowed_image_say_what_they_are(tmp_path: Path, data: bytes, what: str) -> None:
    assert reason(tmp_path, data) == f"bytes are {what}, not a PNG, JPEG, WebP or GIF image"


def test_a_file_over_the_byte_limit_is_refused(tmp_path: Path) -> None:
    limits = ImageLimits(max_file_bytes=len(PNG) - 1)
    assert reason(tmp_path, PNG, limits) == f"file is larger than the {len(PNG) - 1:,} byte limit"


# --- limits and bombs -----------------------------------------------------------------------


def test_an_edge_over_the_limit_is_refused(tmp_path: Path) -> None:
    assert validate_image(write(tmp_path, encode(Image.new("L", (16_384, 1)), "PNG"))).width == 16_384
    refused = reason(tmp_path, encode(Image.new("L", (16_385, 1)), "PNG"))
    assert refused == "image is 16385x1 pixels, an edge over the 16,384 pixel limit"


def test_a_tiny_png_claiming_huge_dimensions_is_refused_before_pillow_sees_it(tmp_path: Path) -> None:
    bomb = png_claiming(12_000, 12_000)
    assert len(bomb) < 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused = reason(tmp_path, bomb)
    assert refused.startswith("image is 12000x12000 = 144,000,000 pixels, over the 100,000,000 limit")
    assert caught == []  # Pillow never got to warn
    assert reason(tmp_path, png_claiming(1_000_000, 1)).startswith("image is 1000000x1 pixels, an edge over")


def test_a_highly_compressible_huge_png_is_refused(tmp_path: Path) -> None:
    bomb = encode(Image.new("1", (12_000, 12_000)), "PNG")
    assert len(bomb) < 64 * 1024  # 144 megapixels in a few kilobytes
    assert "144,000,000 pixels, over the 100,000,000 limit" in reason(tmp_path, bomb)


def test_a_gif_claiming_a_huge_screen_is_refused(tmp_path: Path) -> None:
    gif = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    gif[6:10] = struct.pack("<HH", 12_000, 12_000)
    assert "12000x12000 = 144,000,000 pixels" in reason(tmp_path, bytes(gif))


def test_a_gif_frame_outside_its_screen_cannot_grow_the_canvas_past_the_limit(tmp_path: Path) -> None:
    gif = bytearray(encode(Image.new("P", (4, 4)), "GIF"))
    descriptor = gif.index(b"\x2c\x00\x00\x00\x00\x04\x00\x04\x00")
    gif[descriptor + 1 : descriptor + 3] = struct.pack("<H", 20_000)  # frame left edge far outside
    assert reason(tmp_path, bytes(gif)) == "image is 20004x4 pixels, an edge over the 16,384 pixel limit"


def test_a_webp_claiming_a_huge_canvas_is_refused(tmp_path: Path) -> None:
    vp8x = struct.pack("<B3x", 0) + (16_000 - 1).to_bytes(3, "little") + (16_000 - 1).to_bytes(3, "little")
    inner = WEBP[12:]  # the real VP8 chunk
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x + inner
    refused = reason(tmp_path, b"RIFF" + struct.pack("<I", len(body)) + body)
    assert refused.startswith("image is 16000x16000 = 256,000,000 pixels")


def test_over_the_pixel_limit_is_refused(tmp_path: Path) -> None:
    limits = ImageLimits(max_pixels=100 * 100)
    assert validate_image(write(tmp_path, encode(noise((100, 100)), "JPEG")), limits).width == 100
    refused = reason(tmp_path, encode(noise((101, 100)), "JPEG"), limits)
    assert refused == "image is 101x100 = 10,100 pixels, over the 10,000 limit (a decompression bomb?)"


@pytest.mark.parametrize("pil_format", ["GIF", "WEBP", "PNG"])
def test_too_many_frames_are_refused(tmp_path: Path, pil_format: str) -> None:
    refused = reason(tmp_path, animation(pil_format, 4), ImageLimits(max_frames=3))
    assert refused == "image has 4 frames, over the 3 limit"


def test_three_hundred_and_one_frames_are_refused_by_default(tmp_path: Path) -> None:
    assert reason(tmp_path, animation("GIF", 301, size=(2, 2))) == "image has 301 frames, over the 300 limit"


def test_an_apng_declaring_absurdly_many_frames_is_refused(tmp_path: Path) -> None:
    apng = animation("PNG", 2)
    start = apng.index(b"acTL") - 4
    forged = apng[:start] + png_chunk(b"acTL", struct.pack(">II", 2**31 - 1, 0)) + apng[start + 20 :]
    assert reason(tmp_path, forged) == "image has 2,147,483,647 frames, over the 300 limit"


def test_the_decoded_size_counts_every_frame(tmp_path: Path) -> None:
    limits = ImageLimits(max_decoded_bytes=16 * 16 * 4 * 5 - 1)
    refused = reason(tmp_path, animation("WEBP", 5), limits)
    assert refused == "decoding needs 5,120 bytes (16x16 RGBA x 5 frames), over the 5,119 limit"


def test_pillows_own_bomb_error_is_a_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    refused = reason(tmp_path, encode(noise((50, 50)), "PNG"))
    assert refused.startswith("Pillow refused it as a decompression bomb: Image size (2500 pixels)")


def test_pillows_bomb_warning_becomes_a_refusal_only_when_the_process_made_it_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 is in Pillow's warning band
    path = write(tmp_path, encode(noise((40, 40)), "PNG"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert validate_image(path).width == 40  # within our limits: the warning decides nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ImageRejected, match="^Pillow warned of a decompression bomb: Image size"):
            validate_image(path)


def test_load_truncated_images_switched_on_stops_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        validate_image(write(tmp_path, PNG))


def test_limits_must_be_positive_integers() -> None:
    with pytest.raises(ValueError, match="max_edge must be a positive integer"):
        ImageLimits(max_edge=0)
    with pytest.raises(ValueError, match="max_frames must be a positive integer"):
        ImageLimits(max_frames=True)


# --- truncated, corrupt, polyglot -----------------------------------------------------------


def flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1 :]


def idat_offset(png: bytes) -> int:
    return png.index(b"IDAT") - 4


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (PNG[: len(PNG) // 2], "truncated: PNG chunk 'IDAT' at offset 33 is cut off"),
        (PNG[:-12], "truncated: PNG ends before its IEND chunk"),
        (PNG[:-1], "truncated: PNG chunk 'IEND' at offset"),
        (JPEG[: len(JPEG) // 2], "truncated: JPEG scan data ends before its end-of-image marker"),
        (JPEG[:-2], "truncated: JPEG scan data ends before its end-of-image marker"),
        (JPEG[:100], "truncated: JPEG marker segment"),
        (WEBP[: len(WEBP) // 2], f"truncated: WebP declares {len(WEBP):,} bytes but the file has {len(WEBP) // 2:,}"),
        (WEBP_LOSSLESS[:-1], "truncated: WebP declares"),
        (GIF[: len(GIF) // 2], "truncated: GIF ends inside a data block"),
        (GIF[:-1], "truncated: GIF ends before its trailer"),
        (GIF[:10], "truncated: GIF ends inside its header"),
    ],
    ids=[
        "png-half", "png-no-iend", "png-cut-iend", "jpeg-half", "jpeg-no-eoi", "jpeg-cut-header",
        "webp-half", "webp-lossless-1", "gif-half", "gif-no-trailer", "gif-header",
    ],
)  # fmt: skip
def test_truncated_images_are_refused(tmp_path: Path, data: bytes, expected: str) -> None:
    assert reason(tmp_path, data).startswith(expected)


def test_truncated_animations_are_refused(tmp_path: Path) -> None:
    for pil_format in ("GIF", "WEBP", "PNG"):
        whole = animation(pil_format, 5)
        assert reason(tmp_path, whole[: len(whole) * 2 // 3]).startswith("truncated: ")


def test_a_png_with_a_broken_idat_crc_is_refused(tmp_path: Path) -> None:
    length = struct.unpack(">I", PNG[idat_offset(PNG) : idat_offset(PNG) + 4])[0]
    broken = flip(PNG, idat_offset(PNG) + 8 + length)  # first byte of the IDAT CRC
    assert reason(tmp_path, broken) == "corrupt: PNG chunk 'IDAT' at offset 33 fails its CRC check"


def test_a_png_with_a_broken_header_crc_is_refused(tmp_path: Path) -> None:
    assert reason(tmp_path, flip(PNG, 29)) == "corrupt: PNG chunk 'IHDR' at offset 8 fails its CRC check"


def test_a_png_whose_compressed_data_is_broken_under_a_valid_crc_is_refused(tmp_path: Path) -> None:
    start = idat_offset(PNG)
    length = struct.unpack(">I", PNG[start : start + 4])[0]
    body = bytearray(PNG[start + 8 : start + 8 + length])
    body[10] ^= 0xFF
    rebuilt = PNG[:start] + png_chunk(b"IDAT", bytes(body)) + PNG[start + 12 + length :]
    assert reason(tmp_path, rebuilt).startswith("Pillow cannot decode it: OSError: broken data stream")


def test_a_png_without_image_data_is_refused(tmp_path: Path) -> None:
    ihdr = struct.pack(">IIBBBBB", 4, 4, 8, 0, 0, 0, 0)
    no_idat = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")
    assert reason(tmp_path, no_idat) == "corrupt: PNG has no image data (IDAT chunk)"


def test_broken_jpeg_structure_is_refused(tmp_path: Path) -> None:
    sof = JPEG.index(b"\xff\xc0")
    assert "has an impossible length" in reason(tmp_path, JPEG[: sof + 2] + b"\x00\x01" + JPEG[sof + 4 :])
    zero_height = JPEG[: sof + 5] + b"\x00\x00" + JPEG[sof + 7 :]
    assert reason(tmp_path, zero_height) == "corrupt: image is 64x0 pixels"
    dht = JPEG.index(b"\xff\xc4")
    garbage_table = JPEG[: dht + 4] + b"\xff" * 20 + JPEG[dht + 24 :]
    assert reason(tmp_path, garbage_table).startswith("Pillow cannot decode it: ")
    assert reason(tmp_path, b"\xff\xd8\xff\xd9") == "corrupt: JPEG has no frame header"


def test_broken_webp_structure_is_refused(tmp_path: Path) -> None:
    shrunk = WEBP[:4] + struct.pack("<I", len(WEBP) - 10) + WEBP[8:]
    assert reason(tmp_path, shrunk) == "corrupt: WebP chunk b'VP8 ' at offset 12 runs past the end of the RIFF data"
    unknown = WEBP[:12] + b"JUNK" + WEBP[16:]
    assert reason(tmp_path, unknown) == "corrupt: WebP starts with a malformed or unknown b'JUNK' chunk"


def test_broken_gif_structure_is_refused(tmp_path: Path) -> None:
    screen_only = b"GIF89a" + struct.pack("<HHBBB", 4, 4, 0, 0, 0) + b"\x3b"
    assert reason(tmp_path, screen_only) == "corrupt: GIF contains no image"
    assert reason(tmp_path, GIF[:-1] + b"\x99\x3b").startswith("corrupt: GIF has an unknown block 0x99")


@pytest.mark.parametrize(
    ("image", "name"),
    [(PNG, "PNG"), (JPEG, "JPEG"), (WEBP, "WebP"), (GIF, "GIF")],
)
@pytest.mark.parametrize(
    ("tail", "what"),
    [
        (b"<html><script>alert(document.cookie)</script></html>", "HTML"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00", "a ZIP archive"),
        (b"\x00", "unknown data (starting 00)"),
    ],
)
def test_polyglots_are_refused(tmp_path: Path, image: bytes, name: str, tail: bytes, what: str) -> None:
    assert reason(tmp_path, image + tail) == (
        f"{name} image is followed by {len(tail)} bytes of {what}; "
        "files that are also something else (polyglots) are refused"
    )


# --- robustness -----------------------------------------------------------------------------


def test_validation_runs_safely_in_many_threads_at_once(tmp_path: Path) -> None:
    samples = {
        "png": PNG, "jpeg": JPEG, "webp": WEBP, "gif": GIF, "anim": animation("WEBP", 4),
        "html": b"<html></html>", "truncated": PNG[:-12], "polyglot": JPEG + b"<html>",
        "bomb": png_claiming(20_000, 9_000),
    }  # fmt: skip
    paths = {label: write(tmp_path, data, f"{label}.bin") for label, data in samples.items()}

    def outcome(path: Path) -> str:
        try:
            return validate_image(path).sha256
        except ImageRejected as refused:
            return refused.reason

    expected = {label: outcome(path) for label, path in paths.items()}
    jobs = list(paths.items()) * 6
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda item: (item[0], outcome(item[1])), jobs))
    assert all(result == expected[label] for label, result in results)
    assert expected["anim"] == hashlib.sha256(samples["anim"]).hexdigest()
    assert expected["bomb"].startswith("image is 20000x9000")


SEEDS = [PNG, JPEG, WEBP, WEBP_LOSSLESS, GIF, animation("GIF", 3, (8, 8)), animation("PNG", 3, (8, 8))]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.sampled_from(SEEDS),
    edits=st.lists(st.tuples(st.integers(min_value=0), st.integers(min_value=0, max_value=255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
)
def test_mangled_images_are_accepted_or_refused_never_anything_else(
    seed: bytes, edits: list[tuple[int, int]], cut: int | None
) -> None:
    data = bytearray(seed)
    for offset, value in edits:
        data[offset % len(data)] = value
    if cut is not None:
        del data[cut % len(data) :]
    try:
        info = validate_image(io.BytesIO(bytes(data)))
    except ImageRejected as refused:
        assert refused.reason
    else:
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert info.width >= 1 and info.height >= 1 and info.frames >= 1


# --- memory: the structure first, then a decode that fits -------------------------------------------

MIB = 1 << 20


def gray_png(width: int, height: int, rows: bytes | None = None, *, stream: bytes | None = None) -> bytes:
    """A grayscale PNG from raw filtered ``rows`` (all filter 0 and black by default), or a given zlib ``stream``."""
    if stream is None:
        stream = zlib.compress(rows if rows is not None else (b"\x00" + bytes(width)) * height)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", stream) + png_chunk(b"IEND", b"")


#: Large stills, each built the first time a test asks for it (building them all takes a second of CPU,
#: which every worker would spend at collection).
BIG_STILL_BUILDERS: dict[str, Callable[[], bytes]] = {
    "rgb": lambda: encode(noise((1024, 1024)), "PNG"),
    "rgba": lambda: encode(noise((1024, 768), "RGBA"), "PNG"),
    "gray": lambda: encode(noise((1024, 1024), "L"), "PNG"),
    "palette": lambda: encode(noise((1024, 1024)).convert("P"), "PNG"),
    "16-bit": lambda: encode(Image.new("I;16", (1100, 1000), 40000), "PNG"),
    "1-bit": lambda: encode(noise((1027, 1021), "L").convert("1"), "PNG"),
    "interlaced": lambda: encode(noise((1023, 1021)), "PNG", interlace=1),
    "interlaced-gray": lambda: encode(noise((1001, 1013), "L"), "PNG", interlace=1),
    "sequential-jpeg": lambda: encode(noise((1024, 1024)), "JPEG"),
    "progressive-jpeg": lambda: encode(noise((1024, 1024)), "JPEG", progressive=True),
    "apng": lambda: animation("PNG", 8, (600, 600)),
    "webp": lambda: encode(noise((1024, 1024)), "WEBP"),
}
BOUNDABLE = ["rgb", "rgba", "gray", "palette", "16-bit", "1-bit", "interlaced", "interlaced-gray", "sequential-jpeg"]


@functools.cache
def big_image(name: str) -> bytes:
    return BIG_STILL_BUILDERS[name]()


@pytest.mark.parametrize(
    ("data", "facts"),
    [
        (PNG, ("png", 64, 48, 1, True)),
        (animation("PNG", 3), ("png", 16, 16, 3, False)),
        (JPEG, ("jpeg", 64, 48, 1, True)),
        (encode(noise((64, 48)), "JPEG", progressive=True), ("jpeg", 64, 48, 1, False)),
        (WEBP, ("webp", 64, 48, 1, False)),
        (GIF, ("gif", 64, 48, 1, False)),
        (animation("WEBP", 4), ("webp", 16, 16, 4, False)),
    ],
)
def test_inspect_image_reads_what_the_structure_says(tmp_path: Path, data: bytes,
                                                      facts: tuple[str, int, int, int, bool]) -> None:
    path = write(tmp_path, data)
    header = inspect_image(path)
    assert (header.format, header.width, header.height, header.frames, header.boundable) == facts
    with open(path, "rb") as opened:  # an open file is mapped too, and left open
        assert inspect_image(opened) == header
        assert not opened.closed
    info = validate_image(path)
    assert (info.format, info.width, info.height, info.frames) == facts[:4]
    assert header.decoded_bytes == info.width * info.height * 4 * info.frames


@pytest.mark.parametrize("data", [b"<html>hi</html>", png_claiming(20_000, 9_000), PNG[:-12], JPEG + b"<html>", b""],
                         ids=["html", "bomb", "truncated", "polyglot", "empty"])
def test_inspect_image_refuses_what_validation_refuses_on_structure(tmp_path: Path, data: bytes) -> None:
    path = write(tmp_path, data)
    with pytest.raises(ImageRejected) as inspected:
        inspect_image(path)
    assert inspected.value.reason == reason(tmp_path, data)
    assert memory_needed(path, DEFAULT_LIMITS, None) == len(data)  # validating it stops at the same refusal


def test_memory_needed_is_the_file_and_its_decode(tmp_path: Path) -> None:
    still, jpeg, moving = big_image("rgb"), big_image("sequential-jpeg"), animation("PNG", 30, (200, 200))
    for data, full in ((still, 1024 * 1024 * 4), (jpeg, 1024 * 1024 * 4), (moving, 200 * 200 * 4 * 30)):
        assert memory_needed(write(tmp_path, data), DEFAULT_LIMITS, None) == len(data) + full
    # Over the limit, a still PNG needs its inflate steps and a sequential JPEG an eighth of each edge;
    # an animation has no bounded decode and needs all of it.
    assert memory_needed(write(tmp_path, still), DEFAULT_LIMITS, MIB) == len(still) + 2 * MIB
    assert memory_needed(write(tmp_path, jpeg), DEFAULT_LIMITS, MIB) == len(jpeg) + 128 * 128 * 4
    assert memory_needed(write(tmp_path, moving), DEFAULT_LIMITS, MIB) == len(moving) + 200 * 200 * 4 * 30
    # Within the limit, the full decode.
    assert memory_needed(write(tmp_path, still), DEFAULT_LIMITS, 8 * MIB) == len(still) + 1024 * 1024 * 4


@pytest.mark.parametrize("name", sorted(BOUNDABLE))
def test_an_image_over_the_full_decode_limit_is_checked_in_bounded_memory_with_the_same_result(
        tmp_path: Path, name: str) -> None:
    path = write(tmp_path, big_image(name))
    assert inspect_image(path).boundable
    assert validate_image(path, full_decode_limit=MIB) == validate_image(path)


@pytest.mark.parametrize("name", ["progressive-jpeg", "apng", "webp"])
def test_an_image_without_a_bounded_decode_is_decoded_whole_whatever_the_limit(tmp_path: Path, name: str) -> None:
    data = big_image(name)
    path = write(tmp_path, data)
    header = inspect_image(path)
    assert not header.boundable
    assert memory_needed(path, DEFAULT_LIMITS, MIB) == len(data) + header.decoded_bytes
    assert validate_image(path, full_decode_limit=MIB) == validate_image(path)


WIDE, TALL = 2048, 1024  # 8 MiB decoded: over a 1 MiB limit, so checked row by row
ROW = b"\x00" + bytes(WIDE)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (gray_png(WIDE, TALL, ROW * 600 + b"\x09" + ROW[1:] + ROW * (TALL - 601)),
         "corrupt: PNG row 601 of 1,024 has an unknown filter type 9"),
        (gray_png(WIDE, TALL, stream=zlib.compress(ROW * TALL)[:-4000]),
         "truncated: PNG image data is cut off after"),
        (gray_png(WIDE, TALL, ROW * (TALL - 1)),
         "truncated: PNG image data ends after 2,096,127 of the 2,098,176 bytes its 1,024 rows need"),
        (gray_png(WIDE, TALL, stream=b"\x78\x9c" + bytes(range(256)) * 64),
         "corrupt: PNG image data does not inflate (row 1 of 1,024)"),
    ],
    ids=["unknown-filter", "cut-off-stream", "missing-last-row", "not-zlib"],
)
def test_the_bounded_png_check_refuses_broken_image_data_precisely(tmp_path: Path, data: bytes, expected: str) -> None:
    with pytest.raises(ImageRejected) as refused:
        validate_image(write(tmp_path, data), full_decode_limit=MIB)
    assert refused.value.reason.startswith(expected)


def test_the_bounded_png_check_ignores_data_past_the_last_row_as_pillow_does(tmp_path: Path) -> None:
    data = gray_png(WIDE, TALL, ROW * (TALL + 5))
    assert validate_image(write(tmp_path, data), full_decode_limit=MIB) == validate_image(write(tmp_path, data))


def test_a_large_png_within_every_limit_is_checked_without_its_pixels(tmp_path: Path) -> None:
    """10000 x 10000 pixels (400 MB decoded, the limit) in bounded memory; Pillow would need the 400 MB."""
    rows = zlib.compressobj(9)
    stream = b"".join(rows.compress(b"\x00" + bytes(10_000)) for _ in range(10_000)) + rows.flush()
    path = write(tmp_path, gray_png(10_000, 10_000, stream=stream))
    assert memory_needed(path, DEFAULT_LIMITS, 256 * MIB) < 4 * MIB
    info = validate_image(path, full_decode_limit=256 * MIB)
    assert (info.width, info.height, info.frames) == (10_000, 10_000, 1)


def test_inspect_image_leaves_png_checksums_to_validation(tmp_path: Path) -> None:
    """The structure walk that sizes the reservation skips the CRCs (they cost a pass over the file); the sizes
    are the same either way, and validation, on the same bytes, refuses the broken checksum."""
    length = struct.unpack(">I", PNG[idat_offset(PNG) : idat_offset(PNG) + 4])[0]
    path = write(tmp_path, flip(PNG, idat_offset(PNG) + 8 + length))
    header = inspect_image(path)
    assert (header.width, header.height, header.frames) == (64, 48, 1)
    with pytest.raises(ImageRejected, match="fails its CRC check"):
        validate_image(path)
