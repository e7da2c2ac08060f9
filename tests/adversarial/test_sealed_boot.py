"""Validate-once boot: sealed records speed up boot but never vouch for anything that changed."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest

from ism.crypto.keys import PrivateKey, public_pem, signer_id
from ism.device.virtual import Device


@pytest.fixture
def booted(device: Device, build_package: Callable[..., bytes]) -> Device:
    for name in ("hello", "blinky", "echo"):
        device.install(build_package(name))
    report = device.boot()
    assert {e.verified for e in report.microservices} == {"full"}
    return device


def _verdicts(device: Device, full: bool = False) -> dict[str | None, tuple[str, str | None, str | None]]:
    return {e.name: (e.verdict, e.rule, e.verified) for e in device.boot(full=full).microservices}


def test_second_boot_uses_the_sealed_records_and_full_re_verifies(booted: Device) -> None:
    assert _verdicts(booted) == {n: ("booted", None, "sealed") for n in ("hello", "blinky", "echo")}
    assert _verdicts(booted, full=True) == {n: ("booted", None, "full") for n in ("hello", "blinky", "echo")}


def test_a_package_changed_after_sealing_is_verified_in_full_and_refused(booted: Device, uuids: dict[str, str]) -> None:
    path = booted.package_path(uuids["blinky"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    verdicts = _verdicts(booted)
    assert verdicts["blinky"] == ("refused", "package.payload-digest", None)
    assert verdicts["hello"] == ("booted", None, "sealed")


def test_a_forged_or_corrupt_seal_is_ignored(booted: Device, uuids: dict[str, str]) -> None:
    sealed = booted.root / "state" / "sealed.cose"
    raw = bytearray(sealed.read_bytes())
    raw[len(raw) // 2] ^= 0x40
    sealed.write_bytes(bytes(raw))
    assert {v[2] for v in _verdicts(booted).values()} == {"full"}
    sealed.write_bytes(b"\x00garbage")
    assert {v[2] for v in _verdicts(booted).values()} == {"full"}


def test_a_removed_trust_anchor_is_not_bypassed_by_the_seal(booted: Device, dev_key: PrivateKey) -> None:
    (booted.root / "trust" / f"{signer_id(dev_key).hex()}.pem").unlink()
    verdicts = _verdicts(booted)
    assert {v[0] for v in verdicts.values()} == {"refused"}
    assert {v[1] for v in verdicts.values()} == {"suit.untrusted-signer"}
    booted.add_anchor(public_pem(dev_key))


def test_replaying_an_old_seal_with_an_old_package_is_still_a_rollback(
    device: Device, build_package: Callable[..., bytes], uuids: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    old = tmp_path_factory.mktemp("old")
    device.install(build_package("hello", sequence=1))
    device.boot()
    shutil.copy(device.root / "state" / "sealed.cose", old / "sealed.cose")
    shutil.copy(device.package_path(uuids["hello"]), old / "hello.suit")
    device.install(build_package("hello", sequence=2))
    device.boot()
    # The attacker restores both the old package and the old (genuinely MAC'd) seal.
    shutil.copy(old / "sealed.cose", device.root / "state" / "sealed.cose")
    shutil.copy(old / "hello.suit", device.package_path(uuids["hello"]))
    assert _verdicts(device)["hello"] == ("refused", "boot.rollback", None)
