"""The host ABI has one source of truth (``ism.formats.abi``); docs/ABI.md and include/ism.h must agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ism.formats.abi import ABI_VERSION, ERRORS, GATEWAY_MAX, HOST_ABI, MAX_IO, MODULE, STORAGE_FLAGS
from ism.formats.board import MODE_BITS

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "ABI.md").read_text()
HEADER = (ROOT / "include" / "ism.h").read_text()

ABI = {name: ftype for (module, name), ftype in HOST_ABI.items()}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def _doc_functions() -> dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]]:
    """name -> (number of named arguments, parameter types, result types) from the host-function table."""
    rows = re.findall(
        r"^\|\s*`(\w+)\(([^)]*)\)`\s*\|\s*`\(([^)]*)\)\s*->\s*([^`]*)`\s*\|",
        _section(DOC, "## Host functions"),
        flags=re.MULTILINE,
    )
    out: dict[str, tuple[int, tuple[str, ...], tuple[str, ...]]] = {}
    for name, args, params, results in rows:
        assert name not in out, f"{name} is documented twice"
        n_args = len([a for a in args.split(",") if a.strip()])
        results = results.strip()
        result_types = () if results == "()" else tuple(results.strip("()").split())
        out[name] = (n_args, tuple(params.split()), result_types)
    return out


def _doc_errors() -> dict[str, int]:
    rows = re.findall(r"^\|\s*`(ISM_\w+)`\s*\|\s*(-?\d+)\s*\|", DOC, flags=re.MULTILINE)
    out: dict[str, int] = {}
    for name, value in rows:
        assert name not in out, f"{name} is documented twice"
        out[name] = int(value)
    return out


_C_TYPES = {"int32_t": "i32", "int64_t": "i64", "void": None}


def _c_type(decl: str) -> str:
    """The wasm type a C parameter or return type lowers to (pointers are i32 on wasm32)."""
    decl = decl.strip()
    if "*" in decl or "[" in decl:
        return "i32"
    words = [w for w in decl.split() if w != "const"]
    base = _C_TYPES.get(words[0])
    assert base is not None, f"unexpected C type in {decl!r}"
    return base


def _header_functions() -> dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]]:
    """import name -> (C function name, parameter types, result types) for every ``ISM_IMPORT`` declaration."""
    decls = re.findall(
        r'ISM_IMPORT\("(\w+)"\)\s+([\w\s]+?)\s*\b(\w+)\s*\(([^)]*)\)\s*;',
        HEADER,
    )
    out: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {}
    for name, ret, cname, params in decls:
        assert name not in out, f"{name} is declared twice"
        plist = [p for p in (p.strip() for p in params.split(",")) if p and p != "void"]
        ret_type = _C_TYPES[ret.strip()]
        out[name] = (cname, tuple(_c_type(p) for p in plist), () if ret_type is None else (ret_type,))
    return out


def _header_defines() -> dict[str, str]:
    """Object-like macros (name -> value); function-like ones are :func:`_header_macros`."""
    return dict(re.findall(r"^#define\s+(\w+)(?![(\w])[ \t]*(.*)$", HEADER, flags=re.MULTILINE))


def _header_macros() -> set[str]:
    return set(re.findall(r"^#define\s+(\w+)\(", HEADER, flags=re.MULTILINE))


def _c_int(value: str) -> int:
    return int(value.strip().strip("()"))


def test_the_abi_table_imports_only_from_module_ism() -> None:
    assert {module for module, _ in HOST_ABI} == {MODULE}
    assert MODULE == "ism"
    # the header's import macro names the same module (tests/e2e/test_c_example.py compiles it)
    macro = re.search(r"^#define ISM_IMPORT\(name\) (.*)$", HEADER, flags=re.MULTILINE)
    assert macro is not None
    assert macro.group(1) == f'__attribute__((import_module("{MODULE}"), import_name(name)))'


@pytest.mark.parametrize("name", sorted(ABI))
def test_every_host_function_is_documented_with_its_signature(name: str) -> None:
    docs = _doc_functions()
    assert name in docs, f"docs/ABI.md does not document {name}"
    n_args, params, results = docs[name]
    assert n_args == len(ABI[name].params), f"{name}: argument names in docs/ABI.md"
    assert params == tuple(ABI[name].params), f"{name}: parameter types in docs/ABI.md"
    assert results == tuple(ABI[name].results), f"{name}: result types in docs/ABI.md"


@pytest.mark.parametrize("name", sorted(ABI))
def test_every_host_function_is_declared_in_the_header(name: str) -> None:
    header = _header_functions()
    assert f'ISM_IMPORT("{name}")' in HEADER
    assert name in header, f"include/ism.h does not declare {name}"
    cname, params, results = header[name]
    assert cname == f"ism_{name}"
    assert len(params) == len(ABI[name].params), f"{name}: number of parameters in include/ism.h"
    assert params == tuple(ABI[name].params), f"{name}: parameter types in include/ism.h"
    assert results == tuple(ABI[name].results), f"{name}: return type in include/ism.h"


def test_docs_and_header_declare_nothing_extra() -> None:
    assert set(_doc_functions()) == set(ABI)
    assert set(_header_functions()) == set(ABI)
    # every function the header declares is an ISM_IMPORT (no stray prototypes)
    code = re.sub(r"/\*.*?\*/|//[^\n]*", "", HEADER, flags=re.DOTALL)
    code = re.sub(r"^\s*#.*$", "", code, flags=re.MULTILINE)
    statements = [s.strip() for s in code.split(";") if s.strip()]
    names = []
    for statement in statements:
        m = re.fullmatch(r'ISM_IMPORT\("(\w+)"\)\s+[\w\s]+?\b(\w+)\s*\([^)]*\)', statement, flags=re.DOTALL)
        assert m is not None, f"include/ism.h declares something that is not a host import: {statement!r}"
        names.append(m.group(2))
    assert sorted(names) == sorted(f"ism_{n}" for n in ABI)
    assert HEADER.count("ISM_IMPORT(") == len(ABI) + 1  # + the macro's own definition


def test_error_codes_agree_everywhere() -> None:
    docs = _doc_errors()
    assert docs == dict(ERRORS)
    defines = _header_defines()
    header_errors = {k: _c_int(v) for k, v in defines.items() if k == "ISM_OK" or k.startswith("ISM_E")}
    assert header_errors == dict(ERRORS)
    assert len(set(ERRORS.values())) == len(ERRORS)
    assert ERRORS["ISM_OK"] == 0
    assert all(v < 0 for k, v in ERRORS.items() if k != "ISM_OK")


def test_header_constants_match_the_library() -> None:
    defines = _header_defines()
    expected = {
        "ISM_ABI_VERSION": ABI_VERSION,
        "ISM_MAX_IO": MAX_IO,
        "ISM_GATEWAY_MAX": GATEWAY_MAX,
        **{f"ISM_MODE_{m.upper()}": bit for m, bit in MODE_BITS.items()},
        **{f"ISM_STORAGE_{name}": bit for name, bit in STORAGE_FLAGS.items()},
        **ERRORS,
    }
    assert {k: _c_int(v) for k, v in defines.items() if k in expected} == expected
    # nothing else is defined but the include guard, and the import and export attribute macros
    assert set(defines) - set(expected) == {"ISM_H"}
    assert _header_macros() == {"ISM_IMPORT", "ISM_EXPORT"}


def test_docs_state_the_same_limits() -> None:
    assert "`MAX_IO`" in DOC
    assert str(MAX_IO) in DOC
    assert str(GATEWAY_MAX) in DOC
    assert f"version {ABI_VERSION}" in DOC
