"""Shared helpers for the benchmarks: timing, formatting, targets and exit status.

Not part of the ``ism`` package. Each benchmark script puts this directory on
``sys.path`` and imports it as ``_common``.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = [
    "Target",
    "Timing",
    "best_of",
    "check_targets",
    "fail",
    "fmt_rate",
    "fmt_time",
    "machine",
    "measure",
    "parser",
]


@dataclass(frozen=True, slots=True)
class Timing:
    """Seconds per call over ``repeat`` rounds of ``number`` calls each."""

    best: float
    median: float
    repeat: int
    number: int

    @property
    def rate(self) -> float:
        """Calls per second at the best round."""
        return 1.0 / self.best if self.best > 0 else float("inf")


def measure(fn: Callable[[], Any], repeat: int, number: int = 1) -> Timing:
    """Times ``fn``: ``repeat`` rounds of ``number`` back-to-back calls.

    A garbage collection runs before each round (so one round does not pay for
    the previous one's garbage); the collector stays enabled during the round,
    because the code under test pays for its own allocations in real use.
    """
    if repeat < 1 or number < 1:
        raise ValueError("repeat and number must be >= 1")
    per_call: list[float] = []
    clock = time.perf_counter
    for _ in range(repeat):
        gc.collect()
        start = clock()
        for _ in range(number):
            fn()
        per_call.append((clock() - start) / number)
    return Timing(min(per_call), statistics.median(per_call), repeat, number)


def best_of(fn: Callable[[], Any], repeat: int, number: int = 1) -> float:
    """Best (lowest) seconds per call of ``fn`` over ``repeat`` rounds of ``number`` calls."""
    return measure(fn, repeat, number).best


def fmt_time(seconds: float) -> str:
    """A duration with a readable unit."""
    if seconds >= 1.0:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    if seconds >= 1e-6:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e9:.0f} ns"


def fmt_rate(per_second: float) -> str:
    """Operations per second, grouped for reading."""
    return f"{per_second:,.0f} ops/s"


@dataclass(frozen=True, slots=True)
class Target:
    """A ratio and the bound it must meet.

    ``upper`` True means the ratio must be at most ``bound`` (e.g. a slowdown),
    False means at least ``bound`` (e.g. a relative throughput).
    """

    name: str
    ratio: float
    bound: float
    upper: bool

    @property
    def met(self) -> bool:
        return self.ratio <= self.bound if self.upper else self.ratio >= self.bound

    def line(self) -> str:
        op = "<=" if self.upper else ">="
        verdict = "PASS" if self.met else "MISS"
        return f"{self.name}: ratio = {self.ratio:.3f} (target {op} {self.bound:g}) {verdict}"


def check_targets(targets: list[Target], strict: bool) -> int:
    """Prints a summary of the targets; returns the process exit status."""
    missed = [t for t in targets if not t.met]
    if missed:
        names = ", ".join(t.name for t in missed)
        suffix = " (--strict: failing)" if strict else " (informational; use --strict to fail)"
        print(f"targets missed: {names}{suffix}")
    else:
        print("all targets met")
    return 1 if strict and missed else 0


def machine() -> str:
    """One line describing where the figures were measured."""
    cpus = os.cpu_count() or 0
    return f"python {platform.python_version()} on {platform.machine()}, {cpus} CPU(s), {platform.system()}"


def parser(description: str) -> argparse.ArgumentParser:
    """The command line shared by every benchmark."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="few iterations: proves the benchmark runs (CI)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    p.add_argument("--repeat", type=int, default=None, help="timing rounds (overrides the mode's default)")
    return p


def fail(message: str) -> int:
    """Reports a benchmark error on stderr; returns the exit status for it."""
    print(f"error: {message}", file=sys.stderr)
    return 2
