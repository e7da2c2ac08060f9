"""The host ABI (import module ``ism``): every call checked against the caller's policy.

Owns: the implementation of each host function of :data:`ism.formats.abi.HOST_ABI`
for one microservice, bound to its sandbox. The caller's identity is the
microservice the functions were built for: no argument can claim another.
Must not import: services, agent, store, cli.

The services layer adds its host functions (crypto, storage, identity)
through :attr:`Supervisor.services`; they are bound here the same way.

Threat: a microservice reaching a resource, key or gateway it was not
granted, passing pointers outside its memory, or forging handles. Policy
lookups are O(1) (dictionary and bit mask); handles are indices into a
per-microservice table, so another microservice's handle means nothing here;
every span is checked by the sandbox. A denial is a :class:`Violation`
(the caller stops), never an error code it could probe with; its record
carries the guest's backtrace at the host call (attached by the sandbox).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import wasmtime

from ism.boards.virtual import Peripheral
from ism.errors import Violation
from ism.formats.abi import ERRORS, HOST_ABI, MODULE
from ism.formats.board import MODE_BITS

if TYPE_CHECKING:
    from ism.hypervisor.sandbox import Sandbox
    from ism.hypervisor.supervisor import Microservice, Supervisor

__all__ = ["Handle", "host_functions", "wasm_functype"]

READ, WRITE, CONTROL = MODE_BITS["read"], MODE_BITS["write"], MODE_BITS["control"]
EINVAL = ERRORS["ISM_EINVAL"]
MAX_NAME: Final = 64
MAX_LOG: Final = 1024
MAX_HANDLES: Final = 64


@dataclass(slots=True)
class Handle:
    """An open logical resource of one microservice."""

    name: str
    mode: int
    peripheral: Peripheral


_VALTYPES: Final = {"i32": wasmtime.ValType.i32, "i64": wasmtime.ValType.i64}


def wasm_functype(name: str) -> wasmtime.FuncType:
    ft = HOST_ABI[(MODULE, name)]
    return wasmtime.FuncType([_VALTYPES[p]() for p in ft.params], [_VALTYPES[r]() for r in ft.results])


def _text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        raise Violation("abi.name", f"{what} is not ASCII") from None


def _bind(call: Callable[..., int], ms: Microservice, sb: Sandbox) -> Callable[..., int]:
    """A service's host function, bound to the calling microservice and its sandbox."""

    def bound(*args: int) -> int:
        return call(ms, sb, *args)

    return bound


def host_functions(
    sup: Supervisor, ms: Microservice
) -> Callable[[Sandbox], dict[str, tuple[wasmtime.FuncType, Callable[..., Any]]]]:
    """Builds the factory the sandbox uses to define this microservice's imports."""
    policy = ms.policy

    def factory(sb: Sandbox) -> dict[str, tuple[wasmtime.FuncType, Callable[..., Any]]]:
        handles = ms.handles

        def log(level: int, ptr: int, n: int) -> None:
            if n & 0xFFFFFFFF > MAX_LOG:
                raise Violation("abi.log-size", f"log line longer than {MAX_LOG} bytes")
            text = sb.read(ptr, n, "log line").decode("utf-8", "replace")
            if ms.log_budget <= 0:
                ms.log_dropped += 1
                return
            ms.log_budget -= 1
            sup.log(ms, level, text)

        def resource_open(name_ptr: int, name_len: int, mode: int) -> int:
            if name_len & 0xFFFFFFFF > MAX_NAME:
                raise Violation("abi.bounds", "resource name longer than 64 bytes")
            name = _text(sb.read(name_ptr, name_len, "resource name"), "resource name")
            if mode <= 0 or mode & ~(READ | WRITE | CONTROL):
                return EINVAL
            if not policy.allows(name, mode):
                raise Violation("policy.resource", f"{name} is not granted with mode {mode}", subject=name)
            peripheral = sup.peripherals.get(name)
            if peripheral is None:
                return EINVAL
            if len(handles) >= MAX_HANDLES:
                raise Violation("abi.handles", f"more than {MAX_HANDLES} open handles")
            handle = len(handles)
            handles.append(Handle(name, mode, peripheral))
            return handle

        def _handle(h: int, bit: int, what: str) -> Handle | None:
            if not 0 <= h < len(handles):
                return None
            entry = handles[h]
            if not entry.mode & bit:
                raise Violation("policy.resource", f"{entry.name} was not opened for {what}", subject=entry.name)
            return entry

        def resource_read(h: int, ptr: int, cap: int) -> int:
            entry = _handle(h, READ, "read")
            if entry is None:
                return EINVAL
            sb.check_span(ptr, cap, "read buffer")
            data = entry.peripheral.read(cap & 0xFFFFFFFF)
            if isinstance(data, int):
                return data
            sb.write(ptr, data[: cap & 0xFFFFFFFF], "read buffer")
            return min(len(data), cap & 0xFFFFFFFF)

        def resource_write(h: int, ptr: int, n: int) -> int:
            entry = _handle(h, WRITE, "write")
            if entry is None:
                return EINVAL
            return entry.peripheral.write(sb.read(ptr, n, "write buffer"))

        def resource_control(h: int, op: int, ptr: int, n: int) -> int:
            entry = _handle(h, CONTROL, "control")
            if entry is None:
                return EINVAL
            return entry.peripheral.control(op, sb.read(ptr, n, "control argument"))

        def gateway_call(tp: int, tl: int, rp: int, rl: int, op: int, oc: int) -> int:
            return sup.gateway(ms, sb, tp, tl, rp, rl, op, oc)

        def caller_id(ptr: int) -> int:
            if not ms.callers:
                return EINVAL
            sb.write(ptr, ms.callers[-1].bytes, "caller id buffer")
            return 0

        def self_id(ptr: int) -> int:
            sb.write(ptr, ms.uuid.bytes, "id buffer")
            return 0

        def random(ptr: int, n: int) -> int:
            if not policy.allows("rng", READ):
                raise Violation("policy.resource", "rng is not granted", subject="rng")
            sb.check_span(ptr, n, "random buffer")
            sb.write(ptr, os.urandom(n & 0xFFFFFFFF), "random buffer")
            return 0

        def time_ms() -> int:
            return int((sup.clock() - sup.started) * 1000)

        funcs: dict[str, Callable[..., Any]] = {
            "log": log,
            "resource_open": resource_open,
            "resource_read": resource_read,
            "resource_write": resource_write,
            "resource_control": resource_control,
            "gateway_call": gateway_call,
            "caller_id": caller_id,
            "self_id": self_id,
            "random": random,
            "time_ms": time_ms,
        }
        for name, call in sup.services.items():
            funcs[name] = _bind(call, ms, sb)
        types = sup.functypes(ms.engine)
        # Only what the module imports: fewer definitions, faster start (imports were checked at install).
        return {name: (types[name], fn) for name, fn in funcs.items() if name in ms.imports}

    return factory
