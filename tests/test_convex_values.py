"""Convex JSON values and server timestamps (materializer.convex.values)."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from materializer.convex.values import (
    ConvexValueError,
    Int64,
    decode_ts,
    encode_ts,
    from_convex_json,
    to_convex_json,
)


def same(a: Any, b: Any) -> bool:
    """Strict equality: types must match, floats compare by their bits (so -0.0 != 0.0, NaN == NaN)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


keys = st.text(max_size=8).filter(lambda k: not k.startswith("$"))
convex_values = st.recursive(
    st.none()
    | st.booleans()
    | st.text(max_size=20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**63), 2**63 - 1).map(Int64)
    | st.binary(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=4),
    max_leaves=20,
)


@given(convex_values)
def test_values_round_trip_through_the_wire(value: Any) -> None:
    wire_text = json.dumps(to_convex_json(value), allow_nan=False)
    assert same(from_convex_json(json.loads(wire_text)), value)


@given(st.integers(0, 2**64 - 1))
def test_timestamps_round_trip(ts: int) -> None:
    text = encode_ts(ts)
    assert len(text) == 12 and text.endswith("=")
    assert decode_ts(text) == ts


@pytest.mark.parametrize(
    ("ts", "text"),
    [(0, "AAAAAAAAAAA="), (1, "AQAAAAAAAAA="), (256, "AAEAAAAAAAA="), (2**64 - 1, "//////////8=")],
)
def test_timestamps_are_little_endian_base64(ts: int, text: str) -> None:
    assert encode_ts(ts) == text
    assert decode_ts(text) == ts


@pytest.mark.parametrize("bad", [-1, 2**64, 1.0, True, "0", None])
def test_encode_ts_refuses_what_is_not_a_u64(bad: Any) -> None:
    with pytest.raises(ConvexValueError):
        encode_ts(bad)


@pytest.mark.parametrize("bad", [0, None, "not base64!", "AAAA", "AAAAAAAAAAAAAA==", "AAAAAAAAAAA"])
def test_decode_ts_refuses_malformed_text(bad: Any) -> None:
    with pytest.raises(ConvexValueError):
        decode_ts(bad)


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (Int64(1), {"$integer": "AQAAAAAAAAA="}),
        (Int64(-1), {"$integer": "//////////8="}),
        (math.inf, {"$float": "AAAAAAAA8H8="}),
        (-math.inf, {"$float": "AAAAAAAA8P8="}),
        (-0.0, {"$float": "AAAAAAAAAIA="}),
        (b"\x00\x01", {"$bytes": "AAE="}),
        (b"", {"$bytes": ""}),
    ],
)
def test_tagged_forms(value: Any, wire: dict[str, str]) -> None:
    assert to_convex_json(value) == wire
    assert same(from_convex_json(wire), value)


def test_nan_is_tagged_and_comes_back_as_nan() -> None:
    wire = to_convex_json(math.nan)
    assert set(wire) == {"$float"}
    assert math.isnan(from_convex_json(wire))


def test_plain_ints_are_float64_numbers_and_bools_stay_bools() -> None:
    wire = to_convex_json({"limit": 50, "flag": True, "zero": 0, "nested": [1, False]})
    assert same(wire, {"limit": 50.0, "flag": True, "zero": 0.0, "nested": [1.0, False]})
    assert same(from_convex_json({"n": 5}), {"n": 5.0})


def test_an_object_whose_only_key_is_ordinary_is_an_object() -> None:
    assert from_convex_json({"integer": "AQAAAAAAAAA="}) == {"integer": "AQAAAAAAAAA="}


@pytest.mark.parametrize(
    "value",
    [
        {1: "non-string key"},
        {"$reserved": 1},
        {1, 2},
        object(),
        complex(1, 2),
    ],
    ids=["int-key", "dollar-key", "set", "object", "complex"],
)
def test_to_convex_json_refuses_what_convex_cannot_hold(value: Any) -> None:
    with pytest.raises(ConvexValueError):
        to_convex_json(value)


@pytest.mark.parametrize("bad", [2**63, -(2**63) - 1])
def test_int64_refuses_out_of_range(bad: int) -> None:
    with pytest.raises(ConvexValueError):
        Int64(bad)


@pytest.mark.parametrize(
    "wire",
    [
        {"$integer": "AQAAAA=="},  # 4 bytes
        {"$integer": 1},
        {"$float": "not base64"},
        {"$bytes": None},
        {"$unknown": "x"},
        {"$integer": "AQAAAAAAAAA=", "extra": 1},
        object(),
    ],
    ids=["short-int", "int-not-string", "float-bad-b64", "bytes-none", "unknown-tag", "tag-plus-key", "object"],
)
def test_from_convex_json_refuses_malformed_values(wire: Any) -> None:
    with pytest.raises(ConvexValueError):
        from_convex_json(wire)
