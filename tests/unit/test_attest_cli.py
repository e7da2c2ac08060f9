"""``ism attest verify``: exit status, one-line errors, text and JSON output.

Runs through ``ism.cli.main.main`` once ``add_attest_commands`` is wired into
it; until then through a parser built the same way (main's ``add`` helper and
its ``IsmError`` handling).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from ism.cli import main as cli_main
from ism.cli.attest import add_attest_commands
from ism.crypto import attestation as at
from ism.crypto.keys import generate, public_pem
from ism.errors import IsmError, UsageError
from ism.formats import psa

VECTORS = Path(__file__).resolve().parents[1] / "conformance" / "vectors" / "psa"
RFC_SIGN1 = VECTORS / "rfc9783" / "psa-sign1.cbor"
RFC_MAC0 = VECTORS / "rfc9783" / "psa-mac0.cbor"
RFC_KEY = VECTORS / "rfc9783" / "tfm-es-iak.pub.pem"
RFC_HMAC = VECTORS / "rfc9783" / "tfm-hs-iak.bin"
P1_TOKEN = VECTORS / "veraison-psatoken" / "tf-m" / "psa-iot-1_sign1.bin"
P1_KEY = VECTORS / "veraison-psatoken" / "tf-m" / "key.pub.pem"
RFC_NONCE = "01" * 32


def _harness(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="ism")
    parser.add_argument("--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        parent: Any, name: str, func: Callable[[argparse.Namespace], None], help_: str, json_opt: bool = True
    ) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help_)
        sp.set_defaults(func=func)
        if json_opt:
            sp.add_argument("--json", action="store_true")
        return sp

    add_attest_commands(sub, add)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except IsmError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1
    return 0


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    args = [str(a) for a in argv]
    main: Callable[[Sequence[str]], int] = cli_main.main if hasattr(cli_main, "add_attest_commands") else _harness
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sign1_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "attest", "verify", RFC_SIGN1, "--key", RFC_KEY, "--nonce", RFC_NONCE)
    assert (code, err) == (0, "")
    assert out.startswith("OK COSE_Sign1 ES256 verifies")
    assert "tag:psacertified.org,2023:psa#tfm" in out
    assert "secured (0x3000)" in out


def test_mac0_verifies_with_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "attest", "verify", RFC_MAC0, "--hmac-key", RFC_HMAC, "--json")
    assert code == 0
    result = json.loads(out)
    assert result["valid"] is True
    assert result["kind"] == "COSE_Mac0"
    assert result["profile"] == psa.PROFILE_PSA
    assert result["claims"]["nonce"] == RFC_NONCE
    assert result["claims"]["software_components"][0]["measurement_value"] == "03" * 32
    assert result["appraisal"] is None
    assert result["result"] == "verified"


def test_legacy_profile_is_reported(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "attest", "verify", P1_TOKEN, "--key", P1_KEY)
    assert code == 0
    assert "PSA_IOT_PROFILE_1 (legacy)" in out
    code, out, _ = run(capsys, "attest", "verify", P1_TOKEN, "--key", P1_KEY, "--json")
    assert json.loads(out)["legacy_profile"] is True


@pytest.mark.parametrize(
    ("argv", "code", "rule"),
    [
        (("--key", P1_KEY), 1, "201 cose.signature"),
        (("--key", RFC_KEY, "--nonce", "02" * 32), 1, "200 attest.nonce"),
        (("--key", RFC_KEY, "--nonce", "xyz"), 2, "400 cli.argument"),
        (("--hmac-key", RFC_HMAC), 2, "400 attest.key"),
        (("--key", RFC_SIGN1), 1, "100 keys.pem"),
    ],
    ids=["wrong key", "wrong nonce", "bad nonce hex", "hmac key for sign1", "not a key"],
)
def test_failures_print_one_line(
    capsys: pytest.CaptureFixture[str], argv: tuple[str | Path, ...], code: int, rule: str
) -> None:
    got, out, err = run(capsys, "attest", "verify", RFC_SIGN1, *argv)
    assert got == code
    assert out == ""
    assert err.startswith(f"error: [{rule}]")
    assert err.count("\n") == 1


def test_missing_and_oversized_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "attest", "verify", tmp_path / "none.cbor", "--key", RFC_KEY)
    assert (code, err.split("]")[0]) == (2, "error: [400 cli.read")
    big = tmp_path / "big.cbor"
    big.write_bytes(b"\0" * (at.MAX_TOKEN + 1))
    code, _, err = run(capsys, "attest", "verify", big, "--key", RFC_KEY)
    assert (code, err.split("]")[0]) == (2, "error: [400 cli.too-large")
    junk = tmp_path / "junk.cbor"
    junk.write_bytes(b"\xd2\x84")
    code, _, err = run(capsys, "attest", "verify", junk, "--key", RFC_KEY)
    assert (code, err.split("]")[0]) == (1, "error: [100 cbor.truncated")


def test_failure_json_says_invalid(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "attest", "verify", RFC_SIGN1, "--key", P1_KEY, "--json")
    assert code == 1
    result = json.loads(out)
    assert (result["valid"], result["rule"], result["code"]) == (False, "cose.signature", 201)
    assert err.startswith("error: [201 cose.signature]")


def _reference(tmp_path: Path, **changes: Any) -> Path:
    doc: dict[str, Any] = {
        "version": 1,
        "implementation_id": "00" * 32,
        "components": [{"name": "PRoT", "measurements": ["03" * 32], "signers": ["04" * 32], "required": True}],
    }
    doc.update(changes)
    path = tmp_path / "reference.json"
    path.write_text(json.dumps(doc))
    return path


def test_affirming_appraisal_exits_zero(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ref = _reference(tmp_path)
    code, out, err = run(capsys, "attest", "verify", RFC_SIGN1, "--key", RFC_KEY, "--ref", ref)
    assert (code, err) == (0, "")
    assert "appraisal: affirming" in out
    code, out, _ = run(capsys, "attest", "verify", RFC_SIGN1, "--key", RFC_KEY, "--ref", ref, "--json")
    result = json.loads(out)
    assert (code, result["result"], result["appraisal"]["status"]) == (0, "affirming", "affirming")
    assert {c["kind"] for c in result["appraisal"]["components"]} == {"platform", "software-component"}


def test_contraindicated_appraisal_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ref = _reference(tmp_path, components=[{"name": "PRoT", "measurements": ["05" * 32]}])
    code, out, err = run(capsys, "attest", "verify", RFC_SIGN1, "--key", RFC_KEY, "--ref", ref, "--json")
    assert code == 1
    result = json.loads(out)
    assert (result["valid"], result["result"], result["rule"]) == (True, "contraindicated", "attest.appraisal")
    prot = next(c for c in result["appraisal"]["components"] if c["name"] == "PRoT")
    assert prot["status"] == "contraindicated"
    assert "measurement" in prot["reasons"][0]
    assert err.startswith("error: [200 attest.appraisal] appraisal is contraindicated: software-component PRoT")


def test_warning_appraisal_fails(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ref = _reference(tmp_path, components=[])
    code, out, err = run(capsys, "attest", "verify", RFC_SIGN1, "--key", RFC_KEY, "--ref", ref)
    assert code == 1
    assert "appraisal: warning" in out
    assert "[warning] software-component PRoT: no reference values" in out
    assert err.startswith("error: [200 attest.appraisal] appraisal is warning")


def test_malformed_reference(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ref = tmp_path / "reference.json"
    ref.write_text('{"version": 1, "components": [{"name": "a", "measurements": ["zz"]}]}')
    code, _, err = run(capsys, "attest", "verify", RFC_SIGN1, "--key", RFC_KEY, "--ref", ref)
    assert code == 1
    assert err.startswith("error: [100 attest.reference]")


def test_own_device_token_with_microservices(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import uuid as uuidlib

    key = generate("es256")
    pub = tmp_path / "iak.pub.pem"
    pub.write_bytes(public_pem(key))
    measurement = hashlib.sha256(b"wasm").digest()
    service = psa.MicroserviceClaims(
        uuid=uuidlib.UUID(int=1),
        name="echo",
        version="0.1.0",
        sequence=1,
        measurement=measurement,
        signer=b"\x05" * 32,
        policy_digest=b"\x06" * 32,
        lifecycle="active",
    )
    claims = psa.Claims(
        profile=psa.PROFILE_PSA,
        nonce=b"\x09" * 48,
        instance_id=b"\x01" + b"\x07" * 32,
        implementation_id=b"\x08" * 32,
        client_id=-1,
        lifecycle=0x3000,
        software_components=(psa.SwComponent(measurement, b"\x05" * 32, "echo", "0.1.0", "sha-256"),),
        submods=(service,),
    )
    token = tmp_path / "device.token"
    token.write_bytes(at.sign_token(claims, key))  # type: ignore[arg-type]
    ref = _reference(
        tmp_path,
        implementation_id="08" * 32,
        components=[{"name": "echo", "uuid": str(uuidlib.UUID(int=1)), "measurements": [measurement.hex()]}],
    )
    code, out, err = run(capsys, "attest", "verify", token, "--key", pub, "--nonce", "09" * 48, "--ref", ref)
    assert (code, err) == (0, "")
    assert "microservice echo" in out
    assert "[affirming] microservice echo" in out
