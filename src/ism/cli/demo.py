"""``ism demo``: the reference device's story, told with the real commands and the real runtime.

1. A developer signs the four microservices of the fingerprint 2FA token. At
   the factory the device is initialised, trusts the factory's vendor key and
   is locked (``secured``); in the field the product vendor's provisioning
   bundle, signed by that key, adds the developer, policy and store anchors
   and rotates the vendor anchor to the product vendor's own key. The vendor
   installs the packages (a tampered one is refused at install) and the
   access policy as a protected artifact — signed by the vendor's policy key,
   encrypted to this device — then rotates it to version 2; a replay of
   version 1 is refused.
2. The device boots (secure + measured boot) and runs: a host enrols a finger
   and sends challenges over ``uart.host``; the token signs only when the
   finger matches. The third-party ``analytics`` tries to read the fingerprint
   sensor, is stopped, restarted with backoff and quarantined, and its
   violation records appear — while the 2FA flow keeps working. The template
   is biometric's alone (storage isolation), and a relying party appraises the
   device's attestation token against the vendor's reference values.
3. An attacker with access to the device's storage flips a byte of one
   package and replays an old version of another: secure boot refuses both,
   the rest boots.
"""

from __future__ import annotations

import os
import shlex
import shutil
import time
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from ism.boards.virtual import Fingerprint, Uart
from ism.errors import UsageError

__all__ = ["run_demo"]

TOKEN = ("biometric", "authenticator", "link", "analytics")


def _run(*argv: str) -> int:
    from ism.cli.main import main

    print(f"\n$ ism {shlex.join(argv)}", flush=True)
    return main(list(argv))


def _capture_json(path: Path, *argv: str) -> None:
    """Runs an ism command with --json and keeps its output (what a vendor tool would read)."""
    import contextlib
    import io

    from ism.cli.main import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        status = main(list(argv))
    if status != 0:
        raise UsageError("demo.step", f"ism {' '.join(argv)} failed")
    path.write_text(buffer.getvalue())
    print(f"\n$ ism {shlex.join(argv)} > {path.name}", flush=True)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the integrated Wasm payload is the envelope's last member
    path.write_bytes(bytes(data))


def _pem(der: bytes) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_public_key(der)
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verify(pem: bytes, challenge: bytes, raw: bytes) -> bool:
    key = load_pem_public_key(pem)
    assert isinstance(key, ec.EllipticCurvePublicKey)
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:64], "big"))
    try:
        key.verify(der, challenge, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def _exchange(runtime: object, uart: Uart, frame: bytes, seconds: float = 0.3) -> bytes:
    from ism.runtime import Runtime

    assert isinstance(runtime, Runtime)
    uart.host_send(frame)
    runtime.supervisor.run(seconds, until=lambda: not uart.pending())
    runtime.supervisor.step()
    return uart.host_receive()


def _storage_isolation(runtime: object) -> None:
    """The enrolled template is biometric's alone: absent for analytics, useless when copied to it."""
    import sqlite3

    from ism.errors import IsmError
    from ism.runtime import Runtime

    assert isinstance(runtime, Runtime)
    biometric = runtime.policy.by_name["biometric"].uuid
    analytics = runtime.policy.by_name["analytics"].uuid
    info = runtime.storage.get_info(biometric, 1)
    print(f"\nbiometric's template: storage record 1, {info.size} bytes, encrypted under biometric's own key")
    for what in ("read by analytics", "copied into analytics' namespace, then read"):
        if what.startswith("copied"):
            db = sqlite3.connect(runtime.storage_path)
            with db:
                db.execute(
                    "INSERT OR REPLACE INTO records SELECT ?, uid, version, flags, size, nonce, tag, body, digest "
                    "FROM records WHERE owner = ? AND uid = ?",
                    (str(analytics), str(biometric), (1).to_bytes(8, "big")),
                )
            db.close()
        try:
            runtime.storage.get(analytics, 1)
            print(f"   template {what}: READABLE (this must not happen)")
        except IsmError as exc:
            print(f"   template {what}: refused [{exc.rule}]")
    print(
        "   (the copy is in no namespace's authenticated index, and it is encrypted under biometric's key with\n"
        "    biometric's UUID in its associated data; the storage would refuse to open with it: storage.rollback)"
    )
    db = sqlite3.connect(runtime.storage_path)
    with db:
        db.execute("DELETE FROM records WHERE owner = ?", (str(analytics),))
    db.close()


def _attest(runtime: object, out: Path) -> None:
    """A relying party asks for the device token and appraises it against the vendor's reference values."""
    import json

    from ism.cli.attest import format_summary
    from ism.crypto.attestation import appraise, verify_token
    from ism.crypto.keys import pem_from_der, read_public_pem
    from ism.formats import package, suit
    from ism.formats.psa import parse_reference
    from ism.runtime import Runtime

    assert isinstance(runtime, Runtime)
    from ism.services.attestation import ism_measurement

    components: list[dict[str, object]] = [{"name": "ism", "measurements": [ism_measurement().hex()]}]
    for name in TOKEN:
        pkg = package.read_package(suit.parse_envelope((out / f"{name}.suit").read_bytes()))
        components.append(
            {
                "name": name,
                "uuid": str(pkg.meta.uuid),
                "measurements": [pkg.measurement.hex()],
                "min_version": pkg.meta.version,
            }
        )
    from ism.device.lifecycle import read_log

    log = read_log(runtime.device)
    reference = {
        "version": 1,
        "lifecycles": ["secured"],
        "lifecycle_log": log.head.hex(),  # the relying party pins the device's lifecycle history too
        "unknown_components": "warning",
        "components": components,
    }
    (out / "reference.json").write_text(json.dumps(reference, indent=2))
    nonce = os.urandom(32)
    token = runtime.attestation.device_token(nonce)
    (out / "device-token.cbor").write_bytes(token)
    iak = read_public_pem(pem_from_der(runtime.attestation.public_key_der))
    verified = verify_token(token, iak, nonce=nonce)
    print(
        f"\nattestation: device token ({len(token)} bytes) for a fresh nonce, appraised against "
        f"{out / 'reference.json'}"
    )
    print(
        "\n".join(
            "   " + line
            for line in format_summary(
                verified, appraise(verified, parse_reference(json.dumps(reference)))
            ).splitlines()
        )
    )
    print(
        f"   security lifecycle in the token: {verified.claims.lifecycle_state}; the device's lifecycle log "
        f"({len(log.entries)} entries: {', '.join(e.event for e in log.entries)}) ends in {log.state}, "
        f"its head {log.head.hex()[:16]}... is the token's lifecycle-log claim"
    )


def _provision(dev: Path, out: Path) -> None:
    """The factory trusts its own vendor key and locks the device; the product vendor's bundle does the rest."""
    from ism.crypto.keys import load_public, signer_id

    print("\n   At the factory: the device trusts the factory's vendor key for device commands, then is locked.")
    for name in ("factory-vendor", "product-vendor", "vendor-policy", "store"):
        _run("keygen", "--alg", "es256", "--out", str(out / f"{name}.pem"))
    _run("device", "init", str(dev))
    _run("device", "trust", str(dev), "--add", str(out / "factory-vendor.pub.pem"), "--role", "vendor")
    _run("device", "lock", str(dev))
    print(
        "\n   In the field: the product vendor's provisioning bundle, signed with the factory's key, adds the\n"
        "   developer, policy-signer and store anchors and hands the device over to the product vendor's key:"
    )
    factory = signer_id(load_public(out / "factory-vendor.pub.pem")).hex()
    bundle = out / "provisioning.cose"
    _run(
        "provision", "bundle", "--sign", str(out / "factory-vendor.pem"), "--device", str(dev),
        "--add", f"microservice:{out / 'developer.pub.pem'}", "--add", f"policy:{out / 'vendor-policy.pub.pem'}",
        "--add", f"store:{out / 'store.pub.pem'}", "--add", f"vendor:{out / 'product-vendor.pub.pem'}",
        "--remove", f"vendor:{factory}", "--out", str(bundle),
    )  # fmt: skip
    _run("device", "provision", str(dev), str(bundle))
    status = _run("device", "provision", str(dev), str(bundle))
    print(f"(exit status {status}: the factory's key no longer commands this device; the bundle is not replayed)")
    status = _run("device", "trust", str(dev), "--add", str(out / "store.pub.pem"))
    print(f"(exit status {status}: a secured device takes anchors only from signed bundles)")
    _run("device", "lifecycle", str(dev), "--log")


def run_demo(examples: Path, out: Path) -> None:
    """Runs the demo in ``out`` (recreated) using modules built in ``examples``."""
    from ism.device.virtual import Device
    from ism.runtime import Runtime

    missing = [n for n in TOKEN if not (examples / f"{n}.wasm").is_file()]
    if missing:
        raise UsageError(
            "demo.examples", f"example modules not built: {missing}; run 'make demo'", subject=str(examples)
        )
    source = Path(__file__).resolve().parents[3] / "examples" / "fingerprint-token"
    if not source.is_dir():
        raise UsageError("demo.examples", "run the demo from a source checkout", subject=str(source))
    start = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dev, key = out / "device", out / "developer.pem"

    print("== 1. Build, sign, provision, install")
    _run("keygen", "--alg", "es256", "--out", str(key))
    for name in TOKEN:
        _run(
            "package",
            "build",
            "--wasm",
            str(examples / f"{name}.wasm"),
            "--meta",
            str(source / name / f"{name}.toml"),
            "--key",
            str(key),
            "--out",
            str(out / f"{name}.suit"),
        )
    _provision(dev, out)
    for name in TOKEN:
        _run("device", "install", str(dev), str(out / f"{name}.suit"))
    print("\n   The vendor signs the access policy and encrypts it to this device (only the device can read it):")
    vendor = out / "vendor-policy.pem"
    info = out / "device-info.json"
    _capture_json(info, "device", "info", str(dev), "--json")
    v1, v2 = out / "policy-v1.cose", out / "policy-v2.cose"
    _run(
        "policy",
        "compile",
        str(source / "policy.toml"),
        "--board",
        str(source / "board.toml"),
        "--sign",
        str(vendor),
        "--device-info",
        str(info),
        "--out",
        str(v1),
    )
    _run("device", "policy", str(dev), str(v1))
    tampered = out / "link-tampered.suit"
    shutil.copy(out / "link.suit", tampered)
    _flip_last_byte(tampered)
    status = _run("device", "install", str(dev), str(tampered))
    print(f"(exit status {status}: the tampered package was refused and nothing was written)")
    print("\n   Later the vendor rotates the policy to version 2; replaying version 1 is refused:")
    text2 = (source / "policy.toml").read_text().replace("version = 1", "version = 2", 1)
    (out / "policy-v2.toml").write_text(text2)
    _run(
        "policy",
        "compile",
        str(out / "policy-v2.toml"),
        "--board",
        str(source / "board.toml"),
        "--sign",
        str(vendor),
        "--device-info",
        str(info),
        "--out",
        str(v2),
    )
    _run("device", "policy", str(dev), str(v2))
    status = _run("device", "policy", str(dev), str(v1))
    print(f"(exit status {status}: the older policy is refused by its anti-rollback counter)")
    _run("device", "boot", str(dev))

    print("\n== 2. Run the fingerprint 2FA token")
    runtime = Runtime.start(dev, on_log=lambda name, level, text: print(f"   [{name}] {text}"))
    try:
        sup = runtime.supervisor
        sensor, uart = runtime.peripherals["spi.fingerprint"], runtime.peripherals["uart.host"]
        assert isinstance(sensor, Fingerprint)
        assert isinstance(uart, Uart)
        authenticator = runtime.policy.by_name["authenticator"].uuid
        sup.run(0.05)
        public = _pem(runtime.crypto.public_key(str(authenticator), "device-2fa"))
        owner, stranger = os.urandom(64), os.urandom(64)
        sensor.place(owner)
        print(f"host -> 'E' (enrol the owner's finger)      <- {_exchange(runtime, uart, b'E').hex()}")
        for who, finger in (("owner", owner), ("stranger", stranger)):
            sensor.place(finger)
            challenge = os.urandom(32)
            reply = _exchange(runtime, uart, b"C" + challenge)
            ok = len(reply) == 66 and reply[1] == 0 and _verify(public, challenge, reply[2:])
            verdict = "signature VERIFIES with the device 2FA key" if ok else f"refused (status {reply[1:2].hex()})"
            print(f"host -> 'C' + challenge, {who:8} finger    <- {reply[:2].hex()}... {verdict}")
        print("\n   ... analytics keeps trying to read the fingerprint sensor:")
        sup.run(1.0, until=lambda: sup.by_name["analytics"].state == "quarantined")
        sensor.place(owner)
        challenge = os.urandom(32)
        reply = _exchange(runtime, uart, b"C" + challenge)
        ok = len(reply) == 66 and _verify(public, challenge, reply[2:])
        print(
            f"\nafter the quarantine, owner's challenge     <- {reply[:2].hex()}... "
            f"{'signature VERIFIES' if ok else 'FAILED'}"
        )
        _storage_isolation(runtime)
        _attest(runtime, out)
        print("\nmicroservice states:")
        for st in sup.status():
            print(f"   {st['name']:14} {st['state']:12} faults={st['faults']} restarts={st['restarts']}")
    finally:
        runtime.close()
    _run("device", "violations", str(dev))

    print("\n== 3. An attacker edits the device's storage: secure boot refuses what changed")
    device = Device(dev)
    analytics_uuid = "193cd08e-78fe-47d0-b3ee-50f90988a3bf"
    _flip_last_byte(device.package_path(analytics_uuid))
    print("   flipped one byte of analytics' payload on flash")
    _run("device", "boot", str(dev))

    print("\n== 4. The store bans analytics: a signed, device-bound command; its data and keys are crypto-erased")
    ban = out / "ban-analytics.cose"
    _run(
        "provision", "command", "microservice", "--sign", str(out / "store.pem"), "--device", str(dev),
        "--uuid", analytics_uuid, "--action", "ban", "--out", str(ban),
    )  # fmt: skip
    _run("device", "microservice", str(dev), "--command", str(ban))
    _run("device", "microservices", str(dev))
    status = _run("device", "install", str(dev), str(out / "analytics.suit"))
    print(f"(exit status {status}: a banned microservice cannot be installed again, even correctly signed)")
    print(f"\ndemo finished in {time.monotonic() - start:.1f} s; files are in {out}/")
