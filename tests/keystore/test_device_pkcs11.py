"""The reference device with its keys on a PKCS#11 token (SoftHSM2): the 2FA key never touches the disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from _softhsm import SoftHsm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from ism.boards.virtual import Fingerprint, Uart
from ism.device.virtual import Device
from ism.errors import PlatformError
from ism.runtime import Runtime

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
