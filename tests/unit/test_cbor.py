"""Unit tests for the strict CBOR codec (ism.formats.cbor)."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ism.errors import ErrorCode, FormatError
from ism.formats import cbor
from ism.formats.cbor import UNDEFINED, Limits, Tag

# Deterministic: the same examples on every run, nothing written to a database.
PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=300)
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=1500)

INT_EDGES = [
    0,
    1,
    23,
    24,
    255,
    256,
    65535,
    65536,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -1,
    -24,
    -25,
    -256,
    -257,
    -65536,
    -65537,
    -(2**32),
    -(2**32) - 1,
    -(2**63),
    -(2**63) - 1,
    -(2**64),
]

ints = st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.sampled_from(INT_EDGES)
floats = st.floats(allow_nan=False) | st.sampled_from([0.0, -0.0, math.inf, -math.inf, 65504.0, 5.96e-08, 1e300])
scalars = st.none() | st.booleans() | ints | floats | st.binary(max_size=40) | st.text(max_size=20)
keys = ints | st.binary(max_size=8) | st.text(max_size=8)
tag_numbers = st.integers(min_value=0, max_value=2**64 - 1)


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=5)
        | st.dictionaries(keys, children, max_size=5)
        | st.builds(Tag, tag_numbers, children)
    )


values = st.recursive(scalars, _extend, max_leaves=25)


DEFAULT = Limits()


def _rule(data: bytes, limits: Limits = DEFAULT) -> str:
    with pytest.raises(FormatError) as info:
        cbor.loads(data, limits)
    assert info.value.code == ErrorCode.FORMAT
    return info.value.rule


# ---------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------


@PROPERTY
@given(values)
def test_round_trip(value: Any) -> None:
    encoded = cbor.dumps(value)
    decoded = cbor.loads(encoded)
    assert decoded == value
    # Canonical: re-encoding what was decoded gives the very same bytes, which
    # also catches type drift that == hides (1 vs 1.0 vs True, 0.0 vs -0.0).
    assert cbor.dumps(decoded) == encoded


@PROPERTY
@given(ints)
def test_int_round_trip(value: int) -> None:
    decoded = cbor.loads(cbor.dumps(value))
    assert decoded == value
    assert type(decoded) is int


@PROPERTY
@given(st.binary(max_size=300), st.text(max_size=100))
def test_bytes_and_text_round_trip(raw: bytes, text: str) -> None:
    assert cbor.loads(cbor.dumps(raw)) == raw
    assert cbor.loads(cbor.dumps(text)) == text
    assert cbor.loads(cbor.dumps(bytearray(raw))) == raw
    assert cbor.loads(memoryview(cbor.dumps(raw))) == raw


@PROPERTY
@given(st.floats(allow_nan=False))
def test_float_round_trip_keeps_value_and_sign(value: float) -> None:
    decoded = cbor.loads(cbor.dumps(value))
    assert isinstance(decoded, float)
    assert decoded == value
    assert math.copysign(1.0, decoded) == math.copysign(1.0, value)


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (None, "f6"),
        (True, "f5"),
        (False, "f4"),
        (UNDEFINED, "f7"),
        (0.0, "f90000"),
        (-0.0, "f98000"),
        (1.5, "f93e00"),
        (65504.0, "f97bff"),
        (100000.0, "fa47c35000"),
        (1.1, "fb3ff199999999999a"),
        (math.inf, "f97c00"),
        (-math.inf, "f9fc00"),
        (math.nan, "f97e00"),
    ],
)
def test_simple_and_float_encodings(value: Any, encoded: str) -> None:
    assert cbor.dumps(value).hex() == encoded
    decoded = cbor.loads(bytes.fromhex(encoded))
    if isinstance(value, float) and math.isnan(value):
        assert math.isnan(decoded)
    else:
        assert decoded == value
        assert type(decoded) is type(value)


def test_tags_round_trip() -> None:
    value = Tag(107, {2: b"auth", 3: Tag(1070, [1, "x"])})
    encoded = cbor.dumps(value)
    assert encoded[:2] == b"\xd8\x6b"
    assert cbor.loads(encoded) == value
    assert cbor.loads(cbor.dumps(Tag(2**64 - 1, None))) == Tag(2**64 - 1, None)


# ---------------------------------------------------------------------------
# Deterministic encoding (RFC 8949 section 4.2.1)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "00"),
        (23, "17"),
        (24, "1818"),
        (255, "18ff"),
        (256, "190100"),
        (65535, "19ffff"),
        (65536, "1a00010000"),
        (2**32 - 1, "1affffffff"),
        (2**32, "1b0000000100000000"),
        (2**63, "1b8000000000000000"),
        (2**64 - 1, "1bffffffffffffffff"),
        (-1, "20"),
        (-24, "37"),
        (-25, "3818"),
        (-256, "38ff"),
        (-257, "390100"),
        (-(2**63), "3b7fffffffffffffff"),
        (-(2**64), "3bffffffffffffffff"),
        (b"", "40"),
        (b"\x00" * 24, "5818" + "00" * 24),
        ("a", "6161"),
        ([], "80"),
        ([1] * 24, "9818" + "01" * 24),
        ({}, "a0"),
    ],
)
def test_shortest_form(value: Any, encoded: str) -> None:
    assert cbor.dumps(value).hex() == encoded
    assert cbor.loads(bytes.fromhex(encoded)) == value


@pytest.mark.parametrize("value", [2**64, -(2**64) - 1])
def test_int_out_of_range_is_refused(value: int) -> None:
    with pytest.raises(FormatError) as info:
        cbor.dumps(value)
    assert info.value.rule == "cbor.int-range"


def test_unencodable_type() -> None:
    with pytest.raises(FormatError) as info:
        cbor.dumps({1, 2})
    assert info.value.rule == "cbor.unencodable"


def test_map_keys_sorted_bytewise() -> None:
    value = {"a": 1, (1,): 7, 100: 2, b"x": 6, -1: 3, 10: 4, 1: 5}
    # Sorted by the bytes of the encoded key: 01 < 0a < 1864 < 20 < 4178 < 6161 < 8101.
    assert cbor.dumps(value).hex() == "a7" + "0105" + "0a04" + "186402" + "2003" + "417806" + "616101" + "810107"


def test_map_key_order_independent_of_insertion() -> None:
    a = {1: "x", 2: "y", "k": [1]}
    b = {"k": [1], 2: "y", 1: "x"}
    assert cbor.dumps(a) == cbor.dumps(b)


@PROPERTY
@given(st.dictionaries(keys, st.integers(min_value=0, max_value=9), max_size=12))
def test_encoded_map_keys_are_sorted(value: dict[Any, int]) -> None:
    decoded = cbor.loads(cbor.dumps(value))
    # Python dicts keep insertion (here: wire) order.
    wire_keys = [cbor.dumps(k) for k in decoded]
    assert wire_keys == sorted(wire_keys)


# ---------------------------------------------------------------------------
# Rejection rules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "hexdata",
    [
        "",  # empty input
        "19",  # uint16 head without its argument
        "1901",  # uint16 with one byte of two
        "1b00000000",  # uint64 with four bytes of eight
        "6261",  # text of length 2 with one byte
        "4501020304",  # bytes of length 5 with four
        "8201",  # array of 2 with one item
        "a201",  # map of 2 pairs with one key
        "a101",  # map pair without its value
        "c1",  # tag without content
        "f9",  # half float without its bytes
        "fb000000",  # double with four bytes of eight
    ],
)
def test_truncated(hexdata: str) -> None:
    assert _rule(bytes.fromhex(hexdata)) == "cbor.truncated"


def test_trailing() -> None:
    assert _rule(b"\x01\x02") == "cbor.trailing"
    assert _rule(bytes.fromhex("8101") + b"\x00") == "cbor.trailing"


def test_duplicate_key() -> None:
    assert _rule(bytes.fromhex("a2" + "0102" + "0103")) == "cbor.duplicate-key"
    assert _rule(bytes.fromhex("a2" + "616101" + "616102")) == "cbor.duplicate-key"
    # Duplicate array keys (decoded to tuples) are caught too.
    assert _rule(bytes.fromhex("a2" + "820102" + "00" + "820102" + "01")) == "cbor.duplicate-key"


@pytest.mark.parametrize(
    ("hexdata", "expected"),
    [
        ("9f0102ff", [1, 2]),
        ("9fff", []),
        ("bf0102ff", {1: 2}),
        ("5f41614162ff", b"ab"),
        ("7f61616162ff", "ab"),
        ("9f9f01ffff", [[1]]),
    ],
)
def test_indefinite_rejected_by_default_accepted_when_allowed(hexdata: str, expected: Any) -> None:
    data = bytes.fromhex(hexdata)
    assert _rule(data) == "cbor.indefinite"
    assert cbor.loads(data, Limits(allow_indefinite=True)) == expected


def test_indefinite_string_chunks_must_match() -> None:
    allow = Limits(allow_indefinite=True)
    assert _rule(bytes.fromhex("5f6161ff"), allow) == "cbor.bad-chunk"  # text chunk in a byte string
    assert _rule(bytes.fromhex("5f5fffff"), allow) == "cbor.bad-chunk"  # nested indefinite chunk
    assert _rule(bytes.fromhex("5f4161"), allow) == "cbor.truncated"  # no break
    assert _rule(bytes.fromhex("9f01"), allow) == "cbor.truncated"


def test_break_outside_indefinite() -> None:
    assert _rule(b"\xff") == "cbor.unexpected-break"
    assert _rule(bytes.fromhex("8201ff")) == "cbor.unexpected-break"
    allow = Limits(allow_indefinite=True)
    assert _rule(b"\xff", allow) == "cbor.unexpected-break"
    assert _rule(bytes.fromhex("8201ff"), allow) == "cbor.unexpected-break"
    assert _rule(bytes.fromhex("a101ff"), allow) == "cbor.unexpected-break"
    assert _rule(bytes.fromhex("c1ff"), allow) == "cbor.unexpected-break"


def test_too_deep() -> None:
    assert _rule(b"\x81" * 40 + b"\x00") == "cbor.too-deep"
    assert _rule(b"\xc1" * 40 + b"\x00") == "cbor.too-deep"  # nested tags count too
    limits = Limits(max_depth=2)
    assert cbor.loads(b"\x81\x81\x00", limits) == [[0]]
    assert _rule(b"\x81\x81\x81\x00", limits) == "cbor.too-deep"
    # Even a generous limit cannot be turned into a RecursionError.
    assert _rule(b"\x81" * 100_000 + b"\x00", Limits(max_depth=10**9)) == "cbor.too-deep"


def test_too_many_items() -> None:
    limits = Limits(max_items=3)
    assert cbor.loads(bytes.fromhex("83010203"), limits) == [1, 2, 3]
    assert _rule(bytes.fromhex("8401020304"), limits) == "cbor.too-many-items"
    # The count is cumulative over the whole item.
    assert _rule(bytes.fromhex("82" + "820102" + "820304"), Limits(max_items=5)) == "cbor.too-many-items"
    # A map of 2 pairs is 4 items.
    assert _rule(bytes.fromhex("a2" + "0102" + "0304"), limits) == "cbor.too-many-items"
    # Default limit: an array declaring 100001 items is refused before anything is read.
    assert _rule(bytes.fromhex("9a000186a1")) == "cbor.too-many-items"
    allow = Limits(max_items=2, allow_indefinite=True)
    assert _rule(bytes.fromhex("9f010203ff"), allow) == "cbor.too-many-items"


@pytest.mark.parametrize(
    "hexdata",
    [
        "1c",  # uint, info 28
        "3d",  # nint, info 29
        "5e",  # bstr, info 30
        "9c",  # array, info 28
        "dc00",  # tag, info 28
        "fc",  # simple/float, info 28
        "1f",  # indefinite uint
        "3f",  # indefinite nint
        "df00",  # indefinite tag
    ],
)
def test_reserved_info(hexdata: str) -> None:
    assert _rule(bytes.fromhex(hexdata)) == "cbor.reserved-info"


@pytest.mark.parametrize("hexdata", ["62c328", "61ff", "63eda080", "a161ff00"])
def test_utf8(hexdata: str) -> None:
    assert _rule(bytes.fromhex(hexdata)) == "cbor.utf8"


def test_map_key() -> None:
    assert _rule(bytes.fromhex("a1a000")) == "cbor.map-key"
    assert _rule(bytes.fromhex("a181a000")) == "cbor.map-key"  # a map inside an array key
    assert _rule(bytes.fromhex("a1c1a000")) == "cbor.map-key"  # a map inside a tagged key


@pytest.mark.parametrize(
    "hexdata",
    [
        pytest.param("a1f501", id="true-poses-as-label-1"),
        pytest.param("a1f93c0001", id="half-float-1.0"),
        pytest.param("a2f97e0001f97e0002", id="two-nan-keys"),
        pytest.param("a1f601", id="null"),
        pytest.param("a1f701", id="undefined"),
        pytest.param("a181f501", id="bool-inside-array-key"),
    ],
)
def test_map_key_types_that_would_collide(hexdata: str) -> None:
    assert _rule(bytes.fromhex(hexdata)) == "cbor.map-key"


@pytest.mark.parametrize("hexdata", ["e0", "f3", "f800", "f813", "f820", "f8ff"])
def test_simple(hexdata: str) -> None:
    assert _rule(bytes.fromhex(hexdata)) == "cbor.simple"


def test_huge_declared_lengths_fail_fast() -> None:
    cases = {
        b"\x5b" + (2**63).to_bytes(8, "big"): "cbor.truncated",  # 9 bytes claiming a 2**63-byte string
        b"\x7b" + (2**64 - 1).to_bytes(8, "big"): "cbor.truncated",
        b"\x9b" + (2**63).to_bytes(8, "big"): "cbor.too-many-items",
        b"\xbb" + (2**63).to_bytes(8, "big"): "cbor.too-many-items",
    }
    for data, rule in cases.items():
        assert len(data) == 9
        start = time.perf_counter()
        assert _rule(data) == rule
        assert time.perf_counter() - start < 0.5
    # Within max_items but more than the bytes left: a lie, refused at once.
    assert _rule(bytes.fromhex("9a000186a0")) == "cbor.truncated"


def test_error_names_offset_and_is_public_safe() -> None:
    with pytest.raises(FormatError) as info:
        cbor.loads(bytes.fromhex("820161ff"))
    assert info.value.rule == "cbor.utf8"
    assert "byte 2" in info.value.message
    assert info.value.public() == {"code": 100, "rule": "cbor.utf8"}


# ---------------------------------------------------------------------------
# Map keys
# ---------------------------------------------------------------------------


def test_arrays_as_map_keys_become_tuples() -> None:
    assert cbor.loads(bytes.fromhex("a1" + "820102" + "03")) == {(1, 2): 3}
    nested = cbor.loads(bytes.fromhex("a1" + "82" + "8101" + "02" + "f6"))
    assert nested == {((1,), 2): None}
    key = next(iter(nested))
    assert isinstance(key, tuple)
    assert isinstance(key[0], tuple)
    tagged = cbor.loads(bytes.fromhex("a1" + "c1" + "8101" + "00"))
    assert tagged == {Tag(1, (1,)): 0}
    # And they encode back to the same bytes.
    assert cbor.dumps(nested) == bytes.fromhex("a1" + "82" + "8101" + "02" + "f6")


# ---------------------------------------------------------------------------
# Robustness: arbitrary input only ever raises FormatError
# ---------------------------------------------------------------------------


def _loads_or_format_error(data: bytes, limits: Limits = DEFAULT) -> None:
    try:
        cbor.loads(data, limits)
    except FormatError as exc:
        rule = exc.rule
    else:
        return
    assert rule.startswith("cbor.")


@FUZZ
@given(st.binary(max_size=96))
def test_arbitrary_bytes_only_raise_format_error(data: bytes) -> None:
    _loads_or_format_error(data)
    _loads_or_format_error(data, Limits(allow_indefinite=True, max_depth=4, max_items=16))


@PROPERTY
@given(values, st.data())
def test_mutated_encodings_only_raise_format_error(value: Any, data: st.DataObject) -> None:
    encoded = bytearray(cbor.dumps(value))
    index = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[index] = data.draw(st.integers(min_value=0, max_value=255))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded)))
    _loads_or_format_error(bytes(encoded))
    _loads_or_format_error(bytes(encoded[:cut]))
    _loads_or_format_error(bytes(encoded), Limits(allow_indefinite=True))
