"""The device security lifecycle through the ``ism`` command, each step a real process.

The factory initialises the reference device, trusts its own vendor key,
configures and locks it; in the field the product vendor's bundle adds the
store and policy signers and rotates the vendor key; the device attests
``secured``, goes into non-PSA-RoT debug and back (and the token says so),
is factory reset (its microservices gone, its counters kept), and is
finally decommissioned: the statement verifies with its attestation key and
nothing runs any more. Every refusal is one line naming its rule.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ism.errors import ErrorCode

TOKEN = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"


def ism(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ism.cli.main", *map(str, argv)], capture_output=True, text=True, timeout=120
    )


def ok(*argv: str | Path) -> str:
    done = ism(*argv)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ok_json(*argv: str | Path) -> Any:
    return json.loads(ok(*argv, "--json"))


def refused(code: ErrorCode, rule: str, *argv: str | Path) -> None:
    done = ism(*argv)
    assert done.returncode == (2 if code == ErrorCode.USAGE else 1), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith(f"error: [{int(code)} {rule}] "), done.stderr


def signer(pub: Path) -> str:
    from ism.crypto.keys import load_public, signer_id

    return signer_id(load_public(pub)).hex()


def attested_state(dev: Path, tmp: Path) -> str:
    """The security lifecycle state in a fresh token of ``ism device attest``."""
    token = ok_json("device", "attest", dev, "--nonce", os.urandom(32).hex(), "--out", tmp / "token.cbor")
    return str(token["claims"]["security_lifecycle"]["state"])


def test_the_lifecycle_from_factory_to_decommissioning(provision_token: Any, tmp_path: Path) -> None:
    dev = provision_token(tmp_path, lock=True)  # init -> trust (developer, factory vendor) -> configure -> lock
    info = ok_json("device", "info", dev)
    assert info["lifecycle"] == "secured"
    assert [e["event"] for e in info["lifecycle_log"]] == ["init", "lock"]
    refused(ErrorCode.TRUST, "lifecycle.locked", "device", "trust", dev, "--add", tmp_path / "dev.pub.pem")
    refused(ErrorCode.TRUST, "lifecycle.transition", "device", "lock", dev)

    # in the field: the product vendor's bundle, signed by the factory's vendor key
    for name in ("product-vendor", "store", "policy-signer"):
        ok("keygen", "--out", tmp_path / f"{name}.pem")
    bundle = tmp_path / "bundle.cose"
    made = ok_json(
        "provision", "bundle", "--sign", tmp_path / "vendor.pem", "--device", dev,
        "--add", f"vendor:{tmp_path / 'product-vendor.pub.pem'}", "--add", f"store:{tmp_path / 'store.pub.pem'}",
        "--add", f"policy:{tmp_path / 'policy-signer.pub.pem'}",
        "--remove", f"vendor:{signer(tmp_path / 'vendor.pub.pem')}", "--out", bundle,
    )  # fmt: skip
    assert made["instance_id"] == info["instance_id"]
    applied = ok_json("device", "provision", dev, bundle)
    assert {(a["role"], a["signer_id"]) for a in applied["added"]} == {
        ("vendor", signer(tmp_path / "product-vendor.pub.pem")),
        ("store", signer(tmp_path / "store.pub.pem")),
        ("policy", signer(tmp_path / "policy-signer.pub.pem")),
    }
    refused(ErrorCode.UNTRUSTED_SIGNER, "command.signer", "device", "provision", dev, bundle)  # old vendor gone
    vendor = tmp_path / "product-vendor.pem"
    replay = tmp_path / "replay.cose"
    ok("provision", "bundle", "--sign", vendor, "--device", dev, "--sequence", str(made["sequence"]),
       "--add", f"store:{tmp_path / 'vendor.pub.pem'}", "--out", replay)  # fmt: skip
    refused(ErrorCode.ROLLBACK, "command.replay", "device", "provision", dev, replay)

    # debug states are attested
    assert attested_state(dev, tmp_path) == "secured"
    for state in ("non-psa-rot-debug", "secured"):
        cmd = tmp_path / f"{state}.cose"
        ok("provision", "command", "lifecycle", "--state", state, "--sign", vendor, "--device", dev, "--out", cmd)
        assert ok_json("device", "lifecycle", dev, "--command", cmd)["to"] == state
        assert attested_state(dev, tmp_path) == state
    bad = tmp_path / "to-provisioning.cose"
    ok("provision", "command", "lifecycle", "--state", "psa-rot-provisioning", "--sign", vendor, "--device", dev,
       "--out", bad)  # fmt: skip
    refused(ErrorCode.TRUST, "lifecycle.transition", "device", "lifecycle", dev, "--command", bad)

    # factory reset: microservices gone, counters kept
    counters = ok_json("device", "info", dev)["counters"]
    assert len(ok_json("device", "boot", dev)["microservices"]) == 4
    reset = tmp_path / "reset.cose"
    ok("provision", "command", "factory-reset", "--sign", vendor, "--device", dev, "--out", reset)
    refused(ErrorCode.USAGE, "command.kind", "device", "decommission", dev, "--command", reset)
    done = ok_json("device", "factory-reset", dev, "--command", reset)
    assert done["state"] == "secured"
    after = ok_json("device", "info", dev)
    assert after["installed"] == []
    assert all(after["counters"][k] == v for k, v in counters.items() if not k.startswith(("lifecycle", "command")))
    refused(ErrorCode.ROLLBACK, "command.replay", "device", "factory-reset", dev, "--command", reset)

    # decommissioning: a statement, and nothing works any more
    command, statement = tmp_path / "decommission.cose", tmp_path / "statement.cose"
    ok("provision", "command", "decommission", "--sign", vendor, "--device", dev, "--out", command)
    ok("device", "decommission", dev, "--command", command, "--out", statement)
    verified = ok_json("device", "statement", "verify", statement, "--key", dev / "keys" / "iak.pub.pem")
    log = ok_json("device", "lifecycle", dev, "--log")
    assert (verified["valid"], verified["head"], log["state"]) == (True, log["head"], "decommissioned")
    assert verified["instance_id"] == info["instance_id"]
    refused(
        ErrorCode.SIGNATURE, "lifecycle.statement-signature",
        "device", "statement", "verify", statement, "--key", tmp_path / "vendor.pub.pem",
    )  # fmt: skip
    for argv in (
        ("device", "boot", dev),
        ("device", "run", dev, "--for", "0.1"),
        ("device", "attest", dev, "--nonce", os.urandom(32).hex(), "--out", tmp_path / "t.cbor"),
        ("device", "key", dev, "authenticator", "device-2fa"),
        ("device", "install", dev, tmp_path / "biometric.suit"),
        ("device", "provision", dev, bundle),
        ("device", "factory-reset", dev, "--command", reset),
    ):
        refused(ErrorCode.TRUST, "lifecycle.decommissioned", *argv)
    assert ok_json("device", "info", dev)["lifecycle"] == "decommissioned"
