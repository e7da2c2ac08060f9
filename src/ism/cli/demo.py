"""``ism demo``: the story so far, told with the real commands.

Builds and signs the example microservices, provisions a virtual device,
shows an install-time refusal, tampers with one package on the device's
"flash" and replays an old version onto it, then boots: only the tampered
and the rolled-back packages are refused. Finally an explicit, signed
downgrade is accepted. Every step runs the same ``ism`` command a user would.
"""

from __future__ import annotations

import shlex
import shutil
import time
from pathlib import Path

from ism.errors import UsageError

__all__ = ["run_demo"]

EXAMPLES = ("hello", "blinky", "echo")


def _run(*argv: str) -> int:
    from ism.cli.main import main

    print(f"\n$ ism {shlex.join(argv)}", flush=True)
    return main(list(argv))


def _flip_last_payload_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the integrated Wasm payload is the envelope's last member
    path.write_bytes(bytes(data))


def run_demo(examples: Path, out: Path) -> None:
    """Runs the demo in ``out`` (recreated) using modules built in ``examples``."""
    missing = [n for n in EXAMPLES if not (examples / f"{n}.wasm").is_file()]
    if missing:
        raise UsageError(
            "demo.examples", f"example modules not built: {missing}; run 'make demo'", subject=str(examples)
        )
    source = Path(__file__).resolve().parents[3] / "examples"
    if not source.is_dir():
        raise UsageError("demo.examples", "run the demo from a source checkout", subject=str(source))
    start = time.monotonic()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    dev, key = out / "device", out / "developer.pem"

    print("== 1. A developer creates a signing key and builds signed microservice packages")
    _run("keygen", "--alg", "es256", "--out", str(key))
    for name in EXAMPLES:
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
    _run("package", "inspect", str(out / "hello.suit"))

    print("\n== 2. The vendor provisions a virtual device and trusts the developer's key")
    _run("device", "init", str(dev))
    _run("device", "trust", str(dev), "--add", str(out / "developer.pub.pem"))

    print("\n== 3. Install: every package is verified before it is staged")
    for name in EXAMPLES:
        _run("device", "install", str(dev), str(out / f"{name}.suit"))
    tampered = out / "echo-tampered.suit"
    shutil.copy(out / "echo.suit", tampered)
    _flip_last_payload_byte(tampered)
    status = _run("device", "install", str(dev), str(tampered))
    print(f"(exit status {status}: the tampered package was refused and nothing was written)")

    print("\n== 4. A newer hello (sequence 2) is installed and booted: its anti-rollback counter moves to 2")
    meta2 = out / "hello-1.1.toml"
    meta2.write_text(
        (source / "hello" / "hello.toml")
        .read_text()
        .replace('version = "1.0.0"', 'version = "1.1.0"')
        .replace("sequence = 1", "sequence = 2")
    )
    _run(
        "package",
        "build",
        "--wasm",
        str(examples / "hello.wasm"),
        "--meta",
        str(meta2),
        "--key",
        str(key),
        "--out",
        str(out / "hello-1.1.suit"),
    )
    _run("device", "install", str(dev), str(out / "hello-1.1.suit"))
    _run("device", "boot", str(dev))

    print("\n== 5. An attacker with access to the device's storage:")
    print("   - flips one byte of blinky's payload on flash")
    print("   - writes the old, validly signed hello 1.0.0 (sequence 1) over hello 1.1.0")
    from ism.device.virtual import Device

    device = Device(dev)
    blinky_uuid = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a02"
    hello_uuid = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a01"
    _flip_last_payload_byte(device.package_path(blinky_uuid))
    shutil.copy(out / "hello.suit", device.package_path(hello_uuid))
    _run("device", "boot", str(dev))
    print("(only the tampered and the rolled-back microservices are refused; echo boots)")

    print("\n== 6. The vendor restores blinky and explicitly authorises the downgrade of hello")
    shutil.copy(out / "blinky.suit", device.package_path(blinky_uuid))
    _run(
        "package",
        "authorize-downgrade",
        "--uuid",
        hello_uuid,
        "--sequence",
        "1",
        "--from",
        "2",
        "--instance",
        device.instance_id.hex(),
        "--key",
        str(key),
        "--out",
        str(out / "hello-downgrade.cose"),
    )
    _run("device", "install", str(dev), str(out / "hello.suit"), "--downgrade", str(out / "hello-downgrade.cose"))
    _run("device", "boot", str(dev))
    print(f"\ndemo finished in {time.monotonic() - start:.1f} s; files are in {out}/")
