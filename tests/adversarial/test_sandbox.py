"""Malicious microservices against the sandbox, the host ABI, the gateways and the supervisor.

Every attacker is a WAT module that runs next to well-behaved neighbours
(:data:`_malicious.STANDARD`: ``ticker`` blinks the LED and logs "tick N",
``client`` calls the gateway ``echo.echo`` on every tick and logs the reply).
Each case asserts three things:

1. the attacker is contained: it is no longer running, and what it attacked
   (the LED, the sensor, the scratch memory, the key, a neighbour's operation)
   was never reached;
2. the right rule is in its violation record, which names the microservice
   (UUID, name, version, measurement);
3. the neighbours' observable output (log lines, LED history, states, records)
   is exactly that of a run without the attacker, and a caller whose callee
   misbehaves gets an error code and keeps running.

The supervisor is driven directly with a fake monotonic clock: one ``step``
per 100 ms timer tick.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from _malicious import (
    ECALLEE,
    ECHO,
    EINVAL,
    EREFUSED,
    EUNAVAILABLE,
    HEX,
    ITOA,
    SAY_N,
    SENSOR,
    SENSOR_POLICY,
    STANDARD,
    TICK,
    TICKER,
    TOKEN,
    FakeClock,
    Service,
    World,
    build,
    client,
    client_policy,
    compile_wat,
    device_services,
    gateway_callee,
    module,
    ms_uuid,
    token_board,
    wat_bytes,
)
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from ism.boards.virtual import Fingerprint, Led, Memory, Uart, make_peripherals
from ism.errors import FormatError
from ism.formats import wasm
from ism.formats.abi import HOST_ABI
from ism.formats.policy import check_module, parse_policy
from ism.hypervisor.supervisor import Image, State, Supervisor

STEPS = 8  # 800 ms: long enough for three faults (0, 100 and 300 ms) and quarantine
CRASH_LOOP = ["restart in 100 ms", "restart in 200 ms", "quarantined", "quarantined"]
TIMER = 'resources = { timer = ["read"] }'
OWNER_FINGER = bytes((i * 37 + 11) & 0xFF for i in range(64))


def attacker(imports: str, tick: str, *, data: str = "", init: str = "(i32.const 0)", pages: int = 1) -> str:
    """A module whose ``tick`` (body ``tick``, returning i32) is the attack; ``$say_n`` and ``$itoa`` included."""
    needs_log = "log" in imports.split()
    helpers = ITOA + SAY_N if needs_log else ""
    return module(
        imports,
        f"""{helpers}
  {data}
  (global $h (mut i32) (i32.const -1))
  (func (export "init") (result i32) {init})
  (func (export "tick") (result i32)
    (local $n i32)
{tick})""",
        pages,
    )


@dataclass(frozen=True)
class Attack:
    """One malicious scenario.

    ``services`` run only in the attack world (the attacker and, for callee
    attacks, the caller that witnesses it); ``neighbours`` run in both worlds
    and are compared, except those in ``not_compared``.
    """

    id: str
    rule: str
    services: dict[str, Service]
    attacker: str = "evil"
    neighbours: dict[str, Service] = field(default_factory=dict)
    target: str | None = None
    setup: Callable[[World], None] | None = None
    check: Callable[[World], None] | None = None
    not_compared: frozenset[str] = frozenset()


def _svc(wat: str, policy: str = TIMER, static_check: bool = True) -> Service:
    return Service(wat, policy, static_check)


# -- case-specific checks: "it never reached what it attacked" ------------------------------------


def _lines_are(name: str, *expected: str) -> Callable[[World], None]:
    """Every activation of ``name`` logged exactly ``expected`` before it was stopped."""

    def check(world: World) -> None:
        assert world.lines(name) == list(expected) * 3

    return check


def _checks(*checks: Callable[[World], None]) -> Callable[[World], None]:
    def check(world: World) -> None:
        for one in checks:
            one(world)

    return check


def _no_handles(world: World) -> None:
    assert world.sup.by_name["evil"].handles == []


def _scratch_untouched(world: World) -> None:
    scratch = world.peripherals["mem.scratch"]
    assert isinstance(scratch, Memory)
    assert scratch.data == bytes(len(scratch.data))


def _place_finger(world: World) -> None:
    sensor = world.peripherals["spi.fingerprint"]
    assert isinstance(sensor, Fingerprint)
    sensor.place(OWNER_FINGER)


def _never_scanned(*expected: str) -> Callable[[World], None]:
    def check(world: World) -> None:
        sensor = world.peripherals["spi.fingerprint"]
        assert isinstance(sensor, Fingerprint)
        assert sensor.scans == 0
        assert world.lines("sensor") == ["finger 1"] * STEPS
        assert world.lines("evil") == list(expected) * 3

    return check


def _caller_got_ecallee(world: World) -> None:
    """The caller of a faulting callee got ISM_ECALLEE for each fault, ISM_EUNAVAILABLE meanwhile, and kept ticking."""
    lines = world.lines("caller")
    assert len(lines) == STEPS
    assert lines[0] == f"n={ECALLEE}"
    assert lines.count(f"n={ECALLEE}") == 3
    assert set(lines) == {f"n={ECALLEE}", f"n={EUNAVAILABLE}"}
    assert lines[-1] == f"n={EUNAVAILABLE}"  # quarantined
    assert world.state("caller") is State.RUNNING
    assert world.records_of("caller") == []


def _echo_admin_never_ran(world: World) -> None:
    assert "admin reached!" not in world.lines("echo")


# -- the attackers ---------------------------------------------------------------------------------

LED_DATA = '(data (i32.const 0) "gpio.led0") (data (i32.const 16) "wrote ")'
OPEN_LED = """(global.set $h (call $open (i32.const 0) (i32.const 9) (i32.const 2)))
    (i32.const 0)"""
LED_GRANT = 'resources = { timer = ["read"], "gpio.led0" = ["write"] }'


def led_writer(ptr: int, length: int, pages: int = 1) -> Service:
    """Granted the LED, but writes it from a span outside its memory (or too long): the byte never reaches it."""
    return _svc(
        attacker(
            "log resource_open resource_write",
            f"""
    (local.set $n (call $write (global.get $h) (i32.const {ptr}) (i32.const {length})))
    (call $say_n (i32.const 16) (i32.const 6) (local.get $n))
    (i32.const 0)""",
            data=LED_DATA,
            init=OPEN_LED,
            pages=pages,
        ),
        LED_GRANT,
    )


TIMER_READER_OOB = attacker(
    "log resource_open resource_read",
    """
    ;; 8 bytes of timer into the last 4 bytes of memory: the host must not write past the end.
    (local.set $n (call $read (global.get $h) (i32.const 65532) (i32.const 8)))
    (call $say_n (i32.const 16) (i32.const 5) (local.get $n))
    (i32.const 0)""",
    data='(data (i32.const 0) "timer") (data (i32.const 16) "read ")',
    init="(global.set $h (call $open (i32.const 0) (i32.const 5) (i32.const 1))) (i32.const 0)",
)

INFINITE_LOOP = attacker("", "(loop $forever (br $forever)) (i32.const 0)")

MEMORY_BOMB = attacker(
    "log",
    """
    (block $refused
      (loop $grow
        (br_if $refused (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
        (br $grow)))
    (call $say_n (i32.const 0) (i32.const 11) (memory.size))
    ;; the limit refused to grow further: now touch the page beyond it
    (i32.store (i32.mul (memory.size) (i32.const 65536)) (i32.const 0xdead))
    (i32.const 0)""",
    data='(data (i32.const 0) "refused at ")',
)

DEEP_RECURSION = module(
    "",
    """
  (func $deep (param $n i32) (result i32)
    (if (result i32) (i32.eqz (local.get $n))
      (then (i32.const 0))
      (else (i32.add (i32.const 1) (call $deep (i32.sub (local.get $n) (i32.const 1)))))))
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32) (call $deep (i32.const 10000000)))""",
)


def opener(name: str, mode: int, then: str = "") -> str:
    """Opens resource ``name`` with ``mode`` on every tick, logs the handle, then runs ``then``."""
    return attacker(
        "log resource_open resource_read resource_write",
        f"""
    (local.set $n (call $open (i32.const 0) (i32.const {len(name)}) (i32.const {mode})))
    (call $say_n (i32.const 100) (i32.const 7) (local.get $n))
    {then}
    (i32.const 0)""",
        data=f'(data (i32.const 0) "{name}") (data (i32.const 100) "handle ") (data (i32.const 120) "stolen")',
    )


WRITE_THROUGH_READ_HANDLE = """
    ;; the handle is real but read-only: writing through it must not reach the region
    (drop (call $write (local.get $n) (i32.const 120) (i32.const 6)))"""

STOLEN_HANDLES = attacker(
    "log resource_open resource_read resource_control",
    """
    ;; the sensor owner's handle 0 means nothing here: this microservice opened nothing
    (call $say_n (i32.const 100) (i32.const 5) (call $read (i32.const 0) (i32.const 200) (i32.const 64)))
    (call $say_n (i32.const 110) (i32.const 8)
      (call $control (i32.const 0) (i32.const 1) (i32.const 0) (i32.const 0)))
    ;; so it tries the sensor itself, which it was never granted
    (drop (call $open (i32.const 0) (i32.const 15) (i32.const 1)))
    (i32.const 0)""",
    data='(data (i32.const 0) "spi.fingerprint") (data (i32.const 100) "read ") (data (i32.const 110) "control ")',
)

#: Its own handle 0 is the timer (read-only); the ticker's handle 0 is the LED (write).
OWN_HANDLE_FOR_WRITE = attacker(
    "log resource_open resource_write",
    """
    (i32.store8 (i32.const 64) (i32.const 1))
    (local.set $n (call $write (i32.const 0) (i32.const 64) (i32.const 1)))
    (call $say_n (i32.const 16) (i32.const 6) (local.get $n))
    (i32.const 0)""",
    data='(data (i32.const 0) "timer") (data (i32.const 16) "wrote ")',
    init="(global.set $h (call $open (i32.const 0) (i32.const 5) (i32.const 1))) (i32.const 0)",
)


def gateway_caller(target: str) -> str:
    """Calls ``target`` once per tick (request "ping" at 1024, reply at 256) and logs "n=<result>"."""
    return attacker(
        "log gateway_call",
        f"""
    (local.set $n (call $gw (i32.const 0) (i32.const {len(target)})
      (i32.const 1024) (i32.const 4) (i32.const 256) (i32.const 128)))
    (call $say_n (i32.const 100) (i32.const 2) (local.get $n))
    (i32.const 0)""",
        data=f'(data (i32.const 0) "{target}") (data (i32.const 100) "n=") (data (i32.const 1024) "ping")',
    )


GATEWAY_FLOOD = attacker(
    "log gateway_call",
    """
    (local $i i32)
    (loop $again
      (if (i32.ne (call $gw (i32.const 0) (i32.const 9) (i32.const 64) (i32.const 4) (i32.const 256) (i32.const 128))
                  (i32.const 9))
        (then (unreachable)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 64))))
    (call $say_n (i32.const 100) (i32.const 6) (local.get $i))
    ;; call number 65 in this activation
    (drop (call $gw (i32.const 0) (i32.const 9) (i32.const 64) (i32.const 4) (i32.const 256) (i32.const 128)))
    (i32.const 0)""",
    data='(data (i32.const 0) "echo.echo") (data (i32.const 64) "ping") (data (i32.const 100) "calls ")',
)

OVERSIZED_REQUEST = attacker(
    "log gateway_call",
    """
    ;; 4096 bytes is the most a request may carry (echo refuses it: it cannot prefix "echo:")
    (call $say_n (i32.const 100) (i32.const 5)
      (call $gw (i32.const 0) (i32.const 9) (i32.const 1024) (i32.const 4096) (i32.const 256) (i32.const 128)))
    (drop (call $gw (i32.const 0) (i32.const 9) (i32.const 1024) (i32.const 4097) (i32.const 256) (i32.const 128)))
    (i32.const 0)""",
    data='(data (i32.const 0) "echo.echo") (data (i32.const 100) "4096=")',
)

LOG_BOMB = attacker(
    "log",
    """
    (call $log (i32.const 1) (i32.const 0) (i32.const 1024))
    (call $log (i32.const 1) (i32.const 0) (i32.const 2048))
    (i32.const 0)""",
)

SIGN_WITH_ANOTHER_KEY = attacker(
    "log key_open key_sign",
    """
    (call $say_n (i32.const 100) (i32.const 8)
      (call $key_sign (call $key_open (i32.const 0) (i32.const 12))
        (i32.const 200) (i32.const 32) (i32.const 300) (i32.const 64)))
    (drop (call $key_open (i32.const 32) (i32.const 10)))
    (i32.const 0)""",
    data="""(data (i32.const 0) "attacker-key") (data (i32.const 32) "device-2fa")
  (data (i32.const 100) "own key ") (data (i32.const 200) "transfer 1000 EUR to mallory")""",
)

RANDOM_WITHOUT_RNG = attacker(
    "log random",
    """
    (call $say_n (i32.const 100) (i32.const 7) (call $random (i32.const 200) (i32.const 32)))
    (i32.const 0)""",
    data='(data (i32.const 100) "random ")',
)

TOO_MANY_HANDLES = attacker(
    "log resource_open",
    """
    (local $i i32)
    (loop $again
      (if (i32.lt_s (call $open (i32.const 0) (i32.const 11) (i32.const 1)) (i32.const 0))
        (then (unreachable)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 64))))
    (call $say_n (i32.const 100) (i32.const 8) (local.get $i))
    (call $say_n (i32.const 120) (i32.const 10) (call $open (i32.const 0) (i32.const 11) (i32.const 1)))
    (i32.const 0)""",
    data='(data (i32.const 0) "mem.scratch") (data (i32.const 100) "handles ") (data (i32.const 120) "65th open ")',
)

#: The start function runs during instantiation, before init: it tries to grab the host UART.
START_FUNCTION_GRAB = module(
    "resource_open",
    """
  (data (i32.const 0) "uart.host")
  (func $grab (drop (call $open (i32.const 0) (i32.const 9) (i32.const 3))))
  (start $grab)
  (func (export "init") (result i32) (i32.const 0))""",
)


def start_function(body: str) -> str:
    """A module whose start function (run during instantiation, before init) is ``body``."""
    return module(
        "",
        f"""
  (func $start {body})
  (start $start)
  (func (export "init") (result i32) (i32.const 0))""",
    )


def _uart_never_opened(world: World) -> None:
    _no_handles(world)
    uart = world.peripherals["uart.host"]
    assert isinstance(uart, Uart)
    assert uart.host_receive() == b""


NON_ASCII_NAME = attacker(
    "resource_open",
    "(drop (call $open (i32.const 0) (i32.const 9) (i32.const 1))) (i32.const 0)",
    data='(data (i32.const 0) "tim\\c3\\a9r\\00\\00\\00")',
)

DIVIDE_BY_ZERO = attacker("", "(i32.div_u (i32.const 1) (i32.sub (i32.const 1) (i32.const 1)))")


def _vault() -> str:
    """Replies "SECRET-42" only when caller_id is its owner; logs the caller it saw and the id the request claims."""
    owner = ms_uuid("owner").bytes
    return gateway_callee(
        {
            "secret": """
    (drop (call $caller_id (i32.const 8000)))
    (memory.copy (i32.const 9000) (i32.const 100) (i32.const 7))
    (call $hex (i32.const 8000) (i32.const 16) (i32.const 9007))
    (memory.copy (i32.const 9039) (i32.const 110) (i32.const 9))
    (call $hex (local.get $req) (i32.const 16) (i32.const 9048))
    (call $log (i32.const 1) (i32.const 9000) (i32.const 80))
    (if (i32.and (i64.eq (i64.load (i32.const 8000)) (i64.load (i32.const 0)))
                 (i64.eq (i64.load (i32.const 8008)) (i64.load (i32.const 8))))
      (then
        (memory.copy (local.get $req) (i32.const 32) (i32.const 9))
        (return (i32.const 9))))
    (memory.copy (local.get $req) (i32.const 48) (i32.const 6))
    (i32.const 6)""",
            "admin": """
    (call $log (i32.const 1) (i32.const 130) (i32.const 14))
    (i32.const 0)""",
        },
        extra=HEX
        + f"""
  (data (i32.const 0) "{wat_bytes(owner)}")
  (data (i32.const 32) "SECRET-42") (data (i32.const 48) "DENIED")
  (data (i32.const 100) "caller=") (data (i32.const 110) " claimed=") (data (i32.const 130) "admin reached!")""",
        imports="log caller_id",
    )


FORGER = attacker(
    "log gateway_call caller_id",
    """
    ;; claims to be the owner: its UUID is the request
    (local.set $n (call $gw (i32.const 0) (i32.const 12) (i32.const 64) (i32.const 16) (i32.const 256) (i32.const 128)))
    (call $log (i32.const 1) (i32.const 256) (local.get $n))
    ;; outside a gateway operation there is no caller to read
    (call $say_n (i32.const 200) (i32.const 10) (call $caller_id (i32.const 300)))
    ;; denied: it tries the vault's admin operation, which was never granted to it
    (drop (call $gw (i32.const 32) (i32.const 11) (i32.const 64) (i32.const 16) (i32.const 256) (i32.const 128)))
    (i32.const 0)""",
    data=f"""(data (i32.const 0) "vault.secret") (data (i32.const 32) "vault.admin")
  (data (i32.const 64) "{wat_bytes(ms_uuid("owner").bytes)}") (data (i32.const 200) "caller_id ")""",
)


def _forgery_failed(world: World) -> None:
    evil, owner = ms_uuid("evil").hex, ms_uuid("owner").hex
    # The vault saw the true caller, not the UUID written into the request.
    assert world.lines("vault").count(f"caller={evil} claimed={owner}") == 3
    assert "admin reached!" not in world.lines("vault")
    assert world.lines("evil") == ["DENIED", f"caller_id {EINVAL}"] * 3
    assert set(world.lines("owner")) == {"n=9 SECRET-42"}


CALLEE_OPS: dict[str, tuple[str, str, int]] = {
    # id: (rule, op body, gateway_buffer address)
    "callee-oversized-reply": ("gateway.reply-size", "(i32.const 5000)", 1024),
    "callee-gateway-buffer-outside-memory": ("abi.bounds", "(i32.const 1)", 65000),
    "callee-traps-while-serving": ("sandbox.trap", "(unreachable)", 1024),
    "callee-loops-while-serving": ("sandbox.fuel", "(loop $forever (br $forever)) (i32.const 0)", 1024),
    "callee-opens-ungranted-resource-while-serving": (
        "policy.resource",
        "(call $open (i32.const 0) (i32.const 9) (i32.const 2))",
        1024,
    ),
}


def _callee_case(case_id: str) -> Attack:
    rule, body, buffer = CALLEE_OPS[case_id]
    evil = gateway_callee(
        {"op": body},
        extra='  (data (i32.const 0) "gpio.led0")',
        imports="resource_open",
        buffer=buffer,
    )
    return Attack(
        case_id,
        rule,
        {
            "evil": _svc(evil, 'exports = ["op"]\nfuel = 100_000\nresources = { "gpio.led0" = ["read"] }'),
            "caller": _svc(client("evil.op"), client_policy("evil.op")),
        },
        target="gpio.led0" if rule == "policy.resource" else "evil.op",
        check=_caller_got_ecallee,
    )


#: A (front) calls B (back) on every tick; B calls back into A while A is still waiting: A -> B -> A.
FRONT = module(
    "log gateway_call",
    ITOA
    + """
  (data (i32.const 0) "back.op") (data (i32.const 64) "ping") (data (i32.const 100) "re-entered!")
  (func (export "gateway_buffer") (result i32) (i32.const 1024))
  (func (export "init") (result i32) (i32.const 0))
  (func (export "op_cb") (param $req i32) (param $len i32) (result i32)
    (call $log (i32.const 1) (i32.const 100) (i32.const 11))
    (i32.const 0))
  (func (export "tick") (result i32)
    (local $n i32) (local $p i32)
    (local.set $n (call $gw (i32.const 0) (i32.const 7) (i32.const 64) (i32.const 4) (i32.const 256) (i32.const 128)))
    (i32.store16 (i32.const 512) (i32.const 0x3d6e))
    (call $log (i32.const 1) (i32.const 512) (i32.add (i32.const 2) (call $itoa (local.get $n) (i32.const 514))))
    (i32.const 0))""",
)
BACK = gateway_callee(
    {"op": "(call $gw (i32.const 0) (i32.const 8) (local.get $req) (local.get $len) (i32.const 256) (i32.const 128))"},
    extra='  (data (i32.const 0) "front.cb")',
    imports="gateway_call",
)


def _reentry_refused(world: World) -> None:
    lines = world.lines("front")
    assert "re-entered!" not in lines
    assert len(lines) == STEPS
    assert lines[0] == f"n={ECALLEE}"
    assert set(lines) == {f"n={ECALLEE}", f"n={EUNAVAILABLE}"}
    assert lines.count(f"n={ECALLEE}") == 3
    assert world.state("front") is State.RUNNING
    assert world.records_of("front") == []


def _signed_only_own_key(world: World) -> None:
    assert [key for key, _ in world.signed] == ["attacker-key"] * 3
    assert world.lines("evil") == ["own key 64"] * 3


def _log_line_refused(world: World) -> None:
    lines = world.lines("evil")
    assert [len(line) for line in lines] == [1024] * 3  # the 1 KiB line is allowed; the 2 KiB one never appears


CASES: list[Attack] = [
    # -- abi.bounds: pointers and lengths ---------------------------------------------------------
    Attack("oob-pointer-past-end", "abi.bounds", {"evil": led_writer(65536, 1)}, check=_lines_are("evil")),
    Attack("oob-pointer-straddles-end", "abi.bounds", {"evil": led_writer(65535, 2)}, check=_lines_are("evil")),
    Attack("oob-pointer-wraps-32-bits", "abi.bounds", {"evil": led_writer(-1, 2)}, check=_lines_are("evil")),
    Attack("oob-read-buffer-past-end", "abi.bounds", {"evil": _svc(TIMER_READER_OOB)}, check=_lines_are("evil")),
    Attack("huge-length", "abi.bounds", {"evil": led_writer(0, 0x7FFFFFFF)}, check=_lines_are("evil")),
    Attack("negative-length", "abi.bounds", {"evil": led_writer(0, -1)}, check=_lines_are("evil")),
    Attack(
        "length-over-max-io-inside-memory",
        "abi.bounds",
        {"evil": led_writer(0, 65537, pages=2)},
        check=_lines_are("evil"),
    ),
    # -- sandbox limits ---------------------------------------------------------------------------
    Attack("infinite-loop", "sandbox.fuel", {"evil": _svc(INFINITE_LOOP, TIMER + "\nfuel = 200_000")}),
    Attack(
        "memory-bomb",
        "sandbox.memory",
        {"evil": _svc(MEMORY_BOMB, TIMER + "\nmemory_pages = 4")},
        check=_lines_are("evil", "refused at 4"),
    ),
    Attack(
        "memory-declared-over-limit",
        "sandbox.memory",
        {"evil": _svc(attacker("", "(i32.const 0)", pages=3), TIMER + "\nmemory_pages = 2")},
    ),
    Attack(
        "deep-recursion",
        "sandbox.stack",
        {"evil": _svc(DEEP_RECURSION, TIMER + "\nstack = 65536\nfuel = 50_000_000")},
    ),
    Attack("divide-by-zero", "sandbox.trap", {"evil": _svc(DIVIDE_BY_ZERO)}),
    # -- policy.resource -------------------------------------------------------------------------
    Attack(
        "ungranted-resource",
        "policy.resource",
        {"evil": _svc(opener("gpio.led0", 2))},
        target="gpio.led0",
        check=_lines_are("evil"),
    ),
    Attack(
        "exclusive-resource-of-another",
        "policy.resource",
        {"evil": _svc(opener("spi.fingerprint", 1))},
        neighbours={"sensor": _svc(SENSOR, SENSOR_POLICY)},
        target="spi.fingerprint",
        setup=_place_finger,
        check=_never_scanned(),
    ),
    Attack(
        "open-for-write-with-read-grant",
        "policy.resource",
        {"evil": _svc(opener("mem.scratch", 3), 'resources = { timer = ["read"], "mem.scratch" = ["read"] }')},
        target="mem.scratch",
        check=_checks(_scratch_untouched, _lines_are("evil")),
    ),
    Attack(
        "write-through-read-only-handle",
        "policy.resource",
        {
            "evil": _svc(
                opener("mem.scratch", 1, WRITE_THROUGH_READ_HANDLE),
                'resources = { timer = ["read"], "mem.scratch" = ["read"] }',
            )
        },
        target="mem.scratch",
        check=_checks(_scratch_untouched, _lines_are("evil", "handle 0")),
    ),
    Attack(
        "stolen-handle-number-is-meaningless",
        "policy.resource",
        {"evil": _svc(STOLEN_HANDLES)},
        neighbours={"sensor": _svc(SENSOR, SENSOR_POLICY)},
        target="spi.fingerprint",
        setup=_place_finger,
        check=_never_scanned(f"read {EINVAL}", f"control {EINVAL}"),
    ),
    Attack(
        "own-read-only-handle-used-for-write",
        "policy.resource",
        {"evil": _svc(OWN_HANDLE_FOR_WRITE)},
        target="timer",
        check=_lines_are("evil"),
    ),
    Attack(
        "random-without-rng",
        "policy.resource",
        {"evil": _svc(RANDOM_WITHOUT_RNG, static_check=False)},  # check_module refuses it: see below
        target="rng",
        check=_lines_are("evil"),
    ),
    Attack(
        "start-function-calls-the-host",
        "sandbox.instantiate",
        {"evil": _svc(START_FUNCTION_GRAB)},
        check=_uart_never_opened,
    ),
    Attack(
        "start-function-out-of-bounds",
        "sandbox.memory-bounds",
        {"evil": _svc(start_function("(i32.store (i32.const 70000) (i32.const 1))"))},
    ),
    Attack(
        "start-function-infinite-loop",
        "sandbox.fuel",
        {"evil": _svc(start_function("(loop $forever (br $forever))"), TIMER + "\nfuel = 200_000")},
    ),
    Attack(
        "too-many-handles",
        "abi.handles",
        {"evil": _svc(TOO_MANY_HANDLES, 'resources = { timer = ["read"], "mem.scratch" = ["read"] }')},
        check=_lines_are("evil", "handles 64"),
    ),
    Attack("non-ascii-resource-name", "abi.name", {"evil": _svc(NON_ASCII_NAME)}, check=_no_handles),
    # -- identity ----------------------------------------------------------------------------------
    Attack(
        "forged-caller-identity",
        "policy.gateway",
        {"evil": _svc(FORGER, client_policy("vault.secret"))},
        neighbours={
            "vault": _svc(_vault(), 'exports = ["secret", "admin"]'),
            "owner": _svc(client("vault.secret", ms_uuid("owner").bytes), client_policy("vault.secret")),
        },
        target="vault.admin",
        check=_forgery_failed,
        not_compared=frozenset({"vault"}),  # it logs the attacker's (refused) call
    ),
    # -- gateways: the caller breaks a rule ---------------------------------------------------------
    Attack(
        "ungranted-gateway-operation",
        "policy.gateway",
        {"evil": _svc(gateway_caller("echo.admin"), client_policy("echo.echo"))},
        target="echo.admin",
        check=_checks(_echo_admin_never_ran, _lines_are("evil")),
    ),
    Attack(
        "gateway-to-unknown-microservice",
        "policy.gateway",
        {"evil": _svc(gateway_caller("kernel.root"), client_policy("echo.echo"))},
        target="kernel.root",
        check=_lines_are("evil"),
    ),
    Attack(
        "gateway-flood",
        "gateway.flood",
        {"evil": _svc(GATEWAY_FLOOD, client_policy("echo.echo"))},
        target="echo.echo",
        check=_lines_are("evil", "calls 64"),
    ),
    Attack(
        "oversized-gateway-request",
        "gateway.request-size",
        {"evil": _svc(OVERSIZED_REQUEST, client_policy("echo.echo"))},
        target="echo.echo",
        check=_lines_are("evil", f"4096={EREFUSED}"),
    ),
    # -- gateways: the callee breaks a rule while serving (charged to it; the caller gets -4) --------
    *(_callee_case(case_id) for case_id in CALLEE_OPS),
    Attack(
        "reentrant-gateway-cycle",
        "gateway.reentry",
        {
            "front": _svc(FRONT, 'resources = { timer = ["read"] }\ngateways = ["back.op"]\nexports = ["cb"]'),
            "back": _svc(BACK, 'gateways = ["front.cb"]\nexports = ["op"]'),
        },
        attacker="back",
        target="front.cb",
        check=_reentry_refused,
    ),
    # -- logs, keys, randomness -------------------------------------------------------------------
    Attack("log-line-over-1-kib", "abi.log-size", {"evil": _svc(LOG_BOMB)}, check=_log_line_refused),
    Attack(
        "sign-with-ungranted-key",
        "policy.key",
        {"evil": _svc(SIGN_WITH_ANOTHER_KEY, TIMER + '\nkeys = ["attacker-key"]')},
        target="device-2fa",
        check=_signed_only_own_key,
    ),
]


def assert_record(world: World, name: str, record: dict[str, object], rule: str) -> None:
    """A violation record that names the microservice in full and the rule broken."""
    image = world.images[name]
    assert record["rule"] == rule
    assert record["name"] == name
    assert record["ms_uuid"] == str(image.uuid)
    assert record["version"] == image.version == "1.2.3"
    assert record["measurement"] == image.measurement.hex() == hashlib.sha256(image.wasm).hexdigest()
    assert record["details"]
    assert isinstance(record["time"], float)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_attack_is_contained(case: Attack) -> None:
    neighbours: dict[str, Service | tuple[str, str]] = {**STANDARD, **case.neighbours}
    baseline = build(neighbours)
    world = build({**neighbours, **case.services})
    for w in (baseline, world):
        if case.setup is not None:
            case.setup(w)
        w.run(STEPS)

    # (1) contained (stopped, and after three faults never restarted again), and it never reached its target
    assert world.state(case.attacker) is State.QUARANTINED
    if case.check is not None:
        case.check(world)

    # (2) the right rule, charged to the attacker, in records that name it in full
    records = world.records_of(case.attacker)
    assert [r["action"] for r in records] == CRASH_LOOP
    assert [r["count"] for r in records] == [1, 2, 3, 3]
    # the first activation it gets (at 0 ms), then the first after each backoff (100 and 300 ms)
    assert [r["time"] for r in records] == pytest.approx([0.0, 0.1, 0.3, 0.3])
    for record in records[:3]:
        assert_record(world, case.attacker, record, case.rule)
        if case.target is not None:
            assert record["target"] == case.target
    assert_record(world, case.attacker, records[3], "supervisor.crash-loop")
    status = {s["name"]: s for s in world.sup.status()}[case.attacker]
    assert (status["state"], status["faults"], status["last_rule"]) == ("quarantined", 3, case.rule)

    # (3) the neighbours did exactly what they do without the attacker
    compared = [name for name in neighbours if name not in case.not_compared]
    assert world.output(compared) == baseline.output(compared)
    assert baseline.lines("ticker") == [f"tick {i}" for i in range(1, STEPS + 1)]
    assert baseline.lines("client") == ["n=9 echo:ping"] * STEPS
    assert all(world.state(name) is State.RUNNING for name in neighbours)
    assert {r["name"] for r in world.records} <= {case.attacker}


def test_at_least_fifteen_distinct_attackers() -> None:
    wats = {svc.wat for case in CASES for name, svc in case.services.items() if name == case.attacker}
    assert len(wats) >= 15


# -- crash loop --------------------------------------------------------------------------------------

CRASHER = module("", '  (func (export "init") (result i32) (unreachable))')


def _drive_crash_loop(world: World, observe: Callable[[str], None]) -> None:
    """Start, then step just before and just after each backoff expires, then a minute later."""
    world.sup.start()
    world.started = True
    observe("start")
    for backoff in (0.1, 0.2):
        world.clock.advance(backoff - 0.001)
        world.sup.step()
        observe(f"{backoff - 0.001:.3f} s later")
        world.clock.advance(0.002)
        world.sup.step()
        observe(f"{backoff:.1f} s backoff over")
    for _ in range(20):
        world.clock.advance(3.0)
        world.sup.step()
    observe("a minute later")


def test_crash_loop_is_restarted_with_backoff_then_quarantined() -> None:
    baseline = build(STANDARD)
    world = build({**STANDARD, "evil": _svc(CRASHER)})
    seen: list[tuple[str, State, list[str]]] = []

    def observe(when: str) -> None:
        seen.append((when, world.state("evil"), [r["action"] for r in world.records_of("evil")]))

    _drive_crash_loop(baseline, lambda when: None)
    _drive_crash_loop(world, observe)

    # (1) restarted only when each backoff is over, then quarantined for good
    assert seen == [
        ("start", State.RESTARTING, ["restart in 100 ms"]),
        ("0.099 s later", State.RESTARTING, ["restart in 100 ms"]),
        ("0.1 s backoff over", State.RESTARTING, ["restart in 100 ms", "restart in 200 ms"]),
        ("0.199 s later", State.RESTARTING, ["restart in 100 ms", "restart in 200 ms"]),
        ("0.2 s backoff over", State.QUARANTINED, CRASH_LOOP),
        ("a minute later", State.QUARANTINED, CRASH_LOOP),
    ]
    status = {s["name"]: s for s in world.sup.status()}["evil"]
    assert (status["state"], status["faults"], status["restarts"]) == ("quarantined", 3, 2)

    # (2) each crash is a sandbox.trap with its backtrace, then the crash-loop record
    records = world.records_of("evil")
    assert [r["rule"] for r in records] == ["sandbox.trap"] * 3 + ["supervisor.crash-loop"]
    assert [r["count"] for r in records] == [1, 2, 3, 3]
    for record in records[:3]:
        assert_record(world, "evil", record, "sandbox.trap")
        assert "unreachable" in record["details"]
        assert record["backtrace"]
    assert_record(world, "evil", records[3], "supervisor.crash-loop")
    assert [r.id for r in world.sup.records] == [1, 2, 3, 4]

    # (3) the neighbours never noticed
    assert world.output(list(STANDARD)) == baseline.output(list(STANDARD))
    assert len(world.lines("ticker")) == 22  # steps 2 ms apart share one 100 ms tick: 2 + 20


# -- refused before running ----------------------------------------------------------------------------

UNKNOWN_IMPORTS = {
    "ism-function-that-does-not-exist": (
        '(module (import "ism" "steal_key" (func (param i32) (result i32))) (memory (export "memory") 1))',
        "wasm.unknown-import",
    ),
    "wasi-escape-hatch": (
        '(module (import "wasi_snapshot_preview1" "fd_write" (func (param i32 i32 i32 i32) (result i32)))'
        ' (memory (export "memory") 1))',
        "wasm.unknown-import",
    ),
    "known-name-wrong-signature": (
        '(module (import "ism" "log" (func (param i32 i32 i32) (result i32))) (memory (export "memory") 1))',
        "wasm.import-type",
    ),
    "imported-memory": ('(module (import "ism" "memory" (memory 1)))', "wasm.import-kind"),
}


@pytest.mark.parametrize(("wat_text", "rule"), UNKNOWN_IMPORTS.values(), ids=list(UNKNOWN_IMPORTS))
def test_module_importing_what_the_host_does_not_offer_is_refused(wat_text: str, rule: str) -> None:
    code = compile_wat(wat_text)
    # (2) refused at build and install, before it could run
    with pytest.raises(FormatError) as info:
        wasm.check_imports(wasm.parse_module(code), HOST_ABI)
    assert info.value.rule == rule
    # (1) even handed straight to the supervisor it never runs: linking fails, and a record says so
    baseline = build(STANDARD)
    world = build({**STANDARD, "evil": _svc(wat_text, static_check=False)})
    baseline.run(STEPS)
    world.run(STEPS)
    records = world.records_of("evil")
    assert world.state("evil") is State.QUARANTINED
    assert [r["rule"] for r in records] == ["sandbox.instantiate"] * 3 + ["supervisor.crash-loop"]
    for record in records[:3]:
        assert_record(world, "evil", record, "sandbox.instantiate")
    # (3) the neighbours ran as usual
    assert world.output(list(STANDARD)) == baseline.output(list(STANDARD))


CAPABILITY_CASES = {
    "gateway-call-without-gateway-grant": (gateway_caller("echo.echo"), TIMER, "gateways (imports gateway_call)"),
    "random-without-rng": (RANDOM_WITHOUT_RNG, TIMER, "rng (imports random)"),
    "sign-without-keys": (SIGN_WITH_ANOTHER_KEY, TIMER, "keys (imports key_* or identity_cert)"),
    "resource-calls-without-resources": (opener("gpio.led0", 2), "", "resources (imports resource_*)"),
}


@pytest.mark.parametrize(("wat_text", "grants", "needs"), CAPABILITY_CASES.values(), ids=list(CAPABILITY_CASES))
def test_module_importing_ungranted_capability_is_refused(wat_text: str, grants: str, needs: str) -> None:
    policy = parse_policy(
        f'version = 1\nboard = "fingerprint-token"\n[microservice.evil]\nuuid = "{ms_uuid("evil")}"\n{grants}\n',
        token_board(),
    )
    parsed = wasm.parse_module(compile_wat(wat_text))
    wasm.check_imports(parsed, HOST_ABI)  # every import is a real host function...
    with pytest.raises(FormatError) as info:  # ...but the policy grants nothing it could be used for
        check_module(policy.by_name["evil"], parsed)
    assert info.value.rule == "policy.capability"
    assert needs in info.value.message


# -- a dead callee ------------------------------------------------------------------------------------


@pytest.mark.parametrize("restart", ["backoff", "stop"])
def test_call_to_dead_callee_returns_eunavailable(restart: str) -> None:
    dead = gateway_callee({"op": "(i32.const 0)"}).replace(
        '(func (export "init") (result i32) (i32.const 0))', '(func (export "init") (result i32) (unreachable))'
    )
    baseline = build(STANDARD)
    world = build(
        {
            **STANDARD,
            "dead": _svc(dead, f'exports = ["op"]\nrestart = "{restart}"'),
            "caller": _svc(client("dead.op"), client_policy("dead.op")),
        }
    )
    baseline.run(STEPS)
    world.run(STEPS)
    # (1) the callee is down for good
    expected_state, actions = {
        "backoff": (State.QUARANTINED, CRASH_LOOP),
        "stop": (State.STOPPED, ["stopped"]),
    }[restart]
    assert world.state("dead") is expected_state
    # (2) charged to the callee
    records = world.records_of("dead")
    assert [r["action"] for r in records] == actions
    for record in records:
        assert_record(world, "dead", record, record["rule"])
    assert {r["rule"] for r in records} <= {"sandbox.trap", "supervisor.crash-loop"}
    # (3) the caller got ISM_EUNAVAILABLE on every tick and kept running; the others did not notice
    assert world.lines("caller") == [f"n={EUNAVAILABLE}"] * STEPS
    assert world.state("caller") is State.RUNNING
    assert world.records_of("caller") == []
    assert world.output(list(STANDARD)) == baseline.output(list(STANDARD))


# -- regression: microservices with different stack limits -------------------------------------------


def test_microservices_with_different_stack_limits_run_side_by_side() -> None:
    """Each stack limit has its own engine; the host functions' types must not be shared between engines."""
    world = build(
        {
            "ticker": _svc(TICKER, 'resources = { timer = ["read"], "gpio.led0" = ["write"] }\nstack = 65536'),
            "echo": _svc(ECHO, 'exports = ["echo", "admin"]\nstack = 131072'),
            "client": _svc(client("echo.echo"), client_policy("echo.echo")),
        }
    )
    world.run(3)
    assert world.lines("ticker") == ["tick 1", "tick 2", "tick 3"]
    assert world.lines("client") == ["n=9 echo:ping"] * 3
    assert world.records == []


# -- the reference device ------------------------------------------------------------------------------

TOKEN_SERVICES = ("biometric", "authenticator", "link", "analytics")
OTHER_FINGER = bytes(b ^ 0xFF for b in OWNER_FINGER)


def test_fingerprint_token_two_factor_flow_survives_misbehaving_analytics(tmp_path: Path) -> None:
    storage_dir = tmp_path
    board = token_board()
    policy = parse_policy((TOKEN / "policy.toml").read_text(), board, "policy.toml")
    clock = FakeClock()
    peripherals = make_peripherals(board, clock)
    images = []
    for name in TOKEN_SERVICES:
        code = compile_wat((TOKEN / name / f"{name}.wat").read_text())
        parsed = wasm.parse_module(code)
        wasm.check_imports(parsed, HOST_ABI)
        check_module(policy.by_name[name], parsed)
        images.append(
            Image(policy.by_name[name].uuid, name, "1.0.0", hashlib.sha256(code).digest(), b"\x01" * 32, code)
        )
    records: list[dict[str, object]] = []

    def sink(record: dict[str, object]) -> int:
        records.append(record)
        return len(records)

    signed: list[tuple[str, bytes]] = []
    calls, crypto = device_services(signed, storage_dir)
    sup = Supervisor(
        images,
        policy.by_uuid,
        peripherals,
        record=sink,
        services=calls,
        clock=clock,
        wall=clock,
    )
    uart, sensor, led = peripherals["uart.host"], peripherals["spi.fingerprint"], peripherals["gpio.led0"]
    assert isinstance(uart, Uart)
    assert isinstance(sensor, Fingerprint)
    assert isinstance(led, Led)
    sup.start()

    def exchange(frame: bytes) -> bytes:
        uart.host_send(frame)
        sup.step()
        clock.advance(TICK)
        return uart.host_receive()

    def signs(challenge: bytes) -> None:
        reply = exchange(b"C" + challenge)
        assert reply[:2] == b"\x43\x00"
        assert len(reply) == 66
        r, s = int.from_bytes(reply[2:34], "big"), int.from_bytes(reply[34:], "big")
        public = load_der_public_key(crypto.public_key(str(policy.by_name["authenticator"].uuid), "device-2fa"))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        public.verify(encode_dss_signature(r, s), challenge, ec.ECDSA(hashes.SHA256()))
        assert led.state == 1

    sensor.place(OWNER_FINGER)
    assert exchange(b"E") == b"\x45\x00"
    first = os.urandom(32)
    signs(first)
    # analytics faults on every tick it gets: restarted after 100 and 200 ms, then quarantined
    for _ in range(6):
        sup.step()
        clock.advance(TICK)
    assert sup.by_name["analytics"].state is State.QUARANTINED
    analytics = [r for r in records if r["name"] == "analytics"]
    assert [r["action"] for r in analytics] == CRASH_LOOP
    assert [r["rule"] for r in analytics] == ["policy.resource"] * 3 + ["supervisor.crash-loop"]
    assert {r["target"] for r in analytics[:3]} == {"spi.fingerprint"}
    assert all(r["ms_uuid"] == str(policy.by_name["analytics"].uuid) and r["measurement"] for r in analytics)
    assert [text for who, _, text in sup.logs if who == "analytics"] == ["analytics: collecting usage"] * 3

    # the 2FA flow still works with analytics quarantined; another finger is refused
    second = os.urandom(32)
    signs(second)
    sensor.place(OTHER_FINGER)
    assert exchange(b"C" + os.urandom(32)) == b"\x43\x01"
    assert led.state == 0
    assert signed == [("device-2fa", first), ("device-2fa", second)]
    # only biometric ever scanned: one enrolment and three verifications
    assert sensor.scans == 4
    assert {r["name"] for r in records} == {"analytics"}
    assert all(sup.by_name[name].state is State.RUNNING for name in ("biometric", "authenticator", "link"))
