"""Sealing a policy: encrypt-then-sign to one device; opening verifies first, then decrypts in the key store."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, anchor_map, generate, signer_id
from ism.crypto.keystore.software import MemoryKeyFiles, SoftwareKeyStore
from ism.crypto.policy_seal import CONTENT_TYPE, open_sealed, recipient_kid, seal, signer_of
from ism.errors import ErrorCode, FormatError, IsmError
from ism.formats import cbor
from ism.formats.policy_artifact import POLICY_TYPE

KEY_ID = "device.policy"
PAYLOAD = cbor.dumps({1: POLICY_TYPE, 2: 1})


class Dev:
    """A device's key store holding its policy key."""

    def __init__(self) -> None:
        self.store = SoftwareKeyStore(MemoryKeyFiles(), os.urandom(32))
        self.store.generate(KEY_ID, "ecc-p256")
        der = self.store.public_key(KEY_ID)
        key = serialization.load_der_public_key(der)
        assert isinstance(key, ec.EllipticCurvePublicKey)
        self.public = key

    def open(self, data: bytes, *signers: PrivateKey) -> bytes:
        return open_sealed(data, anchor_map([s.public_key() for s in signers]), self.store, KEY_ID)


@pytest.fixture(scope="module")
def vendor() -> PrivateKey:
    return generate("es256")


@pytest.fixture
def dev() -> Dev:
    return Dev()


def _refused(call: Callable[[], object], code: ErrorCode, rule: str) -> IsmError:
    with pytest.raises(IsmError) as info:
        call()
    assert (info.value.code, info.value.rule) == (code, rule), info.value
    return info.value


def test_round_trip_es256_and_ed25519(dev: Dev, vendor: PrivateKey) -> None:
    assert dev.open(seal(PAYLOAD, dev.public, vendor), vendor) == PAYLOAD
    ed = generate("ed25519")
    assert dev.open(seal(PAYLOAD, dev.public, ed), ed) == PAYLOAD


def test_each_seal_is_fresh(dev: Dev, vendor: PrivateKey) -> None:
    a, b = seal(PAYLOAD, dev.public, vendor), seal(PAYLOAD, dev.public, vendor)
    assert a != b  # ephemeral key and IV differ
    assert PAYLOAD not in a


def test_structure_is_sign1_over_cose_encrypt_with_one_ecdh_es_recipient(dev: Dev, vendor: PrivateKey) -> None:
    artifact = seal(PAYLOAD, dev.public, vendor)
    msg = cose.parse(artifact, expect="sign1")
    assert msg.protected == {1: -7, 3: CONTENT_TYPE, 4: signer_id(vendor)}
    assert signer_of(artifact) == signer_id(vendor)
    encrypted = cbor.loads(msg.payload or b"")
    assert isinstance(encrypted, cbor.Tag)
    assert encrypted.number == 96
    protected, unprotected, ciphertext, recipients = encrypted.value
    assert cbor.loads(protected) == {1: 3}
    assert set(unprotected) == {5}
    assert len(ciphertext) == len(PAYLOAD) + 16  # AES-GCM tag
    (r_protected, r_unprotected, r_ciphertext), *rest = recipients
    assert not rest
    assert cbor.loads(r_protected) == {1: -25}
    assert r_ciphertext == b""
    der = dev.store.public_key(KEY_ID)
    assert r_unprotected[4] == recipient_kid(der)
    epk = r_unprotected[-1]
    assert set(epk) == {1, -1, -2, -3}
    assert (epk[1], epk[-1]) == (2, 1)


def test_independent_decryption_following_rfc_9053() -> None:
    """Decrypts with the device's private key in the open, following RFC 9052/9053 step by step."""
    device = ec.generate_private_key(ec.SECP256R1())
    vendor = generate("es256")
    artifact = seal(PAYLOAD, device.public_key(), vendor)
    encrypted = cbor.loads(cose.parse(artifact, expect="sign1").payload or b"")
    protected, unprotected, ciphertext, [[r_protected, r_unprotected, _]] = encrypted.value
    epk = r_unprotected[-1]
    peer = ec.EllipticCurvePublicNumbers(
        int.from_bytes(epk[-2], "big"), int.from_bytes(epk[-3], "big"), ec.SECP256R1()
    ).public_key()
    shared = device.exchange(ec.ECDH(), peer)
    context = cbor.dumps([3, [None, None, None], [None, None, None], [256, r_protected]])
    cek = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)
    aad = cbor.dumps(["Encrypt", protected, b""])
    assert AESGCM(cek).decrypt(unprotected[5], ciphertext, aad) == PAYLOAD


def test_unsigned_is_refused(dev: Dev, vendor: PrivateKey) -> None:
    inner = cose.parse(seal(PAYLOAD, dev.public, vendor), expect="sign1").payload or b""
    _refused(lambda: dev.open(inner, vendor), ErrorCode.SIGNATURE, "policy.unsigned")
    mac = cose.mac0(inner, os.urandom(32))
    _refused(lambda: dev.open(mac, vendor), ErrorCode.SIGNATURE, "policy.unsigned")
    assert signer_of(inner) is None


def test_signer_must_be_an_anchor(dev: Dev, vendor: PrivateKey) -> None:
    other = generate("es256")
    artifact = seal(PAYLOAD, dev.public, other)
    _refused(lambda: dev.open(artifact, vendor), ErrorCode.UNTRUSTED_SIGNER, "policy.signer")


def test_a_forged_kid_fails_the_signature(dev: Dev, vendor: PrivateKey) -> None:
    attacker = generate("es256")
    inner = cose.parse(seal(PAYLOAD, dev.public, vendor), expect="sign1").payload or b""
    forged = cose.sign1(inner, attacker, kid=signer_id(vendor), protected={3: CONTENT_TYPE})
    _refused(lambda: dev.open(forged, vendor), ErrorCode.SIGNATURE, "policy.signature")


def test_the_content_type_is_required(dev: Dev, vendor: PrivateKey) -> None:
    inner = cose.parse(seal(PAYLOAD, dev.public, vendor), expect="sign1").payload or b""
    untyped = cose.sign1(inner, vendor, kid=signer_id(vendor))
    _refused(lambda: dev.open(untyped, vendor), ErrorCode.FORMAT, "policy.artifact")


def test_encrypted_to_another_key(dev: Dev, vendor: PrivateKey) -> None:
    artifact = seal(PAYLOAD, Dev().public, vendor)
    _refused(lambda: dev.open(artifact, vendor), ErrorCode.TRUST, "policy.recipient")


def _resign(artifact: bytes, vendor: PrivateKey, edit: Callable[[list[Any]], None]) -> bytes:
    """Edits the COSE_Encrypt inside, then has the vendor sign it again (a signed but broken artifact)."""
    inner = cbor.loads(cose.parse(artifact, expect="sign1").payload or b"")
    edit(inner.value)
    return cose.sign1(cbor.dumps(inner), vendor, kid=signer_id(vendor), protected={3: CONTENT_TYPE})


def test_ciphertext_that_does_not_decrypt(dev: Dev, vendor: PrivateKey) -> None:
    def flip(body: list[Any]) -> None:
        ct = bytearray(body[2])
        ct[0] ^= 1
        body[2] = bytes(ct)

    artifact = _resign(seal(PAYLOAD, dev.public, vendor), vendor, flip)
    _refused(lambda: dev.open(artifact, vendor), ErrorCode.SIGNATURE, "policy.decrypt")


def _recipient_header(body: list[Any]) -> dict[int, Any]:
    recipients = body[3]
    assert isinstance(recipients, list)
    header = recipients[0][1]
    assert isinstance(header, dict)
    return header


_ENVELOPE_EDITS: dict[str, Callable[[list[Any]], None]] = {
    "content alg": lambda b: b.__setitem__(0, cbor.dumps({1: 1})),
    "extra unprotected label": lambda b: b[1].__setitem__(99, 1),
    "short IV": lambda b: b[1].__setitem__(5, b"\x00" * 8),
    "two recipients": lambda b: b[3].append(b[3][0]),
    "recipient alg": lambda b: b[3][0].__setitem__(0, cbor.dumps({1: -26})),
    "recipient ciphertext": lambda b: b[3][0].__setitem__(2, b"\x00"),
    "ephemeral off the curve": lambda b: _recipient_header(b)[-1].__setitem__(-3, b"\x01" * 32),
    "ephemeral on another curve": lambda b: _recipient_header(b)[-1].__setitem__(-1, 2),
    "kid size": lambda b: _recipient_header(b).__setitem__(4, b"\x00"),
}


@pytest.mark.parametrize("name", sorted(_ENVELOPE_EDITS))
def test_strict_envelope(dev: Dev, vendor: PrivateKey, name: str) -> None:
    artifact = _resign(seal(PAYLOAD, dev.public, vendor), vendor, _ENVELOPE_EDITS[name])
    _refused(lambda: dev.open(artifact, vendor), ErrorCode.FORMAT, "policy.artifact")


def test_seal_needs_a_p256_device_key(vendor: PrivateKey) -> None:
    with pytest.raises(FormatError) as info:
        seal(PAYLOAD, generate("ed25519").public_key(), vendor)  # type: ignore[arg-type]
    assert info.value.rule == "keys.type"
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    with pytest.raises(FormatError) as info:
        seal(PAYLOAD, p384, vendor)
    assert info.value.rule == "keys.curve"
