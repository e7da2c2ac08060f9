"""The protected access policy under attack: every refusal names its rule, power cuts leave old or new.

A policy artifact is a COSE_Sign1 by a *policy signer* anchor over a
COSE_Encrypt to the device's policy key (``ism.crypto.policy_seal``). The
table below sends the device unsigned, tampered, foreign-signed and
developer-signed artifacts, artifacts for another device (by instance ID and
by key), older and replayed versions, and malformed ones, and expects each
to be refused with its code and rule and nothing written. Then: a power cut
at every write point of ``install_policy`` (from a cleartext configuration,
and from an earlier protected policy), the stored artifact put back to an
older copy offline, and a grep of the device directory for what the policy
says (it is never on disk in clear).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, PublicKey, generate, pem_from_der, public_pem, read_public_pem, signer_id
from ism.crypto.policy_seal import CONTENT_TYPE, seal
from ism.device._atomic import Faults, PowerCut
from ism.device.virtual import MAX_POLICY_SIZE, POLICY_COUNTER, Device
from ism.errors import ErrorCode, IsmError, UntrustedSignerError
from ism.formats import cbor
from ism.formats.policy_artifact import PolicyPayload, make_payload

BLINKY = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a02"
HELLO = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a01"
#: a resource only the board file names (no package, module or manifest mentions it)
SECRET_RESOURCE = "mem.vault-7"
BOARD = f"""
name = "test-board"
[resources."gpio.led0"]
peripheral = "led"
modes = ["read", "write"]
[resources.timer]
peripheral = "timer"
[resources."{SECRET_RESOURCE}"]
peripheral = "memory"
size = 64
"""


def policy_text(version: int, *, led: bool = True, hello: bool = False) -> str:
    grants = '"gpio.led0" = ["write"], timer = ["read"]' if led else 'timer = ["read"]'
    text = f"""
version = {version}
board = "test-board"
[microservice.blinky]
uuid = "{BLINKY}"
resources = {{ {grants}, "{SECRET_RESOURCE}" = ["read"] }}
"""
    if hello:
        text += f'[microservice.hello]\nuuid = "{HELLO}"\n'
    return text


@pytest.fixture(scope="module")
def vendor() -> PrivateKey:
    """The vendor's policy signing key (a policy signer anchor on every device here)."""
    return generate("es256")


def device_key(dev: Device) -> PublicKey:
    """The device's policy key, as ``ism device policy-key`` gives it to the vendor."""
    return read_public_pem(pem_from_der(dev.policy_public_key()))


def artifact(
    dev: Device,
    signer: PrivateKey,
    version: int = 1,
    *,
    text: str | None = None,
    instance: bytes | None = None,
    to: Device | None = None,
) -> bytes:
    payload = make_payload(BOARD, text or policy_text(version), instance or dev.instance_id)
    return seal(payload.encode(), device_key(to or dev), signer)


@pytest.fixture
def make_device(
    tmp_path: Path, dev_key: PrivateKey, vendor: PrivateKey, build_package: Callable[..., bytes]
) -> Callable[[str], Device]:
    """A device that trusts the developer for packages and the vendor for policies, with blinky installed."""

    def make(name: str = "dev") -> Device:
        dev = Device.init(tmp_path / name)
        dev.add_anchor(public_pem(dev_key))
        dev.add_anchor(public_pem(vendor), role="policy")
        dev.install(build_package("blinky"))
        return dev

    return make


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- refusals -------------------------------------------------------------------------------------


def _unsigned(dev: Device, vendor: PrivateKey, **_: Any) -> bytes:
    return cose.parse(artifact(dev, vendor), expect="sign1").payload or b""


def _mac_instead_of_signature(dev: Device, vendor: PrivateKey, **_: Any) -> bytes:
    return cose.mac0(_unsigned(dev, vendor), dev.state_mac_key)


def _tampered(dev: Device, vendor: PrivateKey, **_: Any) -> bytes:
    sign1 = cbor.loads(artifact(dev, vendor))
    payload = bytearray(sign1.value[2])
    payload[-1] ^= 0x01  # the last byte of the ciphertext's tag
    sign1.value[2] = bytes(payload)
    return cbor.dumps(sign1)


def _foreign(dev: Device, vendor: PrivateKey, *, other_key: PrivateKey, **_: Any) -> bytes:
    return artifact(dev, other_key)


def _developer(dev: Device, vendor: PrivateKey, *, dev_key: PrivateKey, **_: Any) -> bytes:
    return artifact(dev, dev_key)


def _other_instance(dev: Device, vendor: PrivateKey, *, other: Device, **_: Any) -> bytes:
    return artifact(dev, vendor, instance=other.instance_id)  # encrypted to this device, names the other


def _other_key(dev: Device, vendor: PrivateKey, *, other: Device, **_: Any) -> bytes:
    return artifact(dev, vendor, to=other)  # names this device, encrypted to the other's key


def _other_device_entirely(dev: Device, vendor: PrivateKey, *, other: Device, **_: Any) -> bytes:
    return artifact(other, vendor)


def _version_mismatch(dev: Device, vendor: PrivateKey, **_: Any) -> bytes:
    payload = PolicyPayload(5, dev.instance_id, BOARD, policy_text(1))
    return seal(payload.encode(), device_key(dev), vendor)


def _undecryptable(dev: Device, vendor: PrivateKey, **_: Any) -> bytes:
    inner = cbor.loads(_unsigned(dev, vendor))
    inner.value[2] = bytes(len(inner.value[2]))  # signed by the vendor, but not what was encrypted
    return cose.sign1(cbor.dumps(inner), vendor, kid=signer_id(vendor), protected={3: CONTENT_TYPE})


def _oversize(dev: Device, vendor: PrivateKey, **_: Any) -> bytes:
    return bytes(MAX_POLICY_SIZE + 1)


def _ungranted_imports(dev: Device, vendor: PrivateKey, **_: Any) -> bytes:
    text = f'version = 1\nboard = "test-board"\n[microservice.blinky]\nuuid = "{BLINKY}"\n'
    return artifact(dev, vendor, text=text)  # blinky imports resource_* but is granted nothing


@dataclass(frozen=True)
class Attack:
    build: Callable[..., bytes]
    code: ErrorCode
    rule: str


ATTACKS = {
    "unsigned (bare COSE_Encrypt)": Attack(_unsigned, ErrorCode.SIGNATURE, "policy.unsigned"),
    "MAC'd, not signed": Attack(_mac_instead_of_signature, ErrorCode.SIGNATURE, "policy.unsigned"),
    "tampered": Attack(_tampered, ErrorCode.SIGNATURE, "policy.signature"),
    "foreign-signed": Attack(_foreign, ErrorCode.UNTRUSTED_SIGNER, "policy.signer"),
    "signed by a microservice developer": Attack(_developer, ErrorCode.UNTRUSTED_SIGNER, "policy.signer"),
    "for another device (instance ID)": Attack(_other_instance, ErrorCode.TRUST, "policy.device"),
    "encrypted to another device": Attack(_other_key, ErrorCode.TRUST, "policy.recipient"),
    "another device's artifact": Attack(_other_device_entirely, ErrorCode.TRUST, "policy.recipient"),
    "signed, but does not decrypt": Attack(_undecryptable, ErrorCode.SIGNATURE, "policy.decrypt"),
    "version field is not the policy's": Attack(_version_mismatch, ErrorCode.FORMAT, "policy.artifact-version"),
    "oversize": Attack(_oversize, ErrorCode.FORMAT, "policy.artifact-size"),
    "does not grant what a module imports": Attack(_ungranted_imports, ErrorCode.FORMAT, "policy.capability"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_refused_with_its_rule_and_nothing_written(
    name: str,
    make_device: Callable[[str], Device],
    vendor: PrivateKey,
    dev_key: PrivateKey,
    other_key: PrivateKey,
) -> None:
    attack = ATTACKS[name]
    dev, other = make_device("dev"), make_device("other")
    data = attack.build(dev, vendor, dev_key=dev_key, other_key=other_key, other=other)
    before = snapshot(dev.root)
    with pytest.raises(IsmError) as info:
        dev.install_policy(data)
    assert (info.value.code, info.value.rule) == (attack.code, attack.rule), info.value
    assert snapshot(dev.root) == before
    assert not dev.configured()


def test_the_developer_is_told_it_is_not_a_policy_signer(
    make_device: Callable[[str], Device], dev_key: PrivateKey
) -> None:
    with pytest.raises(UntrustedSignerError) as info:
        make_device().install_policy(artifact(make_device("x"), dev_key))
    assert "microservice signer does not qualify" in info.value.message


def test_a_policy_signer_does_not_sign_microservices(
    make_device: Callable[[str], Device], vendor: PrivateKey, build_package: Callable[..., bytes]
) -> None:
    with pytest.raises(IsmError) as info:
        make_device().install(build_package("hello", key=vendor))
    assert info.value.code == ErrorCode.UNTRUSTED_SIGNER


@pytest.mark.parametrize(("first", "second"), [(2, 1), (1, 1), (3, 3)])
def test_older_or_replayed_versions_are_rollbacks(
    make_device: Callable[[str], Device], vendor: PrivateKey, first: int, second: int
) -> None:
    dev = make_device()
    dev.install_policy(artifact(dev, vendor, first))
    before = snapshot(dev.root)
    with pytest.raises(IsmError) as info:
        dev.install_policy(artifact(dev, vendor, second))
    assert (info.value.code, info.value.rule) == (ErrorCode.ROLLBACK, "policy.rollback")
    assert (info.value.got, info.value.expected) == (second, f"> {first}")
    assert snapshot(dev.root) == before


def test_replaying_the_old_artifact_after_a_newer_one(make_device: Callable[[str], Device], vendor: PrivateKey) -> None:
    dev = make_device()
    v1, v2 = artifact(dev, vendor, 1), artifact(dev, vendor, 2, text=policy_text(2, led=False))
    assert dev.install_policy(v1).version == 1
    assert dev.install_policy(v2).version == 2
    with pytest.raises(IsmError) as info:
        Device(dev.root).install_policy(v1)
    assert info.value.rule == "policy.rollback"
    assert Device(dev.root).policy().by_name["blinky"].resources.keys() == {"timer", SECRET_RESOURCE}
    assert Device(dev.root).counters()[POLICY_COUNTER] == 2


def test_an_older_artifact_put_back_offline_is_refused_at_boot(
    make_device: Callable[[str], Device], vendor: PrivateKey
) -> None:
    dev = make_device()
    v1 = artifact(dev, vendor, 1)
    dev.install_policy(v1)
    dev.install_policy(artifact(dev, vendor, 2))
    (dev.root / "config" / "policy.cose").write_bytes(v1)  # the attacker restores the older, genuine file
    with pytest.raises(IsmError) as info:
        Device(dev.root).policy()
    assert (info.value.code, info.value.rule) == (ErrorCode.ROLLBACK, "policy.rollback")


def test_a_cleartext_policy_put_in_place_of_the_artifact_is_not_used(
    make_device: Callable[[str], Device], vendor: PrivateKey
) -> None:
    dev = make_device()
    dev.install_policy(artifact(dev, vendor, 1))
    (dev.root / "config" / "policy.cose").unlink()  # offline: the artifact goes, a permissive cleartext policy comes
    (dev.root / "config" / "board.toml").write_text(BOARD)
    (dev.root / "config" / "policy.toml").write_text(policy_text(1, hello=True))
    for read in (Device(dev.root).policy, Device(dev.root).board):
        with pytest.raises(IsmError) as info:
            read()
        assert (info.value.code, info.value.rule) == (ErrorCode.TRUST, "policy.protected")


def test_another_devices_stored_artifact_is_refused_at_boot(
    make_device: Callable[[str], Device], vendor: PrivateKey
) -> None:
    dev, other = make_device("dev"), make_device("other")
    dev.install_policy(artifact(dev, vendor))
    (other.root / "config").mkdir()
    shutil.copy(dev.root / "config" / "policy.cose", other.root / "config" / "policy.cose")
    with pytest.raises(IsmError) as info:
        Device(other.root).board()
    assert info.value.rule == "policy.recipient"


def test_no_cleartext_configuration_once_protected(make_device: Callable[[str], Device], vendor: PrivateKey) -> None:
    dev = make_device()
    with pytest.raises(IsmError) as info:
        dev.configure(BOARD, policy_text(9))  # a policy signer is provisioned: signed policies only
    assert (info.value.code, info.value.rule) == (ErrorCode.TRUST, "policy.protected")
    assert not dev.configured()


def test_the_policy_is_never_on_disk_in_clear(
    make_device: Callable[[str], Device], vendor: PrivateKey, tmp_path: Path, dev_key: PrivateKey
) -> None:
    """Configured in clear first (as before this feature), then protected: nothing readable remains."""
    dev = Device.init(tmp_path / "clear")
    dev.add_anchor(public_pem(dev_key))
    dev.configure(BOARD, policy_text(1))
    assert SECRET_RESOURCE.encode() in (dev.root / "config" / "board.toml").read_bytes()
    dev.add_anchor(public_pem(vendor), role="policy")
    dev.install_policy(artifact(dev, vendor, 2))
    dev.boot()
    assert SECRET_RESOURCE in Device(dev.root).board().resources
    assert SECRET_RESOURCE in Device(dev.root).policy().by_name["blinky"].resources
    leaks = [name for name, data in snapshot(dev.root).items() if SECRET_RESOURCE.encode() in data]
    assert leaks == []
    assert sorted(p.name for p in (dev.root / "config").iterdir()) == ["policy.cose"]


# -- power cuts ------------------------------------------------------------------------------------

State = tuple[int, dict[str, Any], dict[str, int], tuple[str, ...]]


def _state(root: Path) -> State:
    """Re-opens the device (which recovers) and reads the policy in effect, the counters and the config files."""
    dev = Device(root)
    policy = dev.policy()
    grants = {name: dict(entry.resources) for name, entry in policy.by_name.items()}
    config = tuple(sorted(p.name for p in (root / "config").iterdir()))
    return policy.version, grants, dev.counters(), config


def _every_cut(prepare: Callable[[Path], None], new: bytes, work: Path) -> None:
    template = work / "template"
    prepare(template)
    old = _state(template)
    probe = work / "probe"
    shutil.copytree(template, probe)
    faults = Faults()
    Device(probe, faults).install_policy(new)
    points = list(faults.points)
    assert len(points) >= 10, points
    after = _state(probe)
    assert after != old
    assert after[2][POLICY_COUNTER] == after[0]
    outcomes = set()
    for n in range(1, len(points) + 1):
        path = work / f"cut-{n}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut):
            Device(path, Faults(cut_at=n)).install_policy(new)
        state = _state(path)
        assert state in (old, after), f"cut at point {n} ({points[n - 1]}) left a mixed state"
        assert not list(path.rglob("*.tmp")), points[n - 1]
        outcomes.add(state == after)
        # the same artifact again: installs on the old state, is a replay on the new one
        if state == old:
            assert Device(path).install_policy(new).version == after[0]
        else:
            with pytest.raises(IsmError) as info:
                Device(path).install_policy(new)
            assert info.value.rule == "policy.rollback"
        assert _state(path) == after
        assert all(e.verdict == "booted" for e in Device(path).boot().microservices)
    assert outcomes == {False, True}


def test_power_cut_from_a_cleartext_configuration(
    tmp_path: Path, dev_key: PrivateKey, vendor: PrivateKey, build_package: Callable[..., bytes]
) -> None:
    blinky = build_package("blinky")
    shared = Device.init(tmp_path / "keys-only")  # instance and policy key are per device: see prepare

    def prepare(root: Path) -> None:
        shutil.copytree(shared.root, root)
        dev = Device(root)
        dev.add_anchor(public_pem(dev_key))
        dev.install(blinky)
        dev.configure(BOARD, policy_text(1))
        dev.add_anchor(public_pem(vendor), role="policy")

    new = artifact(shared, vendor, 2, text=policy_text(2, led=False, hello=True))
    _every_cut(prepare, new, tmp_path)


def test_power_cut_replacing_a_protected_policy(
    tmp_path: Path, dev_key: PrivateKey, vendor: PrivateKey, build_package: Callable[..., bytes]
) -> None:
    blinky = build_package("blinky")
    shared = Device.init(tmp_path / "keys-only")
    v1 = artifact(shared, vendor, 1)

    def prepare(root: Path) -> None:
        shutil.copytree(shared.root, root)
        dev = Device(root)
        dev.add_anchor(public_pem(dev_key))
        dev.add_anchor(public_pem(vendor), role="policy")
        dev.install(blinky)
        dev.boot()
        dev.install_policy(v1)

    _every_cut(prepare, artifact(shared, vendor, 2, text=policy_text(2, led=False)), tmp_path)
