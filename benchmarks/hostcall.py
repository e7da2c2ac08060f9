"""Host-call benchmark: a policy-checked ``resource_write`` against a raw wasmtime host call.

Guest (both sides, the same module bytes): ``init`` opens ``gpio.led0`` for
write; ``run(n)`` calls ``resource_write(handle, ptr, 1)`` n times in a loop
inside that one activation, so the Python -> wasm entry is paid once per n
calls (n = 2,000; the entry is under 0.1% of the figure).

Ours: the microservice under a :class:`Supervisor` whose policy grants it
``gpio.led0 = ["write"]``; each activation goes through the supervisor's
top-level activation path. Every call pays iSM's gating: the handle table,
the handle's mode bits (the grant was checked against the policy at
``resource_open``), the bounds check of ``(ptr, 1)``, the copy of the byte
out of guest memory, and the dispatch to the simulated LED.

Raw: the same module under bare wasmtime (:class:`_common.RawHostCall`: own
Store and Linker, the same engine and fuel) calling a Python host function of
the same signature that reads the same byte through the memory export and
returns. Both sides go through wasmtime-py's host-function trampoline, so the
ratio is iSM's gating alone.

Target: ``ours / raw <= 1.25`` per call.

Policy size: the same guest under policies of 10, 1,000 and 10,000 grants
(a board of up to 1,000 LED resources, granted in full to the measured
microservice and to as many other policy entries as it takes). The per-call
cost must not grow with the policy: target ``max / min <= 1.10`` over the
three sizes (rounds interleaved, so this is the noise floor of the machine).

Run from the project root::

    .venv/bin/python benchmarks/hostcall.py [--quick] [--strict] [--repeat N] [--calls N]
"""

from __future__ import annotations

import sys
import time
import uuid as uuidlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (
    RawHostCall,
    Target,
    check_targets,
    fail,
    fmt_time,
    hostcall_wasm,
    machine,
    measure,
    measure_interleaved,
    parser,
)
from ism.boards.virtual import Led, make_peripherals
from ism.formats import wasm
from ism.formats.board import MODE_BITS, parse_board
from ism.formats.policy import MicroservicePolicy, check_module, parse_policy
from ism.hypervisor.supervisor import Image, Microservice, State, Supervisor

TARGET = 1.25
SPREAD_TARGET = 1.10
RESOURCE = "gpio.led0"
POLICY_SIZES = (10, 1_000, 10_000)
#: resources per benchmark board (the board format allows 4,096)
BOARD_RESOURCES = 1_000
BENCH_UUID = uuidlib.UUID("0b0c0000-0000-4000-8000-000000000000")


@dataclass
class Setup:
    """A started supervisor running the host-call guest as ``bench``."""

    supervisor: Supervisor
    ms: Microservice
    entry: MicroservicePolicy
    grants: int
    entries: int
    led: Led

    def run(self, n: int) -> int:
        result = self.supervisor._activate(self.ms, "run", n)  # the supervisor's top-level activation path
        if result != n or self.ms.state is not State.RUNNING:
            raise RuntimeError(f"activation returned {result}, state {self.ms.state}: {self.supervisor.records}")
        return result


def _filler_uuid(index: int) -> uuidlib.UUID:
    return uuidlib.UUID(int=(0x0B0C << 112) | (index + 1), version=4)


def build(module: bytes, grants: int) -> Setup:
    """A board and policy with ``grants`` grants in all; ``bench`` holds up to BOARD_RESOURCES of them."""
    n_resources = min(grants, BOARD_RESOURCES)
    if grants % n_resources:
        raise ValueError(f"grants must be a multiple of {n_resources}")
    names = [RESOURCE] + [f"gpio.led{i:04d}" for i in range(1, n_resources)]
    board_text = 'name = "bench-board"\n' + "".join(
        f'[resources."{name}"]\nperipheral = "led"\nmodes = ["read", "write"]\n' for name in names
    )
    board = parse_board(board_text, "bench-board.toml")
    grant_table = "".join(f'"{name}" = ["write"]\n' for name in names)
    entries = grants // n_resources
    policy_text = 'version = 1\nboard = "bench-board"\n'
    for i in range(entries):
        name, ms_uuid = ("bench", BENCH_UUID) if i == 0 else (f"filler-{i:04d}", _filler_uuid(i))
        policy_text += f'[microservice.{name}]\nuuid = "{ms_uuid}"\n[microservice.{name}.resources]\n{grant_table}'
    policy = parse_policy(policy_text, board, "bench-policy.toml")
    total = sum(len(e.resources) for e in policy.by_uuid.values())
    if total != grants or len(policy.by_uuid) != entries:
        raise RuntimeError(f"policy has {total} grants in {len(policy.by_uuid)} entries, expected {grants}")
    entry = policy.by_name["bench"]
    check_module(entry, wasm.parse_module(module))  # as the runtime does before starting it
    peripherals = make_peripherals(board)
    image = Image(BENCH_UUID, "bench", "1.0.0", b"\0" * 32, b"\0" * 32, module)

    sup = Supervisor([image], policy.by_uuid, peripherals, lambda record: 0)
    sup.start()
    ms = sup.by_name["bench"]
    if ms.state is not State.RUNNING or len(ms.handles) != 1 or sup.records:
        raise RuntimeError(f"bench did not start: {ms.state}, {sup.records}")
    led = peripherals[RESOURCE]
    assert isinstance(led, Led)
    return Setup(sup, ms, entry, total, entries, led)


def main(argv: list[str] | None = None) -> int:
    p = parser("Host-call benchmark: policy-checked resource_write vs a raw wasmtime host call.")
    p.add_argument("--calls", type=int, default=None, help="host calls per activation (default 2000; quick 500)")
    args = p.parse_args(argv)
    calls = args.calls or (500 if args.quick else 2000)
    repeat = args.repeat or (3 if args.quick else 20)
    number = 2 if args.quick else 5
    if calls < 1 or repeat < 1:
        return fail("--calls and --repeat must be >= 1")

    print(f"host-call benchmark ({'quick' if args.quick else 'full'}): {calls} calls per activation, {machine()}")
    module = hostcall_wasm(RESOURCE)
    ours = build(module, 1)
    raw = RawHostCall(module, ours.entry.fuel, ours.entry.stack)
    ours.run(calls)  # warm both (first call compiles trampolines, fills caches)
    raw.run(calls)

    ours_t, raw_t = measure_interleaved([lambda: ours.run(calls), lambda: raw.run(calls)], repeat, number)
    if raw.last != 1 or ours.led.state != 1 or ours.supervisor.records:
        return fail("a side did not see the byte it was written, or a violation was recorded")
    ours_call, raw_call = ours_t.best / calls, raw_t.best / calls
    print(f"(best of {repeat} rounds of {number} activations x {calls} calls, rounds interleaved)")
    print(f"ours (Supervisor, policy-checked resource_write): {fmt_time(ours_call)} per call")
    print(f"raw  (bare wasmtime, host fn reads the byte):      {fmt_time(raw_call)} per call")
    print(f"iSM gating: {fmt_time(ours_call - raw_call)} per call")
    targets = [Target("hostcall ours / raw", ours_call / raw_call, TARGET, upper=True)]
    print(targets[0].line())

    print()
    print("per-call cost against policy size:")
    setups: list[Setup] = []
    for grants in POLICY_SIZES:
        start = time.perf_counter()
        setups.append(build(module, grants))
        setups[-1].run(calls)
        print(
            f"  built {grants:>6,} grants ({setups[-1].entries} policy entries x "
            f"{len(setups[-1].entry.resources):,} resources) in {fmt_time(time.perf_counter() - start)}"
        )
    timings = measure_interleaved([partial(s.run, calls) for s in setups], repeat, number)
    header = f"  {'grants':>8} {'per call':>10} {'allows()':>10}"
    print(header)
    per_call = []
    for setup, timing in zip(setups, timings, strict=True):
        last = list(setup.entry.resources)[-1]  # the lookup resource_open makes, for the last grant
        allows = measure(partial(setup.entry.allows, last, MODE_BITS["write"]), repeat, 10_000).best
        per_call.append(timing.best / calls)
        print(f"  {setup.grants:>8,} {fmt_time(per_call[-1]):>10} {fmt_time(allows):>10}")
    spread = Target("hostcall policy-size max / min", max(per_call) / min(per_call), SPREAD_TARGET, upper=True)
    targets.append(spread)
    print(spread.line())
    print()
    return check_targets(targets, args.strict)


if __name__ == "__main__":
    sys.exit(main())
