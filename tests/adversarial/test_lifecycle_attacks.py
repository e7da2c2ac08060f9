"""The device security lifecycle under attack: provisioning, factory reset, decommissioning, debug states.

A *product* device here is what a factory ships: a developer's microservice
anchor, a cleartext policy that grants ``hello`` a key and storage, the
vendor's command anchor, locked (``secured``), with hello and echo installed
and booted, a storage record and a key of hello's, and an attestation key.
Every attack below is refused with the rule it broke and leaves the device
exactly as it was; factory reset and decommissioning do what they promise
(checked through the real storage and key store, not by looking at file
names); a power cut at every write point of every lifecycle transition
leaves the device in the old state or the new one, and reopening it
finishes what was begun.
"""

from __future__ import annotations

import os
import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ism.crypto import cose
from ism.crypto.attestation import verify_token
from ism.crypto.keys import (
    PrivateKey,
    generate,
    load_public,
    pem_from_der,
    public_pem,
    read_public_pem,
    signer_id,
)
from ism.crypto.policy_seal import seal
from ism.crypto.statement import verify_statement
from ism.device import lifecycle
from ism.device._atomic import Faults, PowerCut
from ism.device.commands import sign_command
from ism.device.virtual import ANCHOR_ROLES, Device
from ism.errors import (
    FormatError,
    IsmError,
    RollbackError,
    SignatureError,
    StateCorruptError,
    TrustError,
    UntrustedSignerError,
    UsageError,
)
from ism.formats.command import AnchorChange, Command
from ism.formats.lifecycle import decode_log
from ism.formats.policy_artifact import make_payload
from ism.maintenance import DEVICE_KEYS, KEPT, apply_lifecycle_command, decommission, factory_reset
from ism.runtime import Runtime, attestation_service, open_storage
from ism.services.attestation import IAK_ID
from ism.services.crypto import key_store_id
from ism.services.identity import CA_KEY_ID

HELLO = uuidlib.UUID("5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a01")
BOARD = 'name = "test-board"\n[resources.timer]\nperipheral = "timer"\n'
POLICY = f"""
version = 1
board = "test-board"
[microservice.hello]
uuid = "{HELLO}"
keys = ["signing"]
storage = 1024
"""
HELLO_KEY = key_store_id(str(HELLO), "signing")


def der(key: PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class Product:
    root: Path
    vendor: PrivateKey
    developer: PrivateKey
    build: Callable[..., bytes]
    seq: int = 0

    def device(self, faults: Faults | None = None) -> Device:
        return Device(self.root, faults)

    def command(self, kind: str, key: PrivateKey | None = None, instance: bytes | None = None, **args: Any) -> bytes:
        self.seq += 1
        dev = self.device()
        return sign_command(Command(kind, instance or dev.instance_id, self.seq, args), key or self.vendor)

    def bundle(self, *changes: AnchorChange, key: PrivateKey | None = None, instance: bytes | None = None) -> bytes:
        return self.command("provision", key, instance, anchors=list(changes))


def make_product(root: Path, developer: PrivateKey, vendor: PrivateKey, build: Callable[..., bytes]) -> Product:
    dev = Device.init(root)
    dev.add_anchor(public_pem(developer))
    dev.add_anchor(public_pem(vendor), role="vendor")
    dev.configure(BOARD, POLICY)
    lifecycle.lock(dev)
    dev.install(build("hello", sequence=2))
    dev.install(build("echo"))
    dev.boot()
    storage = open_storage(dev)
    storage.set(HELLO, 1, b"the enrolled template")
    storage.close()
    keystore = dev.keystore()
    keystore.generate(HELLO_KEY, "ecc-p256")
    keystore.generate(IAK_ID, "ecc-p256")
    (root / "keys" / "iak.pub.pem").write_bytes(
        serialization.load_der_public_key(keystore.public_key(IAK_ID)).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    dev.close()
    return Product(root, vendor, developer, build)


@pytest.fixture
def vendor() -> PrivateKey:
    return generate("es256")


@pytest.fixture
def product(tmp_path: Path, dev_key: PrivateKey, vendor: PrivateKey, build_package: Callable[..., bytes]) -> Product:
    return make_product(tmp_path / "product", dev_key, vendor, build_package)


def files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def refused(error: type[IsmError], rule: str, operation: Callable[[], object]) -> IsmError:
    with pytest.raises(error) as info:
        operation()
    assert info.value.rule == rule, info.value
    return info.value


def refused_unchanged(product: Product, error: type[IsmError], rule: str, op: Callable[[Device], object]) -> None:
    before = files(product.root)
    refused(error, rule, lambda: op(product.device()))
    assert files(product.root) == before


# -- provisioning bundles ---------------------------------------------------------------------------


def test_a_bundle_for_another_device_is_refused(product: Product, tmp_path: Path, other_key: PrivateKey) -> None:
    other = Device.init(tmp_path / "other")
    bundle = product.bundle(AnchorChange("add", "microservice", key=der(other_key)), instance=other.instance_id)
    refused_unchanged(product, TrustError, "command.device", lambda dev: lifecycle.provision(dev, bundle))


def test_a_replayed_bundle_is_refused(product: Product, other_key: PrivateKey) -> None:
    old = product.bundle(AnchorChange("add", "store", key=der(other_key)))
    new = product.bundle(AnchorChange("remove", "store", id=signer_id(other_key)))
    lifecycle.provision(product.device(), old)
    lifecycle.provision(product.device(), new)
    assert product.device().anchors("store") == []
    for replay in (old, new):  # the older one would put the store anchor back
        refused_unchanged(product, RollbackError, "command.replay", lambda dev, b=replay: lifecycle.provision(dev, b))


def test_bundles_signed_by_a_developer_or_the_policy_key_are_refused(product: Product, other_key: PrivateKey) -> None:
    policy_key = generate("es256")
    lifecycle.provision(product.device(), product.bundle(AnchorChange("add", "policy", key=der(policy_key))))
    for signer in (product.developer, policy_key, other_key):
        bundle = product.bundle(AnchorChange("add", "vendor", key=der(signer)), key=signer)
        refused_unchanged(
            product, UntrustedSignerError, "command.signer", lambda dev, b=bundle: lifecycle.provision(dev, b)
        )
    # the developer's package anchor does not make it a device commander either
    reset = product.command("factory-reset", key=product.developer)
    refused_unchanged(product, UntrustedSignerError, "command.signer", lambda dev: factory_reset(dev, reset))


def test_a_bundle_must_leave_a_vendor_and_be_well_formed(product: Product, other_key: PrivateKey) -> None:
    last = product.bundle(AnchorChange("remove", "vendor", id=signer_id(product.vendor)))
    refused_unchanged(product, TrustError, "provision.no-vendor", lambda dev: lifecycle.provision(dev, last))
    role = product.bundle(AnchorChange("add", "root", key=der(other_key)))
    refused_unchanged(product, FormatError, "provision.role", lambda dev: lifecycle.provision(dev, role))
    key = product.bundle(
        AnchorChange("add", "store", key=b"\x30\x03junk"), AnchorChange("add", "store", key=der(other_key))
    )
    refused_unchanged(product, FormatError, "provision.key", lambda dev: lifecycle.provision(dev, key))


def test_the_vendor_key_rotates_and_the_old_one_is_refused(product: Product) -> None:
    new_vendor = generate("es256")
    rotate = product.bundle(
        AnchorChange("add", "vendor", key=der(new_vendor)),
        AnchorChange("remove", "vendor", id=signer_id(product.vendor)),
    )
    done = lifecycle.provision(product.device(), rotate)
    assert done.added == (("vendor", signer_id(new_vendor).hex()),)
    assert [signer_id(k) for k in product.device().anchors("vendor")] == [signer_id(new_vendor)]
    for kind, op in (
        ("provision", lifecycle.provision),
        ("factory-reset", factory_reset),
        ("decommission", decommission),
        ("lifecycle", lifecycle.apply_lifecycle_command),
    ):
        args: dict[str, Any] = {
            "provision": {"anchors": [AnchorChange("add", "store", key=der(new_vendor))]},
            "lifecycle": {"state": "non-psa-rot-debug"},
        }.get(kind, {})
        old = product.command(kind, **args)
        refused_unchanged(product, UntrustedSignerError, "command.signer", lambda dev, o=old, f=op: f(dev, o))
    product.vendor = new_vendor
    lifecycle.provision(product.device(), product.bundle(AnchorChange("add", "store", key=der(new_vendor))))


# -- factory reset ----------------------------------------------------------------------------------


def test_unauthorised_factory_resets_are_refused(product: Product, tmp_path: Path, other_key: PrivateKey) -> None:
    dev = product.device()
    good = Command("factory-reset", dev.instance_id, 99, {})
    other = Device.init(tmp_path / "other")
    attempts = [
        (FormatError, "command.format", good.encode()),  # no signature at all
        (FormatError, "command.format", cose.mac0(good.encode(), dev.state_mac_key)),
        (UntrustedSignerError, "command.signer", sign_command(good, other_key)),
        (UntrustedSignerError, "command.signer", sign_command(good, product.developer)),
        (UsageError, "command.kind", product.command("decommission")),
        (TrustError, "command.device", product.command("factory-reset", instance=other.instance_id)),
    ]
    tampered = bytearray(sign_command(good, product.vendor))
    tampered[-70] ^= 0x01  # inside the payload
    attempts.append((SignatureError, "command.signature", bytes(tampered)))
    for error, rule, data in attempts:
        refused_unchanged(product, error, rule, lambda dev, d=data: factory_reset(dev, d))


def test_factory_reset_erases_microservices_and_keeps_the_provisioning(product: Product, tmp_path: Path) -> None:
    dev = product.device()
    counters, anchors = dev.counters(), {r: dev.anchors(r) for r in ANCHOR_ROLES}
    keystore = dev.keystore()
    iak, policy_key = keystore.public_key(IAK_ID), dev.policy_public_key()
    old_storage = tmp_path / "old-storage"
    old_storage.mkdir()
    for name in ("storage.sqlite", "storage-root.cose"):
        shutil.copy(product.root / "state" / name, old_storage / name)
    done = factory_reset(dev, product.command("factory-reset"))
    assert done.entry.to_state == "secured"
    assert {HELLO_KEY, f"storage.{HELLO}", "device.storage"} <= set(done.keys)

    dev = product.device()
    assert (dev.lifecycle_state, dev.installed(), dev.boot().microservices) == ("secured", [], ())
    assert {k: v for k, v in dev.counters().items() if not k.startswith(("lifecycle", "command."))} == {
        k: v for k, v in counters.items() if not k.startswith("lifecycle")
    }
    assert {r: dev.anchors(r) for r in ANCHOR_ROLES} == anchors
    assert dev.policy().by_name["hello"].uuid == HELLO  # the policy stays
    keystore = dev.keystore()
    assert (keystore.public_key(IAK_ID), dev.policy_public_key()) == (iak, policy_key)  # device keys stay
    assert not keystore.exists(HELLO_KEY)
    storage = open_storage(dev)
    refused(UsageError, "storage.missing", lambda: storage.get(HELLO, 1))
    storage.close()
    # the old database put back: its records are unreadable (their key is destroyed)
    for name in ("storage.sqlite", "storage-root.cose"):
        shutil.copy(old_storage / name, product.root / "state" / name)
    restored = open_storage(Device(product.root))
    refused(SignatureError, "storage.integrity", lambda: restored.get(HELLO, 1))
    restored.close()
    # the anti-rollback counters survived: an older version of hello cannot come back
    refused(RollbackError, "boot.rollback", lambda: Device(product.root).install(product.build("hello", sequence=1)))
    Device(product.root).install(product.build("hello", sequence=2))


def test_a_factory_reset_is_not_replayed(product: Product) -> None:
    reset = product.command("factory-reset")
    factory_reset(product.device(), reset)
    product.device().install(product.build("echo"))
    refused_unchanged(product, RollbackError, "command.replay", lambda dev: factory_reset(dev, reset))
    assert product.device().installed()


# -- decommissioning --------------------------------------------------------------------------------


def test_decommissioning_leaves_a_signed_statement_and_nothing_usable(product: Product) -> None:
    iak_pem = product.root / "keys" / "iak.pub.pem"
    command = product.command("decommission")
    done = decommission(product.device(), command)
    dev = product.device()
    assert dev.lifecycle_state == "decommissioned"
    statement = verify_statement(done.statement or b"", load_public(iak_pem))
    assert statement == verify_statement((product.root / lifecycle.STATEMENT_FILE).read_bytes(), load_public(iak_pem))
    log = lifecycle.read_log(dev)
    assert (statement.head, statement.sequence) == (log.head, log.entries[-1].sequence)
    assert statement.command == lifecycle.command_digest(command)
    assert statement.instance_id == dev.instance_id
    assert {IAK_ID, HELLO_KEY, "device.policy", "device.identity-ca", "device.storage"} <= set(statement.erased_keys)
    assert "keys/root.key" in statement.erased_files
    assert set(files(product.root)) <= KEPT  # the root key every sealed key depended on is gone
    assert not (product.root / "keys" / "root.key").exists()

    nonce = os.urandom(32)
    attempts: list[Callable[[], object]] = [
        dev.boot,
        lambda: Runtime.start(product.root),
        dev.keystore,
        lambda: attestation_service(dev, dev.boot(), None, lambda _u: None).device_token(nonce),
        lambda: open_storage(dev).get(HELLO, 1),
        dev.policy_public_key,
        lambda: dev.install(product.build("hello", sequence=3)),
        lambda: dev.install_policy(b"\xd2\x84"),
        lambda: dev.configure(BOARD, POLICY),
        lambda: dev.add_anchor(public_pem(product.vendor), role="vendor"),
        lambda: lifecycle.lock(dev),
        lambda: lifecycle.provision(dev, product.bundle(AnchorChange("add", "store", key=der(product.vendor)))),
        lambda: lifecycle.apply_lifecycle_command(dev, product.command("lifecycle", state="secured")),
        lambda: factory_reset(dev, product.command("factory-reset")),
        lambda: decommission(dev, product.command("decommission")),
    ]
    before = files(product.root)
    for attempt in attempts:
        refused(TrustError, "lifecycle.decommissioned", attempt)
    assert files(product.root) == before
    assert Device(product.root).info()["lifecycle"] == "decommissioned"


def test_a_tampered_statement_is_refused(product: Product) -> None:
    done = decommission(product.device(), product.command("decommission"))
    key = load_public(product.root / "keys" / "iak.pub.pem")
    data = bytearray(done.statement or b"")
    data[-80] ^= 0x01
    with pytest.raises((SignatureError, FormatError)):
        verify_statement(bytes(data), key)
    refused(
        SignatureError,
        "lifecycle.statement-signature",
        lambda: verify_statement(done.statement or b"", generate("es256").public_key()),
    )  # type: ignore[arg-type]


# -- lifecycle states -------------------------------------------------------------------------------


def _token_state(dev: Device) -> str:
    """The lifecycle state a device token attests; every token also carries the head of the verified log."""
    service = attestation_service(dev, dev.boot(), None, lambda _u: None)
    nonce = os.urandom(32)
    iak = read_public_pem(pem_from_der(service.public_key_der))
    claims = verify_token(service.device_token(nonce), iak, nonce=nonce).claims
    head = lifecycle.read_log(dev).head
    assert claims.lifecycle_log == head == dev.lifecycle_head
    for ms_uuid in service.microservices:
        assert verify_token(service.microservice_token(ms_uuid, nonce), iak).claims.lifecycle_log == head
    return claims.lifecycle_state


def test_debug_states_are_attested_and_only_legal_transitions_happen(product: Product) -> None:
    def move(state: str) -> None:
        apply_lifecycle_command(product.device(), product.command("lifecycle", state=state))

    assert _token_state(product.device()) == "secured"
    for state in ("decommissioned", "psa-rot-provisioning", "secured", "assembly-and-test"):
        cmd = product.command("lifecycle", state=state)
        refused_unchanged(
            product, TrustError, "lifecycle.transition", lambda dev, c=cmd: lifecycle.apply_lifecycle_command(dev, c)
        )
    cmd = product.command("lifecycle", state="debug")
    refused_unchanged(product, FormatError, "lifecycle.state", lambda dev: lifecycle.apply_lifecycle_command(dev, cmd))
    move("non-psa-rot-debug")
    assert _token_state(product.device()) == "non-psa-rot-debug"
    move("secured")
    move("recoverable-psa-rot-debug")
    assert _token_state(product.device()) == "recoverable-psa-rot-debug"
    # from recoverable debug the only way back is re-provisioning: no reset, no direct return
    reset = product.command("factory-reset")
    refused_unchanged(product, TrustError, "lifecycle.transition", lambda dev: factory_reset(dev, reset))
    back = product.command("lifecycle", state="secured")
    refused_unchanged(
        product, TrustError, "lifecycle.transition", lambda dev: lifecycle.apply_lifecycle_command(dev, back)
    )
    refused_unchanged(product, TrustError, "lifecycle.locked", lambda dev: dev.add_anchor(public_pem(product.vendor)))
    move("psa-rot-provisioning")
    dev = product.device()
    assert _token_state(dev) == "psa-rot-provisioning"
    dev.add_anchor(public_pem(generate("es256")))  # re-provisioning: the factory steps are open again
    lifecycle.lock(dev)
    assert _token_state(product.device()) == "secured"
    log = product.device().info()["lifecycle_log"]
    assert len({e["digest"] for e in log}) == len(log)  # every transition moved the attested head
    events = [e["event"] for e in log]
    assert events == ["init", "lock", "lifecycle", "lifecycle", "lifecycle", "lifecycle", "lock"]


def test_reprovisioning_regenerates_the_rot_secrets_and_erases_the_microservices(product: Product) -> None:
    """Recoverable PSA-RoT debug may have exposed the RoT's secrets: the device comes back with new ones."""
    runtime = Runtime.start(product.root)  # the identity CA key and certificate exist
    runtime.close()
    apply_lifecycle_command(product.device(), product.command("lifecycle", state="recoverable-psa-rot-debug"))
    dev = product.device()
    old_keys, old_ca = device_keys(product.root), dev.identity_ca()
    assert old_ca is not None
    old_files = files(product.root)
    counters, log = dev.counters(), lifecycle.read_log(dev).entries
    service = attestation_service(dev, dev.boot(), None, lambda _u: None)
    nonce = os.urandom(32)
    old_token, old_iak = service.device_token(nonce), read_public_pem(pem_from_der(service.public_key_der))
    dev.close()

    entry = apply_lifecycle_command(product.device(), product.command("lifecycle", state="psa-rot-provisioning"))
    assert (entry.from_state, entry.to_state) == ("recoverable-psa-rot-debug", "psa-rot-provisioning")
    dev = product.device()
    assert dev.lifecycle_state == "psa-rot-provisioning"
    new_keys = device_keys(product.root)
    assert all(a != b for a, b in zip(new_keys, old_keys, strict=True))  # device key pair, policy, CA, IAK
    assert dev.info()["policy_key"] == pem_from_der(new_keys[1]).decode()
    for name in ("keys/root.key", "keys/device.pem"):  # the software store's root key too
        assert (product.root / name).read_bytes() != old_files[name]
    gone = {"keys/identity-ca.der", "keys/iak.pub.pem"}
    assert not gone & set(files(product.root))
    # the old IAK's sealed key is gone: what signs now is a new key, and old tokens do not verify with it
    assert (product.root / "keys" / "store" / f"{IAK_ID}.key").read_bytes() != old_files[f"keys/store/{IAK_ID}.key"]
    service = attestation_service(dev, dev.boot(), None, lambda _u: None)
    assert service.public_key_der == new_keys[3]
    new_iak = read_public_pem(pem_from_der(service.public_key_der))
    token = service.device_token(nonce)
    assert verify_token(token, new_iak, nonce=nonce).claims.lifecycle_state == "psa-rot-provisioning"
    refused(SignatureError, "cose.signature", lambda: verify_token(old_token, new_iak, nonce=nonce))
    refused(SignatureError, "cose.signature", lambda: verify_token(token, old_iak, nonce=nonce))
    # the microservices' data and keys are erased as by a factory reset
    assert (dev.installed(), dev.boot().microservices) == ([], ())
    assert not dev.keystore().exists(HELLO_KEY)
    storage = open_storage(dev)
    refused(UsageError, "storage.missing", lambda: storage.get(HELLO, 1))
    storage.close()
    # the counters and the log stay
    assert {k: v for k, v in dev.counters().items() if not k.startswith(("lifecycle", "command."))} == {
        k: v for k, v in counters.items() if not k.startswith(("lifecycle", "command."))
    }
    assert lifecycle.read_log(dev).entries[: len(log)] == log
    refused(RollbackError, "boot.rollback", lambda: dev.install(product.build("hello", sequence=1)))
    dev.close()
    # the identity CA is issued again, by the new CA key
    runtime = Runtime.start(product.root)
    runtime.close()
    ca = product.device().identity_ca()
    assert ca is not None
    assert ca != old_ca
    spki = (
        x509.load_der_x509_certificate(ca)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert spki == new_keys[2]


def test_reprovisioning_removes_the_policy_sealed_to_the_old_policy_key(
    tmp_path: Path, vendor: PrivateKey, dev_key: PrivateKey
) -> None:
    """The protected policy is encrypted to the old policy key: unreadable now, so it goes; the vendor seals anew."""
    policy_signer = generate("es256")
    dev = Device.init(tmp_path / "sealed")
    dev.add_anchor(public_pem(dev_key))
    dev.add_anchor(public_pem(vendor), role="vendor")
    dev.add_anchor(public_pem(policy_signer), role="policy")

    def sealed(version: int) -> bytes:
        text = POLICY.replace("version = 1", f"version = {version}")
        key = read_public_pem(pem_from_der(dev.policy_public_key()))
        return seal(make_payload(BOARD, text, dev.instance_id).encode(), key, policy_signer)

    dev.install_policy(sealed(1))
    old_artifact = (dev.root / "config" / "policy.cose").read_bytes()
    lifecycle.lock(dev)
    for n, state in enumerate(("recoverable-psa-rot-debug", "psa-rot-provisioning"), start=1):
        apply_lifecycle_command(
            Device(dev.root), sign_command(Command("lifecycle", dev.instance_id, n, {"state": state}), vendor)
        )
    dev = Device(dev.root)
    assert not (dev.root / "config" / "policy.cose").exists()
    assert not dev.configured()
    assert dev.protected()  # a cleartext policy cannot take its place: the policy counter stays
    (dev.root / "config" / "policy.cose").write_bytes(old_artifact)  # put back: the new key cannot open it
    with pytest.raises(IsmError):
        Device(dev.root).policy()
    (dev.root / "config" / "policy.cose").unlink()
    assert Device(dev.root).install_policy(sealed(2)).by_name["hello"].uuid == HELLO


# -- power cuts -------------------------------------------------------------------------------------

Snapshot = tuple[str, dict[str, list[str]], dict[str, int], list[str], bool]


def device_keys(root: Path) -> list[bytes]:
    """The device's own public keys: its key pair and every key re-provisioning regenerates."""
    with Device(root) as dev:
        keystore = dev.keystore()
        return [(root / "keys" / "device.pub.pem").read_bytes(), *(keystore.public_key(k) for k in DEVICE_KEYS)]


def snapshot(root: Path) -> Snapshot:
    """Re-opens the device (which finishes or drops an interrupted transition) and reads its state."""
    dev = Device(root)
    anchors = {role: sorted(signer_id(k).hex() for k in dev.anchors(role)) for role in ANCHOR_ROLES}
    names = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    state = dev.lifecycle_state
    hello_key = state != "decommissioned" and dev.keystore().exists(HELLO_KEY)
    dev.close()
    return state, anchors, dev.counters(), names, hello_key


OTHER_VENDOR = generate("es256")
Operation = Callable[[Device], object]


def _lock(p: Product) -> Operation:
    """Back to psa-rot-provisioning first (through recoverable debug), so that there is a lock to cut."""
    for state in ("recoverable-psa-rot-debug", "psa-rot-provisioning"):
        apply_lifecycle_command(p.device(), p.command("lifecycle", state=state))
    return lifecycle.lock


def _provision(p: Product) -> Operation:
    bundle = p.bundle(
        AnchorChange("add", "vendor", key=der(OTHER_VENDOR)),
        AnchorChange("add", "store", key=der(OTHER_VENDOR)),
        AnchorChange("remove", "vendor", id=signer_id(p.vendor)),
        AnchorChange("remove", "microservice", id=signer_id(p.developer)),
    )
    return lambda dev: lifecycle.provision(dev, bundle)


def _debug(p: Product) -> Operation:
    command = p.command("lifecycle", state="non-psa-rot-debug")
    return lambda dev: lifecycle.apply_lifecycle_command(dev, command)


def _reprovision(p: Product) -> Operation:
    """recoverable-psa-rot-debug -> psa-rot-provisioning: device keys regenerated, microservices erased."""
    lifecycle.apply_lifecycle_command(p.device(), p.command("lifecycle", state="recoverable-psa-rot-debug"))
    command = p.command("lifecycle", state="psa-rot-provisioning")
    return lambda dev: apply_lifecycle_command(dev, command)


def _reset(p: Product) -> Operation:
    command = p.command("factory-reset")
    return lambda dev: factory_reset(dev, command)


def _decommission(p: Product) -> Operation:
    command = p.command("decommission")
    return lambda dev: decommission(dev, command)


#: each prepares the template and returns the operation (its command signed once: ECDSA is randomised)
OPERATIONS: dict[str, Callable[[Product], Operation]] = {
    "lock": _lock,
    "provision": _provision,
    "debug": _debug,
    "reprovision": _reprovision,
    "factory-reset": _reset,
    "decommission": _decommission,
}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_a_power_cut_at_every_write_point(product: Product, tmp_path: Path, name: str) -> None:
    operation = OPERATIONS[name](product)
    template = product.root
    if name == "reprovision":
        with Device(template) as dev:
            dev.keystore().generate(CA_KEY_ID, "ecc-p256")  # every device key exists before
        old_keys = device_keys(template)
    old = snapshot(template)

    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    faults = Faults()
    operation(Device(probe, faults))
    points = list(faults.points)
    new = snapshot(probe)
    assert points
    assert new != old

    outcomes = set()
    for n in range(1, len(points) + 1):
        path = tmp_path / f"cut-{n}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut):
            operation(Device(path, Faults(cut_at=n)))
        after = snapshot(path)
        assert after in (old, new), f"cut at point {n} ({points[n - 1]}) left a mixed state: {after}"
        assert not list(path.rglob("*.tmp")), points[n - 1]
        outcomes.add(after == new)
        if name == "reprovision":  # old keys, all of them, or new keys, all of them
            keys = device_keys(path)
            changed = [a != b for a, b in zip(keys, old_keys, strict=True)]
            assert changed == [after == new] * len(keys), f"cut at point {n} ({points[n - 1]}): keys {changed}"
        if after == old:  # nothing happened, and the command was not consumed: it applies now
            operation(Device(path))
            assert snapshot(path) == new
        shutil.rmtree(path)
    assert outcomes == {False, True}, "some cuts must land before the intent, some after"


# -- an interrupted transition undone by putting the old log back -----------------------------------

#: the state each transition with erasing effects ends in
_ERASING: dict[str, str] = {
    "reprovision": "psa-rot-provisioning",
    "factory-reset": "secured",
    "decommission": "decommissioned",
}


def _signed_statement_in_log(root: Path, iak: Path) -> bool:
    """True if the log (readable by anyone with the disk) carries a statement signed by the IAK."""
    msg = cose.parse((root / lifecycle.LOG_FILE).read_bytes(), expect="mac0")
    pending = decode_log(msg.payload or b"").pending
    if pending is None or pending.statement is None:
        return False
    try:
        verify_statement(pending.statement, load_public(iak))
    except IsmError:
        return False
    return True


@pytest.mark.parametrize("name", list(_ERASING))
def test_an_interrupted_transition_is_not_undone_by_putting_the_old_log_back(
    product: Product, tmp_path: Path, name: str
) -> None:
    """The reviewer's attack: copy the log, start a transition, cut the power, put the old log back.

    The intent moves the ``lifecycle`` counter before the first effect, so once
    anything was erased (or a statement exists) the old log is refused
    (``state.lifecycle-rollback``); a cut before the counter moved has done
    nothing and left no statement. Without the old log put back, every cut
    ends in the old state or the new one, and a statement file exists only on
    a device that opens decommissioned.
    """
    operation = OPERATIONS[name](product)
    template = product.root
    old_log = (template / lifecycle.LOG_FILE).read_bytes()
    iak = tmp_path / "iak.pub.pem"
    shutil.copy(template / "keys" / "iak.pub.pem", iak)
    old = snapshot(template)
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    faults = Faults()
    operation(Device(probe, faults))
    assert snapshot(probe)[0] == _ERASING[name]

    verdicts = set()
    for n in range(1, len(faults.points) + 1):
        path, intact = tmp_path / f"cut-{n}", tmp_path / f"intact-{n}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut):
            operation(Device(path, Faults(cut_at=n)))
        where = f"cut at point {n} ({faults.points[n - 1]})"
        assert not _signed_statement_in_log(path, iak), where
        shutil.copytree(path, intact)
        statement = (path / lifecycle.STATEMENT_FILE).is_file()
        (path / lifecycle.LOG_FILE).write_bytes(old_log)  # the attacker's copy from before the transition
        after: Snapshot | str
        try:
            after = snapshot(path)
        except StateCorruptError as exc:
            after = exc.rule
        if isinstance(after, str):
            assert after == "state.lifecycle-rollback", where
            verdicts.add("refused")
        else:
            assert after == old, f"{where}: the old log brought back a changed device: {after}"
            assert not statement, f"{where}: a statement exists for a device that is {after[0]}"
            verdicts.add("untouched")
        state = snapshot(intact)[0]  # the same cut without the attack: rolled forward or never begun
        assert state in (old[0], _ERASING[name]), where
        if statement:
            assert state == "decommissioned", f"{where}: a statement exists for a device that is {state}"
        shutil.rmtree(path)
        shutil.rmtree(intact)
    assert verdicts == {"refused", "untouched"}


def test_reprovisioning_is_decided_on_the_fresh_log_not_the_state_seen_at_open(product: Product) -> None:
    """Two processes: A opens the device (secured); B moves it to recoverable-psa-rot-debug; A re-provisions."""
    with Device(product.root) as dev:
        dev.keystore().generate(CA_KEY_ID, "ecc-p256")  # every device key exists before
    old_keys = device_keys(product.root)
    a = product.device()
    assert a.lifecycle_state == "secured"
    lifecycle.apply_lifecycle_command(product.device(), product.command("lifecycle", state="recoverable-psa-rot-debug"))
    command = product.command("lifecycle", state="psa-rot-provisioning")
    before = files(product.root)
    with pytest.raises(TrustError) as info:  # the device layer alone has no plan: refused, nothing written
        lifecycle.apply_lifecycle_command(a, command)
    assert info.value.rule == "lifecycle.transition"
    assert files(product.root) == before
    entry = apply_lifecycle_command(a, command)
    assert (entry.from_state, entry.to_state) == ("recoverable-psa-rot-debug", "psa-rot-provisioning")
    a.close()
    new_keys = device_keys(product.root)
    assert all(n != o for n, o in zip(new_keys, old_keys, strict=True)), "re-provisioning kept old device keys"
    with Device(product.root) as dev:
        assert dev.lifecycle_state == "psa-rot-provisioning"
        assert not dev.keystore().exists(HELLO_KEY)
