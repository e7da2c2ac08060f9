"""Table-driven checks of decoded CBOR values: types, sizes, ranges, enumerations, presence, unknown keys.

Owns: the rules (:class:`Bytes`, :class:`Text`, :class:`Int`, :class:`Array`,
:class:`Record` of :class:`Field`, :class:`MapOf`), their compiled form
(:class:`Schema`) and the check of a value against it. Knows nothing of any
format: ``ism.formats.psa`` states its claims-sets in these rules.
Must not import: anything above ``ism.errors``.

A check answers one question — does this value conform? — with None, or the
index of the rule it breaks (rules are numbered in pre-order; the first
broken one in the traversal order below). It never explains a failure and
never raises on a value: a caller that needs the error re-runs its own
checked decoder, which raises the typed error with its rule id, the way
``cbor.loads`` hands refusals to the reference decoder
(docs/adr/0005-native-cbor-decoder.md). So a schema can only make a fast
path refuse more, never accept something the checked decoder refuses — as
long as it states no less than the checked decoder checks; the tests of each
schema's user compare the two.

Two implementations, one behaviour: the pure-Python checker here is the
reference; ``ism.formats._cbor_native.check`` (when the extension is built)
interprets the same compiled tree and must return the same result for every
value (tests/unit/test_cbor_schema.py compares them).

Semantics, per rule:

* :class:`Bytes`: a ``bytes`` object (exact type) whose length is within
  ``min_size..max_size`` and, if ``sizes`` is not empty, one of ``sizes``.
* :class:`Text`: a ``str`` whose length in code points is within
  ``min_len..max_len`` and, if ``one_of`` is given, one of its members.
* :class:`Int`: an ``int`` (not ``bool``) within one of the inclusive ``ranges``.
* :class:`Array`: a ``list`` of ``min_len..max_len`` items, each conforming to ``item``.
* :class:`Record`: a ``dict`` holding no key but its fields' keys; a field
  that is missing is a failure if ``required``; one that is present conforms
  to its rule, except a ``None`` in a ``nullable`` field (taken as absent).
* :class:`MapOf`: a ``dict`` of ``min_len..max_len`` entries whose every key
  conforms to ``key`` and every value to ``value``.

Order: a rule's own checks first (type, size, unknown keys; the record's
index for an unknown key), then its children in order — record fields in the
schema's order (a missing required field reports the field's rule), list
items and map entries in their order, an entry's key before its value.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

try:
    from ism.formats import _cbor_native as _native
except ImportError:  # no C compiler at install: the pure-Python checker alone
    _native = None  # type: ignore[assignment]

__all__ = ["Array", "Bytes", "Field", "Int", "MapOf", "Record", "Rule", "Schema", "Text"]

#: No upper bound.
UNBOUNDED: Final = sys.maxsize

_BYTES, _TEXT, _INT, _ARRAY, _RECORD, _MAPOF = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True, slots=True)
class Bytes:
    """A byte string of ``min_size..max_size`` bytes, and one of ``sizes`` if given."""

    sizes: tuple[int, ...] = ()
    min_size: int = 0
    max_size: int = UNBOUNDED


@dataclass(frozen=True, slots=True)
class Text:
    """A text string of ``min_len..max_len`` code points, and one of ``one_of`` if given."""

    min_len: int = 0
    max_len: int = UNBOUNDED
    one_of: frozenset[str] | None = None


@dataclass(frozen=True, slots=True)
class Int:
    """An integer (not a bool) within one of the inclusive ``ranges``."""

    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True, slots=True)
class Array:
    """An array of ``min_len..max_len`` items, each conforming to ``item``."""

    item: Rule
    min_len: int = 0
    max_len: int = UNBOUNDED


@dataclass(frozen=True, slots=True)
class Field:
    """One key of a :class:`Record`: its rule, whether it must be present, whether null means absent."""

    key: Any
    rule: Rule
    required: bool = True
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class Record:
    """A map with the ``fields``' keys and no other."""

    fields: tuple[Field, ...]


@dataclass(frozen=True, slots=True)
class MapOf:
    """A map of ``min_len..max_len`` entries, every key conforming to ``key``, every value to ``value``."""

    key: Rule
    value: Rule
    min_len: int = 0
    max_len: int = UNBOUNDED


Rule: TypeAlias = Bytes | Text | Int | Array | Record | MapOf


class Schema:
    """A rule tree compiled once: :meth:`check` returns None or the index of the broken rule.

    ``rules[i]`` is the rule numbered ``i`` (what a check's result names).
    """

    __slots__ = ("_compiled", "rules", "tree")

    def __init__(self, rule: Rule) -> None:
        self.rules: list[Rule] = []
        self.tree: tuple[Any, ...] = self._compile(rule)
        self._compiled = _native.schema(self.tree) if _native is not None else None

    def _compile(self, rule: Rule) -> tuple[Any, ...]:
        index = len(self.rules)
        self.rules.append(rule)
        if isinstance(rule, Bytes):
            return (index, _BYTES, rule.min_size, rule.max_size, tuple(rule.sizes))
        if isinstance(rule, Text):
            one_of = None if rule.one_of is None else frozenset(rule.one_of)
            return (index, _TEXT, rule.min_len, rule.max_len, one_of)
        if isinstance(rule, Int):
            return (index, _INT, tuple((int(lo), int(hi)) for lo, hi in rule.ranges))
        if isinstance(rule, Array):
            return (index, _ARRAY, rule.min_len, rule.max_len, self._compile(rule.item))
        if isinstance(rule, Record):
            keys = [f.key for f in rule.fields]
            if len(set(keys)) != len(keys):
                raise ValueError("a record names a key twice")
            fields = tuple((f.key, bool(f.required), bool(f.nullable), self._compile(f.rule)) for f in rule.fields)
            return (index, _RECORD, fields)
        if isinstance(rule, MapOf):
            key = self._compile(rule.key)
            return (index, _MAPOF, rule.min_len, rule.max_len, key, self._compile(rule.value))
        raise TypeError(f"not a schema rule: {type(rule).__name__}")

    def check(self, value: Any) -> int | None:
        """None if ``value`` conforms, else the index of the first rule it breaks (native when built)."""
        if self._compiled is not None:
            return _native.check(value, self._compiled)
        return _check(self.tree, value)

    def check_python(self, value: Any) -> int | None:
        """:meth:`check` by the pure-Python reference (what the native checker is tested against)."""
        return _check(self.tree, value)


def _check(node: tuple[Any, ...], value: Any) -> int | None:
    index: int = node[0]
    kind: int = node[1]
    if kind == _BYTES:
        if type(value) is not bytes:
            return index
        n = len(value)
        if not node[2] <= n <= node[3] or (node[4] and n not in node[4]):
            return index
        return None
    if kind == _TEXT:
        if type(value) is not str or not node[2] <= len(value) <= node[3]:
            return index
        if node[4] is not None and value not in node[4]:
            return index
        return None
    if kind == _INT:
        if type(value) is not int or not any(lo <= value <= hi for lo, hi in node[2]):
            return index
        return None
    if kind == _ARRAY:
        if type(value) is not list or not node[2] <= len(value) <= node[3]:
            return index
        for item in value:
            failed: int | None = _check(node[4], item)
            if failed is not None:
                return failed
        return None
    if kind == _RECORD:
        if type(value) is not dict:
            return index
        fields = node[2]
        if len(value) != sum(1 for field in fields if field[0] in value):
            return index  # a key that is no field's (the fields' keys are distinct)
        for key, required, nullable, rule in fields:
            if key not in value:
                if required:
                    missing: int = rule[0]
                    return missing
                continue
            item = value[key]
            if nullable and item is None:
                continue
            failed = _check(rule, item)
            if failed is not None:
                return failed
        return None
    # _MAPOF
    if type(value) is not dict or not node[2] <= len(value) <= node[3]:
        return index
    for key, item in value.items():
        failed = _check(node[4], key)
        if failed is None:
            failed = _check(node[5], item)
        if failed is not None:
            return failed
    return None
