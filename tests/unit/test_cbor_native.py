"""Differential tests: the native CBOR decoder against the reference (pure-Python) decoder.

``ism.formats._cbor_native`` may only ever accept what the reference decoder
accepts, decoding it to the very same values (types included); whatever it
refuses, ``cbor.loads`` hands to the reference, so the rule ids stay the
reference's (docs/adr/0005-native-cbor-decoder.md). Inputs: random bytes,
valid encodings (definite and indefinite, shortest and longer heads) and
their mutations (bit flips, truncations, changed length fields, inserted and
dropped bytes), deep and wide structures, under assorted limits.

``ISM_CBOR_FUZZ_EXAMPLES`` raises the number of examples per property (the
committed default keeps CI fast); a missing extension fails them (no skip).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ism.errors import FormatError

# No skip: without the extension these tests fail (``make test`` builds it with ``pip install -e .``).
from ism.formats import _cbor_native as native
from ism.formats import cbor
from ism.formats.cbor import UNDEFINED, Limits, Tag

EXAMPLES = int(os.environ.get("ISM_CBOR_FUZZ_EXAMPLES", "400"))
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES)


def test_native_decoder_is_built() -> None:
    """CI must never run the slow path silently: the extension is part of the build."""
    assert cbor._native is native


# -- comparing outcomes ---------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Equal values of identical types all the way down (floats bit for bit, dicts in order)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return struct.pack(">d", a) == struct.pack(">d", b)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return len(a) == len(b) and all(
            _same(ka, kb) and _same(va, vb) for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=True)
        )
    if isinstance(a, Tag):
        return a.number == b.number and _same(a.value, b.value)
    if a is UNDEFINED:
        return b is UNDEFINED
    return bool(a == b)


def _depth(value: Any) -> int:
    if isinstance(value, list | tuple):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((max(_depth(k), _depth(v)) for k, v in value.items()), default=0)
    if isinstance(value, Tag):
        return 1 + _depth(value.value)
    return 0


def _reference(data: bytes, limits: Limits) -> tuple[str, Any]:
    try:
        return "value", cbor._loads_python(data, limits)
    except FormatError as exc:
        return "error", exc.rule


def _public(data: bytes, limits: Limits) -> tuple[str, Any]:
    try:
        return "value", cbor.loads(data, limits)
    except FormatError as exc:
        return "error", exc.rule


DEFAULT = Limits()


def check(data: bytes, limits: Limits = DEFAULT) -> None:
    """Native and reference agree on the value, or the native refuses and ``loads`` gives the reference's rule."""
    assert native is not None
    expected = _reference(data, limits)
    try:
        got: tuple[str, Any] = (
            "value",
            native.loads(data, limits.max_depth, limits.max_items, limits.allow_indefinite),
        )
    except native.Invalid:
        got = ("refused", None)
    if expected[0] == "value":
        if got[0] == "refused":
            # The one deferral on valid input: nesting beyond the native bound, left to the reference.
            assert limits.max_depth >= native.HARD_MAX_DEPTH, data.hex()
            assert _depth(expected[1]) >= native.HARD_MAX_DEPTH, data.hex()
        else:
            assert _same(got[1], expected[1]), data.hex()
    else:
        assert got[0] == "refused", (data.hex(), expected, got)
    public = _public(data, limits)
    assert public[0] == expected[0], data.hex()
    assert _same(public[1], expected[1]) if public[0] == "value" else public[1] == expected[1], data.hex()


# -- strategies -----------------------------------------------------------------------------------

INT_EDGES = [0, 23, 24, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1]
ints = st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.sampled_from(INT_EDGES + [-1 - n for n in INT_EDGES])
floats = st.floats() | st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, 65504.0, 5.96e-08])
scalars = st.none() | st.booleans() | st.just(UNDEFINED) | ints | floats | st.binary(max_size=30) | st.text(max_size=12)
small_tags = st.integers(min_value=0, max_value=2**64 - 1)
map_keys = (
    ints
    | st.binary(max_size=6)
    | st.text(max_size=6)
    | st.tuples(st.integers(-30, 30), st.text(max_size=3))
    | st.builds(Tag, st.integers(0, 300), st.integers(-5, 5) | st.tuples(st.integers(-3, 3)))
)


def _extend(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return (
        st.lists(children, max_size=5)
        | st.dictionaries(map_keys, children, max_size=5)
        | st.builds(Tag, small_tags, children)
    )


values = st.recursive(scalars, _extend, max_leaves=30)

LIMIT_DEPTHS = [-1, 0, 1, 2, 3, 8, 32, 255, 256, 257, 10**9, 2**80]
LIMIT_ITEMS = [-1, 0, 1, 2, 3, 5, 10, 100, 4096, 100_000, 2**80]
limits = st.one_of(
    st.just(Limits()),
    st.just(Limits(allow_indefinite=True)),
    st.builds(
        Limits,
        max_depth=st.sampled_from(LIMIT_DEPTHS),
        max_items=st.sampled_from(LIMIT_ITEMS),
        allow_indefinite=st.booleans(),
    ),
)
both_indefinite = st.builds(Limits, allow_indefinite=st.booleans())


def _head(major: int, n: int, size: int) -> bytes:
    """A head with its argument in ``size`` extra bytes (0 for the shortest form), never shorter than valid."""
    if size == 0 or (size == 1 and n >= 0x100) or (size == 2 and n >= 0x10000) or (size == 4 and n >= 2**32):
        return cbor._head(major, n)
    return bytes([(major << 5) | {1: 24, 2: 25, 4: 26, 8: 27}[size]]) + n.to_bytes(size, "big")


def _encode(draw: st.DrawFn, value: Any, out: list[bytes]) -> None:
    """Like ``cbor.dumps``, but containers and strings may be indefinite and heads longer than needed."""
    size = draw(st.sampled_from([0, 0, 0, 1, 2, 4, 8]))
    indefinite = draw(st.integers(0, 3)) == 0
    if isinstance(value, bool) or value is None or value is UNDEFINED or isinstance(value, float):
        out.append(cbor.dumps(value))
    elif isinstance(value, int):
        out.append(_head(0, value, size) if value >= 0 else _head(1, -1 - value, size))
    elif isinstance(value, bytes | str):
        major, raw = (2, value) if isinstance(value, bytes) else (3, value.encode())
        if not indefinite:
            out.append(_head(major, len(raw), size) + raw)
            return
        out.append(bytes([(major << 5) | 31]))
        pos = 0
        while pos < len(raw):
            step = draw(st.integers(1, max(1, len(raw) - pos)))
            chunk = raw[pos : pos + step]
            if major == 3:  # text chunks end on character boundaries
                while True:
                    try:
                        chunk.decode()
                        break
                    except UnicodeDecodeError:
                        step += 1
                        chunk = raw[pos : pos + step]
            out.append(_head(major, len(chunk), 0) + chunk)
            pos += step
        out.append(b"\xff")
    elif isinstance(value, list | tuple):
        out.append(b"\x9f" if indefinite else _head(4, len(value), size))
        for item in value:
            _encode(draw, item, out)
        if indefinite:
            out.append(b"\xff")
    elif isinstance(value, dict):
        out.append(b"\xbf" if indefinite else _head(5, len(value), size))
        for key, item in value.items():
            _encode(draw, key, out)
            _encode(draw, item, out)
        if indefinite:
            out.append(b"\xff")
    else:
        assert isinstance(value, Tag)
        out.append(_head(6, value.number, size))
        _encode(draw, value.value, out)


@st.composite
def encodings(draw: st.DrawFn) -> bytes:
    out: list[bytes] = []
    _encode(draw, draw(values), out)
    return b"".join(out)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(encodings() | values.map(cbor.dumps)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "truncate", "set", "insert", "delete", "length"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[i:]
        elif op == "set":
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data.insert(i, draw(st.sampled_from([0x00, 0x18, 0x1F, 0x5F, 0x7F, 0x9F, 0xBF, 0xC1, 0xF7, 0xFF])))
        elif op == "delete":
            del data[i]
        else:  # a length or count field: the low bits of a head, or an argument byte
            data[i] = (data[i] & 0xE0) | draw(st.integers(0, 31))
    return bytes(data)


#: Map keys, allowed and refused, few enough that pairs often repeat one.
KEY_POOL = [0, 1, -1, 2**64 - 1, "a", b"a", [1, 2], [[1], "a"], Tag(1, [1, 2]), Tag(1, 1), Tag(2, 1)]
KEY_POOL += [True, False, None, UNDEFINED, 1.0, math.nan, {}, [1, {}], Tag(1, {1: 2}), [True]]


@st.composite
def maps_with_repeated_keys(draw: st.DrawFn) -> bytes:
    """A map whose pairs are drawn from :data:`KEY_POOL`: duplicate and refused keys, any container form."""
    pairs = draw(st.lists(st.tuples(st.sampled_from(KEY_POOL), scalars), max_size=6))
    indefinite = draw(st.booleans())
    out = [b"\xbf" if indefinite else cbor._head(5, len(pairs))]
    for key, value in pairs:
        out.append(b"\x80" if key == [] else _raw(key))
        out.append(cbor.dumps(value))
    if indefinite:
        out.append(b"\xff")
    return b"".join(out)


def _raw(value: Any) -> bytes:
    """``cbor.dumps`` that also writes keys it would never write (maps inside keys and so on)."""
    if isinstance(value, list):
        return cbor._head(4, len(value)) + b"".join(_raw(v) for v in value)
    if isinstance(value, Tag):
        return cbor._head(6, value.number) + _raw(value.value)
    if isinstance(value, dict):
        return cbor._head(5, len(value)) + b"".join(_raw(k) + _raw(v) for k, v in value.items())
    return cbor.dumps(value)


HEAD_BYTES = sorted(
    {*range(0x00, 0x1C), 0x1F, *range(0x20, 0x3C), *range(0x40, 0x5C), 0x5F, *range(0x60, 0x7C), 0x7F}
    | {*range(0x80, 0x9C), 0x9F, *range(0xA0, 0xBC), 0xBF, *range(0xC0, 0xDC), *range(0xE0, 0x100)}
    | {0x61, 0xC3, 0xED, 0xA0, 0x80}
)


# -- properties -----------------------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=48), limits)
def test_random_bytes(data: bytes, lim: Limits) -> None:
    check(data, lim)


@FUZZ
@given(st.lists(st.sampled_from(HEAD_BYTES), max_size=40).map(bytes), limits)
def test_random_heads(data: bytes, lim: Limits) -> None:
    check(data, lim)


@FUZZ
@given(values, both_indefinite)
def test_valid_encodings(value: Any, lim: Limits) -> None:
    data = cbor.dumps(value)
    check(data, lim)
    assert _same(cbor.loads(data), cbor._loads_python(data))


@FUZZ
@given(encodings(), limits)
def test_indefinite_and_long_heads(data: bytes, lim: Limits) -> None:
    check(data, lim)
    check(data, Limits(allow_indefinite=True))
    check(data, Limits(allow_indefinite=False))


@FUZZ
@given(mutated(), limits)
def test_mutated_encodings(data: bytes, lim: Limits) -> None:
    check(data, lim)
    check(data, Limits(allow_indefinite=True))


@FUZZ
@given(maps_with_repeated_keys(), st.booleans())
def test_map_keys(data: bytes, allow: bool) -> None:
    check(data, Limits(allow_indefinite=allow))
    check(b"\x81" + data, Limits(allow_indefinite=allow))
    check(b"\xa1" + data + b"\x00", Limits(allow_indefinite=allow))  # the map itself as a key


@FUZZ
@given(
    st.integers(0, 400),
    st.sampled_from([b"\x81", b"\xa1\x00", b"\xc1", b"\x9f", b"\xbf\x00", b"\xa1\x81", b"\x82\x00"]),
    st.sampled_from([b"\x00", b"\x80", b"\xa0", b"\xff", b"", b"\x9f\xff"]),
    limits,
)
def test_deep(depth: int, wrap: bytes, leaf: bytes, lim: Limits) -> None:
    closers = b"\xff" * depth if wrap in (b"\x9f", b"\xbf\x00") else b""
    if wrap == b"\xa1\x81":  # an array key nested in map keys
        data = wrap * depth + b"\x00" + b"\x00" * depth
    elif wrap == b"\x82\x00":
        data = wrap * depth + leaf
    else:
        data = wrap * depth + leaf + closers
    check(data, lim)
    check(data, Limits(max_depth=10**9, allow_indefinite=True))


@FUZZ
@given(st.integers(0, 3000), st.sampled_from([0, 1, 2, 4, 8]), st.sampled_from([4, 5]), limits)
def test_wide(n: int, size: int, major: int, lim: Limits) -> None:
    body = b"".join(cbor.dumps(i) + (b"\xf6" if major == 5 else b"") for i in range(n))
    check(_head(major, n, size) + body, lim)
    check(_head(major, n + 1, size) + body, lim)  # one item short
    check(bytes([(major << 5) | 31]) + body + b"\xff", lim)


@pytest.mark.parametrize(
    "hexdata",
    [
        "",
        "ff",
        "f7",
        "c1ff",
        "a2820102008201020a",  # duplicate array keys
        "a201f401f4",  # a duplicate key with the very same value object (False)
        "a201010101",  # ... (a cached small int)
        "a2616101616101",  # ... (equal text keys)
        "a2c1820102" + "00" + "c1820102" + "01",  # duplicate tagged array keys
        "a1c1a000",
        "a1f93c0001",
        "a1f501",
        "5f41614162ff",
        "7f61c3ff",  # a text chunk that splits nothing but is itself invalid
        "7f62c3a9ff",
        "7f61c361a9ff",  # a character split across chunks
        "5f5fffff",
        "9b8000000000000000",
        "bb4000000000000000",
        "bbffffffffffffffff",
        "5bffffffffffffffff",
        "3bffffffffffffffff",
        "3b7fffffffffffffff",
        "c11bffffffffffffffff",
        "dbffffffffffffffff00",
        "f97c01",  # a half-float NaN with a payload
        "f97e00",
        "fa7fc00001",
        "fb7ff8000000000001",
        "63eda080",  # a surrogate
        "64f4908080",  # above U+10FFFF
        "62c080",  # overlong
        "f800",
        "f818",
        "fc",
        "1c",
        "9f01",
        "bf01ff",
        "bf0102",
    ],
)
@pytest.mark.parametrize("allow", [False, True])
def test_edge_cases(hexdata: str, allow: bool) -> None:
    check(bytes.fromhex(hexdata), Limits(allow_indefinite=allow))


def test_values_are_the_module_types() -> None:
    assert native is not None
    assert native.loads(b"\xf7", 1, 1, False) is UNDEFINED
    tag = native.loads(b"\xc1\x00", 1, 1, False)
    assert type(tag) is Tag
    assert tag == Tag(1, 0)
    key = next(iter(native.loads(bytes.fromhex("a1c1820102f6"), 4, 10, False)))
    assert key == Tag(1, (1, 2))
    with pytest.raises(TypeError):
        native.loads(bytearray(b"\x00"), 1, 1, False)  # type: ignore[arg-type]


def test_no_leak_on_any_path() -> None:
    """Every accept and refuse path returns what it allocated (a reference leak grows the heap)."""
    assert native is not None
    inputs = [bytes.fromhex(h) for h in ("a2820102008201020a", "a1c1a000", "9f0102", "7f61c361a9ff", "82616101")]
    inputs += [cbor.dumps({1: [b"x" * 40, "y" * 40, Tag(5, {(1, 2): 1.5})], "k": -(2**64)})]
    inputs += [b"\x81" * 300 + b"\x00", bytes.fromhex("bf6161a0") + b"\x00"]

    def run(times: int) -> None:
        for _ in range(times):
            for data in inputs:
                for allow in (False, True):
                    with contextlib.suppress(native.Invalid):
                        native.loads(data, 300, 1000, allow)

    run(200)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(3000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"heap grew by {grown} bytes"
