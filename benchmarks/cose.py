"""COSE_Sign1 benchmark: ``ism.crypto.cose`` against bare ``cryptography`` on the same payload.

For ES256 (P-256) and EdDSA (Ed25519), in one run:

* sign:   ``cose.sign1(payload, key)`` (header encoding, Sig_structure, signature,
  r||s conversion for ES256, CBOR message) vs ``key.sign(payload)``.
* verify: ``cose.verify_sign1(msg, pub)`` on a parsed message (Sig_structure,
  r||s -> DER for ES256, verification) vs ``pub.verify(sig, payload)``.
* parse+verify: ``cose.parse`` of the encoded message, then ``verify_sign1``
  (what a reader of an untrusted artifact pays).

Printed: ops/s of each, and ``ratio = our rate / raw rate`` (1.0 = no overhead).
Target (verify only, the operation secure boot repeats for every package):
ratio ``>= 0.85``, i.e. COSE framing costs at most ~15% over the primitive.
Sign (build time) and parse+verify are reported without a target.

Run from the project root::

    .venv/bin/python benchmarks/cose.py [--quick] [--strict] [--repeat N] [--size BYTES]
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from _common import Target, check_targets, fail, fmt_rate, machine, measure, parser
from ism.crypto import cose
from ism.crypto.keys import generate
from ism.errors import IsmError

TARGET = 0.85
TARGETED = frozenset({"verify"})


def _cases(alg: str, payload: bytes) -> list[tuple[str, Callable[[], Any], str, Callable[[], Any]]]:
    """(operation, ours, raw operation, raw) for one algorithm; keys are fresh per run."""
    key = generate("es256" if alg == "ES256" else "ed25519")
    pub = key.public_key()
    encoded = cose.sign1(payload, key)
    msg = cose.parse(encoded)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ecdsa = ec.ECDSA(hashes.SHA256())
        der = key.sign(payload, ecdsa)
        assert isinstance(pub, ec.EllipticCurvePublicKey)

        def raw_sign() -> Any:
            return key.sign(payload, ecdsa)

        def raw_verify() -> None:
            pub.verify(der, payload, ecdsa)

    else:
        assert isinstance(key, ed25519.Ed25519PrivateKey)
        assert isinstance(pub, ed25519.Ed25519PublicKey)
        sig = key.sign(payload)

        def raw_sign() -> Any:
            return key.sign(payload)

        def raw_verify() -> None:
            pub.verify(sig, payload)

    # Sanity: both sides actually work on this input before anything is timed.
    raw_verify()
    cose.verify_sign1(msg, pub)
    assert msg.payload == payload
    assert msg.alg == (cose.ALG_ES256 if alg == "ES256" else cose.ALG_EDDSA)

    return [
        ("sign", lambda: cose.sign1(payload, key), "sign", raw_sign),
        ("verify", lambda: cose.verify_sign1(msg, pub), "verify", raw_verify),
        ("parse+verify", lambda: cose.verify_sign1(cose.parse(encoded), pub), "verify", raw_verify),
    ]


def main(argv: list[str] | None = None) -> int:
    p = parser("COSE_Sign1 benchmark: ism.crypto.cose vs bare cryptography on the same payload.")
    p.add_argument("--size", type=int, default=64, help="payload size in bytes (default 64)")
    args = p.parse_args(argv)
    if args.size < 0:
        return fail("--size must be >= 0")
    repeat = args.repeat or (3 if args.quick else 15)
    number = 50 if args.quick else 1000
    payload = os.urandom(args.size)

    print(f"COSE_Sign1 benchmark ({'quick' if args.quick else 'full'}): {args.size}-byte payload, {machine()}")
    print(f"(best of {repeat} rounds of {number} operations)")
    header = f"{'alg':6} {'operation':13} {'ours':>16} {'raw':>16} {'ratio':>7}  target"
    print(header)
    print("-" * len(header))
    targets: list[Target] = []
    raw_times: dict[tuple[str, str], float] = {}
    try:
        for alg in ("ES256", "EdDSA"):
            for op, ours_fn, raw_op, raw_fn in _cases(alg, payload):
                ours = measure(ours_fn, repeat, number)
                if (alg, raw_op) not in raw_times:  # verify and parse+verify share one raw baseline
                    raw_times[alg, raw_op] = measure(raw_fn, repeat, number).best
                raw_rate = 1.0 / raw_times[alg, raw_op]
                ratio = ours.rate / raw_rate
                bound = "-"
                if op in TARGETED:
                    targets.append(Target(f"{alg} {op}", ratio, TARGET, upper=False))
                    bound = f">= {TARGET:g}"
                print(f"{alg:6} {op:13} {fmt_rate(ours.rate):>16} {fmt_rate(raw_rate):>16} {ratio:7.3f}  {bound}")
    except IsmError as exc:
        return fail(f"{exc.rule}: {exc.message}")
    print()
    for t in targets:
        print(t.line())
    return check_targets(targets, args.strict)


if __name__ == "__main__":
    sys.exit(main())
