"""The device's security lifecycle on disk: the tamper-evident log, transitions and provisioning bundles.

Owns: ``DIR/state/lifecycle.cose`` — the hash-chained lifecycle log
(:mod:`ism.formats.lifecycle`) in a COSE_Mac0 under the device state key —
its ``lifecycle`` anti-rollback counter (the last entry's sequence), the
current state (the last entry's ``to``), carrying out a transition
crash-safely (:func:`prepare` + :func:`perform`: intent, effects, commit),
finishing one a power cut interrupted (:func:`open_log`, called whenever a
:class:`~ism.device.virtual.Device` is opened), the factory lock
(:func:`lock`), signed provisioning bundles (:func:`provision`) and signed
debug-state changes (:func:`apply_lifecycle_command`). What a factory reset
or a decommissioning erases is planned above this layer (:mod:`ism.maintenance`:
it needs the services); the plan is data, so carrying it out is this module's.
Must not import: hypervisor, services, runtime, cli.

Crash safety. A transition with effects (a bundle's anchor changes, the keys
and files a reset, a re-provisioning or a decommissioning erases) first
writes its *intent* — the entry it will append, the signed command, the
plan, for a decommissioning the digest of the statement to sign — into the
log (one atomic write), then moves the ``lifecycle`` counter to the intent's
sequence (from then on the log from before the intent is an older copy:
``state.lifecycle-rollback``), then performs each effect idempotently (an
anchor written or removed, a key destroyed if it exists, a file removed if
present), then *commits*: the log with the entry appended and no intent (one
atomic write), then the command's counter. A power cut before the counter
moved leaves the old state with nothing done (the command was not consumed:
it can be sent again); a log whose intent is one ahead of the counter is that
cut after the intent: the next open moves the counter and rolls forward, as
it does for any pending intent; after the commit, the next open moves the
counters that had not moved yet. The state is therefore always the old one
or the new one, never a mixture, and once anything was erased the old log
cannot be put back.

The decommission statement is signed (by the intent's ``signer``, the IAK)
only after the counter moved and every other key was destroyed, written to
``DIR/state/decommission.cose``, and then the IAK is destroyed: no readable
file holds a statement before the device is past the point of no return,
and every later open of that device ends in ``decommissioned``.

Threat: an offline attacker editing the log to change the device's state
(the MAC and the hash chain: ``state.lifecycle``), putting back an older
copy or deleting it to undo a lock, a debug state or a decommissioning
(the ``lifecycle`` counter: ``state.lifecycle-rollback``; on TPM devices
the counters file itself is bound to a TPM NV counter), unauthorised or
replayed provisioning (:func:`~ism.device.commands.authorise`: vendor
anchors only, bound to the instance ID, sequence above the counter), a
bundle that locks the vendor out (``provision.no-vendor``), and trust
anchors changed outside the factory (``lifecycle.locked``, checked by the
device).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from cryptography.hazmat.primitives import serialization

from ism.crypto import cose
from ism.crypto.keys import PublicKey, generate, pem_from_der, public_pem, read_public_pem, signer_id
from ism.crypto.statement import sign_statement
from ism.device._atomic import TMP_SUFFIX, atomic_remove, atomic_write, read_capped
from ism.device.commands import authorise, counter_name
from ism.device.microservices import MicroserviceStates
from ism.errors import FormatError, IsmError, StateCorruptError, TrustError
from ism.formats.command import Command, decode_command
from ism.formats.lifecycle import (
    Entry,
    Intent,
    LogBody,
    Statement,
    check_chain,
    check_transition,
    decode_log,
    encode_log,
    genesis,
    reprovisions,
)
from ism.formats.lifecycle import require as require_state

if TYPE_CHECKING:
    from ism.crypto.keystore import KeyStore
    from ism.device.virtual import Device

__all__ = [
    "COUNTER",
    "LOG_FILE",
    "STATEMENT_FILE",
    "Provisioned",
    "apply_lifecycle_command",
    "command_digest",
    "lock",
    "open_log",
    "perform",
    "prepare",
    "provision",
    "read_log",
    "statement_for",
    "stored_key_ids",
]

#: the lifecycle log, under DIR
LOG_FILE: Final = Path("state") / "lifecycle.cose"
#: the decommission statement, under DIR (kept after decommissioning)
STATEMENT_FILE: Final = Path("state") / "decommission.cose"
#: the anti-rollback counter that holds the log's last sequence
COUNTER: Final = "lifecycle"
MAX_LOG_SIZE: Final = 16 * 1024 * 1024
#: events with effects: they record an intent before their first effect (and re-provisioning, see _has_effects)
_WITH_EFFECTS: Final = frozenset({"provision", "factory-reset", "decommission"})
#: the device key pair (``Device.init``): regenerated by re-provisioning
DEVICE_KEY: Final = Path("keys") / "device.pem"
DEVICE_PUBLIC: Final = Path("keys") / "device.pub.pem"
#: (keys, files, regenerate) a re-provisioning erases and regenerates (:func:`ism.maintenance.reprovision_plan`)
Plan = tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]


def _has_effects(entry: Entry) -> bool:
    return entry.event in _WITH_EFFECTS or (
        entry.event == "lifecycle" and reprovisions(entry.from_state, entry.to_state)
    )


_ROLES: Final = ("microservice", "policy", "vendor", "store")  # = ism.device.virtual.ANCHOR_ROLES


def command_digest(data: bytes) -> bytes:
    """What a log entry and a statement name a command by: SHA-256 of the signed command."""
    return hashlib.sha256(data).digest()


def _now() -> int:
    return int(time.time())


# -- the log on disk --------------------------------------------------------------------------------


def _write(device: Device, body: LogBody) -> None:
    path = device.root / LOG_FILE
    path.parent.mkdir(exist_ok=True)
    atomic_write(path, cose.mac0(encode_log(body), device.state_mac_key), device.faults)


def _read_stored(device: Device) -> LogBody | None:
    """The stored log, its MAC, encoding and chain verified; None if there is none."""
    path = device.root / LOG_FILE
    try:
        data = read_capped(path, MAX_LOG_SIZE)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateCorruptError("state.lifecycle", f"the lifecycle log is unreadable: {exc.strerror}") from exc
    if len(data) > MAX_LOG_SIZE:
        raise StateCorruptError("state.lifecycle", "the lifecycle log is too large")
    try:
        msg = cose.parse(data, expect="mac0")
        cose.verify_mac0(msg, device.state_mac_key)
    except IsmError as exc:
        raise StateCorruptError("state.lifecycle", "the lifecycle log fails its integrity check") from exc
    body = decode_log(msg.payload or b"")
    check_chain(body.entries, device.instance_id)
    intent = body.pending
    if intent is not None:
        entry = intent.entry
        follows = entry.sequence == body.entries[-1].sequence + 1 and entry.prev == body.head
        if not follows or not _has_effects(entry) or (intent.regenerate and entry.event != "lifecycle"):
            raise StateCorruptError("state.lifecycle", "the pending transition does not follow the log")
        if intent.signer is not None and (entry.event != "decommission" or intent.signer not in intent.keys):
            raise StateCorruptError("state.lifecycle", "only a decommissioning signs a statement, with a key it erases")
        try:
            check_transition(entry.from_state, entry.to_state, entry.event)
        except (TrustError, FormatError) as exc:
            raise StateCorruptError("state.lifecycle", f"the pending transition is illegal: {exc.message}") from exc
        if entry.from_state != body.state:
            raise StateCorruptError("state.lifecycle", "the pending transition does not start in the current state")
    return body


def read_log(device: Device) -> LogBody:
    """The device's lifecycle log, verified: MAC, chain, legal transitions and its anti-rollback counter.

    A device without a log and without a ``lifecycle`` counter — made by an iSM
    before the log existed, or whose ``init`` was cut short — gets its first
    entry now (assembly-and-test -> psa-rot-provisioning). The counter holds
    the last sequence the log recorded, an intent's included (:func:`perform`
    moves it as soon as the intent is written). A log one ahead of the
    counter is a write the power cut short before the counter moved — a
    commit without intent, or an intent — and the counter (and the command
    counter of the last entry) moves forward; a log behind it is an older
    copy. So a log from before an intent is refused once the transition may
    have erased anything.

    Raises:
        StateCorruptError: ``state.lifecycle`` (tampered, malformed, chain broken, illegal
            transition), ``state.lifecycle-rollback`` (missing, truncated or an older copy).
    """
    counters = device.counters()
    body = _read_stored(device)
    counter = counters.get(COUNTER, 0)
    if body is None:
        if counter:
            raise StateCorruptError(
                "state.lifecycle-rollback",
                "the lifecycle log is missing, but the device's lifecycle counter says it had one",
                expected=counter,
            )
        first = Entry(
            0,
            "init",
            "assembly-and-test",
            "psa-rot-provisioning",
            "device initialised: keys generated",
            _now(),
            genesis(device.instance_id),
        )
        body = LogBody((first,))
        _write(device, body)
        return body
    last = body.entries[-1]
    top = body.pending.entry.sequence if body.pending is not None else last.sequence
    if not counter <= top <= counter + 1:
        raise StateCorruptError(
            "state.lifecycle-rollback",
            "the lifecycle log does not match its anti-rollback counter (truncated, or an older copy)",
            got=top,
            expected=counter,
        )
    if top == counter + 1:
        device.advance_counter(COUNTER, top)
    if last.command_sequence is not None:
        name = counter_name(last.event)
        if counters.get(name, 0) < last.command_sequence:
            device.advance_counter(name, last.command_sequence)
    return body


def open_log(device: Device) -> Entry:
    """Reads the log when a device is opened and finishes a transition a power cut interrupted.

    Returns:
        The log's last entry: its ``to_state`` is the current lifecycle state, its digest the head.
    """
    body = read_log(device)
    if body.pending is not None:
        _effects(device, body.pending)
        _commit(device, body, body.pending.entry)
        return body.pending.entry
    return body.entries[-1]


def log_json(device: Device) -> list[dict[str, Any]]:
    """The verified log, one JSON object per entry (``ism device info``, ``ism device lifecycle --log``)."""
    return [e.to_json() for e in read_log(device).entries]


# -- transitions ------------------------------------------------------------------------------------


def prepare(
    device: Device, event: str, to: str, reason: str, command: Command | None = None, data: bytes | None = None
) -> tuple[LogBody, Entry]:
    """Checks the transition from the current state and makes the entry it will append (nothing is written).

    Raises:
        TrustError: ``lifecycle.transition``, ``lifecycle.decommissioned``.
        FormatError: ``lifecycle.state``.
    """
    body = read_log(device)
    if body.pending is not None:  # an open device has none; another process may have been cut short
        open_log(device)
        body = read_log(device)
    check_transition(body.state, to, event)
    entry = Entry(
        body.entries[-1].sequence + 1,
        event,
        body.state,
        to,
        reason[:256],
        _now(),
        body.head,
        command_digest(data) if data is not None else None,
        command.sequence if command is not None else None,
    )
    return body, entry


def perform(
    device: Device,
    body: LogBody,
    entry: Entry,
    *,
    command: bytes | None = None,
    keys: tuple[str, ...] = (),
    files: tuple[str, ...] = (),
    regenerate: tuple[str, ...] = (),
    signer: str | None = None,
) -> None:
    """Carries out a prepared transition: intent and its counter (if it has effects), effects, commit.

    Args:
        signer: a decommissioning's statement key (one of ``keys``): it signs the statement
            (:func:`statement_for`) once every other key is destroyed, and is destroyed right after.
    """
    if _has_effects(entry):
        digest = None
        if signer is not None:
            if entry.event != "decommission" or signer not in keys:
                raise ValueError("only a decommissioning signs a statement, with a key it erases")
            digest = hashlib.sha256(statement_for(device, entry, keys, files).encode()).digest()
        intent = Intent(entry, command, keys, files, digest, regenerate, signer)
        _write(device, LogBody(body.entries, intent))
        device.advance_counter(COUNTER, entry.sequence)  # the log from before the intent is now a rollback
        _effects(device, intent)
    _commit(device, body, entry)


def statement_for(device: Device, entry: Entry, keys: tuple[str, ...], files: tuple[str, ...]) -> Statement:
    """The final statement of a decommissioning: this device, the entry it appends, its command, what it erases."""
    if entry.command is None:
        raise ValueError("a decommissioning names its command")
    return Statement(device.instance_id, entry.time, entry.digest, entry.sequence, entry.command, keys, files)


def _holds_statement(path: Path, payload: bytes) -> bool:
    try:
        msg = cose.parse(read_capped(path, MAX_LOG_SIZE), expect="sign1")
    except (OSError, IsmError):
        return False
    return msg.payload == payload


def _sign(device: Device, intent: Intent, keystore: KeyStore, signer: str) -> None:
    """Signs and writes the statement the intent planned, unless a run before a power cut did."""
    statement = statement_for(device, intent.entry, intent.keys, intent.files)
    payload = statement.encode()
    if hashlib.sha256(payload).digest() != intent.statement:
        raise StateCorruptError("state.lifecycle", "the pending decommissioning's statement does not match its plan")
    path = device.root / STATEMENT_FILE
    if _holds_statement(path, payload) or not keystore.exists(signer):
        return  # signed before the cut (the key is destroyed only after the statement is written)
    sign = functools.partial(keystore.sign, signer)
    atomic_write(path, sign_statement(statement, sign, keystore.public_key(signer)), device.faults)


def _effects(device: Device, intent: Intent) -> None:
    """Every effect of a transition, each idempotent (so a cut one can simply run again)."""
    if intent.entry.event == "provision" and intent.command is not None:
        _apply_anchors(device, _decode_signed(intent.command))
    if intent.statement is not None and intent.signer is None:  # an intent of an older iSM: signed already
        atomic_write(device.root / STATEMENT_FILE, intent.statement, device.faults)
    if intent.keys:
        keystore = device._open_keystore()
        for key_id in intent.keys:
            if key_id != intent.signer and keystore.exists(key_id):
                keystore.destroy(key_id)
        if intent.signer is not None:  # every other key is gone: sign, then destroy the signer (files after)
            _sign(device, intent, keystore, intent.signer)
            if keystore.exists(intent.signer):
                keystore.destroy(intent.signer)
    root = device.root.resolve()
    for name in intent.files:
        path = (device.root / name).resolve()
        if path.parent.is_relative_to(root) and not path.is_dir():
            atomic_remove(path, device.faults)
    reprovision = intent.entry.event == "lifecycle"  # the only lifecycle command with effects
    if intent.entry.event == "factory-reset" or reprovision:
        MicroserviceStates(device).factory_reset()  # every microservice but the banned ones: removed
    if intent.keys or intent.files:
        device.close()  # the key store is opened afresh: the software store's root key may be gone
    if reprovision:
        _regenerate(device, intent.regenerate)


def _regenerate(device: Device, key_ids: tuple[str, ...]) -> None:
    """Re-provisioning: fresh device keys (destroyed by the plan just before; generated again on a re-run).

    A re-run after a power cut destroys and generates them once more: either
    way every key the commit finds was generated after the intent.
    """
    keystore = device._open_keystore()  # the software store's root key is created afresh if it was removed
    for key_id in key_ids:
        if not keystore.exists(key_id):
            keystore.generate(key_id, "ecc-p256")
    device.close()
    key = generate("es256")
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write(device.root / DEVICE_KEY, private, device.faults, mode=0o600)
    atomic_write(device.root / DEVICE_PUBLIC, public_pem(key), device.faults)


def _commit(device: Device, body: LogBody, entry: Entry) -> None:
    _write(device, LogBody((*body.entries, entry)))
    device.advance_counter(COUNTER, entry.sequence)
    if entry.command_sequence is not None:
        device.advance_counter(counter_name(entry.event), entry.command_sequence)
    device._lifecycle_state, device._lifecycle_head, device._lifecycle_error = entry.to_state, entry.digest, None


def _decode_signed(data: bytes) -> Command:
    """The command inside a signed command this device already authorised (its intent is MAC'd)."""
    msg = cose.parse(data, expect="sign1")
    return decode_command(msg.payload or b"")


# -- the factory lock, provisioning bundles, signed debug states ----------------------------------


def lock(device: Device) -> Entry:
    """The factory's last step: psa-rot-provisioning -> secured. No command is needed; it is done once.

    Raises:
        TrustError: ``lifecycle.transition`` (not in psa-rot-provisioning),
            ``provision.no-vendor`` (no vendor anchor: nobody could ever command the device).
    """
    require_state(device.lifecycle_state, "be locked")
    if not device.anchors("vendor"):
        raise TrustError(
            "provision.no-vendor",
            "the device has no vendor anchor: once locked, nobody could provision, reset or decommission it "
            "('ism device trust DIR --add VENDOR.pub.pem --role vendor' first)",
        )
    body, entry = prepare(device, "lock", "secured", "factory lock: trust anchors change only by signed bundles")
    perform(device, body, entry)
    return entry


@dataclass(frozen=True, slots=True)
class Provisioned:
    """What a provisioning bundle did."""

    command: Command
    entry: Entry
    added: tuple[tuple[str, str], ...]
    removed: tuple[tuple[str, str], ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "sequence": self.command.sequence,
            "added": [{"role": r, "signer_id": s} for r, s in self.added],
            "removed": [{"role": r, "signer_id": s} for r, s in self.removed],
            "lifecycle": self.entry.to_json(),
        }


def _bundle_keys(command: Command) -> list[tuple[str, str, PublicKey | None, bytes]]:
    """(op, role, key, signer ID) per change, every role and key checked before anything is written."""
    out: list[tuple[str, str, PublicKey | None, bytes]] = []
    for change in command.anchors:
        if change.role not in _ROLES:
            raise FormatError("provision.role", f"an anchor's role is one of {list(_ROLES)}", got=change.role)
        if change.op == "add":
            assert change.key is not None
            try:
                key = read_public_pem(pem_from_der(change.key), "bundle anchor")
            except FormatError as exc:
                raise FormatError("provision.key", f"an anchor to add is no usable public key: {exc.message}") from exc
            out.append(("add", change.role, key, signer_id(key)))
        else:
            assert change.id is not None
            out.append(("remove", change.role, None, change.id))
    return out


def _apply_anchors(device: Device, command: Command) -> None:
    for op, role, key, sid in _bundle_keys(command):
        if op == "add":
            assert key is not None
            device._put_anchor(key, role)
        else:
            device._drop_anchor(sid, role)


def provision(device: Device, data: bytes) -> Provisioned:
    """Applies a signed provisioning bundle: anchor changes, a log entry, the command consumed.

    The bundle is checked whole before anything is written: authorisation
    (a vendor anchor's signature, this device, a fresh sequence), every role
    and key, and that a vendor anchor remains. Adding an anchor that is
    there, or removing one that is not, changes nothing (so a bundle cut
    short can be applied again). Rotating the vendor key is one bundle:
    add the new vendor anchor, remove the old one.

    Raises:
        FormatError: ``command.format``, ``provision.role``, ``provision.key``.
        UntrustedSignerError, SignatureError, TrustError, RollbackError: see
            :func:`~ism.device.commands.authorise`.
        TrustError: ``provision.no-vendor``, ``lifecycle.decommissioned``.
    """
    require_state(device.lifecycle_state, "be provisioned")
    command = authorise(device, data, "provision")
    changes = _bundle_keys(command)
    vendors = {signer_id(k) for k in device.anchors("vendor")}
    added: list[tuple[str, str]] = []
    removed: list[tuple[str, str]] = []
    for op, role, _, sid in changes:
        if role == "vendor":
            (vendors.add if op == "add" else vendors.discard)(sid)
        (added if op == "add" else removed).append((role, sid.hex()))
    if not vendors:
        raise TrustError(
            "provision.no-vendor", "the bundle would leave the device without a vendor anchor: nobody could command it"
        )
    summary = " ".join([*(f"+{r}:{s[:16]}" for r, s in added), *(f"-{r}:{s[:16]}" for r, s in removed)])
    body, entry = prepare(device, "provision", device.lifecycle_state, f"provisioning bundle: {summary}", command, data)
    perform(device, body, entry, command=data)
    return Provisioned(command, entry, tuple(added), tuple(removed))


def apply_lifecycle_command(device: Device, data: bytes, planner: Callable[[Device], Plan] | None = None) -> Entry:
    """A signed ``lifecycle`` command: secured <-> non-psa-rot-debug, secured -> recoverable-psa-rot-debug,
    recoverable-psa-rot-debug -> psa-rot-provisioning (re-provisioning), psa-rot-provisioning -> secured.

    Re-provisioning regenerates the device's own keys and erases the
    microservices' data and keys; ``planner`` names them
    (:func:`ism.maintenance.apply_lifecycle_command` passes it). Without a
    planner, re-provisioning is refused (``lifecycle.transition``) before
    anything is written: the device never returns with its old RoT secrets.

    Raises:
        TrustError: ``lifecycle.transition`` (not legal from the current state, or decommissioning,
            which has its own command), ``lifecycle.decommissioned``; the refusals of
            :func:`~ism.device.commands.authorise`.
        FormatError: ``lifecycle.state`` (no such state).
    """
    require_state(device.lifecycle_state, "change its lifecycle state")
    command = authorise(device, data, "lifecycle")
    to = str(command.args["state"])
    body, entry = prepare(device, "lifecycle", to, f"signed lifecycle command: {to}", command, data)
    # decided on the log prepare() just read, not on the state this Device saw when it was opened:
    # another process may have moved the device to recoverable-psa-rot-debug since
    reprovision = reprovisions(entry.from_state, entry.to_state)
    if reprovision:
        reason = "re-provisioning: device keys regenerated, microservice data and keys crypto-erased"
        entry = dataclasses.replace(entry, reason=reason)
    if not reprovision:
        perform(device, body, entry, command=data)
        return entry
    if planner is None:
        raise TrustError(
            "lifecycle.transition",
            "re-provisioning regenerates the device's keys: it needs their plan "
            "(ism.maintenance.apply_lifecycle_command)",
            got=f"{entry.from_state} -> {entry.to_state}",
        )
    keys, files, regenerate = planner(device)
    perform(device, body, entry, command=data, keys=keys, files=files, regenerate=regenerate)
    return entry


def stored_key_ids(device: Device, *prefixes: str) -> list[str]:
    """Key ids with one of ``prefixes`` that the software key store holds (empty for other backends).

    Token and TPM key stores cannot be listed; their keys are named by the policy and the storage.
    """
    if device._config.get("keystore", "software") != "software":
        return []
    store = device.root / "keys" / "store"
    names = (p.name.removesuffix(".key") for p in store.glob("*.key") if not p.name.endswith(TMP_SUFFIX))
    return sorted(n for n in names if n.startswith(prefixes))
