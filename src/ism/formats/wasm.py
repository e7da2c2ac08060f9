"""Strict WebAssembly binary-format reader (core spec 2.0) for untrusted modules.

Owns: the structural parse of a microservice's ``.wasm`` bytes into a frozen
:class:`WasmModule` summary (types, imports, exports, function count, first
memory's limits, custom section names), and :func:`check_imports`, which
compares a module's imports with the host functions iSM actually provides.
Must not import: anything above ``ism.errors``; in particular no Wasm engine
(wasmtime) and no I/O. These bytes are read *before* any engine sees them.

Threat: a microservice package is attacker-supplied. Its module may be
truncated, padded, reordered or crafted so that two readers disagree about
what it imports or exports (a duplicate section, trailing bytes inside a
section, an over-long LEB128 integer carrying hidden high bits, a vector
count of 2**32-1 that makes a naive reader allocate gigabytes). This reader:

* bounds the whole input by ``max_size`` before looking at it;
* checks every section size against the bytes remaining, and every vector
  count against the bytes left in its section, so a huge count fails fast
  without allocating anything;
* accepts only canonical LEB128 widths (at most 5 bytes for u32, 10 for u64)
  with no bits beyond the integer's width;
* requires non-custom sections to appear at most once and in canonical order,
  names to be valid UTF-8, export names to be unique, and the sections it
  decodes fully (type, import, function, memory, export) to be consumed
  exactly; the others (table, global, start, element, data count, code,
  data, tag) are framed by their size and skipped, except that the code
  section's entry count must match the function section's.

It does not validate function bodies; the engine does that later. Passing
this parser means the import/export summary is the one the engine will see.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ism.errors import FormatError

__all__ = [
    "Export",
    "FuncType",
    "Import",
    "ValType",
    "WasmModule",
    "check_imports",
    "parse_module",
]

ValType = str
"""A value type name: ``i32``, ``i64``, ``f32``, ``f64``, ``v128``, ``funcref`` or ``externref``."""

MAGIC: Final = b"\x00asm"
VERSION: Final = b"\x01\x00\x00\x00"
DEFAULT_MAX_SIZE: Final = 16 * 1024 * 1024

_VALTYPES: Final[Mapping[int, str]] = {
    0x7F: "i32",
    0x7E: "i64",
    0x7D: "f32",
    0x7C: "f64",
    0x7B: "v128",
    0x70: "funcref",
    0x6F: "externref",
}
_REFTYPES: Final = frozenset({0x70, 0x6F})

_SECTION_NAMES: Final[Mapping[int, str]] = {
    0: "custom",
    1: "type",
    2: "import",
    3: "function",
    4: "table",
    5: "memory",
    6: "global",
    7: "export",
    8: "start",
    9: "element",
    10: "code",
    11: "data",
    12: "datacount",
    13: "tag",
}
# Canonical position of each non-custom section; the tag section (13) sits
# between memory and global, the data count section (12) before code.
_SECTION_RANK: Final[Mapping[int, int]] = {
    1: 1,
    2: 2,
    3: 3,
    4: 4,
    5: 5,
    13: 6,
    6: 7,
    7: 8,
    8: 9,
    9: 10,
    12: 11,
    10: 12,
    11: 13,
}

_EXTERN_KINDS: Final = ("func", "table", "memory", "global", "tag")

# Smallest encoding of one vector element, used to reject impossible counts.
_MIN_FUNCTYPE: Final = 3  # 0x60, empty params, empty results
_MIN_IMPORT: Final = 4  # empty module, empty name, kind, one-byte descriptor
_MIN_MEMTYPE: Final = 2  # flag, min
_MIN_EXPORT: Final = 3  # empty name, kind, index
_MIN_CODE: Final = 3  # size, empty locals vector, ``end``


@dataclass(frozen=True, slots=True)
class FuncType:
    """A function signature: parameter and result value types."""

    params: tuple[ValType, ...]
    results: tuple[ValType, ...]

    def __str__(self) -> str:
        return f"({' '.join(self.params)}) -> ({' '.join(self.results)})"


@dataclass(frozen=True, slots=True)
class Import:
    """One import. ``kind`` is ``func``, ``table``, ``memory``, ``global`` or ``tag``.

    ``type`` is the function's signature for ``func`` imports, else None.
    """

    module: str
    name: str
    kind: str
    type: FuncType | None


@dataclass(frozen=True, slots=True)
class Export:
    """One export: its unique ``name``, ``kind`` (as for :class:`Import`) and index in that kind's space."""

    name: str
    kind: str
    index: int


@dataclass(frozen=True, slots=True)
class WasmModule:
    """The structural summary of a module.

    Attributes:
        types: the type section's function types, in order.
        imports: every import, in order.
        exports: every export, in order.
        function_count: number of defined (non-imported) functions.
        memory_min_pages: initial size of the first memory (imported or
            defined), in 64 KiB pages; None if the module has no memory.
        memory_max_pages: its maximum, None if unbounded or no memory.
        custom_sections: names of the custom sections, in order.
        function_type_indices: type index of each defined function (the
            function section), used by :meth:`export_type`.
    """

    types: tuple[FuncType, ...]
    imports: tuple[Import, ...]
    exports: tuple[Export, ...]
    function_count: int
    memory_min_pages: int | None
    memory_max_pages: int | None
    custom_sections: tuple[str, ...]
    function_type_indices: tuple[int, ...] = ()

    def export_type(self, name: str) -> FuncType | None:
        """The signature of the exported function ``name``.

        Follows the function index space: imported functions first, then
        defined ones. Returns None if there is no such export, it is not a
        function, or its index does not resolve.
        """
        export = next((e for e in self.exports if e.name == name), None)
        if export is None or export.kind != "func":
            return None
        imported = [i for i in self.imports if i.kind == "func"]
        if export.index < len(imported):
            return imported[export.index].type
        local = export.index - len(imported)
        if local >= len(self.function_type_indices):
            return None
        type_index = self.function_type_indices[local]
        return self.types[type_index] if type_index < len(self.types) else None


def _fail(rule: str, message: str, offset: int) -> FormatError:
    return FormatError(f"wasm.{rule}", f"{message} at byte {offset}")


class _Reader:
    """A cursor over ``data[pos:end]``. Reading past ``end`` raises ``overrun_rule``."""

    __slots__ = ("data", "end", "overrun", "pos", "where")

    def __init__(self, data: bytes, pos: int, end: int, overrun: str, where: str) -> None:
        self.data = data
        self.pos = pos
        self.end = end
        self.overrun = overrun
        self.where = where

    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise _fail(
                self.overrun,
                f"{what} needs {n} bytes but only {self.end - self.pos} remain in {self.where}",
                self.pos,
            )

    def byte(self, what: str) -> int:
        self._need(1, what)
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.pos += n

    def uleb(self, bits: int, what: str) -> int:
        """Unsigned LEB128 of at most ``bits`` bits, in at most ceil(bits/7) bytes."""
        start = self.pos
        max_bytes = (bits + 6) // 7
        result = 0
        for i in range(max_bytes):
            b = self.byte(what)
            result |= (b & 0x7F) << (7 * i)
            if not b & 0x80:
                if i == max_bytes - 1 and b >> (bits - 7 * i):
                    raise _fail("leb128", f"{what}: u{bits} has bits beyond {bits}", start)
                return result
        raise _fail("leb128", f"{what}: u{bits} longer than {max_bytes} bytes", start)

    def u32(self, what: str) -> int:
        return self.uleb(32, what)

    def count(self, min_size: int, what: str) -> int:
        """A vector count, refused unless ``count * min_size`` bytes remain."""
        start = self.pos
        n = self.u32(f"{what} count")
        if n * min_size > self.remaining():
            raise _fail(
                self.overrun,
                f"{what} count {n} cannot fit in the {self.remaining()} bytes left in {self.where}",
                start,
            )
        return n

    def name(self, what: str) -> str:
        start = self.pos
        n = self.u32(f"{what} length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail("utf8", f"{what} is not valid UTF-8 ({exc.reason})", start) from None


class _Parser:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.types: list[FuncType] = []
        self.imports: list[Import] = []
        self.exports: list[Export] = []
        self.function_types: list[int] | None = None
        self.code_count: int | None = None
        self.memories: list[tuple[int, int | None]] = []
        self.customs: list[str] = []

    def parse(self) -> WasmModule:
        data = self.data
        if len(data) < 8:
            if not MAGIC.startswith(data[:4]):
                raise _fail("magic", f"bad magic {data[:4].hex()}, expected {MAGIC.hex()}", 0)
            raise _fail("truncated", f"header needs 8 bytes, got {len(data)}", len(data))
        if data[:4] != MAGIC:
            raise _fail("magic", f"bad magic {data[:4].hex()}, expected {MAGIC.hex()}", 0)
        if data[4:8] != VERSION:
            version = int.from_bytes(data[4:8], "little")
            raise _fail("version", f"unsupported binary version {version}, expected 1", 4)

        top = _Reader(data, 8, len(data), "truncated", "the module")
        last_rank = 0
        last_id = 0
        while top.remaining():
            header = top.pos
            section_id = top.byte("section id")
            if section_id not in _SECTION_NAMES:
                raise _fail("section-id", f"unknown section id {section_id}", header)
            label = f"section {section_id} ({_SECTION_NAMES[section_id]})"
            size = top.u32(f"{label} size")
            if size > top.remaining():
                raise _fail(
                    "section-size",
                    f"{label} declares {size} bytes but only {top.remaining()} remain",
                    header,
                )
            body = _Reader(data, top.pos, top.pos + size, "section-size", f"{label} starting at byte {header}")
            top.pos += size
            if section_id != 0:
                rank = _SECTION_RANK[section_id]
                if rank <= last_rank:
                    problem = "repeated" if section_id == last_id else f"after section {last_id}"
                    raise _fail("section-order", f"{label} {problem}; sections must be unique and in order", header)
                last_rank, last_id = rank, section_id
            self._section(section_id, label, body)

        defined = len(self.function_types or ())
        if (self.code_count or 0) != defined:
            raise _fail(
                "function-count",
                f"function section declares {defined} functions but code section has {self.code_count or 0} bodies",
                len(data),
            )
        first_memory = self.memories[0] if self.memories else (None, None)
        return WasmModule(
            types=tuple(self.types),
            imports=tuple(self.imports),
            exports=tuple(self.exports),
            function_count=defined,
            memory_min_pages=first_memory[0],
            memory_max_pages=first_memory[1],
            custom_sections=tuple(self.customs),
            function_type_indices=tuple(self.function_types or ()),
        )

    def _section(self, section_id: int, label: str, r: _Reader) -> None:
        if section_id == 0:
            self.customs.append(r.name("custom section name"))
            return  # the rest of a custom section is opaque
        if section_id == 1:
            self._types(r)
        elif section_id == 2:
            self._imports(r)
        elif section_id == 3:
            self._functions(r)
        elif section_id == 5:
            for _ in range(r.count(_MIN_MEMTYPE, "memory")):
                self.memories.append(self._limits(r, "memory"))
        elif section_id == 7:
            self._exports(r)
        elif section_id == 10:
            self.code_count = r.count(_MIN_CODE, "code entry")
            return  # bodies are framed only
        else:
            return  # framed only
        if r.remaining():
            raise _fail("section-size", f"{label} has {r.remaining()} unread bytes at its end", r.pos)

    def _valtype(self, r: _Reader, what: str) -> str:
        at = r.pos
        b = r.byte(what)
        if b not in _VALTYPES:
            raise _fail("valtype", f"{what}: unknown value type 0x{b:02x}", at)
        return _VALTYPES[b]

    def _types(self, r: _Reader) -> None:
        for i in range(r.count(_MIN_FUNCTYPE, "type")):
            at = r.pos
            form = r.byte(f"type {i} form")
            if form != 0x60:
                raise _fail("type-form", f"type {i}: form 0x{form:02x} is not a function type (0x60)", at)
            params = tuple(self._valtype(r, f"type {i} param") for _ in range(r.count(1, f"type {i} param")))
            results = tuple(self._valtype(r, f"type {i} result") for _ in range(r.count(1, f"type {i} result")))
            self.types.append(FuncType(params, results))

    def _type_index(self, r: _Reader, what: str) -> int:
        at = r.pos
        index = r.u32(what)
        if index >= len(self.types):
            raise _fail("type-index", f"{what}: type index {index} but only {len(self.types)} types", at)
        return index

    def _limits(self, r: _Reader, what: str) -> tuple[int, int | None]:
        """Limits: bit 0 = has max, bit 1 = shared, bit 2 = 64-bit (memory64)."""
        at = r.pos
        flag = r.byte(f"{what} limits flag")
        if flag > 0x07:
            raise _fail("limits", f"{what}: unknown limits flag 0x{flag:02x}", at)
        bits = 64 if flag & 0x04 else 32
        minimum = r.uleb(bits, f"{what} minimum")
        maximum = r.uleb(bits, f"{what} maximum") if flag & 0x01 else None
        if maximum is not None and maximum < minimum:
            raise _fail("limits", f"{what}: maximum {maximum} below minimum {minimum}", at)
        return minimum, maximum

    def _imports(self, r: _Reader) -> None:
        for i in range(r.count(_MIN_IMPORT, "import")):
            module = r.name(f"import {i} module name")
            name = r.name(f"import {i} name")
            at = r.pos
            kind = r.byte(f"import {i} kind")
            what = f"import {i} ({module}.{name})"
            func_type: FuncType | None = None
            if kind == 0x00:
                func_type = self.types[self._type_index(r, what)]
            elif kind == 0x01:
                ref_at = r.pos
                if r.byte(f"{what} element type") not in _REFTYPES:
                    raise _fail("valtype", f"{what}: table element type is not funcref/externref", ref_at)
                self._limits(r, what)
            elif kind == 0x02:
                self.memories.append(self._limits(r, what))
            elif kind == 0x03:
                self._valtype(r, what)
                mut_at = r.pos
                mut = r.byte(f"{what} mutability")
                if mut > 1:
                    raise _fail("mutability", f"{what}: global mutability 0x{mut:02x} is not 0 or 1", mut_at)
            elif kind == 0x04:
                attr_at = r.pos
                attribute = r.byte(f"{what} tag attribute")
                if attribute != 0:
                    raise _fail("tag-attribute", f"{what}: tag attribute 0x{attribute:02x} is not 0", attr_at)
                self._type_index(r, what)
            else:
                raise _fail("import-desc", f"{what}: unknown import kind 0x{kind:02x}", at)
            self.imports.append(Import(module, name, _EXTERN_KINDS[kind], func_type))

    def _functions(self, r: _Reader) -> None:
        n = r.count(1, "function")
        self.function_types = [self._type_index(r, f"function {i}") for i in range(n)]

    def _exports(self, r: _Reader) -> None:
        seen: set[str] = set()
        functions = sum(1 for i in self.imports if i.kind == "func") + len(self.function_types or ())
        memories = len(self.memories)
        for i in range(r.count(_MIN_EXPORT, "export")):
            at = r.pos
            name = r.name(f"export {i} name")
            if name in seen:
                raise _fail("duplicate-export", f"export {i}: name {name!r} exported twice", at)
            seen.add(name)
            kind_at = r.pos
            kind = r.byte(f"export {name!r} kind")
            if kind >= len(_EXTERN_KINDS):
                raise _fail("export-kind", f"export {name!r}: unknown kind 0x{kind:02x}", kind_at)
            index_at = r.pos
            index = r.u32(f"export {name!r} index")
            if kind == 0x00 and index >= functions:
                raise _fail(
                    "export-index", f"export {name!r}: function {index} but only {functions} functions", index_at
                )
            if kind == 0x02 and index >= memories:
                raise _fail("export-index", f"export {name!r}: memory {index} but only {memories} memories", index_at)
            self.exports.append(Export(name, _EXTERN_KINDS[kind], index))


def parse_module(data: bytes, max_size: int = DEFAULT_MAX_SIZE) -> WasmModule:
    """Parses an untrusted WebAssembly binary module.

    Args:
        data: the module's bytes.
        max_size: refuse anything larger, before reading it.

    Returns:
        The module's structural summary.

    Raises:
        FormatError: ``wasm.*`` naming the broken rule and the byte offset.
    """
    if not isinstance(data, bytes):
        data = bytes(data)
    if len(data) > max_size:
        raise FormatError(
            "wasm.size",
            f"module is {len(data)} bytes, more than the {max_size} allowed",
            got=len(data),
            expected=max_size,
        )
    return _Parser(data).parse()


def check_imports(module: WasmModule, known: Mapping[tuple[str, str], FuncType]) -> None:
    """Checks that every import is a host function iSM provides, with its exact signature.

    Args:
        module: a parsed module.
        known: the host functions, by ``(module, name)``.

    Raises:
        FormatError: ``wasm.import-kind`` for a non-function import (a
            microservice owns its memory, tables and globals),
            ``wasm.unknown-import`` for a function iSM does not provide,
            ``wasm.import-type`` for a signature mismatch.
    """
    for i, imp in enumerate(module.imports):
        label = f"{imp.module}.{imp.name}"
        if imp.kind != "func":
            raise FormatError(
                "wasm.import-kind",
                f"import {i} {label} is a {imp.kind}; only host functions may be imported",
                got=imp.kind,
                expected="func",
            )
        expected = known.get((imp.module, imp.name))
        if expected is None:
            raise FormatError(
                "wasm.unknown-import",
                f"import {i} {label} is not a known host function",
                got=label,
            )
        if imp.type != expected:
            raise FormatError(
                "wasm.import-type",
                f"import {i} {label} has type {imp.type}, expected {expected}",
                got=str(imp.type),
                expected=str(expected),
            )
