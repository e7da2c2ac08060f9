"""The per-microservice security lifecycle, persisted on the device.

Owns: each microservice's lifecycle state — ``installed``, ``active``,
``suspended``, ``quarantined``, ``removed``, ``banned`` — the legal
transitions between them (:data:`TRANSITIONS`, :func:`next_state`), the
state file ``DIR/state/microservices.cose`` (:class:`MicroserviceStates`),
applying a signed ``microservice`` command (:func:`apply_command`:
authorise, transition, erase, consume) and finishing a removal that a power
cut interrupted (:meth:`MicroserviceStates.roll_forward`). Secure boot asks
:meth:`MicroserviceStates.boot_refusal` and :meth:`MicroserviceStates.hold`
which microservices it must not start; install asks
:meth:`MicroserviceStates.check_install`. Erasing storage and keys is the
runtime's (services are above this layer): callers pass an eraser.
Must not import: hypervisor, services, runtime, cli.

Threat: a microservice the vendor suspended, the supervisor quarantined or
the store banned running again — after a reboot (the state is persisted),
by an offline edit of the state file (it is a COSE_Mac0 under the device
state key), by deleting it or putting back an older copy from before the
restriction (every write that restricts a microservice raises the
``ms-lifecycle`` anti-rollback counter to the file's generation; a file
below the counter, or missing while the counter is set, is refused), by
putting a removed or banned package back on flash (boot refuses a package
in a removed or banned slot), or by reinstalling a banned UUID (install
refuses it). Also: one developer's key taking over another developer's microservice —
the first install binds a UUID to the signer ID of its package, and an
update, a package put on flash or a downgrade authorisation signed by any
other trust anchor is refused (``ms-lifecycle.signer``) until the vendor
removes the microservice (a signed ``remove``, which erases its storage and
keys); a removed UUID binds its next signer (a binding does not move the
counter: a copy of the file from before a microservice's first install,
put back offline, forgets its binding). Also: a state change made by someone without the authority
(commands are authorised by :mod:`ism.device.commands`: vendor anchors,
the store for bans only; bound to the device; never replayed), illegal
transitions (typed errors naming the rule), and a power cut halfway through
a transition (every write is atomic; a removal is committed by its state
record first and its erasure is completed when the device is next opened).

State file (COSE_Mac0 over deterministic CBOR)::

    { 1: 1,                  / format /
      2: uint,               / generation: +1 on every write /
      3: uint,               / floor: generation of the last restricting write (= the counter) /
      4: { uuid-text => { 1: state, 2: since (s), 3: reason, ? 4: command digest, ? 5: true (erase pending),
                          ? 6: name, ? 7: signer ID (32 bytes: who may sign its packages) } } }
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import functools
import hashlib
import hmac
import re
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

from ism.crypto import cose
from ism.device._atomic import atomic_write, read_capped
from ism.device.commands import authorise_signed, consume
from ism.errors import IsmError, StateCorruptError, TrustError, UntrustedSignerError
from ism.formats import cbor, suit
from ism.formats.command import Command
from ism.formats.lifecycle import require as require_state
from ism.formats.package import claimed_identity

if TYPE_CHECKING:
    from pathlib import Path

    from ism.device.virtual import Device

__all__ = [
    "ACTIONS",
    "COUNTER",
    "ERASED",
    "NOT_STARTED",
    "STATES",
    "TRANSITIONS",
    "Eraser",
    "LifecycleError",
    "MicroserviceStates",
    "Record",
    "apply_command",
    "attested_state",
    "command_digest",
    "crash_loop_recorder",
    "next_state",
]

STATES: Final = ("installed", "active", "suspended", "quarantined", "removed", "banned")
#: states in which secure boot and the runtime do not start a microservice
NOT_STARTED: Final = frozenset({"suspended", "quarantined", "removed", "banned"})
#: states whose package, sealed boot record, storage and keys are gone
ERASED: Final = frozenset({"removed", "banned"})
#: action -> (the states it may start from; None: no record and no package), the state it leads to
TRANSITIONS: Final[dict[str, tuple[frozenset[str | None], str]]] = {
    "install": (frozenset({None, "removed"}), "installed"),
    "start": (frozenset({"installed"}), "active"),
    "suspend": (frozenset({"installed", "active"}), "suspended"),
    "resume": (frozenset({"suspended"}), "active"),
    "quarantine": (frozenset({"installed", "active", "suspended"}), "quarantined"),
    "release": (frozenset({"quarantined"}), "active"),
    "remove": (frozenset({"installed", "active", "suspended", "quarantined"}), "removed"),
    "ban": (frozenset({None, "installed", "active", "suspended", "quarantined", "removed"}), "banned"),
}
ACTIONS: Final = tuple(TRANSITIONS)
#: the anti-rollback counter that holds the generation of the last restricting write
COUNTER: Final = "ms-lifecycle"
FILE: Final = "microservices.cose"
FORMAT: Final = 1
MAX_FILE: Final = 1024 * 1024
#: most records the file holds (bans are kept for ever)
MAX_RECORDS: Final = 4096
#: most bans of microservices the device never had (pre-emptive bans, e.g. from the store): a
#: quota of their own, so that such bans cannot fill the table and block installs
MAX_PREEMPTIVE_BANS: Final = 1024
#: largest package read for its claimed name (as secure boot's cap)
MAX_PACKAGE: Final = 16 * 1024 * 1024
MAX_REASON: Final = 128
MAX_NAME: Final = 64
_RECORD_KEYS: Final = frozenset({1, 2, 3, 4, 5, 6, 7})
_RECORD_REQUIRED: Final = frozenset({1, 2, 3})
_CANONICAL_UUID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_RESTRICTING: Final = NOT_STARTED
#: the rule a boot refusal or hold names, by state
_RULES: Final = {
    "suspended": "ms-lifecycle.suspended",
    "quarantined": "ms-lifecycle.quarantined",
    "removed": "ms-lifecycle.removed",
    "banned": "ms-lifecycle.banned",
}

#: erases a microservice's storage namespace and the named keys (``ism.runtime.erase_microservice``)
Eraser = Callable[[uuidlib.UUID, list[str]], None]


class LifecycleError(TrustError):
    """A lifecycle transition that is not allowed (the rule says why); code 200."""


@dataclass(frozen=True, slots=True)
class Record:
    """The persisted lifecycle of one microservice."""

    state: str
    #: when it entered the state (wall-clock seconds)
    since: int
    #: why: the command's action, ``supervisor.crash-loop``, ``install``, ``first start``
    reason: str
    #: SHA-256 of the payload of the command that authorised it, if one did
    command: bytes | None = None
    #: a removal or ban whose erasure is not finished yet
    pending: bool = False
    #: the package name its envelope claimed when the record was written (kept after removal; reports only)
    name: str | None = None
    #: the signer ID its packages must carry (bound by the first install; kept after removal, replaced by the next)
    signer: bytes | None = None

    def encode(self) -> dict[int, Any]:
        out: dict[int, Any] = {1: self.state, 2: self.since, 3: self.reason}
        if self.command is not None:
            out[4] = self.command
        if self.pending:
            out[5] = True
        if self.name is not None:
            out[6] = self.name
        if self.signer is not None:
            out[7] = self.signer
        return out

    @classmethod
    def decode(cls, raw: Any) -> Record:
        if not isinstance(raw, dict) or not raw.keys() <= _RECORD_KEYS or not raw.keys() >= _RECORD_REQUIRED:
            raise ValueError("record keys")
        state, since, reason, command, pending = raw[1], raw[2], raw[3], raw.get(4), raw.get(5, False)
        name, signer = raw.get(6), raw.get(7)
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= MAX_NAME):
            raise ValueError("record name")
        if signer is not None and (not isinstance(signer, bytes) or len(signer) != 32):
            raise ValueError("record signer")
        if state not in STATES or not isinstance(reason, str) or len(reason) > MAX_REASON:
            raise ValueError("record state or reason")
        if not isinstance(since, int) or isinstance(since, bool) or since < 0:
            raise ValueError("record time")
        if command is not None and (not isinstance(command, bytes) or len(command) != 32):
            raise ValueError("record command digest")
        if not isinstance(pending, bool) or (pending and state not in ERASED):
            raise ValueError("record pending flag")
        return cls(state, since, reason, command, pending, name, signer)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "since": datetime.datetime.fromtimestamp(self.since, datetime.UTC).isoformat(),
            "reason": self.reason,
            "command": self.command.hex() if self.command is not None else None,
            "pending_erase": self.pending,
            "signer": self.signer.hex() if self.signer is not None else None,
        }


@functools.lru_cache(maxsize=MAX_RECORDS)
def _encoded(record: Record) -> cbor.Raw:
    """A record's deterministic CBOR (records rarely change between two writes: encoded once)."""
    return cbor.Raw(cbor.dumps(record.encode()))


def next_state(current: str | None, action: str, subject: str | None = None) -> str:
    """The state ``action`` leads to from ``current`` (None: the device does not have the microservice).

    Raises:
        LifecycleError: ``ms-lifecycle.banned`` (a banned microservice is banned for good),
            ``ms-lifecycle.unknown`` (no such microservice on the device),
            ``ms-lifecycle.transition`` (any other transition the table does not allow).
    """
    if action not in TRANSITIONS:
        raise LifecycleError("ms-lifecycle.transition", f"no lifecycle action {action!r}", subject=subject)
    sources, target = TRANSITIONS[action]
    if current == "banned":
        raise LifecycleError(
            "ms-lifecycle.banned", f"the microservice is banned: it cannot {action} (a ban is final)", subject=subject
        )
    if current not in sources:
        if current is None:
            raise LifecycleError(
                "ms-lifecycle.unknown", f"the device has no such microservice to {action}", subject=subject
            )
        raise LifecycleError(
            "ms-lifecycle.transition",
            f"a microservice that is {current} cannot {action}",
            subject=subject,
            got=current,
            expected=sorted(s for s in sources if s is not None),
        )
    return target


def command_digest(command: Command) -> bytes:
    """What a record keeps of the command that authorised it: SHA-256 of its payload."""
    return hashlib.sha256(command.encode()).digest()


class MicroserviceStates:
    """The lifecycle records of one device (``DIR/state/microservices.cose``).

    A microservice with a package but no record is ``installed`` (devices that
    predate the lifecycle, or an install cut short before its record). Reads
    verify the MAC and the generation against the ``ms-lifecycle`` counter;
    writes are read-modify-write under a lock file, so two processes never
    lose each other's change.

    Raises (any method that reads):
        StateCorruptError: ``state.ms-lifecycle`` (MAC or format), ``state.ms-lifecycle-replay``
            (an older copy put back), ``state.ms-lifecycle-missing`` (deleted).
    """

    def __init__(self, device: Device, clock: Callable[[], float] = time.time) -> None:
        self.device = device
        self.clock = clock
        self._records: dict[str, Record] | None = None

    @property
    def path(self) -> Path:
        return self.device.root / "state" / FILE

    # -- the file ---------------------------------------------------------------------------------

    def _read(self) -> tuple[int, int, dict[str, Record]]:
        require_state(self.device.lifecycle_state, "manage its microservices")
        counter = self.device.counters().get(COUNTER, 0)
        try:
            data = read_capped(self.path, MAX_FILE)
        except FileNotFoundError:
            if counter:
                raise StateCorruptError(
                    "state.ms-lifecycle-missing",
                    "the microservice lifecycle file is missing, but the device has restricted microservices",
                    subject=str(self.path),
                ) from None
            return 0, 0, {}
        except OSError as exc:
            raise StateCorruptError("state.ms-lifecycle", f"cannot read the lifecycle file: {exc.strerror}") from exc
        generation, floor, records = _open(data, self.device.state_mac_key)
        if generation < counter:
            raise StateCorruptError(
                "state.ms-lifecycle-replay",
                "the microservice lifecycle file is older than its counter: an old copy was put back",
                got=generation,
                expected=f">= {counter}",
            )
        if floor > counter:  # a restricting write was cut before its counter moved: finish it
            self.device.advance_counter(COUNTER, floor)
        return generation, floor, records

    def load(self) -> dict[str, Record]:
        """Every record, read from disk and verified (and kept for :meth:`get`)."""
        self._records = self._read()[2]
        return dict(self._records)

    def get(self, ms: uuidlib.UUID | str) -> Record | None:
        """The record of ``ms`` (read from disk once, then from memory; :meth:`load` refreshes it)."""
        if self._records is None:
            self.load()
        assert self._records is not None
        return self._records.get(str(ms))

    def state(self, ms: uuidlib.UUID | str) -> str | None:
        """The lifecycle state of ``ms``: its record's, else ``installed`` if it has a package, else None."""
        record = self.get(ms)
        if record is not None:
            return record.state
        return "installed" if self.device.package_path(str(ms)).is_file() else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.device.root / "state" / "microservices.lock"
        with lock.open("a") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _update(self, change: Callable[[dict[str, Record]], tuple[str, Record] | None]) -> None:
        """Read, ``change`` (returns the one record to set, or None for no write), write; under the lock."""

        def one(records: dict[str, Record]) -> dict[str, Record]:
            changed = change(records)
            return {} if changed is None else {changed[0]: changed[1]}

        self._update_many(one)

    def _update_many(self, change: Callable[[dict[str, Record]], dict[str, Record]], raise_floor: bool = True) -> None:
        """Read, ``change`` (returns the records to set; none: no write), write once; under the lock.

        A write that restricts a microservice moves the floor and the counter, unless
        ``raise_floor`` is False: an older copy of the file could then restrict no less.
        """
        with self._locked():
            generation, floor, records = self._read()
            changed = change(records)
            if not changed:
                self._records = records
                return
            restricting = raise_floor and any(
                r.state in _RESTRICTING and (k not in records or records[k].state != r.state)
                for k, r in changed.items()
            )
            records.update(changed)
            if len(records) > MAX_RECORDS:
                raise LifecycleError("ms-lifecycle.full", f"the device keeps at most {MAX_RECORDS} lifecycle records")
            if any(r.state == "banned" and r.name is None for r in changed.values()) and (
                sum(r.state == "banned" and r.name is None for r in records.values()) > MAX_PREEMPTIVE_BANS
            ):
                raise LifecycleError(
                    "ms-lifecycle.full",
                    f"the device keeps at most {MAX_PREEMPTIVE_BANS} bans of microservices it never had",
                )
            generation += 1
            if restricting:
                floor = generation
            body = {1: FORMAT, 2: generation, 3: floor, 4: {k: _encoded(v) for k, v in records.items()}}
            payload = cbor.dumps(body)
            atomic_write(self.path, cose.mac0(payload, self.device.state_mac_key), self.device.faults)
            _remember(payload, generation, floor, records)
            self._records = records
            if restricting:
                self.device.advance_counter(COUNTER, floor)

    # -- transitions ------------------------------------------------------------------------------

    def transition(
        self, ms: uuidlib.UUID | str, action: str, reason: str | None = None, command: bytes | None = None
    ) -> Record:
        """Moves ``ms`` by ``action`` (see :data:`TRANSITIONS`) and persists it; returns the new record.

        With ``command`` (the authorising command's digest): if the record was
        written by that very command, nothing changes and the record is
        returned (applying a command again after a power cut is idempotent).

        Raises:
            LifecycleError: see :func:`next_state`.
        """
        key = str(uuidlib.UUID(str(ms)))
        reason = (reason or action)[:MAX_REASON]
        result: list[Record] = []

        def change(records: dict[str, Record]) -> tuple[str, Record] | None:
            old = records.get(key)
            if command is not None and old is not None and old.command == command:
                result.append(old)
                return None
            current = old.state if old is not None else ("installed" if self._has_package(key) else None)
            target = next_state(current, action, key)
            signer = old.signer if old is not None else None
            new = Record(target, int(self.clock()), reason, command, target in ERASED, self._name(key, old), signer)
            result.append(new)
            return key, new

        self._update(change)
        return result[0]

    def _has_package(self, key: str) -> bool:
        return self.device.package_path(key).is_file()

    def _identity(self, key: str) -> dict[str, Any]:
        """What the stored package's envelope claims (name, version), for reports; empty if none."""
        with contextlib.suppress(IsmError, OSError):
            return claimed_identity(suit.parse_envelope(read_capped(self.device.package_path(key), MAX_PACKAGE)))
        return {}

    def _name(self, key: str, old: Record | None) -> str | None:
        name = self._identity(key).get("name")
        if isinstance(name, str) and 0 < len(name) <= MAX_NAME:
            return name
        return old.name if old is not None else None

    def check_install(self, ms: uuidlib.UUID | str, signer: bytes, downgrade_signer: bytes | None = None) -> None:
        """Refuses to install a banned microservice, or one bound to another signer (before anything is written).

        Raises:
            LifecycleError: ``ms-lifecycle.banned``, ``ms-lifecycle.pending``, ``ms-lifecycle.full``
                (no room for a new record: refused before the package is written).
            UntrustedSignerError: ``ms-lifecycle.signer`` if the package, or its downgrade
                authorisation, is signed by another key than the one the microservice is bound to.
        """
        records = self.load()
        record = records.get(str(ms))
        for who, sid in (("package", signer), ("downgrade authorisation", downgrade_signer)):
            refusal = self.signer_refusal(str(ms), sid, record) if sid is not None else None
            if refusal is not None:
                raise UntrustedSignerError(refusal.rule, f"the {who} {refusal.message}", subject=str(ms))
        if record is None and len(records) >= MAX_RECORDS:
            raise LifecycleError("ms-lifecycle.full", f"the device keeps at most {MAX_RECORDS} lifecycle records")
        if record is not None and record.state == "banned":
            raise LifecycleError(
                "ms-lifecycle.banned",
                "this microservice is banned on this device: it cannot be installed",
                subject=str(ms),
            )
        if record is not None and record.pending:
            raise LifecycleError(
                "ms-lifecycle.pending",
                "this microservice's removal is not finished: open the device ('ism device microservices') first",
                subject=str(ms),
            )

    def installed(self, ms: uuidlib.UUID | str, signer: bytes) -> None:
        """Records an install that was just written: ``installed`` and bound to ``signer`` if new or removed
        before; else unchanged (but bound, if it was not yet).

        An update of a suspended or quarantined microservice stays so until a
        ``resume`` or ``release`` command.
        """

        def change(records: dict[str, Record]) -> tuple[str, Record] | None:
            old = records.get(str(ms))
            if old is not None and (old.state != "removed" or old.pending):
                return None if old.signer is not None else (str(ms), replace(old, signer=signer))
            reason = "install" if old is None else "reinstall"
            return str(ms), Record("installed", int(self.clock()), reason, name=self._name(str(ms), old), signer=signer)

        self._update(change)

    def started(self, ms: uuidlib.UUID | str) -> None:
        """Records the first successful start: ``installed`` becomes ``active`` (otherwise nothing changes)."""

        def change(records: dict[str, Record]) -> tuple[str, Record] | None:
            old = records.get(str(ms))
            if old is not None and old.state != "installed":
                return None
            signer = old.signer if old is not None else None
            return str(ms), Record(
                "active", int(self.clock()), "first start", name=self._name(str(ms), old), signer=signer
            )

        self._update(change)

    # -- boot -------------------------------------------------------------------------------------

    def boot_refusal(self, ms: str) -> LifecycleError | None:
        """Why secure boot must refuse the package in slot ``ms`` before verifying it: removed or banned."""
        record = self.get(ms)
        if record is None or record.state not in ERASED:
            return None
        return LifecycleError(
            _RULES[record.state],
            f"the microservice was {record.state}: a package in its slot is not started"
            + (" (and cannot be installed again)" if record.state == "banned" else " (install it again to use it)"),
            subject=ms,
        )

    def signer_refusal(self, ms: str, signer: bytes, record: Record | None = None) -> UntrustedSignerError | None:
        """Why a package (or downgrade authorisation) of ``ms`` signed by ``signer`` is refused: the
        microservice is bound to another signer. None if it is bound to this one, unbound, or removed
        (its next install binds a new signer).
        """
        record = record if record is not None else self.get(ms)
        if record is None or record.signer is None or record.state == "removed":
            return None
        if hmac.compare_digest(record.signer, signer):
            return None
        return UntrustedSignerError(
            "ms-lifecycle.signer",
            f"is signed by {signer.hex()[:16]}..., but the microservice is bound to the signer "
            f"{record.signer.hex()[:16]}... of its first install (the vendor's 'remove' unbinds it)",
            subject=ms,
        )

    def hold(self, ms: str) -> LifecycleError | None:
        """Why a package that passed secure boot is not started: suspended or quarantined."""
        record = self.get(ms)
        if record is None or record.state not in NOT_STARTED - ERASED:
            return None
        until = "resume" if record.state == "suspended" else "release"
        return LifecycleError(
            _RULES[record.state],
            f"{record.state} ({record.reason}): not started until an authorised '{until}' command",
            subject=ms,
        )

    # -- removal ----------------------------------------------------------------------------------

    def finish_erase(self, ms: uuidlib.UUID | str, erase: Eraser) -> None:
        """Completes a removal or ban: storage and keys erased, package and sealed record gone, then not pending.

        Every step is idempotent, so a power cut anywhere is repaired by calling it again.
        """
        key = str(uuidlib.UUID(str(ms)))
        record = self.get(key)
        if record is None or not record.pending:
            return
        erase(uuidlib.UUID(key), _granted_keys(self.device, key))
        self.device.forget_package(key)

        def change(records: dict[str, Record]) -> tuple[str, Record] | None:
            now = records.get(key)
            if now is None or not now.pending:
                return None
            return key, replace(now, pending=False)

        self._update(change)

    def factory_reset(self) -> None:
        """After a factory reset (packages, storage and keys erased): every microservice is ``removed``.

        Bans stay (the store's decision outlives a reset), as do the anti-rollback
        counters; a microservice installed again starts ``installed``. Idempotent:
        a reset that a power cut interrupted calls it again. The ``ms-lifecycle``
        counter does not move: the file from before the reset holds every restriction
        the reset keeps (the bans), so putting it back frees nothing.
        """
        now = int(self.clock())

        def change(records: dict[str, Record]) -> dict[str, Record]:
            return {
                k: Record("removed", now, "factory reset", name=r.name)
                for k, r in records.items()
                if r.state != "banned" and (r.state != "removed" or r.pending)
            }

        self._update_many(change, raise_floor=False)

    def roll_forward(self, erase: Eraser) -> list[str]:
        """Finishes every removal or ban a power cut interrupted; returns the UUIDs it finished."""
        pending = [k for k, r in self.load().items() if r.pending]
        for key in pending:
            self.finish_erase(key, erase)
        return pending

    # -- reports ----------------------------------------------------------------------------------

    def listing(self) -> list[dict[str, Any]]:
        """Every microservice the device has a package or a record for, with state, since and reason."""
        records = self.load()
        out = []
        for key in sorted(set(records) | set(self.device.installed())):
            record = records.get(key)
            identity = self._identity(key)
            entry: dict[str, Any] = {
                "uuid": key,
                "name": identity.get("name") or (record.name if record is not None else None),
                "version": identity.get("version"),
                "package": self._has_package(key),
            }
            if record is None:
                entry.update(state="installed", since=None, reason="installed (no lifecycle record yet)")
                entry.update(command=None, pending_erase=False)
            else:
                entry.update(record.to_json())
            out.append(entry)
        return out


def _granted_keys(device: Device, ms: str) -> list[str]:
    """The key names the access policy grants ``ms`` (what a removal destroys); none if unconfigured."""
    if not device.configured():
        return []
    entry = device.policy().get(uuidlib.UUID(ms))
    return sorted(entry.keys) if entry is not None else []


#: the last payload decoded after its MAC verified, or written (boot, attestation and the runtime read
#: the same file; a transition reads what the one before wrote)
_last_decoded: tuple[bytes, int, int, dict[str, Record]] | None = None


def _remember(payload: bytes, generation: int, floor: int, records: dict[str, Record]) -> None:
    global _last_decoded
    _last_decoded = (payload, generation, floor, dict(records))


def _open(data: bytes, key: bytes) -> tuple[int, int, dict[str, Record]]:
    try:
        msg = cose.parse(data, expect="mac0")
        cose.verify_mac0(msg, key)
        payload = msg.payload or b""
        last = _last_decoded
        if last is not None and last[0] == payload:
            return last[1], last[2], dict(last[3])
        body = cbor.loads(payload)
    except IsmError as exc:
        raise StateCorruptError(
            "state.ms-lifecycle", "the microservice lifecycle file fails its integrity check"
        ) from exc
    try:
        if not isinstance(body, dict) or set(body) != {1, 2, 3, 4} or body[1] != FORMAT:
            raise ValueError("layout")
        generation, floor, raw = body[2], body[3], body[4]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (generation, floor)):
            raise ValueError("generation")
        if floor > generation or not isinstance(raw, dict) or len(raw) > MAX_RECORDS:
            raise ValueError("records")
        if not all(isinstance(k, str) and _CANONICAL_UUID.fullmatch(k) for k in raw):
            raise ValueError("record keys: canonical UUIDs")
        records = {k: Record.decode(v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise StateCorruptError("state.ms-lifecycle", f"the microservice lifecycle file is malformed ({exc})") from exc
    _remember(payload, generation, floor, records)
    return generation, floor, dict(records)


def apply_command(device: Device, data: bytes, erase: Eraser) -> tuple[Command, Record]:
    """Applies a signed ``microservice`` command: authorise, transition, erase (remove, ban), consume.

    Idempotent: a command applied again after a power cut (its counter had not
    moved yet) finds its own record and only finishes what is left.

    Raises:
        FormatError, UsageError, UntrustedSignerError, SignatureError, TrustError, RollbackError:
            ``command.*`` (see :func:`ism.device.commands.authorise`).
        LifecycleError: ``ms-lifecycle.*`` (an illegal transition).
        TrustError: ``lifecycle.decommissioned``.
    """
    require_state(device.lifecycle_state, "take a microservice command")
    command, role = authorise_signed(device, data, "microservice")
    ms = uuidlib.UUID(bytes=command.args["uuid"])
    action = str(command.args["action"])
    states = MicroserviceStates(device)
    states.roll_forward(erase)
    record = states.transition(ms, action, f"command: {action}", command_digest(command))
    if record.pending:
        states.finish_erase(ms, erase)
        record = states.get(ms) or record
    consume(device, command, role)
    return command, record


def attested_state(persisted: str | None, live: str | None) -> str:
    """The lifecycle a microservice's attestation claims.

    The persisted state, unless it is ``installed`` or ``active`` and the
    running supervisor knows better (``live``: what it makes of the
    microservice now, e.g. ``quarantined`` or, stopped, ``suspended``).
    """
    if persisted in NOT_STARTED:
        return persisted
    return live or persisted or "installed"


def crash_loop_recorder(
    states: MicroserviceStates, sink: Callable[[dict[str, Any]], int]
) -> Callable[[dict[str, Any]], int]:
    """Wraps the supervisor's violation sink: a crash-loop quarantine is also persisted (``quarantined``).

    It then survives a reboot, until an authorised ``release`` command.
    """

    def record(violation: dict[str, Any]) -> int:
        rid = sink(violation)
        if violation.get("rule") == "supervisor.crash-loop" and violation.get("action") == "quarantined":
            with contextlib.suppress(LifecycleError):  # removed or banned meanwhile: that state stands
                states.transition(str(violation.get("ms_uuid")), "quarantine", "supervisor.crash-loop")
        return rid

    return record
