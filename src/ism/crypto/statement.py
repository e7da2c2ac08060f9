"""The decommission statement: signed by the device's attestation key, verified by anyone holding its public key.

Owns: signing a :class:`~ism.formats.lifecycle.Statement` as a COSE_Sign1
(ES256, the key's ID as ``kid``, content type
``application/ism-decommission+cbor``) through a signing callable — the key
stays in the key store — and :func:`verify_statement`.
Must not import: device, hypervisor, services, agent, store, cli.

Threat: a forged or altered statement that a device was decommissioned
(the signature is by the device's initial attestation key, which a verifier
knows from enrolment and which is destroyed right after signing, so no
later statement can be made with it), and a statement confused with an
attestation token signed by the same key (its own content type and payload
type: neither parses as the other).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Final

from ism.crypto import cose
from ism.crypto.keys import PublicKey
from ism.errors import FormatError, SignatureError, UsageError
from ism.formats import cbor
from ism.formats.lifecycle import Statement, decode_statement

__all__ = ["CONTENT_TYPE", "MAX_STATEMENT_SIZE", "sign_statement", "verify_statement"]

CONTENT_TYPE: Final = "application/ism-decommission+cbor"
MAX_STATEMENT_SIZE: Final = 1024 * 1024


def sign_statement(statement: Statement, sign: Callable[[bytes], bytes], public_key_der: bytes) -> bytes:
    """The statement as a tagged COSE_Sign1; ``sign`` returns an ES256 signature (r||s) over its input."""
    protected = cbor.dumps(
        {
            cose.HDR_ALG: cose.ALG_ES256,
            cose.HDR_KID: hashlib.sha256(public_key_der).digest(),
            cose.HDR_CONTENT_TYPE: CONTENT_TYPE,
        }
    )
    payload = statement.encode()
    signature = sign(cbor.dumps(["Signature1", protected, b"", payload]))
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise UsageError("lifecycle.statement", "the attestation key must give an ES256 signature (r||s)")
    return cbor.dumps(cbor.Tag(cose.TAG_SIGN1, [protected, {}, payload, signature]))


def verify_statement(data: bytes, key: PublicKey) -> Statement:
    """Verifies a decommission statement under the device's attestation public key; returns what it says.

    Raises:
        FormatError: ``lifecycle.statement`` (not a statement, or a malformed one).
        SignatureError: ``lifecycle.statement-signature`` (not signed by ``key``).
    """
    msg, payload = cose.parse_typed_sign1(
        data, CONTENT_TYPE, MAX_STATEMENT_SIZE, "lifecycle.statement", "a signed statement"
    )
    try:
        cose.verify_sign1(msg, key)
    except (SignatureError, FormatError) as exc:
        raise SignatureError(
            "lifecycle.statement-signature", "the statement is not signed by this attestation key"
        ) from exc
    return decode_statement(payload)
