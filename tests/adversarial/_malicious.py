"""Helpers for the adversarial sandbox suite: a fake clock, a world builder and WAT building blocks.

A *world* is a :class:`~ism.hypervisor.supervisor.Supervisor` built directly
(no device directory) on the fingerprint-token board, with the board's
simulated peripherals, a policy assembled from per-microservice TOML snippets,
modules compiled from WAT, every module checked statically as the runtime does
(``check_imports`` + ``check_module``), an in-memory violation sink, a real
P-256 signing hook and a fake monotonic clock that only moves when a test
advances it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import wasmtime
from cryptography.hazmat.primitives.asymmetric import ec

from ism.boards.virtual import Peripheral, make_peripherals
from ism.crypto.keystore.software import MemoryKeyFiles, SoftwareKeyStore
from ism.formats import wasm
from ism.formats.abi import HOST_ABI
from ism.formats.board import Board, parse_board
from ism.formats.policy import Policy, check_module, parse_policy
from ism.hypervisor.supervisor import Image, State, Supervisor
from ism.services.crypto import CryptoService

TOKEN = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
TICK = 0.1  # the timer's default period (100 ms)
NAMESPACE = uuidlib.UUID("5a0d1c3e-6b1f-4f52-9a51-2f3c7e0b9d11")

EINVAL, EUNAVAILABLE, ETOOBIG, ECALLEE, EREFUSED = -1, -2, -3, -4, -7


class FakeClock:
    """Monotonic seconds that move only when :meth:`advance` is called."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def ms_uuid(name: str) -> uuidlib.UUID:
    """The (deterministic) UUID of a test microservice."""
    return uuidlib.uuid5(NAMESPACE, name)


def wat_bytes(data: bytes) -> str:
    """``data`` as the body of a WAT string literal."""
    return "".join(f"\\{b:02x}" for b in data)


@functools.cache
def compile_wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


@functools.cache
def token_board() -> Board:
    return parse_board((TOKEN / "board.toml").read_text(), "board.toml")


# -- WAT building blocks ------------------------------------------------------------------------

IMPORTS: Mapping[str, str] = {
    "log": '(import "ism" "log" (func $log (param i32 i32 i32)))',
    "resource_open": '(import "ism" "resource_open" (func $open (param i32 i32 i32) (result i32)))',
    "resource_read": '(import "ism" "resource_read" (func $read (param i32 i32 i32) (result i32)))',
    "resource_write": '(import "ism" "resource_write" (func $write (param i32 i32 i32) (result i32)))',
    "resource_control": ('(import "ism" "resource_control" (func $control (param i32 i32 i32 i32) (result i32)))'),
    "gateway_call": ('(import "ism" "gateway_call" (func $gw (param i32 i32 i32 i32 i32 i32) (result i32)))'),
    "caller_id": '(import "ism" "caller_id" (func $caller_id (param i32) (result i32)))',
    "self_id": '(import "ism" "self_id" (func $self_id (param i32) (result i32)))',
    "random": '(import "ism" "random" (func $random (param i32 i32) (result i32)))',
    "time_ms": '(import "ism" "time_ms" (func $time_ms (result i64)))',
    "key_open": '(import "ism" "key_open" (func $key_open (param i32 i32) (result i32)))',
    "key_sign": '(import "ism" "key_sign" (func $key_sign (param i32 i32 i32 i32 i32) (result i32)))',
}


def _import(name: str) -> str:
    ftype = HOST_ABI[("ism", name)]
    params = f" (param {' '.join(ftype.params)})" if ftype.params else ""
    results = f" (result {' '.join(ftype.results)})" if ftype.results else ""
    return f'(import "ism" "{name}" (func ${name}{params}{results}))'


#: every other host function under its own name ($key_encrypt, $storage_get, ...)
IMPORTS = {**{name: _import(name) for (_, name) in HOST_ABI}, **IMPORTS}

#: $itoa(value, dst) -> length: the signed decimal of value at dst.
ITOA = """
  (func $itoa (param $v i32) (param $dst i32) (result i32)
    (local $p i32) (local $u i32) (local $lo i32) (local $hi i32) (local $t i32)
    (local.set $p (local.get $dst))
    (local.set $u (local.get $v))
    (if (i32.lt_s (local.get $v) (i32.const 0))
      (then
        (i32.store8 (local.get $p) (i32.const 45))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (local.set $u (i32.sub (i32.const 0) (local.get $v)))))
    (local.set $lo (local.get $p))
    (loop $digit
      (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $u) (i32.const 10))))
      (local.set $p (i32.add (local.get $p) (i32.const 1)))
      (local.set $u (i32.div_u (local.get $u) (i32.const 10)))
      (br_if $digit (local.get $u)))
    (local.set $hi (i32.sub (local.get $p) (i32.const 1)))
    (block $done
      (loop $swap
        (br_if $done (i32.ge_u (local.get $lo) (local.get $hi)))
        (local.set $t (i32.load8_u (local.get $lo)))
        (i32.store8 (local.get $lo) (i32.load8_u (local.get $hi)))
        (i32.store8 (local.get $hi) (local.get $t))
        (local.set $lo (i32.add (local.get $lo) (i32.const 1)))
        (local.set $hi (i32.sub (local.get $hi) (i32.const 1)))
        (br $swap)))
    (i32.sub (local.get $p) (local.get $dst)))
"""

#: $hex(src, n, dst): n bytes at src as 2n lower-case hex digits at dst (uses a table at 60000).
HEX = """
  (data (i32.const 60000) "0123456789abcdef")
  (func $hex (param $src i32) (param $n i32) (param $dst i32)
    (local $i i32) (local $b i32)
    (loop $byte
      (local.set $b (i32.load8_u (i32.add (local.get $src) (local.get $i))))
      (i32.store8 (i32.add (local.get $dst) (i32.shl (local.get $i) (i32.const 1)))
        (i32.load8_u (i32.add (i32.const 60000) (i32.shr_u (local.get $b) (i32.const 4)))))
      (i32.store8 (i32.add (local.get $dst) (i32.add (i32.shl (local.get $i) (i32.const 1)) (i32.const 1)))
        (i32.load8_u (i32.add (i32.const 60000) (i32.and (local.get $b) (i32.const 15)))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $byte (i32.lt_u (local.get $i) (local.get $n)))))
"""

#: $say(ptr, len): logs a line at level 1.
SAY = """
  (func $say (param $p i32) (param $n i32) (call $log (i32.const 1) (local.get $p) (local.get $n)))
"""

#: $say_n(prefix_ptr, prefix_len, value): logs prefix + decimal(value) (built at 40000).
SAY_N = """
  (func $say_n (param $p i32) (param $n i32) (param $v i32)
    (memory.copy (i32.const 40000) (local.get $p) (local.get $n))
    (call $log (i32.const 1) (i32.const 40000)
      (i32.add (local.get $n) (call $itoa (local.get $v) (i32.add (i32.const 40000) (local.get $n))))))
"""


def module(imports: str, body: str, pages: int = 1) -> str:
    """A WAT module importing the named host functions (space separated), with ``pages`` of memory."""
    header = "\n  ".join(IMPORTS[name] for name in imports.split())
    return f'(module\n  {header}\n  (memory (export "memory") {pages})\n{body}\n)'


def gateway_callee(ops: Mapping[str, str], extra: str = "", imports: str = "", buffer: int = 1024) -> str:
    """A callee exporting ``op_<name>`` for every entry of ``ops`` (the body of ``(param $req) (param $len)``)."""
    funcs = "\n".join(
        f'  (func (export "op_{op}") (param $req i32) (param $len i32) (result i32)\n{body})'
        for op, body in ops.items()
    )
    return module(
        imports,
        f"""
  (func (export "gateway_buffer") (result i32) (i32.const {buffer}))
  (func (export "init") (result i32) (i32.const 0))
{extra}
{funcs}""",
    )


# -- well-behaved neighbours ----------------------------------------------------------------------

#: On every tick: counter += 1, LED := counter & 1, log "tick N".
TICKER = module(
    "log resource_open resource_write",
    ITOA
    + """
  (data (i32.const 0) "gpio.led0")
  (data (i32.const 16) "tick ")
  (global $led (mut i32) (i32.const -1))
  (global $n (mut i32) (i32.const 0))
  (func (export "init") (result i32)
    (global.set $led (call $open (i32.const 0) (i32.const 9) (i32.const 2)))
    (if (result i32) (i32.lt_s (global.get $led) (i32.const 0))
      (then (global.get $led)) (else (i32.const 0))))
  (func (export "tick") (result i32)
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.store8 (i32.const 64) (i32.and (global.get $n) (i32.const 1)))
    (drop (call $write (global.get $led) (i32.const 64) (i32.const 1)))
    (call $log (i32.const 1) (i32.const 16)
      (i32.add (i32.const 5) (call $itoa (global.get $n) (i32.const 21))))
    (i32.const 0))
""",
)
TICKER_POLICY = 'resources = { timer = ["read"], "gpio.led0" = ["write"] }'

#: Gateway callee: echo.echo replies "echo:" + request; echo.admin must never run for an attacker.
ECHO = gateway_callee(
    {
        "echo": """
    (if (i32.gt_u (local.get $len) (i32.const 4091)) (then (return (i32.const -1))))
    (memory.copy (i32.add (local.get $req) (i32.const 5)) (local.get $req) (local.get $len))
    (i32.store (local.get $req) (i32.const 0x6f686365))
    (i32.store8 (i32.add (local.get $req) (i32.const 4)) (i32.const 58))
    (i32.add (local.get $len) (i32.const 5))""",
        "admin": """
    (call $log (i32.const 1) (i32.const 0) (i32.const 14))
    (i32.const 0)""",
    },
    extra='  (data (i32.const 0) "admin reached!")',
    imports="log",
)
ECHO_POLICY = 'exports = ["echo", "admin"]'


def client(target: str, request: bytes = b"ping") -> str:
    """On every tick: calls ``target`` with ``request`` and logs "n=<result> <reply>"."""
    return module(
        "log gateway_call",
        ITOA
        + f"""
  (data (i32.const 0) "{target}")
  (data (i32.const 64) "{wat_bytes(request)}")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32)
    (local $n i32) (local $p i32)
    (local.set $n (call $gw (i32.const 0) (i32.const {len(target)})
      (i32.const 64) (i32.const {len(request)}) (i32.const 256) (i32.const 128)))
    (i32.store16 (i32.const 512) (i32.const 0x3d6e))
    (local.set $p (i32.add (i32.const 514) (call $itoa (local.get $n) (i32.const 514))))
    (if (i32.gt_s (local.get $n) (i32.const 0))
      (then
        (i32.store8 (local.get $p) (i32.const 32))
        (memory.copy (i32.add (local.get $p) (i32.const 1)) (i32.const 256) (local.get $n))
        (local.set $p (i32.add (local.get $p) (i32.add (local.get $n) (i32.const 1))))))
    (call $log (i32.const 1) (i32.const 512) (i32.sub (local.get $p) (i32.const 512)))
    (i32.const 0))
""",
    )


def client_policy(*targets: str) -> str:
    return 'resources = { timer = ["read"] }\ngateways = [' + ", ".join(f'"{t}"' for t in targets) + "]"


#: Owns the sensor exclusively; on every tick logs "finger N" (N = 1 when a finger is present).
SENSOR = module(
    "log resource_open resource_control",
    ITOA
    + SAY_N
    + """
  (data (i32.const 0) "spi.fingerprint")
  (data (i32.const 16) "finger ")
  (global $h (mut i32) (i32.const -1))
  (func (export "init") (result i32)
    (global.set $h (call $open (i32.const 0) (i32.const 15) (i32.const 5)))
    (if (result i32) (i32.lt_s (global.get $h) (i32.const 0))
      (then (global.get $h)) (else (i32.const 0))))
  (func (export "tick") (result i32)
    (call $say_n (i32.const 16) (i32.const 7)
      (call $control (global.get $h) (i32.const 1) (i32.const 0) (i32.const 0)))
    (i32.const 0))
""",
)
SENSOR_POLICY = 'resources = { "spi.fingerprint" = ["read", "control"], timer = ["read"] }'

#: The standard neighbours every attack runs next to.
STANDARD: dict[str, tuple[str, str]] = {
    "ticker": (TICKER, TICKER_POLICY),
    "echo": (ECHO, ECHO_POLICY),
    "client": (client("echo.echo"), client_policy("echo.echo")),
}


# -- the world ------------------------------------------------------------------------------------


@dataclass
class Service:
    """One microservice of a world: its WAT, its policy body, and whether the static check applies."""

    wat: str
    policy: str
    static_check: bool = True


@dataclass
class World:
    sup: Supervisor
    clock: FakeClock
    policy: Policy
    peripherals: Mapping[str, Peripheral]
    images: dict[str, Image]
    records: list[dict[str, Any]] = field(default_factory=list)
    logs: list[tuple[str, int, str]] = field(default_factory=list)
    signed: list[tuple[str, bytes]] = field(default_factory=list)
    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    started: bool = False

    def run(self, steps: int, period: float = TICK) -> None:
        """Starts the supervisor (once) and runs ``steps`` passes, advancing the clock by ``period``."""
        if not self.started:
            self.sup.start()
            self.started = True
        for _ in range(steps):
            self.sup.step()
            self.clock.advance(period)

    def state(self, name: str) -> State:
        return self.sup.by_name[name].state

    def lines(self, name: str) -> list[str]:
        return [text for who, _, text in self.logs if who == name]

    def records_of(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["name"] == name]

    def output(self, names: list[str]) -> dict[str, Any]:
        """What the named microservices did that anyone could observe."""
        led = self.peripherals["gpio.led0"]
        return {
            "logs": [entry for entry in self.logs if entry[0] in names],
            "led": list(led.history),  # type: ignore[attr-defined]
            "states": {n: self.state(n) for n in names},
            "records": [r for r in self.records if r["name"] in names],
        }


class RecordingKeyStore(SoftwareKeyStore):
    """A real software key store that also records what it signed: (key name, message)."""

    def __init__(self, log: list[tuple[str, bytes]]) -> None:
        super().__init__(MemoryKeyFiles(), os.urandom(32))
        self.log = log

    def sign(self, key_id: str, message: bytes) -> bytes:
        self.log.append((key_id.rsplit(".", 1)[-1], message))
        return super().sign(key_id, message)


def device_services(
    log: list[tuple[str, bytes]], storage_dir: Path | None = None
) -> tuple[dict[str, Any], CryptoService]:
    """The device services a world runs with: the real crypto service over a recording key store,
    and (given a directory) the real secure storage."""
    keystore = RecordingKeyStore(log)
    crypto = CryptoService(keystore)
    calls: dict[str, Any] = dict(crypto.calls())
    if storage_dir is not None:
        from ism.services.storage import SecureStorage
        from ism.services.storage_host import StorageService

        keystore.generate("device.storage", "aes-256")
        storage = SecureStorage(
            storage_dir / "storage.sqlite",
            storage_dir / "storage-root.cose",
            keystore,
            "device.storage",
            os.urandom(32),
        )
        calls.update(StorageService(storage).calls())
    return calls, crypto


def policy_text(services: Mapping[str, Service]) -> str:
    parts = ['version = 1\nboard = "fingerprint-token"\n']
    for name, svc in services.items():
        parts.append(f'[microservice.{name}]\nuuid = "{ms_uuid(name)}"\n{svc.policy}\n')
    return "\n".join(parts)


def build(services: Mapping[str, Service | tuple[str, str]]) -> World:
    """A supervisor running ``services`` (name -> Service or (wat, policy body)) on the token board."""
    specs = {n: s if isinstance(s, Service) else Service(*s) for n, s in services.items()}
    clock = FakeClock()
    board = token_board()
    policy = parse_policy(policy_text(specs), board, "test-policy.toml")
    peripherals = make_peripherals(board, clock)
    images: dict[str, Image] = {}
    for name, svc in specs.items():
        code = compile_wat(svc.wat)
        parsed = wasm.parse_module(code)
        if svc.static_check:  # what the runtime does before handing a module to the supervisor
            wasm.check_imports(parsed, HOST_ABI)
            check_module(policy.by_name[name], parsed)
        images[name] = Image(ms_uuid(name), name, "1.2.3", hashlib.sha256(code).digest(), b"\x5a" * 32, code)
    records: list[dict[str, Any]] = []
    logs: list[tuple[str, int, str]] = []
    signed: list[tuple[str, bytes]] = []
    keys: dict[str, ec.EllipticCurvePrivateKey] = {}

    def sink(record: dict[str, Any]) -> int:
        records.append(record)
        return len(records)

    sup = Supervisor(
        images.values(),
        policy.by_uuid,
        peripherals,
        record=sink,
        services=device_services(signed)[0],
        clock=clock,
        wall=clock,
        on_log=lambda name, level, text: logs.append((name, level, text)),
    )
    return World(sup, clock, policy, peripherals, images, records, logs, signed, keys)
