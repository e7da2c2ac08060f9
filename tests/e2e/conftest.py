"""Shared e2e fixtures: the reference device provisioned through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import wasmtime

from ism.cli.main import main

TOKEN = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
NAMES = ("biometric", "authenticator", "link", "analytics")


@pytest.fixture
def token_device(tmp_path: Path) -> Path:
    """The fingerprint token: keys, device, trust anchor, board + policy, four signed packages installed."""
    dev, key = tmp_path / "device", tmp_path / "dev.pem"
    assert main(["keygen", "--out", str(key)]) == 0
    assert main(["device", "init", str(dev)]) == 0
    assert main(["device", "trust", str(dev), "--add", str(tmp_path / "dev.pub.pem")]) == 0
    assert (
        main(
            [
                "device",
                "configure",
                str(dev),
                "--board",
                str(TOKEN / "board.toml"),
                "--policy",
                str(TOKEN / "policy.toml"),
            ]
        )
        == 0
    )
    for name in NAMES:
        wasm, suit = tmp_path / f"{name}.wasm", tmp_path / f"{name}.suit"
        wasm.write_bytes(bytes(wasmtime.wat2wasm((TOKEN / name / f"{name}.wat").read_text())))
        assert (
            main(
                [
                    "package",
                    "build",
                    "--wasm",
                    str(wasm),
                    "--meta",
                    str(TOKEN / name / f"{name}.toml"),
                    "--key",
                    str(key),
                    "--out",
                    str(suit),
                ]
            )
            == 0
        )
        assert main(["device", "install", str(dev), str(suit)]) == 0
    return dev
