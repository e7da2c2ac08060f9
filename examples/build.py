"""Builds every example microservice from source: examples/**/NAME.wat -> OUT/NAME.wasm.

Usage: python examples/build.py OUT_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

import wasmtime


def main() -> int:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "build/examples")
    out.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).parent
    for wat in sorted(here.rglob("*.wat")):
        target = out / (wat.stem + ".wasm")
        if target.exists() and target.stat().st_mtime >= wat.stat().st_mtime:
            continue
        target.write_bytes(bytes(wasmtime.wat2wasm(wat.read_text())))
        print(f"built {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
