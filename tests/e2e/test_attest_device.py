"""Attestation end to end: ism device attest produces a token that ism attest verify appraises."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ism.cli.main import main
from ism.formats import package, suit

NAMES = ("biometric", "authenticator", "link", "analytics")


def _reference(tmp_path: Path, tamper: str | None = None) -> Path:
    components = []
    for name in NAMES:
        pkg = package.read_package(suit.parse_envelope((tmp_path / f"{name}.suit").read_bytes()))
        measurement = pkg.measurement.hex() if name != tamper else "00" * 32
        components.append({"name": name, "measurements": [measurement], "min_version": "1.0.0"})
    ref = tmp_path / ("reference.json" if tamper is None else f"reference-{tamper}.json")
    ref.write_text(json.dumps({"version": 1, "components": components}))
    return ref


def test_device_token_verifies_and_appraises(
    token_device: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    nonce = os.urandom(32).hex()
    token = tmp_path / "token.cbor"
    assert main(["device", "attest", str(token_device), "--nonce", nonce, "--out", str(token)]) == 0
    iak = token_device / "keys" / "iak.pub.pem"
    capsys.readouterr()
    args = ["attest", "verify", str(token), "--key", str(iak), "--nonce", nonce, "--json"]
    status = main([*args, "--ref", str(_reference(tmp_path))])
    result = json.loads(capsys.readouterr().out)
    # the iSM itself has no reference entry here: a warning, so the CLI refuses (exit 1) but says why
    assert status == 1
    assert result["result"] == "warning"
    statuses = {(c["kind"], c["name"]): c["status"] for c in result["appraisal"]["components"]}
    assert {statuses[("software-component", n)] for n in NAMES} == {"affirming"}
    assert statuses[("software-component", "ism")] == "warning"
    assert set(result["claims"]["submods"]) == set(NAMES)
    # the persisted per-microservice lifecycle: installed, never started yet (docs/lifecycle.md)
    assert {m["lifecycle"] for m in result["claims"]["submods"].values()} == {"installed"}
    # a wrong nonce, or a reference that expects other code, is refused
    assert main(["attest", "verify", str(token), "--key", str(iak), "--nonce", os.urandom(32).hex()]) == 1
    assert main([*args[:-1], "--ref", str(_reference(tmp_path, tamper="biometric"))]) == 1
