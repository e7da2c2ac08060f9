"""The KeyStore conformance suite (software, PKCS#11 and TPM backends alike) and the PKCS#11 edge cases.

Every test taking ``backend`` runs against :class:`SoftwareKeyStore`,
against :class:`Pkcs11KeyStore` on a real SoftHSM2 token (with and without a
namespace) and against
:class:`TpmKeyStore` on swtpm; the cross-backend tests import the same
material into both and require identical results.
"""

from __future__ import annotations

import hashlib
import hmac
import inspect
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pkcs11
import pytest
from _softhsm import SoftHsm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ism.crypto.keystore import KEY_TYPES, KeyStore
from ism.crypto.keystore.pkcs11 import Pkcs11KeyStore
from ism.crypto.keystore.software import SoftwareKeyStore
from ism.errors import FormatError, IsmError, PlatformError, SignatureError, UsageError

NewId = Callable[[str], str]
NONCE = bytes(range(12))
MESSAGE = b"measured boot of microservice 7"


def p256_pkcs8(key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def der_signature(raw: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))


def flip(data: bytes, index: int = 0) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1 :]


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


#: P-256: y^2 = x^3 - 3x + b (mod p).
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B


def off_curve_spki() -> bytes:
    """A well-formed P-256 SubjectPublicKeyInfo (uncompressed point) whose point is not on the curve (y + 1)."""
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    x, y = key.public_numbers().x, key.public_numbers().y
    der = spki(key)
    assert der[-64:] == x.to_bytes(32, "big") + y.to_bytes(32, "big")
    forged_y = (y + 1) % P256_P
    assert (forged_y * forged_y - (x**3 - 3 * x + P256_B)) % P256_P != 0
    return der[:-32] + forged_y.to_bytes(32, "big")


@contextmanager
def raises_rule(kind: type[IsmError], rule: str) -> Iterator[pytest.ExceptionInfo[IsmError]]:
    """Like ``pytest.raises(kind)``, and the error names ``rule``."""
    with pytest.raises(kind) as caught:
        yield caught
    assert caught.value.rule == rule, caught.value


# -- lifecycle ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_generate_exists_type_destroy(backend: KeyStore, new_id: NewId, key_type: str) -> None:
    key_id = new_id("life")
    assert not backend.exists(key_id)
    backend.generate(key_id, key_type)  # type: ignore[arg-type]
    assert backend.exists(key_id)
    assert backend.key_type(key_id) == key_type
    with raises_rule(UsageError, "keystore.exists"):
        backend.generate(key_id, key_type)
    backend.destroy(key_id)
    assert not backend.exists(key_id)
    with raises_rule(UsageError, "keystore.missing"):
        backend.key_type(key_id)
    backend.destroy(key_id)  # destroying what is gone is not an error


def test_generated_keys_differ(backend: KeyStore, new_id: NewId) -> None:
    a, b = new_id("a"), new_id("b")
    backend.generate(a, "hmac-sha256")
    backend.generate(b, "hmac-sha256")
    assert backend.mac(a, MESSAGE) != backend.mac(b, MESSAGE)


def test_bad_key_id_and_type_are_refused(backend: KeyStore) -> None:
    with raises_rule(UsageError, "keystore.key-id"):
        backend.generate("Not An Id", "aes-256")
    with raises_rule(UsageError, "keystore.key-id"):
        backend.exists("../escape")
    with raises_rule(UsageError, "keystore.key-type"):
        backend.generate("fine-id", "rsa-2048")  # type: ignore[arg-type]


# -- signatures -----------------------------------------------------------------------------------


def test_sign_verify_and_tampering(backend: KeyStore, new_id: NewId) -> None:
    key_id = new_id("sig")
    backend.generate(key_id, "ecc-p256")
    signature = backend.sign(key_id, MESSAGE)
    assert len(signature) == 64
    backend.verify(key_id, MESSAGE, signature)
    for bad_message, bad_signature in (
        (MESSAGE, flip(signature, 5)),
        (MESSAGE, flip(signature, 63)),
        (MESSAGE + b"!", signature),
        (MESSAGE, signature[:63]),
        (MESSAGE, signature + b"\x00"),
        (MESSAGE, bytes(64)),
    ):
        with raises_rule(SignatureError, "keystore.signature"):
            backend.verify(key_id, bad_message, bad_signature)


def test_public_key_is_spki_and_verifies_with_cryptography(backend: KeyStore, new_id: NewId) -> None:
    key_id = new_id("pub")
    backend.generate(key_id, "ecc-p256")
    public = serialization.load_der_public_key(backend.public_key(key_id))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP256R1)
    public.verify(der_signature(backend.sign(key_id, MESSAGE)), MESSAGE, ec.ECDSA(hashes.SHA256()))
    # and a signature made elsewhere under the same key verifies in the store (imported key)
    private = ec.generate_private_key(ec.SECP256R1())
    imported = new_id("pub-imported")
    backend.import_key(imported, "ecc-p256", p256_pkcs8(private))
    assert backend.public_key(imported) == private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    r, s = decode_dss_signature(private.sign(MESSAGE, ec.ECDSA(hashes.SHA256())))
    backend.verify(imported, MESSAGE, r.to_bytes(32, "big") + s.to_bytes(32, "big"))


# -- AES-GCM --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("plaintext", "aad"), [(b"sealed state", b"ms-7"), (b"", b""), (bytes(1000), b"x" * 77)])
def test_aes_gcm_round_trip(backend: KeyStore, new_id: NewId, plaintext: bytes, aad: bytes) -> None:
    key_id = new_id("aes")
    backend.generate(key_id, "aes-256")
    ciphertext = backend.encrypt(key_id, NONCE, plaintext, aad)
    assert len(ciphertext) == len(plaintext) + 16
    assert backend.decrypt(key_id, NONCE, ciphertext, aad) == plaintext


def test_aes_gcm_tampering_is_one_error(backend: KeyStore, new_id: NewId) -> None:
    key_id = new_id("aes-t")
    backend.generate(key_id, "aes-256")
    ciphertext = backend.encrypt(key_id, NONCE, b"sealed state", b"ms-7")
    for nonce, data, aad in (
        (NONCE, flip(ciphertext, 0), b"ms-7"),  # ciphertext body
        (NONCE, flip(ciphertext, len(ciphertext) - 1), b"ms-7"),  # tag
        (NONCE, ciphertext, b"ms-8"),  # associated data
        (NONCE, ciphertext, b""),
        (flip(NONCE), ciphertext, b"ms-7"),  # nonce
        (NONCE[:11], ciphertext, b"ms-7"),  # short nonce
        (NONCE, ciphertext[:-1], b"ms-7"),  # truncated
        (NONCE, ciphertext[:10], b"ms-7"),  # shorter than a tag
        (NONCE, b"", b"ms-7"),
    ):
        with raises_rule(SignatureError, "keystore.decrypt"):
            backend.decrypt(key_id, nonce, data, aad)
    # a failed decryption leaves the key usable
    assert backend.decrypt(key_id, NONCE, ciphertext, b"ms-7") == b"sealed state"


def test_encrypt_needs_a_12_byte_nonce(backend: KeyStore, new_id: NewId) -> None:
    key_id = new_id("aes-n")
    backend.generate(key_id, "aes-256")
    with raises_rule(UsageError, "keystore.nonce"):
        backend.encrypt(key_id, bytes(16), b"data", b"")


# -- MAC and derive -------------------------------------------------------------------------------


def test_mac_matches_hmac_sha256(backend: KeyStore, new_id: NewId) -> None:
    material = os.urandom(32)
    key_id = new_id("mac")
    backend.import_key(key_id, "hmac-sha256", material)
    for data in (b"", MESSAGE, bytes(5000)):
        assert backend.mac(key_id, data) == hmac.new(material, data, hashlib.sha256).digest()
    assert backend.mac(key_id, b"a") != backend.mac(key_id, b"b")


@pytest.mark.parametrize("source_type", ["hmac-sha256", "aes-256"])
def test_derive_is_hkdf_and_deterministic(backend: KeyStore, new_id: NewId, source_type: str) -> None:
    material = os.urandom(32)
    source = new_id("ikm")
    backend.import_key(source, source_type, material)  # type: ignore[arg-type]
    first, again, other = new_id("d1"), new_id("d2"), new_id("d3")
    backend.derive(source, b"purpose-a", first, "hmac-sha256")
    backend.derive(source, b"purpose-a", again, "hmac-sha256")
    backend.derive(source, b"purpose-b", other, "hmac-sha256")
    assert backend.key_type(first) == "hmac-sha256"
    assert backend.mac(first, MESSAGE) == backend.mac(again, MESSAGE)
    assert backend.mac(first, MESSAGE) != backend.mac(other, MESSAGE)
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"purpose-a").derive(material)
    assert backend.mac(first, MESSAGE) == hmac.new(expected, MESSAGE, hashlib.sha256).digest()
    aes = new_id("d-aes")
    backend.derive(source, b"purpose-a", aes, "aes-256")
    assert backend.key_type(aes) == "aes-256"
    assert backend.encrypt(aes, NONCE, MESSAGE, b"") == AESGCM(expected).encrypt(NONCE, MESSAGE, b"")
    assert backend.exists(source)  # the source is untouched


def test_derive_replaces_an_existing_key(backend: KeyStore, new_id: NewId) -> None:
    source, target = new_id("src"), new_id("dst")
    backend.import_key(source, "hmac-sha256", b"\x01" * 32)
    backend.generate(target, "ecc-p256")
    backend.derive(source, b"v1", target, "hmac-sha256")
    assert backend.key_type(target) == "hmac-sha256"
    first = backend.mac(target, MESSAGE)
    backend.derive(source, b"v2", target, "hmac-sha256")
    assert backend.mac(target, MESSAGE) != first
    # a ratchet: derive a key into its own id
    backend.derive(target, b"next", target, "hmac-sha256")
    assert backend.key_type(target) == "hmac-sha256"


# -- wrong type, missing key, no read-back --------------------------------------------------------


def test_wrong_key_type_for_operation(backend: KeyStore, new_id: NewId) -> None:
    ecc, aes, mac = new_id("w-ecc"), new_id("w-aes"), new_id("w-mac")
    backend.generate(ecc, "ecc-p256")
    backend.generate(aes, "aes-256")
    backend.generate(mac, "hmac-sha256")
    calls: list[Callable[[], object]] = [
        lambda: backend.sign(aes, MESSAGE),
        lambda: backend.sign(mac, MESSAGE),
        lambda: backend.verify(aes, MESSAGE, bytes(64)),
        lambda: backend.public_key(mac),
        lambda: backend.encrypt(mac, NONCE, b"", b""),
        lambda: backend.encrypt(ecc, NONCE, b"", b""),
        lambda: backend.decrypt(ecc, NONCE, bytes(16), b""),
        lambda: backend.mac(aes, MESSAGE),
        lambda: backend.mac(ecc, MESSAGE),
        lambda: backend.derive(ecc, b"x", new_id("w-new"), "aes-256"),
        lambda: backend.derive(mac, b"x", new_id("w-new"), "ecc-p256"),
        lambda: backend.ecdh(aes, spki(ec.generate_private_key(ec.SECP256R1()).public_key())),
        lambda: backend.ecdh(mac, spki(ec.generate_private_key(ec.SECP256R1()).public_key())),
    ]
    for call in calls:
        with raises_rule(UsageError, "keystore.key-type"):
            call()


def test_ecdh_equals_the_peer_side_exchange(backend: KeyStore, software_store: SoftwareKeyStore, new_id: NewId) -> None:
    """ECDH (the protected policy's key agreement) in every backend: the raw X coordinate, as ``cryptography``."""
    generated, imported = new_id("ecdh"), new_id("ecdh-imported")
    backend.generate(generated, "ecc-p256")
    own = serialization.load_der_public_key(backend.public_key(generated))
    assert isinstance(own, ec.EllipticCurvePublicKey)
    secrets = set()
    for _ in range(3):
        peer = ec.generate_private_key(ec.SECP256R1())
        shared = backend.ecdh(generated, spki(peer.public_key()))
        assert len(shared) == 32
        assert shared == peer.exchange(ec.ECDH(), own)
        secrets.add(shared)
    assert len(secrets) == 3
    # the same key material gives the same secret as the software store, and the key still signs
    private = ec.generate_private_key(ec.SECP256R1())
    backend.import_key(imported, "ecc-p256", p256_pkcs8(private))
    if backend is not software_store:  # for the software backend both are the same store
        software_store.import_key(imported, "ecc-p256", p256_pkcs8(private))
    peer = ec.generate_private_key(ec.SECP256R1())
    expected = private.exchange(ec.ECDH(), peer.public_key())
    assert expected == peer.exchange(ec.ECDH(), private.public_key())
    assert backend.ecdh(imported, spki(peer.public_key())) == expected
    assert software_store.ecdh(imported, spki(peer.public_key())) == expected
    # a secret with a leading zero byte is still 32 bytes (tokens and TPMs may drop it): 1 peer in 256
    peer, expected = next(
        (candidate, shared)
        for candidate in (ec.generate_private_key(ec.SECP256R1()) for _ in range(20000))
        if (shared := private.exchange(ec.ECDH(), candidate.public_key()))[0] == 0
    )
    assert backend.ecdh(imported, spki(peer.public_key())) == expected
    backend.verify(generated, MESSAGE, backend.sign(generated, MESSAGE))
    backend.verify(imported, MESSAGE, backend.sign(imported, MESSAGE))


def test_ecdh_refuses_bad_peer_keys_and_wrong_keys(backend: KeyStore, new_id: NewId) -> None:
    key_id, aes, mac = new_id("ecdh-bad"), new_id("ecdh-aes"), new_id("ecdh-mac")
    backend.generate(key_id, "ecc-p256")
    peer_der = spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    p384 = spki(ec.generate_private_key(ec.SECP384R1()).public_key())
    ed25519 = Ed25519PrivateKey.generate().public_key()
    raw_point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    for bad in (
        b"",
        b"not a key",
        peer_der[:-1],  # truncated
        peer_der + b"\x00",  # trailing byte
        raw_point,  # a bare point, not a SubjectPublicKeyInfo
        p384,
        ed25519.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        off_curve_spki(),
        p256_pkcs8(),  # a private key
    ):
        with raises_rule(FormatError, "keystore.peer-key"):
            backend.ecdh(key_id, bad)
    backend.generate(aes, "aes-256")
    backend.generate(mac, "hmac-sha256")
    for wrong in (aes, mac):
        with raises_rule(UsageError, "keystore.key-type"):
            backend.ecdh(wrong, peer_der)
    with raises_rule(UsageError, "keystore.missing"):
        backend.ecdh(new_id("ecdh-gone"), peer_der)
    with raises_rule(UsageError, "keystore.key-id"):
        backend.ecdh("../escape", peer_der)
    # the key is still usable after the refusals
    assert len(backend.ecdh(key_id, peer_der)) == 32


def test_missing_key(backend: KeyStore, new_id: NewId) -> None:
    gone = new_id("gone")
    calls: list[Callable[[], object]] = [
        lambda: backend.key_type(gone),
        lambda: backend.public_key(gone),
        lambda: backend.sign(gone, MESSAGE),
        lambda: backend.verify(gone, MESSAGE, bytes(64)),
        lambda: backend.encrypt(gone, NONCE, b"", b""),
        lambda: backend.decrypt(gone, NONCE, bytes(16), b""),
        lambda: backend.mac(gone, MESSAGE),
        lambda: backend.derive(gone, b"x", new_id("new"), "aes-256"),
        lambda: backend.ecdh(gone, spki(ec.generate_private_key(ec.SECP256R1()).public_key())),
    ]
    for call in calls:
        with raises_rule(UsageError, "keystore.missing"):
            call()
    assert not backend.exists(gone)


def test_import_validation_and_no_overwrite(backend: KeyStore, new_id: NewId) -> None:
    with raises_rule(FormatError, "keystore.import"):
        backend.import_key(new_id("i"), "aes-256", bytes(31))
    with raises_rule(FormatError, "keystore.import"):
        backend.import_key(new_id("i"), "hmac-sha256", bytes(33))
    with raises_rule(FormatError, "keystore.import"):
        backend.import_key(new_id("i"), "ecc-p256", b"not DER")
    with raises_rule(FormatError, "keystore.import"):
        backend.import_key(new_id("i"), "ecc-p256", p256_pkcs8(ec.generate_private_key(ec.SECP384R1())))
    key_id = new_id("keep")
    backend.import_key(key_id, "hmac-sha256", b"\x07" * 32)
    for key_type, material in (("hmac-sha256", b"\x08" * 32), ("aes-256", b"\x08" * 32), ("ecc-p256", p256_pkcs8())):
        with raises_rule(UsageError, "keystore.exists"):
            backend.import_key(key_id, key_type, material)  # type: ignore[arg-type]
    assert backend.mac(key_id, MESSAGE) == hmac.new(b"\x07" * 32, MESSAGE, hashlib.sha256).digest()


KEYSTORE_METHODS = {
    "generate",
    "import_key",
    "exists",
    "key_type",
    "destroy",
    "public_key",
    "sign",
    "verify",
    "encrypt",
    "decrypt",
    "mac",
    "derive",
    "ecdh",  # a shared secret with a peer's (ephemeral) key, never the stored key itself
}


def test_imported_material_cannot_be_read_back(backend: KeyStore, new_id: NewId) -> None:
    """No operation returns key material: only the KeyStore methods (and close) are public."""
    public = {name for name, _ in inspect.getmembers(backend, callable) if not name.startswith("_")}
    assert public <= KEYSTORE_METHODS | {"close", "counter"}  # counter: a TPM NV counter, no key material
    secret, ecc_key = os.urandom(32), ec.generate_private_key(ec.SECP256R1())
    scalar = ecc_key.private_numbers().private_value.to_bytes(32, "big")
    pkcs8 = p256_pkcs8(ecc_key)
    aes, mac, ecc = new_id("r-aes"), new_id("r-mac"), new_id("r-ecc")
    backend.import_key(aes, "aes-256", secret)
    backend.import_key(mac, "hmac-sha256", secret)
    backend.import_key(ecc, "ecc-p256", pkcs8)
    outputs = [
        backend.encrypt(aes, NONCE, secret, secret),
        backend.encrypt(aes, NONCE, b"", b""),
        backend.mac(mac, b""),
        backend.public_key(ecc),
        backend.sign(ecc, secret),
        backend.ecdh(ecc, spki(ec.generate_private_key(ec.SECP256R1()).public_key())),
        repr(backend).encode(),
    ]
    for output in outputs:
        for needle in (secret, scalar, pkcs8):
            assert needle not in output


# -- cross-backend equality -----------------------------------------------------------------------


def test_same_material_same_results_in_both_backends(
    software_store: SoftwareKeyStore, pkcs11_store: Pkcs11KeyStore, new_id: NewId
) -> None:
    material = os.urandom(32)
    aes, mac = new_id("x-aes"), new_id("x-mac")
    for store in (software_store, pkcs11_store):
        store.import_key(aes, "aes-256", material)
        store.import_key(mac, "hmac-sha256", material)
    for plaintext, aad in ((MESSAGE, b"aad"), (b"", b""), (bytes(300), b"")):
        sealed = software_store.encrypt(aes, NONCE, plaintext, aad)
        assert pkcs11_store.encrypt(aes, NONCE, plaintext, aad) == sealed
        assert pkcs11_store.decrypt(aes, NONCE, sealed, aad) == plaintext
    assert software_store.mac(mac, MESSAGE) == pkcs11_store.mac(mac, MESSAGE)


@pytest.mark.parametrize("source_type", ["hmac-sha256", "aes-256"])
def test_derive_is_equal_across_backends(
    software_store: SoftwareKeyStore, pkcs11_store: Pkcs11KeyStore, new_id: NewId, source_type: str
) -> None:
    material = os.urandom(32)
    source, to_mac, to_aes = new_id("x-src"), new_id("x-dmac"), new_id("x-daes")
    for store in (software_store, pkcs11_store):
        store.import_key(source, source_type, material)  # type: ignore[arg-type]
        store.derive(source, b"storage key for ms-7", to_mac, "hmac-sha256")
        store.derive(source, b"storage key for ms-7", to_aes, "aes-256")
    assert software_store.mac(to_mac, MESSAGE) == pkcs11_store.mac(to_mac, MESSAGE)
    assert software_store.encrypt(to_aes, NONCE, MESSAGE, b"") == pkcs11_store.encrypt(to_aes, NONCE, MESSAGE, b"")


def test_ecc_import_is_equal_across_backends(
    software_store: SoftwareKeyStore, pkcs11_store: Pkcs11KeyStore, new_id: NewId
) -> None:
    pkcs8, key_id = p256_pkcs8(), new_id("x-ecc")
    software_store.import_key(key_id, "ecc-p256", pkcs8)
    pkcs11_store.import_key(key_id, "ecc-p256", pkcs8)
    assert software_store.public_key(key_id) == pkcs11_store.public_key(key_id)
    software_store.verify(key_id, MESSAGE, pkcs11_store.sign(key_id, MESSAGE))
    pkcs11_store.verify(key_id, MESSAGE, software_store.sign(key_id, MESSAGE))


# -- PKCS#11 only ---------------------------------------------------------------------------------


@pytest.fixture
def token_session(softhsm: SoftHsm, pkcs11_store: Pkcs11KeyStore) -> Iterator[pkcs11.Session]:
    """A second, public session on the test token (it shares the store's login; closing it does not log out)."""
    session = pkcs11.lib(softhsm.module).get_token(token_label=softhsm.label).open()
    yield session
    session.close()


def test_token_objects_are_sensitive_and_non_extractable(
    pkcs11_store: Pkcs11KeyStore, token_session: pkcs11.Session, new_id: NewId
) -> None:
    ids = {t: new_id(f"attr-{t}") for t in KEY_TYPES}
    for key_type, key_id in ids.items():
        pkcs11_store.generate(key_id, key_type)  # type: ignore[arg-type]
    imported = new_id("attr-imported")
    pkcs11_store.import_key(imported, "aes-256", os.urandom(32))
    derived = new_id("attr-derived")
    pkcs11_store.derive(imported, b"info", derived, "hmac-sha256")
    for key_id in [*ids.values(), imported, derived]:
        objects = list(token_session.get_objects({pkcs11.Attribute.LABEL: key_id}))
        secret = [o for o in objects if o[pkcs11.Attribute.CLASS] != pkcs11.ObjectClass.PUBLIC_KEY]
        assert len(secret) == 1, key_id
        (obj,) = secret
        assert obj[pkcs11.Attribute.TOKEN] is True
        assert obj[pkcs11.Attribute.SENSITIVE] is True
        assert obj[pkcs11.Attribute.EXTRACTABLE] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            obj[pkcs11.Attribute.VALUE]
    # derive left no temporary object behind
    assert not [o for o in token_session.get_objects() if str(o[pkcs11.Attribute.LABEL]).startswith("~")]


def test_ecdh_leaves_no_object_and_keys_can_derive(
    pkcs11_store: Pkcs11KeyStore, token_session: pkcs11.Session, new_id: NewId
) -> None:
    """The readable session secret of an ECDH is destroyed at once; ecc-p256 private keys carry CKA_DERIVE."""
    generated, imported = new_id("ecdh-obj"), new_id("ecdh-obj-imported")
    pkcs11_store.generate(generated, "ecc-p256")
    pkcs11_store.import_key(imported, "ecc-p256", p256_pkcs8())
    for key_id in (generated, imported):
        (private,) = token_session.get_objects(
            {pkcs11.Attribute.LABEL: key_id, pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
        )
        assert private[pkcs11.Attribute.DERIVE] is True
        assert private[pkcs11.Attribute.SIGN] is True
        assert private[pkcs11.Attribute.SENSITIVE] is True
        assert private[pkcs11.Attribute.EXTRACTABLE] is False
    session_objects = {pkcs11.Attribute.TOKEN: False}  # SoftHSM2 shows them to every session of the process
    before = len(list(token_session.get_objects(session_objects)))
    peer = spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    for key_id in (generated, imported):
        pkcs11_store.ecdh(key_id, peer)
    with raises_rule(FormatError, "keystore.peer-key"):
        pkcs11_store.ecdh(generated, off_curve_spki())
    assert len(list(token_session.get_objects(session_objects))) == before


def test_ecdh_refuses_a_key_created_sign_only(softhsm: SoftHsm, pkcs11_store: Pkcs11KeyStore, new_id: NewId) -> None:
    """A key pair made before ECDH support (CKA_DERIVE false) still signs, and refuses ECDH by its own rule."""
    key_id = new_id("sign-only")
    session = pkcs11.lib(softhsm.module).get_token(token_label=softhsm.label).open(rw=True)
    try:
        session.generate_keypair(
            pkcs11.KeyType.EC,
            mechanism=pkcs11.Mechanism.EC_KEY_PAIR_GEN,
            store=True,
            label=key_id,
            public_template={
                pkcs11.Attribute.EC_PARAMS: bytes.fromhex("06082a8648ce3d030107"),
                pkcs11.Attribute.TOKEN: True,
                pkcs11.Attribute.VERIFY: True,
            },
            private_template={
                pkcs11.Attribute.TOKEN: True,
                pkcs11.Attribute.PRIVATE: True,
                pkcs11.Attribute.SENSITIVE: True,
                pkcs11.Attribute.EXTRACTABLE: False,
                pkcs11.Attribute.SIGN: True,
                pkcs11.Attribute.DERIVE: False,
            },
        )
    finally:
        session.close()
    assert pkcs11_store.key_type(key_id) == "ecc-p256"
    pkcs11_store.verify(key_id, MESSAGE, pkcs11_store.sign(key_id, MESSAGE))
    with raises_rule(UsageError, "keystore.key-usage"):
        pkcs11_store.ecdh(key_id, spki(ec.generate_private_key(ec.SECP256R1()).public_key()))


def test_failed_generate_and_import_write_nothing(
    pkcs11_store: Pkcs11KeyStore, token_session: pkcs11.Session, new_id: NewId
) -> None:
    def count() -> int:
        return len(list(token_session.get_objects({pkcs11.Attribute.TOKEN: True})))

    key_id = new_id("once")
    pkcs11_store.generate(key_id, "ecc-p256")
    before = count()
    attempts: list[Callable[[], object]] = [
        lambda: pkcs11_store.generate(key_id, "aes-256"),
        lambda: pkcs11_store.import_key(key_id, "ecc-p256", p256_pkcs8()),
        lambda: pkcs11_store.import_key(new_id("bad"), "ecc-p256", b"junk"),
        lambda: pkcs11_store.derive(new_id("missing"), b"x", new_id("out"), "aes-256"),
    ]
    for attempt in attempts:
        with pytest.raises(IsmError):
            attempt()
    assert count() == before


def test_wrong_token_label_is_unavailable(softhsm: SoftHsm) -> None:
    with raises_rule(PlatformError, "keystore.unavailable") as caught:
        Pkcs11KeyStore(softhsm.module, "no-such-token", softhsm.pin)
    assert "no-such-token" in str(caught.value)
    assert softhsm.module in str(caught.value)


def test_unloadable_module_is_unavailable(softhsm: SoftHsm) -> None:
    with raises_rule(PlatformError, "keystore.unavailable") as caught:
        Pkcs11KeyStore("/nonexistent/libpkcs11.so", softhsm.label, softhsm.pin)
    assert "/nonexistent/libpkcs11.so" in str(caught.value)


def test_wrong_pin_is_locked_and_loses_nothing(softhsm: SoftHsm, pkcs11_store: Pkcs11KeyStore, new_id: NewId) -> None:
    key_id = new_id("survivor")
    pkcs11_store.generate(key_id, "ecc-p256")
    signature = pkcs11_store.sign(key_id, MESSAGE)
    for pin in ("0000", "", softhsm.pin + "0"):
        with raises_rule(PlatformError, "keystore.locked"):
            Pkcs11KeyStore(softhsm.module, softhsm.label, pin)
    with raises_rule(PlatformError, "keystore.unavailable"):
        Pkcs11KeyStore(softhsm.module, "no-such-token", softhsm.pin)
    pkcs11_store.verify(key_id, MESSAGE, signature)
    pkcs11_store.verify(key_id, MESSAGE, pkcs11_store.sign(key_id, MESSAGE))


def test_second_store_shares_the_login_and_closing_it_keeps_the_first(
    softhsm: SoftHsm, pkcs11_store: Pkcs11KeyStore, new_id: NewId
) -> None:
    key_id = new_id("shared")
    pkcs11_store.generate(key_id, "hmac-sha256")
    with Pkcs11KeyStore(softhsm.module, softhsm.label, softhsm.pin) as second:
        assert second.mac(key_id, MESSAGE) == pkcs11_store.mac(key_id, MESSAGE)
    with raises_rule(UsageError, "keystore.closed"):
        second.mac(key_id, MESSAGE)
    second.close()  # idempotent
    assert pkcs11_store.exists(key_id)
    pkcs11_store.mac(key_id, MESSAGE)  # still logged in


_CHILD = textwrap.dedent(
    """
    import sys
    from ism.crypto.keystore.pkcs11 import Pkcs11KeyStore
    from ism.errors import IsmError
    module, label, pin, key_id = sys.argv[1:]
    try:
        store = Pkcs11KeyStore(module, label, pin)
    except IsmError as exc:
        print(exc.rule)
        raise SystemExit(0)
    print(store.sign(key_id, b"from the child").hex())
    store.close()
    """
)


def run_child(softhsm: SoftHsm, pin: str, key_id: str) -> str:
    """A fresh process (no login yet): here the token itself checks the PIN."""
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, softhsm.module, softhsm.label, pin, key_id],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env={**os.environ, "SOFTHSM2_CONF": str(softhsm.conf)},
    )
    return result.stdout.strip()


def test_token_checks_the_pin_in_a_fresh_process(softhsm: SoftHsm, pkcs11_store: Pkcs11KeyStore, new_id: NewId) -> None:
    key_id = new_id("persist")
    pkcs11_store.generate(key_id, "ecc-p256")
    for _ in range(3):
        assert run_child(softhsm, "9999", key_id) == "keystore.locked"
    # the key is on the token: another process signs with it, this one verifies
    signature = bytes.fromhex(run_child(softhsm, softhsm.pin, key_id))
    pkcs11_store.verify(key_id, b"from the child", signature)


# -- PKCS#11 namespaces: stores sharing one token ---------------------------------------------------


def namespaced(softhsm: SoftHsm, namespace: str) -> Pkcs11KeyStore:
    return Pkcs11KeyStore(softhsm.module, softhsm.label, softhsm.pin, namespace=namespace)


def unique_namespace(name: str) -> str:
    return f"{name}-{os.urandom(4).hex()}"


def test_namespaces_keep_keys_with_the_same_id_apart(
    softhsm: SoftHsm, pkcs11_store: Pkcs11KeyStore, token_session: pkcs11.Session, new_id: NewId
) -> None:
    key_id, ns_a, ns_b = new_id("same-id"), unique_namespace("a"), unique_namespace("b")
    with namespaced(softhsm, ns_a) as a, namespaced(softhsm, ns_b) as b:
        a.generate(key_id, "ecc-p256")
        for other in (b, pkcs11_store):  # another namespace, and the bare labels of the layout before namespaces
            assert not other.exists(key_id)
            with raises_rule(UsageError, "keystore.missing"):
                other.sign(key_id, MESSAGE)
            other.destroy(key_id)  # nothing of its own to destroy, and a's key is not its
        assert a.exists(key_id)
        b.generate(key_id, "ecc-p256")  # not keystore.exists: the id is free in b
        pkcs11_store.generate(key_id, "ecc-p256")
        assert len({a.public_key(key_id), b.public_key(key_id), pkcs11_store.public_key(key_id)}) == 3
        with raises_rule(SignatureError, "keystore.signature"):
            a.verify(key_id, MESSAGE, b.sign(key_id, MESSAGE))
        labels = {f"{ns_a}/{key_id}": 2, f"{ns_b}/{key_id}": 2, key_id: 2}  # a private and a public object each
        for label, objects in labels.items():
            assert len(list(token_session.get_objects({pkcs11.Attribute.LABEL: label}))) == objects, label
        b.destroy(key_id)
        assert not b.exists(key_id)
        a.verify(key_id, MESSAGE, a.sign(key_id, MESSAGE))
        pkcs11_store.verify(key_id, MESSAGE, pkcs11_store.sign(key_id, MESSAGE))
        # derive replaces the new id in its own namespace only
        source, target = new_id("ns-source"), new_id("ns-target")
        for store in (a, b):
            store.generate(source, "hmac-sha256")
        a.generate(target, "aes-256")
        sealed = a.encrypt(target, NONCE, MESSAGE, b"")
        b.derive(source, b"info", target, "aes-256")
        assert a.decrypt(target, NONCE, sealed, b"") == MESSAGE
        assert b.encrypt(target, NONCE, MESSAGE, b"") != sealed
        for store in (a, b, pkcs11_store):
            store.destroy(key_id)
        assert a.exists(target)
        assert b.exists(target)
    assert not list(token_session.get_objects({pkcs11.Attribute.LABEL: f"{ns_a}/{key_id}"}))


def test_a_key_id_cannot_name_another_namespace(softhsm: SoftHsm, pkcs11_store: Pkcs11KeyStore, new_id: NewId) -> None:
    key_id, ns_a, ns_b = new_id("victim"), unique_namespace("a"), unique_namespace("b")
    with namespaced(softhsm, ns_a) as a, namespaced(softhsm, ns_b) as b:
        b.generate(key_id, "hmac-sha256")
        forged = (f"{ns_b}/{key_id}", f"../{ns_b}/{key_id}", f"~ism-tmp~{ns_b}/{key_id}", f"{ns_b}%2f{key_id}")
        for store in (a, pkcs11_store):
            for forgery in forged:
                for attempt in (store.exists, store.destroy, store.key_type):
                    with pytest.raises(UsageError) as info:
                        attempt(forgery)
                    assert info.value.rule in ("keystore.key-id", "keystore.missing"), forgery
        assert b.mac(key_id, MESSAGE)


def test_the_longest_namespace_and_key_id_fit_a_label(softhsm: SoftHsm) -> None:
    key_id = ("k" + os.urandom(8).hex()).ljust(96, "x")  # the longest key id; derive adds the temporary prefix
    with namespaced(softhsm, os.urandom(8).hex()) as store:
        store.generate(key_id, "hmac-sha256")
        store.derive(key_id, b"info", key_id, "aes-256")  # replaces it under ~ism-tmp~<16>/<96>: 122 characters
        assert store.key_type(key_id) == "aes-256"
        store.destroy(key_id)


@pytest.mark.parametrize("namespace", ["", "A", "a/b", "~a", "-a", ".a", "a b", "a" * 17, "ns/", "a\n", 7])
def test_bad_namespaces_are_refused(softhsm: SoftHsm, namespace: object) -> None:
    with raises_rule(UsageError, "keystore.namespace"):
        Pkcs11KeyStore(softhsm.module, softhsm.label, softhsm.pin, namespace=namespace)  # type: ignore[arg-type]
