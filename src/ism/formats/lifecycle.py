"""The device security lifecycle: states, legal transitions, log entries and the decommission statement.

Owns: the PSA security lifecycle states a device moves through (names and
values from :data:`ism.formats.psa.LIFECYCLE_STATES`), the table of legal
transitions and which event may cause which (:func:`check_transition`), the
hash-chained entries of the device's lifecycle log and their strict decoding
(:func:`decode_log`, :func:`check_chain`), and the payload of the final
statement a device signs when it is decommissioned (:class:`Statement`).
Reading the log from disk, its MAC and its anti-rollback counter are
:mod:`ism.device.lifecycle`'s; signing the statement is :mod:`ism.crypto.statement`'s.
Must not import: crypto, device or anything above.

Transitions (PSA Security Model)::

    assembly-and-test -> psa-rot-provisioning -> secured <-> non-psa-rot-debug
                                 ^                 |
                                 |                 v
                                 +---- recoverable-psa-rot-debug
    every state but decommissioned -> decommissioned (terminal)

Events that change what the device holds but not its state — a provisioning
bundle, a factory reset of a secured device — are entries whose ``from``
and ``to`` are equal; no other event may leave the state as it was.

Log body (deterministic CBOR, carried in a COSE_Mac0 under the device state key)::

    { 1: "ism/lifecycle/v1",
      2: [ entry, ... ],               / sequence 0, 1, 2, ... /
      ? 3: { 1: entry,                 / a transition under way (intent): the entry it will append /
             2: bstr / null,           / the signed command that authorised it /
             3: { "keys": [* tstr], "files": [* tstr],     / what it erases /
                  ? "regenerate": [+ tstr],           / the device keys generated afresh (re-provisioning) /
                  ? "sign": [tstr] },                 / the key that signs the decommission statement /
             4: bstr / null } }        / with "sign": SHA-256 of the statement's payload (the statement is
                                         signed only once the intent's counter has moved and every other
                                         key is destroyed); without: a statement signed by an older iSM /

    entry = { 1: uint (sequence), 2: tstr (event), 3: tstr (from), 4: tstr (to), 5: tstr (reason),
              6: uint (time, Unix seconds), 7: bstr .size 32 (digest of the previous entry),
              ? 8: bstr .size 32 (SHA-256 of the authorising signed command), ? 9: uint (its sequence) }

An entry's digest is SHA-256 of its deterministic encoding; the first
entry's ``prev`` is SHA-256("ism/lifecycle/v1" || instance ID), so a log
cannot be moved to another device. The *head* is the last entry's digest.

Threat: a log edited, reordered, truncated or spliced from another device
(every entry names its predecessor's digest and its own sequence; the
first is bound to the instance ID; each step must be a legal transition),
a device talked into an illegal state change (only :data:`TRANSITIONS`, and
each only by its event), ambiguous encodings (deterministic CBOR only,
unknown keys refused). Any of these in a stored log is ``state.lifecycle``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from ism.errors import FormatError, StateCorruptError, TrustError
from ism.formats import cbor
from ism.formats.psa import LIFECYCLE_STATES

__all__ = [
    "EVENTS",
    "FACTORY_STATES",
    "LOG_TYPE",
    "STATEMENT_TYPE",
    "STATES",
    "TRANSITIONS",
    "Entry",
    "Intent",
    "LogBody",
    "Statement",
    "check_chain",
    "check_transition",
    "decode_log",
    "decode_statement",
    "encode_log",
    "genesis",
    "reprovisions",
    "require",
]

LOG_TYPE: Final = "ism/lifecycle/v1"
STATEMENT_TYPE: Final = "ism/decommission/v1"
#: the PSA security lifecycle states a device can be in ("unknown" is a token value, not a state)
STATES: Final = tuple(s for s in LIFECYCLE_STATES if s != "unknown")
#: the legal state changes (PSA Security Model); every state but the terminal one may be decommissioned
TRANSITIONS: Final[Mapping[str, frozenset[str]]] = {
    "assembly-and-test": frozenset({"psa-rot-provisioning", "decommissioned"}),
    "psa-rot-provisioning": frozenset({"secured", "decommissioned"}),
    "secured": frozenset({"non-psa-rot-debug", "recoverable-psa-rot-debug", "decommissioned"}),
    "non-psa-rot-debug": frozenset({"secured", "decommissioned"}),
    "recoverable-psa-rot-debug": frozenset({"psa-rot-provisioning", "decommissioned"}),
    "decommissioned": frozenset(),
}
#: what may cause an entry: device creation, the factory lock, a signed command of each kind
EVENTS: Final = ("init", "lock", "lifecycle", "provision", "factory-reset", "decommission")
#: states in which trust anchors and a cleartext configuration may still be set directly (the factory)
FACTORY_STATES: Final = frozenset({"assembly-and-test", "psa-rot-provisioning"})
MAX_ENTRIES: Final = 100_000
MAX_REASON: Final = 256
_MAX_UINT: Final = (1 << 63) - 1
_ENTRY_KEYS: Final = frozenset(range(1, 10))
_ENTRY_REQUIRED: Final = frozenset(range(1, 8))


def _corrupt(message: str, got: Any = None) -> StateCorruptError:
    return StateCorruptError("state.lifecycle", message, got=got)


def _uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_UINT


def genesis(instance_id: bytes) -> bytes:
    """The ``prev`` of a device's first entry: binds the log to the device."""
    return hashlib.sha256(LOG_TYPE.encode() + instance_id).digest()


def reprovisions(from_state: str, to_state: str) -> bool:
    """True for re-provisioning: recoverable-psa-rot-debug -> psa-rot-provisioning.

    In recoverable PSA-RoT debug the Root of Trust's secrets may have been
    exposed, so this transition regenerates the device's own keys and erases
    the microservices' data and keys (planned by :mod:`ism.maintenance`).
    """
    return from_state == "recoverable-psa-rot-debug" and to_state == "psa-rot-provisioning"


def require(state: str, action: str, *, factory: bool = False) -> None:
    """Refuses ``action`` in ``state``: anything once decommissioned; factory steps once locked.

    Raises:
        TrustError: ``lifecycle.decommissioned``; ``lifecycle.locked`` (with ``factory``, outside
            assembly-and-test and psa-rot-provisioning).
    """
    if state == "decommissioned":
        raise TrustError("lifecycle.decommissioned", f"the device is decommissioned: it cannot {action}")
    if factory and state not in FACTORY_STATES:
        raise TrustError(
            "lifecycle.locked",
            f"the device is {state}: it cannot {action} any more; trust anchors change only through a "
            "signed provisioning bundle ('ism device provision')",
            got=state,
        )


def check_transition(current: str, to: str, event: str) -> None:
    """Refuses a state change that is not legal, or not legal for ``event``.

    Raises:
        TrustError: ``lifecycle.decommissioned`` (nothing leaves the terminal state);
            ``lifecycle.transition`` (not in :data:`TRANSITIONS`, or not by this event).
        FormatError: ``lifecycle.state`` for a name that is no lifecycle state.
    """
    for name in (current, to):
        if name not in TRANSITIONS:
            raise FormatError("lifecycle.state", f"not a security lifecycle state; one of {list(STATES)}", got=name)
    require(current, f"change its lifecycle state ({event})")
    if current == to:
        allowed = event == "provision" or (event == "factory-reset" and to == "secured")
    else:
        allowed = to in TRANSITIONS[current] and {
            "init": current == "assembly-and-test" and to == "psa-rot-provisioning",
            "lock": current == "psa-rot-provisioning" and to == "secured",
            "lifecycle": to != "decommissioned" and current != "assembly-and-test",
            "provision": False,
            "factory-reset": to == "secured",
            "decommission": to == "decommissioned",
        }.get(event, False)
    if not allowed:
        raise TrustError(
            "lifecycle.transition",
            f"{current} -> {to} is not a legal lifecycle transition"
            + (f" for {event}" if to in TRANSITIONS[current] or current == to else ""),
            got=f"{current} -> {to}",
        )


@dataclass(frozen=True, slots=True)
class Entry:
    """One lifecycle log entry: a transition (or a same-state event), chained to its predecessor."""

    sequence: int
    event: str
    from_state: str
    to_state: str
    reason: str
    time: int
    prev: bytes
    command: bytes | None = None
    command_sequence: int | None = None

    def __post_init__(self) -> None:
        if not _uint(self.sequence) or not _uint(self.time):
            raise _corrupt("an entry's sequence and time are unsigned integers")
        if self.event not in EVENTS:
            raise _corrupt(f"an entry's event is one of {list(EVENTS)}", self.event)
        if self.from_state not in TRANSITIONS or self.to_state not in TRANSITIONS:
            raise _corrupt("an entry names a state that is no lifecycle state")
        if not isinstance(self.reason, str) or len(self.reason) > MAX_REASON:
            raise _corrupt(f"an entry's reason is text of at most {MAX_REASON} characters")
        if not isinstance(self.prev, bytes) or len(self.prev) != 32:
            raise _corrupt("an entry's prev is a 32-byte digest")
        if (self.command is None) != (self.command_sequence is None):
            raise _corrupt("an entry names both its command's digest and sequence, or neither")
        if self.command is not None and (not isinstance(self.command, bytes) or len(self.command) != 32):
            raise _corrupt("an entry's command digest is 32 bytes")
        if self.command_sequence is not None and not _uint(self.command_sequence):
            raise _corrupt("an entry's command sequence is an unsigned integer")

    def encode(self) -> dict[int, Any]:
        out: dict[int, Any] = {
            1: self.sequence,
            2: self.event,
            3: self.from_state,
            4: self.to_state,
            5: self.reason,
            6: self.time,
            7: self.prev,
        }
        if self.command is not None:
            out[8], out[9] = self.command, self.command_sequence
        return out

    @classmethod
    def decode(cls, raw: Any) -> Entry:
        if not isinstance(raw, dict) or not _ENTRY_REQUIRED <= set(raw) <= _ENTRY_KEYS:
            raise _corrupt("a lifecycle entry is a map with keys 1..7 (and 8, 9 for a command)")
        return cls(raw[1], raw[2], raw[3], raw[4], raw[5], raw[6], raw[7], raw.get(8), raw.get(9))

    @property
    def digest(self) -> bytes:
        """SHA-256 of the entry's deterministic encoding (what the next entry's ``prev`` names)."""
        return hashlib.sha256(cbor.dumps(self.encode())).digest()

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.sequence,
            "event": self.event,
            "from": self.from_state,
            "to": self.to_state,
            "reason": self.reason,
            "time": self.time,
            "command": self.command.hex() if self.command else None,
            "command_sequence": self.command_sequence,
            "digest": self.digest.hex(),
        }


@dataclass(frozen=True, slots=True)
class Intent:
    """A transition under way: recorded before its first effect, so a power cut rolls it forward."""

    entry: Entry
    command: bytes | None = None
    keys: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    statement: bytes | None = None
    #: key ids destroyed (they are in ``keys``) and then generated afresh: re-provisioning
    regenerate: tuple[str, ...] = ()
    #: the key (in ``keys``) that signs the decommission statement before it is destroyed; with it,
    #: ``statement`` is the SHA-256 of the statement's payload, never the signed statement itself
    signer: str | None = None

    def encode(self) -> dict[int, Any]:
        plan: dict[str, list[str]] = {"keys": list(self.keys), "files": list(self.files)}
        if self.regenerate:  # only then: an older intent encodes as it did
            plan["regenerate"] = list(self.regenerate)
        if self.signer is not None:
            plan["sign"] = [self.signer]
        return {1: self.entry.encode(), 2: self.command, 3: plan, 4: self.statement}

    @classmethod
    def decode(cls, raw: Any) -> Intent:
        if not isinstance(raw, dict) or set(raw) != {1, 2, 3, 4}:
            raise _corrupt("a pending transition is a map with keys 1..4")
        plan = raw[3]
        if (
            not isinstance(plan, dict)
            or not {"keys", "files"} <= set(plan) <= {"keys", "files", "regenerate", "sign"}
            or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in plan.values())
        ):
            raise _corrupt("a pending transition's plan lists key ids and files")
        for value in (raw[2], raw[4]):
            if value is not None and not isinstance(value, bytes):
                raise _corrupt("a pending transition's command and statement are byte strings")
        regenerate = tuple(plan.get("regenerate", ()))
        if "regenerate" in plan and not regenerate:
            raise _corrupt("a pending transition's regenerate list is absent or not empty")
        signer = plan.get("sign")
        if signer is not None and (len(signer) != 1 or not isinstance(raw[4], bytes) or len(raw[4]) != 32):
            raise _corrupt("a pending transition's statement signer is one key id, with the statement's digest")
        return cls(
            Entry.decode(raw[1]),
            raw[2],
            tuple(plan["keys"]),
            tuple(plan["files"]),
            raw[4],
            regenerate,
            signer[0] if signer is not None else None,
        )


@dataclass(frozen=True, slots=True)
class LogBody:
    """The decoded log: its entries (never empty once written) and the transition under way, if any."""

    entries: tuple[Entry, ...]
    pending: Intent | None = None

    @property
    def state(self) -> str:
        return self.entries[-1].to_state

    @property
    def head(self) -> bytes:
        return self.entries[-1].digest


def encode_log(body: LogBody) -> bytes:
    out: dict[int, Any] = {1: LOG_TYPE, 2: [e.encode() for e in body.entries]}
    if body.pending is not None:
        out[3] = body.pending.encode()
    return cbor.dumps(out)


def decode_log(data: bytes) -> LogBody:
    """Strictly decodes a log body (the MAC is the caller's to check first).

    Raises:
        StateCorruptError: ``state.lifecycle``.
    """
    try:
        raw = cbor.loads(data)
    except FormatError as exc:
        raise _corrupt(f"the lifecycle log is not CBOR: {exc.message}") from exc
    if not isinstance(raw, dict) or not {1, 2} <= set(raw) <= {1, 2, 3} or raw[1] != LOG_TYPE:
        raise _corrupt(f"not a {LOG_TYPE} log")
    if not isinstance(raw[2], list) or not 0 < len(raw[2]) <= MAX_ENTRIES:
        raise _corrupt(f"a lifecycle log holds 1..{MAX_ENTRIES} entries")
    body = LogBody(tuple(Entry.decode(e) for e in raw[2]), Intent.decode(raw[3]) if 3 in raw else None)
    if encode_log(body) != bytes(data):
        raise _corrupt("the lifecycle log is not deterministically encoded")
    return body


def check_chain(entries: Sequence[Entry], instance_id: bytes) -> None:
    """Every entry follows its predecessor: sequence, digest and a legal transition; the first is ``init``.

    Raises:
        StateCorruptError: ``state.lifecycle`` naming the first entry that breaks the chain.
    """
    prev, state = genesis(instance_id), "assembly-and-test"
    for i, entry in enumerate(entries):
        if entry.sequence != i:
            raise _corrupt("lifecycle entries are out of order or missing", got=f"entry {i}: {entry.sequence}")
        if entry.prev != prev:
            raise _corrupt("a lifecycle entry does not follow its predecessor (chain broken)", got=i)
        if entry.from_state != state or (i == 0) != (entry.event == "init"):
            raise _corrupt("a lifecycle entry does not start where its predecessor ended", got=i)
        try:
            check_transition(entry.from_state, entry.to_state, entry.event)
        except (TrustError, FormatError) as exc:
            raise _corrupt(f"the lifecycle log records an illegal transition: {exc.message}", got=i) from exc
        prev, state = entry.digest, entry.to_state


@dataclass(frozen=True, slots=True)
class Statement:
    """The final statement a device signs with its attestation key when it is decommissioned."""

    instance_id: bytes
    time: int
    #: digest of the log's ``decommissioned`` entry (the head once decommissioning is done)
    head: bytes
    #: that entry's sequence
    sequence: int
    #: SHA-256 of the signed decommission command
    command: bytes
    erased_keys: tuple[str, ...] = field(default_factory=tuple)
    erased_files: tuple[str, ...] = field(default_factory=tuple)

    def encode(self) -> bytes:
        return cbor.dumps(
            {
                1: STATEMENT_TYPE,
                2: self.instance_id,
                3: self.time,
                4: self.head,
                5: self.sequence,
                6: self.command,
                7: {"keys": list(self.erased_keys), "files": list(self.erased_files)},
            }
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id.hex(),
            "time": self.time,
            "head": self.head.hex(),
            "sequence": self.sequence,
            "command": self.command.hex(),
            "erased": {"keys": list(self.erased_keys), "files": list(self.erased_files)},
        }


def decode_statement(data: bytes) -> Statement:
    """Strictly decodes a statement payload.

    Raises:
        FormatError: ``lifecycle.statement``.
    """

    def bad(message: str) -> FormatError:
        return FormatError("lifecycle.statement", message)

    try:
        raw = cbor.loads(data)
    except FormatError as exc:
        raise bad(f"the statement is not CBOR: {exc.message}") from exc
    if not isinstance(raw, dict) or set(raw) != set(range(1, 8)) or raw[1] != STATEMENT_TYPE:
        raise bad(f"not a {STATEMENT_TYPE} payload")
    erased = raw[7]
    if (
        not isinstance(raw[2], bytes)
        or not 7 <= len(raw[2]) <= 33
        or not _uint(raw[3])
        or not _uint(raw[5])
        or not all(isinstance(raw[k], bytes) and len(raw[k]) == 32 for k in (4, 6))
        or not isinstance(erased, dict)
        or set(erased) != {"keys", "files"}
        or not all(isinstance(v, list) and all(isinstance(s, str) for s in v) for v in erased.values())
    ):
        raise bad("a statement field has the wrong type or size")
    statement = Statement(raw[2], raw[3], raw[4], raw[5], raw[6], tuple(erased["keys"]), tuple(erased["files"]))
    if statement.encode() != bytes(data):
        raise bad("the statement is not deterministically encoded")
    return statement
