"""A TPM-backed device: its keys are TPM objects, and a TPM NV counter makes the counters file replay-proof."""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _swtpm import Swtpm

from ism.cli.main import main
from ism.crypto.keys import PrivateKey, public_pem
from ism.device.virtual import Device
from ism.errors import StateCorruptError


@pytest.fixture
def tpm_device(swtpm: Swtpm, tmp_path: Path, dev_key: PrivateKey) -> Iterator[Device]:
    """A device whose key store is the (session-scoped) swtpm. A TPM has only a few session slots:
    every Device opened here is closed before the next test."""
    root = tmp_path / "device"
    assert main(["device", "init", str(root), "--keystore", "tpm", "--tpm-tcti", swtpm.tcti]) == 0
    with Device(root) as device:
        device.add_anchor(public_pem(dev_key))
        yield device
    gc.collect()


def test_replaying_the_counters_file_is_detected_with_the_tpm(
    tpm_device: Device, build_package: Callable[..., bytes], uuids: dict[str, str], tmp_path: Path
) -> None:
    assert tpm_device.keystore().backend == "tpm"
    tpm_device.install(build_package("hello", sequence=1))
    tpm_device.boot()
    saved = tmp_path / "rollback-v1.cose"
    shutil.copy(tpm_device.root / "state" / "rollback.cose", saved)
    tpm_device.install(build_package("hello", sequence=2))
    tpm_device.boot()
    assert tpm_device.counters() == {uuids["hello"]: 2}
    # the attacker restores the older, genuinely MAC'd counters file (counter 1)
    shutil.copy(saved, tpm_device.root / "state" / "rollback.cose")
    with Device(tpm_device.root) as other, pytest.raises(StateCorruptError) as info:
        other.counters()
    assert info.value.rule == "state.rollback-replay"


def test_a_power_cut_between_the_file_and_the_tpm_increment_rolls_forward(
    tpm_device: Device, build_package: Callable[..., bytes], uuids: dict[str, str]
) -> None:
    from ism.device._atomic import Faults, PowerCut

    tpm_device.install(build_package("hello", sequence=1))
    with Device(tpm_device.root, Faults()) as dry:
        dry.boot()
        index = dry.faults.points.index("rollback.cose:tpm-increment") + 1
    tpm_device.install(build_package("hello", sequence=2))
    with Device(tpm_device.root, Faults(cut_at=index)) as victim, pytest.raises(PowerCut):
        victim.boot()
    for _ in range(2):  # the first open finishes the increment; the state then stays consistent
        with Device(tpm_device.root) as after:
            assert after.counters() == {uuids["hello"]: 2}


def test_run_the_reference_flow_on_the_tpm(tpm_device: Device) -> None:
    # the device identity CA and the storage key are created in the TPM on first start
    from ism.runtime import Runtime

    token = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
    tpm_device.configure((token / "board.toml").read_text(), (token / "policy.toml").read_text())
    runtime = Runtime.start(tpm_device.root)
    try:
        assert runtime.device.keystore().exists("device.identity-ca")
        assert runtime.device.keystore().exists("device.storage")
    finally:
        runtime.close()
