"""Attestation benchmark: PSA token creation and verification against a bare ES256 sign and verify.

Setup (not timed): an attestation service over a software key store, with 8
microservices (one software component and one submodule each), as a device
token carries them.

Ours:
- create: ``AttestationService.device_token(nonce)`` — claims built and checked,
  encoded deterministically, signed through the key store (the IAK never leaves it).
- verify: ``TokenVerifier(iak).verify(token, nonce)`` with the verifier built once in the
  setup, as a relying party builds one per trusted key (``verify_token`` builds one per call)
  — COSE parse, signature, strict claims decode per profile, nonce check; nothing about a
  token is kept between calls.

Raw (same run): ``cryptography`` ES256 sign and verify of a payload of the same size
as our token's claims.

Targets: create / raw sign >= 0.8, verify / raw verify >= 0.7 (rates).

Run from the project root::

    .venv/bin/python benchmarks/attest.py [--quick] [--strict]
"""

from __future__ import annotations

import os
import sys
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from _common import MemoryKeyFiles, Target, check_targets, fmt_rate, machine, measure_interleaved, parser
from ism.crypto.attestation import TokenVerifier, verify_token
from ism.crypto.keys import pem_from_der, read_public_pem
from ism.crypto.keystore.software import SoftwareKeyStore
from ism.formats import cbor
from ism.services.attestation import AttestationService, AttestedMicroservice

MICROSERVICES = 8
CREATE_TARGET = 0.8
VERIFY_TARGET = 0.7


def main(argv: list[str] | None = None) -> int:
    args = parser("Attestation benchmark: PSA token create/verify vs bare ES256.").parse_args(argv)
    repeat = args.repeat or (3 if args.quick else 15)
    number = 20 if args.quick else 300
    print(f"attestation benchmark ({'quick' if args.quick else 'full'}): {MICROSERVICES} microservices, {machine()}")

    keystore = SoftwareKeyStore(MemoryKeyFiles(), os.urandom(32))
    microservices = {
        (u := uuidlib.uuid4()): AttestedMicroservice(
            u, f"ms-{i}", "1.2.3", i + 1, os.urandom(32), os.urandom(32), os.urandom(32), ("cert-a",)
        )
        for i in range(MICROSERVICES)
    }
    service = AttestationService(keystore, b"\x01" + os.urandom(32), microservices, lifecycle_log=os.urandom(32))
    nonce = os.urandom(32)
    token = service.device_token(nonce)
    iak = read_public_pem(pem_from_der(service.public_key_der))
    verify_token(token, iak, nonce=nonce)  # fails loudly if the token is wrong
    verifier = TokenVerifier(iak)
    payload_size = len(cbor.loads(token).value[2])

    raw_key = ec.generate_private_key(ec.SECP256R1())
    raw_pub = raw_key.public_key()
    payload = os.urandom(payload_size)
    ecdsa = ec.ECDSA(hashes.SHA256())
    raw_sig = raw_key.sign(payload, ecdsa)

    def ours_create() -> None:
        service.device_token(nonce)

    def raw_sign() -> None:
        raw_key.sign(payload, ecdsa)

    def ours_verify() -> None:
        verifier.verify(token, nonce=nonce)

    def raw_verify() -> None:
        raw_pub.verify(raw_sig, payload, ecdsa)

    create_t, sign_t, verify_t, rawv_t = measure_interleaved(
        [ours_create, raw_sign, ours_verify, raw_verify], repeat, number
    )
    print(f"token: {len(token)} bytes (claims {payload_size} bytes)")
    rows = [
        ("create device token", create_t.rate, "raw ES256 sign", sign_t.rate),
        ("verify device token", verify_t.rate, "raw ES256 verify", rawv_t.rate),
    ]
    for name, ours, raw_name, raw in rows:
        print(f"{name:22} {fmt_rate(ours):>14}   {raw_name:18} {fmt_rate(raw):>14}")
    targets = [
        Target("token creation / ES256 sign", create_t.rate / sign_t.rate, CREATE_TARGET, upper=False),
        Target("token verification / ES256 verify", verify_t.rate / rawv_t.rate, VERIFY_TARGET, upper=False),
    ]
    for t in targets:
        print(t.line())
    return check_targets(targets, args.strict)


if __name__ == "__main__":
    sys.exit(main())
