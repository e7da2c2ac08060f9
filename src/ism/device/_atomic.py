"""Crash-safe file replacement with named fault points for power-cut testing.

Owns: the one way the device writes persistent state: write a temporary
file, fsync it, rename it over the target, fsync the directory.
Must not import: anything above ``ism.errors``.

Threat: power loss in the middle of a write leaving a torn file (half old,
half new), which for an anti-rollback counter could mean a reset counter
and thus a successful rollback. With write-to-temp + fsync + atomic rename a
reader sees either the complete old file or the complete new one; leftovers
are removed by :func:`recover` when the device opens.

Every step calls :meth:`Faults.point`; tests pass a :class:`Faults` that
raises :class:`PowerCut` at the N-th point, for every N, and then check that
the state re-read from disk is the old or the new one.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["Faults", "PowerCut", "atomic_remove", "atomic_write", "read_capped", "recover"]

TMP_SUFFIX = ".tmp"


class PowerCut(BaseException):
    """Injected power loss. A BaseException so no ``except Exception`` swallows it."""


class Faults:
    """Counts write points and, if asked, cuts the power at one of them."""

    def __init__(self, cut_at: int | None = None) -> None:
        self.cut_at = cut_at
        self.points: list[str] = []

    def point(self, name: str) -> None:
        self.points.append(name)
        if self.cut_at is not None and len(self.points) == self.cut_at:
            raise PowerCut(name)


_NO_FAULTS = Faults()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, faults: Faults = _NO_FAULTS, mode: int = 0o644) -> None:
    """Replaces ``path`` with ``data`` so that a crash leaves the old or the new content."""
    tmp = path.with_name(path.name + TMP_SUFFIX)
    faults.point(f"{path.name}:begin")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        half = len(data) // 2
        fh.write(data[:half])
        fh.flush()
        faults.point(f"{path.name}:torn-temp")
        fh.write(data[half:])
        fh.flush()
        os.fsync(fh.fileno())
    faults.point(f"{path.name}:temp-synced")
    os.replace(tmp, path)
    faults.point(f"{path.name}:renamed")
    _fsync_dir(path.parent)
    faults.point(f"{path.name}:dir-synced")


def atomic_remove(path: Path, faults: Faults = _NO_FAULTS) -> None:
    """Removes ``path`` if present, durably."""
    faults.point(f"{path.name}:unlink")
    try:
        path.unlink()
    except FileNotFoundError:
        return
    _fsync_dir(path.parent)


def recover(directory: Path) -> list[Path]:
    """Deletes temporaries a crash left behind; returns what was removed."""
    removed = []
    for tmp in directory.rglob("*" + TMP_SUFFIX):
        tmp.unlink()
        removed.append(tmp)
    return removed


def read_capped(path: Path, limit: int) -> bytes:
    """Reads at most ``limit`` bytes; returns ``limit + 1`` bytes if the file is larger."""
    with path.open("rb") as fh:
        # Size the read by the file, not by the cap: ``read(limit + 1)`` allocates
        # ``limit + 1`` bytes up front (16 MiB per package at boot).
        want = min(os.fstat(fh.fileno()).st_size, limit) + 1
        data = fh.read(want)
        if want <= limit and len(data) == want:  # the file grew after fstat
            data += fh.read(limit + 1 - want)
        return data
