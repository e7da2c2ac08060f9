"""Key files and key identities: the only place iSM reads or writes PEM keys.

Owns: key generation for signers (ES256 on P-256, Ed25519), PEM load/store
with safe file modes, and the signer ID (SHA-256 of the public key's
SubjectPublicKeyInfo DER), which is how boot reports and attestation name a
signer.

Threat: a private key written world-readable, or a key of the wrong curve
accepted as a trust anchor. Private keys are written with mode 0600 via an
exclusive create; only P-256 EC and Ed25519 keys are accepted.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ism.errors import FormatError, UsageError

__all__ = [
    "Alg",
    "Anchors",
    "anchor_map",
    "PrivateKey",
    "PublicKey",
    "generate",
    "key_alg",
    "load_private",
    "load_public",
    "pem_from_der",
    "public_pem",
    "read_public_pem",
    "signer_id",
    "write_keypair",
]

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
PublicKey = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey
Alg = Literal["es256", "ed25519"]


def generate(alg: Alg) -> PrivateKey:
    """Generates a fresh signing key for ``alg``."""
    if alg == "es256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise UsageError("keys.alg", f"unknown algorithm {alg!r}", expected="es256|ed25519")


def key_alg(key: PrivateKey | PublicKey) -> Alg:
    """Names the algorithm a key is for; refuses curves other than P-256."""
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if not isinstance(key.curve, ec.SECP256R1):
        raise FormatError("keys.curve", "only P-256 EC keys are supported", got=key.curve.name)
    return "es256"


def public_pem(key: PrivateKey | PublicKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of a key."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def pem_from_der(der: bytes) -> bytes:
    """The PEM of a SubjectPublicKeyInfo DER (as key stores export public keys)."""
    try:
        key = serialization.load_der_public_key(der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise FormatError("keys.der", "not a DER SubjectPublicKeyInfo") from exc
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def signer_id(key: PublicKey | PrivateKey) -> bytes:
    """SHA-256 of the public key's SubjectPublicKeyInfo DER (32 bytes)."""
    pub = key.public_key() if isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) else key
    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


#: Trust anchors by signer ID, computed once so a check does not re-hash every key.
Anchors = Mapping[bytes, "PublicKey"]


def anchor_map(keys: Iterable[PublicKey] | Anchors) -> dict[bytes, PublicKey]:
    """Trust anchors indexed by signer ID."""
    if isinstance(keys, Mapping):
        return dict(keys)
    return {signer_id(k): k for k in keys}


def write_keypair(key: PrivateKey, out: Path) -> Path:
    """Writes ``out`` (private, mode 0600) and ``out.pub.pem`` beside it.

    Returns:
        The path of the public key file.

    Raises:
        UsageError: ``keys.exists`` if ``out`` already exists (never overwritten).
    """
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise UsageError("keys.exists", "refusing to overwrite an existing key", subject=str(out)) from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path = out.with_name(out.name.removesuffix(".pem") + ".pub.pem")
    pub_path.write_bytes(public_pem(key))
    return pub_path


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError("keys.read", f"cannot read key file: {exc.strerror}", subject=str(path)) from exc


def load_private(path: Path) -> PrivateKey:
    """Loads an unencrypted PKCS#8/SEC1 private key (P-256 or Ed25519)."""
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise FormatError("keys.pem", "not a usable PEM private key", subject=str(path)) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise FormatError("keys.type", "only EC P-256 and Ed25519 keys are supported", subject=str(path))
    key_alg(key)
    return key


def read_public_pem(data: bytes, subject: str = "public key") -> PublicKey:
    """Parses a PEM public key, or the public half of a PEM private key."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise FormatError("keys.pem", "not a usable PEM public key", subject=subject) from exc
    if not isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey):
        raise FormatError("keys.type", "only EC P-256 and Ed25519 keys are supported", subject=subject)
    key_alg(key)
    return key


def load_public(path: Path) -> PublicKey:
    """Loads a PEM public key (or derives it from a PEM private key) from ``path``."""
    return read_public_pem(_read(path), str(path))
