"""Tests for the strict WebAssembly binary reader (ism.formats.wasm)."""

from __future__ import annotations

import time

import pytest
import wasmtime
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ism.errors import FormatError
from ism.formats.wasm import (
    Export,
    FuncType,
    Import,
    WasmModule,
    check_imports,
    parse_module,
)

# --- hand-crafting helpers ---------------------------------------------------

HEADER = b"\x00asm\x01\x00\x00\x00"
I32 = b"\x7f"


def leb(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def vec(items: list[bytes]) -> bytes:
    return leb(len(items)) + b"".join(items)


def name(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return leb(len(raw)) + raw


def section(section_id: int, payload: bytes) -> bytes:
    return bytes([section_id]) + leb(len(payload)) + payload


def module(*sections: bytes) -> bytes:
    return HEADER + b"".join(sections)


def functype(params: bytes = b"", results: bytes = b"") -> bytes:
    return b"\x60" + vec([bytes([p]) for p in params]) + vec([bytes([r]) for r in results])


TYPE_SEC = section(1, vec([functype()]))  # one type: () -> ()
FUNC_SEC = section(3, vec([leb(0)]))  # one function of type 0
CODE_SEC = section(10, vec([b"\x02\x00\x0b"]))  # one empty body


def wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def expect(rule: str, data: bytes, **kwargs: int) -> FormatError:
    with pytest.raises(FormatError) as info:
        parse_module(data, **kwargs)
    assert info.value.rule == rule, str(info.value)
    return info.value


# --- parsing real modules ----------------------------------------------------

SERVICE_WAT = """
(module
  (@custom "ism.meta" "v1")
  (type $log (func (param i32 i32)))
  (import "ism" "log" (func $log (type $log)))
  (import "ism" "now" (func $now (result i64)))
  (memory (export "memory") 2 16)
  (global $g (mut i32) (i32.const 0))
  (table 1 funcref)
  (func $handle (export "handle") (param i32 f32) (result f64) unreachable)
  (func (export "init") (call $log (i32.const 0) (i32.const 0)))
  (export "now" (func $now))
  (export "g" (global $g))
  (export "t" (table 0))
)
"""


def test_parses_types_imports_exports_and_memory() -> None:
    m = parse_module(wat(SERVICE_WAT))
    assert isinstance(m, WasmModule)
    assert FuncType(("i32", "i32"), ()) in m.types
    assert m.imports == (
        Import("ism", "log", "func", FuncType(("i32", "i32"), ())),
        Import("ism", "now", "func", FuncType((), ("i64",))),
    )
    assert [(e.name, e.kind) for e in m.exports] == [
        ("memory", "memory"),
        ("handle", "func"),
        ("init", "func"),
        ("now", "func"),
        ("g", "global"),
        ("t", "table"),
    ]
    assert m.function_count == 2
    assert (m.memory_min_pages, m.memory_max_pages) == (2, 16)
    assert m.custom_sections[0] == "ism.meta"
    assert "name" in m.custom_sections  # wat2wasm records $identifiers


def test_export_type_follows_import_indices() -> None:
    m = parse_module(wat(SERVICE_WAT))
    assert m.export_type("handle") == FuncType(("i32", "f32"), ("f64",))
    assert m.export_type("init") == FuncType((), ())
    assert m.export_type("now") == FuncType((), ("i64",))  # re-exported import 1
    assert m.export_type("memory") is None
    assert m.export_type("missing") is None


def test_module_without_memory_or_sections() -> None:
    m = parse_module(HEADER)
    assert m == WasmModule((), (), (), 0, None, None, ())


def test_imported_memory_is_the_first_memory() -> None:
    m = parse_module(wat('(module (import "env" "mem" (memory 3)))'))
    assert (m.memory_min_pages, m.memory_max_pages) == (3, None)
    assert m.imports == (Import("env", "mem", "memory", None),)


@pytest.mark.parametrize(
    ("text", "limits"),
    [
        ("(module (memory 1 2 shared))", (1, 2)),  # flag 0x03
        ("(module (memory i64 5 7))", (5, 7)),  # flag 0x05
        ('(module (import "m" "x" (memory i64 9)))', (9, None)),  # flag 0x04
    ],
)
def test_shared_and_64_bit_memory_limits(text: str, limits: tuple[int, int | None]) -> None:
    m = parse_module(wat(text))
    assert (m.memory_min_pages, m.memory_max_pages) == limits


def test_tag_section_and_tag_import() -> None:
    m = parse_module(wat('(module (import "m" "t" (tag (param i32))) (tag (param i64)) (func))'))
    assert m.imports == (Import("m", "t", "tag", None),)
    assert m.function_count == 1


def test_table_and_global_imports() -> None:
    m = parse_module(
        wat('(module (import "m" "t" (table 1 5 externref)) (import "m" "g" (global (mut f64))) (memory 1))')
    )
    assert [i.kind for i in m.imports] == ["table", "global"]
    assert m.memory_min_pages == 1


def test_accepts_bytearray_and_non_minimal_leb128() -> None:
    padded = HEADER + b"\x01\x84\x80\x80\x80\x00" + vec([functype()])  # size 4 padded to 5 bytes
    assert parse_module(bytes(padded)).types == (FuncType((), ()),)
    assert parse_module(bytearray(padded)).types == (FuncType((), ()),)  # type: ignore[arg-type]


# --- one test per rule -------------------------------------------------------


def test_rule_size() -> None:
    data = wat(SERVICE_WAT)
    parse_module(data, max_size=len(data))
    err = expect("wasm.size", data, max_size=len(data) - 1)
    assert str(len(data)) in err.message


@pytest.mark.parametrize("data", [b"\x00asn\x01\x00\x00\x00", b"\x7fELF\x02\x01\x01\x00", b"MZ"])
def test_rule_magic(data: bytes) -> None:
    expect("wasm.magic", data)


def test_rule_version() -> None:
    err = expect("wasm.version", b"\x00asm\x02\x00\x00\x00")
    assert "byte 4" in err.message
    expect("wasm.version", b"\x00asm\x01\x00\x00\x01")  # layer field of the component model


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00as",
        b"\x00asm\x01\x00",
        HEADER + b"\x01",  # section id without a size
        HEADER + b"\x01\x80",  # size LEB cut short
    ],
)
def test_rule_truncated(data: bytes) -> None:
    expect("wasm.truncated", data)


@pytest.mark.parametrize(
    "data",
    [
        module(section(2, vec([])), TYPE_SEC),  # type after import
        module(TYPE_SEC, TYPE_SEC),  # duplicate
        module(section(6, vec([])), section(13, vec([]))),  # tag after global
        module(CODE_SEC, section(12, leb(0))),  # datacount after code
        module(section(11, vec([])), CODE_SEC),  # code after data
    ],
)
def test_rule_section_order(data: bytes) -> None:
    expect("wasm.section-order", data)


def test_section_order_accepts_tag_and_datacount_positions() -> None:
    data = module(
        TYPE_SEC,
        FUNC_SEC,
        section(5, vec([b"\x00\x01"])),
        section(13, vec([b"\x00\x00"])),
        section(6, vec([])),
        section(0, name("between")),
        section(12, leb(0)),
        CODE_SEC,
        section(11, vec([])),
    )
    m = parse_module(data)
    assert m.custom_sections == ("between",)
    assert m.function_count == 1


def test_rule_section_id() -> None:
    err = expect("wasm.section-id", module(section(14, b"")))
    assert "14" in err.message
    assert "byte 8" in err.message


@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"\x01\x05" + vec([]),  # declared size past the end
        HEADER + b"\x0a\xff\xff\xff\xff\x0f",  # 4 GiB code section
        module(section(1, vec([functype()]) + b"\x00")),  # trailing byte in the type section
        module(section(7, vec([]) + b"\x00")),  # trailing byte in the export section
        HEADER + b"\x01\x02\x01\x60",  # type body runs past the section
        module(section(0, b"")),  # custom section without a name
        module(section(0, b"\x05abc")),  # custom name past the section
    ],
)
def test_rule_section_size(data: bytes) -> None:
    expect("wasm.section-size", data)


@pytest.mark.parametrize("section_id", [1, 2, 3, 5, 7, 10])
def test_huge_vector_counts_fail_fast(section_id: int) -> None:
    prefix = [TYPE_SEC] if section_id in (3,) else []
    data = module(*prefix, section(section_id, leb(2**32 - 1) + b"\x00" * 8))
    start = time.perf_counter()
    err = expect("wasm.section-size", data)
    assert time.perf_counter() - start < 0.1
    assert "4294967295" in err.message


@pytest.mark.parametrize(
    "data",
    [
        HEADER + b"\x01\x80\x80\x80\x80\x80\x00",  # 6-byte u32
        HEADER + b"\x01\x80\x80\x80\x80\x10",  # bit 32 set
        module(section(1, b"\x81\x80\x80\x80\x70" + functype())),  # count with high bits
    ],
)
def test_rule_leb128(data: bytes) -> None:
    expect("wasm.leb128", data)


@pytest.mark.parametrize(
    "data",
    [
        module(section(0, name(b"\xff"))),
        module(section(2, vec([name(b"\xc0\x80") + name("x") + b"\x02\x00\x01"]))),  # overlong NUL
        module(section(7, vec([name(b"\xed\xa0\x80") + b"\x02\x00"]))),  # surrogate
    ],
)
def test_rule_utf8(data: bytes) -> None:
    expect("wasm.utf8", data)


def test_rule_type_form() -> None:
    err = expect("wasm.type-form", module(section(1, vec([b"\x5f\x00\x00"]))))
    assert "0x5f" in err.message


@pytest.mark.parametrize("bad", [0x40, 0x7A, 0x6E, 0x63])
def test_rule_valtype(bad: int) -> None:
    expect("wasm.valtype", module(section(1, vec([functype(bytes([0x7F, bad]))]))))


def test_rule_valtype_table_import() -> None:
    expect("wasm.valtype", module(section(2, vec([name("m") + name("t") + b"\x01\x7f\x00\x01"]))))


@pytest.mark.parametrize(
    "data",
    [
        module(section(2, vec([name("m") + name("f") + b"\x00\x00"]))),  # no types at all
        module(TYPE_SEC, section(2, vec([name("m") + name("f") + b"\x00\x01"]))),
        module(TYPE_SEC, section(3, vec([leb(1)]))),
        module(TYPE_SEC, section(2, vec([name("m") + name("e") + b"\x04\x00\x05"]))),  # tag
    ],
)
def test_rule_type_index(data: bytes) -> None:
    expect("wasm.type-index", data)


@pytest.mark.parametrize(
    "data",
    [
        module(TYPE_SEC, FUNC_SEC, section(10, vec([]))),
        module(TYPE_SEC, section(3, vec([])), CODE_SEC),
        module(TYPE_SEC, FUNC_SEC),  # bodies missing entirely
        module(CODE_SEC),  # bodies without declarations
    ],
)
def test_rule_function_count(data: bytes) -> None:
    expect("wasm.function-count", data)


def test_rule_duplicate_export() -> None:
    exports = section(7, vec([name("run") + b"\x00\x00", name("run") + b"\x00\x00"]))
    err = expect("wasm.duplicate-export", module(TYPE_SEC, FUNC_SEC, exports, CODE_SEC))
    assert "'run'" in err.message


@pytest.mark.parametrize(
    "data",
    [
        module(TYPE_SEC, FUNC_SEC, section(7, vec([name("f") + b"\x00\x01"])), CODE_SEC),
        module(section(7, vec([name("f") + b"\x00\x00"]))),
        module(section(7, vec([name("mem") + b"\x02\x00"]))),  # no memory
    ],
)
def test_rule_export_index(data: bytes) -> None:
    expect("wasm.export-index", data)


def test_export_index_counts_imported_functions() -> None:
    imports = section(2, vec([name("m") + name("f") + b"\x00\x00"]))
    exports = section(7, vec([name("a") + b"\x00\x00", name("b") + b"\x00\x01"]))
    m = parse_module(module(TYPE_SEC, imports, FUNC_SEC, exports, CODE_SEC))
    assert m.exports == (Export("a", "func", 0), Export("b", "func", 1))
    assert m.export_type("a") == m.export_type("b") == FuncType((), ())


def test_rule_export_kind() -> None:
    expect("wasm.export-kind", module(section(7, vec([name("x") + b"\x05\x00"]))))


def test_rule_import_desc() -> None:
    expect("wasm.import-desc", module(section(2, vec([name("m") + name("x") + b"\x05\x00"]))))


@pytest.mark.parametrize(
    "limits",
    [b"\x08\x00", b"\x01\x05\x02"],  # unknown flag; max below min
)
def test_rule_limits(limits: bytes) -> None:
    expect("wasm.limits", module(section(5, vec([limits]))))


def test_rule_mutability() -> None:
    expect("wasm.mutability", module(section(2, vec([name("m") + name("g") + b"\x03\x7f\x02"]))))


def test_rule_tag_attribute() -> None:
    expect("wasm.tag-attribute", module(TYPE_SEC, section(2, vec([name("m") + name("e") + b"\x04\x01\x00"]))))


# --- check_imports -----------------------------------------------------------

HOST = {
    ("ism", "log"): FuncType(("i32", "i32"), ()),
    ("ism", "now"): FuncType((), ("i64",)),
    ("ism", "spare"): FuncType((), ()),
}


def test_check_imports_accepts_known_host_functions() -> None:
    check_imports(parse_module(wat(SERVICE_WAT)), HOST)


def test_rule_unknown_import() -> None:
    m = parse_module(wat('(module (import "ism" "log" (func (param i32 i32))) (import "env" "abort" (func)))'))
    with pytest.raises(FormatError) as info:
        check_imports(m, HOST)
    assert info.value.rule == "wasm.unknown-import"
    assert "env.abort" in info.value.message
    assert info.value.got == "env.abort"


def test_rule_import_type() -> None:
    m = parse_module(wat('(module (import "ism" "now" (func (result i32))))'))
    with pytest.raises(FormatError) as info:
        check_imports(m, HOST)
    assert info.value.rule == "wasm.import-type"
    assert "ism.now" in info.value.message
    assert info.value.got == "() -> (i32)"
    assert info.value.expected == "() -> (i64)"


@pytest.mark.parametrize(
    "desc",
    ["(memory 1)", "(table 1 funcref)", "(global i32)", "(tag)"],
)
def test_rule_import_kind(desc: str) -> None:
    m = parse_module(wat(f'(module (import "ism" "log" {desc}))'))
    with pytest.raises(FormatError) as info:
        check_imports(m, HOST)
    assert info.value.rule == "wasm.import-kind"
    assert "ism.log" in info.value.message
    assert info.value.expected == "func"


# --- properties --------------------------------------------------------------

SEEDS = [
    wat(SERVICE_WAT),
    wat('(module (import "m" "t" (tag (param i32))) (tag (param i64)) (memory i64 1 2) (func))'),
    module(
        TYPE_SEC, FUNC_SEC, section(5, vec([b"\x01\x01\x02"])), section(7, vec([name("é") + b"\x00\x00"])), CODE_SEC
    ),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        # Mostly mutate past the 8-byte header, or nearly everything fails at the magic.
        low = 0 if len(data) <= len(HEADER) or draw(st.integers(0, 9)) == 0 else len(HEADER)
        at = draw(st.integers(low, max(len(data) - 1, low)))
        if op == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del data[at:]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 4))]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_modules_parse_or_raise_format_error(data: bytes) -> None:
    start = time.perf_counter()
    outcome: WasmModule | FormatError
    try:
        outcome = parse_module(data)
    except FormatError as err:
        outcome = err
    assert time.perf_counter() - start < 0.25
    if isinstance(outcome, FormatError):
        assert outcome.rule.startswith("wasm.")
        assert " at byte " in outcome.message
    else:
        assert isinstance(outcome, WasmModule)


_ENGINE = wasmtime.Engine()
_NUMERIC = ["i32", "i64", "f32", "f64"]
_signatures = st.tuples(
    st.lists(st.sampled_from(_NUMERIC), max_size=3).map(tuple),
    st.lists(st.sampled_from(_NUMERIC), max_size=2).map(tuple),
)
_names = st.text(max_size=8)


def _quote(text: str) -> str:
    return '"' + "".join(f"\\{b:02x}" for b in text.encode()) + '"'


def _sig(params: tuple[str, ...], results: tuple[str, ...]) -> str:
    return f"(param {' '.join(params)}) (result {' '.join(results)})"


@st.composite
def random_modules(draw: st.DrawFn) -> str:
    imports = draw(st.lists(st.tuples(_names, _names, _signatures), max_size=4, unique_by=lambda i: (i[0], i[1])))
    funcs = draw(st.lists(st.tuples(_names, _signatures), max_size=4, unique_by=lambda f: f[0]))
    memory = draw(st.sampled_from(["", "(memory 1)", "(memory 0 3)", '(import "env" "mem" (memory 2 4))']))
    export_memory = memory.startswith("(memory") and all(f[0] != "mem" for f in funcs) and draw(st.booleans())
    parts = [f"(import {_quote(m)} {_quote(n)} (func {_sig(*sig)}))" for m, n, sig in imports]
    if memory:
        parts.insert(0 if memory.startswith("(import") else len(parts), memory)
    parts += [f"(func (export {_quote(e)}) {_sig(*sig)} unreachable)" for e, sig in funcs]
    if export_memory:
        parts.append('(export "mem" (memory 0))')
    return "(module " + " ".join(parts) + ")"


@settings(max_examples=25, deadline=None)
@given(random_modules())
def test_random_modules_agree_with_wasmtime(text: str) -> None:
    data = wat(text)
    ours = parse_module(data)
    theirs = wasmtime.Module(_ENGINE, data)
    assert [(i.module, i.name) for i in ours.imports] == [(i.module, i.name) for i in theirs.imports]
    assert [e.name for e in ours.exports] == [e.name for e in theirs.exports]
    for imp, other in zip(ours.imports, theirs.imports, strict=True):
        if isinstance(other.type, wasmtime.FuncType):
            assert imp.type == FuncType(
                tuple(str(p) for p in other.type.params), tuple(str(r) for r in other.type.results)
            )
        else:
            assert imp.kind == "memory"
    for exp, theirs_exp in zip(ours.exports, theirs.exports, strict=True):
        if isinstance(theirs_exp.type, wasmtime.FuncType):
            assert ours.export_type(exp.name) == FuncType(
                tuple(str(p) for p in theirs_exp.type.params), tuple(str(r) for r in theirs_exp.type.results)
            )
        else:
            assert exp.kind == "memory"
            assert isinstance(theirs_exp.type, wasmtime.MemoryType)
            assert ours.memory_min_pages == theirs_exp.type.limits.min
            assert ours.memory_max_pages == theirs_exp.type.limits.max
