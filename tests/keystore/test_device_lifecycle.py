"""Factory reset and decommissioning on a TPM-backed device (swtpm) and on devices sharing a PKCS#11 token.

The TPM holds the device's keys as TPM objects and binds the counters file
to an NV counter. A reset must destroy the microservices' TPM keys and keep
the device's; a decommissioned device must still open (its counters are
checked against the NV counter, which outlives its keys) and show its
state, while every key is gone and nothing works.

On PKCS#11 two devices share the session's SoftHSM2 token, with the same
key ids: resetting or decommissioning one destroys its keys by id, and the
other must still sign, attest, open its policy and read its storage.
"""

from __future__ import annotations

import gc
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _softhsm import SoftHsm
from _swtpm import Swtpm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from _cli import ism_ok
from ism.crypto.attestation import verify_token
from ism.crypto.keys import load_public, pem_from_der, read_public_pem
from ism.crypto.statement import verify_statement
from ism.device.virtual import POLICY_KEY_ID, STATE_KEY_ID, Device
from ism.errors import TrustError
from ism.runtime import Runtime, open_storage
from ism.services.attestation import IAK_ID
from ism.services.crypto import key_store_id

AUTHENTICATOR = "efeaddc6-46ed-42b1-b68f-7c0d1cd7f69c"


@pytest.fixture
def tpm_token(swtpm: Swtpm, tmp_path: Path, provision_token: object) -> Iterator[Path]:
    assert callable(provision_token)
    dev = provision_token(tmp_path, "--keystore", "tpm", "--tpm-tcti", swtpm.tcti, lock=True)
    yield dev
    gc.collect()  # a TPM has few session slots


def test_reset_and_decommission_on_a_tpm(tpm_token: Path, tmp_path: Path) -> None:
    key = key_store_id(AUTHENTICATOR, "device-2fa")
    with Device(tpm_token) as dev:
        store = dev.keystore()
        assert store.backend == "tpm"
        store.generate(key, "ecc-p256")
        store.generate(IAK_ID, "ecc-p256")
        iak = store.public_key(IAK_ID)
    vendor = tmp_path / "vendor.pem"
    reset, retire = tmp_path / "reset.cose", tmp_path / "retire.cose"
    ism_ok("provision", "command", "factory-reset", "--sign", vendor, "--device", tpm_token, "--out", reset)
    ism_ok("device", "factory-reset", tpm_token, "--command", reset)
    with Device(tpm_token) as dev:
        store = dev.keystore()
        assert not store.exists(key)
        assert store.public_key(IAK_ID) == iak  # the device's own keys stay
        assert store.exists(POLICY_KEY_ID)
        assert dev.installed() == []

    ism_ok("provision", "command", "decommission", "--sign", vendor, "--device", tpm_token, "--out", retire)
    ism_ok("device", "decommission", tpm_token, "--command", retire, "--out", tmp_path / "statement.cose")
    statement = verify_statement(
        (tmp_path / "statement.cose").read_bytes(), load_public(tpm_token / "keys" / "iak.pub.pem")
    )
    assert {IAK_ID, POLICY_KEY_ID} <= set(statement.erased_keys)
    with Device(tpm_token) as dev:  # opens: the counters still check out against the TPM's NV counter
        assert dev.lifecycle_state == "decommissioned"
        assert dev.counters()["lifecycle"] == 3  # init 0, lock 1, reset 2, decommission 3
        with pytest.raises(TrustError) as info:
            dev.keystore()
        assert info.value.rule == "lifecycle.decommissioned"
        raw = dev._open_keystore()  # what is left in the TPM for this device: nothing
        assert not any(raw.exists(k) for k in (IAK_ID, POLICY_KEY_ID, key, "device.identity-ca", "device.storage"))
        assert raw.exists(STATE_KEY_ID)  # but the state MAC key: the device still verifies its own log


# -- two devices on one PKCS#11 token ---------------------------------------------------------------

MS_KEY = key_store_id(AUTHENTICATOR, "device-2fa")
OWNER = uuid.UUID(AUTHENTICATOR)
DEVICE_KEYS = (IAK_ID, POLICY_KEY_ID, "device.identity-ca", "device.storage", MS_KEY, f"storage.{AUTHENTICATOR}")


@pytest.fixture
def pkcs11_pair(softhsm: SoftHsm, tmp_path: Path, provision_token: object) -> tuple[Path, Path]:
    """Two locked devices on the one test token, each with the same microservice key id and a stored record."""
    assert callable(provision_token)
    pin = tmp_path / "pin"
    pin.write_text(softhsm.pin + "\n")
    options = ("--keystore", "pkcs11", "--pkcs11-module", softhsm.module, "--pkcs11-token", softhsm.label)
    devices = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        dev = provision_token(tmp_path / name, *options, "--pkcs11-pin-file", str(pin), lock=True)
        with Device(dev) as device:
            store = device.keystore()
            if not store.exists(MS_KEY):  # (without namespaces b would find a's)
                store.generate(MS_KEY, "ecc-p256")
            storage = open_storage(device)
            try:
                storage.set(OWNER, 1, f"record of {name}".encode())
            finally:
                storage.close()
        devices.append(dev)
    return devices[0], devices[1]


def works(root: Path) -> tuple[bytes, bytes, bytes]:
    """(attestation, policy, microservice) public keys of a device, once it has booted (opening its sealed
    policy with its policy key), attested with its attestation key, signed with its microservice key and
    read its storage."""
    runtime = Runtime.start(root)
    try:
        nonce = os.urandom(32)
        iak = runtime.attestation.public_key_der
        verify_token(runtime.attestation.device_token(nonce), read_public_pem(pem_from_der(iak)), nonce=nonce)
        store = runtime.device.keystore()
        ms_key = store.public_key(MS_KEY)
        signature = store.sign(MS_KEY, b"challenge")
        public = load_der_public_key(ms_key)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
        public.verify(encode_dss_signature(r, s), b"challenge", ec.ECDSA(hashes.SHA256()))
        policy = runtime.device.policy_public_key()
    finally:
        runtime.close()
    with Device(root) as dev:
        storage = open_storage(dev)
        try:
            assert storage.get(OWNER, 1) == f"record of {root.parent.name}".encode()
        finally:
            storage.close()
    return iak, policy, ms_key


def test_factory_reset_on_a_shared_pkcs11_token(pkcs11_pair: tuple[Path, Path]) -> None:
    a, b = pkcs11_pair
    before_a, before_b = works(a), works(b)
    for mine, theirs in zip(before_a, before_b, strict=True):
        assert mine != theirs  # the same key ids name different keys on the one token
    reset = a.parent / "reset.cose"
    ism_ok("provision", "command", "factory-reset", "--sign", a.parent / "vendor.pem", "--device", a, "--out", reset)
    ism_ok("device", "factory-reset", a, "--command", reset)
    with Device(a) as dev:
        store = dev.keystore()
        assert store.backend == "pkcs11"
        assert not store.exists(MS_KEY)
        assert not store.exists(f"storage.{AUTHENTICATOR}")
        assert store.public_key(IAK_ID) == before_a[0]  # the device's own keys stay
        assert dev.policy_public_key() == before_a[1]
        assert dev.installed() == []
    assert works(b) == before_b  # the other device lost nothing


def test_decommission_on_a_shared_pkcs11_token(pkcs11_pair: tuple[Path, Path]) -> None:
    a, b = pkcs11_pair
    before_b = works(b)
    iak_a = works(a)[0]
    retire = a.parent / "retire.cose"
    ism_ok("provision", "command", "decommission", "--sign", a.parent / "vendor.pem", "--device", a, "--out", retire)
    ism_ok("device", "decommission", a, "--command", retire, "--out", a.parent / "statement.cose")
    statement = verify_statement((a.parent / "statement.cose").read_bytes(), load_public(a / "keys" / "iak.pub.pem"))
    assert set(DEVICE_KEYS) <= set(statement.erased_keys)
    assert load_public(a / "keys" / "iak.pub.pem") == read_public_pem(pem_from_der(iak_a))
    with Device(a) as dev:
        assert dev.lifecycle_state == "decommissioned"
        with pytest.raises(TrustError) as info:
            dev.keystore()
        assert info.value.rule == "lifecycle.decommissioned"
        raw = dev._open_keystore()  # what is left on the token for this device: nothing
        assert not any(raw.exists(k) for k in DEVICE_KEYS)
        assert raw.exists(STATE_KEY_ID)  # but the state MAC key: the device still verifies its own log
    assert works(b) == before_b  # every key of the other device, under the same ids, is still there
    with Device(b) as dev:
        assert all(dev.keystore().exists(k) for k in DEVICE_KEYS)


# -- re-provisioning from recoverable-psa-rot-debug -------------------------------------------------


def _reprovision(root: Path) -> None:
    vendor = root.parent / "vendor.pem"
    for state in ("recoverable-psa-rot-debug", "psa-rot-provisioning"):
        command = root.parent / f"{state}.cose"
        ism_ok(
            "provision", "command", "lifecycle", "--state", state, "--sign", vendor, "--device", root, "--out", command
        )
        ism_ok("device", "lifecycle", root, "--command", command)


def test_reprovisioning_regenerates_the_device_keys_on_a_tpm(tpm_token: Path) -> None:
    key = key_store_id(AUTHENTICATOR, "device-2fa")
    with Device(tpm_token) as dev:
        store = dev.keystore()
        store.generate(key, "ecc-p256")
        for k in (IAK_ID, "device.identity-ca"):
            store.generate(k, "ecc-p256")
        before = [store.public_key(k) for k in (IAK_ID, POLICY_KEY_ID, "device.identity-ca")]
    _reprovision(tpm_token)
    with Device(tpm_token) as dev:
        assert dev.lifecycle_state == "psa-rot-provisioning"
        store = dev.keystore()
        assert store.backend == "tpm"
        after = [store.public_key(k) for k in (IAK_ID, POLICY_KEY_ID, "device.identity-ca")]
        assert all(a != b for a, b in zip(after, before, strict=True))
        assert not store.exists(key)
        assert dev.installed() == []


def test_reprovisioning_on_a_shared_pkcs11_token(pkcs11_pair: tuple[Path, Path]) -> None:
    a, b = pkcs11_pair
    before_a, before_b = works(a), works(b)
    _reprovision(a)
    with Device(a) as dev:
        store = dev.keystore()
        assert store.backend == "pkcs11"
        assert store.public_key(IAK_ID) != before_a[0]
        assert dev.policy_public_key() != before_a[1]
        assert not store.exists(MS_KEY)
        assert not store.exists(f"storage.{AUTHENTICATOR}")
        assert dev.installed() == []
    assert works(b) == before_b  # the other device's keys, under the same ids, are untouched
