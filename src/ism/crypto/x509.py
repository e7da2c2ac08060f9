"""X.509 for microservice identities, signed through the key store (the CA key never leaves it).

Owns: building the device identity CA certificate and short-lived identity
certificates for microservice keys. ``cryptography`` builds the
to-be-signed part; the signature is made by a callback (the key store), so
the CA's private key is never handled here.
Must not import: device, hypervisor or anything above.

Threat: a certificate that names the wrong holder or lasts too long. Each
identity certificate carries the microservice's name (CN) and UUID and
instance ID (URI SANs), is valid for a short time (default 24 hours), is not
a CA, and is usable only for digital signatures.
"""

from __future__ import annotations

import datetime as dt
import secrets
import uuid as uuidlib
from collections.abc import Callable
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID

from ism.errors import FormatError

__all__ = ["ca_certificate", "identity_certificate", "parse_certificate"]

#: signs bytes with ECDSA P-256 / SHA-256 and returns raw r||s (the key store's sign)
Signer = Callable[[bytes], bytes]
_ECDSA_SHA256: Final = bytes.fromhex("300a06082a8648ce3d040302")
_PLACEHOLDER = ec.generate_private_key(ec.SECP256R1())  # signs nothing that is kept: see _assemble


def _der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(raw)]) + raw


def _assemble(builder: x509.CertificateBuilder, sign: Signer) -> bytes:
    """Certificate = SEQUENCE { tbs, ecdsa-with-SHA256, BIT STRING signature }, signed by ``sign``."""
    tbs = builder.sign(_PLACEHOLDER, hashes.SHA256()).tbs_certificate_bytes
    raw = sign(tbs)
    sig = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    bit_string = b"\x03" + _der_length(len(sig) + 1) + b"\x00" + sig
    body = tbs + _ECDSA_SHA256 + bit_string
    return b"\x30" + _der_length(len(body)) + body


def _public(der: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_der_public_key(der)
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise FormatError("x509.key", "identity keys are P-256 keys")
    return key


def ca_certificate(sign: Signer, public_der: bytes, device_name: str, now: dt.datetime, years: int = 20) -> bytes:
    """The device identity CA certificate (self-signed through ``sign``)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"iSM device identity CA {device_name}")])
    public = _public(public_der)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(secrets.randbits(64) | 1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365 * years))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
    )
    return _assemble(builder, sign)


def identity_certificate(
    sign: Signer,
    ca_der: bytes,
    public_der: bytes,
    name: str,
    ms_uuid: uuidlib.UUID,
    instance_id: bytes,
    now: dt.datetime,
    lifetime: dt.timedelta = dt.timedelta(hours=24),
) -> bytes:
    """A short-lived identity certificate for a microservice's key, issued by the device CA."""
    ca = x509.load_der_x509_certificate(ca_der)
    public = _public(public_der)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(secrets.randbits(64) | 1)
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + lifetime)
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(ms_uuid.urn),
                    x509.UniformResourceIdentifier(f"urn:ism:instance:{instance_id.hex()}"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    return _assemble(builder, sign)


def parse_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise FormatError("x509.format", "not a DER X.509 certificate") from exc
