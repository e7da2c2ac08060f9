"""The supervisor: starts microservices, delivers events and ticks, runs gateways, contains faults.

Owns: the lifecycle state of every running microservice, gateway calls
between them, the restart policy (restart with exponential backoff,
quarantine after too many faults in a window, or stop), and writing a
violation record for every fault.
Must not import: services, agent, store, cli.

Threat: one faulty or malicious microservice taking others down — by
trapping, exhausting CPU or memory, calling gateways it was not granted,
flooding a callee, re-entering a caller (A→B→A), answering with an oversized
reply, or crash-looping. A fault stops only the microservice charged with it
(the callee when it misbehaves while serving, the caller when the call itself
breaks a rule); a caller whose callee faults or is unavailable gets an error
code it can handle; a crash loop ends in quarantine.
"""

from __future__ import annotations

import enum
import time
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import wasmtime

from ism.boards.virtual import Peripheral, Timer
from ism.errors import IsmError, UsageError, Violation
from ism.formats.abi import (
    ERRORS,
    EVENT_EXPORT,
    GATEWAY_BUFFER_EXPORT,
    GATEWAY_MAX,
    HOST_ABI,
    INIT_EXPORT,
    TICK_EXPORT,
)
from ism.formats.board import MODE_BITS
from ism.formats.policy import GATEWAY_EXPORT_PREFIX, MicroservicePolicy
from ism.hypervisor.host import Handle, host_functions, wasm_functype
from ism.hypervisor.sandbox import Fault, Sandbox, compile_module, engine_for, guest_backtrace
from ism.hypervisor.violations import ViolationRecord

__all__ = ["Image", "Microservice", "State", "Supervisor"]

EUNAVAILABLE, ECALLEE, EREFUSED, ETOOBIG = (
    ERRORS["ISM_EUNAVAILABLE"],
    ERRORS["ISM_ECALLEE"],
    ERRORS["ISM_EREFUSED"],
    ERRORS["ISM_ETOOBIG"],
)
#: gateway calls one microservice may make during a single activation
MAX_GATEWAY_CALLS: Final = 64
MAX_TARGET: Final = 64
MAX_LOG_LINES: Final = 1000
MAX_LOG_LINES_PER_MS: Final = 200
#: log lines one activation may emit; the rest are counted and reported as dropped
MAX_LOG_PER_ACTIVATION: Final = 32


class State(enum.StrEnum):
    RUNNING = "running"
    RESTARTING = "restarting"
    STOPPED = "stopped"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class Image:
    """What boot accepted for one microservice: identity, measurement and code."""

    uuid: uuidlib.UUID
    name: str
    version: str
    measurement: bytes
    signer: bytes
    wasm: bytes


@dataclass(eq=False)
class Microservice:
    """Runtime record of one microservice."""

    image: Image
    policy: MicroservicePolicy
    module: wasmtime.Module
    engine: wasmtime.Engine
    state: State = State.STOPPED
    sandbox: Sandbox | None = None
    handles: list[Handle] = field(default_factory=list)
    callers: list[uuidlib.UUID] = field(default_factory=list)
    faults: deque[float] = field(default_factory=deque)
    fault_total: int = 0
    restarts: int = 0
    restart_at: float = 0.0
    active: bool = False
    gateway_calls: int = 0
    gateway_buffer: int | None = None
    last_rule: str | None = None
    imports: frozenset[str] = frozenset()
    #: per-start state of the services (e.g. crypto handles); cleared on every (re)start
    scratch: dict[str, Any] = field(default_factory=dict)
    logs: deque[tuple[int, str]] = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES_PER_MS))
    log_budget: int = 0
    log_dropped: int = 0

    @property
    def uuid(self) -> uuidlib.UUID:
        return self.image.uuid

    @property
    def name(self) -> str:
        return self.image.name


class Supervisor:
    """Runs a set of booted microservices under a compiled policy.

    Args:
        images: the microservices boot accepted.
        policies: the compiled policy entry of each (by UUID); others do not run.
        peripherals: the board's peripherals by logical resource name.
        record: durable sink for violation records (returns the record id).
        services: extra host functions by ABI name (crypto, storage, identity), each called as
            ``call(microservice, sandbox, *args)``.
        clock: monotonic seconds (injectable for tests).
        wall: wall-clock seconds for records.
        on_log: receives (microservice name, level, text) for every log line.
    """

    def __init__(
        self,
        images: Iterable[Image],
        policies: Mapping[uuidlib.UUID, MicroservicePolicy],
        peripherals: Mapping[str, Peripheral],
        record: Callable[[dict[str, Any]], int],
        services: Mapping[str, Callable[..., int]] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        on_log: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self.peripherals = peripherals
        self._sink = record
        self.services = dict(services or {})
        self.clock = clock
        self.wall = wall
        self.on_log = on_log
        self.started = clock()
        # wasmtime ties a FuncType to the engine it is first used with (and aborts the process when
        # it is used with another); microservices with different stack limits run on different
        # engines, so the host functions' types are kept per engine.
        self._functypes: dict[wasmtime.Engine, dict[str, wasmtime.FuncType]] = {}
        self.logs: deque[tuple[str, int, str]] = deque(maxlen=MAX_LOG_LINES)
        self.records: list[ViolationRecord] = []
        self.microservices: dict[uuidlib.UUID, Microservice] = {}
        self.by_name: dict[str, Microservice] = {}
        self.unmanaged: list[Image] = []
        for image in images:
            policy = policies.get(image.uuid)
            if policy is None:
                self.unmanaged.append(image)
            else:
                self._admit(image, policy)
        timer = peripherals.get("timer")
        self._timer = timer if isinstance(timer, Timer) else None
        self._next_tick = 0.0

    def _admit(self, image: Image, policy: MicroservicePolicy) -> Microservice | None:
        """Compiles ``image`` for ``policy`` (its stack size picks the engine) and manages it (not started)."""
        engine = engine_for(policy.stack)
        try:
            module = compile_module(engine, image.wasm)
        except wasmtime.WasmtimeError as exc:
            self.record(image, "sandbox.compile", str(exc).splitlines()[0][:200], 1, "not started")
            return None
        imports = frozenset(imp.name for imp in module.imports if imp.module == "ism" and imp.name)
        ms = Microservice(image, policy, module, engine, imports=imports)
        self.microservices[image.uuid] = ms
        self.by_name[policy.name] = ms
        return ms

    def functypes(self, engine: wasmtime.Engine) -> dict[str, wasmtime.FuncType]:
        """The types of the host functions, for microservices running on ``engine``."""
        types = self._functypes.get(engine)
        if types is None:
            types = self._functypes[engine] = {name: wasm_functype(name) for (_, name) in HOST_ABI}
        return types

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        """Starts every managed microservice; a microservice that faults at start is handled alone."""
        now = self.clock()
        self._next_tick = now
        for ms in self.microservices.values():
            self._start(ms)

    def _start(self, ms: Microservice) -> None:
        ms.handles.clear()
        ms.callers.clear()
        ms.scratch.clear()
        ms.gateway_buffer = None
        try:
            ms.sandbox = Sandbox(
                ms.module,
                ms.engine,
                ms.policy.memory_pages,
                ms.policy.fuel,
                host_functions(self, ms),
                ms.policy.deadline_ms,
            )
        except Violation as exc:
            ms.sandbox = None
            self._fault(ms, Fault(exc.rule, exc.message, exc.subject, guest_backtrace(exc)))
            return
        ms.state = State.RUNNING
        if ms.sandbox.has(INIT_EXPORT):
            result = self._activate(ms, INIT_EXPORT)
            if result is not None and result < 0 and ms.state is State.RUNNING:
                self._fault(ms, Fault("sandbox.init", f"init returned {result}"))

    def _activate(self, ms: Microservice, export: str, *args: int) -> int | None:
        """One top-level activation. Returns the export's result, or None if it faulted."""
        sb = ms.sandbox
        if sb is None or ms.state is not State.RUNNING:
            return None
        ms.gateway_calls = 0
        ms.log_budget, ms.log_dropped = MAX_LOG_PER_ACTIVATION, 0
        ms.active = True
        try:
            return sb.call(export, *args)
        except (IsmError, wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            self._fault(ms, sb.fault_from(exc))
            return None
        finally:
            ms.active = False
            self._report_dropped(ms)

    def _fault(self, ms: Microservice, fault: Fault) -> None:
        now = self.clock()
        restart = ms.policy.restart
        ms.faults.append(now)
        while ms.faults and ms.faults[0] < now - restart.window:
            ms.faults.popleft()
        ms.fault_total += 1
        ms.last_rule = fault.rule
        count = len(ms.faults)
        if ms.sandbox is not None:
            ms.sandbox.close()
        ms.sandbox = None
        ms.handles.clear()
        if restart.policy == "stop":
            ms.state, action = State.STOPPED, "stopped"
        elif count >= restart.max_faults:
            ms.state, action = State.QUARANTINED, "quarantined"
        else:
            delay_ms = min(restart.backoff_ms * 2 ** (count - 1), restart.max_backoff_ms)
            ms.state, ms.restart_at = State.RESTARTING, now + delay_ms / 1000
            action = f"restart in {delay_ms} ms"
        self.record(ms.image, fault.rule, fault.message, count, action, fault.target, fault.backtrace)
        if ms.state is State.QUARANTINED:
            self.record(
                ms.image,
                "supervisor.crash-loop",
                f"{count} faults within {restart.window:g} s; quarantined until an authorised 'release' command",
                count,
                "quarantined",
            )

    def record(
        self,
        image: Image,
        rule: str,
        details: str,
        count: int,
        action: str,
        target: str | None = None,
        backtrace: tuple[str, ...] = (),
    ) -> None:
        record = ViolationRecord(
            ms_uuid=str(image.uuid),
            name=image.name,
            version=image.version,
            measurement=image.measurement.hex(),
            rule=rule,
            details=details,
            time=self.wall(),
            count=count,
            action=action,
            target=target,
            backtrace=backtrace,
        )
        rid = self._sink(record.to_json())
        self.records.append(ViolationRecord(**{**record.to_json(), "backtrace": record.backtrace, "id": rid}))

    def release(self, name: str) -> None:
        """Operator action: lets a quarantined or stopped microservice start again."""
        ms = self.by_name[name]
        if ms.state in (State.QUARANTINED, State.STOPPED):
            ms.faults.clear()
            self._start(ms)

    def hold(self, name: str, quarantine: bool = False) -> None:
        """Stops a microservice from outside, between two steps (its lifecycle changed): stopped or quarantined.

        Raises:
            UsageError: ``supervisor.busy`` if called while a microservice is running.
        """
        if any(ms.active for ms in self.microservices.values()):
            raise UsageError("supervisor.busy", "a microservice can be held only between steps")
        ms = self.by_name[name]
        if ms.sandbox is not None:
            ms.sandbox.close()
        ms.sandbox = None
        ms.handles.clear()
        ms.state = State.QUARANTINED if quarantine else State.STOPPED

    def admit(self, image: Image, policy: MicroservicePolicy) -> bool:
        """Manages and starts a microservice that was not running (e.g. resumed on a running device).

        Returns:
            False if it is already managed, or does not compile (a record says why).
        """
        if image.uuid in self.microservices or policy.name in self.by_name:
            return False
        ms = self._admit(image, policy)
        if ms is None:
            return False
        self._start(ms)
        return True

    def apply_policy(self, policies: Mapping[uuidlib.UUID, MicroservicePolicy]) -> dict[str, list[str]]:
        """Swaps in a new policy between two steps: no activation ever runs under half of it.

        First, with nothing running, every entry is replaced: a microservice whose
        entry changed loses its sandbox and open handles, one no longer named is
        dropped (a ``policy.not-named`` record says so). Only then do activations
        resume: the changed ones that were running or restarting start again,
        and newly named ones start, all under the new rules. A microservice whose
        entry did not change keeps running, undisturbed; a quarantined or stopped
        one stays so (an operator releases it, under the new rules).

        Returns:
            Names by outcome: ``restarted``, ``stopped``, ``started``, ``unchanged``.

        Raises:
            UsageError: ``supervisor.busy`` if called while a microservice is running.
        """
        if any(ms.active for ms in self.microservices.values()):
            raise UsageError("supervisor.busy", "a policy can be swapped only between steps")
        outcome: dict[str, list[str]] = {"restarted": [], "stopped": [], "started": [], "unchanged": []}
        changed: list[Microservice] = []
        for ms in list(self.microservices.values()):
            new = policies.get(ms.uuid)
            if new == ms.policy:
                outcome["unchanged"].append(ms.name)
                continue
            if ms.sandbox is not None:
                ms.sandbox.close()
            ms.sandbox = None
            ms.handles.clear()
            if new is None:
                ms.state = State.STOPPED
                del self.microservices[ms.uuid]
                self.unmanaged.append(ms.image)
                self.record(ms.image, "policy.not-named", "the new access policy does not name it", 1, "stopped")
                outcome["stopped"].append(ms.name)
                continue
            if new.stack != ms.policy.stack:  # the stack limit is a property of the engine
                ms.engine = engine_for(new.stack)
                ms.module = compile_module(ms.engine, ms.image.wasm)
            ms.policy = new
            if ms.state in (State.RUNNING, State.RESTARTING):
                changed.append(ms)
        admitted = []
        for image in list(self.unmanaged):
            entry = policies.get(image.uuid)
            if entry is not None:
                self.unmanaged.remove(image)
                admitted_ms = self._admit(image, entry)
                if admitted_ms is not None:
                    admitted.append(admitted_ms)
        self.by_name = {ms.policy.name: ms for ms in self.microservices.values()}
        for ms in changed:
            ms.faults.clear()
            self._start(ms)
            outcome["restarted"].append(ms.name)
        for ms in admitted:
            self._start(ms)
            outcome["started"].append(ms.name)
        return outcome

    def stop(self) -> None:
        for ms in self.microservices.values():
            if ms.sandbox is not None:
                ms.sandbox.close()
            ms.sandbox = None
            ms.state = State.STOPPED

    # -- the loop ---------------------------------------------------------------------------------

    def step(self) -> None:
        """One pass: restarts that are due, peripheral events, then timer ticks."""
        now = self.clock()
        for ms in self.microservices.values():
            if ms.state is State.RESTARTING and now >= ms.restart_at:
                ms.restarts += 1
                self._start(ms)
        for ms in self.microservices.values():
            if ms.state is not State.RUNNING or ms.sandbox is None or not ms.sandbox.has(EVENT_EXPORT):
                continue
            for index, handle in enumerate(list(ms.handles)):
                if handle.mode & MODE_BITS["read"] and handle.peripheral.pending():
                    result = self._activate(ms, EVENT_EXPORT, index)
                    if result is not None and result < 0 and ms.state is State.RUNNING:
                        self._fault(ms, Fault("sandbox.event", f"event returned {result}"))
                    if ms.state is not State.RUNNING:
                        break
        period = (self._timer.period_ms if self._timer else 100) / 1000
        if now >= self._next_tick:
            self._next_tick = now + period
            for ms in self.microservices.values():
                if (
                    ms.state is State.RUNNING
                    and ms.sandbox is not None
                    and "timer" in ms.policy.resources
                    and ms.sandbox.has(TICK_EXPORT)
                ):
                    self._activate(ms, TICK_EXPORT)

    def run(self, seconds: float, until: Callable[[], bool] | None = None, idle: float = 0.005) -> None:
        """Runs the loop for ``seconds`` (or until ``until()`` is true)."""
        end = self.clock() + seconds
        while self.clock() < end:
            self.step()
            if until is not None and until():
                return
            time.sleep(idle)

    # -- gateways ---------------------------------------------------------------------------------

    def gateway(self, caller: Microservice, csb: Sandbox, tp: int, tl: int, rp: int, rl: int, op: int, oc: int) -> int:
        """A gateway call from ``caller``; see docs/ABI.md for the rules."""
        if tl & 0xFFFFFFFF > MAX_TARGET:
            raise Violation("abi.bounds", "gateway target longer than 64 bytes")
        try:
            target = csb.read(tp, tl, "gateway target").decode("ascii")
        except UnicodeDecodeError:
            raise Violation("abi.name", "gateway target is not ASCII") from None
        callee_name, _, operation = target.partition(".")
        if (callee_name, operation) not in caller.policy.gateways:
            raise Violation("policy.gateway", f"gateway {target} is not granted", subject=target)
        if rl & 0xFFFFFFFF > GATEWAY_MAX:
            raise Violation(
                "gateway.request-size", f"request of {rl & 0xFFFFFFFF} bytes exceeds {GATEWAY_MAX}", subject=target
            )
        caller.gateway_calls += 1
        if caller.gateway_calls > MAX_GATEWAY_CALLS:
            raise Violation(
                "gateway.flood", f"more than {MAX_GATEWAY_CALLS} gateway calls in one activation", subject=target
            )
        request = csb.read(rp, rl, "gateway request")
        csb.check_span(op, oc, "gateway reply buffer")
        callee = self.by_name.get(callee_name)
        if callee is None or callee.state is not State.RUNNING or callee.sandbox is None:
            return EUNAVAILABLE
        if callee.active:
            raise Violation(
                "gateway.reentry",
                f"{target} would re-enter {callee_name}, which is already serving or calling",
                subject=target,
            )
        sb = callee.sandbox
        callee.active = True
        callee.callers.append(caller.uuid)
        saved_calls, callee.gateway_calls = callee.gateway_calls, 0
        callee.log_budget, callee.log_dropped = MAX_LOG_PER_ACTIVATION, 0
        try:
            if callee.gateway_buffer is None:
                callee.gateway_buffer = sb.call(GATEWAY_BUFFER_EXPORT)
            buf = callee.gateway_buffer
            sb.check_span(buf, GATEWAY_MAX, "gateway buffer")
            sb.write(buf, request, "gateway buffer")
            n = sb.call(GATEWAY_EXPORT_PREFIX + operation, buf, len(request))
            reply = b""
            if n >= 0:
                if n > GATEWAY_MAX:
                    raise Violation("gateway.reply-size", f"reply of {n} bytes exceeds {GATEWAY_MAX}", subject=target)
                reply = sb.read(buf, n, "gateway reply")
        except (IsmError, wasmtime.Trap, wasmtime.WasmtimeError) as exc:
            fault = sb.fault_from(exc)
            callee.active = False
            self._fault(
                callee,
                Fault(
                    fault.rule,
                    f"while serving {caller.name} -> {target}: {fault.message}",
                    fault.target or target,
                    fault.backtrace,
                ),
            )
            return ECALLEE
        finally:
            callee.active = False
            if callee.callers:
                callee.callers.pop()
            callee.gateway_calls = saved_calls
            self._report_dropped(callee)
        if n < 0:
            return EREFUSED
        if n > oc & 0xFFFFFFFF:
            return ETOOBIG
        csb.write(op, reply, "gateway reply buffer")
        return n

    # -- logging ----------------------------------------------------------------------------------

    def _report_dropped(self, ms: Microservice) -> None:
        if ms.log_dropped:
            dropped, ms.log_dropped = ms.log_dropped, 0
            self.log(ms, 2, f"[{dropped} log line(s) dropped: more than {MAX_LOG_PER_ACTIVATION} in one activation]")

    def log(self, ms: Microservice, level: int, text: str) -> None:
        ms.logs.append((level, text))
        self.logs.append((ms.name, level, text))
        if self.on_log is not None:
            self.on_log(ms.name, level, text)

    def status(self) -> list[dict[str, Any]]:
        return [
            {
                "name": ms.name,
                "uuid": str(ms.uuid),
                "version": ms.image.version,
                "state": str(ms.state),
                "faults": ms.fault_total,
                "restarts": ms.restarts,
                "last_rule": ms.last_rule,
            }
            for ms in self.microservices.values()
        ]
