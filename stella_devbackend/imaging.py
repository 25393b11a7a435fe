"""Real images for the local backend, drawn with Pillow.

Generated images are deterministic for a prompt and index, so tests can
compare them; edits really transform their source.
"""

from __future__ import annotations

import hashlib
import io
import os

from PIL import Image, ImageDraw, ImageOps

__all__ = ["FORMATS", "SourceError", "decode_source", "edit", "render", "size_for"]

#: output_format -> (Pillow format, MIME type, file extension)
FORMATS: dict[str, tuple[str, str, str]] = {
    "png": ("PNG", "image/png", "png"),
    "jpeg": ("JPEG", "image/jpeg", "jpg"),
    "webp": ("WEBP", "image/webp", "webp"),
}

ASPECT_RATIOS = {"1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21", "5:4", "4:5", "auto"}


class SourceError(ValueError):
    """An edit source that is not a decodable image."""


def size_for(aspect_ratio: str | None, long_edge: int) -> tuple[int, int]:
    """Width and height for an aspect ratio like ``16:9`` (``auto`` or None means square)."""
    if not aspect_ratio or aspect_ratio == "auto":
        return long_edge, long_edge
    w, h = (int(part) for part in aspect_ratio.split(":"))
    if w >= h:
        return long_edge, max(16, round(long_edge * h / w / 8) * 8)
    return max(16, round(long_edge * w / h / 8) * 8), long_edge


def _palette(prompt: str, index: int) -> list[tuple[int, int, int]]:
    digest = hashlib.sha256(f"{prompt}\x00{index}".encode()).digest()
    return [tuple(digest[i : i + 3]) for i in range(0, 12, 3)]  # type: ignore[misc]


def _encode(image: Image.Image, output_format: str) -> bytes:
    pil_format = FORMATS[output_format][0]
    if pil_format == "JPEG" and image.mode != "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    options = {"PNG": {"compress_level": 3}, "JPEG": {"quality": 88}, "WEBP": {"quality": 85}}[pil_format]
    image.save(buffer, pil_format, **options)
    return buffer.getvalue()


def render(prompt: str, width: int, height: int, output_format: str, index: int = 0, noise: bool = False) -> bytes:
    """Draw an image for ``prompt``: a gradient, shapes and a caption (or incompressible noise)."""
    if noise:
        image = Image.frombytes("RGB", (width, height), os.urandom(width * height * 3))
        return _encode(image, output_format)
    top_left, top_right, bottom, accent = _palette(prompt, index)
    corners = Image.new("RGB", (2, 2))
    corners.putdata([top_left, top_right, bottom, accent])
    image = corners.resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    unit = max(4, min(width, height) // 8)
    for i in range(3):
        x = (accent[i] * width) // 256
        y = (bottom[i] * height) // 256
        draw.ellipse((x - unit, y - unit, x + unit, y + unit), outline=accent, width=max(1, unit // 6))
    draw.text((unit // 2, unit // 2), (prompt or "untitled")[:60], fill=(255, 255, 255))
    return _encode(image, output_format)


def decode_source(data: bytes) -> Image.Image:
    """Decode an edit source fully; raise :class:`SourceError` if it is not an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise SourceError(f"source is not a decodable image: {exc}") from None


def edit(source: Image.Image, prompt: str, output_format: str, size: tuple[int, int], index: int = 0) -> bytes:
    """A visible transformation of ``source``: mirrored, posterized, tinted by the prompt."""
    tint = _palette(prompt, index)[0]
    fitted = ImageOps.fit(source, size, Image.Resampling.BILINEAR)
    transformed = ImageOps.posterize(ImageOps.mirror(fitted), 3)
    overlay = Image.new("RGB", size, tint)
    return _encode(Image.blend(transformed, overlay, 0.25), output_format)
