"""The HSM platform abstraction: a narrow key-store interface and its backends.

Owns: the :class:`KeyStore` protocol every backend implements, the key types
and the key-id rule. Backends: ``software`` (:mod:`.software`, the default:
keys wrapped under the device root key in the device directory),
``pkcs11`` (:mod:`.pkcs11`, a real token through PKCS#11; tested against
SoftHSM2) and ``tpm`` (:mod:`.tpm`, TPM 2.0 objects under a storage primary
key, with NV counters for anti-rollback; tested against swtpm).
Must not import: device, hypervisor or anything above.

Threat: private keys leaving the key store. The interface has no operation
that returns private or secret key material: callers sign, verify, encrypt,
decrypt, MAC and derive *by key id*; only public keys can be exported.
Every decrypt/MAC failure raises :class:`~ism.errors.SignatureError` (one
code, no oracle).

``ecdh`` is the one operation that hands the caller a secret: the raw
shared secret of an ephemeral-static key agreement (ECDH-ES), which the
caller feeds into a KDF at once (the protected policy, :mod:`ism.crypto.policy_seal`).
It is a per-message secret, not the stored key, which never leaves the store.
Every backend implements it: ``software`` with ``cryptography``, ``pkcs11``
with ``CKM_ECDH1_DERIVE`` in the token, ``tpm`` with ``TPM2_ECDH_ZGen`` in the
TPM; in each the shared secret (the X coordinate, 32 bytes) transits host
memory. The peer key is parsed by :func:`load_p256_peer` (``keystore.peer-key``).

Operations (all by key id):

================  ===============================================================
generate          create a new key of a type (``ecc-p256``, ``aes-256``, ``hmac-sha256``)
import_key        store key material the caller provides (it is not readable again)
sign / verify     ECDSA P-256 over SHA-256(message); signatures are raw r||s (64 bytes)
encrypt/decrypt   AES-256-GCM with a 12-byte nonce and associated data
mac               HMAC-SHA-256
derive            HKDF-SHA-256 from an ``hmac-sha256`` or ``aes-256`` key into a new stored key
ecdh              ECDH on P-256 between an ``ecc-p256`` key and a peer's public key (SPKI DER)
destroy           delete a key (crypto-erase of what it protected)
public_key        the SubjectPublicKeyInfo DER of an ``ecc-p256`` key
================  ===============================================================
"""

from __future__ import annotations

import re
from typing import Final, Literal, Protocol, get_args

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ism.errors import FormatError, UsageError

__all__ = ["KEY_TYPES", "KeyStore", "KeyType", "check_key_id", "load_p256_peer", "load_p256_private"]

KeyType = Literal["ecc-p256", "aes-256", "hmac-sha256"]
KEY_TYPES: Final[tuple[str, ...]] = get_args(KeyType)
_KEY_ID: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,95}\Z")


def check_key_id(key_id: str) -> str:
    """Key ids are short lower-case identifiers (they name files and token objects)."""
    if not isinstance(key_id, str) or not _KEY_ID.match(key_id) or ".." in key_id:
        raise UsageError("keystore.key-id", "key ids are lower-case letters, digits, '.', '_' and '-'", got=key_id)
    return key_id


def load_p256_private(material: bytes) -> ec.EllipticCurvePrivateKey:
    """Parses key material given to ``import_key`` for an ``ecc-p256`` key (PKCS#8 DER, P-256 only).

    Raises:
        FormatError: ``keystore.import``.
    """
    try:
        key = serialization.load_der_private_key(bytes(material), password=None)
    except ValueError:
        raise FormatError("keystore.import", "not a DER private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise FormatError("keystore.import", "not a P-256 private key")
    return key


def load_p256_peer(der: bytes) -> ec.EllipticCurvePublicKey:
    """Parses the peer key given to ``ecdh``: a P-256 SubjectPublicKeyInfo (DER) whose point is on the curve.

    Raises:
        FormatError: ``keystore.peer-key``.
    """
    try:
        key = serialization.load_der_public_key(bytes(der))
    except (ValueError, UnsupportedAlgorithm):  # not DER, an unknown algorithm or curve, a point off the curve
        raise FormatError("keystore.peer-key", "the peer key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise FormatError("keystore.peer-key", "the peer key is not a P-256 key")
    return key


def check_key_type(key_type: str) -> KeyType:
    if key_type not in KEY_TYPES:
        raise UsageError("keystore.key-type", f"key type must be one of {list(KEY_TYPES)}", got=key_type)
    return key_type  # type: ignore[return-value]


class KeyStore(Protocol):
    """What every key-store backend offers. No method returns private or secret material."""

    backend: str

    def generate(self, key_id: str, key_type: KeyType) -> None: ...

    def import_key(self, key_id: str, key_type: KeyType, material: bytes) -> None: ...

    def exists(self, key_id: str) -> bool: ...

    def key_type(self, key_id: str) -> KeyType: ...

    def destroy(self, key_id: str) -> None: ...

    def public_key(self, key_id: str) -> bytes: ...

    def sign(self, key_id: str, message: bytes) -> bytes: ...

    def verify(self, key_id: str, message: bytes, signature: bytes) -> None: ...

    def encrypt(self, key_id: str, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes: ...

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes: ...

    def mac(self, key_id: str, data: bytes) -> bytes: ...

    def derive(self, key_id: str, info: bytes, new_id: str, new_type: KeyType) -> None: ...

    def ecdh(self, key_id: str, peer_public_der: bytes) -> bytes: ...
