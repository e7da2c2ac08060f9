"""Simulated peripherals for the virtual device, with realistic behaviour.

Owns: the :class:`Peripheral` protocol the hypervisor talks to, and one
simulator per peripheral kind of :data:`ism.formats.board.PERIPHERALS`:

* ``fingerprint`` — a sensor. The host places a finger (64 bytes of ridge
  features); each ``read`` returns one 64-byte scan of it with a few random
  bit flips (sensor noise), or nothing when no finger is present.
  ``control(1)`` returns 1 when a finger is present.
* ``led`` — records every state written, with its time; ``read`` returns the state.
* ``uart`` — a byte pipe to a host endpoint: host → device bytes are read by
  the owner, device → host bytes are collected for the host.
* ``timer`` — ``read`` returns monotonic milliseconds (8 bytes, little endian);
  ``control(1, period_ms)`` sets the tick period the supervisor uses.
* ``rng`` — the OS CSPRNG.
* ``memory`` — a fixed-size region; ``control(1, offset)`` sets the position of
  the next read or write.

Must not import: device, hypervisor or anything above.

Threat: none of its own — the hypervisor enforces the policy before any call
reaches a peripheral — but every length is still bounded here so a simulator
can never be asked for an unbounded allocation.
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Final, Protocol

from ism.formats.board import Board, Resource

__all__ = [
    "FINGER_BYTES",
    "EAGAIN",
    "EINVAL",
    "Fingerprint",
    "Led",
    "Memory",
    "Peripheral",
    "Rng",
    "Timer",
    "Uart",
    "make_peripherals",
]

EINVAL: Final = -1
EAGAIN: Final = -5
FINGER_BYTES: Final = 64
NOISE_BITS: Final = 6
UART_BUFFER: Final = 64 * 1024


class Peripheral(Protocol):
    """What the hypervisor needs from a peripheral. Lengths are already bounded by it."""

    def read(self, cap: int) -> bytes | int: ...

    def write(self, data: bytes) -> int: ...

    def control(self, op: int, arg: bytes) -> int: ...

    def pending(self) -> bool: ...


class Fingerprint:
    """A fingerprint sensor that returns noisy scans of the finger placed on it."""

    def __init__(self, noise_bits: int = NOISE_BITS) -> None:
        self._finger: bytes | None = None
        self.noise_bits = noise_bits
        self.scans = 0

    def place(self, finger: bytes) -> None:
        if len(finger) != FINGER_BYTES:
            raise ValueError(f"a finger is {FINGER_BYTES} bytes of features")
        self._finger = bytes(finger)

    def remove(self) -> None:
        self._finger = None

    def read(self, cap: int) -> bytes | int:
        if self._finger is None:
            return EAGAIN
        if cap < FINGER_BYTES:
            return EINVAL
        scan = bytearray(self._finger)
        for _ in range(self.noise_bits):
            bit = secrets.randbelow(FINGER_BYTES * 8)
            scan[bit // 8] ^= 1 << (bit % 8)
        self.scans += 1
        return bytes(scan)

    def write(self, data: bytes) -> int:
        return EINVAL

    def control(self, op: int, arg: bytes) -> int:
        if op == 1:
            return int(self._finger is not None)
        return EINVAL

    def pending(self) -> bool:
        return False


class Led:
    """An LED that remembers every state it was set to."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.state = 0
        self.history: list[tuple[float, int]] = []
        self._clock = clock

    def read(self, cap: int) -> bytes | int:
        return bytes([self.state]) if cap >= 1 else EINVAL

    def write(self, data: bytes) -> int:
        if not data:
            return EINVAL
        self.state = 1 if data[-1] else 0
        self.history.append((self._clock(), self.state))
        del self.history[:-1024]
        return len(data)

    def control(self, op: int, arg: bytes) -> int:
        return EINVAL

    def pending(self) -> bool:
        return False


class Uart:
    """A UART whose far end is a host: bytes in both directions, bounded buffers."""

    def __init__(self) -> None:
        self._rx: deque[bytes] = deque()
        self._rx_len = 0
        self._tx = bytearray()
        self._lock = threading.Lock()

    # host side
    def host_send(self, data: bytes) -> None:
        with self._lock:
            if self._rx_len + len(data) > UART_BUFFER:
                raise BufferError("uart receive buffer full")
            self._rx.append(bytes(data))
            self._rx_len += len(data)

    def host_receive(self) -> bytes:
        with self._lock:
            out = bytes(self._tx)
            self._tx.clear()
            return out

    # device side
    def read(self, cap: int) -> bytes | int:
        with self._lock:
            if not self._rx:
                return EAGAIN
            chunk = self._rx[0]
            if len(chunk) <= cap:
                self._rx.popleft()
            else:
                self._rx[0] = chunk[cap:]
                chunk = chunk[:cap]
            self._rx_len -= len(chunk)
            return chunk

    def write(self, data: bytes) -> int:
        with self._lock:
            room = UART_BUFFER - len(self._tx)
            if room <= 0:
                return EAGAIN
            self._tx += data[:room]
            return min(len(data), room)

    def control(self, op: int, arg: bytes) -> int:
        if op == 1:  # bytes waiting
            with self._lock:
                return self._rx_len
        return EINVAL

    def pending(self) -> bool:
        return bool(self._rx)


class Timer:
    """Monotonic time and the tick period."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, period_ms: int = 100) -> None:
        self._clock = clock
        self._start = clock()
        self.period_ms = period_ms

    def read(self, cap: int) -> bytes | int:
        if cap < 8:
            return EINVAL
        return int((self._clock() - self._start) * 1000).to_bytes(8, "little")

    def write(self, data: bytes) -> int:
        return EINVAL

    def control(self, op: int, arg: bytes) -> int:
        if op == 1 and len(arg) == 4:
            period = int.from_bytes(arg, "little")
            if 1 <= period <= 3_600_000:
                self.period_ms = period
                return 0
        return EINVAL

    def pending(self) -> bool:
        return False


class Rng:
    """The OS CSPRNG."""

    def read(self, cap: int) -> bytes | int:
        return os.urandom(cap)

    def write(self, data: bytes) -> int:
        return EINVAL

    def control(self, op: int, arg: bytes) -> int:
        return EINVAL

    def pending(self) -> bool:
        return False


class Memory:
    """A fixed-size memory region with a cursor."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.pos = 0

    def read(self, cap: int) -> bytes | int:
        out = bytes(self.data[self.pos : self.pos + cap])
        self.pos += len(out)
        return out

    def write(self, data: bytes) -> int:
        n = min(len(data), len(self.data) - self.pos)
        self.data[self.pos : self.pos + n] = data[:n]
        self.pos += n
        return n

    def control(self, op: int, arg: bytes) -> int:
        if op == 1 and len(arg) == 4:
            offset = int.from_bytes(arg, "little")
            if offset <= len(self.data):
                self.pos = offset
                return 0
        return EINVAL

    def pending(self) -> bool:
        return False


def _make(resource: Resource, clock: Callable[[], float]) -> Peripheral:
    kind = resource.peripheral
    if kind == "fingerprint":
        return Fingerprint()
    if kind == "led":
        return Led(clock)
    if kind == "uart":
        return Uart()
    if kind == "timer":
        return Timer(clock)
    if kind == "rng":
        return Rng()
    return Memory(resource.size)


def make_peripherals(board: Board, clock: Callable[[], float] = time.monotonic) -> Mapping[str, Peripheral]:
    """One simulated peripheral per logical resource of ``board``."""
    return {name: _make(res, clock) for name, res in board.resources.items()}
