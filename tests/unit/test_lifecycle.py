"""The device security lifecycle: the transition table, the log's hash chain and its tamper checks.

The table test enumerates every (from, to, event) triple and compares the
verdict with the PSA Security Model's transitions written out here by hand.
The log tests edit the stored log the way an attacker with the disk would —
a flipped byte, an older copy, a deletion — and, to exercise the chain
checks behind the MAC, the way an attacker who also had the state key would
(entries edited, dropped, reordered, spliced from another device): every
one is refused with ``state.lifecycle`` or ``state.lifecycle-rollback``.
"""

from __future__ import annotations

import itertools
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, generate, load_private, public_pem
from ism.crypto.statement import sign_statement, verify_statement
from ism.device import lifecycle
from ism.device.commands import sign_command
from ism.device.virtual import Device
from ism.errors import FormatError, SignatureError, StateCorruptError, TrustError
from ism.formats import cbor
from ism.formats.command import Command
from ism.formats.lifecycle import (
    EVENTS,
    STATES,
    Entry,
    Intent,
    LogBody,
    Statement,
    check_chain,
    check_transition,
    decode_log,
    decode_statement,
    encode_log,
    genesis,
)
from ism.maintenance import apply_lifecycle_command

#: every legal (from, to, event), written out from the PSA Security Model
LEGAL = {
    ("assembly-and-test", "psa-rot-provisioning", "init"),
    ("psa-rot-provisioning", "secured", "lock"),
    ("psa-rot-provisioning", "secured", "lifecycle"),
    ("psa-rot-provisioning", "secured", "factory-reset"),
    ("secured", "non-psa-rot-debug", "lifecycle"),
    ("non-psa-rot-debug", "secured", "lifecycle"),
    ("non-psa-rot-debug", "secured", "factory-reset"),
    ("secured", "recoverable-psa-rot-debug", "lifecycle"),
    ("recoverable-psa-rot-debug", "psa-rot-provisioning", "lifecycle"),
    ("secured", "secured", "factory-reset"),
    *((s, s, "provision") for s in STATES if s != "decommissioned"),
    *((s, "decommissioned", "decommission") for s in STATES if s != "decommissioned"),
}


@pytest.mark.parametrize(("current", "to", "event"), list(itertools.product(STATES, STATES, EVENTS)))
def test_transition_table(current: str, to: str, event: str) -> None:
    if (current, to, event) in LEGAL:
        check_transition(current, to, event)
        return
    with pytest.raises(TrustError) as info:
        check_transition(current, to, event)
    expected = "lifecycle.decommissioned" if current == "decommissioned" else "lifecycle.transition"
    assert info.value.rule == expected


def test_unknown_state_names() -> None:
    for current, to in (("secured", "unknown"), ("secured", "debug"), ("nowhere", "secured")):
        with pytest.raises(FormatError) as info:
            check_transition(current, to, "lifecycle")
        assert info.value.rule == "lifecycle.state"


# -- the log on a device ----------------------------------------------------------------------------


@pytest.fixture
def vendor() -> PrivateKey:
    return generate("es256")


@pytest.fixture
def locked(device: Device, vendor: PrivateKey) -> Device:
    device.add_anchor(public_pem(vendor), role="vendor")
    lifecycle.lock(device)
    return device


def _log_path(dev: Device) -> Path:
    return dev.root / lifecycle.LOG_FILE


def _body(dev: Device) -> LogBody:
    return decode_log(cose.parse(_log_path(dev).read_bytes()).payload or b"")


def _rewrite(dev: Device, body: LogBody) -> None:
    """What an attacker who had the state key could write: a validly MAC'd log."""
    _log_path(dev).write_bytes(cose.mac0(encode_log(body), dev.state_mac_key))


def _refused(root: Path, rule: str) -> None:
    dev = Device(root)  # opening works; everything that depends on the lifecycle state refuses
    for operation in (lambda: dev.lifecycle_state, dev.boot, dev.keystore, dev.info, lambda: lifecycle.lock(dev)):
        with pytest.raises(StateCorruptError) as info:
            operation()
        assert info.value.rule == rule


def test_a_new_device_is_in_provisioning_and_locks_to_secured(device: Device, vendor: PrivateKey) -> None:
    assert device.lifecycle_state == "psa-rot-provisioning"
    assert "lifecycle" not in device.counters()  # the first entry is sequence 0
    with pytest.raises(TrustError) as info:
        lifecycle.lock(device)
    assert info.value.rule == "provision.no-vendor"
    device.add_anchor(public_pem(vendor), role="vendor")
    entry = lifecycle.lock(device)
    assert (entry.sequence, entry.from_state, entry.to_state, entry.event) == (
        1,
        "psa-rot-provisioning",
        "secured",
        "lock",
    )
    reopened = Device(device.root)
    assert reopened.lifecycle_state == "secured"
    assert reopened.counters()["lifecycle"] == 1
    body = _body(reopened)
    check_chain(body.entries, reopened.instance_id)
    assert body.entries[0].prev == genesis(reopened.instance_id)
    assert body.entries[1].prev == body.entries[0].digest
    assert [e["event"] for e in reopened.info()["lifecycle_log"]] == ["init", "lock"]
    with pytest.raises(TrustError) as info:
        lifecycle.lock(reopened)
    assert info.value.rule == "lifecycle.transition"


def test_locked_devices_refuse_factory_steps(locked: Device, other_key: PrivateKey) -> None:
    for operation in (
        lambda: locked.add_anchor(public_pem(other_key)),
        lambda: locked.add_anchor(public_pem(other_key), role="vendor"),
        lambda: locked.remove_anchor(bytes(32), "vendor"),
        lambda: locked.configure("name = 'b'", "version = 1\nboard = 'b'\n"),
    ):
        with pytest.raises(TrustError) as info:
            operation()
        assert info.value.rule == "lifecycle.locked"
    assert not (locked.root / "config").exists()


def test_every_flipped_byte_in_the_log_is_detected(locked: Device) -> None:
    path = _log_path(locked)
    original = path.read_bytes()
    for offset in range(0, len(original), 7):
        tampered = bytearray(original)
        tampered[offset] ^= 0x01
        path.write_bytes(bytes(tampered))
        with pytest.raises(StateCorruptError) as info:
            _ = Device(locked.root).lifecycle_state
        assert info.value.rule == "state.lifecycle", offset
    path.write_bytes(original)
    assert Device(locked.root).lifecycle_state == "secured"


def test_an_older_copy_of_the_log_is_detected(device: Device, vendor: PrivateKey) -> None:
    """The log before the lock says psa-rot-provisioning: putting it back would reopen the factory."""
    before = _log_path(device).read_bytes()
    device.add_anchor(public_pem(vendor), role="vendor")
    lifecycle.lock(device)
    _log_path(device).write_bytes(before)
    _refused(device.root, "state.lifecycle-rollback")


def test_a_deleted_log_is_detected_once_the_device_has_moved(locked: Device) -> None:
    _log_path(locked).unlink()
    _refused(locked.root, "state.lifecycle-rollback")


def test_a_device_without_a_log_is_migrated(device: Device) -> None:
    """Made by an iSM before the log existed (no log, no lifecycle counter): it gets its first entry."""
    _log_path(device).unlink()
    reopened = Device(device.root)
    assert reopened.lifecycle_state == "psa-rot-provisioning"
    assert [e.event for e in _body(reopened).entries] == ["init"]


@pytest.mark.parametrize("edit", ["reason", "state", "drop-middle", "reorder", "resequence", "truncate-rehash"])
def test_chain_checks_behind_the_mac(locked: Device, vendor: PrivateKey, edit: str) -> None:
    """Even with the state key, an edited history does not pass the chain checks."""
    for n, state in enumerate(("non-psa-rot-debug", "secured"), start=1):
        lifecycle.apply_lifecycle_command(
            locked, sign_command(Command("lifecycle", locked.instance_id, n, {"state": state}), vendor)
        )
    body = _body(locked)
    entries = list(body.entries)
    assert [e.to_state for e in entries] == ["psa-rot-provisioning", "secured", "non-psa-rot-debug", "secured"]
    if edit == "reason":
        entries[2] = replace(entries[2], reason="nothing happened")
    elif edit == "state":
        entries[2] = replace(entries[2], to_state="secured")
    elif edit == "drop-middle":
        del entries[2]
    elif edit == "reorder":
        entries[2], entries[3] = entries[3], entries[2]
    elif edit == "resequence":
        entries = [*entries[:2], replace(entries[3], sequence=2)]
    else:  # drop the debug episode: a valid chain, but shorter than the counter says
        entries = entries[:2]
    _rewrite(locked, LogBody(tuple(entries)))
    with pytest.raises(StateCorruptError) as info:
        _ = Device(locked.root).lifecycle_state
    assert info.value.rule == ("state.lifecycle-rollback" if edit == "truncate-rehash" else "state.lifecycle")


def test_a_log_from_another_device_does_not_transplant(locked: Device, tmp_path: Path) -> None:
    other = Device.init(tmp_path / "other")
    body = _body(other)  # valid for the other device; re-MAC'd with this device's key
    _rewrite(locked, body)
    _refused(locked.root, "state.lifecycle")
    shutil.copyfile(_log_path(other), _log_path(locked))  # as it is: the MAC is the other device's
    _refused(locked.root, "state.lifecycle")


def test_a_log_one_entry_ahead_of_its_counter_rolls_the_counter_forward(locked: Device, vendor: PrivateKey) -> None:
    """A commit cut after the log was written and before the counters moved."""
    saved = (locked.root / "state" / "rollback.cose").read_bytes()
    lifecycle.apply_lifecycle_command(
        locked, sign_command(Command("lifecycle", locked.instance_id, 7, {"state": "non-psa-rot-debug"}), vendor)
    )
    (locked.root / "state" / "rollback.cose").write_bytes(saved)
    reopened = Device(locked.root)
    assert reopened.lifecycle_state == "non-psa-rot-debug"
    assert reopened.counters()["lifecycle"] == 2
    assert reopened.counters()["command.lifecycle"] == 7  # the command cannot be replayed


def test_malformed_log_bodies() -> None:
    entry = Entry(0, "init", "assembly-and-test", "psa-rot-provisioning", "", 1, bytes(32))
    good = encode_log(LogBody((entry,)))
    assert decode_log(good).entries == (entry,)
    bad = [
        cbor.dumps({1: "ism/lifecycle/v1", 2: []}),
        cbor.dumps({1: "ism/policy/v1", 2: [entry.encode()]}),
        cbor.dumps({1: "ism/lifecycle/v1", 2: [{**entry.encode(), 10: 1}]}),
        cbor.dumps({1: "ism/lifecycle/v1", 2: [{**entry.encode(), 2: "reboot"}]}),
        cbor.dumps({1: "ism/lifecycle/v1", 2: [{**entry.encode(), 8: bytes(32)}]}),  # digest without sequence
        cbor.dumps({1: "ism/lifecycle/v1", 2: [entry.encode()], 4: 1}),
        b"\xff",
    ]
    for data in bad:
        with pytest.raises(StateCorruptError) as info:
            decode_log(data)
        assert info.value.rule == "state.lifecycle"


def test_statement_round_trip_and_refusals() -> None:
    iak, other = generate("es256"), generate("es256")
    statement = Statement(
        b"\x01" + bytes(32), 1700000000, bytes(32), 3, b"\x07" * 32, ("device.iak",), ("keys/root.key",)
    )
    assert decode_statement(statement.encode()) == statement

    assert isinstance(iak, ec.EllipticCurvePrivateKey)

    def raw_sign(message: bytes) -> bytes:
        """What the key store's sign gives: ECDSA P-256 over SHA-256(message), raw r||s."""
        r, s = decode_dss_signature(iak.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    der = iak.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    signed = sign_statement(statement, raw_sign, der)
    assert verify_statement(signed, iak.public_key()) == statement
    with pytest.raises(SignatureError) as sig:
        verify_statement(signed, other.public_key())  # type: ignore[union-attr]
    assert sig.value.rule == "lifecycle.statement-signature"
    tampered = cbor.loads(signed)
    tampered.value[2] = replace(statement, time=1).encode()
    with pytest.raises(SignatureError):
        verify_statement(cbor.dumps(tampered), iak.public_key())
    for data in (b"", cose.sign1(statement.encode(), iak), b"\xa0"):
        with pytest.raises(FormatError) as fmt:
            verify_statement(data, iak.public_key())
        assert fmt.value.rule == "lifecycle.statement"


# -- re-provisioning from recoverable-psa-rot-debug -------------------------------------------------


def _to_recoverable(dev: Device, vendor: PrivateKey) -> bytes:
    """The device into recoverable-psa-rot-debug; returns the command that re-provisions it."""
    debug = Command("lifecycle", dev.instance_id, 1, {"state": "recoverable-psa-rot-debug"})
    lifecycle.apply_lifecycle_command(dev, sign_command(debug, vendor))
    return sign_command(Command("lifecycle", dev.instance_id, 9, {"state": "psa-rot-provisioning"}), vendor)


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_reprovisioning_without_its_plan_is_refused_and_changes_nothing(locked: Device, vendor: PrivateKey) -> None:
    """The device layer alone cannot name the keys to regenerate: it refuses rather than keep the old secrets."""
    command = _to_recoverable(locked, vendor)
    before = _tree(locked.root)
    with pytest.raises(TrustError) as info:
        lifecycle.apply_lifecycle_command(Device(locked.root), command)
    assert info.value.rule == "lifecycle.transition"
    assert _tree(locked.root) == before
    entry = apply_lifecycle_command(Device(locked.root), command)  # the command was not consumed
    assert (entry.from_state, entry.to_state) == ("recoverable-psa-rot-debug", "psa-rot-provisioning")


def test_reprovisioning_regenerates_the_device_key_pair_and_policy_key(locked: Device, vendor: PrivateKey) -> None:
    command = _to_recoverable(locked, vendor)
    root = locked.root
    device_pub, policy_key = (root / "keys" / "device.pub.pem").read_bytes(), locked.policy_public_key()
    device_priv = (root / "keys" / "device.pem").read_bytes()
    locked.close()
    apply_lifecycle_command(Device(root), command)
    dev = Device(root)
    assert dev.lifecycle_state == "psa-rot-provisioning"
    assert (root / "keys" / "device.pub.pem").read_bytes() != device_pub
    assert (root / "keys" / "device.pem").read_bytes() != device_priv
    assert (root / "keys" / "device.pem").stat().st_mode & 0o777 == 0o600
    new = load_private(root / "keys" / "device.pem")
    assert public_pem(new) == (root / "keys" / "device.pub.pem").read_bytes()
    assert dev.policy_public_key() != policy_key
    body = _body(dev)
    assert body.pending is None
    assert [e.event for e in body.entries] == ["init", "lock", "lifecycle", "lifecycle"]
    assert dev.counters()["command.lifecycle"] == 9


def test_an_intent_that_regenerates_round_trips_and_an_older_one_encodes_as_before() -> None:
    entry = Entry(1, "lifecycle", "recoverable-psa-rot-debug", "psa-rot-provisioning", "", 1, bytes(32))
    first = Entry(0, "init", "assembly-and-test", "psa-rot-provisioning", "", 1, bytes(32))
    intent = Intent(entry, None, ("device.iak",), ("keys/root.key",), None, ("device.iak",))
    assert decode_log(encode_log(LogBody((first,), intent))).pending == intent
    plain = Intent(entry, None, ("k",), ())
    assert "regenerate" not in plain.encode()[3]
    raw = {
        1: "ism/lifecycle/v1",
        2: [first.encode()],
        3: {**plain.encode(), 3: {"keys": [], "files": [], "regenerate": []}},
    }
    with pytest.raises(StateCorruptError) as info:
        decode_log(cbor.dumps(raw))
    assert info.value.rule == "state.lifecycle"


def test_an_intent_that_signs_a_statement_keeps_only_its_digest() -> None:
    entry = Entry(1, "decommission", "secured", "decommissioned", "", 1, bytes(32), bytes(32), 1)
    first = Entry(0, "init", "assembly-and-test", "psa-rot-provisioning", "", 1, bytes(32))
    intent = Intent(entry, b"cmd", ("k", "device.iak"), ("f",), bytes(range(32)), (), "device.iak")
    assert intent.encode()[3]["sign"] == ["device.iak"]
    assert decode_log(encode_log(LogBody((first,), intent))).pending == intent
    for statement in (b"\xd2" * 100, None):  # a signer comes with a 32-byte digest, never a signed statement
        raw = {1: "ism/lifecycle/v1", 2: [first.encode()], 3: {**intent.encode(), 4: statement}}
        with pytest.raises(StateCorruptError) as info:
            decode_log(cbor.dumps(raw))
        assert info.value.rule == "state.lifecycle"


def test_the_intent_moves_the_counter_and_the_log_from_before_it_is_a_rollback(
    locked: Device, vendor: PrivateKey
) -> None:
    """A log one ahead of the counter with an intent rolls forward; the log from before the intent is refused."""
    root = locked.root
    _to_recoverable(locked, vendor)
    before, counters = (root / lifecycle.LOG_FILE).read_bytes(), (root / "state" / "rollback.cose").read_bytes()
    dev = Device(root)
    body, entry = lifecycle.prepare(dev, "lifecycle", "psa-rot-provisioning", "test")
    intent = Intent(entry, None, ("device.iak",), (), None, ("device.iak",))
    lifecycle._write(dev, LogBody(body.entries, intent))  # the power fails before the counter moves
    assert dev.counters()[lifecycle.COUNTER] == entry.sequence - 1
    assert Device(root).lifecycle_state == "psa-rot-provisioning"  # counter moved, rolled forward
    assert Device(root).counters()[lifecycle.COUNTER] == entry.sequence
    (root / lifecycle.LOG_FILE).write_bytes(before)
    with pytest.raises(StateCorruptError) as info:
        lifecycle.read_log(Device(root))
    assert info.value.rule == "state.lifecycle-rollback"
    (root / "state" / "rollback.cose").write_bytes(counters)  # both put back: nothing but the old state
    assert Device(root).lifecycle_state == "recoverable-psa-rot-debug"
