"""Builds the optional native strict CBOR decoder and schema checker (docs/adr/0005-native-cbor-decoder.md).

Everything else about the package lives in pyproject.toml. The extension is
optional: without a C compiler the install still succeeds and
``ism.formats.cbor`` uses its pure-Python decoder (the reference); the test
suite fails under ``CI=true`` if the extension is missing.
"""

import sys

from setuptools import Extension, setup

# Warnings as the project reads them; the flags are gcc/clang's.
WARNINGS = [] if sys.platform == "win32" else ["-Wall", "-Wextra", "-Wno-unused-parameter"]

setup(
    ext_modules=[
        Extension(
            "ism.formats._cbor_native",
            sources=["src/ism/formats/_cbor_native.c"],
            optional=True,
            extra_compile_args=WARNINGS,
        )
    ]
)
