"""Table-driven checks of decoded CBOR values, and the objects built from the values that pass.

Owns: the rules (:class:`Bytes`, :class:`Text`, :class:`Int`, :class:`Array`,
:class:`Record` of :class:`Field`, :class:`MapOf`), what a record builds
(:class:`Make` of :class:`Get`, :class:`Const` and nested :class:`Make`),
their compiled form (:class:`Schema`), the check of a value against it and
the construction of the checked value's objects. Knows nothing of any
format: ``ism.formats.psa`` states its claims-sets in these rules.
Must not import: anything above ``ism.errors``.

Threat: a fast path that accepts what the checked decoder refuses, or builds
an object that is not what the checked decoder would build (a parser
differential). Hence one compiled tree, two interpreters tested against each
other, and construction that bypasses ``__init__`` only for values that
passed every rule.

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
  ``min_size..max_size`` and, if ``sizes`` is not empty, one of ``sizes``,
  and that starts with ``prefix``.
* :class:`Text`: a ``str`` whose length in code points is within
  ``min_len..max_len``, if ``one_of`` is given one of its members, and if
  ``pattern`` is given a full match of it.
* :class:`Int`: an ``int`` (not ``bool``) within one of the inclusive ``ranges``.
* :class:`Array`: a ``list`` of ``min_len..max_len`` items, each conforming to ``item``.
* :class:`Record`: a ``dict`` holding no key but its fields' keys; a field
  that is missing is a failure if ``required``; one that is present conforms
  to its rule, except a ``None`` in a ``nullable`` field (taken as absent).
* :class:`MapOf`: a ``dict`` of ``min_len..max_len`` entries whose every key
  conforms to ``key`` and every value to ``value``; with ``key_is``, every
  value (a record) holds the entry's key in that field (``is`` or ``==``);
  with ``unique``, no two values hold equal values in that field. A broken
  ``key_is`` or ``unique`` reports the map's own index.

Order: a rule's own checks first (type, size, unknown keys; the record's
index for an unknown key), then its children in order — record fields in the
schema's order (a missing required field reports the field's rule), list
items and map entries in their order, an entry's key before its value, then
the entry's ``key_is``, then its ``unique``.

What :meth:`Schema.build` returns for a value that conforms (the root must be
a record that makes; anything that does not conform builds None):

* a byte string, text or integer: the value itself;
* an array: a tuple of its items' built values;
* a record with a :class:`Make`: a new instance of ``make.cls`` (``__new__``
  of ``object``, no ``__init__``: the schema is its check) whose every slot is
  set from its source — :class:`Get`: the built value of that field, or the
  default where the field is absent or a nullable null; :class:`Const`: the
  constant; a nested :class:`Make`: an object built from the same record; a
  record without one: the dict itself;
* a map of :class:`MapOf`: a tuple of its values' built values, in entry order.
"""

from __future__ import annotations

import re
import sys
import types
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

try:
    from ism.formats import _cbor_native as _native
except ImportError:  # no C compiler at install: the pure-Python checker alone
    _native = None  # type: ignore[assignment]

__all__ = ["Array", "Bytes", "Const", "Field", "Get", "Int", "Make", "MapOf", "Record", "Rule", "Schema", "Text"]

#: No upper bound.
UNBOUNDED: Final = sys.maxsize

_BYTES, _TEXT, _INT, _ARRAY, _RECORD, _MAPOF = 1, 2, 3, 4, 5, 6
_GET, _CONST, _MAKE = 0, 1, 2


@dataclass(frozen=True, slots=True)
class Bytes:
    """A byte string of ``min_size..max_size`` bytes, one of ``sizes`` if given, starting with ``prefix``."""

    sizes: tuple[int, ...] = ()
    min_size: int = 0
    max_size: int = UNBOUNDED
    prefix: bytes = b""


@dataclass(frozen=True, slots=True)
class Text:
    """A text string of ``min_len..max_len`` code points, one of ``one_of`` and a full match of ``pattern`` if given."""

    min_len: int = 0
    max_len: int = UNBOUNDED
    one_of: frozenset[str] | None = None
    pattern: re.Pattern[str] | None = None


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
class Get:
    """A slot's source: the built value of the record's field ``key``; ``default`` if absent (or null)."""

    key: Any
    default: Any = None


@dataclass(frozen=True, slots=True)
class Const:
    """A slot's source: a constant."""

    value: Any


@dataclass(frozen=True, slots=True)
class Make:
    """What a record builds: an instance of ``cls`` with every slot (all of them) set from its source."""

    cls: type
    slots: tuple[tuple[str, Source], ...]


Source: TypeAlias = Get | Const | Make


@dataclass(frozen=True, slots=True)
class Record:
    """A map with the ``fields``' keys and no other; ``make`` builds its object (else it builds the dict)."""

    fields: tuple[Field, ...]
    make: Make | None = None


@dataclass(frozen=True, slots=True)
class MapOf:
    """A map of ``min_len..max_len`` entries, every key conforming to ``key``, every value to ``value``.

    ``key_is``: the key of a required field of the value record that must equal the entry's key.
    ``unique``: the key of a required field of the value record whose values must all differ.
    """

    key: Rule
    value: Rule
    min_len: int = 0
    max_len: int = UNBOUNDED
    key_is: Any = None
    unique: Any = None


Rule: TypeAlias = Bytes | Text | Int | Array | Record | MapOf


class Schema:
    """A rule tree compiled once: :meth:`check` returns None or the index of the broken rule.

    ``rules[i]`` is the rule numbered ``i`` (what a check's result names). :meth:`build` checks
    and builds in one pass (the root must be a record with a :class:`Make`).
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
            return (index, _BYTES, rule.min_size, rule.max_size, tuple(rule.sizes), bytes(rule.prefix))
        if isinstance(rule, Text):
            one_of = None if rule.one_of is None else frozenset(rule.one_of)
            if rule.pattern is not None and not isinstance(rule.pattern, re.Pattern):
                raise TypeError("a text pattern must be a compiled re.Pattern")
            return (index, _TEXT, rule.min_len, rule.max_len, one_of, rule.pattern)
        if isinstance(rule, Int):
            return (index, _INT, tuple((int(lo), int(hi)) for lo, hi in rule.ranges))
        if isinstance(rule, Array):
            return (index, _ARRAY, rule.min_len, rule.max_len, self._compile(rule.item))
        if isinstance(rule, Record):
            keys = [f.key for f in rule.fields]
            if len(set(keys)) != len(keys):
                raise ValueError("a record names a key twice")
            fields = tuple((f.key, bool(f.required), bool(f.nullable), self._compile(f.rule)) for f in rule.fields)
            make = None if rule.make is None else _compile_make(rule.make, keys)
            return (index, _RECORD, fields, make)
        if isinstance(rule, MapOf):
            key = self._compile(rule.key)
            value = self._compile(rule.value)
            key_is = _value_field(rule.value, rule.key_is, "key_is", leaf=False)
            unique = _value_field(rule.value, rule.unique, "unique", leaf=True)
            return (index, _MAPOF, rule.min_len, rule.max_len, key, value, key_is, unique)
        raise TypeError(f"not a schema rule: {type(rule).__name__}")

    def check(self, value: Any) -> int | None:
        """None if ``value`` conforms, else the index of the first rule it breaks (native when built)."""
        if self._compiled is not None:
            return _native.check(value, self._compiled)
        return _check(self.tree, value)

    def check_python(self, value: Any) -> int | None:
        """:meth:`check` by the pure-Python reference (what the native checker is tested against)."""
        return _check(self.tree, value)

    def build(self, value: Any) -> Any:
        """The object built from ``value`` if it conforms, else None (native when built)."""
        if self._compiled is not None:
            return _native.build(value, self._compiled)
        return self.build_python(value)

    def build_python(self, value: Any) -> Any:
        """:meth:`build` by the pure-Python reference: :meth:`check_python`, then construction."""
        if self.tree[1] != _RECORD or self.tree[3] is None:
            raise ValueError("only a schema whose root is a record with a Make builds")
        return None if _check(self.tree, value) is not None else _build(self.tree, value)


def _slot_names(cls: type) -> set[str]:
    """Every slot of ``cls`` and its bases (what an instance built without ``__init__`` must have set)."""
    names: set[str] = set()
    for klass in cls.__mro__[:-1]:
        if "__dict__" in vars(klass) or "__slots__" not in vars(klass):
            raise ValueError(f"{cls.__name__}: only classes with __slots__ (and no __dict__) can be made")
        slots = vars(klass)["__slots__"]
        names.update((slots,) if isinstance(slots, str) else slots)
    return names - {"__weakref__"}


def _compile_make(make: Make, keys: list[Any]) -> tuple[Any, ...]:
    """``(cls, ((descriptor, source), ...))``; a source is ``(_GET, field, default)``, ``(_CONST, value)``
    or ``(_MAKE, make)`` — ``field`` the index of the record's field."""
    names = [name for name, _ in make.slots]
    if sorted(names) != sorted(_slot_names(make.cls)):
        raise ValueError(f"{make.cls.__name__}: a Make sets every slot once")
    slots = []
    for name, source in make.slots:
        descriptor = getattr(make.cls, name)
        if not isinstance(descriptor, types.MemberDescriptorType):
            raise ValueError(f"{make.cls.__name__}.{name} is not a slot")
        compiled: tuple[Any, ...]
        if isinstance(source, Get):
            if source.key not in keys:
                raise ValueError(f"{make.cls.__name__}.{name}: no field {source.key!r} in the record")
            compiled = (_GET, keys.index(source.key), source.default)
        elif isinstance(source, Const):
            compiled = (_CONST, source.value)
        elif isinstance(source, Make):
            compiled = (_MAKE, _compile_make(source, keys))
        else:
            raise TypeError(f"not a slot source: {type(source).__name__}")
        slots.append((descriptor, compiled))
    return (make.cls, tuple(slots))


def _value_field(value: Rule, key: Any, what: str, leaf: bool) -> int:
    """The index of the value record's field ``key`` (required, not nullable) for ``key_is``/``unique``; -1 if None."""
    if key is None:
        return -1
    if not isinstance(value, Record):
        raise ValueError(f"MapOf.{what} needs record values")
    for i, f in enumerate(value.fields):
        if f.key == key and type(f.key) is type(key):
            if not f.required or f.nullable:
                raise ValueError(f"MapOf.{what} names a field that may be absent")
            if leaf and not isinstance(f.rule, Bytes | Text | Int):
                raise ValueError(f"MapOf.{what} names a field that is not a byte string, text or integer")
            return i
    raise ValueError(f"MapOf.{what}: no field {key!r} in the value record")


def _check(node: tuple[Any, ...], value: Any) -> int | None:
    index: int = node[0]
    kind: int = node[1]
    if kind == _BYTES:
        if type(value) is not bytes:
            return index
        n = len(value)
        if not node[2] <= n <= node[3] or (node[4] and n not in node[4]) or not value.startswith(node[5]):
            return index
        return None
    if kind == _TEXT:
        if type(value) is not str or not node[2] <= len(value) <= node[3]:
            return index
        if node[4] is not None and value not in node[4]:
            return index
        if node[5] is not None and node[5].fullmatch(value) is None:
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
    key_is, unique = node[6], node[7]
    seen: set[Any] = set()
    for key, item in value.items():
        failed = _check(node[4], key)
        if failed is None:
            failed = _check(node[5], item)
        if failed is not None:
            return failed
        if key_is >= 0:
            held = item[node[5][2][key_is][0]]
            if held is not key and held != key:
                return index
        if unique >= 0:
            held = item[node[5][2][unique][0]]
            if held in seen:
                return index
            seen.add(held)
    return None


_ABSENT: Final = object()


def _build(node: tuple[Any, ...], value: Any) -> Any:
    """The built form of a value that conforms to ``node`` (see the module docstring)."""
    kind: int = node[1]
    if kind == _ARRAY:
        return tuple([_build(node[4], item) for item in value])
    if kind == _MAPOF:
        return tuple([_build(node[5], item) for item in value.values()])
    if kind != _RECORD or node[3] is None:
        return value
    built = []
    for key, _required, nullable, rule in node[2]:
        item = value.get(key, _ABSENT)
        built.append(_ABSENT if item is _ABSENT or (nullable and item is None) else _build(rule, item))
    return _make(node[3], built)


def _make(make: tuple[Any, ...], built: list[Any]) -> Any:
    cls, slots = make
    out = object.__new__(cls)
    for descriptor, source in slots:
        if source[0] == _GET:
            item = built[source[1]]
            descriptor.__set__(out, source[2] if item is _ABSENT else item)
        elif source[0] == _CONST:
            descriptor.__set__(out, source[1])
        else:
            descriptor.__set__(out, _make(source[1], built))
    return out
