"""File input for the CLI: size-capped reads and writes that fail with a usage error, not a traceback."""

from __future__ import annotations

from pathlib import Path
from typing import Final

from ism.errors import UsageError

__all__ = ["MAX_INPUT", "read_file", "write_file"]

MAX_INPUT: Final = 64 * 1024 * 1024


def read_file(path: Path, what: str = "file", limit: int = MAX_INPUT) -> bytes:
    """Reads at most ``limit`` bytes; a larger file is refused (``cli.too-large``) without reading it all."""
    try:
        with path.open("rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise UsageError("cli.read", f"cannot read {what}: {exc.strerror}", subject=str(path)) from exc
    if len(data) > limit:
        raise UsageError("cli.too-large", f"{what} is larger than {limit} bytes", subject=str(path))
    return data


def write_file(path: Path, data: bytes) -> None:
    try:
        path.write_bytes(data)
    except OSError as exc:
        raise UsageError("cli.write", f"cannot write: {exc.strerror}", subject=str(path)) from exc
