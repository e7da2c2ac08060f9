"""Secure-boot decision for one microservice package (pure).

Owns: the order and content of the checks that decide whether a package may
run: structure, authenticity against the provisioned trust anchors, internal
consistency (payload digest, size, metadata), the host-ABI check of its Wasm
imports, and anti-rollback (with explicit, signed downgrades).
Must not import: the device shell, hypervisor or anything above; does no I/O.

Threat: code on the device's storage that was not signed by a trusted party,
was modified after signing, or is an older signed version being replayed
(rollback). Checks run in an order that never trusts an unauthenticated
field: the sequence number is compared only after the signature verified.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ism.crypto import cose
from ism.crypto import suit as suit_auth
from ism.crypto.keys import Anchors, PublicKey, anchor_map
from ism.errors import FormatError, RollbackError, TrustError, UntrustedSignerError
from ism.formats import package, suit, wasm
from ism.formats.abi import HOST_ABI
from ism.formats.downgrade import Downgrade

__all__ = ["Accepted", "Sealed", "check_downgrade", "check_package", "check_sealed", "seal"]


@dataclass(frozen=True, slots=True)
class Accepted:
    """A package that passed secure boot, and the counter value to persist."""

    package: package.Package
    signer: bytes
    counter: int
    downgraded: bool


@dataclass(frozen=True, slots=True)
class Sealed:
    """What a full secure boot established about one stored package, sealed for later boots.

    A later boot that finds the stored file byte-for-byte identical (same
    SHA-256), its signer still a trust anchor and its sequence number still at
    or above the counter may run it without re-parsing and re-verifying (as
    MCUboot's validate-primary-slot-once does). The device keeps these records
    under its state MAC; any doubt means a full verification.
    """

    file_digest: bytes
    uuid: bytes
    name: str
    version: str
    sequence: int
    measurement: bytes
    signer: bytes
    downgraded: bool
    payload_offset: int
    payload_length: int
    certifications: tuple[str, ...] = ()

    def encode(self) -> list[Any]:
        return [
            list(self.certifications),
            self.file_digest,
            self.uuid,
            self.name,
            self.version,
            self.sequence,
            self.measurement,
            self.signer,
            self.downgraded,
            self.payload_offset,
            self.payload_length,
        ]

    @classmethod
    def decode(cls, raw: Any) -> Sealed:
        if not isinstance(raw, list) or len(raw) != 11:
            raise FormatError("boot.sealed", "sealed boot record has the wrong shape")
        certs, digest, uid, name, version, seq, measurement, signer, downgraded, offset, length = raw
        ok = (
            isinstance(certs, list)
            and all(isinstance(c, str) for c in certs)
            and isinstance(digest, bytes)
            and len(digest) == 32
            and isinstance(uid, bytes)
            and len(uid) == 16
            and isinstance(name, str)
            and isinstance(version, str)
            and isinstance(measurement, bytes)
            and len(measurement) == 32
            and isinstance(signer, bytes)
            and len(signer) == 32
            and isinstance(downgraded, bool)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (seq, offset, length))
        )
        if not ok:
            raise FormatError("boot.sealed", "sealed boot record has a field of the wrong type")
        return cls(digest, uid, name, version, seq, measurement, signer, downgraded, offset, length, tuple(certs))


def seal(accepted: Accepted, data: bytes) -> Sealed:
    """The sealed record of a package that passed a full secure boot."""
    pkg = accepted.package
    # The payload is the envelope's last member in deterministic encoding; otherwise search for it
    # (any occurrence holds the same bytes).
    end = len(data) - len(pkg.payload)
    offset = end if data.endswith(pkg.payload) else data.find(pkg.payload)
    meta = pkg.meta
    return Sealed(
        hashlib.sha256(data).digest(),
        meta.uuid.bytes,
        meta.name,
        meta.version,
        meta.sequence,
        pkg.measurement,
        accepted.signer,
        accepted.downgraded,
        offset,
        len(pkg.payload),
        meta.certifications,
    )


def check_sealed(sealed: Sealed, file_digest: bytes, anchors: Anchors, counters: dict[str, int]) -> int:
    """Decides whether a sealed record still vouches for the stored file; returns the counter to keep.

    Raises:
        TrustError: ``boot.sealed-stale`` — the caller then runs the full check.
    """
    if not hmac.compare_digest(sealed.file_digest, file_digest):
        raise TrustError("boot.sealed-stale", "the stored package changed since it was verified")
    if sealed.signer not in anchors:
        raise TrustError("boot.sealed-stale", "the signer is no longer a trust anchor")
    current = counters.get(str(uuidlib.UUID(bytes=sealed.uuid)))
    if current is not None and sealed.sequence < current:
        raise TrustError("boot.sealed-stale", "the sequence number is below the counter")
    return sealed.sequence


def check_downgrade(
    data: bytes, anchors: Sequence[PublicKey] | Anchors, pkg: package.Package, counter: int, instance_id: bytes
) -> None:
    """Verifies a downgrade authorisation for ``pkg`` over ``counter``.

    Raises:
        TrustError: ``boot.downgrade-*`` naming the mismatch.
        SignatureError / UntrustedSignerError: if it is not signed by an anchor.
    """
    msg = cose.parse(data, expect="sign1")
    if msg.payload is None:
        raise TrustError("boot.downgrade-format", "downgrade authorisation has no payload")
    by_id = anchor_map(anchors)
    key = by_id.get(msg.kid) if msg.kid is not None else None
    if key is None:
        raise UntrustedSignerError("boot.downgrade-signer", "downgrade authorisation is not signed by a trust anchor")
    cose.verify_sign1(msg, key)
    auth = Downgrade.decode(msg.payload)
    meta = pkg.meta
    for rule, got, expected in (
        ("boot.downgrade-uuid", auth.uuid, meta.uuid),
        ("boot.downgrade-device", auth.instance_id, instance_id),
        ("boot.downgrade-target", auth.target, meta.sequence),
        ("boot.downgrade-from", auth.from_counter, counter),
    ):
        if got != expected:
            raise TrustError(
                rule, "downgrade authorisation does not match", subject=str(meta.uuid), got=got, expected=expected
            )


def check_package(
    data: bytes,
    anchors: Sequence[PublicKey] | Anchors,
    counters: dict[str, int],
    instance_id: bytes,
    downgrade: bytes | None = None,
    check_wasm: bool = True,
) -> Accepted:
    """Decides whether a package may boot.

    Args:
        data: the stored envelope bytes.
        anchors: the device's trust anchors.
        counters: anti-rollback counters by microservice UUID (string form).
        instance_id: the device's instance ID (binds downgrade authorisations).
        downgrade: a downgrade authorisation stored with the package, if any.
        check_wasm: parse the Wasm module and check its imports against the host
            ABI. Install and the package tools do; boot does not repeat it, since
            the hypervisor compiles (and so fully validates) every module it loads.

    Returns:
        The accepted package and the counter value to persist.

    Raises:
        FormatError, SignatureError, DigestError, UntrustedSignerError,
        ConditionError, RollbackError (``boot.rollback``), TrustError.
    """
    env = suit.parse_envelope(data)
    auth = suit_auth.authenticate(env, anchors)
    pkg = package.read_package(env)
    if check_wasm:
        wasm.check_imports(wasm.parse_module(pkg.payload), HOST_ABI)
    assert auth.signer_id is not None
    seq = pkg.meta.sequence
    current = counters.get(str(pkg.meta.uuid))
    if current is None or seq >= current:
        return Accepted(pkg, auth.signer_id, seq, downgraded=False)
    if downgrade is None:
        raise RollbackError(
            "boot.rollback",
            "sequence number is below the anti-rollback counter",
            subject=str(pkg.meta.uuid),
            got=seq,
            expected=f">= {current}",
        )
    check_downgrade(downgrade, anchors, pkg, current, instance_id)
    return Accepted(pkg, auth.signer_id, seq, downgraded=True)
