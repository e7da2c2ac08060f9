"""COSE_Sign1 and COSE_Mac0 (RFC 9052/9053): the signature layer of every artifact.

Owns: parsing COSE messages from untrusted CBOR, creating and verifying
COSE_Sign1 with ES256 (-7), ESP256 (-9) and EdDSA (-8), and COSE_Mac0 with
HMAC 256/256 (5), HMAC 384/384 (6) and HMAC 512/512 (7).
Must not import: device, hypervisor, services, agent, store, cli.

Threat: forged or altered signed artifacts, algorithm confusion (a key used
with an algorithm it was not made for, or ``alg`` placed where it is not
integrity-protected), unknown critical headers silently ignored, and timing
oracles on MAC comparison. Defences: ``alg`` must sit in the protected header
and match the key type; labels may not repeat across header buckets;
``crit`` may only name labels this module understands; MAC tags are compared
in constant time; every verification failure is one :class:`SignatureError`
code.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
)

from ism.crypto.keys import PrivateKey, PublicKey
from ism.errors import FormatError, SignatureError, UsageError
from ism.formats import cbor

__all__ = [
    "ALG_EDDSA",
    "ALG_ES256",
    "ALG_ESP256",
    "ALG_HMAC256",
    "CoseMessage",
    "mac0",
    "parse",
    "sign1",
    "verify_mac0",
    "verify_sign1",
]

ALG_ES256: Final = -7
ALG_EDDSA: Final = -8
ALG_ESP256: Final = -9
ALG_HMAC256: Final = 5
ALG_HMAC384: Final = 6
ALG_HMAC512: Final = 7

TAG_SIGN1: Final = 18
TAG_MAC0: Final = 17

HDR_ALG: Final = 1
HDR_CRIT: Final = 2
HDR_CONTENT_TYPE: Final = 3
HDR_KID: Final = 4

_SIGN_ALGS: Final = {ALG_ES256: "ES256", ALG_ESP256: "ESP256", ALG_EDDSA: "EdDSA"}
_MAC_ALGS: Final = {ALG_HMAC256: hashlib.sha256, ALG_HMAC384: hashlib.sha384, ALG_HMAC512: hashlib.sha512}
_UNDERSTOOD_LABELS: Final = frozenset({HDR_ALG, HDR_CRIT, HDR_CONTENT_TYPE, HDR_KID})
#: ES256's signature algorithm object (immutable), made once rather than for every signature.
_ECDSA_SHA256: Final = ec.ECDSA(hashes.SHA256())

Kind = Literal["sign1", "mac0"]


@dataclass(frozen=True, slots=True)
class CoseMessage:
    """A parsed COSE_Sign1 or COSE_Mac0; nothing in it is verified yet."""

    kind: Kind
    protected_bytes: bytes
    protected: dict[Any, Any]
    unprotected: dict[Any, Any]
    payload: bytes | None
    tag: bytes = field(repr=False)
    alg: int = 0
    tagged: bool = True

    @property
    def kid(self) -> bytes | None:
        value = self.protected.get(HDR_KID, self.unprotected.get(HDR_KID))
        return value if isinstance(value, bytes) else None

    @property
    def alg_name(self) -> str:
        if self.kind == "sign1":
            return _SIGN_ALGS.get(self.alg, str(self.alg))
        return {ALG_HMAC256: "HMAC256/256", ALG_HMAC384: "HMAC384/384", ALG_HMAC512: "HMAC512/512"}.get(
            self.alg, str(self.alg)
        )


def parse(data: bytes | Any, expect: Kind | None = None) -> CoseMessage:
    """Parses a COSE_Sign1 or COSE_Mac0 from bytes or from an already-decoded value.

    Args:
        data: encoded bytes, or the decoded CBOR value (tagged or untagged array).
        expect: which message kind is required; needed for untagged input.

    Raises:
        FormatError: ``cose.*`` for any structural problem.
    """
    value = cbor.loads(data) if isinstance(data, bytes | bytearray) else data
    tagged = isinstance(value, cbor.Tag)
    if tagged:
        kinds: dict[int, Kind] = {TAG_SIGN1: "sign1", TAG_MAC0: "mac0"}
        if value.number not in kinds:
            raise FormatError("cose.tag", "not a COSE_Sign1 (18) or COSE_Mac0 (17) tag", got=value.number)
        kind = kinds[value.number]
        if expect is not None and kind != expect:
            raise FormatError("cose.tag", f"expected COSE {expect}", got=kind)
        value = value.value
    elif expect is None:
        raise FormatError("cose.tag", "untagged COSE message of unknown kind")
    else:
        kind = expect
    if not isinstance(value, list) or len(value) != 4:
        raise FormatError("cose.structure", "COSE message must be an array of 4 elements")
    protected_bytes, unprotected, payload, tag = value
    if not isinstance(protected_bytes, bytes):
        raise FormatError("cose.protected", "protected header must be a byte string")
    protected = cbor.loads(protected_bytes) if protected_bytes else {}
    if not isinstance(protected, dict):
        raise FormatError("cose.protected", "protected header must encode a map")
    if not isinstance(unprotected, dict):
        raise FormatError("cose.unprotected", "unprotected header must be a map")
    if payload is not None and not isinstance(payload, bytes):
        raise FormatError("cose.payload", "payload must be a byte string or nil")
    if not isinstance(tag, bytes):
        raise FormatError("cose.signature", "signature/tag must be a byte string")
    common = set(protected) & set(unprotected) if unprotected else None
    if common:
        raise FormatError("cose.header-duplicate", "label in both header buckets", got=sorted(map(str, common)))
    if HDR_ALG in unprotected:
        raise FormatError("cose.alg-unprotected", "alg must be in the protected header")
    alg = protected.get(HDR_ALG)
    if not isinstance(alg, int) or isinstance(alg, bool):
        raise FormatError("cose.alg-missing", "protected header has no integer alg")
    known = _SIGN_ALGS if kind == "sign1" else _MAC_ALGS
    if alg not in known:
        raise FormatError("cose.alg-unsupported", f"unsupported {kind} algorithm", got=alg)
    if HDR_CRIT in unprotected:
        raise FormatError("cose.crit", "crit must be in the protected header")
    crit = protected.get(HDR_CRIT)
    if crit is not None:
        if not isinstance(crit, list) or not crit:
            raise FormatError("cose.crit", "crit must be a non-empty array")
        if not all(isinstance(c, int | str) and not isinstance(c, bool) for c in crit):
            raise FormatError("cose.crit", "crit labels must be integers or text strings")
        unknown = [c for c in crit if c not in _UNDERSTOOD_LABELS]
        if unknown:
            raise FormatError("cose.crit", "critical header not understood", got=unknown)
        absent = [c for c in crit if c not in protected]
        if absent:
            raise FormatError("cose.crit", "crit names a label that is not in the protected header", got=absent)
    # Every field was checked above: the message is built without the dataclass __init__'s generic setattrs.
    out = _new(CoseMessage)
    s0, s1, s2, s3, s4, s5, s6, s7 = _MESSAGE_SET
    s0(out, kind)
    s1(out, protected_bytes)
    s2(out, protected)
    s3(out, unprotected)
    s4(out, payload)
    s5(out, tag)
    s6(out, alg)
    s7(out, tagged)
    return out


_new: Final = object.__new__
_MESSAGE_FIELDS: Final = ("kind", "protected_bytes", "protected", "unprotected", "payload", "tag", "alg", "tagged")
if tuple(f.name for f in fields(CoseMessage)) != _MESSAGE_FIELDS:  # pragma: no cover - a guard for edits
    raise AssertionError("CoseMessage fields changed: parse needs updating")
_MESSAGE_SET: Final = tuple(getattr(CoseMessage, name).__set__ for name in _MESSAGE_FIELDS)


def _content(msg: CoseMessage, detached: bytes | None) -> bytes:
    if msg.payload is not None and detached is not None:
        raise FormatError("cose.payload", "payload both attached and detached")
    content = msg.payload if msg.payload is not None else detached
    if content is None:
        raise FormatError("cose.payload", "detached payload missing")
    return content


_CONTEXTS: Final = {context: cbor.dumps(context) for context in ("Signature1", "MAC0")}


def _tbs(context: str, protected: bytes, aad: bytes, payload: bytes) -> bytes:
    """``cbor.dumps([context, protected, aad, payload])``, written out: it runs for every signature."""
    encoded = _CONTEXTS.get(context) or cbor.dumps(context)
    return b"".join((b"\x84", encoded, cbor.dumps(protected), cbor.dumps(aad), cbor.dumps(payload)))


def _der_integer(raw: bytes) -> bytes:
    """A DER INTEGER of the unsigned big-endian ``raw`` (at most 32 bytes): minimal, positive."""
    value = raw.lstrip(b"\0")
    if not value or value[0] & 0x80:
        value = b"\0" + value
    return b"\x02" + _LENGTHS[len(value)] + value


def _der_signature(raw: bytes) -> bytes:
    """r||s (64 bytes) as the DER ECDSA-Sig-Value ``encode_dss_signature`` makes of the two integers."""
    body = _der_integer(raw[:32]) + _der_integer(raw[32:])
    return b"\x30" + _LENGTHS[len(body)] + body


#: One-byte DER lengths (a P-256 signature never needs more than 70).
_LENGTHS: Final = tuple(bytes((n,)) for n in range(128))


def parse_typed_sign1(data: bytes, content_type: str, max_size: int, rule: str, what: str) -> tuple[CoseMessage, bytes]:
    """Parses a COSE_Sign1 of ``content_type`` that carries its payload, of at most ``max_size`` bytes.

    Returns the message and its payload.
    For iSM's own signed artifacts (device commands, statements): anything else is one
    ``FormatError(rule)`` naming ``what`` was expected. Nothing is verified yet.
    """
    if len(data) > max_size:
        raise FormatError(rule, f"{what} is at most {max_size} bytes", got=len(data))
    try:
        msg = parse(data, expect="sign1")
    except FormatError as exc:
        raise FormatError(rule, f"not {what}: {exc.message}") from exc
    if msg.payload is None or msg.protected.get(HDR_CONTENT_TYPE) != content_type:
        raise FormatError(rule, f"{what} is a COSE_Sign1 of {content_type} with its payload inside")
    return msg, msg.payload


def verify_sign1(msg: CoseMessage, key: PublicKey, *, detached_payload: bytes | None = None, aad: bytes = b"") -> None:
    """Verifies a COSE_Sign1 under ``key``. Returns None or raises.

    Raises:
        SignatureError: ``cose.signature`` (bad signature) or ``cose.alg-key``
            (the key cannot be used with the message's algorithm).
        FormatError: ``cose.*`` if the payload arrangement is wrong.
    """
    if msg.kind != "sign1":
        raise FormatError("cose.tag", "not a COSE_Sign1")
    content = _content(msg, detached_payload)
    tbs = _tbs("Signature1", msg.protected_bytes, aad, content)
    try:
        if msg.alg in (ALG_ES256, ALG_ESP256):
            if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
                raise SignatureError("cose.alg-key", f"{msg.alg_name} needs a P-256 key")
            if len(msg.tag) != 64:
                raise SignatureError("cose.signature", "ES256 signature must be 64 bytes", got=len(msg.tag))
            key.verify(_der_signature(msg.tag), tbs, _ECDSA_SHA256)
        else:
            if not isinstance(key, ed25519.Ed25519PublicKey):
                raise SignatureError("cose.alg-key", "EdDSA needs an Ed25519 key")
            key.verify(msg.tag, tbs)
    except InvalidSignature:
        raise SignatureError("cose.signature", "signature does not verify") from None


def sign1(
    payload: bytes,
    key: PrivateKey,
    *,
    detached: bool = False,
    kid: bytes | None = None,
    protected: dict[Any, Any] | None = None,
    unprotected: dict[Any, Any] | None = None,
    aad: bytes = b"",
    tagged: bool = True,
) -> bytes:
    """Creates a COSE_Sign1 over ``payload`` (ES256 for P-256 keys, EdDSA for Ed25519).

    Args:
        payload: the content signed.
        key: the private key.
        detached: leave the payload out of the message (nil), as SUIT does.
        kid: key id placed in the protected header.
        protected: extra protected header labels.
        unprotected: unprotected header labels.
        aad: external additional authenticated data.
        tagged: wrap in CBOR tag 18.
    """
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = ALG_ES256
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = ALG_EDDSA
    else:
        raise UsageError("cose.key", "unsupported private key type")
    header: dict[Any, Any] = {HDR_ALG: alg}
    if kid is not None:
        header[HDR_KID] = kid
    header.update(protected or {})
    protected_bytes = cbor.dumps(header)
    tbs = _tbs("Signature1", protected_bytes, aad, payload)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        r, s = decode_dss_signature(key.sign(tbs, _ECDSA_SHA256))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    else:
        signature = key.sign(tbs)
    body = [protected_bytes, unprotected or {}, None if detached else payload, signature]
    return cbor.dumps(cbor.Tag(TAG_SIGN1, body) if tagged else body)


def _mac(alg: int, key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, _MAC_ALGS[alg]).digest()


def mac0(
    payload: bytes,
    key: bytes,
    *,
    alg: int = ALG_HMAC256,
    detached: bool = False,
    unprotected: dict[Any, Any] | None = None,
    aad: bytes = b"",
) -> bytes:
    """Creates a tagged COSE_Mac0 over ``payload`` with an HMAC key."""
    if alg not in _MAC_ALGS:
        raise UsageError("cose.alg-unsupported", "unsupported MAC algorithm", got=alg)
    protected_bytes = cbor.dumps({HDR_ALG: alg})
    tag = _mac(alg, key, _tbs("MAC0", protected_bytes, aad, payload))
    body = [protected_bytes, unprotected or {}, None if detached else payload, tag]
    return cbor.dumps(cbor.Tag(TAG_MAC0, body))


def verify_mac0(msg: CoseMessage, key: bytes, *, detached_payload: bytes | None = None, aad: bytes = b"") -> None:
    """Verifies a COSE_Mac0 in constant time. Returns None or raises SignatureError."""
    if msg.kind != "mac0":
        raise FormatError("cose.tag", "not a COSE_Mac0")
    content = _content(msg, detached_payload)
    expected = _mac(msg.alg, key, _tbs("MAC0", msg.protected_bytes, aad, content))
    if not hmac.compare_digest(expected, msg.tag):
        raise SignatureError("cose.signature", "MAC does not verify")
