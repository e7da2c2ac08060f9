"""PSA attestation token claims (RFC 9783) and the iSM microservice EAT profile.

Owns: the claims model of a PSA initial attestation token — profile, nonce,
instance ID, implementation ID, client ID, security lifecycle, boot seed,
certification reference, verification service indicator and software
components — in the profile of RFC 9783 (``tag:psacertified.org,2023:psa#tfm``)
and the two profiles before it (``http://arm.com/psa/2.0.0`` and
``PSA_IOT_PROFILE_1`` with its claim keys -75000...-75010); the iSM
microservice claims (an EAT profile of our own, :data:`PROFILE_MICROSERVICE`,
claim keys in the CWT private-use range) carried as one EAT submodule
(``submods``, 266) per microservice in the device token and at the top level
of a microservice's own token; the iSM device claim ``lifecycle-log`` (the
head of the device's lifecycle log) in both; the reference-values file the verifier
appraises a token against. Strict decoding from CBOR/JSON bytes and
deterministic encoding. The wire format is documented in docs/attestation.md.
Must not import: crypto, device or anything above ``ism.formats``.

Threat: a claims-set is attacker-controlled until its signature is checked and
is then trusted by a relying party. A lenient decoder lets a token smuggle an
ignored claim, a short nonce, a truncated identity or a second value for a
claim (duplicate keys). Here the claims are decoded under tight CBOR limits
(depth, items, no indefinite lengths, no duplicate keys); every claim of the
profile is checked for type, size and range; mandatory claims must be present;
claims the profile does not define are refused (``attest.unknown-claim``), so
no claim is silently ignored. Every refusal is a :class:`FormatError` with an
``attest.*`` rule naming the claim.
"""

from __future__ import annotations

import json
import re
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Final, TypeVar

from ism.errors import FormatError
from ism.formats import cbor
from ism.formats import cbor_schema as schema

__all__ = [
    "CLAIMS_LIMITS",
    "LEGACY_PROFILES",
    "LIFECYCLE_LOG_SIZE",
    "LIFECYCLE_STATES",
    "MS_LIFECYCLES",
    "PROFILES",
    "PROFILE_MICROSERVICE",
    "PROFILE_PSA",
    "PROFILE_PSA_2_0_0",
    "PROFILE_PSA_IOT_1",
    "Claims",
    "MicroserviceClaims",
    "Reference",
    "ReferenceComponent",
    "SwComponent",
    "decode_claims",
    "lifecycle_state",
    "parse_reference",
]

#: RFC 9783, the current PSA profile.
PROFILE_PSA: Final = "tag:psacertified.org,2023:psa#tfm"
#: draft-tschofenig-rats-psa-token-08 ... -12: EAT keys, boot seed at 2397.
PROFILE_PSA_2_0_0: Final = "http://arm.com/psa/2.0.0"
#: PSA Attestation API 1.0 / draft-tschofenig-rats-psa-token-07 and before: keys -75000...-75010.
PROFILE_PSA_IOT_1: Final = "PSA_IOT_PROFILE_1"
#: The iSM microservice profile (docs/attestation.md): a microservice's own token.
PROFILE_MICROSERVICE: Final = "tag:ism.example,2026:microservice"

PROFILES: Final = (PROFILE_PSA, PROFILE_MICROSERVICE, PROFILE_PSA_2_0_0, PROFILE_PSA_IOT_1)
LEGACY_PROFILES: Final = frozenset({PROFILE_PSA_2_0_0, PROFILE_PSA_IOT_1})

#: A claims-set nests at most 5 deep (map > submods > claims > certifications > text).
CLAIMS_LIMITS: Final = cbor.Limits(max_depth=8, max_items=4096, allow_indefinite=False)
MAX_COMPONENTS: Final = 128
MAX_SUBMODS: Final = 128
MAX_CERTIFICATIONS: Final = 16
MAX_TEXT: Final = 1024
MAX_REFERENCE_ENTRIES: Final = 1024

# -- claim keys ------------------------------------------------------------------------------------

# EAT (RFC 9711) and RFC 9783
EAT_NONCE: Final = 10
EAT_UEID: Final = 256
EAT_PROFILE: Final = 265
EAT_SUBMODS: Final = 266
EAT_BOOT_SEED: Final = 268
PSA_CLIENT_ID: Final = 2394
PSA_LIFECYCLE: Final = 2395
PSA_IMPLEMENTATION_ID: Final = 2396
PSA_BOOT_SEED_2_0_0: Final = 2397
PSA_CERTIFICATION_REFERENCE: Final = 2398
PSA_SOFTWARE_COMPONENTS: Final = 2399
PSA_VERIFICATION_SERVICE: Final = 2400

# PSA_IOT_PROFILE_1 (arm_psa_* keys of the PSA Attestation API 1.0)
P1_PROFILE: Final = -75000
P1_CLIENT_ID: Final = -75001
P1_LIFECYCLE: Final = -75002
P1_IMPLEMENTATION_ID: Final = -75003
P1_BOOT_SEED: Final = -75004
P1_CERTIFICATION_REFERENCE: Final = -75005
P1_SOFTWARE_COMPONENTS: Final = -75006
P1_NO_SW_MEASUREMENTS: Final = -75007
P1_NONCE: Final = -75008
P1_UEID: Final = -75009
P1_VERIFICATION_SERVICE: Final = -75010

# software component map (psa-software-component)
SC_MEASUREMENT_TYPE: Final = 1
SC_MEASUREMENT_VALUE: Final = 2
SC_VERSION: Final = 4
SC_SIGNER_ID: Final = 5
SC_MEASUREMENT_DESC: Final = 6

# iSM microservice claims: CWT private use (< -65536), clear of the PSA legacy block.
MS_UUID: Final = -81001
MS_NAME: Final = -81002
MS_VERSION: Final = -81003
MS_SEQUENCE: Final = -81004
MS_MEASUREMENT: Final = -81005
MS_SIGNER: Final = -81006
MS_POLICY_DIGEST: Final = -81007
MS_CERTIFICATIONS: Final = -81008
MS_LIFECYCLE: Final = -81009
#: The head of the device's hash-chained lifecycle log (ism.device.lifecycle): the SHA-256 digest of
#: its last entry. A device claim of the iSM tokens (the device token and every microservice token).
ISM_LIFECYCLE_LOG: Final = -81010
#: Its size: a SHA-256 digest.
LIFECYCLE_LOG_SIZE: Final = 32

#: PSA security lifecycle: the major state is the high byte (CDDL psa-lifecycle-*-type).
LIFECYCLE_STATES: Final[Mapping[str, int]] = {
    "unknown": 0x0000,
    "assembly-and-test": 0x1000,
    "psa-rot-provisioning": 0x2000,
    "secured": 0x3000,
    "non-psa-rot-debug": 0x4000,
    "recoverable-psa-rot-debug": 0x5000,
    "decommissioned": 0x6000,
}
_LIFECYCLE_BY_MAJOR: Final = {v >> 8: k for k, v in LIFECYCLE_STATES.items()}

#: Per-microservice lifecycle (issue 6): installed -> active -> suspended -> quarantined -> removed; banned.
MS_LIFECYCLES: Final = ("installed", "active", "suspended", "quarantined", "removed", "banned")

_HASH_SIZES: Final = (32, 48, 64)
# Patterns for ``fullmatch`` (the whole string), with non-capturing groups: nothing is extracted.
_CERT_REF_RE: Final = re.compile(r"[0-9]{13}(?:-[0-9]{5})?")
_MS_NAME_RE: Final = re.compile(r"[a-z][a-z0-9-]{0,31}")
_SEMVER_RE: Final = re.compile(
    r"(?:0|[1-9]\d{0,8})\.(?:0|[1-9]\d{0,8})\.(?:0|[1-9]\d{0,8})"
    r"(?:-[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)
_INT32: Final = 2**31
_UINT64: Final = 2**64


def lifecycle_state(value: int) -> str:
    """Names the PSA security lifecycle state of a claim value (e.g. 0x3000 -> ``secured``).

    Raises:
        FormatError: ``attest.value`` if the value is in no state's range.
    """
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0x60FF:
        raise FormatError("attest.value", "not a PSA security lifecycle value", subject="security-lifecycle", got=value)
    state = _LIFECYCLE_BY_MAJOR.get(value >> 8)
    if state is None:
        raise FormatError(
            "attest.value", "not a PSA security lifecycle value", subject="security-lifecycle", got=hex(value)
        )
    return state


# -- value checks (shared by decoding and the constructors) ---------------------------------------


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, cbor.Tag):
        return f"tag {value.number}"
    return {bytes: "bytes", str: "text", int: "int", list: "array", dict: "map", float: "float"}.get(
        type(value), type(value).__name__
    )


def _type_error(name: str, expected: str, value: Any) -> FormatError:
    return FormatError("attest.type", f"{name} must be {expected}", subject=name, got=_kind(value), expected=expected)


def _bytes(value: Any, name: str) -> bytes:
    if not isinstance(value, bytes):
        raise _type_error(name, "a byte string", value)
    return value


def _text(value: Any, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str):
        raise _type_error(name, "a text string", value)
    if len(value) > limit:
        raise FormatError(
            "attest.size", f"{name} is longer than {limit} characters", subject=name, got=len(value), expected=limit
        )
    return value


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise _type_error(name, "an integer", value)
    return value


def _hash(value: Any, name: str) -> bytes:
    raw = _bytes(value, name)
    if len(raw) not in _HASH_SIZES:
        raise FormatError(
            "attest.size", f"{name} must be 32, 48 or 64 bytes", subject=name, got=len(raw), expected="32|48|64"
        )
    return raw


def _sized(value: Any, name: str, low: int, high: int) -> bytes:
    raw = _bytes(value, name)
    if not low <= len(raw) <= high:
        expected = str(low) if low == high else f"{low}..{high}"
        raise FormatError(
            "attest.size", f"{name} must be {expected} bytes", subject=name, got=len(raw), expected=expected
        )
    return raw


def _value_error(name: str, message: str, got: Any, expected: Any = None) -> FormatError:
    return FormatError("attest.value", f"{name} {message}", subject=name, got=got, expected=expected)


_T = TypeVar("_T")


def _within(prefix: str, build: Callable[[], _T]) -> _T:
    """Runs ``build``; an ``attest.*`` error from it names its claim under ``prefix``."""
    try:
        return build()
    except FormatError as exc:
        if not exc.rule.startswith("attest."):
            raise
        subject = f"{prefix}.{exc.subject}" if exc.subject else prefix
        raise FormatError(exc.rule, exc.message, subject=subject, got=exc.got, expected=exc.expected) from None


# -- software components --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwComponent:
    """One ``psa-software-component``: what was measured at boot and who signed it."""

    measurement_value: bytes
    signer_id: bytes
    measurement_type: str | None = None
    version: str | None = None
    measurement_desc: str | None = None

    def __post_init__(self) -> None:
        _hash(self.measurement_value, "measurement-value")
        _hash(self.signer_id, "signer-id")
        for value, name in (
            (self.measurement_type, "measurement-type"),
            (self.version, "version"),
            (self.measurement_desc, "measurement-desc"),
        ):
            if value is not None:
                _text(value, name)

    def encode(self) -> dict[int, Any]:
        out: dict[int, Any] = {SC_MEASUREMENT_VALUE: self.measurement_value, SC_SIGNER_ID: self.signer_id}
        if self.measurement_type is not None:
            out[SC_MEASUREMENT_TYPE] = self.measurement_type
        if self.version is not None:
            out[SC_VERSION] = self.version
        if self.measurement_desc is not None:
            out[SC_MEASUREMENT_DESC] = self.measurement_desc
        return out

    @classmethod
    def decode(cls, raw: Any) -> SwComponent:
        if not isinstance(raw, dict):
            raise _type_error("software-component", "a map", raw)
        _refuse_unknown(
            raw, {SC_MEASUREMENT_TYPE, SC_MEASUREMENT_VALUE, SC_VERSION, SC_SIGNER_ID, SC_MEASUREMENT_DESC}, ""
        )
        return cls(
            measurement_value=_bytes(_need(raw, SC_MEASUREMENT_VALUE, "measurement-value"), "measurement-value"),
            signer_id=_bytes(_need(raw, SC_SIGNER_ID, "signer-id"), "signer-id"),
            measurement_type=_opt_text(raw, SC_MEASUREMENT_TYPE, "measurement-type"),
            version=_opt_text(raw, SC_VERSION, "version"),
            measurement_desc=_opt_text(raw, SC_MEASUREMENT_DESC, "measurement-desc"),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "measurement_type": self.measurement_type,
            "measurement_value": self.measurement_value.hex(),
            "version": self.version,
            "signer_id": self.signer_id.hex(),
            "measurement_desc": self.measurement_desc,
        }


def _need(raw: Mapping[Any, Any], key: int, name: str) -> Any:
    if key not in raw:
        raise FormatError("attest.missing", f"mandatory claim {name} ({key}) is missing", subject=name, expected=key)
    return raw[key]


def _opt_text(raw: Mapping[Any, Any], key: int, name: str) -> str | None:
    return None if key not in raw else _text(raw[key], name)


def _refuse_unknown(raw: Mapping[Any, Any], allowed: set[int] | frozenset[int], where: str) -> None:
    for key in raw:
        if isinstance(key, bool) or not isinstance(key, int) or key not in allowed:
            subject = f"{where}{key!r}" if where else repr(key)
            raise FormatError(
                "attest.unknown-claim",
                f"claim {key!r} is not defined by this profile",
                subject=subject,
                got=key,
            )


# -- iSM microservice claims ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, init=False, repr=False)
class MicroserviceClaims:
    """The iSM claims about one microservice (docs/attestation.md, "The microservice profile").

    Constructed as ``MicroserviceClaims(uuid, name, version, sequence, measurement, signer,
    policy_digest, lifecycle, certifications=())``, every claim checked. The UUID is kept as its
    16 bytes (``uuid_bytes``, what the claim carries and what equality compares); the
    :class:`uuid.UUID` object is built on first use of :attr:`uuid` for decoded claims.
    """

    uuid_bytes: bytes
    name: str
    version: str
    sequence: int
    measurement: bytes
    signer: bytes
    policy_digest: bytes
    lifecycle: str
    certifications: tuple[str, ...] = ()
    _uuid: uuidlib.UUID | None = field(default=None, compare=False)

    def __init__(
        self,
        uuid: uuidlib.UUID,
        name: str,
        version: str,
        sequence: int,
        measurement: bytes,
        signer: bytes,
        policy_digest: bytes,
        lifecycle: str,
        certifications: tuple[str, ...] = (),
    ) -> None:
        if not isinstance(uuid, uuidlib.UUID):
            raise _type_error("ms-uuid", "a UUID", uuid)
        for slot, value in (
            ("uuid_bytes", uuid.bytes),
            ("name", name),
            ("version", version),
            ("sequence", sequence),
            ("measurement", measurement),
            ("signer", signer),
            ("policy_digest", policy_digest),
            ("lifecycle", lifecycle),
            ("certifications", certifications),
            ("_uuid", uuid),
        ):
            object.__setattr__(self, slot, value)
        self._check()

    @property
    def uuid(self) -> uuidlib.UUID:
        """The microservice UUID."""
        value = self._uuid
        if value is None:  # decoded claims: built once, on first use
            value = uuidlib.UUID(bytes=self.uuid_bytes)
            object.__setattr__(self, "_uuid", value)
        return value

    def __repr__(self) -> str:
        return (
            f"MicroserviceClaims(uuid={self.uuid!r}, name={self.name!r}, version={self.version!r}, "
            f"sequence={self.sequence!r}, measurement={self.measurement!r}, signer={self.signer!r}, "
            f"policy_digest={self.policy_digest!r}, lifecycle={self.lifecycle!r}, "
            f"certifications={self.certifications!r})"
        )

    def _check(self) -> None:
        if not isinstance(self.name, str) or not _MS_NAME_RE.fullmatch(self.name):
            raise _value_error("ms-name", "must be lower-case letters, digits and '-' (1..32)", self.name)
        if not isinstance(self.version, str) or not _SEMVER_RE.fullmatch(self.version):
            raise _value_error("ms-version", "is not a semantic version", self.version)
        seq = _int(self.sequence, "ms-sequence")
        if not 0 <= seq < _UINT64:
            raise _value_error("ms-sequence", "must be an unsigned 64-bit integer", seq)
        _hash(self.measurement, "ms-measurement")
        _hash(self.signer, "ms-signer")
        _hash(self.policy_digest, "ms-policy-digest")
        if self.lifecycle not in MS_LIFECYCLES:
            raise _value_error("ms-lifecycle", "is not a microservice lifecycle state", self.lifecycle, MS_LIFECYCLES)
        if not isinstance(self.certifications, tuple):
            raise _type_error("ms-certifications", "a tuple of text strings", self.certifications)
        if len(self.certifications) > MAX_CERTIFICATIONS:
            raise FormatError(
                "attest.size",
                f"ms-certifications has more than {MAX_CERTIFICATIONS} entries",
                subject="ms-certifications",
                got=len(self.certifications),
            )
        for i, cert in enumerate(self.certifications):
            if not _text(cert, f"ms-certifications[{i}]", 128):
                raise _value_error(f"ms-certifications[{i}]", "must not be empty", cert)

    def encode(self) -> dict[int, Any]:
        out: dict[int, Any] = {
            MS_UUID: self.uuid_bytes,
            MS_NAME: self.name,
            MS_VERSION: self.version,
            MS_SEQUENCE: self.sequence,
            MS_MEASUREMENT: self.measurement,
            MS_SIGNER: self.signer,
            MS_POLICY_DIGEST: self.policy_digest,
            MS_LIFECYCLE: self.lifecycle,
        }
        if self.certifications:
            out[MS_CERTIFICATIONS] = list(self.certifications)
        return out

    @classmethod
    def decode(cls, raw: Mapping[Any, Any]) -> MicroserviceClaims:
        """Decodes the microservice claims of ``raw`` (other keys are the caller's business)."""
        certs_raw = raw.get(MS_CERTIFICATIONS, [])
        if not isinstance(certs_raw, list):
            raise _type_error("ms-certifications", "an array of text strings", certs_raw)
        return cls(
            uuid=uuidlib.UUID(bytes=_sized(_need(raw, MS_UUID, "ms-uuid"), "ms-uuid", 16, 16)),
            name=_text(_need(raw, MS_NAME, "ms-name"), "ms-name"),
            version=_text(_need(raw, MS_VERSION, "ms-version"), "ms-version"),
            sequence=_int(_need(raw, MS_SEQUENCE, "ms-sequence"), "ms-sequence"),
            measurement=_bytes(_need(raw, MS_MEASUREMENT, "ms-measurement"), "ms-measurement"),
            signer=_bytes(_need(raw, MS_SIGNER, "ms-signer"), "ms-signer"),
            policy_digest=_bytes(_need(raw, MS_POLICY_DIGEST, "ms-policy-digest"), "ms-policy-digest"),
            lifecycle=_text(_need(raw, MS_LIFECYCLE, "ms-lifecycle"), "ms-lifecycle"),
            certifications=tuple(_text(c, f"ms-certifications[{i}]", 128) for i, c in enumerate(certs_raw)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": str(self.uuid),
            "name": self.name,
            "version": self.version,
            "sequence": self.sequence,
            "measurement": self.measurement.hex(),
            "signer": self.signer.hex(),
            "policy_digest": self.policy_digest.hex(),
            "lifecycle": self.lifecycle,
            "certifications": list(self.certifications),
        }


_MS_KEYS: Final = frozenset(
    {MS_UUID, MS_NAME, MS_VERSION, MS_SEQUENCE, MS_MEASUREMENT, MS_SIGNER, MS_POLICY_DIGEST, MS_CERTIFICATIONS}
    | {MS_LIFECYCLE}
)


# -- the claims-set -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Keys:
    """Where each PSA claim lives in one profile."""

    profile: int
    nonce: int
    instance_id: int
    implementation_id: int
    client_id: int
    lifecycle: int
    boot_seed: int
    certification_reference: int
    software_components: int
    verification_service: int
    no_sw_measurements: int | None = None

    def all(self) -> frozenset[int]:
        keys = {
            self.profile,
            self.nonce,
            self.instance_id,
            self.implementation_id,
            self.client_id,
            self.lifecycle,
            self.boot_seed,
            self.certification_reference,
            self.software_components,
            self.verification_service,
        }
        if self.no_sw_measurements is not None:
            keys.add(self.no_sw_measurements)
        return frozenset(keys)


_RFC9783_KEYS: Final = _Keys(
    profile=EAT_PROFILE,
    nonce=EAT_NONCE,
    instance_id=EAT_UEID,
    implementation_id=PSA_IMPLEMENTATION_ID,
    client_id=PSA_CLIENT_ID,
    lifecycle=PSA_LIFECYCLE,
    boot_seed=EAT_BOOT_SEED,
    certification_reference=PSA_CERTIFICATION_REFERENCE,
    software_components=PSA_SOFTWARE_COMPONENTS,
    verification_service=PSA_VERIFICATION_SERVICE,
)
_P2_KEYS: Final = replace(_RFC9783_KEYS, boot_seed=PSA_BOOT_SEED_2_0_0)
_P1_KEYS: Final = _Keys(
    profile=P1_PROFILE,
    nonce=P1_NONCE,
    instance_id=P1_UEID,
    implementation_id=P1_IMPLEMENTATION_ID,
    client_id=P1_CLIENT_ID,
    lifecycle=P1_LIFECYCLE,
    boot_seed=P1_BOOT_SEED,
    certification_reference=P1_CERTIFICATION_REFERENCE,
    software_components=P1_SOFTWARE_COMPONENTS,
    verification_service=P1_VERIFICATION_SERVICE,
    no_sw_measurements=P1_NO_SW_MEASUREMENTS,
)
_KEYS: Final[Mapping[str, _Keys]] = {
    PROFILE_PSA: _RFC9783_KEYS,
    PROFILE_MICROSERVICE: _RFC9783_KEYS,
    PROFILE_PSA_2_0_0: _P2_KEYS,
    PROFILE_PSA_IOT_1: _P1_KEYS,
}
#: Claims a profile allows beyond the PSA claims.
_EXTRA_KEYS: Final[Mapping[str, frozenset[int]]] = {
    PROFILE_PSA: frozenset({EAT_SUBMODS, ISM_LIFECYCLE_LOG}),
    PROFILE_MICROSERVICE: _MS_KEYS | {ISM_LIFECYCLE_LOG},
    PROFILE_PSA_2_0_0: frozenset(),
    PROFILE_PSA_IOT_1: frozenset(),
}


@dataclass(frozen=True, slots=True)
class Claims:
    """A PSA attestation token's claims-set, checked against its profile on construction.

    ``profile`` says which profile the claims follow (one of :data:`PROFILES`);
    for ``PSA_IOT_PROFILE_1`` tokens, whose profile claim is optional free text,
    ``profile_claim`` keeps what the token said (``None`` if absent).
    ``microservice`` is set in, and only in, a microservice token
    (:data:`PROFILE_MICROSERVICE`); ``submods`` (one per microservice, keyed by
    name on the wire) appear only in an RFC 9783 device token. ``lifecycle_log``, the head of the
    device's lifecycle log (32 bytes), is an iSM claim: optional in decoding, in the RFC 9783 and
    the microservice profiles only; the iSM's own tokens always carry it.

    Raises:
        FormatError: ``attest.*`` naming the claim that breaks its profile.
    """

    profile: str
    nonce: bytes
    instance_id: bytes
    implementation_id: bytes
    client_id: int
    lifecycle: int
    software_components: tuple[SwComponent, ...] = ()
    boot_seed: bytes | None = None
    certification_reference: str | None = None
    verification_service: str | None = None
    no_sw_measurements: bool = False
    profile_claim: str | None = None
    microservice: MicroserviceClaims | None = None
    submods: tuple[MicroserviceClaims, ...] = ()
    lifecycle_log: bytes | None = None

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise FormatError("attest.profile", "unknown profile", subject="profile", got=self.profile)
        legacy_p1 = self.profile == PROFILE_PSA_IOT_1
        _hash(self.nonce, "nonce")
        ueid = _sized(self.instance_id, "instance-id", 33, 33)
        if ueid[0] != 0x01:
            raise _value_error("instance-id", "must be a RAND UEID (type byte 0x01)", hex(ueid[0]), "0x01")
        _sized(self.implementation_id, "implementation-id", 32, 32)
        client = _int(self.client_id, "client-id")
        if not -_INT32 <= client < _INT32 or client == 0:
            raise _value_error("client-id", "must be a non-zero signed 32-bit integer", client)
        lifecycle_state(_int(self.lifecycle, "security-lifecycle"))
        if self.boot_seed is not None:
            _sized(self.boot_seed, "boot-seed", *((32, 32) if legacy_p1 else (8, 32)))
        elif legacy_p1:
            raise FormatError("attest.missing", "mandatory claim boot-seed is missing", subject="boot-seed")
        if self.certification_reference is not None and not _CERT_REF_RE.fullmatch(
            _text(self.certification_reference, "certification-reference")
        ):
            raise _value_error("certification-reference", "must be EAN-13 or EAN-13+5", self.certification_reference)
        if self.verification_service is not None and not _text(
            self.verification_service, "verification-service-indicator"
        ):
            raise _value_error("verification-service-indicator", "must not be empty", "")
        self._check_components(legacy_p1)
        self._check_profile_extras(legacy_p1)

    def _check_components(self, legacy_p1: bool) -> None:
        if not isinstance(self.software_components, tuple) or not all(
            isinstance(c, SwComponent) for c in self.software_components
        ):
            raise _type_error("software-components", "a tuple of SwComponent", self.software_components)
        if len(self.software_components) > MAX_COMPONENTS:
            raise FormatError(
                "attest.size",
                f"more than {MAX_COMPONENTS} software components",
                subject="software-components",
                got=len(self.software_components),
            )
        if self.no_sw_measurements and not legacy_p1:
            raise FormatError(
                "attest.unknown-claim",
                "no-sw-measurements exists only in PSA_IOT_PROFILE_1",
                subject="no-sw-measurements",
            )
        if self.no_sw_measurements and self.software_components:
            raise FormatError(
                "attest.conflict",
                "software-components and no-sw-measurements are mutually exclusive",
                subject="software-components",
            )
        if not self.software_components and not self.no_sw_measurements:
            raise FormatError(
                "attest.missing",
                "mandatory claim software-components is missing or empty",
                subject="software-components",
            )

    def _check_profile_extras(self, legacy_p1: bool) -> None:
        if self.profile_claim is not None and (not legacy_p1 or not _text(self.profile_claim, "profile")):
            raise _value_error(
                "profile", "free-text profile claims exist only in PSA_IOT_PROFILE_1", self.profile_claim
            )
        if self.profile == PROFILE_MICROSERVICE:
            if not isinstance(self.microservice, MicroserviceClaims):
                raise FormatError(
                    "attest.missing", "a microservice token needs the microservice claims", subject="ms-uuid"
                )
        elif self.microservice is not None:
            raise FormatError(
                "attest.unknown-claim",
                "microservice claims belong to the microservice profile",
                subject="ms-uuid",
            )
        if self.submods and self.profile != PROFILE_PSA:
            raise FormatError(
                "attest.unknown-claim", "submods are allowed only in an RFC 9783 device token", subject="submods"
            )
        if not isinstance(self.submods, tuple) or not all(isinstance(m, MicroserviceClaims) for m in self.submods):
            raise _type_error("submods", "a tuple of MicroserviceClaims", self.submods)
        if len(self.submods) > MAX_SUBMODS:
            raise FormatError(
                "attest.size", f"more than {MAX_SUBMODS} submodules", subject="submods", got=len(self.submods)
            )
        names = [m.name for m in self.submods]
        uuids = [m.uuid_bytes for m in self.submods]
        if len(set(names)) != len(names) or len(set(uuids)) != len(uuids):
            raise FormatError("attest.submod", "two submodules name the same microservice", subject="submods")
        if self.lifecycle_log is not None:
            if self.profile not in (PROFILE_PSA, PROFILE_MICROSERVICE):
                raise FormatError(
                    "attest.unknown-claim",
                    "the lifecycle-log claim belongs to the iSM tokens (RFC 9783 and microservice profiles)",
                    subject="lifecycle-log",
                )
            _sized(self.lifecycle_log, "lifecycle-log", LIFECYCLE_LOG_SIZE, LIFECYCLE_LOG_SIZE)

    # -- views --------------------------------------------------------------------------------

    @property
    def lifecycle_state(self) -> str:
        """The PSA security lifecycle state name (``secured``, ``decommissioned``, ...)."""
        return lifecycle_state(self.lifecycle)

    @property
    def legacy(self) -> bool:
        """True for the profiles before RFC 9783."""
        return self.profile in LEGACY_PROFILES

    def microservices(self) -> tuple[MicroserviceClaims, ...]:
        """Every microservice the token describes: its submodules, or the caller of a microservice token."""
        return self.submods if self.microservice is None else (self.microservice,)

    # -- encoding -----------------------------------------------------------------------------

    def encode_map(self) -> dict[int, Any]:
        """The claims-set as a CBOR-ready map with this profile's claim keys."""
        keys = _KEYS[self.profile]
        out: dict[int, Any] = {}
        if self.profile != PROFILE_PSA_IOT_1:
            out[keys.profile] = self.profile
        elif self.profile_claim is not None:
            out[keys.profile] = self.profile_claim
        out[keys.nonce] = self.nonce
        out[keys.instance_id] = self.instance_id
        out[keys.implementation_id] = self.implementation_id
        out[keys.client_id] = self.client_id
        out[keys.lifecycle] = self.lifecycle
        if self.software_components:
            out[keys.software_components] = [c.encode() for c in self.software_components]
        if self.no_sw_measurements and keys.no_sw_measurements is not None:
            out[keys.no_sw_measurements] = 1
        if self.boot_seed is not None:
            out[keys.boot_seed] = self.boot_seed
        if self.certification_reference is not None:
            out[keys.certification_reference] = self.certification_reference
        if self.verification_service is not None:
            out[keys.verification_service] = self.verification_service
        if self.microservice is not None:
            out.update(self.microservice.encode())
        if self.submods:
            out[EAT_SUBMODS] = {m.name: m.encode() for m in self.submods}
        if self.lifecycle_log is not None:
            out[ISM_LIFECYCLE_LOG] = self.lifecycle_log
        return out

    def encode(self) -> bytes:
        """Deterministic CBOR (RFC 8949 section 4.2.1) of the claims-set: the token payload."""
        return cbor.dumps(self.encode_map())

    def to_json(self) -> dict[str, Any]:
        """JSON-friendly view: byte strings as lower-case hex."""
        out: dict[str, Any] = {"profile": self.profile}
        if self.profile_claim is not None:
            out["profile_claim"] = self.profile_claim
        out.update(
            {
                "nonce": self.nonce.hex(),
                "instance_id": self.instance_id.hex(),
                "implementation_id": self.implementation_id.hex(),
                "client_id": self.client_id,
                "security_lifecycle": {"value": self.lifecycle, "state": self.lifecycle_state},
                "boot_seed": None if self.boot_seed is None else self.boot_seed.hex(),
                "lifecycle_log": None if self.lifecycle_log is None else self.lifecycle_log.hex(),
                "certification_reference": self.certification_reference,
                "verification_service": self.verification_service,
                "software_components": [c.to_json() for c in self.software_components],
            }
        )
        if self.profile == PROFILE_PSA_IOT_1:
            out["no_sw_measurements"] = self.no_sw_measurements
        if self.microservice is not None:
            out["microservice"] = self.microservice.to_json()
        if self.submods:
            out["submods"] = {m.name: m.to_json() for m in self.submods}
        return out


def _profile_of(raw: Mapping[Any, Any]) -> tuple[str, str | None]:
    """Which profile a claims-set follows, and (PSA_IOT_PROFILE_1 only) its free-text profile claim."""
    if EAT_PROFILE in raw:
        value = raw[EAT_PROFILE]
        if not isinstance(value, str):
            raise FormatError(
                "attest.profile", "the profile claim must be a text URI", subject="profile", got=_kind(value)
            )
        if value not in (PROFILE_PSA, PROFILE_MICROSERVICE, PROFILE_PSA_2_0_0):
            raise FormatError(
                "attest.profile", "unknown profile", subject="profile", got=value, expected=", ".join(PROFILES)
            )
        return value, None
    if any(isinstance(k, int) and not isinstance(k, bool) and P1_VERIFICATION_SERVICE <= k <= P1_PROFILE for k in raw):
        claim = raw.get(P1_PROFILE)
        if claim is not None and not isinstance(claim, str):
            raise _type_error("profile", "a text string", claim)
        return PROFILE_PSA_IOT_1, claim
    raise FormatError(
        "attest.profile",
        "no profile claim (265) and no PSA_IOT_PROFILE_1 claims: unknown profile",
        subject="profile",
    )


def _components(raw: Any, name: str) -> tuple[SwComponent, ...]:
    if not isinstance(raw, list):
        raise _type_error(name, "an array of software components", raw)
    if not raw:
        raise FormatError("attest.size", f"{name} must have at least one entry", subject=name, got=0, expected="1..")
    if len(raw) > MAX_COMPONENTS:
        raise FormatError("attest.size", f"more than {MAX_COMPONENTS} software components", subject=name, got=len(raw))
    return tuple(_within(f"{name}[{i}]", partial(SwComponent.decode, c)) for i, c in enumerate(raw))


def _submodule(name: Any, raw: Any) -> MicroserviceClaims:
    if not isinstance(name, str):
        raise _type_error("submods", "a map keyed by text names", name)
    if not isinstance(raw, dict):
        raise FormatError(
            "attest.submod",
            "only claims-set submodules are supported (no nested or detached tokens)",
            subject=f"submods[{name}]",
            got=_kind(raw),
        )

    def build() -> MicroserviceClaims:
        _refuse_unknown(raw, _MS_KEYS, "")
        return MicroserviceClaims.decode(raw)

    ms = _within(f"submods[{name}]", build)
    if ms.name != name:
        raise FormatError(
            "attest.submod", "a submodule is named after its microservice", subject=f"submods[{name}]", got=ms.name
        )
    return ms


def _submods(raw: Any) -> tuple[MicroserviceClaims, ...]:
    if not isinstance(raw, dict):
        raise _type_error("submods", "a map of submodules", raw)
    if not raw:
        raise FormatError("attest.size", "submods must have at least one entry", subject="submods", got=0)
    if len(raw) > MAX_SUBMODS:
        raise FormatError("attest.size", f"more than {MAX_SUBMODS} submodules", subject="submods", got=len(raw))
    return tuple(_submodule(name, value) for name, value in raw.items())


# -- the fast path --------------------------------------------------------------------------------
#
# A token is verified far more often than it is malformed. ``_decode_fast`` checks a claims-set
# against the schema of its profile and builds its objects in the same pass
# (``ism.formats.cbor_schema``: every type, size, range, enumeration, pattern, mandatory and unknown
# claim, the UEID type byte, submodules named after their microservice, unique microservice UUIDs;
# in the native extension when it is built). It returns None at the first thing it does not accept,
# or for a profile it does not handle (the legacy ones): ``decode_claims`` then runs
# ``_decode_checked``, which raises the error. So the fast path can only accept what the checked
# path accepts, giving equal objects, and every error still comes from one place. A check added to
# a constructor or to the checked decoder must be added to these schemas too;
# tests/unit/test_cbor_claims.py compares the two paths on mutated claims-sets, with the native and
# the pure-Python schema interpreter.

_HASH: Final = schema.Bytes(sizes=_HASH_SIZES)
_OPTIONAL_TEXT: Final = schema.Text(max_len=MAX_TEXT)
_COMPONENT_SCHEMA: Final = schema.Record(
    (
        schema.Field(SC_MEASUREMENT_VALUE, _HASH),
        schema.Field(SC_SIGNER_ID, _HASH),
        schema.Field(SC_MEASUREMENT_TYPE, _OPTIONAL_TEXT, required=False),
        schema.Field(SC_VERSION, _OPTIONAL_TEXT, required=False),
        schema.Field(SC_MEASUREMENT_DESC, _OPTIONAL_TEXT, required=False),
    ),
    schema.Make(
        SwComponent,
        (
            ("measurement_value", schema.Get(SC_MEASUREMENT_VALUE)),
            ("signer_id", schema.Get(SC_SIGNER_ID)),
            ("measurement_type", schema.Get(SC_MEASUREMENT_TYPE)),
            ("version", schema.Get(SC_VERSION)),
            ("measurement_desc", schema.Get(SC_MEASUREMENT_DESC)),
        ),
    ),
)
_MS_FIELDS: Final = (
    schema.Field(MS_UUID, schema.Bytes(sizes=(16,))),
    schema.Field(MS_NAME, schema.Text(1, 32, pattern=_MS_NAME_RE)),
    schema.Field(MS_VERSION, schema.Text(max_len=MAX_TEXT, pattern=_SEMVER_RE)),
    schema.Field(MS_SEQUENCE, schema.Int(((0, _UINT64 - 1),))),
    schema.Field(MS_MEASUREMENT, _HASH),
    schema.Field(MS_SIGNER, _HASH),
    schema.Field(MS_POLICY_DIGEST, _HASH),
    schema.Field(MS_CERTIFICATIONS, schema.Array(schema.Text(1, 128), max_len=MAX_CERTIFICATIONS), required=False),
    schema.Field(MS_LIFECYCLE, schema.Text(one_of=frozenset(MS_LIFECYCLES))),
)
_MS_MAKE: Final = schema.Make(
    MicroserviceClaims,
    (
        ("uuid_bytes", schema.Get(MS_UUID)),
        ("name", schema.Get(MS_NAME)),
        ("version", schema.Get(MS_VERSION)),
        ("sequence", schema.Get(MS_SEQUENCE)),
        ("measurement", schema.Get(MS_MEASUREMENT)),
        ("signer", schema.Get(MS_SIGNER)),
        ("policy_digest", schema.Get(MS_POLICY_DIGEST)),
        ("lifecycle", schema.Get(MS_LIFECYCLE)),
        ("certifications", schema.Get(MS_CERTIFICATIONS, ())),
        ("_uuid", schema.Const(None)),  # the UUID object: built on first use
    ),
)


def _platform_fields(profile: str) -> tuple[schema.Field, ...]:
    """The RFC 9783 claims of both profiles the fast path handles (``_RFC9783_KEYS``) and lifecycle-log."""
    majors = sorted(LIFECYCLE_STATES.values())
    return (
        schema.Field(EAT_PROFILE, schema.Text(one_of=frozenset({profile}))),
        schema.Field(EAT_NONCE, _HASH),
        schema.Field(EAT_UEID, schema.Bytes(sizes=(33,), prefix=b"\x01")),  # a RAND UEID
        schema.Field(PSA_IMPLEMENTATION_ID, schema.Bytes(sizes=(32,))),
        schema.Field(PSA_CLIENT_ID, schema.Int(((-_INT32, -1), (1, _INT32 - 1)))),
        schema.Field(PSA_LIFECYCLE, schema.Int(tuple((v, v | 0xFF) for v in majors))),
        schema.Field(PSA_SOFTWARE_COMPONENTS, schema.Array(_COMPONENT_SCHEMA, 1, MAX_COMPONENTS)),
        # a null boot seed, certification reference or verification service is taken as absent
        schema.Field(EAT_BOOT_SEED, schema.Bytes(min_size=8, max_size=32), required=False, nullable=True),
        schema.Field(
            PSA_CERTIFICATION_REFERENCE,
            schema.Text(max_len=MAX_TEXT, pattern=_CERT_REF_RE),
            required=False,
            nullable=True,
        ),
        schema.Field(PSA_VERIFICATION_SERVICE, schema.Text(1, MAX_TEXT), required=False, nullable=True),
        schema.Field(ISM_LIFECYCLE_LOG, schema.Bytes(sizes=(LIFECYCLE_LOG_SIZE,)), required=False),
    )


def _claims_make(microservice: schema.Source, submods: schema.Source) -> schema.Make:
    return schema.Make(
        Claims,
        (
            ("profile", schema.Get(EAT_PROFILE)),
            ("nonce", schema.Get(EAT_NONCE)),
            ("instance_id", schema.Get(EAT_UEID)),
            ("implementation_id", schema.Get(PSA_IMPLEMENTATION_ID)),
            ("client_id", schema.Get(PSA_CLIENT_ID)),
            ("lifecycle", schema.Get(PSA_LIFECYCLE)),
            ("software_components", schema.Get(PSA_SOFTWARE_COMPONENTS)),
            ("boot_seed", schema.Get(EAT_BOOT_SEED)),
            ("certification_reference", schema.Get(PSA_CERTIFICATION_REFERENCE)),
            ("verification_service", schema.Get(PSA_VERIFICATION_SERVICE)),
            ("no_sw_measurements", schema.Const(False)),
            ("profile_claim", schema.Const(None)),
            ("microservice", microservice),
            ("submods", submods),
            ("lifecycle_log", schema.Get(ISM_LIFECYCLE_LOG)),
        ),
    )


#: The claims-set of each profile the fast path handles, and the objects it builds.
_FAST_SCHEMAS: Final[Mapping[str, schema.Schema]] = {
    PROFILE_PSA: schema.Schema(
        schema.Record(
            (
                *_platform_fields(PROFILE_PSA),
                schema.Field(
                    EAT_SUBMODS,
                    # each submodule named after its microservice; microservice UUIDs unique
                    schema.MapOf(
                        schema.Text(),
                        schema.Record(_MS_FIELDS, _MS_MAKE),
                        1,
                        MAX_SUBMODS,
                        key_is=MS_NAME,
                        unique=MS_UUID,
                    ),
                    required=False,
                ),
            ),
            _claims_make(schema.Const(None), schema.Get(EAT_SUBMODS, ())),
        )
    ),
    PROFILE_MICROSERVICE: schema.Schema(
        schema.Record(
            (*_platform_fields(PROFILE_MICROSERVICE), *_MS_FIELDS),
            _claims_make(_MS_MAKE, schema.Const(())),
        )
    ),
}


def _decode_fast(raw: Any, python: bool = False) -> Claims | None:
    """The claims of an RFC 9783 device token or of a microservice token, or None (see above).

    ``python`` checks and builds with the pure-Python interpreter even when the native one is built
    (tests).
    """
    if type(raw) is not dict:
        return None
    profile = raw.get(EAT_PROFILE)
    checker = _FAST_SCHEMAS.get(profile) if type(profile) is str else None
    if checker is None:
        return None
    claims: Claims | None = checker.build_python(raw) if python else checker.build(raw)
    return claims


def decode_claims(data: bytes) -> Claims:
    """Decodes and checks a claims-set (the payload of a PSA token) in any profile of :data:`PROFILES`.

    The claims of an RFC 9783 device token or a microservice token are checked on a fast path that
    makes every check once; anything it does not accept, and every legacy profile, goes to the
    checked decoder, which raises the error (see "the fast path" below).

    Args:
        data: the CBOR-encoded claims map.

    Returns:
        The checked :class:`Claims`; ``profile`` tells which profile the token follows.

    Raises:
        FormatError: ``cbor.*`` if the bytes are not strict CBOR (duplicate keys,
            indefinite lengths, too deep, too many items, trailing bytes);
            ``attest.claims`` if the payload is not a map; ``attest.profile``
            (unknown or missing profile); ``attest.missing``, ``attest.type``,
            ``attest.size``, ``attest.value``, ``attest.unknown-claim``,
            ``attest.conflict``, ``attest.submod`` naming the claim.
    """
    raw = cbor.loads(data, CLAIMS_LIMITS)
    claims = _decode_fast(raw)
    return claims if claims is not None else _decode_checked(raw)


def _decode_checked(raw: Any) -> Claims:
    """The reference claims decoder: every check, raising the error that names the claim."""
    if not isinstance(raw, dict):
        raise FormatError("attest.claims", "the claims-set must be a CBOR map", got=_kind(raw))
    profile, profile_claim = _profile_of(raw)
    keys = _KEYS[profile]
    _refuse_unknown(raw, keys.all() | _EXTRA_KEYS[profile], "")
    legacy_p1 = profile == PROFILE_PSA_IOT_1

    no_sw = False
    if keys.no_sw_measurements is not None and keys.no_sw_measurements in raw:
        if _int(raw[keys.no_sw_measurements], "no-sw-measurements") != 1:
            raise _value_error("no-sw-measurements", "must be 1", raw[keys.no_sw_measurements], 1)
        no_sw = True
    components: tuple[SwComponent, ...] = ()
    if keys.software_components in raw:
        components = _components(raw[keys.software_components], "software-components")
    elif not no_sw:
        _need(raw, keys.software_components, "software-components")

    nonce = _need(raw, keys.nonce, "nonce")
    if isinstance(nonce, list):
        raise _type_error("nonce", "one byte string (not an array of nonces)", nonce)
    boot_seed = raw.get(keys.boot_seed)
    if boot_seed is None and legacy_p1:
        _need(raw, keys.boot_seed, "boot-seed")
    cert = raw.get(keys.certification_reference)
    vsi = raw.get(keys.verification_service)
    return Claims(
        profile=profile,
        nonce=_bytes(nonce, "nonce"),
        instance_id=_bytes(_need(raw, keys.instance_id, "instance-id"), "instance-id"),
        implementation_id=_bytes(_need(raw, keys.implementation_id, "implementation-id"), "implementation-id"),
        client_id=_int(_need(raw, keys.client_id, "client-id"), "client-id"),
        lifecycle=_int(_need(raw, keys.lifecycle, "security-lifecycle"), "security-lifecycle"),
        software_components=components,
        boot_seed=None if boot_seed is None else _bytes(boot_seed, "boot-seed"),
        certification_reference=None if cert is None else _text(cert, "certification-reference"),
        verification_service=None if vsi is None else _text(vsi, "verification-service-indicator"),
        no_sw_measurements=no_sw,
        profile_claim=profile_claim,
        microservice=MicroserviceClaims.decode(raw) if profile == PROFILE_MICROSERVICE else None,
        submods=_submods(raw[EAT_SUBMODS]) if EAT_SUBMODS in raw else (),
        # present means a byte string: a null is refused, as for ms-certifications
        lifecycle_log=_bytes(raw[ISM_LIFECYCLE_LOG], "lifecycle-log") if ISM_LIFECYCLE_LOG in raw else None,
    )


# -- reference values -----------------------------------------------------------------------------

REFERENCE_VERSION: Final = 1
_VERDICTS: Final = ("warning", "contraindicated")
_REF_KEYS: Final = frozenset(
    {"version", "implementation_id", "lifecycles", "lifecycle_log", "unknown_components", "components"}
)
_REF_COMPONENT_KEYS: Final = frozenset(
    {
        "name",
        "uuid",
        "measurements",
        "signers",
        "min_version",
        "min_sequence",
        "policy_digests",
        "lifecycles",
        "required",
    }
)
_REF_VERSION_RE: Final = re.compile(r"^v?\d{1,9}(\.\d{1,9})*(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?\Z")


@dataclass(frozen=True, slots=True)
class ReferenceComponent:
    """Expected values for one component, found by ``name`` (measurement type / ms name) or ``uuid``."""

    name: str | None = None
    uuid: uuidlib.UUID | None = None
    measurements: tuple[bytes, ...] = ()
    signers: tuple[bytes, ...] = ()
    min_version: str | None = None
    min_sequence: int | None = None
    policy_digests: tuple[bytes, ...] = ()
    lifecycles: tuple[str, ...] = ()
    required: bool = False

    @property
    def label(self) -> str:
        return self.name if self.name is not None else str(self.uuid)


@dataclass(frozen=True, slots=True)
class Reference:
    """Reference values a token is appraised against (docs/attestation.md, "Reference values")."""

    components: tuple[ReferenceComponent, ...] = ()
    implementation_id: bytes | None = None
    lifecycles: tuple[str, ...] = ()
    unknown_components: str = "warning"
    lifecycle_log: bytes | None = None

    def by_name(self, name: str | None) -> ReferenceComponent | None:
        return None if name is None else next((c for c in self.components if c.name == name), None)

    def by_uuid(self, ms_uuid: uuidlib.UUID) -> ReferenceComponent | None:
        return next((c for c in self.components if c.uuid == ms_uuid), None)


def _ref_error(where: str, message: str, got: Any = None) -> FormatError:
    return FormatError("attest.reference", f"{where}: {message}", subject=where, got=got)


def _ref_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _ref_error(key, "duplicate key", key)
        out[key] = value
    return out


def _ref_hex(value: Any, where: str, sizes: tuple[int, ...]) -> bytes:
    if not isinstance(value, str):
        raise _ref_error(where, "must be a hex string", value)
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise _ref_error(where, "is not hex", value) from None
    if len(raw) not in sizes:
        raise _ref_error(where, f"must be {'|'.join(map(str, sizes))} bytes", len(raw))
    return raw


def _ref_list(value: Any, where: str, item: Callable[[Any, str], _T]) -> tuple[_T, ...]:
    if not isinstance(value, list) or not value:
        raise _ref_error(where, "must be a non-empty list", value)
    if len(value) > MAX_REFERENCE_ENTRIES:
        raise _ref_error(where, f"has more than {MAX_REFERENCE_ENTRIES} entries", len(value))
    return tuple(item(v, f"{where}[{i}]") for i, v in enumerate(value))


def _ref_state(states: tuple[str, ...]) -> Callable[[Any, str], str]:
    def check(value: Any, where: str) -> str:
        if value not in states:
            raise _ref_error(where, f"must be one of {', '.join(states)}", value)
        return str(value)

    return check


def _ref_component(raw: Any, where: str) -> ReferenceComponent:
    if not isinstance(raw, dict):
        raise _ref_error(where, "must be an object", raw)
    unknown = set(raw) - _REF_COMPONENT_KEYS
    if unknown:
        raise _ref_error(f"{where}.{sorted(unknown)[0]}", "unknown key", sorted(unknown))
    name = raw.get("name")
    if name is not None and (not isinstance(name, str) or not name or len(name) > MAX_TEXT):
        raise _ref_error(f"{where}.name", "must be a non-empty string", name)
    ms_uuid = None
    if "uuid" in raw:
        try:
            ms_uuid = uuidlib.UUID(str(raw["uuid"])) if isinstance(raw["uuid"], str) else None
        except ValueError:
            ms_uuid = None
        if ms_uuid is None:
            raise _ref_error(f"{where}.uuid", "is not a UUID", raw["uuid"])
    if name is None and ms_uuid is None:
        raise _ref_error(where, "needs a name or a uuid")
    min_version = raw.get("min_version")
    if min_version is not None and (not isinstance(min_version, str) or not _REF_VERSION_RE.match(min_version)):
        raise _ref_error(f"{where}.min_version", "is not a dotted numeric version", min_version)
    min_sequence = raw.get("min_sequence")
    if min_sequence is not None and (
        not isinstance(min_sequence, int) or isinstance(min_sequence, bool) or not 0 <= min_sequence < _UINT64
    ):
        raise _ref_error(f"{where}.min_sequence", "must be an unsigned integer", min_sequence)
    required = raw.get("required", False)
    if not isinstance(required, bool):
        raise _ref_error(f"{where}.required", "must be true or false", required)

    def hashes(key: str) -> tuple[bytes, ...]:
        if key not in raw:
            return ()
        return _ref_list(raw[key], f"{where}.{key}", lambda v, w: _ref_hex(v, w, _HASH_SIZES))

    lifecycles = (
        _ref_list(raw["lifecycles"], f"{where}.lifecycles", _ref_state(MS_LIFECYCLES)) if "lifecycles" in raw else ()
    )
    return ReferenceComponent(
        name=name,
        uuid=ms_uuid,
        measurements=hashes("measurements"),
        signers=hashes("signers"),
        min_version=min_version,
        min_sequence=min_sequence,
        policy_digests=hashes("policy_digests"),
        lifecycles=lifecycles,
        required=required,
    )


def parse_reference(data: bytes | str, source: str = "reference") -> Reference:
    """Parses a reference-values file (JSON; the format is in docs/attestation.md).

    Unknown keys, duplicate keys, malformed hex, UUIDs or versions, and two
    entries for the same name or UUID are refused.

    Raises:
        FormatError: ``attest.reference`` naming the offending entry.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        raw = json.loads(text, object_pairs_hook=_ref_pairs)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError("attest.reference", f"not valid JSON: {exc}", subject=source) from None
    if not isinstance(raw, dict):
        raise _ref_error(source, "must be a JSON object", raw)
    unknown = set(raw) - _REF_KEYS
    if unknown:
        raise _ref_error(f"{source}.{sorted(unknown)[0]}", "unknown key", sorted(unknown))
    if raw.get("version") != REFERENCE_VERSION or isinstance(raw.get("version"), bool):
        raise _ref_error(f"{source}.version", f"must be {REFERENCE_VERSION}", raw.get("version"))
    impl = raw.get("implementation_id")
    implementation_id = None if impl is None else _ref_hex(impl, f"{source}.implementation_id", (32,))
    lifecycles = (
        _ref_list(raw["lifecycles"], f"{source}.lifecycles", _ref_state(tuple(LIFECYCLE_STATES)))
        if "lifecycles" in raw
        else ()
    )
    log = raw.get("lifecycle_log")
    lifecycle_log = None if log is None else _ref_hex(log, f"{source}.lifecycle_log", (LIFECYCLE_LOG_SIZE,))
    unknown_components = raw.get("unknown_components", "warning")
    if unknown_components not in _VERDICTS:
        raise _ref_error(f"{source}.unknown_components", "must be warning or contraindicated", unknown_components)
    comps_raw = raw.get("components", [])
    if not isinstance(comps_raw, list) or len(comps_raw) > MAX_REFERENCE_ENTRIES:
        raise _ref_error(f"{source}.components", f"must be a list of at most {MAX_REFERENCE_ENTRIES}", comps_raw)
    components = tuple(_ref_component(c, f"{source}.components[{i}]") for i, c in enumerate(comps_raw))
    names = [c.name for c in components if c.name is not None]
    uuids = [c.uuid for c in components if c.uuid is not None]
    if len(set(names)) != len(names) or len(set(uuids)) != len(uuids):
        raise _ref_error(f"{source}.components", "two entries for the same name or uuid")
    return Reference(components, implementation_id, lifecycles, str(unknown_components), lifecycle_log)
