"""The identity service (the workload API): instance IDs, identity certificates and the trust bundle.

Owns: the ``identity_id``, ``identity_cert`` and ``trust_bundle`` host
functions; the device identity CA (a P-256 key in the key store and its
self-signed certificate); issuing, caching and renewing short-lived X.509
certificates for keys microservices own.
Must not import: agent, store, cli.

Threat: a microservice obtaining an identity that is not its own. As in
Azure IoT Edge's security daemon, the service checks that the caller is the
microservice it claims to be before issuing: the caller's identity is
implicit (the host knows who calls), and its measurement must equal the
measurement secure boot registered for its UUID — otherwise nothing is
issued and it is a violation (``identity.measurement``). The certificate
names the caller's own UUID and instance ID, and certifies only a key the
caller owns through a handle (the crypto service checks the handle).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import uuid as uuidlib
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final

from ism.crypto import x509 as ism_x509
from ism.crypto.keystore import KeyStore
from ism.errors import Violation
from ism.formats.abi import ERRORS
from ism.services.crypto import CryptoService

if TYPE_CHECKING:
    from ism.hypervisor.sandbox import Sandbox
    from ism.hypervisor.supervisor import Microservice

__all__ = ["CA_KEY_ID", "IdentityService", "instance_id"]

ETOOBIG = ERRORS["ISM_ETOOBIG"]
CA_KEY_ID: Final = "device.identity-ca"
LIFETIME: Final = dt.timedelta(hours=24)
#: certificates are renewed once less than this fraction of their lifetime is left
RENEW_FRACTION: Final = 1 / 3


def instance_id(ueid: bytes, ms_uuid: uuidlib.UUID) -> bytes:
    """The 32-byte ID of one microservice instance on one device."""
    return hashlib.sha256(b"ism-instance-v1" + ueid + ms_uuid.bytes).digest()


class IdentityService:
    """Identity host functions for the microservices of one device.

    Args:
        keystore: holds the device identity CA key (created on first use).
        ca_der: the CA certificate, or None to create one (then see :attr:`ca_der`).
        ueid: the device's UEID (instance ID).
        registrations: the measurement secure boot accepted for each microservice UUID.
        crypto: the crypto service (identity certificates certify keys opened through it).
        now: wall clock (UTC).
    """

    def __init__(
        self,
        keystore: KeyStore,
        ca_der: bytes | None,
        ueid: bytes,
        registrations: Mapping[uuidlib.UUID, bytes],
        crypto: CryptoService,
        device_name: str = "virtual",
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.keystore = keystore
        self.ueid = ueid
        self.registrations = dict(registrations)
        self.crypto = crypto
        self.now = now
        if not keystore.exists(CA_KEY_ID):
            keystore.generate(CA_KEY_ID, "ecc-p256")
            ca_der = None
        if ca_der is None:
            ca_der = ism_x509.ca_certificate(self._sign, keystore.public_key(CA_KEY_ID), device_name, now())
        self.ca_der = ca_der
        self._issued: dict[tuple[uuidlib.UUID, str], tuple[bytes, dt.datetime, dt.datetime]] = {}

    def _sign(self, tbs: bytes) -> bytes:
        return self.keystore.sign(CA_KEY_ID, tbs)

    def calls(self) -> dict[str, Callable[..., int]]:
        return {"identity_id": self.identity_id, "identity_cert": self.identity_cert, "trust_bundle": self.trust_bundle}

    def _check_caller(self, ms: Microservice) -> None:
        registered = self.registrations.get(ms.uuid)
        if registered is None or not hmac.compare_digest(registered, ms.image.measurement):
            raise Violation(
                "identity.measurement", "the caller's measurement does not match its registration", subject=str(ms.uuid)
            )

    def identity_id(self, ms: Microservice, sb: Sandbox, out: int) -> int:
        sb.write(out, instance_id(self.ueid, ms.uuid), "identity buffer")
        return 32

    def certificate(self, ms: Microservice, key_name: str, store_id: str) -> bytes:
        """The current identity certificate for a microservice's key (issued or renewed as needed)."""
        self._check_caller(ms)
        now = self.now()
        cached = self._issued.get((ms.uuid, key_name))
        if cached is not None:
            der, issued, expires = cached
            if now < expires - (expires - issued) * RENEW_FRACTION:
                return der
        der = ism_x509.identity_certificate(
            self._sign,
            self.ca_der,
            self.keystore.public_key(store_id),
            ms.name,
            ms.uuid,
            instance_id(self.ueid, ms.uuid),
            now,
            LIFETIME,
        )
        self._issued[(ms.uuid, key_name)] = (der, now, now + LIFETIME)
        return der

    def identity_cert(self, ms: Microservice, sb: Sandbox, handle: int, out: int, cap: int) -> int:
        key = self.crypto.handle(ms, handle, "export-public")
        sb.check_span(out, cap, "certificate buffer")
        der = self.certificate(ms, key.name, key.store_id)
        if len(der) > cap & 0xFFFFFFFF:
            return ETOOBIG
        sb.write(out, der, "certificate buffer")
        return len(der)

    def trust_bundle(self, ms: Microservice, sb: Sandbox, out: int, cap: int) -> int:
        sb.check_span(out, cap, "trust bundle buffer")
        if len(self.ca_der) > cap & 0xFFFFFFFF:
            return ETOOBIG
        sb.write(out, self.ca_der, "trust bundle buffer")
        return len(self.ca_der)
