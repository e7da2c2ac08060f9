"""Power cuts at every write point: the device comes back in the old state or the new one.

For each operation, a dry run with ``Faults()`` counts the fault points; then
for every N the operation runs on a fresh copy of the prepared device with
``Faults(cut_at=N)``, the power is "cut" (``PowerCut``), and the device is
re-opened without faults. Its counters, installed files and trust anchors
must equal exactly the state before or exactly the state after the
operation, no temporary file may remain, and the next boot must work.
"""

from __future__ import annotations

import shutil
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, public_pem, signer_id
from ism.device._atomic import Faults, PowerCut
from ism.device.virtual import Device
from ism.errors import UsageError
from ism.formats.downgrade import Downgrade

State = tuple[dict[str, int], dict[str, bytes], tuple[str, ...]]


def _state(root: Path) -> State:
    """Re-opens the device (which recovers from a crash) and reads its whole persistent state."""
    dev = Device(root)
    packages = {p.name: p.read_bytes() for p in sorted((root / "packages").iterdir())}
    anchors = tuple(sorted(signer_id(k).hex() for k in dev.anchors()))
    return dev.counters(), packages, anchors


def _boots_cleanly(root: Path) -> dict[str, int]:
    report = Device(root).boot()
    assert report.microservices
    assert all(e.verdict == "booted" for e in report.microservices), report
    return Device(root).counters()


@dataclass(frozen=True)
class Scenario:
    """A prepared device and an operation on it."""

    prepare: Callable[[Path], None]
    operation: Callable[[Device], Any]
    #: Intermediate states that are allowed besides old and new (documented per scenario).
    also_allowed: Callable[[State, State], list[State]] = lambda old, new: []


def _run_every_cut(scenario: Scenario, work: Path) -> None:
    template = work / "template"
    scenario.prepare(template)
    old = _state(template)

    probe = work / "probe"
    shutil.copytree(template, probe)
    faults = Faults()
    scenario.operation(Device(probe, faults))
    points = list(faults.points)
    new = _state(probe)
    counters_after_boot = _boots_cleanly(probe)
    assert points
    assert new != old
    allowed = [old, new, *scenario.also_allowed(old, new)]

    outcomes = set()
    for n in range(1, len(points) + 1):
        path = work / f"cut-{n}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut):
            scenario.operation(Device(path, Faults(cut_at=n)))
        after = _state(path)
        assert after in allowed, f"cut at point {n} ({points[n - 1]}) left a mixed state"
        assert not list(path.rglob("*.tmp")), points[n - 1]
        outcomes.add(allowed.index(after))
        # The next boot works, and converges to what the uninterrupted operation reaches.
        if after == new:
            assert _boots_cleanly(path) == counters_after_boot
        else:
            _boots_cleanly(path)
    assert 0 in outcomes, "a cut at the first point must leave the old state"
    assert len(outcomes) > 1, "some cuts must land after the commit point"


# -- scenarios -------------------------------------------------------------------------------------


@pytest.fixture
def builders(build_package: Callable[..., bytes], dev_key: PrivateKey) -> dict[str, Any]:
    def fresh(root: Path, *packages: bytes) -> Device:
        dev = Device.init(root)
        dev.add_anchor(public_pem(dev_key))
        for data in packages:
            dev.install(data)
        if packages:
            dev.boot()
        return dev

    return {"fresh": fresh, "build": build_package, "key": dev_key}


def _downgrade(key: PrivateKey, dev: Device, target: int, frm: int) -> bytes:
    ms = uuidlib.UUID("5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a01")  # hello
    return cose.sign1(Downgrade(ms, target, frm, dev.instance_id).encode(), key, kid=signer_id(key))


def test_install_of_a_new_package(builders: dict[str, Any], tmp_path: Path) -> None:
    fresh, build = builders["fresh"], builders["build"]
    hello = build("hello")
    _run_every_cut(
        Scenario(prepare=lambda root: fresh(root, build("echo")), operation=lambda dev: dev.install(hello)),
        tmp_path,
    )


def test_install_replacing_a_package(builders: dict[str, Any], tmp_path: Path) -> None:
    fresh, build = builders["fresh"], builders["build"]
    newer = build("hello", sequence=2, version="1.1.0")
    _run_every_cut(
        Scenario(
            prepare=lambda root: fresh(root, build("hello", sequence=1), build("blinky")),
            operation=lambda dev: dev.install(newer),
        ),
        tmp_path,
    )


def test_boot_that_advances_counters(builders: dict[str, Any], tmp_path: Path) -> None:
    fresh, build = builders["fresh"], builders["build"]

    def prepare(root: Path) -> None:
        dev = fresh(root, build("hello", sequence=1), build("echo"))
        dev.install(build("hello", sequence=5))
        dev.install(build("blinky", sequence=3))

    _run_every_cut(Scenario(prepare=prepare, operation=lambda dev: dev.boot()), tmp_path)


def test_add_anchor(builders: dict[str, Any], other_key: PrivateKey, tmp_path: Path) -> None:
    fresh, build = builders["fresh"], builders["build"]
    pem = public_pem(other_key)
    _run_every_cut(
        Scenario(prepare=lambda root: fresh(root, build("hello")), operation=lambda dev: dev.add_anchor(pem)),
        tmp_path,
    )


def test_install_with_downgrade(builders: dict[str, Any], tmp_path: Path) -> None:
    """Two files are written: the authorisation first, then the package.

    A cut between them leaves the old package beside the new authorisation.
    That state is harmless (the old package's sequence is not below the
    counter, so the authorisation is not consulted; and it only permits what
    a trust anchor signed for this device and counter), so it is allowed here.
    """
    fresh, build, key = builders["fresh"], builders["build"], builders["key"]
    older = build("hello", sequence=1)
    auth: list[bytes] = []  # signed once: ES256 signatures differ on every signing

    def prepare(root: Path) -> None:
        dev = fresh(root, build("hello", sequence=2))
        auth.append(_downgrade(key, dev, 1, 2))

    def operation(dev: Device) -> Any:
        return dev.install(older, downgrade=auth[0])

    def old_plus_auth(old: State, new: State) -> list[State]:
        counters, packages, anchors = old
        auth = {k: v for k, v in new[1].items() if k.endswith(".downgrade.cose")}
        assert auth
        return [(counters, {**packages, **auth}, anchors)]

    _run_every_cut(Scenario(prepare, operation, old_plus_auth), tmp_path)


def test_install_over_a_downgraded_package(builders: dict[str, Any], tmp_path: Path) -> None:
    """The package is replaced first, then the now-unneeded authorisation removed.

    A cut between them leaves the new package beside the stale authorisation,
    which the new package (at or above the counter) never consults.
    """
    fresh, build, key = builders["fresh"], builders["build"], builders["key"]
    newer = build("hello", sequence=3)

    def prepare(root: Path) -> None:
        dev = fresh(root, build("hello", sequence=2))
        dev.install(build("hello", sequence=1), downgrade=_downgrade(key, dev, 1, 2))
        dev.boot()
        assert any(p.name.endswith(".downgrade.cose") for p in (root / "packages").iterdir())

    def new_plus_stale_auth(old: State, new: State) -> list[State]:
        counters, packages, anchors = new
        auth = {k: v for k, v in old[1].items() if k.endswith(".downgrade.cose")}
        return [(counters, {**packages, **auth}, anchors)]

    _run_every_cut(Scenario(prepare, lambda dev: dev.install(newer), new_plus_stale_auth), tmp_path)


def test_device_init(tmp_path: Path) -> None:
    """Until device.json lands the directory is not a device, and init can simply run again."""
    probe_faults = Faults()
    Device.init(tmp_path / "probe", probe_faults)
    points = list(probe_faults.points)
    assert points
    outcomes = set()
    for n in range(1, len(points) + 1):
        root = tmp_path / f"cut-{n}"
        with pytest.raises(PowerCut):
            Device.init(root, Faults(cut_at=n))
        if (root / "device.json").exists():
            outcomes.add("new")
            dev = Device(root)
        else:
            outcomes.add("old")
            with pytest.raises(UsageError) as info:
                Device(root)
            assert info.value.rule == "device.missing"
            dev = Device.init(root)
        assert not list(root.rglob("*.tmp")), points[n - 1]
        assert (dev.counters(), dev.anchors(), dev.installed()) == ({}, [], [])
        assert len(dev.instance_id) == 33
        assert dev.boot().microservices == ()
    assert outcomes == {"old", "new"}


def test_storage_write_on_a_device(builders: dict[str, Any], tmp_path: Path) -> None:
    """A secure-storage write through the runtime's open_storage (the device's faults): at every cut the
    record is the old or the new one, the device boots, and the storage keeps working."""
    from ism.runtime import open_storage

    fresh, build = builders["fresh"], builders["build"]
    owner = uuidlib.UUID("6a1e2c3d-0000-4000-8000-00000000000a")

    def read(root: Path) -> bytes:
        with Device(root) as dev, open_storage(dev) as storage:
            return storage.get(owner, 1)

    def write(root: Path, data: bytes, faults: Faults | None = None) -> None:
        with Device(root, faults) as dev, open_storage(dev) as storage:
            storage.set(owner, 1, data)

    template = tmp_path / "template"
    fresh(template, build("hello"))
    write(template, b"old")
    probe = tmp_path / "probe"
    shutil.copytree(template, probe)
    faults = Faults()
    write(probe, b"new", faults)
    assert read(probe) == b"new"
    assert "storage:committed" in faults.points
    outcomes = set()
    for n in range(1, len(faults.points) + 1):
        path = tmp_path / f"cut-{n}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut):
            write(path, b"new", Faults(cut_at=n))
        value = read(path)
        assert value in (b"old", b"new"), faults.points[n - 1]
        outcomes.add(value)
        assert not list(path.rglob("*.tmp")), faults.points[n - 1]
        _boots_cleanly(path)
        write(path, b"after")
        assert read(path) == b"after"
    assert outcomes == {b"old", b"new"}
