"""The protected access policy on devices whose key store is a PKCS#11 token (SoftHSM2) or a TPM (swtpm).

The device policy key (``device.policy``) is created in the device's key
store by ``ism device policy-key``; the vendor compiles a policy encrypted to
it (``ism policy compile --device``) and the device decrypts it with
``KeyStore.ecdh`` in the token or the TPM when it installs it
(``ism device policy``) and whenever it starts. The reference token then
runs under that policy.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _softhsm import SoftHsm
from _swtpm import Swtpm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from _cli import ism, ism_ok
from ism.boards.virtual import Fingerprint, Uart
from ism.device.virtual import POLICY_KEY_ID, Device
from ism.errors import ErrorCode
from ism.runtime import Runtime

TOKEN = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
POLICY_TEXT = (TOKEN / "policy.toml").read_text()


@pytest.fixture(params=["pkcs11", "tpm"])
def hardware_device(
    request: pytest.FixtureRequest, tmp_path: Path, provision_token: Callable[..., Path]
) -> Iterator[tuple[str, Path]]:
    """(backend, device): the fingerprint token provisioned through the CLI with its keys on SoftHSM2 or swtpm."""
    if request.param == "pkcs11":
        softhsm: SoftHsm = request.getfixturevalue("softhsm")
        pin = tmp_path / "pin"
        pin.write_text(softhsm.pin + "\n")
        options = [
            "--keystore",
            "pkcs11",
            "--pkcs11-module",
            softhsm.module,
            "--pkcs11-token",
            softhsm.label,
            "--pkcs11-pin-file",
            str(pin),
        ]
    else:
        swtpm: Swtpm = request.getfixturevalue("swtpm")
        options = ["--keystore", "tpm", "--tpm-tcti", swtpm.tcti]
    yield request.param, provision_token(tmp_path, *options)
    gc.collect()  # a TPM has few session slots: no store of this test may outlive it


def test_a_protected_policy_installs_and_runs_on_a_hardware_key_store(
    hardware_device: tuple[str, Path], tmp_path: Path
) -> None:
    backend, dev = hardware_device
    # the vendor: a policy key the device trusts as a policy signer; the device's policy key and instance ID
    vendor_key = tmp_path / "vendor-policy.pem"
    ism_ok("keygen", "--out", vendor_key)
    ism_ok("device", "trust", dev, "--add", tmp_path / "vendor-policy.pub.pem", "--role", "policy")
    device_key = tmp_path / "device-policy.pub.pem"
    ism_ok("device", "policy-key", dev, "--out", device_key)
    instance = json.loads(ism_ok("device", "info", dev, "--json"))["instance_id"]
    with Device(dev) as device:
        store = device.keystore()
        assert store.backend == backend
        assert store.key_type(POLICY_KEY_ID) == "ecc-p256"  # the policy key is in the token / the TPM
        assert serialization.load_pem_public_key(device_key.read_bytes()).public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == store.public_key(POLICY_KEY_ID)
    assert not (dev / "keys" / "store").exists()  # no software key store in the device directory

    def compile_policy(version: int) -> Path:
        source, out = tmp_path / f"policy-v{version}.toml", tmp_path / f"policy-v{version}.cose"
        source.write_text(POLICY_TEXT.replace("version = 1", f"version = {version}", 1))
        ism_ok(
            "policy", "compile", source, "--board", TOKEN / "board.toml", "--sign", vendor_key,
            "--device", device_key, "--instance", instance, "--out", out,
        )  # fmt: skip
        return out

    v2, v3 = compile_policy(2), compile_policy(3)
    assert json.loads(ism_ok("device", "policy", dev, v2, "--json"))["version"] == 2
    assert sorted(p.name for p in (dev / "config").iterdir()) == ["policy.cose"]  # the cleartext files are gone

    # the device decrypts it again (ECDH in the key store) at start, and the token works under it
    runtime = Runtime.start(dev)
    try:
        assert runtime.device.keystore().backend == backend
        assert runtime.policy.version == 2
        sensor, uart = runtime.peripherals["spi.fingerprint"], runtime.peripherals["uart.host"]
        assert isinstance(sensor, Fingerprint)
        assert isinstance(uart, Uart)

        def exchange(frame: bytes) -> bytes:
            uart.host_send(frame)
            runtime.supervisor.step()
            return uart.host_receive()

        sensor.place(os.urandom(64))
        assert exchange(b"E") == b"\x45\x00"
        challenge = os.urandom(32)
        reply = exchange(b"C" + challenge)
        assert reply[:2] == b"\x43\x00"
        authenticator = runtime.policy.by_name["authenticator"].uuid
        public = serialization.load_der_public_key(runtime.crypto.public_key(str(authenticator), "device-2fa"))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        sig = reply[2:]
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        public.verify(der, challenge, ec.ECDSA(hashes.SHA256()))
    finally:
        runtime.close()

    # a newer version installs too; the older one is then a rollback
    assert json.loads(ism_ok("device", "policy", dev, v3, "--json"))["version"] == 3
    status, _, err = ism("device", "policy", dev, v2)
    assert status == 1
    assert f"[{int(ErrorCode.ROLLBACK)} policy.rollback]" in err
    with Device(dev) as device:
        assert device.policy().version == 3
