"""The state MAC key of a TPM or PKCS#11 device is computed in the TPM/token, never stored on disk.

An offline attacker who reads (or copies) a TPM or token device's directory
must not be able to forge its MAC'd state files: the key is
``HMAC(device.state, "ism-state-mac-v1")`` computed by the key store, so the
directory is useless elsewhere: copied to another TPM, pointed at another
device's part of the token, or with ``device.state`` deleted from the key
store, its state no longer verifies (a typed ``StateCorruptError``).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from _softhsm import SoftHsm
from _swtpm import Swtpm, find_swtpm, start_swtpm

from _cli import ism, ism_ok
from ism.crypto.keystore.pkcs11 import Pkcs11KeyStore
from ism.device.virtual import STATE_KEY_ID, Device, _counters_generation, _seal_counters
from ism.errors import StateCorruptError


@pytest.fixture
def tpm_dev(swtpm: Swtpm, tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "tpm-device"
    ism_ok("device", "init", root, "--keystore", "tpm", "--tpm-tcti", swtpm.tcti)
    yield root
    gc.collect()  # a TPM has few session slots


def _token_dev(softhsm: SoftHsm, tmp_path: Path, name: str) -> Path:
    pin = tmp_path / "pin"
    pin.write_text(softhsm.pin + "\n")
    root = tmp_path / name
    ism_ok(
        "device", "init", root, "--keystore", "pkcs11", "--pkcs11-module", softhsm.module,
        "--pkcs11-token", softhsm.label, "--pkcs11-pin-file", pin,
    )  # fmt: skip
    return root


def _refused(root: Path) -> StateCorruptError:
    """The device's state does not verify: typed from the API, a one-line error from the CLI."""
    with pytest.raises(StateCorruptError) as info, Device(root) as dev:
        dev.counters()
    status, out, err = ism("device", "info", root)
    assert status != 0
    assert "Traceback" not in out + err
    return info.value


def test_a_tpm_device_has_no_state_key_file(tpm_dev: Path) -> None:
    assert not (tpm_dev / "keys" / "state.key").exists()
    assert (tpm_dev / "keys" / "tpm" / f"{STATE_KEY_ID}.tpmkey").is_file()
    with Device(tpm_dev) as dev:
        dev.counters()
        key = dev.state_mac_key
    with Device(tpm_dev) as again:  # the same key at every open, from the TPM
        assert again.state_mac_key == key
    assert key not in b"".join(p.read_bytes() for p in tpm_dev.rglob("*") if p.is_file())


def test_a_tpm_device_copied_to_another_tpm_does_not_verify(
    tpm_dev: Path, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    binary = find_swtpm()
    assert binary is not None
    other = start_swtpm(tmp_path_factory.mktemp("other-swtpm"), binary)
    try:
        for pinned in (True, False):  # with the primary key's pinned name, and with it removed by the attacker
            copy = tmp_path / f"copy-{pinned}"
            shutil.copytree(tpm_dev, copy)
            config = json.loads((copy / "device.json").read_text())
            config["tpm"]["tcti"] = other.tcti
            (copy / "device.json").write_text(json.dumps(config))
            if not pinned:
                (copy / "keys" / "tpm" / "primary.name").unlink()
            _refused(copy)
            gc.collect()
    finally:
        other.stop()
    with Device(tpm_dev) as dev:  # the original, on its own TPM, is fine
        dev.counters()


def test_a_tpm_device_without_its_state_key_does_not_verify(tpm_dev: Path, tmp_path: Path) -> None:
    (tpm_dev / "keys" / "tpm" / f"{STATE_KEY_ID}.tpmkey").unlink()
    assert _refused(tpm_dev).rule == "state.device-key"


def test_a_token_device_has_no_state_key_file(softhsm: SoftHsm, tmp_path: Path) -> None:
    root = _token_dev(softhsm, tmp_path, "token-device")
    assert not (root / "keys" / "state.key").exists()
    with Device(root) as dev:
        dev.counters()
        key = dev.state_mac_key
    assert key not in b"".join(p.read_bytes() for p in root.rglob("*") if p.is_file())


def test_a_token_device_without_its_state_key_does_not_verify(softhsm: SoftHsm, tmp_path: Path) -> None:
    root = _token_dev(softhsm, tmp_path, "token-device")
    namespace = json.loads((root / "device.json").read_text())["pkcs11"]["namespace"]
    with Pkcs11KeyStore(softhsm.module, softhsm.label, softhsm.pin, namespace=namespace) as store:
        store.destroy(STATE_KEY_ID)
    assert _refused(root).rule == "state.device-key"


def test_a_token_device_copied_onto_another_devices_key_store_does_not_verify(softhsm: SoftHsm, tmp_path: Path) -> None:
    a, b = _token_dev(softhsm, tmp_path, "a"), _token_dev(softhsm, tmp_path, "b")
    config = json.loads((a / "device.json").read_text())
    config["pkcs11"]["namespace"] = json.loads((b / "device.json").read_text())["pkcs11"]["namespace"]
    (a / "device.json").write_text(json.dumps(config))  # a's files, b's device.state
    _refused(a)


@pytest.mark.parametrize("backend", ["tpm", "pkcs11"])
def test_a_state_key_file_of_the_attackers_is_ignored(
    backend: str, request: pytest.FixtureRequest, softhsm: SoftHsm, tmp_path: Path
) -> None:
    """An offline attacker writes keys/state.key and re-MACs the counters with it (rolled back to
    nothing, at the TPM's current generation): the device still takes its state key from the key
    store, whatever device.json says, so the forged state does not verify."""
    root = request.getfixturevalue("tpm_dev") if backend == "tpm" else _token_dev(softhsm, tmp_path, "token")
    with Device(root) as dev:
        dev.counters()
        generation = _counters_generation((root / "state" / "rollback.cose").read_bytes(), dev.state_mac_key)
    own = os.urandom(32)
    (root / "keys" / "state.key").write_bytes(own)
    config = json.loads((root / "device.json").read_text())
    config.pop("state_key", None)  # a marker, had there been one, would be gone too
    (root / "device.json").write_text(json.dumps(config))
    (root / "state" / "rollback.cose").write_bytes(_seal_counters({}, own, generation))
    assert _refused(root).rule.startswith("state.")
