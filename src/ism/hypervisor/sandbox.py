"""One wasmtime Store and instance per microservice, with its limits and a fast call path.

Owns: compiling modules, instantiating a microservice with its host imports
under the limits of its policy (memory pages, fuel per activation, wasm stack
size), bounds-checked access to its linear memory, calling its exports, and
turning every way an activation can fail into a :class:`Fault` that names the
rule broken.
Must not import: services, agent, store, cli.

Threat: a microservice that tries to escape or starve the device — reading
or writing outside its memory through a host call, looping forever, growing
memory without bound, recursing until the stack overflows, or trapping. Each
microservice has its own Store (no shared instance state); every activation
runs with a fresh fuel budget; memory is capped by a store limit; host
calls see guest pointers only through :meth:`Sandbox.read` /
:meth:`Sandbox.write`, which refuse any span outside the guest's memory.

Backtraces: a trap carries the guest's frames (``Trap.frames``). A Python
exception a host function raises (a :class:`Violation`) is turned by
wasmtime-py's trampoline into a trap of its own making; wasmtime hands it back
from the call as an *error* whose wasm trace is the guest's stack at that host
call, and wasmtime-py then re-raises the original exception and drops the
error. The calls here (:class:`_FastCall`, instantiation) read that trace
before re-raising and attach it to the exception (:func:`guest_backtrace`), so
a record of a host-raised violation names the guest functions that made the
call, as one of a trap does. Only a failed call pays for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, NoReturn

import wasmtime
from wasmtime import _ffi as ffi  # the fast call path below uses wasmtime-py's C bindings
from wasmtime._func import maybe_raise_last_exn
from wasmtime._trap import FrameList

from ism.errors import IsmError, Violation
from ism.formats.abi import MAX_IO

__all__ = ["Fault", "Sandbox", "compile_module", "engine_for", "guest_backtrace", "wasm_page"]

WASM_PAGE: Final = 65536
MAX_BACKTRACE: Final = 8
EPOCH_MS: Final = 10
MAX_CACHED_MODULES: Final = 256
_ENGINES: dict[int, wasmtime.Engine] = {}
_MODULES: dict[tuple[int, bytes], wasmtime.Module] = {}


def wasm_page() -> int:
    return WASM_PAGE


class _EpochClock:
    """Advances the epoch of every engine every ``EPOCH_MS``: the wall-clock deadline of activations.

    Fuel bounds the instructions a guest executes, but not the time it spends in
    host calls (a loop of cheap host calls burns little fuel). The epoch deadline
    bounds wall-clock time per activation whatever the guest does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="ism-epoch", daemon=True)
                self._thread.start()

    @staticmethod
    def _run() -> None:
        while True:
            time.sleep(EPOCH_MS / 1000)
            for engine in list(_ENGINES.values()):
                engine.increment_epoch()


_EPOCHS: Final = _EpochClock()


def engine_for(stack: int) -> wasmtime.Engine:
    """A fuel- and epoch-metered engine with the given wasm stack limit (shared per limit)."""
    engine = _ENGINES.get(stack)
    if engine is None:
        cfg = wasmtime.Config()
        cfg.consume_fuel = True
        cfg.epoch_interruption = True
        cfg.max_wasm_stack = stack
        cfg.cranelift_opt_level = "speed"
        engine = _ENGINES[stack] = wasmtime.Engine(cfg)
    _EPOCHS.ensure_running()
    return engine


def compile_module(engine: wasmtime.Engine, wasm: bytes) -> wasmtime.Module:
    """Compiles ``wasm`` once per engine (the cache is keyed by the SHA-256 of the bytes themselves)."""
    key = (id(engine), hashlib.sha256(wasm).digest())
    module = _MODULES.get(key)
    if module is None:
        module = wasmtime.Module(engine, wasm)
        if len(_MODULES) >= MAX_CACHED_MODULES:
            _MODULES.pop(next(iter(_MODULES)))
        _MODULES[key] = module
    return module


@dataclass(frozen=True, slots=True)
class Fault:
    """Why an activation failed, for the violation record."""

    rule: str
    message: str
    target: str | None = None
    backtrace: tuple[str, ...] = field(default_factory=tuple)


_TRAP_RULES: Final = {
    wasmtime.TrapCode.OUT_OF_FUEL: ("sandbox.fuel", "CPU budget (fuel) exhausted"),
    wasmtime.TrapCode.INTERRUPT: ("sandbox.deadline", "wall-clock deadline of the activation passed"),
    wasmtime.TrapCode.STACK_OVERFLOW: ("sandbox.stack", "wasm stack overflow"),
    wasmtime.TrapCode.MEMORY_OUT_OF_BOUNDS: ("sandbox.memory-bounds", "out-of-bounds memory access"),
    wasmtime.TrapCode.UNREACHABLE: ("sandbox.trap", "unreachable executed"),
    wasmtime.TrapCode.INTEGER_DIVISION_BY_ZERO: ("sandbox.trap", "integer division by zero"),
    wasmtime.TrapCode.INTEGER_OVERFLOW: ("sandbox.trap", "integer overflow"),
    wasmtime.TrapCode.INDIRECT_CALL_TO_NULL: ("sandbox.trap", "indirect call to null"),
    wasmtime.TrapCode.BAD_SIGNATURE: ("sandbox.trap", "indirect call with a bad signature"),
    wasmtime.TrapCode.TABLE_OUT_OF_BOUNDS: ("sandbox.trap", "table access out of bounds"),
}


def _backtrace(frames: Sequence[wasmtime.Frame]) -> tuple[str, ...]:
    """``name@0xoffset`` (``func[index]@0xoffset`` without a name) per frame, innermost first, at most MAX_BACKTRACE."""
    out = []
    for frame in frames[:MAX_BACKTRACE]:
        name = frame.func_name or f"func[{frame.func_index}]"
        out.append(f"{name}@0x{frame.module_offset:x}")
    return tuple(out)


def _error_frames(error: wasmtime.WasmtimeError) -> list[wasmtime.Frame]:
    """The wasm frames of an error, as ``Trap.frames`` reads a trap's (wasmtime-py has no such property for errors)."""
    frames = FrameList(error)
    ffi.wasmtime_error_wasm_trace(error.ptr(), ctypes.byref(frames.vec))
    return [wasmtime.Frame._from_ptr(frames.vec.data[i], frames) for i in range(min(frames.vec.size, MAX_BACKTRACE))]


#: the attribute under which an exception raised in a host call keeps the guest's backtrace at that call
_GUEST_BACKTRACE: Final = "ism_guest_backtrace"


def guest_backtrace(exc: BaseException) -> tuple[str, ...]:
    """The guest's backtrace at the host call that raised ``exc`` (innermost first); () if none is known."""
    backtrace = getattr(exc, _GUEST_BACKTRACE, ())
    return backtrace if isinstance(backtrace, tuple) else ()


def _with_backtrace(exc: BaseException, backtrace: tuple[str, ...]) -> BaseException:
    """``exc``, carrying ``backtrace`` (left without it if its class refuses new attributes)."""
    with contextlib.suppress(AttributeError):  # e.g. a frozen dataclass: the exception itself matters more
        setattr(exc, _GUEST_BACKTRACE, backtrace)
    return exc


def _raise_failure(error: Any, trap: Any) -> NoReturn:
    """Raises why a call into wasm failed (``error`` or ``trap``, the out-values of the C call).

    A Python exception a host function raised during the call is re-raised as wasmtime-py does,
    with the guest's backtrace at that host call attached (the error's, or the trap's, frames);
    otherwise the trap, or the error.
    """
    failure: wasmtime.Trap | wasmtime.WasmtimeError = (
        wasmtime.WasmtimeError._from_ptr(error) if error else wasmtime.Trap._from_ptr(trap)
    )
    try:
        maybe_raise_last_exn()
    except BaseException as exn:
        frames = failure.frames if isinstance(failure, wasmtime.Trap) else _error_frames(failure)
        _with_backtrace(exn, _backtrace(frames))
        raise
    raise failure


class _FastCall:
    """Calls an i32-only export without wasmtime-py's per-call type conversion (about 6x faster)."""

    __slots__ = ("_buf", "_ctx", "_func", "_n", "_store")

    def __init__(self, store: wasmtime.Store, func: wasmtime.Func, n_slots: int) -> None:
        self._store = store
        self._ctx = store._context()
        self._func = ctypes.byref(func._func)
        self._buf = (ffi.wasmtime_val_raw_t * max(n_slots, 1))()
        self._n = max(n_slots, 1)

    def __call__(self, *args: int) -> int:
        buf = self._buf
        for i, a in enumerate(args):
            buf[i].i32 = a
        # wasmtime-py's enter_wasm() inlined (its context manager costs ~1 us per activation):
        # a trap, or a Python exception a host function raised (a Violation), propagates as there,
        # the latter with the guest's backtrace at the host call (see _raise_failure).
        trap = ctypes.POINTER(ffi.wasm_trap_t)()
        error = ffi.wasmtime_func_call_unchecked(self._ctx, self._func, buf, self._n, ctypes.byref(trap))
        if error or trap:
            _raise_failure(error, trap)
        return int(buf[0].i32)


def _instantiate(linker: wasmtime.Linker, store: wasmtime.Store, module: wasmtime.Module) -> wasmtime.Instance:
    """``linker.instantiate(store, module)``, failing as :class:`_FastCall` does (a host call's backtrace kept)."""
    trap = ctypes.POINTER(ffi.wasm_trap_t)()
    instance = ffi.wasmtime_instance_t()
    error = ffi.wasmtime_linker_instantiate(
        linker.ptr(), store._context(), module.ptr(), ctypes.byref(instance), ctypes.byref(trap)
    )
    if error or trap:
        _raise_failure(error, trap)
    return wasmtime.Instance._from_raw(instance)


HostFactory = Callable[["Sandbox"], dict[str, tuple[wasmtime.FuncType, Callable[..., Any]]]]


class Sandbox:
    """A live instance of one microservice.

    Args:
        module: the compiled module.
        engine: the engine it was compiled with.
        memory_pages: the most linear memory the guest may have.
        fuel: the CPU budget of one activation.
        host: builds the host functions (``ism`` imports) bound to this sandbox.

    Raises:
        Violation: ``sandbox.instantiate`` / ``sandbox.memory`` / ``sandbox.no-memory``.
    """

    def __init__(
        self,
        module: wasmtime.Module,
        engine: wasmtime.Engine,
        memory_pages: int,
        fuel: int,
        host: HostFactory,
        deadline_ms: int = 1000,
    ) -> None:
        self.fuel = fuel
        self.deadline = max(1, -(-deadline_ms // EPOCH_MS))
        self.memory_limit = memory_pages * WASM_PAGE
        self.store = wasmtime.Store(engine)
        self.store.set_limits(memory_size=self.memory_limit, instances=1, tables=4, memories=1, table_elements=100_000)
        linker = wasmtime.Linker(engine)
        for name, (ftype, func) in host(self).items():
            linker.define_func("ism", name, ftype, func)
        self.store.set_fuel(fuel)
        self.store.set_epoch_deadline(self.deadline)
        try:
            self.instance = _instantiate(linker, self.store, module)
        except wasmtime.Trap as trap:
            fault = self.fault_from(trap)
            start_up = Violation(fault.rule, f"start-up trapped: {fault.message}")
            raise _with_backtrace(start_up, fault.backtrace) from None
        except wasmtime.WasmtimeError as exc:
            text = str(exc).splitlines()[0] if str(exc) else "instantiation failed"
            rule = "sandbox.memory" if "memory" in text and "limit" in text.lower() else "sandbox.instantiate"
            raise Violation(rule, text[:200]) from None
        except AttributeError as exc:
            # A host call from the module's start function: the sandbox cannot reach guest memory
            # until instantiation has finished, so the call fails; it is the module's fault.
            early = Violation("sandbox.instantiate", "the start function called the host before init")
            raise _with_backtrace(early, guest_backtrace(exc)) from None
        exports = self.instance.exports(self.store)
        memory = exports.get("memory")
        if not isinstance(memory, wasmtime.Memory):
            raise Violation("sandbox.no-memory", "the module does not export its memory as 'memory'")
        self.memory = memory
        # Resolved once: every host call checks guest memory, and wasmtime-py's Memory methods
        # re-resolve the store context and the memory handle on each call. Both stay valid while
        # this sandbox holds the store and the memory.
        self._ctx = self.store._context()
        self._mem = ctypes.byref(memory._memory)
        self._exports = exports
        self._fast: dict[str, _FastCall] = {}
        self._pages_at_start = memory.size(self.store)

    # -- exports ----------------------------------------------------------------------------------

    def has(self, name: str) -> bool:
        return isinstance(self._exports.get(name), wasmtime.Func)

    def call(self, name: str, *args: int) -> int:
        """One activation: a fresh fuel budget, then the export. Traps propagate as wasmtime.Trap."""
        fast = self._fast.get(name)
        if fast is None:
            func = self._exports.get(name)
            if not isinstance(func, wasmtime.Func):
                raise Violation("sandbox.missing-export", f"export {name} is missing")
            ftype = func.type(self.store)
            i32 = wasmtime.ValType.i32()
            if any(p != i32 for p in ftype.params) or [str(r) for r in ftype.results] != ["i32"]:
                raise Violation("sandbox.export-type", f"export {name} must take and return i32 values")
            fast = self._fast[name] = _FastCall(self.store, func, max(len(ftype.params), 1))
        self.store.set_fuel(self.fuel)
        self.store.set_epoch_deadline(self.deadline)
        self._pages_at_start = ffi.wasmtime_memory_size(self._ctx, self._mem)
        return fast(*args)

    def fault_from(self, exc: BaseException) -> Fault:
        """Classifies an exception raised out of an activation."""
        if isinstance(exc, IsmError):
            return Fault(exc.rule, exc.message, exc.subject, guest_backtrace(exc))
        if isinstance(exc, wasmtime.Trap):
            rule, message = _TRAP_RULES.get(exc.trap_code, ("sandbox.trap", "trap"))  # type: ignore[arg-type]
            if rule == "sandbox.memory-bounds" and self._memory_exhausted():
                rule, message = "sandbox.memory", "memory limit reached, then accessed beyond it"
            return Fault(rule, f"{message} ({exc.trap_code})", None, _backtrace(exc.frames or []))
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return Fault("sandbox.trap", text[:200], None, guest_backtrace(exc))

    def _memory_exhausted(self) -> bool:
        try:
            return self.memory.data_len(self.store) >= self.memory_limit > self._pages_at_start * WASM_PAGE
        except (wasmtime.WasmtimeError, AttributeError):  # AttributeError: trapped in the start function
            return False

    # -- guest memory -----------------------------------------------------------------------------

    def _check(self, ptr: int, n: int, what: str) -> int:
        """The span's offset (``ptr`` as unsigned) once the span is known to lie inside guest memory."""
        ptr &= 0xFFFFFFFF
        n &= 0xFFFFFFFF
        size = ffi.wasmtime_memory_data_size(self._ctx, self._mem)
        if n > MAX_IO or ptr + n > size:
            raise Violation("abi.bounds", f"{what}: span [{ptr}, {ptr + n}) outside guest memory of {size} bytes")
        return ptr

    def _base(self, ptr: int, n: int, what: str) -> int:
        offset = self._check(ptr, n, what)
        return ctypes.addressof(ffi.wasmtime_memory_data(self._ctx, self._mem).contents) + offset

    def read(self, ptr: int, n: int, what: str = "buffer") -> bytes:
        """Copies ``n`` bytes out of guest memory; a span outside it is a violation."""
        if n == 0:
            self._check(ptr, 0, what)
            return b""
        return ctypes.string_at(self._base(ptr, n, what), n & 0xFFFFFFFF)

    def write(self, ptr: int, data: bytes, what: str = "buffer") -> None:
        """Copies ``data`` into guest memory; a span outside it is a violation."""
        base = self._base(ptr, len(data), what)
        if data:
            ctypes.memmove(base, data, len(data))

    def check_span(self, ptr: int, n: int, what: str = "buffer") -> None:
        """Refuses a span outside guest memory without touching it."""
        self._check(ptr, n, what)

    def close(self) -> None:
        self._fast.clear()
