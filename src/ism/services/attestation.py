"""The attestation service: PSA tokens (RFC 9783) for the device and for each microservice.

Owns: the device's initial attestation key (``device.iak``, P-256, in the key
store), the platform claims (instance ID = the UEID, implementation ID,
security lifecycle and the head of the device's lifecycle log, a boot seed
fresh per boot, one software component per
booted microservice plus one for the iSM itself), the iSM microservice
claims (docs/attestation.md), and the ``attest`` host function.
Must not import: agent, store, cli.

Threat: a token that misrepresents what runs. Every measurement comes from
secure boot (the SHA-256 of the payload secure boot accepted) and the iSM's
own component is a hash of its code; a microservice's token carries only its
own claims (its identity is the caller's, not an argument) and is bound to
the nonce it supplies; the attestation key never leaves the key store.
"""

from __future__ import annotations

import functools
import hashlib
import os
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import ism
from ism.crypto.attestation import sign_payload, sign_token
from ism.crypto.keystore import KeyStore
from ism.device.virtual import Booted
from ism.errors import Violation
from ism.formats import cbor, psa
from ism.formats.abi import ERRORS

if TYPE_CHECKING:
    from ism.hypervisor.sandbox import Sandbox
    from ism.hypervisor.supervisor import Microservice

__all__ = [
    "IAK_ID",
    "AttestationService",
    "AttestedMicroservice",
    "attested",
    "client_id",
    "implementation_id",
    "ism_measurement",
]

IAK_ID: Final = "device.iak"
ETOOBIG: Final = ERRORS["ISM_ETOOBIG"]
EINVAL: Final = ERRORS["ISM_EINVAL"]
#: the iSM's own client ID in device tokens (positive: a secure partition in PSA terms)
DEVICE_CLIENT_ID: Final = 1


@dataclass(frozen=True, slots=True)
class AttestedMicroservice:
    """What secure boot and the policy established about a microservice."""

    uuid: uuidlib.UUID
    name: str
    version: str
    sequence: int
    measurement: bytes
    signer: bytes
    policy_digest: bytes
    certifications: tuple[str, ...] = ()

    def claims(self, lifecycle: str) -> psa.MicroserviceClaims:
        return psa.MicroserviceClaims(
            self.uuid,
            self.name,
            self.version,
            self.sequence,
            self.measurement,
            self.signer,
            self.policy_digest,
            lifecycle,
            self.certifications,
        )

    def component(self) -> psa.SwComponent:
        return psa.SwComponent(self.measurement, self.signer, self.name, self.version, "sha-256")


@functools.cache
def ism_measurement() -> bytes:
    """SHA-256 over the iSM's own code (every module of the ``ism`` package, in path order)."""
    root = Path(ism.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.digest()


def implementation_id() -> bytes:
    """The implementation ID: which iSM implementation (name and version) produced the token."""
    return hashlib.sha256(f"iSM {ism.__version__}".encode()).digest()


def client_id(ms_uuid: uuidlib.UUID) -> int:
    """A microservice's PSA client ID: negative (non-secure) and stable, derived from its UUID."""
    return -((int.from_bytes(ms_uuid.bytes[:4], "big") & 0x7FFFFFFE) + 1)


class AttestationService:
    """Device and per-microservice tokens signed by the initial attestation key.

    Args:
        keystore: holds ``device.iak`` (created on first use).
        ueid: the device's instance ID (33 bytes, RAND UEID).
        microservices: what secure boot accepted, with policy digests.
        lifecycle: the device's PSA security lifecycle state name.
        lifecycle_log: the head of the device's lifecycle log (the digest of its last entry, 32 bytes:
            ``Device.lifecycle_head``), the ``lifecycle-log`` claim of every token.
        boot_seed: fresh per boot (random if not given).
        states: a microservice's current lifecycle state by UUID (e.g. from the supervisor).
    """

    def __init__(
        self,
        keystore: KeyStore,
        ueid: bytes,
        microservices: Mapping[uuidlib.UUID, AttestedMicroservice],
        lifecycle: str = "secured",
        boot_seed: bytes | None = None,
        states: Callable[[uuidlib.UUID], str] | None = None,
        *,
        lifecycle_log: bytes,
    ) -> None:
        self.keystore = keystore
        self.ueid = ueid
        self.microservices = dict(microservices)
        self.lifecycle = psa.LIFECYCLE_STATES[lifecycle]
        self.lifecycle_log = lifecycle_log
        self.boot_seed = boot_seed or os.urandom(32)
        self.states = states or (lambda _uuid: "active")
        if not keystore.exists(IAK_ID):
            keystore.generate(IAK_ID, "ecc-p256")
        self.public_key_der = keystore.public_key(IAK_ID)
        self._kid = hashlib.sha256(self.public_key_der).digest()
        self._sign = functools.partial(keystore.sign, IAK_ID)
        self._templates: dict[object, tuple[tuple[str, ...], bytes, bytes]] = {}

    def replace_microservices(self, microservices: Mapping[uuidlib.UUID, AttestedMicroservice]) -> None:
        """What to attest from now on (a new policy changes the policy digests); cached claims are dropped."""
        self.microservices = dict(microservices)
        self._templates.clear()

    @property
    def kid(self) -> bytes:
        """The IAK's key ID: SHA-256 of its SubjectPublicKeyInfo (as signer IDs are)."""
        return self._kid

    def _platform(self) -> list[psa.SwComponent]:
        ism_component = psa.SwComponent(ism_measurement(), self.kid, "ism", ism.__version__, "sha-256")
        return [ism_component, *(ms.component() for ms in self.microservices.values())]

    def device_claims(self, nonce: bytes) -> psa.Claims:
        """The device claims: platform, one software component and one submodule per microservice."""
        return psa.Claims(
            profile=psa.PROFILE_PSA,
            nonce=nonce,
            instance_id=self.ueid,
            implementation_id=implementation_id(),
            client_id=DEVICE_CLIENT_ID,
            lifecycle=self.lifecycle,
            software_components=tuple(self._platform()),
            boot_seed=self.boot_seed,
            submods=tuple(ms.claims(self.states(ms.uuid)) for ms in self.microservices.values()),
            lifecycle_log=self.lifecycle_log,
        )

    def microservice_claims(self, ms_uuid: uuidlib.UUID, nonce: bytes) -> psa.Claims:
        """A microservice's claims: the platform claims plus its own."""
        ms = self.microservices[ms_uuid]
        return psa.Claims(
            profile=psa.PROFILE_MICROSERVICE,
            nonce=nonce,
            instance_id=self.ueid,
            implementation_id=implementation_id(),
            client_id=client_id(ms_uuid),
            lifecycle=self.lifecycle,
            software_components=tuple(self._platform()),
            boot_seed=self.boot_seed,
            microservice=ms.claims(self.states(ms_uuid)),
            lifecycle_log=self.lifecycle_log,
        )

    def _token(self, key: object, build: Callable[[bytes], psa.Claims], nonce: bytes) -> bytes:
        """Signs the claims for ``nonce``. Claims other than the nonce are built, checked and encoded once
        per boot (again when a lifecycle state changes, or the microservices are replaced): only the nonce
        differs between tokens, so the payload is the cached encoding with the nonce put in its place."""
        if len(nonce) not in (32, 48, 64):
            return sign_token(build(nonce), self._sign, kid=self._kid)  # the claims name the broken nonce rule
        states = tuple(map(self.states, self.microservices))
        cached = self._templates.get(key)
        if cached is None or cached[0] != states:
            cached = self._templates[key] = (states, *_around_nonce(build(bytes(32)).encode_map()))
        _, before, after = cached
        return sign_payload(b"".join((before, cbor.dumps(nonce), after)), self._sign, kid=self._kid)

    def device_token(self, nonce: bytes) -> bytes:
        """The device token (RFC 9783 profile, with one submodule per microservice)."""
        return self._token("device", self.device_claims, nonce)

    def microservice_token(self, ms_uuid: uuidlib.UUID, nonce: bytes) -> bytes:
        """A token for one microservice, bound to its nonce."""
        return self._token(ms_uuid, functools.partial(self.microservice_claims, ms_uuid), nonce)

    def calls(self) -> dict[str, Callable[..., int]]:
        return {"attest": self.attest}

    def attest(self, ms: Microservice, sb: Sandbox, nonce_ptr: int, nonce_len: int, out: int, cap: int) -> int:
        if ms.uuid not in self.microservices:
            raise Violation("attest.unregistered", "the caller was not registered by secure boot", subject=str(ms.uuid))
        nonce = sb.read(nonce_ptr, nonce_len, "nonce")
        if len(nonce) not in (32, 48, 64):
            return EINVAL
        sb.check_span(out, cap, "token buffer")
        token = self.microservice_token(ms.uuid, nonce)
        if len(token) > cap & 0xFFFFFFFF:
            return ETOOBIG
        sb.write(out, token, "token buffer")
        return len(token)


def _around_nonce(claims: dict[int, Any]) -> tuple[bytes, bytes]:
    """The deterministic encoding of a claims map, cut around the nonce's value.

    ``before + cbor.dumps(nonce) + after`` is ``cbor.dumps(claims)`` with that nonce: the map's
    head and entries keep their places (entries sort by their encoded labels, not their values).
    """
    entries = sorted((cbor.dumps(label), cbor.dumps(value)) for label, value in claims.items())
    body = b"".join(label + value for label, value in entries)
    encoded = cbor.dumps(claims)
    head = encoded[: len(encoded) - len(body)]
    nonce_label = cbor.dumps(psa.EAT_NONCE)
    at = [label for label, _ in entries].index(nonce_label)
    before = head + b"".join(label + value for label, value in entries[:at]) + nonce_label
    return before, b"".join(label + value for label, value in entries[at + 1 :])


def attested(booted: Booted, policy_digest_of: Callable[[uuidlib.UUID], bytes]) -> AttestedMicroservice:
    """What to attest about a microservice secure boot accepted."""
    return AttestedMicroservice(
        booted.uuid,
        booted.name,
        booted.version,
        booted.sequence,
        booted.measurement,
        booted.signer,
        policy_digest_of(booted.uuid),
        booted.certifications,
    )
