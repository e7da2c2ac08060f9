"""The schema checker and builder (ism.formats.cbor_schema): semantics, and the native one against the reference.

``Schema.check`` and ``Schema.build`` use ``ism.formats._cbor_native`` when the extension is built
and the pure-Python interpreter otherwise; both interpret the same compiled tree and must give the
same answer for every value: None, or the index of the same broken rule; and for ``build``, equal
objects of the same types. Inputs: a table of each rule's edges, then hypothesis-generated schemas
(every rule kind, nested, records that make objects) with values drawn to conform to them,
mutated, or arbitrary. Also: malformed trees are refused by the native compiler, and no path leaks.

``ISM_CBOR_FUZZ_EXAMPLES`` raises the number of examples per property (as in test_cbor_native.py).
"""

from __future__ import annotations

import contextlib
import gc
import os
import re
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


def shape(built: Any) -> Any:
    """A built value as plain data: what equality of two builds means (types included)."""
    if isinstance(built, tuple):
        return ("tuple", [shape(item) for item in built])
    if hasattr(type(built), "__slots__") and not isinstance(built, (bytes, str, int)):
        names = sorted(sc._slot_names(type(built)))
        return (type(built).__qualname__, [(name, shape(getattr(built, name))) for name in names])
    return (type(built).__name__, repr(built))


def built(schema: sc.Schema, value: Any) -> Any:
    """The reference build, and the native one must agree with it (and with the reference verdict)."""
    expected = schema.build_python(value)
    assert shape(schema.build(value)) == shape(expected), (schema.tree, value)
    assert (expected is None) == (schema.check_python(value) is not None)
    return expected


# -- semantics ------------------------------------------------------------------------------------

HASH = sc.Bytes(sizes=(32, 48, 64))
# rules: 0 MapOf, 1 its key, 2 the value record, 3 "n", 4 "u"
TIED = sc.MapOf(sc.Text(), sc.Record((sc.Field("n", sc.Text()), sc.Field("u", sc.Bytes()))), key_is="n", unique="u")
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
    (sc.Bytes(prefix=b"\x01"), b"\x01abc", None),
    (sc.Bytes(prefix=b"\x01"), b"\x01", None),
    (sc.Bytes(prefix=b"\x01"), b"\x02abc", 0),
    (sc.Bytes(prefix=b"\x01\x02"), b"\x01", 0),  # shorter than the prefix
    (sc.Bytes(prefix=b"\x01"), b"", 0),
    (sc.Bytes(sizes=(2,), prefix=b"\x01"), b"\x01\x00\x00", 0),  # sizes before the prefix
    (sc.Text(pattern=re.compile("[a-z]+")), "abc", None),
    (sc.Text(pattern=re.compile("[a-z]+")), "abc1", 0),  # a full match, not a prefix
    (sc.Text(pattern=re.compile("[a-z]+")), "", 0),
    (sc.Text(pattern=re.compile("[a-z]+")), b"abc", 0),
    (sc.Text(one_of=frozenset({"ab", "a1"}), pattern=re.compile("[a-z]+")), "a1", 0),  # both hold
    (sc.Text(max_len=2, pattern=re.compile("[a-z]+")), "abc", 0),
    (TIED, {"a": {"n": "a", "u": b"1"}, "b": {"n": "b", "u": b"2"}}, None),
    (TIED, {"a": {"n": "b", "u": b"1"}}, 0),  # not named after its key
    (TIED, {"a": {"n": "a", "u": b"1"}, "b": {"n": "b", "u": b"1"}}, 0),  # the same unique value twice
    (TIED, {"a": {"n": "a", "u": b"1"}, "b": {"n": "c", "u": b"1"}}, 0),
    (TIED, {"a": {"n": "a", "u": b"1"}, "b": {"n": "b"}}, 4),  # the missing field's rule first
    (TIED, {"a": {"n": "a", "u": 1}}, 4),
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
    with pytest.raises(TypeError, match="compiled"):
        sc.Schema(sc.Text(pattern="[a-z]+"))  # type: ignore[arg-type]
    value = sc.Record((sc.Field("n", sc.Text()), sc.Field("o", sc.Text(), required=False), sc.Field("r", RECORD)))
    for bad in (
        sc.MapOf(sc.Text(), value, key_is="x"),  # no such field
        sc.MapOf(sc.Text(), value, key_is="o"),  # may be absent
        sc.MapOf(sc.Text(), value, unique="r"),  # not a leaf
        sc.MapOf(sc.Text(), sc.Text(), key_is="n"),  # values are no records
    ):
        with pytest.raises(ValueError, match="MapOf"):
            sc.Schema(bad)


# -- building -------------------------------------------------------------------------------------


class Point:
    __slots__ = ("x", "y")


class Labelled(Point):
    __slots__ = ("inner", "label", "tags")


class Plain:
    """No __slots__: an instance has a __dict__."""


POINT = sc.Record(
    (sc.Field(1, sc.Int(((0, 9),))), sc.Field(2, sc.Int(((0, 9),)), required=False, nullable=True)),
    sc.Make(Point, (("x", sc.Get(1)), ("y", sc.Get(2, -1)))),
)
LABELLED = sc.Record(
    (
        sc.Field("p", sc.Array(POINT)),
        sc.Field("m", sc.MapOf(sc.Text(), POINT), required=False),
        sc.Field("x", sc.Int(((0, 9),))),
        sc.Field("t", sc.Array(sc.Text()), required=False),
        sc.Field("d", sc.Record((sc.Field(1, sc.Int(((0, 9),))),)), required=False),
    ),
    sc.Make(
        Labelled,
        (
            ("x", sc.Get("p")),
            ("y", sc.Get("m", ())),
            ("label", sc.Const("fixed")),
            ("tags", sc.Get("t", ())),
            ("inner", sc.Make(Point, (("x", sc.Get("x")), ("y", sc.Get("d"))))),
        ),
    ),
)


def test_build_semantics() -> None:
    schema = sc.Schema(LABELLED)
    value = {"p": [{1: 1}, {1: 2, 2: None}, {1: 3, 2: 4}], "x": 5, "m": {"a": {1: 6}}, "t": ["u"], "d": {1: 7}}
    out = built(schema, value)
    assert type(out) is Labelled
    assert [(p.x, p.y) for p in out.x] == [(1, -1), (2, -1), (3, 4)]  # absent and null take the default
    assert [(p.x, p.y) for p in out.y] == [(6, -1)]  # a map builds the tuple of its values
    assert out.label == "fixed"
    assert out.tags == ("u",)  # an array builds a tuple
    assert type(out.inner) is Point
    assert out.inner.x == 5
    assert out.inner.y == {1: 7}  # a record without a Make builds the dict itself
    bare = built(schema, {"p": [], "x": 0})
    assert (bare.x, bare.y, bare.tags, bare.inner.y) == ((), (), (), None)
    assert built(schema, {"p": [{1: 10}], "x": 0}) is None
    assert built(schema, {"p": [], "x": 0, "z": 1}) is None
    assert built(schema, []) is None


def test_build_refuses_what_cannot_be_built() -> None:
    with pytest.raises(ValueError, match="every slot"):
        sc.Schema(sc.Record((sc.Field(1, HASH),), sc.Make(Point, (("x", sc.Get(1)),))))
    with pytest.raises(ValueError, match="every slot"):
        sc.Schema(sc.Record((sc.Field(1, HASH),), sc.Make(Point, (("x", sc.Get(1)), ("x", sc.Get(1))))))
    with pytest.raises(ValueError, match="no field"):
        sc.Schema(sc.Record((sc.Field(1, HASH),), sc.Make(Point, (("x", sc.Get(1)), ("y", sc.Get(2))))))
    with pytest.raises(ValueError, match="__slots__"):
        sc.Schema(sc.Record((), sc.Make(Plain, ())))
    with pytest.raises(TypeError, match="slot source"):
        sc.Schema(sc.Record((sc.Field(1, HASH),), sc.Make(Point, (("x", sc.Get(1)), ("y", 1)))))  # type: ignore[arg-type]
    for schema in (sc.Schema(HASH), sc.Schema(RECORD)):
        with pytest.raises(ValueError, match="Make"):
            schema.build(b"x" * 32)
        with pytest.raises(ValueError, match="Make"):
            schema.build_python(b"x" * 32)


def test_pattern_memo_forgets_and_never_keeps_a_refusal() -> None:
    """The native checker remembers accepted strings (bounded); results never depend on what it saw."""
    schema = sc.Schema(sc.Text(pattern=re.compile("[a-z]+[0-9]*")))
    for round_ in range(2):
        for i in range(1000):  # well past the memo's size
            assert verdict(schema, f"a{i}") is None
            assert verdict(schema, f"{i}a") == 0
        assert verdict(schema, "a1") is None, round_


# -- the native checker against the reference, on generated schemas and values -------------------

SIZES = st.integers(0, 6)
KEYS = st.one_of(st.integers(-70000, 70000), st.text(max_size=3), st.binary(max_size=2))


def _bounds() -> st.SearchStrategy[tuple[int, int]]:
    return st.tuples(SIZES, SIZES).map(lambda t: (min(t), max(t)) if t[0] != t[1] else (t[0], sc.UNBOUNDED))


PATTERNS = [re.compile("é*"), re.compile("[a-z]+"), re.compile("(?:é|a)?b?")]
INT_EDGES = st.sampled_from([0, 1, -1, 2**31, -(2**31), 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 2**100])
INTS = st.one_of(st.integers(-300, 300), INT_EDGES, st.integers())


def _leaf_rules() -> st.SearchStrategy[sc.Rule]:
    return st.one_of(
        st.builds(
            lambda b, sizes, prefix: sc.Bytes(tuple(sizes), *b, prefix=prefix),
            _bounds(),
            st.lists(SIZES, max_size=3),
            st.sampled_from([b"", b"\x01", b"\x01\x01"]),
        ),
        st.builds(
            lambda b, one_of, pattern: sc.Text(
                *b, one_of=None if one_of is None else frozenset(one_of), pattern=pattern
            ),
            _bounds(),
            st.none() | st.sets(st.text(max_size=3), max_size=4),
            st.none() | st.sampled_from(PATTERNS),
        ),
        st.builds(
            lambda ranges: sc.Int(tuple((min(a, b), max(a, b)) for a, b in ranges)),
            st.lists(st.tuples(INTS, INTS), max_size=3),
        ),
    )


def _made(fields: tuple[sc.Field, ...], how: list[int]) -> sc.Record:
    """A record that makes an instance of a fresh slotted class: one slot per field, and per ``how``
    entry a constant or an object made from the same record."""
    names = [f"f{i}" for i in range(len(fields))]
    slots: list[tuple[str, sc.Source]] = [
        (n, sc.Get(f.key, ("default", n))) for n, f in zip(names, fields, strict=True)
    ]
    for i, kind in enumerate(how):
        name = f"s{i}"
        names.append(name)
        inner = type(f"Inner{i}", (), {"__slots__": ("only",)})
        source = sc.Make(inner, (("only", sc.Get(fields[0].key) if fields else sc.Const(i)),))
        slots.append((name, sc.Const(i) if kind == 0 else source))
    cls = type("Made", (), {"__slots__": tuple(names)})
    return sc.Record(fields, sc.Make(cls, tuple(slots)))


def _tied(key: sc.Rule, fields: tuple[sc.Field, ...], b: tuple[int, int], tie: int) -> sc.MapOf:
    """A MapOf whose record values must hold their key in the field "n" and a unique "u"."""
    record = sc.Record((sc.Field("n", key), sc.Field("u", sc.Int(((0, 3),))), *fields))
    return sc.MapOf(key, record, *b, key_is="n" if tie & 1 else None, unique="u" if tie & 2 else None)


def _fields(children: st.SearchStrategy[sc.Rule]) -> st.SearchStrategy[tuple[sc.Field, ...]]:
    return st.lists(
        st.tuples(KEYS, children, st.booleans(), st.booleans()), max_size=5, unique_by=lambda f: (type(f[0]), f[0])
    ).map(lambda fs: tuple(sc.Field(k, r, req, null) for k, r, req, null in fs))


def _nested(children: st.SearchStrategy[sc.Rule]) -> st.SearchStrategy[sc.Rule]:
    field_list = _fields(children)
    return st.one_of(
        st.builds(lambda item, b: sc.Array(item, *b), children, _bounds()),
        field_list.map(sc.Record),
        st.builds(_made, field_list, st.lists(st.integers(0, 1), max_size=2)),
        st.builds(lambda k, v, b: sc.MapOf(k, v, *b), _leaf_rules(), children, _bounds()),
        st.builds(
            _tied,
            st.sampled_from([sc.Text(), sc.Text(pattern=re.compile("[a-z]+"))]),
            field_list.map(lambda fs: tuple(f for f in fs if f.key not in ("n", "u"))),
            _bounds(),
            st.integers(1, 3),
        ),
    )


RULES = st.recursive(_leaf_rules(), _nested, max_leaves=8)
MADE = st.builds(_made, _fields(RULES), st.lists(st.integers(0, 1), max_size=2))

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
        return draw(st.sampled_from([b"\x01", b"\x02"])) * size
    if isinstance(rule, sc.Text):
        if rule.one_of:
            return draw(st.sampled_from(sorted(rule.one_of)))
        letter = draw(st.sampled_from(["é", "a", "b"]))
        return letter * draw(st.integers(rule.min_len, min(rule.max_len, rule.min_len + 3)))
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
    for i in range(count):
        key = conforming(rule.key, draw, depth + 1)
        with contextlib.suppress(TypeError):  # an unhashable key drawn from ANY
            pairs[key] = value = conforming(rule.value, draw, depth + 1)
            if isinstance(value, dict) and draw(st.integers(0, 4)):  # mostly keep the ties
                if rule.key_is is not None:
                    value[rule.key_is] = key
                if rule.unique is not None:
                    value[rule.unique] = i % 4
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


@st.composite
def made_and_value(draw: st.DrawFn) -> tuple[sc.Rule, Any]:
    rule = draw(MADE)
    return rule, conforming(rule, draw)


@FUZZ
@given(made_and_value())
def test_native_builds_what_the_reference_builds(case: tuple[sc.Rule, Any]) -> None:
    rule, value = case
    built(sc.Schema(rule), value)


# -- the native compiler and its lifetime ---------------------------------------------------------

BYTES_NODE = (1, 1, 0, 1, (), b"")
POINT_SLOTS = ((Point.x, (0, 0, None)), (Point.y, (1, 0)))
MALFORMED_TREES: list[Any] = [
    None,
    (),
    (0,),
    (0, 0),
    (0, 7),
    (-1, 1, 0, 1, (), b""),
    (0, 1, 0, 1, ()),
    (0, 1, -1, 1, (), b""),
    (0, 1, 0, 1, [32], b""),
    (0, 1, 0, 1, (-1,), b""),
    (0, 1, 0, 2**70, (), b""),
    (0, 1, 0, 1, (), "x"),
    (0, 2, 0, 1, {"a"}, None),
    (0, 2, 0, 1, None, "not a pattern"),
    (0, 3, ((1,),)),
    (0, 3, ((1, 2.0),)),
    (0, 3, [(1, 2)]),
    (0, 4, 0, 1, None),
    (0, 5, ((1, True, False),), None),
    (0, 5, ((1, 1, False, BYTES_NODE),), None),
    (0, 5, (([], True, False, BYTES_NODE),), None),
    (0, 5, tuple((i, True, False, BYTES_NODE) for i in range(65)), None),
    (0, 5, ((1, True, False, BYTES_NODE),)),
    (0, 5, ((1, True, False, BYTES_NODE),), (Point,)),  # a make is (class, slots)
    (0, 5, ((1, True, False, BYTES_NODE),), (1, POINT_SLOTS)),  # not a class
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Point.x, (0, 0, None)), ("y", (1, 0))))),  # no descriptor
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Labelled.label, (1, 0)),))),  # another class's slot
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Point.x, (0, 1, None)),))),  # no such field
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Point.x, (0, -1, None)),))),
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Point.x, (3, 0)),))),  # unknown source
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Point.x, (0, 0)),))),  # GET without a default
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Point.x, (2, None)),))),  # MAKE of no make
    (0, 5, ((1, True, False, BYTES_NODE),), (Point, ((Point.x, [0, 0, None]),))),
    (0, 6, 0, 1, (1, 2, 0, 1, None, None), None, -1, -1),
    (0, 6, 0, 1, BYTES_NODE, BYTES_NODE, 0, -1),  # key_is needs record values
    (0, 6, 0, 1, BYTES_NODE, (2, 5, ((1, False, False, BYTES_NODE),), None), 0, -1),  # an optional field
    (0, 6, 0, 1, BYTES_NODE, (2, 5, ((1, True, True, BYTES_NODE),), None), -1, 0),  # a nullable field
    (0, 6, 0, 1, BYTES_NODE, (2, 5, ((1, True, False, BYTES_NODE),), None), 1, -1),  # no such field
    (0, 6, 0, 1, BYTES_NODE, (2, 5, ((1, True, False, BYTES_NODE),), None), -1, "0"),
    (0, True, 0, 1, (), b""),
]


@pytest.mark.parametrize("tree", MALFORMED_TREES)
def test_native_compiler_refuses_malformed_trees(tree: Any) -> None:
    assert native is not None
    with pytest.raises((ValueError, TypeError, OverflowError)):
        native.schema(tree)


def test_native_compiler_bounds_nesting() -> None:
    assert native is not None
    tree: Any = BYTES_NODE
    for _ in range(70):
        tree = (0, 4, 0, 1, tree)
    with pytest.raises(ValueError, match="nested too deep"):
        native.schema(tree)
    make: Any = (Point, ((Point.x, (0, 0, None)), (Point.y, (1, 0))))
    for _ in range(70):
        make = (Point, ((Point.x, (0, 0, None)), (Point.y, (2, make))))
    with pytest.raises(ValueError, match="nested too deep"):
        native.schema((0, 5, ((1, True, False, BYTES_NODE),), make))


def test_native_check_needs_a_schema() -> None:
    assert native is not None
    with pytest.raises(ValueError, match="PyCapsule"):
        native.check(1, object())
    with pytest.raises(TypeError):
        native.check(1)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="PyCapsule"):
        native.build(1, object())
    with pytest.raises(ValueError, match="Make"):
        native.build({}, sc.Schema(RECORD)._compiled)


def test_no_leak_on_any_path() -> None:
    """Every check and every compile (accepted or refused) returns what it took (a leak grows the heap)."""
    assert native is not None
    schema = sc.Schema(sc.MapOf(sc.Text(), RECORD, 1, 3))
    big = sc.Schema(sc.Array(sc.Int(((-(2**70), 2**70),)), 0, 10))
    tied = sc.Schema(TIED)
    labelled = sc.Schema(LABELLED)
    values: list[tuple[sc.Schema, Any]] = [(schema, v) for _, v, _ in SEMANTICS]
    values += [(schema, {"a": value}) for _, value, _ in SEMANTICS]
    values += [(tied, v) for _, v, _ in SEMANTICS]
    values += [(big, [2**69, -(2**69), 2**71, 5])]
    builds: list[Any] = [
        {
            "p": [{1: 1}, {1: 2, 2: None}, {1: 3, 2: 4}],
            "x": 5,
            "m": {"a": {1: 6}, "b": {1: 6}},
            "t": ["u"],
            "d": {1: 7},
        },
        {"p": [{1: 1}, {1: 20}], "x": 5},  # refused after one item was built
        {"p": [{1: 1}], "x": 5, "m": {"a": {1: 6}, "b": {1: 60}}},  # refused after one value was built
        {"p": [{1: 1}], "x": 50, "d": {1: 7}},  # refused after the fields were built
        {"p": [], "x": 1, "t": ["a", "b"]},
    ]
    owned_builds = [v["p"] for v in builds]
    owned = [v for _, v in values if isinstance(v, list | dict | bytes) and len(v) > 1]  # no shared singletons
    owned += owned_builds
    held = [sys.getrefcount(v) for v in owned]

    def run(times: int) -> None:
        for _ in range(times):
            for s, v in values:
                s.check(v)
            for v in builds:
                labelled.build(v)
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
