"""A violation raised inside a host call carries the guest's backtrace at that call.

A trap's record always named the guest functions on the stack (``Trap.frames``);
a violation the host raises during a host call (an out-of-bounds pointer, a
denied resource, gateway or key, a gateway flood, a host call from the start
function) now does too: innermost frame first, ``name@0xoffset`` as for traps,
at most ``MAX_BACKTRACE`` frames. The rule, message and subject are those the
host raised. Each guest below reaches the host call through named functions
(``$tick`` -> ``$outer`` -> ``$inner`` -> host), so the record names them in
that order (innermost first), and every offset is that of the ``call``
instruction in the module's bytes.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import pytest
import wasmtime
import wasmtime._func
from _malicious import ECHO, ECHO_POLICY, Service, World, build, compile_wat, module

from ism.errors import Violation
from ism.hypervisor.sandbox import MAX_BACKTRACE, Sandbox, compile_module, engine_for, guest_backtrace
from ism.hypervisor.supervisor import State

TIMER = 'resources = { timer = ["read"] }'
CALL = 0x10  # the wasm `call` opcode
FRAME = re.compile(r"^(?P<name>[\w\[\]]+)@0x(?P<offset>[0-9a-f]+)$")


def nested(imports: str, inner: str, data: str = "") -> str:
    """``tick`` -> ``$outer`` -> ``$inner`` (whose body, returning nothing, is ``inner``)."""
    return module(
        imports,
        f"""  {data}
  (func $inner {inner})
  (func $outer (call $inner))
  (func $tick (export "tick") (result i32) (call $outer) (i32.const 0))
  (func (export "init") (result i32) (i32.const 0))""",
    )


def run_one(services: dict[str, Service | tuple[str, str]], steps: int = 1) -> World:
    world = build(services)
    world.run(steps)
    return world


def only_record(world: World, name: str) -> dict[str, Any]:
    records = world.records_of(name)
    assert len(records) == 1, records
    return records[0]


def frames(record: dict[str, Any], wat: str) -> list[str]:
    """The function names of a record's backtrace; every offset is that of a `call` in the module."""
    code = compile_wat(wat)
    names = []
    for frame in record["backtrace"]:
        match = FRAME.match(frame)
        assert match is not None, frame
        assert code[int(match["offset"], 16)] == CALL, frame
        names.append(match["name"])
    return names


# -- out of bounds, denied resource, denied key ------------------------------------------------------

OUT_OF_BOUNDS = nested("log", "(call $log (i32.const 1) (i32.const 65534) (i32.const 4))")
DENIED_RESOURCE = nested(
    "resource_open",
    "(drop (call $open (i32.const 0) (i32.const 9) (i32.const 3)))",
    data='(data (i32.const 0) "uart.host")',
)
DENIED_KEY = nested(
    "key_open",
    "(drop (call $key_open (i32.const 0) (i32.const 10)))",
    data='(data (i32.const 0) "device-2fa")',
)

HOST_RAISED = {
    "out-of-bounds": (
        OUT_OF_BOUNDS,
        TIMER,
        "abi.bounds",
        "log line: span [65534, 65538) outside guest memory of 65536 bytes",
        None,
    ),
    "denied-resource": (
        DENIED_RESOURCE,
        TIMER,
        "policy.resource",
        "uart.host is not granted with mode 3",
        "uart.host",
    ),
    "denied-key": (
        DENIED_KEY,
        TIMER + '\nkeys = ["attacker-key"]',
        "policy.key",
        "key device-2fa is not granted",
        "device-2fa",
    ),
}


@pytest.mark.parametrize(("wat", "policy", "rule", "details", "target"), HOST_RAISED.values(), ids=list(HOST_RAISED))
def test_host_raised_violation_names_the_guest_functions_that_made_the_call(
    wat: str, policy: str, rule: str, details: str, target: str | None
) -> None:
    world = run_one({"evil": Service(wat, policy)})
    record = only_record(world, "evil")
    # what the host raised, unchanged
    assert (record["rule"], record["details"], record["target"]) == (rule, details, target)
    # ... now with where the guest made the call
    assert frames(record, wat) == ["inner", "outer", "tick"]
    # the in-memory record and the outbox record agree
    assert world.sup.records[0].backtrace == tuple(record["backtrace"])
    assert world.state("evil") is State.RESTARTING


def test_a_trap_at_the_same_place_reads_the_same() -> None:
    """The same call chain ending in a trap: the same format (the innermost offset is the trapping instruction)."""
    wat = nested("", "(unreachable)")
    record = only_record(run_one({"evil": Service(wat, TIMER)}), "evil")
    assert record["rule"] == "sandbox.trap"
    assert [FRAME.match(f)["name"] for f in record["backtrace"]] == ["inner", "outer", "tick"]  # type: ignore[index]


# -- gateways: a denied target, a flood, a callee's own violation ---------------------------------------

GATEWAY_CALLER = nested(
    "gateway_call",
    """(local $i i32)
    (loop $again
      (drop (call $gw (i32.const 0) (i32.const {n}) (i32.const 64) (i32.const 4)
        (i32.const 256) (i32.const 128)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const {calls}))))""",
    data='(data (i32.const 0) "{target}") (data (i32.const 64) "ping")',
)


def gateway_caller(target: str, calls: int = 1) -> str:
    return GATEWAY_CALLER.replace("{n}", str(len(target))).replace("{target}", target).replace("{calls}", str(calls))


def test_denied_gateway_names_the_calling_functions() -> None:
    wat = gateway_caller("echo.admin")
    world = run_one({"echo": (ECHO, ECHO_POLICY), "evil": Service(wat, TIMER + '\ngateways = ["echo.echo"]')})
    record = only_record(world, "evil")
    assert (record["rule"], record["details"], record["target"]) == (
        "policy.gateway",
        "gateway echo.admin is not granted",
        "echo.admin",
    )
    assert frames(record, wat) == ["inner", "outer", "tick"]
    assert world.records_of("echo") == []


def test_gateway_flood_names_the_calling_functions() -> None:
    wat = gateway_caller("echo.echo", calls=100)
    world = run_one({"echo": (ECHO, ECHO_POLICY), "evil": Service(wat, TIMER + '\ngateways = ["echo.echo"]')})
    record = only_record(world, "evil")
    assert (record["rule"], record["details"], record["target"]) == (
        "gateway.flood",
        "more than 64 gateway calls in one activation",
        "echo.echo",
    )
    assert frames(record, wat) == ["inner", "outer", "tick"]


#: A callee whose operation reaches the host, out of bounds, through a helper: the fault is the callee's.
BAD_CALLEE = module(
    "log",
    """
  (func $reply (param $len i32) (call $log (i32.const 1) (i32.const 65000) (local.get $len)))
  (func $serve (export "op_echo") (param $req i32) (param $len i32) (result i32)
    (call $reply (i32.const 1000)) (i32.const 0))
  (func (export "gateway_buffer") (result i32) (i32.const 1024))
  (func (export "init") (result i32) (i32.const 0))""",
)


def test_callee_violation_while_serving_names_the_callee_functions() -> None:
    caller = gateway_caller("echo.echo")
    world = run_one(
        {
            "echo": Service(BAD_CALLEE, 'exports = ["echo"]'),
            "client": Service(caller, TIMER + '\ngateways = ["echo.echo"]'),
        }
    )
    record = only_record(world, "echo")
    assert record["rule"] == "abi.bounds"
    assert record["details"] == (
        "while serving client -> echo.echo: log line: span [65000, 66000) outside guest memory of 65536 bytes"
    )
    assert record["target"] == "echo.echo"
    assert frames(record, BAD_CALLEE) == ["reply", "serve"]
    # the caller got ECALLEE and is not charged
    assert world.records_of("client") == []
    assert world.state("client") is State.RUNNING


# -- the start function ---------------------------------------------------------------------------------

START_GRAB = module(
    "resource_open",
    """
  (data (i32.const 0) "uart.host")
  (func $grab (drop (call $open (i32.const 0) (i32.const 9) (i32.const 3))))
  (func $start (call $grab))
  (start $start)
  (func (export "init") (result i32) (i32.const 0))""",
)
START_TRAP = module(
    "",
    """
  (func $boom (unreachable))
  (func $start (call $boom))
  (start $start)
  (func (export "init") (result i32) (i32.const 0))""",
)


def test_host_call_from_the_start_function_names_it() -> None:
    record = only_record(run_one({"evil": Service(START_GRAB, TIMER)}), "evil")
    assert (record["rule"], record["details"]) == (
        "sandbox.instantiate",
        "the start function called the host before init",
    )
    assert frames(record, START_GRAB) == ["grab", "start"]


def test_trap_in_the_start_function_keeps_its_backtrace() -> None:
    record = only_record(run_one({"evil": Service(START_TRAP, TIMER)}), "evil")
    assert record["rule"] == "sandbox.trap"
    assert record["details"].startswith("start-up trapped: unreachable executed")
    assert [FRAME.match(f)["name"] for f in record["backtrace"]] == ["boom", "start"]  # type: ignore[index]


# -- bounded, whatever the guest does ---------------------------------------------------------------

DEEP = module(
    "log",
    """
  (func $down (param $n i32)
    (if (i32.eqz (local.get $n))
      (then (call $log (i32.const 1) (i32.const 65535) (i32.const 2)) (return)))
    (call $down (i32.sub (local.get $n) (i32.const 1))))
  (global $depth (mut i32) (i32.const 0))
  (func $tick (export "tick") (result i32) (call $down (global.get $depth)) (i32.const 0))
  (func (export "init") (result i32) (global.set $depth (i32.const {depth})) (i32.const 0))""",
)


@pytest.mark.parametrize("depth", [20, 4000])
def test_backtrace_of_a_deep_stack_is_capped(depth: int) -> None:
    wat = DEEP.replace("{depth}", str(depth))
    record = only_record(run_one({"evil": Service(wat, TIMER)}), "evil")
    assert record["rule"] == "abi.bounds"
    assert frames(record, wat) == ["down"] * MAX_BACKTRACE


# -- the sandbox alone --------------------------------------------------------------------------------

SANDBOX_GUEST = """(module
  (import "ism" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 1)
  (func $inner (param $x i32) (call $log (local.get $x) (i32.const 0) (i32.const 0)))
  (func $outer (param $x i32) (call $inner (local.get $x)))
  (func $run (export "run") (param $x i32) (result i32) (call $outer (local.get $x)) (local.get $x)))"""


def _sandbox(host: Any) -> Sandbox:
    engine = engine_for(256 * 1024)
    log_type = wasmtime.FuncType([wasmtime.ValType.i32()] * 3, [])
    return Sandbox(
        compile_module(engine, compile_wat(SANDBOX_GUEST)), engine, 1, 1_000_000, lambda sb: {"log": (log_type, host)}
    )


def test_sandbox_attaches_the_backtrace_to_what_the_host_raised_then_runs_on() -> None:
    def host(level: int, ptr: int, n: int) -> None:
        if level == 1:
            raise Violation("policy.resource", "denied", subject="thing")
        if level == 2:
            raise ValueError("a bug in a host function")

    sb = _sandbox(host)
    with pytest.raises(Violation) as info:
        sb.call("run", 1)
    assert (info.value.rule, info.value.message, info.value.subject) == ("policy.resource", "denied", "thing")
    assert [f.split("@")[0] for f in guest_backtrace(info.value)] == ["inner", "outer", "run"]
    fault = sb.fault_from(info.value)
    assert (fault.rule, fault.message, fault.target) == ("policy.resource", "denied", "thing")
    assert fault.backtrace == guest_backtrace(info.value)
    assert wasmtime._func.LAST_EXCEPTION is None

    # a Python error in a host function: a sandbox.trap, with the same backtrace
    with pytest.raises(ValueError, match="a bug in a host function") as bug:
        sb.call("run", 2)
    fault = sb.fault_from(bug.value)
    assert (fault.rule, fault.message) == ("sandbox.trap", "a bug in a host function")
    assert [f.split("@")[0] for f in fault.backtrace] == ["inner", "outer", "run"]

    # a successful call afterwards: nothing left over
    assert sb.call("run", 0) == 0
    assert guest_backtrace(Violation("x.y", "raised by the host, not in a host call")) == ()


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    """An exception that refuses new attributes."""

    what: str


def test_an_exception_that_refuses_the_backtrace_is_raised_as_it_is() -> None:
    def host(level: int, ptr: int, n: int) -> None:
        raise FrozenError("frozen")

    sb = _sandbox(host)
    with pytest.raises(FrozenError) as info:
        sb.call("run", 1)
    assert info.value.what == "frozen"
    assert guest_backtrace(info.value) == ()
    assert sb.fault_from(info.value).rule == "sandbox.trap"
