"""Builds every example microservice from source into OUT_DIR/NAME.wasm.

- ``examples/**/NAME.wat``: WebAssembly text, compiled with :func:`wasmtime.wat2wasm`.
- ``examples/**/NAME.c``: freestanding C (no libc) against ``include/ism.h``, compiled for wasm32 by
  clang and linked by wasm-ld (Debian packages ``clang`` and ``lld``; ``make test`` installs them).
  Exports are declared in the source (``ISM_EXPORT("init")``); memory is exported by the linker.

Without clang and wasm-ld the C examples are skipped with a note, so ``make demo`` (which needs
none of them) runs without a C compiler; under ``CI=true`` a missing toolchain is an error.

Usage: python examples/build.py [OUT_DIR]
Environment: ``CLANG`` and ``WASM_LD`` name the tools when they are not on PATH under these names.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import wasmtime

HERE = Path(__file__).resolve().parent
INCLUDE = HERE.parent / "include"

#: Every C example is held to this: C11, no libc, every warning an error.
CFLAGS = (
    "--target=wasm32",
    "-std=c11",
    "-O2",
    "-ffreestanding",
    "-nostdlib",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-pedantic",
)
#: No entry point (the supervisor calls the exports); a 16 KiB stack. Undefined symbols stay errors, so a
#: call into a libc that is not there fails the link instead of becoming an import the device refuses.
LDFLAGS = ("--no-entry", "-z", "stack-size=16384")

INSTALL_HINT = "C examples need clang and wasm-ld: apt-get install clang lld (make test installs them)"


class BuildError(Exception):
    """A compiler or linker failed; the message carries its output."""


@dataclass(frozen=True)
class Toolchain:
    clang: str
    wasm_ld: str


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def find_toolchain() -> Toolchain | None:
    """clang and wasm-ld, or None if either is missing.

    Debian's ``lld`` package installs ``wasm-ld``; ``lld-N`` alone only ``wasm-ld-N`` (and a
    ``wasm-ld`` in LLVM's own directory, which ``clang -print-prog-name`` finds).
    """
    clang = shutil.which(os.environ.get("CLANG", "clang"))
    if clang is None:
        return None
    if "WASM_LD" in os.environ:
        wasm_ld = shutil.which(os.environ["WASM_LD"])
        return Toolchain(clang, wasm_ld) if wasm_ld else None
    beside = subprocess.run(
        [clang, "--target=wasm32", "-print-prog-name=wasm-ld"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if os.path.isabs(beside) and os.access(beside, os.X_OK):
        return Toolchain(clang, beside)
    version = subprocess.run([clang, "-dumpversion"], capture_output=True, text=True, check=False).stdout.strip()
    for name in ("wasm-ld", f"wasm-ld-{version.split('.')[0]}"):
        if found := shutil.which(name):
            return Toolchain(clang, found)
    return None


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise BuildError(f"{' '.join(argv)}\n{done.stdout}{done.stderr}".rstrip())


def compile_c(source: Path, out: Path, toolchain: Toolchain, extra_cflags: tuple[str, ...] = ()) -> None:
    """``source`` (C) -> ``out`` (a Wasm module), written atomically.

    Raises:
        BuildError: clang or wasm-ld failed (their output is in the message).
    """
    with tempfile.TemporaryDirectory(prefix="ism-cc-") as tmp:
        obj, wasm = Path(tmp) / "m.o", Path(tmp) / "m.wasm"
        _run([toolchain.clang, *CFLAGS, *extra_cflags, f"-I{INCLUDE}", "-c", str(source), "-o", str(obj)])
        _run([toolchain.wasm_ld, *LDFLAGS, str(obj), "-o", str(wasm)])
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_name(out.name + ".tmp")
        shutil.copyfile(wasm, tmp_out)
        os.replace(tmp_out, out)


def _fresh(target: Path, *sources: Path) -> bool:
    return target.exists() and all(target.stat().st_mtime >= s.stat().st_mtime for s in sources)


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/examples")
    out.mkdir(parents=True, exist_ok=True)
    for wat in sorted(HERE.rglob("*.wat")):
        target = out / (wat.stem + ".wasm")
        if _fresh(target, wat):
            continue
        target.write_bytes(bytes(wasmtime.wat2wasm(wat.read_text())))
        print(f"built {target}")
    sources = sorted(HERE.rglob("*.c"))
    if not sources:
        return 0
    toolchain = find_toolchain()
    if toolchain is None:
        names = ", ".join(s.stem for s in sources)
        if _in_ci():
            print(f"error: {INSTALL_HINT}; CI=true, so the C examples ({names}) may not be skipped", file=sys.stderr)
            return 1
        print(f"note: C examples not built ({names}): {INSTALL_HINT}", file=sys.stderr)
        return 0
    for source in sources:
        target = out / (source.stem + ".wasm")
        if _fresh(target, source, INCLUDE / "ism.h"):
            continue
        try:
            compile_c(source, target, toolchain)
        except BuildError as exc:
            print(f"error: {source.relative_to(HERE)}: {exc}", file=sys.stderr)
            return 1
        print(f"built {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
