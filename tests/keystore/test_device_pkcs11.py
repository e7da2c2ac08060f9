"""The reference device with its keys on a PKCS#11 token (SoftHSM2): the 2FA key never touches the disk.

Devices sharing one token each keep to their own namespace of it (labels ``<namespace>/<key id>``);
a device.json from before namespaces keeps the bare key ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _softhsm import SoftHsm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from ism.boards.virtual import Fingerprint, Uart
from ism.crypto.keystore.pkcs11 import Pkcs11KeyStore
from ism.device.virtual import POLICY_KEY_ID, Device, _open_pkcs11
from ism.errors import PlatformError, SignatureError, UsageError
from ism.runtime import Runtime
from ism.services.attestation import IAK_ID, AttestationService

TOKEN = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
NAMES = ("biometric", "authenticator", "link", "analytics")


@pytest.fixture
def pkcs11_device(softhsm: SoftHsm, tmp_path: Path, provision_token: Callable[..., Path]) -> Path:
    pin = tmp_path / "pin"
    pin.write_text(softhsm.pin + "\n")
    return provision_token(
        tmp_path,
        "--keystore",
        "pkcs11",
        "--pkcs11-module",
        softhsm.module,
        "--pkcs11-token",
        softhsm.label,
        "--pkcs11-pin-file",
        str(pin),
    )


def test_token_signs_with_a_key_held_by_the_pkcs11_token(pkcs11_device: Path) -> None:
    runtime = Runtime.start(pkcs11_device)
    try:
        assert runtime.device.keystore().backend == "pkcs11"
        sensor, uart = runtime.peripherals["spi.fingerprint"], runtime.peripherals["uart.host"]
        assert isinstance(sensor, Fingerprint)
        assert isinstance(uart, Uart)
        owner = os.urandom(64)
        sensor.place(owner)

        def exchange(frame: bytes) -> bytes:
            uart.host_send(frame)
            runtime.supervisor.step()
            return uart.host_receive()

        assert exchange(b"E") == b"\x45\x00"
        challenge = os.urandom(32)
        reply = exchange(b"C" + challenge)
        assert reply[:2] == b"\x43\x00"
        authenticator = runtime.policy.by_name["authenticator"].uuid
        public = load_der_public_key(runtime.crypto.public_key(str(authenticator), "device-2fa"))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        sig = reply[2:]
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        public.verify(der, challenge, ec.ECDSA(hashes.SHA256()))
    finally:
        runtime.close()
    # nothing of the microservices' keys is in the device directory: they are token objects
    assert not (pkcs11_device / "keys" / "store").exists()


def test_init_with_a_missing_token_writes_nothing(softhsm: SoftHsm, tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text(softhsm.pin)
    with pytest.raises(PlatformError) as info:
        Device.init(
            tmp_path / "device",
            keystore={"backend": "pkcs11", "module": softhsm.module, "token": "no-such-token", "pin_file": pin},
        )
    assert info.value.rule == "keystore.unavailable"
    assert not (tmp_path / "device" / "device.json").exists()


def token_config(softhsm: SoftHsm, tmp_path: Path) -> dict[str, Any]:
    pin = tmp_path / "pin"
    pin.write_text(softhsm.pin)
    return {"backend": "pkcs11", "module": softhsm.module, "token": softhsm.label, "pin_file": pin}


def iak(device: Device) -> bytes:
    """The device's attestation key (created on first use, as at the first boot)."""
    return AttestationService(
        device.keystore(), device.instance_id, {}, lifecycle_log=device.lifecycle_head
    ).public_key_der


def test_devices_on_one_token_have_their_own_keys(softhsm: SoftHsm, tmp_path: Path) -> None:
    config = token_config(softhsm, tmp_path)
    a, b = Device.init(tmp_path / "a", keystore=config), Device.init(tmp_path / "b", keystore=config)
    try:
        for dev in (a, b):
            saved = json.loads((dev.root / "device.json").read_text())["pkcs11"]
            assert saved["namespace"] == hashlib.sha256(dev.instance_id).hexdigest()[:16]
        assert a.keystore().namespace != b.keystore().namespace  # type: ignore[attr-defined]
        policy_a, policy_b = a.policy_public_key(), b.policy_public_key()
        iak_a, iak_b = iak(a), iak(b)
        assert policy_a != policy_b
        assert iak_a != iak_b  # b's init did not pick up a's attestation key
        signature = b.keystore().sign(IAK_ID, b"b attests")
        with pytest.raises(SignatureError):
            a.keystore().verify(IAK_ID, b"b attests", signature)
        for key_id in (IAK_ID, POLICY_KEY_ID, "device.storage"):
            a.keystore().destroy(key_id)  # what a decommissioning does, by key id
            assert not a.keystore().exists(key_id)
        b.keystore().verify(IAK_ID, b"b attests", b.keystore().sign(IAK_ID, b"b attests"))
        assert (iak(b), b.policy_public_key()) == (iak_b, policy_b)
    finally:
        a.close()
        b.close()
    with Device(tmp_path / "b") as reopened:
        assert (iak(reopened), reopened.policy_public_key()) == (iak_b, policy_b)


def test_a_device_json_without_a_namespace_keeps_the_bare_labels(softhsm: SoftHsm, tmp_path: Path) -> None:
    root = tmp_path / "old"
    Device.init(root, keystore=token_config(softhsm, tmp_path)).close()
    config = json.loads((root / "device.json").read_text())["pkcs11"]
    del config["namespace"]  # as written before namespaces
    key_id = f"old-{os.urandom(6).hex()}"
    with _open_pkcs11(config) as store, Pkcs11KeyStore(softhsm.module, softhsm.label, softhsm.pin) as bare:
        assert store.backend == "pkcs11"
        assert store.namespace is None
        store.generate(key_id, "ecc-p256")
        assert bare.public_key(key_id) == store.public_key(key_id)  # labelled with the bare key id
        store.destroy(key_id)


def test_a_bad_namespace_in_device_json_is_refused(softhsm: SoftHsm, tmp_path: Path) -> None:
    root = tmp_path / "bad"
    Device.init(root, keystore=token_config(softhsm, tmp_path)).close()
    config = json.loads((root / "device.json").read_text())
    config["pkcs11"]["namespace"] = "../other"
    (root / "device.json").write_text(json.dumps(config))
    with pytest.raises(UsageError) as info:
        Device(root)  # the state MAC key is computed in the token: the device does not even open
    assert info.value.rule == "keystore.namespace"
