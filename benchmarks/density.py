"""Density benchmark: start 1,000 microservice instances; time and resident memory per instance.

Every instance runs the same small module (one page of memory, a 5-byte data
segment, an ``ism.log`` import, ``init`` returning 0, a ``tick`` that logs)
under its own UUID and its own policy entry.

Ours: one :class:`Supervisor` over the 1,000 images, timed in two phases:

* ``Supervisor(...)``: per image, the policy lookup and the compilation of its
  module (the supervisor compiles each image's Wasm on its own);
* ``start()``: per microservice, a Sandbox (Store with limits, a Linker with
  the 11 host functions bound to it, instantiation) and its ``init``.

Raw: the module compiled once (timed on its own), then 1,000 bare wasmtime
``Store`` + ``Instance`` (fuel set, a no-op ``log`` import) and a call of
``init``, on the engine iSM uses.

Resident memory: ``VmRSS`` of /proc/self/status before and after, with every
instance kept alive. Each side runs in a fresh Python process (the script
re-runs itself with ``--child``), after one warm-up instance, so neither side
inherits the other's heap; the time is the best run, the RSS the median.

No target: the figures are reported for information.

Run from the project root::

    .venv/bin/python benchmarks/density.py [--quick] [--repeat N] [--count 1000]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wasmtime

from _common import fail, fmt_bytes, fmt_time, machine, parser, rss_bytes
from ism.formats import wasm
from ism.formats.board import parse_board
from ism.formats.policy import MicroservicePolicy, check_module, parse_policy
from ism.hypervisor.sandbox import engine_for
from ism.hypervisor.supervisor import Image, State, Supervisor

N_INSTANCES = 1_000

WAT = """
(module
  (import "ism" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "ready")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32) (call $log (i32.const 1) (i32.const 0) (i32.const 5)) (i32.const 0)))
"""


def _uuid(index: int) -> uuidlib.UUID:
    return uuidlib.UUID(int=(0xDE5 << 112) | (index + 1), version=4)


def _setup(module: bytes, count: int) -> tuple[list[Image], dict[uuidlib.UUID, MicroservicePolicy]]:
    board = parse_board('name = "bench-board"\n', "bench-board.toml")
    text = 'version = 1\nboard = "bench-board"\n' + "".join(
        f'[microservice.ms-{i:04d}]\nuuid = "{_uuid(i)}"\n' for i in range(count)
    )
    policy = parse_policy(text, board, "bench-policy.toml")
    images = [Image(_uuid(i), f"ms-{i:04d}", "1.0.0", b"\0" * 32, b"\0" * 32, module) for i in range(count)]
    if len(policy.by_uuid) != count or len({im.uuid for im in images}) != count:
        raise RuntimeError("expected one policy entry and one distinct UUID per instance")
    check_module(policy.by_uuid[images[0].uuid], wasm.parse_module(module))  # as the runtime does
    return images, dict(policy.by_uuid)


def child_ours(module: bytes, count: int) -> dict[str, Any]:
    """In a fresh process: Supervisor over ``count`` images, then start(); times and RSS deltas."""
    images, policies = _setup(module, count)
    warm = Supervisor(images[:1], {images[0].uuid: policies[images[0].uuid]}, {}, lambda r: 0)
    warm.start()
    warm.stop()
    del warm
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    sup = Supervisor(images, policies, {}, lambda record: 0)
    t1 = time.perf_counter()
    rss1 = rss_bytes()
    sup.start()
    t2 = time.perf_counter()
    rss2 = rss_bytes()
    running = sum(ms.state is State.RUNNING and ms.sandbox is not None for ms in sup.microservices.values())
    if running != count or sup.records:
        raise RuntimeError(f"{running} of {count} running; records: {sup.records[:3]}")
    return {"construct": t1 - t0, "start": t2 - t1, "rss_construct": rss1 - rss0, "rss_start": rss2 - rss1}


def child_raw(module: bytes, count: int) -> dict[str, Any]:
    """In a fresh process: the module compiled once, then ``count`` bare Store + Instance + init."""
    _, policies = _setup(module, 1)
    entry = next(iter(policies.values()))
    engine = engine_for(entry.stack)
    i32 = wasmtime.ValType.i32()
    log_type = wasmtime.FuncType([i32, i32, i32], [])

    def log(level: int, ptr: int, n: int) -> None:
        return None

    t0 = time.perf_counter()
    compiled = wasmtime.Module(engine, module)
    compile_time = time.perf_counter() - t0

    def instance() -> tuple[wasmtime.Store, wasmtime.Instance]:
        store = wasmtime.Store(engine)
        store.set_fuel(entry.fuel)
        store.set_epoch_deadline(100)
        inst = wasmtime.Instance(store, compiled, [wasmtime.Func(store, log_type, log)])
        init = inst.exports(store)["init"]
        assert isinstance(init, wasmtime.Func)
        if init(store) != 0:
            raise RuntimeError("raw init failed")
        return store, inst

    instance()  # warm-up, dropped
    gc.collect()
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    keep = [instance() for _ in range(count)]
    t1 = time.perf_counter()
    rss1 = rss_bytes()
    if len(keep) != count:
        raise RuntimeError("instances lost")
    return {"compile": compile_time, "start": t1 - t0, "rss_start": rss1 - rss0}


def run_child(side: str, count: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", side, "--count", str(count)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"{side} child failed: {out.stderr.strip().splitlines()[-1:] or out.returncode}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main(argv: list[str] | None = None) -> int:
    p = parser("Density benchmark: 1,000 microservice instances vs 1,000 bare wasmtime instances.")
    p.add_argument("--count", type=int, default=None, help=f"instances (default {N_INSTANCES}; quick 100)")
    p.add_argument("--child", choices=["ours", "raw"], help=argparse.SUPPRESS)  # internal: one side, in this process
    args = p.parse_args(argv)
    count = args.count or (100 if args.quick else N_INSTANCES)
    repeat = args.repeat or (1 if args.quick else 3)
    if count < 1 or repeat < 1:
        return fail("--count and --repeat must be >= 1")
    module = bytes(wasmtime.wat2wasm(WAT))
    if args.child:
        result = (child_ours if args.child == "ours" else child_raw)(module, count)
        print(json.dumps(result))
        return 0

    print(f"density benchmark ({'quick' if args.quick else 'full'}): {count} instances, {machine()}")
    print(f"module: {len(module)} bytes, 1 page of memory; each side in a fresh process, {repeat} run(s)")
    ours_runs: list[dict[str, Any]] = []
    raw_runs: list[dict[str, Any]] = []
    try:
        for _ in range(repeat):
            ours_runs.append(run_child("ours", count))
            raw_runs.append(run_child("raw", count))
    except RuntimeError as exc:
        return fail(str(exc))

    def best(runs: list[dict[str, Any]], key: str) -> float:
        return float(min(r[key] for r in runs))

    def rss(runs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    construct, start = best(ours_runs, "construct"), best(ours_runs, "start")
    raw_start, raw_compile = best(raw_runs, "start"), best(raw_runs, "compile")
    rss_construct, rss_start, raw_rss = (
        rss(ours_runs, "rss_construct"),
        rss(ours_runs, "rss_start"),
        rss(raw_runs, "rss_start"),
    )
    rows = [
        ("ours: Supervisor() (compiles each image)", construct, rss_construct),
        ("ours: start() (sandbox + init)", start, rss_start),
        ("ours: total", construct + start, rss_construct + rss_start),
        ("raw: Store + Instance + init", raw_start, raw_rss),
    ]
    header = f"{'':42} {'total':>10} {'per instance':>13} {'RSS growth':>11} {'per instance':>13}"
    print(header)
    print("-" * len(header))
    for name, seconds, grown in rows:
        print(
            f"{name:42} {fmt_time(seconds):>10} {fmt_time(seconds / count):>13} "
            f"{fmt_bytes(grown):>11} {fmt_bytes(grown / count):>13}"
        )
    print(f"raw: one compile of the module (not in the raw row): {fmt_time(raw_compile)}")
    print(
        f"ratios to raw: start() time {start / raw_start:.2f}, total time {(construct + start) / raw_start:.2f}; "
        f"start() RSS {rss_start / raw_rss:.2f}, total RSS {(rss_construct + rss_start) / raw_rss:.2f}"
    )
    print("(no target: reported for information)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
