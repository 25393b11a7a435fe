"""Convex JSON values and server timestamps.

Convex sends plain JSON for null, booleans, strings, arrays, objects and
finite float64 numbers. Everything JSON cannot carry faithfully takes a
tagged form: 64-bit integers as ``{"$integer": b64}``, bytes as
``{"$bytes": b64}``, and non-finite or negative-zero floats as
``{"$float": b64}`` (base64 of 8 little-endian bytes). Object keys starting
with ``$`` are reserved.

In Python, a plain ``int`` argument is a float64 number on the wire (as it
is in JavaScript); wrap it in :class:`Int64` to send a Convex 64-bit integer.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any

__all__ = [
    "ConvexValueError",
    "Int64",
    "decode_ts",
    "encode_ts",
    "from_convex_json",
    "to_convex_json",
]

_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1


class ConvexValueError(ValueError):
    """A value that cannot be represented in, or parsed from, Convex JSON."""


class Int64(int):
    """A Convex 64-bit integer (``v.int64()``), distinct from a float64 number."""

    def __new__(cls, value: int) -> Int64:
        if not _I64_MIN <= int(value) <= _I64_MAX:
            raise ConvexValueError(f"{value} does not fit in a signed 64-bit integer")
        return super().__new__(cls, value)


def encode_ts(ts: int) -> str:
    """Encode a server timestamp (u64) as base64 of its 8 little-endian bytes."""
    if isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= _U64_MAX:
        raise ConvexValueError(f"timestamp must be an unsigned 64-bit integer, got {ts!r}")
    return base64.b64encode(struct.pack("<Q", ts)).decode("ascii")


def decode_ts(text: Any) -> int:
    """Decode a server timestamp; raise :class:`ConvexValueError` on anything malformed."""
    if not isinstance(text, str):
        raise ConvexValueError(f"timestamp must be a base64 string, got {type(text).__name__}")
    raw = _b64decode(text, "timestamp")
    if len(raw) != 8:
        raise ConvexValueError(f"timestamp must be 8 bytes, got {len(raw)}")
    value: int = struct.unpack("<Q", raw)[0]
    return value


def to_convex_json(value: Any) -> Any:
    """Turn a Python value into its Convex JSON form."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, Int64):
        return {"$integer": base64.b64encode(struct.pack("<q", value)).decode("ascii")}
    if isinstance(value, (int, float)):
        number = float(value)
        if math.isfinite(number) and not (number == 0.0 and math.copysign(1.0, number) < 0):
            return number
        return {"$float": base64.b64encode(struct.pack("<d", number)).decode("ascii")}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, (list, tuple)):
        return [to_convex_json(item) for item in value]
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConvexValueError(f"object keys must be strings, got {key!r}")
            if key.startswith("$"):
                raise ConvexValueError(f"object key {key!r} starts with the reserved '$'")
            out[key] = to_convex_json(item)
        return out
    raise ConvexValueError(f"{type(value).__name__} is not a Convex value")


def from_convex_json(value: Any) -> Any:
    """Turn Convex JSON into Python: numbers become float, ``$integer`` becomes :class:`Int64`."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        return [from_convex_json(item) for item in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, inner),) = value.items()
            if key == "$integer":
                return Int64(struct.unpack("<q", _tagged_bytes(inner, key, 8))[0])
            if key == "$float":
                return struct.unpack("<d", _tagged_bytes(inner, key, 8))[0]
            if key == "$bytes":
                return _tagged_bytes(inner, key, None)
        for key in value:
            if key.startswith("$"):
                raise ConvexValueError(f"unknown reserved object key {key!r}")
        return {key: from_convex_json(item) for key, item in value.items()}
    raise ConvexValueError(f"{type(value).__name__} is not Convex JSON")


def _tagged_bytes(inner: Any, tag: str, size: int | None) -> bytes:
    if not isinstance(inner, str):
        raise ConvexValueError(f"{tag} must hold a base64 string")
    raw = _b64decode(inner, tag)
    if size is not None and len(raw) != size:
        raise ConvexValueError(f"{tag} must be {size} bytes, got {len(raw)}")
    return raw


def _b64decode(text: str, what: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ConvexValueError(f"{what} is not valid base64: {exc}") from None
