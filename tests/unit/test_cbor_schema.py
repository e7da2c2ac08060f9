"""The schema checker (ism.formats.cbor_schema): its semantics, and the native checker against the reference.

``Schema.check`` uses ``ism.formats._cbor_native.check`` when the extension is built and the
pure-Python checker otherwise; both interpret the same compiled tree and must give the same
answer for every value: None, or the index of the same broken rule. Inputs: a table of each rule's
edges, then hypothesis-generated schemas (every rule kind, nested) with values drawn to conform
to them, mutated, or arbitrary. Also: malformed trees are refused by the native compiler, and no
path leaks.

``ISM_CBOR_FUZZ_EXAMPLES`` raises the number of examples per property (as in test_cbor_native.py).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

# No skip: without the extension these tests fail (``make test`` builds it with ``pip install -e .``).
from ism.formats import _cbor_native as native
from ism.formats import cbor_schema as sc
from ism.formats.cbor import UNDEFINED, Tag

EXAMPLES = int(os.environ.get("ISM_CBOR_FUZZ_EXAMPLES", "400"))
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=EXAMPLES)


def test_native_checker_is_built() -> None:
    schema = sc.Schema(sc.Int(((0, 1),)))
    assert schema._compiled is not None


def verdict(schema: sc.Schema, value: Any) -> int | None:
    """The reference verdict, and the native one must agree with it."""
    expected = schema.check_python(value)
    assert schema.check(value) == expected, (schema.tree, value)
    return expected


# -- semantics ------------------------------------------------------------------------------------

HASH = sc.Bytes(sizes=(32, 48, 64))
RECORD = sc.Record(
    (
        sc.Field(1, HASH),  # rule 1
        sc.Field(2, sc.Text(1, 3), required=False),  # rule 2
        sc.Field(-3, sc.Int(((-5, -1), (1, 5))), required=False, nullable=True),  # rule 3
        sc.Field("k", sc.Array(sc.Text(one_of=frozenset({"a", "b"})), 0, 2), required=False),  # rules 4, 5
    )
)

SEMANTICS: list[tuple[sc.Rule, Any, int | None]] = [
    (HASH, b"x" * 32, None),
    (HASH, b"x" * 33, 0),
    (HASH, bytearray(32), 0),
    (HASH, "x" * 32, 0),
    (sc.Bytes(min_size=8, max_size=32), b"x" * 8, None),
    (sc.Bytes(min_size=8, max_size=32), b"x" * 7, 0),
    (sc.Bytes(min_size=8, max_size=32), b"x" * 33, 0),
    (sc.Bytes(), b"", None),
    (sc.Text(1, 2), "é", None),  # code points, not bytes
    (sc.Text(1, 2), "ééé", 0),
    (sc.Text(1, 2), "", 0),
    (sc.Text(1, 2), b"a", 0),
    (sc.Text(one_of=frozenset({"a"})), "a", None),
    (sc.Text(one_of=frozenset({"a"})), "b", 0),
    (sc.Int(((0, 2**64 - 1),)), 2**64 - 1, None),
    (sc.Int(((0, 2**64 - 1),)), 2**64, 0),
    (sc.Int(((0, 2**64 - 1),)), -1, 0),
    (sc.Int(((0, 2**64 - 1),)), True, 0),  # a bool is no int here
    (sc.Int(((0, 2**64 - 1),)), 1.0, 0),
    (sc.Int(((-(2**70), -(2**65)),)), -(2**66), None),
    (sc.Int(((-(2**70), -(2**65)),)), -(2**71), 0),
    (sc.Int(((-(2**70), -(2**65)),)), 0, 0),
    (sc.Int(()), 0, 0),
    (sc.Array(sc.Int(((0, 9),)), 1, 2), [1], None),
    (sc.Array(sc.Int(((0, 9),)), 1, 2), [], 0),
    (sc.Array(sc.Int(((0, 9),)), 1, 2), [1, 2, 3], 0),
    (sc.Array(sc.Int(((0, 9),)), 1, 2), [1, 10], 1),
    (sc.Array(sc.Int(((0, 9),)), 1, 2), (1,), 0),
    (RECORD, {1: b"x" * 32}, None),
    (RECORD, {1: b"x" * 32, 2: "abc", -3: None, "k": ["a", "b"]}, None),
    (RECORD, {1: b"x" * 32, -3: 5}, None),
    (RECORD, {}, 1),  # the missing required field's rule
    (RECORD, {1: b"x"}, 1),
    (RECORD, {1: b"x" * 32, 2: None}, 2),  # present and not nullable
    (RECORD, {1: b"x" * 32, -3: 0}, 3),
    (RECORD, {1: b"x" * 32, "k": ["c"]}, 5),
    (RECORD, {1: b"x" * 32, "k": ["a"] * 3}, 4),
    (RECORD, {1: b"x" * 32, 3: 1}, 0),  # an unknown key: the record's own index
    (RECORD, {2: "abcd", 9: 1}, 0),  # unknown keys come first
    (RECORD, {1: b"x" * 32, Tag(1, 1): 1}, 0),
    (RECORD, {1: b"x" * 32, (1,): 1}, 0),
    (RECORD, [1], 0),
    (sc.MapOf(sc.Text(), RECORD, 1, 2), {"a": {1: b"x" * 32}}, None),
    (sc.MapOf(sc.Text(), RECORD, 1, 2), {}, 0),
    (sc.MapOf(sc.Text(), RECORD, 1, 2), {1: {1: b"x" * 32}}, 1),  # a key, before its value
    (sc.MapOf(sc.Text(), RECORD, 1, 2), {"a": {}}, 3),
    (sc.MapOf(sc.Text(), RECORD, 1, 2), {"a": {1: b"x" * 32}, "b": {9: 0}}, 2),
]


@pytest.mark.parametrize(("rule", "value", "expected"), SEMANTICS)
def test_semantics(rule: sc.Rule, value: Any, expected: int | None) -> None:
    assert verdict(sc.Schema(rule), value) == expected


def test_indices_name_the_rules_in_pre_order() -> None:
    schema = sc.Schema(RECORD)
    assert [type(r).__name__ for r in schema.rules] == ["Record", "Bytes", "Text", "Int", "Array", "Text"]
    assert schema.rules[1] is HASH


def test_compile_refuses_what_is_no_schema() -> None:
    with pytest.raises(ValueError, match="names a key twice"):
        sc.Schema(sc.Record((sc.Field(1, HASH), sc.Field(1, HASH))))
    with pytest.raises(TypeError):
        sc.Schema("bytes")  # type: ignore[arg-type]


# -- the native checker against the reference, on generated schemas and values -------------------

SIZES = st.integers(0, 6)
KEYS = st.one_of(st.integers(-70000, 70000), st.text(max_size=3), st.binary(max_size=2))


def _bounds() -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(SIZES, SIZES).map(lambda t: (min(t), max(t)) if t[0] != t[1] else (t[0], sc.UNBOUNDED))


INT_EDGES = st.sampled_from([0, 1, -1, 2**31, -(2**31), 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**100])
INTS = st.one_of(st.integers(-300, 300), INT_EDGES, st.integers())


def _leaf_rules() -> st.SearchStrategy[sc.Rule]:
    return st.one_of(
        st.builds(
            lambda b, sizes: sc.Bytes(tuple(sizes), *b),
            _bounds(),
            st.lists(SIZES, max_size=3),
        ),
        st.builds(
            lambda b, one_of: sc.Text(*b, one_of=None if one_of is None else frozenset(one_of)),
            _bounds(),
            st.none() | st.sets(st.text(max_size=3), max_size=4),
        ),
        st.builds(
            lambda ranges: sc.Int(tuple((min(a, b), max(a, b)) for a, b in ranges)),
            st.lists(st.tuples(INTS, INTS), max_size=3),
        ),
    )


def _nested(children: st.SearchStrategy[sc.Rule]) -> st.SearchStrategy[sc.Rule]:
    fields = st.lists(
        st.tuples(KEYS, children, st.booleans(), st.booleans()), max_size=5, unique_by=lambda f: (type(f[0]), f[0])
    ).map(lambda fs: sc.Record(tuple(sc.Field(k, r, req, null) for k, r, req, null in fs)))
    return st.one_of(
        st.builds(lambda item, b: sc.Array(item, *b), children, _bounds()),
        fields,
        st.builds(lambda k, v, b: sc.MapOf(k, v, *b), _leaf_rules(), children, _bounds()),
    )


RULES = st.recursive(_leaf_rules(), _nested, max_leaves=8)

ANY_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    INTS,
    st.floats(allow_nan=False),
    st.binary(max_size=8),
    st.text(max_size=8),
    st.just(UNDEFINED),
    st.builds(Tag, st.integers(0, 5), st.integers(0, 5)),
)
ANY = st.recursive(
    ANY_LEAF,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=4)),
    max_leaves=12,
)


def conforming(rule: sc.Rule, draw: st.DrawFn, depth: int = 0) -> Any:
    """A value drawn to conform to ``rule`` (or, where the rule allows none, close to it)."""
    if draw(st.integers(0, 19)) == 0 or depth > 6:
        return draw(ANY)  # now and then anything at all
    if isinstance(rule, sc.Bytes):
        size = draw(st.sampled_from(rule.sizes)) if rule.sizes else draw(st.integers(rule.min_size, 8))
        return b"\x01" * size
    if isinstance(rule, sc.Text):
        if rule.one_of:
            return draw(st.sampled_from(sorted(rule.one_of)))
        return "é" * draw(st.integers(rule.min_len, min(rule.max_len, rule.min_len + 3)))
    if isinstance(rule, sc.Int):
        if not rule.ranges:
            return draw(INTS)
        lo, hi = draw(st.sampled_from(rule.ranges))
        return draw(st.sampled_from([lo, hi, lo - 1, hi + 1, (lo + hi) // 2]))
    if isinstance(rule, sc.Array):
        count = draw(st.integers(rule.min_len, min(rule.max_len, rule.min_len + 3)))
        return [conforming(rule.item, draw, depth + 1) for _ in range(count)]
    if isinstance(rule, sc.Record):
        out: dict[Any, Any] = {}
        for f in rule.fields:
            choice = draw(st.integers(0, 5))
            if choice == 0 and not f.required:
                continue
            out[f.key] = None if choice == 1 and f.nullable else conforming(f.rule, draw, depth + 1)
        if draw(st.integers(0, 9)) == 0:
            out[draw(KEYS)] = 0  # perhaps a key that is no field's
        return out
    assert isinstance(rule, sc.MapOf)
    count = draw(st.integers(rule.min_len, min(rule.max_len, rule.min_len + 3)))
    pairs = {}
    for _ in range(count):
        key = conforming(rule.key, draw, depth + 1)
        with contextlib.suppress(TypeError):  # an unhashable key drawn from ANY
            pairs[key] = conforming(rule.value, draw, depth + 1)
    return pairs


@st.composite
def schema_and_value(draw: st.DrawFn) -> tuple[sc.Rule, Any]:
    rule = draw(RULES)
    return rule, conforming(rule, draw)


@FUZZ
@given(schema_and_value())
def test_native_agrees_on_generated_schemas(case: tuple[sc.Rule, Any]) -> None:
    rule, value = case
    verdict(sc.Schema(rule), value)


@FUZZ
@given(RULES, ANY)
def test_native_agrees_on_arbitrary_values(rule: sc.Rule, value: Any) -> None:
    verdict(sc.Schema(rule), value)


# -- the native compiler and its lifetime ---------------------------------------------------------

MALFORMED_TREES: list[Any] = [
    None,
    (),
    (0,),
    (0, 0),
    (0, 7),
    (-1, 1, 0, 1, ()),
    (0, 1, 0, 1),
    (0, 1, -1, 1, ()),
    (0, 1, 0, 1, [32]),
    (0, 1, 0, 1, (-1,)),
    (0, 1, 0, 2**70, ()),
    (0, 2, 0, 1, {"a"}),
    (0, 3, ((1,),)),
    (0, 3, ((1, 2.0),)),
    (0, 3, [(1, 2)]),
    (0, 4, 0, 1, None),
    (0, 5, ((1, True, False),)),
    (0, 5, ((1, 1, False, (1, 1, 0, 1, ())),)),
    (0, 5, (([], True, False, (1, 1, 0, 1, ())),)),
    (0, 5, tuple((i, True, False, (1, 1, 0, 1, ())) for i in range(65))),
    (0, 6, 0, 1, (1, 2, 0, 1, None), None),
    (0, True, 0, 1, ()),
]


@pytest.mark.parametrize("tree", MALFORMED_TREES)
def test_native_compiler_refuses_malformed_trees(tree: Any) -> None:
    assert native is not None
    with pytest.raises((ValueError, TypeError, OverflowError)):
        native.schema(tree)


def test_native_compiler_bounds_nesting() -> None:
    assert native is not None
    tree: Any = (0, 1, 0, 1, ())
    for _ in range(70):
        tree = (0, 4, 0, 1, tree)
    with pytest.raises(ValueError, match="nested too deep"):
        native.schema(tree)


def test_native_check_needs_a_schema() -> None:
    assert native is not None
    with pytest.raises(ValueError, match="PyCapsule"):
        native.check(1, object())
    with pytest.raises(TypeError):
        native.check(1)  # type: ignore[call-arg]


def test_no_leak_on_any_path() -> None:
    """Every check and every compile (accepted or refused) returns what it took (a leak grows the heap)."""
    assert native is not None
    schema = sc.Schema(sc.MapOf(sc.Text(), RECORD, 1, 3))
    big = sc.Schema(sc.Array(sc.Int(((-(2**70), 2**70),)), 0, 10))
    values: list[tuple[sc.Schema, Any]] = [(schema, v) for _, v, _ in SEMANTICS]
    values += [(schema, {"a": value}) for _, value, _ in SEMANTICS]
    values += [(big, [2**69, -(2**69), 2**71, 5])]
    owned = [v for _, v in values if isinstance(v, list | dict | bytes) and len(v) > 1]  # no shared singletons
    held = [sys.getrefcount(v) for v in owned]

    def run(times: int) -> None:
        for _ in range(times):
            for s, v in values:
                s.check(v)
            for tree in MALFORMED_TREES:
                with contextlib.suppress(ValueError, TypeError, OverflowError):
                    native.schema(tree)
            sc.Schema(RECORD)  # compiled and freed

    run(100)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        run(1000)
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 64 * 1024, f"heap grew by {grown} bytes"
    assert [sys.getrefcount(v) for v in owned] == held
