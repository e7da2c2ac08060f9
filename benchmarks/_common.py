"""Shared helpers for the benchmarks: timing, formatting, targets, exit status, and the host-call guest.

Not part of the ``ism`` package. Each benchmark script puts this directory on
``sys.path`` and imports it as ``_common``.

The host-call part (used by ``hostcall.py`` and ``gateway.py``) holds the
guest that calls ``resource_write`` in a loop inside one activation, and the
raw baseline: the same module instantiated with bare wasmtime (own Store and
Linker, the engine and fuel iSM uses) against a Python host function of the
same signature that reads the same byte from guest memory and returns.
:class:`RawGuest` is the same bare-wasmtime harness for any module and any set
of host functions (``services.py``), and :class:`MemoryKeyFiles` an in-memory
home for a software key store's sealed key files.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ism.crypto.keystore.software import MemoryKeyFiles

__all__ = [
    "HOSTCALL_WAT",
    "MemoryKeyFiles",
    "RawGuest",
    "RawHostCall",
    "Target",
    "Timing",
    "best_of",
    "check_targets",
    "fail",
    "fmt_bytes",
    "fmt_rate",
    "fmt_time",
    "hostcall_wasm",
    "machine",
    "measure",
    "measure_interleaved",
    "parser",
    "rss_bytes",
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


def measure_interleaved(fns: Sequence[Callable[[], Any]], repeat: int, number: int = 1) -> list[Timing]:
    """:func:`measure` for several functions, their rounds taken in turn.

    Round ``r`` of every function runs before round ``r + 1`` of any, so a slow
    spell of the machine (another process, frequency scaling) lands on all of
    them rather than on one side of a ratio.
    """
    if repeat < 1 or number < 1:
        raise ValueError("repeat and number must be >= 1")
    per_call: list[list[float]] = [[] for _ in fns]
    clock = time.perf_counter
    for _ in range(repeat):
        for fn, out in zip(fns, per_call, strict=True):
            gc.collect()
            start = clock()
            for _ in range(number):
                fn()
            out.append((clock() - start) / number)
    return [Timing(min(t), statistics.median(t), repeat, number) for t in per_call]


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
    False means at least ``bound`` (e.g. a relative throughput). An
    ``informational`` target is reported like the others but never fails
    ``--strict`` (e.g. one dominated by the machine's fsync latency).
    """

    name: str
    ratio: float
    bound: float
    upper: bool
    informational: bool = False

    @property
    def met(self) -> bool:
        return self.ratio <= self.bound if self.upper else self.ratio >= self.bound

    def line(self) -> str:
        op = "<=" if self.upper else ">="
        verdict = "PASS" if self.met else "MISS"
        note = " (informational)" if self.informational else ""
        return f"{self.name}: ratio = {self.ratio:.3f} (target {op} {self.bound:g}) {verdict}{note}"


def check_targets(targets: list[Target], strict: bool) -> int:
    """Prints a summary of the targets; returns the process exit status.

    Informational targets are listed when missed but never make ``--strict`` fail.
    """
    missed = [t for t in targets if not t.met and not t.informational]
    noted = [t for t in targets if not t.met and t.informational]
    if missed:
        names = ", ".join(t.name for t in missed)
        suffix = " (--strict: failing)" if strict else " (informational; use --strict to fail)"
        print(f"targets missed: {names}{suffix}")
    else:
        print("all targets met" if not noted else "all strict targets met")
    if noted:
        print(f"informational targets missed: {', '.join(t.name for t in noted)} (never fail --strict)")
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


def fmt_bytes(n: float) -> str:
    """A byte count with a readable unit (binary prefixes)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def rss_bytes() -> int:
    """This process's resident set size (``VmRSS`` of /proc/self/status), in bytes."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status (Linux only)")


# -- the host-call guest and its raw baseline (hostcall.py, gateway.py) -----------------------------

#: A microservice that opens ``{resource}`` for write in ``init`` and, in ``run(n)``, calls
#: ``resource_write(handle, 0, 1)`` n times within that one activation; returns the sum of the results.
HOSTCALL_WAT = """
(module
  (import "ism" "resource_open" (func $open (param i32 i32 i32) (result i32)))
  (import "ism" "resource_write" (func $write (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "\\01")
  (data (i32.const 16) "{resource}")
  (global $h (mut i32) (i32.const -1))
  (func (export "init") (result i32)
    (global.set $h (call $open (i32.const 16) (i32.const {length}) (i32.const 2)))
    (global.get $h))
  (func (export "run") (param $n i32) (result i32)
    (local $i i32) (local $acc i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $acc (i32.add (local.get $acc) (call $write (global.get $h) (i32.const 0) (i32.const 1))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $acc)))
"""


def hostcall_wasm(resource: str) -> bytes:
    """The host-call guest, compiled, for one resource name."""
    import wasmtime

    return bytes(wasmtime.wat2wasm(HOSTCALL_WAT.format(resource=resource, length=len(resource))))


class RawHostCall:
    """The raw baseline: the host-call guest under bare wasmtime, no iSM code on the call path.

    Own Store and Linker on the engine iSM would use for ``stack`` (same config,
    fuel metering on), ``fuel`` set before every activation as iSM does. The
    host ``resource_open`` returns handle 0; ``resource_write`` has the ABI
    signature, reads the byte at ``ptr`` through the memory export (one
    ``data_ptr`` index: the cheapest read wasmtime-py offers) and returns 1.
    """

    def __init__(self, wasm: bytes, fuel: int, stack: int) -> None:
        import wasmtime

        from ism.hypervisor.sandbox import engine_for

        engine = engine_for(stack)
        self.fuel = fuel
        self.store = store = wasmtime.Store(engine)
        i32 = wasmtime.ValType.i32()
        ftype = wasmtime.FuncType([i32, i32, i32], [i32])
        memory: list[wasmtime.Memory] = []
        self.last = 0

        def resource_open(name_ptr: int, name_len: int, mode: int) -> int:
            return 0

        def resource_write(handle: int, ptr: int, n: int) -> int:
            self.last = memory[0].data_ptr(store)[ptr]
            return 1

        linker = wasmtime.Linker(engine)
        linker.define_func("ism", "resource_open", ftype, resource_open)
        linker.define_func("ism", "resource_write", ftype, resource_write)
        store.set_fuel(fuel)
        store.set_epoch_deadline(100)  # same engine config as iSM's: fuel and an epoch deadline
        instance = linker.instantiate(store, wasmtime.Module(engine, wasm))
        exports = instance.exports(store)
        mem = exports["memory"]
        init, run = exports["init"], exports["run"]
        assert isinstance(mem, wasmtime.Memory)
        assert isinstance(init, wasmtime.Func)
        assert isinstance(run, wasmtime.Func)
        memory.append(mem)
        self._run = run
        if init(store) != 0:
            raise RuntimeError("raw init failed")

    def run(self, n: int) -> int:
        """One activation making ``n`` host calls; returns the guest's sum of results (``n``)."""
        self.store.set_fuel(self.fuel)
        self.store.set_epoch_deadline(100)
        result = self._run(self.store, n)
        assert isinstance(result, int)
        return result


# -- a generic raw guest and an in-memory key store home (services.py) ------------------------------


class RawGuest:
    """Any module under bare wasmtime, no iSM code on the call path.

    Own Store and Linker on the engine iSM would use for ``stack`` (same config,
    fuel metering on), ``fuel`` and an epoch deadline set before every
    activation as iSM does. ``host(guest)`` returns the ``ism`` imports as
    name -> Python function; their types are the ABI's (``wasm_functype``). The
    functions reach guest memory through :attr:`memory` and :attr:`store`
    (wasmtime-py's ``Memory.read`` / ``Memory.write``), which exist by the time
    the guest can call them.
    """

    def __init__(
        self, wasm: bytes, fuel: int, stack: int, host: Callable[[RawGuest], dict[str, Callable[..., Any]]]
    ) -> None:
        import wasmtime

        from ism.hypervisor.host import wasm_functype
        from ism.hypervisor.sandbox import engine_for

        engine = engine_for(stack)
        self.fuel = fuel
        self.store = wasmtime.Store(engine)
        linker = wasmtime.Linker(engine)
        for name, fn in host(self).items():
            linker.define_func("ism", name, wasm_functype(name), fn)
        self.store.set_fuel(fuel)
        self.store.set_epoch_deadline(100)  # same engine config as iSM's: fuel and an epoch deadline
        instance = linker.instantiate(self.store, wasmtime.Module(engine, wasm))
        self._exports = instance.exports(self.store)
        memory = self._exports["memory"]
        assert isinstance(memory, wasmtime.Memory)
        self.memory = memory

    def call(self, export: str, *args: int) -> int:
        """One activation of ``export``: fresh fuel and deadline, then the call; returns its i32 result."""
        import wasmtime

        func = self._exports[export]
        assert isinstance(func, wasmtime.Func)
        self.store.set_fuel(self.fuel)
        self.store.set_epoch_deadline(100)
        result = func(self.store, *args)
        assert isinstance(result, int)
        return result

    def read(self, ptr: int, n: int) -> bytes:
        return bytes(self.memory.read(self.store, ptr, ptr + n))

    def write(self, ptr: int, data: bytes) -> None:
        self.memory.write(self.store, data, ptr)
