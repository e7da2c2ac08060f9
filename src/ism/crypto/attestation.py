"""PSA attestation tokens: signing, verification and appraisal against reference values.

Owns: creating a token (COSE_Sign1 with ES256, tag 18, or COSE_Mac0 with
HMAC 256/256, tag 17) over a :class:`~ism.formats.psa.Claims` payload;
verifying one (signature or MAC first, then the claims under their profile,
then the caller's nonce: :class:`TokenVerifier`, built once per trusted key
set, or :func:`verify_token` for a single token); and the appraisal of
verified claims against a :class:`~ism.formats.psa.Reference` into
``affirming`` / ``warning`` / ``contraindicated`` with a reason per
component (docs/attestation.md). The
verifier is pure: no files, clock or randomness, so the store can share it.
Must not import: device, hypervisor, services, agent, store, cli.

Threat: a forged or altered token, a replayed one (stale nonce), a token
whose claims are only parsed leniently, and an appraisal that lets an unknown
or downgraded component pass silently. Defences: the signature/MAC is checked
before any claim is interpreted (one :class:`SignatureError` code for every
failure, constant-time MAC comparison in :mod:`ism.crypto.cose`); claims are
decoded strictly (:func:`ism.formats.psa.decode_claims`); the nonce is compared
in constant time; every component is appraised and the overall result is the
worst of them.
"""

from __future__ import annotations

import functools
import hmac
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Literal

from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, PublicKey, signer_id
from ism.errors import FormatError, TrustError, UsageError
from ism.formats import cbor
from ism.formats.psa import (
    Claims,
    MicroserviceClaims,
    Reference,
    ReferenceComponent,
    SwComponent,
    decode_claims,
)

__all__ = [
    "MAX_TOKEN",
    "Appraisal",
    "ComponentAppraisal",
    "Status",
    "TokenVerifier",
    "VerifiedToken",
    "appraise",
    "compare_versions",
    "mac_token",
    "sign_payload",
    "sign_token",
    "verify_token",
]

#: Largest token accepted (a device token with 128 microservices is ~40 KiB).
MAX_TOKEN: Final = 64 * 1024

#: Signs the COSE ToBeSigned bytes with ES256, returning raw r||s (64 bytes): ``KeyStore.sign`` fits.
Signer = Callable[[bytes], bytes]
#: Returns HMAC-SHA-256 of the COSE ToBeMaced bytes: ``KeyStore.mac`` fits.
Maccer = Callable[[bytes], bytes]


# -- creating tokens ------------------------------------------------------------------------------


def sign_token(claims: Claims, key: PrivateKey | Signer, *, kid: bytes | None = None) -> bytes:
    """Signs ``claims`` into a tagged COSE_Sign1 (ES256), the PSA token.

    Args:
        claims: the claims-set (its profile's checks already ran on construction).
        key: a P-256 private key, or a function signing the ToBeSigned bytes
            with ES256 and returning raw r||s (e.g. ``partial(keystore.sign, key_id)``),
            so the attestation key may stay in the HSM.
        kid: optional key id for the protected header.

    Raises:
        UsageError: ``attest.key`` for a key that is not P-256, or a signer
            that does not return 64 bytes.
    """
    return sign_payload(claims.encode(), key, kid=kid)


def sign_payload(payload: bytes, key: PrivateKey | Signer, *, kid: bytes | None = None) -> bytes:
    """:func:`sign_token` for an already encoded claims-set (the caller vouches for its claims)."""
    if not callable(key):  # a key object (key objects are not callable; a signer is a function)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise UsageError("attest.key", "attestation keys are P-256 (ES256)", got=type(key).__name__)
        if not isinstance(key.curve, ec.SECP256R1):
            raise UsageError("attest.key", "attestation keys are P-256 (ES256)", got=key.curve.name)
        return cose.sign1(payload, key, kid=kid)
    to_be_signed, message = _sign1_prefixes(kid)
    encoded_payload = cbor.dumps(payload)
    signature = key(to_be_signed + encoded_payload)
    if not isinstance(signature, bytes) or len(signature) != 64:
        raise UsageError("attest.key", "an ES256 signer must return r||s (64 bytes)")
    return b"".join((message, encoded_payload, _SIGNATURE_HEAD, signature))


#: The head of a 64-byte byte string: an ES256 signature r||s in a COSE_Sign1.
_SIGNATURE_HEAD: Final = cbor.dumps(bytes(64))[:2]


@functools.lru_cache(maxsize=64)
def _sign1_prefixes(kid: bytes | None) -> tuple[bytes, bytes]:
    """What precedes the encoded payload in the ES256 ToBeSigned and in the tagged COSE_Sign1 for ``kid``.

    ``cbor.dumps(["Signature1", protected, b"", payload])`` and
    ``cbor.dumps(Tag(18, [protected, {}, payload, signature]))``, written out: only the payload
    and the signature change between tokens.
    """
    header: dict[int, Any] = {cose.HDR_ALG: cose.ALG_ES256}
    if kid is not None:
        header[cose.HDR_KID] = kid
    protected = cbor.dumps(header)
    to_be_signed = b"\x84" + cbor.dumps("Signature1") + cbor.dumps(protected) + cbor.dumps(b"")
    message = bytes([0xC0 | cose.TAG_SIGN1, 0x84]) + cbor.dumps(protected) + cbor.dumps({})
    return to_be_signed, message


def mac_token(claims: Claims, key: bytes | Maccer) -> bytes:
    """MACs ``claims`` into a tagged COSE_Mac0 (HMAC 256/256), the symmetric PSA token.

    Args:
        claims: the claims-set.
        key: the HMAC key, or a function returning HMAC-SHA-256 of the ToBeMaced
            bytes (e.g. ``partial(keystore.mac, key_id)``).

    Raises:
        UsageError: ``attest.key`` for an HMAC key shorter than 32 bytes.
    """
    payload = claims.encode()
    if isinstance(key, bytes):
        if len(key) < 32:
            raise UsageError("attest.key", "HMAC attestation keys are at least 32 bytes", got=len(key))
        return cose.mac0(payload, key)
    protected = cbor.dumps({cose.HDR_ALG: cose.ALG_HMAC256})
    tag = key(cbor.dumps(["MAC0", protected, b"", payload]))
    return cbor.dumps(cbor.Tag(cose.TAG_MAC0, [protected, {}, payload, tag]))


# -- verifying tokens -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature or MAC verified and whose claims follow their profile."""

    claims: Claims
    kind: Literal["sign1", "mac0"]
    alg: str
    kid: bytes | None = None
    signer: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": "COSE_Sign1" if self.kind == "sign1" else "COSE_Mac0",
            "alg": self.alg,
            "kid": None if self.kid is None else self.kid.hex(),
            "signer": None if self.signer is None else self.signer.hex(),
            "profile": self.claims.profile,
            "legacy_profile": self.claims.legacy,
            "claims": self.claims.to_json(),
        }


class TokenVerifier:
    """Verifies PSA tokens under one trusted key set: built once, then used for every token.

    What depends on the keys alone is done here once rather than per token: the signer ID of the
    public key (what :attr:`VerifiedToken.signer` reports). Nothing about a token is kept: every
    call of :meth:`verify` checks its token from scratch, in the order of :func:`verify_token`.

    Args:
        key: the attestation public key (P-256, or Ed25519), for COSE_Sign1.
        hmac_key: the symmetric attestation key, for COSE_Mac0.

    Raises:
        UsageError: ``attest.key`` if neither key is given.
    """

    __slots__ = ("_hmac_key", "_key", "_signer")

    def __init__(self, key: PublicKey | None = None, hmac_key: bytes | None = None) -> None:
        if key is None and hmac_key is None:
            raise UsageError("attest.key", "a public key or an HMAC key is needed to verify a token")
        self._key = key
        self._hmac_key = hmac_key
        # Only a key cose.verify_sign1 can use ever verifies a token: the others never need a signer ID.
        usable = isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey)
        self._signer = signer_id(key) if key is not None and usable else None

    def verify(self, data: bytes, nonce: bytes | None = None) -> VerifiedToken:
        """Verifies a PSA token: COSE_Sign1 under the public key or COSE_Mac0 under the HMAC key.

        Order: size, COSE structure (tag 18 or 17; ``alg`` protected), signature or
        MAC, then the claims (strict, per profile), then the nonce.

        Args:
            data: the tagged COSE message.
            nonce: if given, the token's nonce must equal it.

        Returns:
            The verified token.

        Raises:
            UsageError: ``attest.key`` if no key fits the token's kind.
            FormatError: ``attest.token-size``, ``attest.payload``, ``cose.*``,
                ``cbor.*`` or the ``attest.*`` claim rules of :func:`decode_claims`.
            SignatureError: ``cose.signature`` / ``cose.alg-key`` (one code).
            TrustError: ``attest.nonce`` if the nonce differs.
        """
        if len(data) > MAX_TOKEN:
            raise FormatError("attest.token-size", f"token is larger than {MAX_TOKEN} bytes", got=len(data))
        msg = cose.parse(bytes(data))
        if msg.payload is None:
            raise FormatError("attest.payload", "the token has no payload (detached claims are not supported)")
        signer = None
        if msg.kind == "sign1":
            if self._key is None:
                raise UsageError("attest.key", "the token is a COSE_Sign1: verifying it needs a public key")
            cose.verify_sign1(msg, self._key)
            signer = self._signer
        else:
            if self._hmac_key is None:
                raise UsageError("attest.key", "the token is a COSE_Mac0: verifying it needs an HMAC key")
            cose.verify_mac0(msg, self._hmac_key)
        claims = decode_claims(msg.payload)
        if nonce is not None and not hmac.compare_digest(nonce, claims.nonce):
            raise TrustError(
                "attest.nonce", "the token's nonce is not the expected one", got=claims.nonce, expected=nonce
            )
        return VerifiedToken(claims, msg.kind, msg.alg_name, msg.kid, signer)


def verify_token(
    data: bytes,
    key: PublicKey | None = None,
    hmac_key: bytes | None = None,
    nonce: bytes | None = None,
) -> VerifiedToken:
    """Verifies one PSA token: ``TokenVerifier(key, hmac_key).verify(data, nonce)`` (see there).

    A verifier that checks many tokens under the same keys builds a :class:`TokenVerifier` once.
    ``key`` is the attestation public key (P-256 or Ed25519) for COSE_Sign1, ``hmac_key`` the
    symmetric attestation key for COSE_Mac0.
    """
    return TokenVerifier(key, hmac_key).verify(data, nonce)


# -- appraisal ------------------------------------------------------------------------------------


class Status(StrEnum):
    """Appraisal outcome (RATS AR4SI tiers), ordered from best to worst."""

    AFFIRMING = "affirming"
    WARNING = "warning"
    CONTRAINDICATED = "contraindicated"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK: Final = {Status.AFFIRMING: 0, Status.WARNING: 1, Status.CONTRAINDICATED: 2}


def _worst(statuses: Iterable[Status]) -> Status:
    return max(statuses, key=lambda s: s.rank, default=Status.AFFIRMING)


@dataclass(frozen=True, slots=True)
class ComponentAppraisal:
    """The result for one appraised subject, with the reasons behind it.

    ``kind`` is ``platform`` (implementation ID and lifecycle), ``software-component``,
    ``microservice`` or ``expected`` (a required reference entry the token lacks).
    """

    kind: str
    name: str
    status: Status
    reasons: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "status": self.status.value, "reasons": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class Appraisal:
    """The appraisal of one token: overall status (the worst component) and each component's."""

    status: Status
    components: tuple[ComponentAppraisal, ...]

    @property
    def affirming(self) -> bool:
        return self.status is Status.AFFIRMING

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status.value, "components": [c.to_json() for c in self.components]}


@dataclass(slots=True)
class _Findings:
    notes: list[tuple[Status, str]] = field(default_factory=list)

    def add(self, status: Status, reason: str) -> None:
        self.notes.append((status, reason))

    def result(self, kind: str, name: str, ok: str) -> ComponentAppraisal:
        status = _worst(s for s, _ in self.notes)
        reasons = tuple(r for s, r in self.notes if s is not Status.AFFIRMING) or (
            tuple(r for _, r in self.notes) or (ok,)
        )
        return ComponentAppraisal(kind, name, status, reasons)


_VERSION_RE: Final = re.compile(r"^v?(\d{1,9}(?:\.\d{1,9})*)(?:-([0-9A-Za-z.-]+))?(?:\+[0-9A-Za-z.-]+)?\Z")


def _version_key(text: str) -> tuple[tuple[int, ...], int] | None:
    m = _VERSION_RE.match(text)
    if m is None:
        return None
    return tuple(int(p) for p in m.group(1).split(".")), 0 if m.group(2) else 1


def compare_versions(a: str, b: str) -> int | None:
    """-1, 0 or 1 as dotted numeric version ``a`` is below, equal to or above ``b``; None if either is not one.

    Missing trailing parts count as 0 (``1.2`` == ``1.2.0``); a pre-release
    (``1.2.0-rc1``) is below its release.
    """
    ka, kb = _version_key(a), _version_key(b)
    if ka is None or kb is None:
        return None
    width = max(len(ka[0]), len(kb[0]))
    na = ka[0] + (0,) * (width - len(ka[0]))
    nb = kb[0] + (0,) * (width - len(kb[0]))
    left, right = (na, ka[1]), (nb, kb[1])
    return (left > right) - (left < right)


def _short(value: bytes) -> str:
    return value.hex()[:16] + "..."


def _check_common(
    f: _Findings,
    ref: ReferenceComponent,
    measurement: bytes,
    signer: bytes,
    version: str | None,
) -> None:
    if ref.measurements and measurement not in ref.measurements:
        f.add(Status.CONTRAINDICATED, f"measurement {_short(measurement)} is not a reference value")
    elif ref.measurements:
        f.add(Status.AFFIRMING, "measurement matches")
    if ref.signers and signer not in ref.signers:
        f.add(Status.CONTRAINDICATED, f"signer {_short(signer)} is not an accepted signer")
    elif ref.signers:
        f.add(Status.AFFIRMING, "signer accepted")
    if ref.min_version is None:
        return
    if version is None:
        f.add(Status.WARNING, f"no version claimed to compare with minimum {ref.min_version}")
        return
    order = compare_versions(version, ref.min_version)
    if order is None:
        f.add(Status.WARNING, f"version {version!r} cannot be compared with minimum {ref.min_version}")
    elif order < 0:
        f.add(Status.CONTRAINDICATED, f"version {version} is below the minimum {ref.min_version}")
    else:
        f.add(Status.AFFIRMING, f"version {version} >= {ref.min_version}")


def _unknown(reference: Reference, what: str) -> tuple[Status, str]:
    return Status(reference.unknown_components), f"no reference values for {what}"


def _appraise_platform(claims: Claims, reference: Reference) -> ComponentAppraisal:
    f = _Findings()
    if reference.implementation_id is not None:
        if claims.implementation_id != reference.implementation_id:
            f.add(
                Status.CONTRAINDICATED, f"implementation ID {_short(claims.implementation_id)} is not the expected one"
            )
        else:
            f.add(Status.AFFIRMING, "implementation ID matches")
    state = claims.lifecycle_state
    if reference.lifecycles:
        if state in reference.lifecycles:
            f.add(Status.AFFIRMING, f"lifecycle {state} accepted")
        else:
            f.add(Status.CONTRAINDICATED, f"lifecycle {state} is not accepted by the reference")
    elif state == "secured":
        f.add(Status.AFFIRMING, "lifecycle secured")
    elif state == "non-psa-rot-debug":
        f.add(Status.WARNING, "lifecycle non-psa-rot-debug: the PSA RoT is intact, other code may be debugged")
    else:
        f.add(Status.CONTRAINDICATED, f"lifecycle {state}: the device is not in a secured state")
    if reference.lifecycle_log is not None:
        if claims.lifecycle_log is None:
            f.add(Status.CONTRAINDICATED, "no lifecycle log head claimed; the reference expects one")
        elif claims.lifecycle_log != reference.lifecycle_log:
            f.add(Status.CONTRAINDICATED, f"lifecycle log head {_short(claims.lifecycle_log)} is not the expected one")
        else:
            f.add(Status.AFFIRMING, "lifecycle log head matches")
    return f.result("platform", "platform", "platform accepted")


def _appraise_component(index: int, comp: SwComponent, reference: Reference) -> tuple[ComponentAppraisal, str | None]:
    name = comp.measurement_type if comp.measurement_type is not None else f"#{index}"
    ref = reference.by_name(comp.measurement_type)
    if ref is None and comp.measurement_type is None:
        ref = next((r for r in reference.components if comp.measurement_value in r.measurements), None)
    f = _Findings()
    if ref is None:
        f.add(*_unknown(reference, f"software component {name}"))
        return f.result("software-component", name, ""), None
    _check_common(f, ref, comp.measurement_value, comp.signer_id, comp.version)
    return f.result("software-component", name, "listed in the reference"), ref.label


_MS_LIFECYCLE_DEFAULT: Final = {
    "active": Status.AFFIRMING,
    "installed": Status.WARNING,
    "suspended": Status.WARNING,
    "quarantined": Status.CONTRAINDICATED,
    "removed": Status.CONTRAINDICATED,
    "banned": Status.CONTRAINDICATED,
}


def _appraise_microservice(ms: MicroserviceClaims, reference: Reference) -> tuple[ComponentAppraisal, str | None]:
    f = _Findings()
    ref = reference.by_uuid(ms.uuid)
    if ref is None:
        ref = reference.by_name(ms.name)
        if ref is not None and ref.uuid is not None:
            f.add(Status.CONTRAINDICATED, f"{ms.name} claims UUID {ms.uuid}; the reference expects {ref.uuid}")
            return f.result("microservice", ms.name, ""), ref.label
    if ref is not None and ref.lifecycles:
        if ms.lifecycle in ref.lifecycles:
            f.add(Status.AFFIRMING, f"lifecycle {ms.lifecycle} accepted")
        else:
            f.add(Status.CONTRAINDICATED, f"lifecycle {ms.lifecycle} is not accepted by the reference")
    else:
        status = _MS_LIFECYCLE_DEFAULT[ms.lifecycle]
        f.add(status, f"lifecycle {ms.lifecycle}")
    if ref is None:
        f.add(*_unknown(reference, f"microservice {ms.name} ({ms.uuid})"))
        return f.result("microservice", ms.name, ""), None
    _check_common(f, ref, ms.measurement, ms.signer, ms.version)
    if ref.min_sequence is not None:
        if ms.sequence < ref.min_sequence:
            f.add(Status.CONTRAINDICATED, f"sequence {ms.sequence} is below the minimum {ref.min_sequence}")
        else:
            f.add(Status.AFFIRMING, f"sequence {ms.sequence} >= {ref.min_sequence}")
    if ref.policy_digests:
        if ms.policy_digest in ref.policy_digests:
            f.add(Status.AFFIRMING, "policy digest matches")
        else:
            f.add(Status.CONTRAINDICATED, f"policy digest {_short(ms.policy_digest)} is not a reference value")
    return f.result("microservice", ms.name, "listed in the reference"), ref.label


def appraise(token: VerifiedToken | Claims, reference: Reference) -> Appraisal:
    """Appraises verified claims against reference values (docs/attestation.md, "Appraisal").

    Subjects: the platform (implementation ID, security lifecycle), every
    software component (found by measurement type), every microservice
    (submodule or the caller of a microservice token; found by UUID, then by
    name), and every ``required`` reference entry that matched nothing.

    Returns:
        The appraisal; its status is the worst of its components'.
    """
    claims = token.claims if isinstance(token, VerifiedToken) else token
    results = [_appraise_platform(claims, reference)]
    seen: set[str] = set()
    for i, comp in enumerate(claims.software_components):
        result, label = _appraise_component(i, comp, reference)
        results.append(result)
        if label is not None:
            seen.add(label)
    for ms in claims.microservices():
        result, label = _appraise_microservice(ms, reference)
        results.append(result)
        if label is not None:
            seen.add(label)
    for ref in reference.components:
        if ref.required and ref.label not in seen:
            results.append(
                ComponentAppraisal("expected", ref.label, Status.CONTRAINDICATED, ("required but not in the token",))
            )
    return Appraisal(_worst(r.status for r in results), tuple(results))
