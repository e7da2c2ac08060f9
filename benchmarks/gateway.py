"""Gateway benchmark: one gateway round trip against the raw host call of ``hostcall.py``.

Two microservices under one :class:`Supervisor`:

* ``callee`` offers operation ``echo``: ``op_echo(ptr, len)`` leaves the request
  in its gateway buffer as the reply and returns ``len``.
* ``caller`` is granted ``callee.echo``; ``run(n)`` calls
  ``gateway_call("callee.echo", req, 16, resp, 16)`` n times inside one
  activation (n = 64, the most one activation may make: ``MAX_GATEWAY_CALLS``)
  and traps unless every call returns 16.

A round trip is everything iSM does for one call: the caller's host call, the
target's bounds check and policy lookup, the copy of the request into the
callee's buffer, a fresh-fuel activation of the callee (Python -> wasm entry),
the copy of the reply back, and the bookkeeping (re-entry guard, caller
stack, flood counter). The caller's own activation entry is paid once per 64
calls; the figure subtracts it (an activation with n = 0, timed in the same
rounds).

Baseline: the raw wasmtime host call of ``hostcall.py``
(:class:`_common.RawHostCall`), measured in the same run.

Target: ``round trip / raw host call <= 3``.

Run from the project root::

    .venv/bin/python benchmarks/gateway.py [--quick] [--strict] [--repeat N]
"""

from __future__ import annotations

import sys
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wasmtime

from _common import (
    RawHostCall,
    Target,
    check_targets,
    fail,
    fmt_time,
    hostcall_wasm,
    machine,
    measure_interleaved,
    parser,
)
from ism.boards.virtual import make_peripherals
from ism.formats import wasm
from ism.formats.board import parse_board
from ism.formats.policy import check_module, parse_policy
from ism.hypervisor.supervisor import MAX_GATEWAY_CALLS, Image, Microservice, State, Supervisor

TARGET = 3.0
REQUEST = 16
CALLER_UUID = uuidlib.UUID("9a7e0000-0000-4000-8000-000000000001")
CALLEE_UUID = uuidlib.UUID("9a7e0000-0000-4000-8000-000000000002")

#: run(n): n gateway calls to callee.echo with a 16-byte request; traps on any other result.
CALLER_WAT = """
(module
  (import "ism" "gateway_call" (func $gw (param i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "callee.echo")
  (data (i32.const 64) "0123456789abcdef")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "run") (param $n i32) (result i32)
    (local $i i32)
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (if (i32.ne (call $gw (i32.const 0) (i32.const 11) (i32.const 64) (i32.const 16) (i32.const 128) (i32.const 16))
                    (i32.const 16))
          (then unreachable))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (local.get $n)))
"""

#: op_echo: the request is already in the gateway buffer, so the reply is the request.
CALLEE_WAT = """
(module
  (memory (export "memory") 1)
  (func (export "init") (result i32) (i32.const 0))
  (func (export "gateway_buffer") (result i32) (i32.const 1024))
  (func (export "op_echo") (param $ptr i32) (param $len i32) (result i32) (local.get $len)))
"""

POLICY = f"""
version = 1
board = "bench-board"
[microservice.callee]
uuid = "{CALLEE_UUID}"
exports = ["echo"]
[microservice.caller]
uuid = "{CALLER_UUID}"
gateways = ["callee.echo"]
"""


def build() -> tuple[Supervisor, Microservice]:
    """A started supervisor running ``caller`` and ``callee``."""
    board = parse_board('name = "bench-board"\n[resources."gpio.led0"]\nperipheral = "led"\n', "bench-board.toml")
    policy = parse_policy(POLICY, board, "bench-policy.toml")
    images = []
    for name, ms_uuid, wat in (("caller", CALLER_UUID, CALLER_WAT), ("callee", CALLEE_UUID, CALLEE_WAT)):
        module = bytes(wasmtime.wat2wasm(wat))
        entry = policy.get(ms_uuid)
        assert entry is not None
        check_module(entry, wasm.parse_module(module))  # as the runtime does before starting it
        images.append(Image(ms_uuid, name, "1.0.0", b"\0" * 32, b"\0" * 32, module))

    sup = Supervisor(images, policy.by_uuid, make_peripherals(board), lambda record: 0)
    sup.start()
    caller = sup.by_name["caller"]
    if any(ms.state is not State.RUNNING for ms in sup.microservices.values()) or sup.records:
        raise RuntimeError(f"microservices did not start: {sup.status()} {sup.records}")
    return sup, caller


def main(argv: list[str] | None = None) -> int:
    p = parser("Gateway benchmark: caller -> callee.echo round trip vs a raw wasmtime host call.")
    args = p.parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 20)
    number = 5 if args.quick else 50
    calls = MAX_GATEWAY_CALLS
    raw_calls = 500 if args.quick else 2000
    if repeat < 1:
        return fail("--repeat must be >= 1")

    print(f"gateway benchmark ({'quick' if args.quick else 'full'}): {calls} round trips per activation, {machine()}")
    try:
        sup, caller = build()
    except RuntimeError as exc:
        return fail(str(exc))
    callee = sup.by_name["callee"]
    raw = RawHostCall(hostcall_wasm("gpio.led0"), caller.policy.fuel, caller.policy.stack)

    def activation(n: int) -> None:
        if sup._activate(caller, "run", n) != n:  # the supervisor's top-level activation path
            raise RuntimeError(f"caller faulted: {sup.records}")

    activation(calls)  # warm: first call fetches the callee's gateway buffer, compiles trampolines
    raw.run(raw_calls)
    full_t, empty_t, raw_t = measure_interleaved(
        [lambda: activation(calls), lambda: activation(0), lambda: raw.run(raw_calls)], repeat, number
    )
    if sup.records or callee.state is not State.RUNNING or callee.callers or callee.active:
        return fail(f"state after timing: {sup.status()} {sup.records}")
    round_trip = (full_t.best - empty_t.best) / calls
    raw_call = raw_t.best / raw_calls
    print(f"(best of {repeat} rounds of {number} activations, rounds interleaved)")
    print(f"gateway round trip (16-byte request, 16-byte reply): {fmt_time(round_trip)}")
    print(f"  caller activation entry, paid once per {calls} calls:  {fmt_time(empty_t.best)}")
    print(f"raw wasmtime host call ({raw_calls} per activation):     {fmt_time(raw_call)}")
    target = Target("gateway round trip / raw host call", round_trip / raw_call, TARGET, upper=True)
    print(target.line())
    return check_targets([target], args.strict)


if __name__ == "__main__":
    sys.exit(main())
