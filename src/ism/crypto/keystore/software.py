"""The software key store: keys wrapped under the device root key, one sealed file each.

Owns: generating and using keys in software with ``cryptography``; sealing
each key (AES-256-GCM under the device root key, the key id as associated
data) into a blob the caller persists through a :class:`KeyFiles`.
Must not import: device or anything above (the device supplies the files).

Threat: a key file read or altered on disk. Key material is stored only
encrypted under the root key; a blob moved to another key id, altered or
truncated fails its tag and is refused (``keystore.integrity``); nothing in
the interface returns private material. A key is unsealed once and kept in
memory (an ``aes-256`` key with its ``AESGCM`` object) until it is replaced
or destroyed: both drop it, so nothing encrypts or decrypts with a destroyed
key. On a virtual device the root key itself is a file in the device
directory (0600): this backend protects against reading the key files alone,
not against reading the whole directory — that is what the ``pkcs11``
backend is for.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import NamedTuple, Protocol

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ism.crypto.keystore import KeyType, check_key_id, check_key_type, load_p256_peer, load_p256_private
from ism.errors import FormatError, SignatureError, StateCorruptError, UsageError
from ism.formats import cbor

__all__ = ["KeyFiles", "MemoryKeyFiles", "SoftwareKeyStore"]

_SIZES = {"aes-256": 32, "hmac-sha256": 32}
#: ES256's signature algorithm object (immutable), made once rather than for every signature.
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())


def _minimal_positive(integer: bytes) -> bool:
    """A DER INTEGER's content that is positive, minimally encoded and below 2**256 (1..33 bytes)."""
    return integer[0] < 0x80 and (
        len(integer) == 1 or (integer[0] != 0 and len(integer) < 33) or (integer[0] == 0 and integer[1] >= 0x80)
    )


def _raw_signature(der: bytes) -> bytes:
    """An ECDSA P-256 signature from DER (SEQUENCE of INTEGER r, INTEGER s) to raw r||s (64 bytes).

    The shape OpenSSL gives — short-form lengths, each integer positive, minimally encoded and below
    2**256 — is cut out with slices; anything else goes through
    ``decode_dss_signature`` and ``int.to_bytes``, as every signature did before (same result, same errors).
    """
    n = len(der)
    if n >= 8 and der[0] == 0x30 and der[1] == n - 2 and der[2] == 0x02:
        r_len = der[3]
        s_at = 4 + r_len
        if 1 <= r_len <= 33 and s_at + 2 <= n and der[s_at] == 0x02:
            s_len = der[s_at + 1]
            r = der[4:s_at]
            s = der[s_at + 2 :]
            if 1 <= s_len <= 33 and len(s) == s_len and _minimal_positive(r) and _minimal_positive(s):
                return r[-32:].rjust(32, b"\0") + s[-32:].rjust(32, b"\0")
    r_int, s_int = decode_dss_signature(der)
    return r_int.to_bytes(32, "big") + s_int.to_bytes(32, "big")


class _Loaded(NamedTuple):
    """An unsealed key in the cache (dropped whenever the key is replaced or destroyed)."""

    key_type: KeyType
    material: bytes
    #: an ``ecc-p256`` key's private key object
    private: ec.EllipticCurvePrivateKey | None
    #: an ``aes-256`` key's AES-GCM object, made once per load rather than for every encryption
    aead: AESGCM | None


class KeyFiles(Protocol):
    """Where sealed key blobs live (the device supplies an atomic, crash-safe implementation)."""

    def read(self, name: str) -> bytes | None: ...

    def write(self, name: str, data: bytes) -> None: ...

    def remove(self, name: str) -> None: ...


class MemoryKeyFiles:
    """Sealed key blobs in memory: for volatile key stores (tests, benchmarks, a throw-away device)."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def read(self, name: str) -> bytes | None:
        return self.blobs.get(name)

    def write(self, name: str, data: bytes) -> None:
        self.blobs[name] = bytes(data)

    def remove(self, name: str) -> None:
        self.blobs.pop(name, None)


class SoftwareKeyStore:
    """Keys sealed under ``root_key`` (32 bytes) in ``files``."""

    backend = "software"

    def __init__(self, files: KeyFiles, root_key: bytes) -> None:
        if len(root_key) != 32:
            raise UsageError("keystore.root-key", "the root key must be 32 bytes")
        self._files = files
        self._root = AESGCM(root_key)
        self._cache: dict[str, _Loaded] = {}

    # -- sealing --------------------------------------------------------------------------------

    def _store(self, key_id: str, key_type: KeyType, material: bytes, replace: bool = False) -> None:
        check_key_id(key_id)
        if not replace and self.exists(key_id):
            raise UsageError("keystore.exists", "a key with this id already exists", subject=key_id)
        nonce = os.urandom(12)
        body = cbor.dumps({1: key_type, 2: material})
        self._files.write(key_id, nonce + self._root.encrypt(nonce, body, b"ism-key:" + key_id.encode()))
        self._cache.pop(key_id, None)

    def _load(self, key_id: str) -> _Loaded:
        cached = self._cache.get(check_key_id(key_id))
        if cached is not None:
            return cached
        blob = self._files.read(key_id)
        if blob is None:
            raise UsageError("keystore.missing", "no such key", subject=key_id)
        try:
            body = cbor.loads(self._root.decrypt(blob[:12], blob[12:], b"ism-key:" + key_id.encode()))
        except (InvalidTag, ValueError, FormatError):
            raise StateCorruptError(
                "keystore.integrity", "a sealed key fails its integrity check", subject=key_id
            ) from None
        if (
            not isinstance(body, dict)
            or body.get(1) not in _SIZES | {"ecc-p256": 0}
            or not isinstance(body.get(2), bytes)
        ):
            raise StateCorruptError("keystore.integrity", "a sealed key is malformed", subject=key_id)
        key_type: KeyType = body[1]
        material: bytes = body[2]
        private = None
        if key_type == "ecc-p256":
            loaded = serialization.load_der_private_key(material, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise StateCorruptError("keystore.integrity", "a sealed key is malformed", subject=key_id)
            private = loaded
        entry = _Loaded(key_type, material, private, AESGCM(material) if key_type == "aes-256" else None)
        self._cache[key_id] = entry
        return entry

    def _typed(self, key_id: str, *types: KeyType) -> tuple[bytes, ec.EllipticCurvePrivateKey | None]:
        key_type, material, private, _ = self._load(key_id)
        if key_type not in types:
            raise UsageError(
                "keystore.key-type", f"operation needs a {'/'.join(types)} key", subject=key_id, got=key_type
            )
        return material, private

    def _aesgcm(self, key_id: str) -> AESGCM:
        """The AES-GCM object of the ``aes-256`` key ``key_id``.

        A key id in the cache was checked when it was loaded, and its entry (the object with it) is
        dropped when the key is replaced or destroyed; anything else (first use, a wrong type, a bad
        id, a destroyed key) takes the checked path and its errors.
        """
        entry = self._cache.get(key_id) if type(key_id) is str else None
        if entry is None or entry.aead is None:
            self._typed(key_id, "aes-256")
            entry = self._cache[key_id]
        assert entry.aead is not None
        return entry.aead

    # -- the KeyStore interface -------------------------------------------------------------------

    def generate(self, key_id: str, key_type: KeyType) -> None:
        check_key_type(key_type)
        if key_type == "ecc-p256":
            material = ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        else:
            material = os.urandom(_SIZES[key_type])
        self._store(key_id, key_type, material)

    def import_key(self, key_id: str, key_type: KeyType, material: bytes) -> None:
        check_key_type(key_type)
        if key_type == "ecc-p256":
            load_p256_private(material)  # validates; the DER is stored as given
        elif len(material) != _SIZES[key_type]:
            raise FormatError("keystore.import", f"a {key_type} key is {_SIZES[key_type]} bytes", got=len(material))
        self._store(key_id, key_type, bytes(material))

    def exists(self, key_id: str) -> bool:
        return key_id in self._cache or self._files.read(check_key_id(key_id)) is not None

    def key_type(self, key_id: str) -> KeyType:
        return self._load(key_id)[0]

    def destroy(self, key_id: str) -> None:
        self._cache.pop(check_key_id(key_id), None)
        self._files.remove(key_id)

    def public_key(self, key_id: str) -> bytes:
        _, private = self._typed(key_id, "ecc-p256")
        assert private is not None
        return private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign(self, key_id: str, message: bytes) -> bytes:
        # A key id in the cache was checked when it was loaded; a loaded ecc-p256 key has its private key
        # object. Anything else (first use, a wrong type, a bad id) takes the checked path and its errors.
        entry = self._cache.get(key_id) if type(key_id) is str else None
        private = entry[2] if entry is not None else None
        if private is None:
            _, private = self._typed(key_id, "ecc-p256")
            assert private is not None
        return _raw_signature(private.sign(message, _ECDSA_SHA256))

    def verify(self, key_id: str, message: bytes, signature: bytes) -> None:
        _, private = self._typed(key_id, "ecc-p256")
        assert private is not None
        if len(signature) != 64:
            raise SignatureError("keystore.signature", "signature does not verify")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            private.public_key().verify(der, message, _ECDSA_SHA256)
        except InvalidSignature:
            raise SignatureError("keystore.signature", "signature does not verify") from None

    def encrypt(self, key_id: str, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        aead = self._aesgcm(key_id)
        if len(nonce) != 12:
            raise UsageError("keystore.nonce", "AES-GCM nonces are 12 bytes")
        return aead.encrypt(nonce, plaintext, aad)

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        aead = self._aesgcm(key_id)
        try:
            return aead.decrypt(nonce, ciphertext, aad)
        except (InvalidTag, ValueError):
            raise SignatureError("keystore.decrypt", "decryption failed") from None

    def mac(self, key_id: str, data: bytes) -> bytes:
        material, _ = self._typed(key_id, "hmac-sha256")
        return hmac.new(material, data, hashlib.sha256).digest()

    def derive(self, key_id: str, info: bytes, new_id: str, new_type: KeyType) -> None:
        material, _ = self._typed(key_id, "hmac-sha256", "aes-256")
        check_key_type(new_type)
        if new_type == "ecc-p256":
            raise UsageError("keystore.key-type", "derive produces aes-256 or hmac-sha256 keys", got=new_type)
        derived = HKDF(algorithm=hashes.SHA256(), length=_SIZES[new_type], salt=None, info=info).derive(material)
        self._store(new_id, new_type, derived, replace=True)

    def ecdh(self, key_id: str, peer_public_der: bytes) -> bytes:
        """ECDH on P-256: the shared secret of the key ``key_id`` and the peer's public key.

        The secret is returned to the caller, who must run it through a KDF at
        once and drop it (see the package docstring); the stored key stays here.

        Raises:
            FormatError: ``keystore.peer-key`` if the peer key is not a P-256 SubjectPublicKeyInfo.
            UsageError: ``keystore.key-type`` if ``key_id`` is not an ``ecc-p256`` key.
        """
        _, private = self._typed(key_id, "ecc-p256")
        assert private is not None
        return private.exchange(ec.ECDH(), load_p256_peer(peer_public_der))
