"""Authentication of SUIT envelopes: manifest digest plus COSE_Sign1 / COSE_Mac0 blocks.

Owns: deciding whether an envelope's manifest is authentic under a set of
public keys (or an HMAC key), and signing envelopes we build.
Must not import: device, hypervisor or anything above.

Threat: a manifest altered after signing, a signature by a key nobody
trusts, or a signature block that authenticates a different manifest. The
manifest digest is recomputed over the bstr-wrapped manifest; each
authentication block must be a tagged COSE_Sign1/COSE_Mac0 whose detached
payload is exactly the received SUIT_Digest; at least one block must verify
under a trusted key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ism.crypto import cose
from ism.crypto.keys import Anchors, PrivateKey, PublicKey, anchor_map, signer_id
from ism.errors import FormatError, SignatureError, UntrustedSignerError
from ism.formats import cbor, suit

__all__ = ["Authenticated", "authenticate", "sign_manifest"]


@dataclass(frozen=True, slots=True)
class Authenticated:
    """Who authenticated an envelope, and how."""

    kind: str
    alg: str
    signer_id: bytes | None


def authenticate(
    env: suit.Envelope,
    keys: Sequence[PublicKey] | Anchors = (),
    hmac_key: bytes | None = None,
) -> Authenticated:
    """Checks the manifest digest and finds one authentication block that verifies.

    Args:
        env: a parsed envelope.
        keys: trusted public keys (trust anchors), or a map of them by signer ID.
        hmac_key: a trusted HMAC key for COSE_Mac0 blocks.

    Returns:
        Which block verified and the signer ID of its key.

    Raises:
        DigestError: ``suit.manifest-digest``.
        SignatureError: ``suit.unsigned`` (no blocks) or ``suit.signature``.
        UntrustedSignerError: ``suit.untrusted-signer`` when every block names
            (by ``kid``) a key that is not trusted.
        FormatError: ``cose.*`` for malformed blocks.
    """
    env.digest.check(suit.wrap(env.manifest_bytes), "suit.manifest-digest", "manifest")
    if not env.auth_blocks:
        raise SignatureError("suit.unsigned", "envelope has no authentication block")
    by_id = keys if isinstance(keys, Mapping) else anchor_map(keys)
    untrusted_kid: bytes | None = None
    last: Exception | None = None
    for block in env.auth_blocks:
        msg = cose.parse(block)
        if not msg.tagged:
            raise FormatError("suit.auth", "authentication blocks must be tagged COSE")
        if msg.payload is not None and msg.payload != env.digest_bytes:
            raise SignatureError("suit.signature", "authentication block covers a different digest")
        detached = None if msg.payload is not None else env.digest_bytes
        if msg.kind == "mac0":
            if hmac_key is None:
                continue
            try:
                cose.verify_mac0(msg, hmac_key, detached_payload=detached)
                return Authenticated("mac0", msg.alg_name, None)
            except SignatureError as exc:
                last = exc
                continue
        kid = msg.kid
        if kid is not None and len(kid) == 32 and by_id and kid not in by_id:
            untrusted_kid = kid
            continue
        if kid is not None and kid in by_id:
            candidates: list[tuple[bytes, PublicKey]] = [(kid, by_id[kid])]
        else:
            candidates = list(by_id.items())
        for sid, key in candidates:
            try:
                cose.verify_sign1(msg, key, detached_payload=detached)
                return Authenticated("sign1", msg.alg_name, sid)
            except SignatureError as exc:
                last = exc
    if untrusted_kid is not None and last is None:
        raise UntrustedSignerError(
            "suit.untrusted-signer", "envelope is signed by a key that is not a trust anchor", got=untrusted_kid
        )
    if not by_id and hmac_key is None:
        raise UntrustedSignerError("suit.untrusted-signer", "no trust anchor to verify against")
    raise SignatureError("suit.signature", "no authentication block verifies under a trusted key")


def sign_manifest(manifest_bytes: bytes, key: PrivateKey) -> list[bytes]:
    """Builds an authentication wrapper (digest + one COSE_Sign1) for a manifest."""
    digest_bytes = cbor.dumps(suit.make_digest(manifest_bytes).encode())
    block = cose.sign1(digest_bytes, key, detached=True, kid=signer_id(key))
    return [digest_bytes, block]
