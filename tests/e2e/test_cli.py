"""The ``ism`` command line, end to end: keys, packages, SUIT verification and a virtual device."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from ism.cli.main import _parser, main
from ism.crypto.keys import load_public, signer_id
from ism.errors import ErrorCode

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"
HELLO_UUID = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a01"
BOOT_ENTRY_FIELDS = {"uuid", "name", "version", "sequence", "measurement", "signer", "verdict", "rule"}


class Cli:
    """Runs ``main(argv)`` in-process and captures its exit status and output."""

    def __init__(self, capsys: pytest.CaptureFixture[str], cwd: Path) -> None:
        self.capsys = capsys
        self.cwd = cwd

    def __call__(self, *argv: str | Path) -> tuple[int, str, str]:
        self.capsys.readouterr()
        rc = main([str(a) for a in argv])
        out, err = self.capsys.readouterr()
        return rc, out, err

    def ok(self, *argv: str | Path) -> str:
        rc, out, err = self(*argv)
        assert rc == 0, err
        assert err == ""
        return out

    def json(self, *argv: str | Path) -> Any:
        return json.loads(self.ok(*argv, "--json"))

    def fails(self, status: int, code: ErrorCode, rule: str, *argv: str | Path) -> tuple[str, str]:
        rc, out, err = self(*argv)
        assert rc == status, (out, err)
        assert err.endswith("\n")
        assert err.count("\n") == 1, err
        assert err.startswith(f"error: [{int(code)} {rule}] "), err
        return out, err


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> Cli:
    return Cli(capsys, tmp_path)


@pytest.fixture
def work(tmp_path: Path, wasm_dir: Path) -> Path:
    """A workspace with every example's M.toml and module, and hello at sequence 2."""
    for name in ("blinky", "echo", "hello"):
        (tmp_path / f"{name}.toml").write_text((EXAMPLES / name / f"{name}.toml").read_text())
        (tmp_path / f"{name}.wasm").write_bytes((wasm_dir / f"{name}.wasm").read_bytes())
    text = (tmp_path / "hello.toml").read_text()
    assert "sequence = 1\n" in text
    (tmp_path / "hello2.toml").write_text(text.replace("sequence = 1\n", "sequence = 2\n"))
    return tmp_path


@pytest.fixture
def keys(cli: Cli, work: Path) -> dict[str, Path]:
    cli.ok("keygen", "--out", work / "dev.pem")
    cli.ok("keygen", "--alg", "ed25519", "--out", work / "other.pem")
    return {"dev": work / "dev.pem", "dev_pub": work / "dev.pub.pem", "other_pub": work / "other.pub.pem"}


def _build(cli: Cli, work: Path, key: Path, meta: str = "hello", wasm: str = "hello", out: str | None = None) -> Path:
    target = work / (out or f"{meta}.suit")
    cli.ok(
        "package",
        "build",
        "--wasm",
        work / f"{wasm}.wasm",
        "--meta",
        work / f"{meta}.toml",
        "--key",
        key,
        "--out",
        target,
    )
    return target


# -- keygen ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["es256", "ed25519"])
def test_keygen(cli: Cli, tmp_path: Path, alg: str) -> None:
    key = tmp_path / "signer.pem"
    info = cli.json("keygen", "--alg", alg, "--out", key)
    pub = tmp_path / "signer.pub.pem"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    assert info == {
        "private": str(key),
        "public": str(pub),
        "alg": alg,
        "signer_id": signer_id(load_public(pub)).hex(),
    }
    # Never overwrites a key.
    before = key.read_bytes()
    cli.fails(2, ErrorCode.USAGE, "keys.exists", "keygen", "--out", key)
    assert key.read_bytes() == before


# -- package ---------------------------------------------------------------------------------------


def test_package_build_inspect_verify(cli: Cli, work: Path, keys: dict[str, Path]) -> None:
    sid = signer_id(load_public(keys["dev_pub"])).hex()
    out = work / "hello.suit"
    built = cli.json(
        "package",
        "build",
        "--wasm",
        work / "hello.wasm",
        "--meta",
        work / "hello.toml",
        "--key",
        keys["dev"],
        "--out",
        out,
    )
    assert out.stat().st_size == built["size"]
    assert built["out"] == str(out)
    assert (built["uuid"], built["name"], built["version"], built["sequence"]) == (HELLO_UUID, "hello", "1.0.0", 1)
    assert built["signer"] == sid
    assert built["payload_size"] == (work / "hello.wasm").stat().st_size
    assert len(built["measurement"]) == 64

    inspected = cli.json("package", "inspect", out)
    for key in ("uuid", "vendor", "name", "version", "sequence", "measurement", "requests", "components"):
        assert inspected[key] == built[key]
    envelope = inspected["envelope"]
    assert envelope["tagged"] is True
    assert envelope["auth_blocks"] == [{"kind": "sign1", "alg": "ES256", "kid": sid}]
    assert envelope["integrated"] == {"#wasm": built["payload_size"]}
    assert envelope["severable"] == {"-257": "digest", "20": "inline", "23": "digest"}
    text = cli.ok("package", "inspect", out)
    assert "hello" in text
    assert f"ES256 kid={sid}" in text

    verified = cli.json("package", "verify", out, "--trust", keys["dev_pub"])
    assert verified["valid"] is True
    assert (verified["signer"], verified["uuid"], verified["measurement"]) == (sid, HELLO_UUID, built["measurement"])
    assert cli.ok("package", "verify", out, "--trust", keys["other_pub"], "--trust", keys["dev_pub"]).startswith(
        "OK hello 1.0.0"
    )


def test_verify_with_the_wrong_trust_key(cli: Cli, work: Path, keys: dict[str, Path]) -> None:
    out = _build(cli, work, keys["dev"])
    stdout, _ = cli.fails(
        1, ErrorCode.UNTRUSTED_SIGNER, "suit.untrusted-signer", "package", "verify", out, "--trust", keys["other_pub"]
    )
    assert stdout == ""
    report, _ = cli.fails(
        1,
        ErrorCode.UNTRUSTED_SIGNER,
        "suit.untrusted-signer",
        "package",
        "verify",
        out,
        "--trust",
        keys["other_pub"],
        "--json",
    )
    parsed = json.loads(report)
    assert (parsed["valid"], parsed["rule"], parsed["code"]) == (False, "suit.untrusted-signer", 204)


def test_verify_wrong_key_in_a_subprocess(cli: Cli, work: Path, keys: dict[str, Path]) -> None:
    _build(cli, work, keys["dev"])
    result = subprocess.run(
        [sys.executable, "-m", "ism.cli.main", "package", "verify", "hello.suit", "--trust", "other.pub.pem"],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: [204 suit.untrusted-signer] ")


def test_build_refuses_bad_inputs(cli: Cli, work: Path, keys: dict[str, Path]) -> None:
    (work / "bad.toml").write_text((work / "hello.toml").read_text() + 'colour = "red"\n')
    _, err = cli.fails(
        1,
        ErrorCode.FORMAT,
        "package.meta-key",
        "package",
        "build",
        "--wasm",
        work / "hello.wasm",
        "--meta",
        work / "bad.toml",
        "--key",
        keys["dev"],
        "--out",
        work / "x.suit",
    )
    assert f"({work / 'bad.toml'}: colour)" in err
    (work / "junk.wasm").write_bytes(bytes(wasmtime.wat2wasm('(module (import "ism" "exec" (func)))')))
    cli.fails(
        1,
        ErrorCode.FORMAT,
        "wasm.unknown-import",
        "package",
        "build",
        "--wasm",
        work / "junk.wasm",
        "--meta",
        work / "hello.toml",
        "--key",
        keys["dev"],
        "--out",
        work / "x.suit",
    )
    cli.fails(2, ErrorCode.USAGE, "cli.read", "package", "inspect", work / "missing.suit")
    assert not (work / "x.suit").exists()


# -- suit verify -----------------------------------------------------------------------------------


def test_suit_verify_our_package(cli: Cli, work: Path, keys: dict[str, Path]) -> None:
    out = _build(cli, work, keys["dev"])
    result = cli.json("suit", "verify", out, "--key", keys["dev_pub"])
    assert result["valid"] is True
    assert result["sequence"] == 1
    assert result["components"] == [[b"microservice".hex()]]
    assert result["auth"] == {"kind": "sign1", "alg": "ES256", "signer": signer_id(load_public(keys["dev_pub"])).hex()}
    assert result["severed"] == []
    assert cli.ok("suit", "verify", out, "--key", keys["dev_pub"]).startswith("OK sequence 1, 1 component(s), ES256")

    report, _ = cli.fails(
        1,
        ErrorCode.UNTRUSTED_SIGNER,
        "suit.untrusted-signer",
        "suit",
        "verify",
        out,
        "--key",
        keys["other_pub"],
        "--json",
    )
    assert json.loads(report)["valid"] is False


# -- device ----------------------------------------------------------------------------------------


def test_device_lifecycle(cli: Cli, work: Path, keys: dict[str, Path]) -> None:
    sid = signer_id(load_public(keys["dev_pub"])).hex()
    dev = work / "device"
    init = cli.json("device", "init", dev)
    assert (init["counters"], init["installed"], init["trust_anchors"]) == ({}, [], [])
    assert cli.json("device", "trust", dev, "--add", keys["dev_pub"]) == {"added": [sid]}

    packages = [_build(cli, work, keys["dev"], name, name) for name in ("blinky", "echo", "hello")]
    for pkg in packages:
        staged = cli.json("device", "install", dev, pkg)
        assert (staged["valid"], staged["downgrade"]) == (True, False)
    assert cli.json("device", "info", dev)["counters"] == {}

    report = cli.json("device", "boot", dev)
    assert (report["booted"], report["refused"]) == (3, 0)
    assert report["instance_id"] == init["instance_id"]
    for entry in report["microservices"]:
        assert set(entry) >= BOOT_ENTRY_FIELDS
        assert (entry["verdict"], entry["rule"], entry["signer"], entry["sequence"]) == ("booted", None, sid, 1)
        assert len(entry["measurement"]) == 64
    assert sorted(e["name"] for e in report["microservices"]) == ["blinky", "echo", "hello"]
    info = cli.json("device", "info", dev)
    assert info["counters"] == {e["uuid"]: 1 for e in report["microservices"]}
    assert "BOOTED" in cli.ok("device", "boot", dev)

    # Tamper with one package on flash: boot still succeeds (exit 0) and reports it refused.
    flash = dev / "packages" / f"{HELLO_UUID}.suit"
    data = bytearray(flash.read_bytes())
    data[-10] ^= 0xFF
    flash.write_bytes(bytes(data))
    report = cli.json("device", "boot", dev)
    assert (report["booted"], report["refused"]) == (2, 1)
    (hello,) = [e for e in report["microservices"] if e["uuid"] == HELLO_UUID]
    assert (hello["verdict"], hello["rule"], hello["code"], hello["signer"]) == (
        "refused",
        "package.payload-digest",
        202,
        None,
    )
    assert "REFUSED" in cli.ok("device", "boot", dev)

    # Installing a tampered package is refused and reported as JSON too.
    (work / "bad.suit").write_bytes(bytes(data))
    report_text, _ = cli.fails(
        1, ErrorCode.DIGEST, "package.payload-digest", "device", "install", dev, work / "bad.suit", "--json"
    )
    assert json.loads(report_text)["valid"] is False


def test_device_commands_on_a_non_device(cli: Cli, work: Path) -> None:
    cli.fails(2, ErrorCode.USAGE, "device.missing", "device", "boot", work / "nothing")
    cli.ok("device", "init", work / "dev")
    cli.fails(2, ErrorCode.USAGE, "device.exists", "device", "init", work / "dev")


def test_authorize_downgrade_and_install(cli: Cli, work: Path, keys: dict[str, Path]) -> None:
    dev = work / "device"
    instance = cli.json("device", "init", dev)["instance_id"]
    cli.ok("device", "trust", dev, "--add", keys["dev_pub"])
    v1 = _build(cli, work, keys["dev"], "hello", out="v1.suit")
    v2 = _build(cli, work, keys["dev"], "hello2", "hello", out="v2.suit")
    cli.ok("device", "install", dev, v2)
    cli.ok("device", "boot", dev)
    assert cli.json("device", "info", dev)["counters"] == {HELLO_UUID: 2}
    cli.fails(1, ErrorCode.ROLLBACK, "boot.rollback", "device", "install", dev, v1)

    auth = work / "downgrade.cose"
    written = cli.json(
        "package",
        "authorize-downgrade",
        "--uuid",
        HELLO_UUID,
        "--sequence",
        "1",
        "--from",
        "2",
        "--instance",
        instance,
        "--key",
        keys["dev"],
        "--out",
        auth,
    )
    assert written == {"out": str(auth), "uuid": HELLO_UUID, "sequence": 1, "from": 2}

    staged = cli.json("device", "install", dev, v1, "--downgrade", auth)
    assert (staged["downgrade"], staged["sequence"]) == (True, 1)
    (entry,) = cli.json("device", "boot", dev)["microservices"]
    assert (entry["verdict"], entry["sequence"], entry["downgraded"]) == ("booted", 1, True)
    assert cli.json("device", "info", dev)["counters"] == {HELLO_UUID: 1}

    # Back up to 2; an authorisation for another device, or a malformed request, is refused.
    cli.ok("device", "install", dev, v2)
    cli.ok("device", "boot", dev)
    other = work / "other.cose"
    args = ["package", "authorize-downgrade", "--uuid", HELLO_UUID, "--sequence", "1", "--from", "2"]
    cli.ok(*args, "--instance", "01" + "00" * 32, "--key", keys["dev"], "--out", other)
    cli.fails(1, ErrorCode.TRUST, "boot.downgrade-device", "device", "install", dev, v1, "--downgrade", other)
    cli.fails(2, ErrorCode.USAGE, "cli.argument", *args, "--instance", "zz", "--key", keys["dev"], "--out", other)
    assert cli.json("device", "info", dev)["counters"] == {HELLO_UUID: 2}


# -- help ------------------------------------------------------------------------------------------


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


COMMANDS = _command_paths(_parser())


def test_every_documented_command_is_covered() -> None:
    expected = {
        ("keygen",),
        ("package", "build"),
        ("package", "inspect"),
        ("package", "verify"),
        ("package", "authorize-downgrade"),
        ("suit", "verify"),
        ("device", "init"),
        ("device", "info"),
        ("device", "boot"),
        ("device", "trust"),
        ("device", "install"),
        ("demo",),
    }
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "ism")
def test_help_exits_zero(command: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: ism")
