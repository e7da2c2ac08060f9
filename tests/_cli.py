"""Running the ``ism`` command line in-process, for tests of every kind."""

from __future__ import annotations

import io
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from ism.cli.main import main


def ism(*argv: str | Path) -> tuple[int, str, str]:
    """Runs ``ism ARGV`` in-process; returns (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


def ism_ok(*argv: str | Path) -> str:
    """Runs ``ism ARGV`` in-process, asserts it succeeded; returns its stdout."""
    status, out, err = ism(*argv)
    assert status == 0, err
    return out
