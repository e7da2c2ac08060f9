"""Sealing the access policy: signed by the vendor's policy key, encrypted to one device.

Owns: the policy artifact's envelope. :func:`seal` (vendor side) and
:func:`open_sealed` (device side); the plaintext inside is the payload of
:mod:`ism.formats.policy_artifact`.
Must not import: device, hypervisor, services, agent, store, cli.

Structure (RFC 9052/9053 building blocks)::

    COSE_Sign1 (tag 18)                         signed by the vendor's policy key
      protected   {1: ES256 (-7) | EdDSA (-8), 3: "application/ism-policy+cose", 4: kid = signer ID}
      payload     COSE_Encrypt (tag 96), deterministic CBOR:
        protected   {1: A256GCM (3)}
        unprotected {5: IV (12 bytes)}
        ciphertext  AES-256-GCM(CEK, IV, payload, AAD = Enc_structure ["Encrypt", protected, h''])
        recipients  [ one recipient, direct key agreement:
          protected   {1: ECDH-ES + HKDF-256 (-25)}
          unprotected {-1: ephemeral P-256 COSE_Key {1: 2, -1: 1, -2: x, -3: y},
                       4: kid = SHA-256 of the device policy key's SubjectPublicKeyInfo}
          ciphertext  h''  ]

    CEK = HKDF-SHA-256(salt = none, IKM = ECDH(ephemeral, device policy key),
                       info = COSE_KDF_Context [3, [nil, nil, nil], [nil, nil, nil], [256, recipient protected]])

A key agreement needs a recipient layer, which COSE_Encrypt0 does not have
(RFC 9052 §5.2: Encrypt0 is for a key the recipient already knows), so the
standard COSE_Encrypt with one direct ECDH-ES recipient is used (RFC 9053
§6.3.1). Encrypt-then-sign lets the device refuse unsigned, foreign or tampered artifacts before it
touches its private key, and keeps the policy confidential from everyone
but the device: only the device can read which resources exist and who
holds them.

Threat: an artifact that is unsigned (``policy.unsigned``), altered
(``policy.signature``), signed by a key that is not one of the device's
*policy signer* anchors — a foreign key or a microservice developer's key
(``policy.signer``), encrypted to another key (``policy.recipient``), or
whose ciphertext does not decrypt (``policy.decrypt``); a signed object of
another kind passed off as a policy (the content type is protected and
checked); algorithm substitution (every algorithm is fixed; unknown header
labels are refused). The device's key agreement runs in its key store
(:meth:`~ism.crypto.keystore.KeyStore.ecdh`); the shared secret and the
content key exist in host memory only inside :func:`open_sealed`.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ism.crypto import cose
from ism.crypto.keys import Anchors, PrivateKey, PublicKey, key_alg, signer_id
from ism.crypto.keystore import KeyStore
from ism.errors import FormatError, SignatureError, TrustError, UntrustedSignerError
from ism.formats import cbor

__all__ = ["CONTENT_TYPE", "open_sealed", "recipient_kid", "seal", "signer_of"]

CONTENT_TYPE: Final = "application/ism-policy+cose"
TAG_ENCRYPT: Final = 96
ALG_A256GCM: Final = 3
ALG_ECDH_ES_HKDF_256: Final = -25
HDR_ALG, HDR_CONTENT_TYPE, HDR_KID, HDR_IV, HDR_EPHEMERAL = 1, 3, 4, 5, -1
_KTY, _KTY_EC2, _CRV, _CRV_P256, _X, _Y = 1, 2, -1, 1, -2, -3
_IV_SIZE, _TAG_SIZE, _COORD = 12, 16, 32


def _bad(message: str, got: Any = None) -> FormatError:
    return FormatError("policy.artifact", message, got=got)


def recipient_kid(device_public_der: bytes) -> bytes:
    """The recipient key ID: SHA-256 of the device policy key's SubjectPublicKeyInfo DER."""
    return hashlib.sha256(device_public_der).digest()


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _content_key(shared: bytes, recipient_protected: bytes) -> bytes:
    """HKDF-SHA-256 with the COSE_KDF_Context of RFC 9053 §5.2 (no party info, no salt)."""
    context = cbor.dumps([ALG_A256GCM, [None, None, None], [None, None, None], [256, recipient_protected]])
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=context).derive(shared)


def _enc_structure(protected: bytes) -> bytes:
    return cbor.dumps(["Encrypt", protected, b""])


def seal(payload: bytes, device_key: PublicKey, signer: PrivateKey) -> bytes:
    """Encrypts ``payload`` to ``device_key`` (ECDH-ES, HKDF-SHA-256, AES-256-GCM), then signs it.

    Args:
        payload: the encoded :class:`~ism.formats.policy_artifact.PolicyPayload`.
        device_key: the device's policy key (P-256), as ``ism device policy-key`` prints it.
        signer: the vendor's policy signing key (P-256 or Ed25519); its signer ID is the ``kid``.

    Raises:
        FormatError: ``keys.type`` / ``keys.curve`` if the device key is not a P-256 key.
    """
    if not isinstance(device_key, ec.EllipticCurvePublicKey):
        raise FormatError("keys.type", "the device policy key must be a P-256 EC key")
    key_alg(device_key)
    ephemeral = ec.generate_private_key(ec.SECP256R1())
    recipient_protected = cbor.dumps({HDR_ALG: ALG_ECDH_ES_HKDF_256})
    cek = _content_key(ephemeral.exchange(ec.ECDH(), device_key), recipient_protected)
    numbers = ephemeral.public_key().public_numbers()
    cose_key = {
        _KTY: _KTY_EC2,
        _CRV: _CRV_P256,
        _X: numbers.x.to_bytes(_COORD, "big"),
        _Y: numbers.y.to_bytes(_COORD, "big"),
    }
    protected = cbor.dumps({HDR_ALG: ALG_A256GCM})
    iv = os.urandom(_IV_SIZE)
    ciphertext = AESGCM(cek).encrypt(iv, payload, _enc_structure(protected))
    recipient = [recipient_protected, {HDR_EPHEMERAL: cose_key, HDR_KID: recipient_kid(_spki(device_key))}, b""]
    encrypted = cbor.dumps(cbor.Tag(TAG_ENCRYPT, [protected, {HDR_IV: iv}, ciphertext, [recipient]]))
    return cose.sign1(encrypted, signer, kid=signer_id(signer), protected={HDR_CONTENT_TYPE: CONTENT_TYPE})


def _sign1(data: bytes) -> cose.CoseMessage:
    value = cbor.loads(data)
    if not isinstance(value, cbor.Tag) or value.number != cose.TAG_SIGN1:
        raise SignatureError(
            "policy.unsigned",
            "a policy artifact must be a COSE_Sign1 (tag 18) signed by a policy signer",
            got=value.number if isinstance(value, cbor.Tag) else type(value).__name__,
        )
    return cose.parse(value, expect="sign1")


def signer_of(data: bytes) -> bytes | None:
    """The ``kid`` an artifact claims (unverified; for diagnostics), or None."""
    try:
        return _sign1(data).kid
    except (FormatError, SignatureError):
        return None


def _header(raw: bytes, what: str) -> dict[Any, Any]:
    value = cbor.loads(raw) if raw else {}
    if not isinstance(value, dict):
        raise _bad(f"{what} must encode a map")
    return value


def _parse_encrypt(data: bytes) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    """(protected, iv, ciphertext, recipient protected, ephemeral key SPKI DER, recipient kid)."""
    value = cbor.loads(data)
    if not isinstance(value, cbor.Tag) or value.number != TAG_ENCRYPT:
        raise _bad("the signed content must be a COSE_Encrypt (tag 96)")
    body = value.value
    if not isinstance(body, list) or len(body) != 4:
        raise _bad("COSE_Encrypt must be an array of 4 elements")
    protected, unprotected, ciphertext, recipients = body
    if not isinstance(protected, bytes) or _header(protected, "protected header") != {HDR_ALG: ALG_A256GCM}:
        raise _bad("the content algorithm must be A256GCM, alone in the protected header")
    if not isinstance(unprotected, dict) or set(unprotected) != {HDR_IV}:
        raise _bad("the unprotected header must hold the IV and nothing else")
    iv = unprotected[HDR_IV]
    if not isinstance(iv, bytes) or len(iv) != _IV_SIZE:
        raise _bad("the IV must be 12 bytes")
    if not isinstance(ciphertext, bytes) or len(ciphertext) < _TAG_SIZE:
        raise _bad("the ciphertext must be a byte string with its tag")
    if not isinstance(recipients, list) or len(recipients) != 1:
        raise _bad("exactly one recipient is expected")
    recipient = recipients[0]
    if not isinstance(recipient, list) or len(recipient) != 3:
        raise _bad("a recipient is an array of 3 elements (no nested recipients)")
    r_protected, r_unprotected, r_ciphertext = recipient
    if not isinstance(r_protected, bytes) or _header(r_protected, "recipient header") != {
        HDR_ALG: ALG_ECDH_ES_HKDF_256
    }:
        raise _bad("the recipient algorithm must be ECDH-ES + HKDF-256, alone in its protected header")
    if r_ciphertext != b"":
        raise _bad("direct key agreement carries no recipient ciphertext")
    if not isinstance(r_unprotected, dict) or set(r_unprotected) != {HDR_EPHEMERAL, HDR_KID}:
        raise _bad("the recipient header must hold the ephemeral key and the kid and nothing else")
    kid = r_unprotected[HDR_KID]
    if not isinstance(kid, bytes) or len(kid) != 32:
        raise _bad("the recipient kid must be 32 bytes")
    return protected, iv, ciphertext, r_protected, _ephemeral(r_unprotected[HDR_EPHEMERAL]), kid


def _ephemeral(cose_key: Any) -> bytes:
    """The ephemeral COSE_Key (EC2, P-256, uncompressed) as SubjectPublicKeyInfo DER."""
    if not isinstance(cose_key, dict) or set(cose_key) != {_KTY, _CRV, _X, _Y}:
        raise _bad("the ephemeral key must be an EC2 COSE_Key with kty, crv, x and y only")
    x, y = cose_key[_X], cose_key[_Y]
    if cose_key[_KTY] != _KTY_EC2 or cose_key[_CRV] != _CRV_P256:
        raise _bad("the ephemeral key must be an EC2 key on P-256")
    if not (isinstance(x, bytes) and isinstance(y, bytes) and len(x) == len(y) == _COORD):
        raise _bad("the ephemeral key's coordinates must be 32 bytes each")
    try:
        key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1())
        return _spki(key.public_key())
    except ValueError:
        raise _bad("the ephemeral key is not a point on P-256") from None


def open_sealed(data: bytes, anchors: Anchors, keystore: KeyStore, key_id: str) -> bytes:
    """Verifies a policy artifact's signature, then decrypts it with the device key ``key_id``.

    The signature is checked first, against ``anchors`` (the device's policy
    signer anchors only), so nothing unsigned or foreign reaches the key store.

    Args:
        data: the artifact (COSE_Sign1 over COSE_Encrypt).
        anchors: the policy signer trust anchors by signer ID.
        keystore: the device key store that holds ``key_id``.
        key_id: the device's policy key (``ecc-p256``).

    Returns:
        The plaintext payload (not yet decoded).

    Raises:
        SignatureError: ``policy.unsigned``, ``policy.signature``, ``policy.decrypt`` (code 201).
        UntrustedSignerError: ``policy.signer`` if the signer is not a policy signer anchor.
        TrustError: ``policy.recipient`` if it is encrypted to another key.
        FormatError: ``policy.artifact`` / ``cose.*`` / ``cbor.*`` for a malformed artifact.
    """
    msg = _sign1(data)
    kid = msg.kid
    key = anchors.get(kid) if kid is not None else None
    if key is None:
        raise UntrustedSignerError(
            "policy.signer",
            "the artifact is not signed by a policy signer of this device (a microservice signer does not qualify)",
            got=kid,
        )
    try:
        cose.verify_sign1(msg, key)
    except SignatureError:
        raise SignatureError("policy.signature", "the policy artifact's signature does not verify") from None
    if msg.protected.get(HDR_CONTENT_TYPE) != CONTENT_TYPE:
        raise _bad(f"the signed content is not a policy (content type must be {CONTENT_TYPE})")
    if msg.payload is None:
        raise _bad("the policy artifact has no payload")
    protected, iv, ciphertext, r_protected, ephemeral_der, kid_to = _parse_encrypt(msg.payload)
    own = recipient_kid(keystore.public_key(key_id))
    if kid_to != own:
        raise TrustError(
            "policy.recipient", "the policy is encrypted to another device's key", got=kid_to, expected=own
        )
    cek = _content_key(keystore.ecdh(key_id, ephemeral_der), r_protected)
    try:
        return AESGCM(cek).decrypt(iv, ciphertext, _enc_structure(protected))
    except InvalidTag:
        raise SignatureError("policy.decrypt", "the policy does not decrypt") from None
