"""Secure-boot benchmark: ``Device.boot()`` of 64 microservices against the raw crypto it needs.

Setup (not timed): a fresh virtual device in a temporary directory, one ES256
developer key provisioned as trust anchor, 64 microservice packages (distinct
UUIDs, ~64 KiB Wasm payload each, different data per package, importing only
``ism.log``) built and signed as ``ism package build`` does, and installed.
One untimed boot advances the anti-rollback counters, so the timed boots are
the steady state: every package re-read and re-verified, no state written.

Baseline (the unavoidable work): for the same 64 payloads, SHA-256 of the
payload plus one ES256 verification of a prepared signature over a 32-byte
message, with ``cryptography`` directly.

Target: ``boot / raw <= 1.5``.

Run from the project root::

    .venv/bin/python benchmarks/boot.py [--quick] [--strict] [--repeat N]
"""

from __future__ import annotations

import hashlib
import random
import sys
import tempfile
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import wasmtime
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from _common import Target, check_targets, fail, fmt_time, machine, measure, parser
from ism.crypto import suit as suit_auth
from ism.crypto.keys import PrivateKey, generate, public_pem
from ism.device.virtual import Device
from ism.formats import package, suit, wasm
from ism.formats.abi import HOST_ABI

N_SERVICES = 64
DATA_SIZE = 64 * 1024
TARGET = 1.5
VENDOR = uuidlib.UUID("6f1c0a3e-8d4b-4c1e-9a57-2b3d4e5f6a7b")


def make_wasm(index: int, size: int = DATA_SIZE) -> bytes:
    """A valid module: one memory, a data segment of ``size`` varied bytes, one ``ism.log`` import."""
    data = random.Random(index).randbytes(size)  # deterministic, different per microservice
    escaped = "".join(f"\\{b:02x}" for b in data)
    pages = size // 65536 + 1
    wat = f"""
    (module
      (import "ism" "log" (func $log (param i32 i32 i32)))
      (memory (export "memory") {pages})
      (data (i32.const 0) "{escaped}")
      (func (export "run") (call $log (i32.const 0) (i32.const 0) (i32.const 16))))
    """
    module = bytes(wasmtime.wat2wasm(wat))
    wasm.check_imports(wasm.parse_module(module), HOST_ABI)  # as `ism package build` does
    return module


def make_package(index: int, key: PrivateKey, payload: bytes) -> tuple[uuidlib.UUID, bytes]:
    """A signed package for microservice ``index`` (same steps as ``ism package build``)."""
    ms_uuid = uuidlib.UUID(int=(0x1B00 << 112) | index, version=4)
    toml = (
        f'uuid = "{ms_uuid}"\nvendor = "{VENDOR}"\nname = "bench-{index:02d}"\n'
        f'version = "1.0.{index}"\nsequence = 1\ndescription = "boot benchmark microservice {index}"\n'
    )
    meta = package.parse_meta(toml, f"bench-{index}/M.toml")
    manifest_bytes, members, integrated = package.build_unsigned(meta, payload)
    envelope = suit.encode_envelope(suit_auth.sign_manifest(manifest_bytes, key), manifest_bytes, members, integrated)
    return ms_uuid, envelope


def make_raw_baseline(payloads: list[bytes]) -> tuple[ec.EllipticCurvePublicKey, list[tuple[bytes, bytes]]]:
    """The inputs of the raw baseline: per payload, the payload and a DER ES256 signature over its digest."""
    key = ec.generate_private_key(ec.SECP256R1())
    prepared = [(p, key.sign(hashlib.sha256(p).digest(), ec.ECDSA(hashes.SHA256()))) for p in payloads]
    return key.public_key(), prepared


def main(argv: list[str] | None = None) -> int:
    p = parser("Secure-boot benchmark: Device.boot() of 64 microservices vs raw SHA-256 + ES256.")
    p.add_argument("--count", type=int, default=N_SERVICES, help=f"microservices (default {N_SERVICES})")
    p.add_argument("--data-kib", type=int, default=DATA_SIZE // 1024, help="data segment per module, KiB (default 64)")
    args = p.parse_args(argv)
    if args.count < 1 or args.data_kib < 1:
        return fail("--count and --data-kib must be >= 1")
    repeat = args.repeat or (3 if args.quick else 30)
    n = args.count

    print(f"boot benchmark ({'quick' if args.quick else 'full'}): {n} microservices, {machine()}")
    key = generate("es256")
    payloads = [make_wasm(i, args.data_kib * 1024) for i in range(n)]

    with tempfile.TemporaryDirectory(prefix="ism-bench-") as tmp:
        dev = Device.init(Path(tmp) / "device")
        dev.add_anchor(public_pem(key))
        uuids = set()
        total_bytes = 0
        for i, payload in enumerate(payloads):
            ms_uuid, envelope = make_package(i, key, payload)
            uuids.add(str(ms_uuid))
            total_bytes += len(envelope)
            dev.install(envelope)
        if len(uuids) != n or len(dev.installed()) != n:
            return fail(f"expected {n} distinct installed microservices, found {len(dev.installed())}")
        print(
            f"installed {n} packages: payload {len(payloads[0]):,} bytes each, "
            f"{total_bytes / n:,.0f} bytes per envelope on average"
        )

        # First boot: advances the anti-rollback counters (one state write). Not timed.
        report = dev.boot().to_json()
        if report["booted"] != n or report["refused"]:
            return fail(f"first boot: {report['booted']} booted, {report['refused']} refused, expected {n} booted")

        def boot(full: bool) -> Callable[[], None]:
            def run() -> None:
                booted = dev.boot(full=full).accepted
                if len(booted) != n or {b.verified for b in booted} != {"full" if full else "sealed"}:
                    raise RuntimeError("a timed boot did not boot every microservice the expected way")

            return run

        boot_t = measure(boot(full=False), repeat)
        full_t = measure(boot(full=True), repeat)
        report = dev.boot().to_json()
        if report["booted"] != n or {e["uuid"] for e in report["microservices"]} != uuids:
            return fail(f"boot after timing: {report['booted']} booted, {report['refused']} refused")

    pub, prepared = make_raw_baseline(payloads)
    ecdsa = ec.ECDSA(hashes.SHA256())
    sha256 = hashlib.sha256

    def raw() -> None:
        for payload, signature in prepared:
            pub.verify(signature, sha256(payload).digest(), ecdsa)

    raw_t = measure(raw, repeat)

    print(f"boot ({n} microservices, sealed): best {fmt_time(boot_t.best)}, median {fmt_time(boot_t.median)}")
    print(f"boot ({n} microservices, --full): best {fmt_time(full_t.best)}, median {fmt_time(full_t.median)}")
    print(f"raw  ({n} x SHA-256 + ES256 verify): best {fmt_time(raw_t.best)}, median {fmt_time(raw_t.median)}")
    print(
        f"per microservice: boot {fmt_time(boot_t.best / n)} (sealed), {fmt_time(full_t.best / n)} (full); "
        f"raw {fmt_time(raw_t.best / n)}"
    )
    print(f"(best of {repeat} rounds; report: {report['booted']} booted, {report['refused']} refused)")
    print(
        "sealed: every stored package re-hashed (SHA-256 of the whole file) and checked against its MAC'd\n"
        "record from its last full verification, signer still trusted, sequence >= counter (validate-once).\n"
        "full: every package re-parsed and its signature re-verified (first boot after an install, --full)."
    )
    target = Target("boot / raw", boot_t.best / raw_t.best, TARGET, upper=True)
    print(target.line())
    print(Target("full boot / raw (informational)", full_t.best / raw_t.best, TARGET, upper=True).line())
    return check_targets([target], args.strict)


if __name__ == "__main__":
    sys.exit(main())
