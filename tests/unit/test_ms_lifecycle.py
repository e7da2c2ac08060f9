"""The per-microservice lifecycle: the transition table, the persisted records and their integrity."""

from __future__ import annotations

import functools
import itertools
import shutil
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path

import pytest

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, public_pem
from ism.device.microservices import (
    COUNTER,
    STATES,
    TRANSITIONS,
    LifecycleError,
    MicroserviceStates,
    attested_state,
    next_state,
)
from ism.device.virtual import Device
from ism.errors import ErrorCode, StateCorruptError, TrustError
from ism.formats import cbor
from ism.runtime import erase_microservice

# The table of docs/lifecycle.md, written out independently of the code: (from, action) -> to.
LEGAL = {
    (None, "install"): "installed",
    ("removed", "install"): "installed",
    ("installed", "start"): "active",
    ("installed", "suspend"): "suspended",
    ("active", "suspend"): "suspended",
    ("suspended", "resume"): "active",
    ("installed", "quarantine"): "quarantined",
    ("active", "quarantine"): "quarantined",
    ("suspended", "quarantine"): "quarantined",
    ("quarantined", "release"): "active",
    ("installed", "remove"): "removed",
    ("active", "remove"): "removed",
    ("suspended", "remove"): "removed",
    ("quarantined", "remove"): "removed",
    (None, "ban"): "banned",
    ("installed", "ban"): "banned",
    ("active", "ban"): "banned",
    ("suspended", "ban"): "banned",
    ("quarantined", "ban"): "banned",
    ("removed", "ban"): "banned",
}
ACTIONS = ("install", "start", "suspend", "resume", "quarantine", "release", "remove", "ban")


@pytest.mark.parametrize(("current", "action"), list(itertools.product((None, *STATES), ACTIONS)))
def test_transition_table(current: str | None, action: str) -> None:
    expected = LEGAL.get((current, action))
    if expected is not None:
        assert next_state(current, action) == expected
        return
    with pytest.raises(LifecycleError) as err:
        next_state(current, action, "ms")
    if current == "banned":
        rule = "ms-lifecycle.banned"
    elif current is None:
        rule = "ms-lifecycle.unknown"
    else:
        rule = "ms-lifecycle.transition"
    assert err.value.rule == rule
    assert isinstance(err.value, TrustError)
    assert err.value.code == ErrorCode.TRUST


def test_the_table_in_the_code_is_the_documented_one() -> None:
    assert set(TRANSITIONS) == set(ACTIONS)
    derived = {(s, a): t for a, (sources, t) in TRANSITIONS.items() for s in sources}
    assert derived == LEGAL
    with pytest.raises(LifecycleError, match="no lifecycle action"):
        next_state("active", "reboot")


def test_attested_state_prefers_the_persisted_restriction() -> None:
    assert attested_state("suspended", "active") == "suspended"
    assert attested_state("banned", None) == "banned"
    assert attested_state("active", "quarantined") == "quarantined"
    assert attested_state("installed", "active") == "active"
    assert attested_state("active", None) == "active"
    assert attested_state(None, None) == "installed"


# -- the persisted records ----------------------------------------------------------------------


@pytest.fixture
def hello(device: Device, build_package: Callable[..., bytes]) -> str:
    accepted = device.install(build_package("hello"))
    return str(accepted.package.meta.uuid)


def test_install_records_installed_and_transitions_persist(device: Device, hello: str) -> None:
    states = MicroserviceStates(device, clock=lambda: 1_700_000_000.0)
    first = states.get(hello)
    assert first is not None
    assert (first.state, first.reason, first.command) == ("installed", "install", None)
    digest = bytes(range(32))
    record = states.transition(hello, "suspend", "command: suspend", digest)
    assert (record.state, record.since, record.reason, record.command) == (
        "suspended",
        1_700_000_000,
        "command: suspend",
        digest,
    )
    reopened = MicroserviceStates(Device(device.root))
    assert reopened.get(hello) == record
    assert reopened.state(hello) == "suspended"
    # the restriction moved the counter to the file's generation
    assert Device(device.root).counters()[COUNTER] >= 1
    # the same command again changes nothing (idempotent after a power cut); another one is judged
    assert reopened.transition(hello, "suspend", "again", digest) == record
    with pytest.raises(LifecycleError) as err:
        reopened.transition(hello, "suspend", "again", bytes(32))
    assert err.value.rule == "ms-lifecycle.transition"
    assert reopened.transition(hello, "resume").state == "active"


def test_unknown_microservice_and_ban_of_an_unknown_uuid(device: Device, build_package: Callable[..., bytes]) -> None:
    states = MicroserviceStates(device)
    stranger = str(uuidlib.uuid4())
    with pytest.raises(LifecycleError) as err:
        states.transition(stranger, "suspend")
    assert err.value.rule == "ms-lifecycle.unknown"
    hello = str(uuidlib.UUID("5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a01"))
    assert states.transition(hello, "ban").state == "banned"  # the store bans it before it is ever installed
    with pytest.raises(LifecycleError) as err:
        device.install(build_package("hello"))
    assert err.value.rule == "ms-lifecycle.banned"
    assert not device.package_path(hello).exists()


def test_boot_holds_suspended_and_quarantined_and_refuses_removed(
    device: Device, build_package: Callable[..., bytes]
) -> None:
    ids = {n: str(device.install(build_package(n)).package.meta.uuid) for n in ("hello", "echo", "blinky")}
    states = MicroserviceStates(device)
    states.transition(ids["hello"], "suspend")
    states.transition(ids["echo"], "quarantine", "supervisor.crash-loop")
    report = device.boot()
    verdicts = {e.uuid: (e.verdict, e.rule) for e in report.microservices}
    assert verdicts == {
        ids["hello"]: ("held", "ms-lifecycle.suspended"),
        ids["echo"]: ("held", "ms-lifecycle.quarantined"),
        ids["blinky"]: ("booted", None),
    }
    assert [str(b.uuid) for b in report.accepted] == [ids["blinky"]]
    assert sorted(str(b.uuid) for b in report.held) == sorted([ids["hello"], ids["echo"]])
    assert report.to_json()["held"] == 2
    # held packages were verified all the same: their counters moved
    assert device.counters()[ids["hello"]] == 1

    # a removed microservice's package put back on flash is refused
    saved = device.package_path(ids["blinky"]).read_bytes()
    states.transition(ids["blinky"], "remove")
    device.forget_package(ids["blinky"])
    device.package_path(ids["blinky"]).write_bytes(saved)
    entry = next(e for e in device.boot().microservices if e.uuid == ids["blinky"])
    assert (entry.verdict, entry.rule) == ("refused", "ms-lifecycle.removed")


def test_reinstalling_a_removed_microservice_keeps_its_counter(
    device: Device, build_package: Callable[..., bytes]
) -> None:
    hello = str(device.install(build_package("hello", sequence=2)).package.meta.uuid)
    device.boot()
    states = MicroserviceStates(device)
    states.transition(hello, "remove")
    with pytest.raises(LifecycleError) as err:  # not until the removal is finished
        device.install(build_package("hello", sequence=2))
    assert err.value.rule == "ms-lifecycle.pending"
    assert states.roll_forward(functools.partial(erase_microservice, device)) == [hello]
    assert not device.package_path(hello).exists()
    with pytest.raises(TrustError) as err:
        device.install(build_package("hello", sequence=1))
    assert err.value.rule == "boot.rollback"
    device.install(build_package("hello", sequence=2))
    record = MicroserviceStates(device).get(hello)
    assert record is not None
    assert (record.state, record.reason) == ("installed", "reinstall")
    assert [e.verdict for e in device.boot().microservices] == ["booted"]


# -- integrity of the state file ------------------------------------------------------------------


def _suspended(device: Device, hello: str) -> Path:
    MicroserviceStates(device).transition(hello, "suspend")
    return device.root / "state" / "microservices.cose"


def _refused(root: Path, rule: str) -> None:
    with pytest.raises(StateCorruptError) as err:
        MicroserviceStates(Device(root)).load()
    assert err.value.rule == rule
    with pytest.raises(StateCorruptError) as err:
        Device(root).boot()
    assert err.value.rule == rule


def test_a_tampered_state_file_is_detected(device: Device, hello: str) -> None:
    path = _suspended(device, hello)
    data = path.read_bytes()
    for index in range(0, len(data), max(1, len(data) // 40)):
        flipped = bytearray(data)
        flipped[index] ^= 0x01
        path.write_bytes(bytes(flipped))
        _refused(device.root, "state.ms-lifecycle")
    path.write_bytes(data)
    assert MicroserviceStates(Device(device.root)).state(hello) == "suspended"


def test_a_well_macd_but_malformed_file_is_refused(device: Device, hello: str) -> None:
    path = _suspended(device, hello)
    good = cbor.loads(cose.parse(path.read_bytes(), expect="mac0").payload or b"")
    for bad in (
        {**good, 4: {hello: {1: "zombie", 2: 1, 3: "x"}}},
        {**good, 4: {hello: {1: "active", 2: 1, 3: "x", 5: True}}},  # erase pending on an active one
        {**good, 4: {"not-a-uuid": {1: "active", 2: 1, 3: "x"}}},
        {**good, 3: good[2] + 1},  # floor above the generation
        {**good, 1: 2},
    ):
        path.write_bytes(cose.mac0(cbor.dumps(bad), device.state_mac_key))
        _refused(device.root, "state.ms-lifecycle")


def test_a_state_file_from_another_device_is_refused(
    device: Device, hello: str, tmp_path: Path, dev_key: PrivateKey, build_package: Callable[..., bytes]
) -> None:
    path = _suspended(device, hello)
    other = Device.init(tmp_path / "other")
    other.add_anchor(public_pem(dev_key))
    other.install(build_package("hello"))
    (other.root / "state" / "microservices.cose").write_bytes(path.read_bytes())
    with pytest.raises(StateCorruptError) as err:
        other.boot()
    assert err.value.rule == "state.ms-lifecycle"


def test_an_older_copy_or_a_deleted_file_does_not_lift_a_restriction(device: Device, hello: str) -> None:
    path = device.root / "state" / "microservices.cose"
    before = path.read_bytes()  # from the install: hello installed, nothing restricted
    _suspended(device, hello)
    path.write_bytes(before)
    _refused(device.root, "state.ms-lifecycle-replay")
    path.unlink()
    _refused(device.root, "state.ms-lifecycle-missing")


def test_without_a_restriction_the_file_may_be_absent(device: Device, hello: str) -> None:
    (device.root / "state" / "microservices.cose").unlink()  # e.g. a device from before the lifecycle
    states = MicroserviceStates(Device(device.root))
    assert states.load() == {}
    assert states.state(hello) == "installed"
    assert [e.verdict for e in device.boot().microservices] == ["booted"]


def test_a_write_cut_before_its_counter_moved_rolls_the_counter_forward(device: Device, hello: str) -> None:
    """The file is written first, then the counter: a file ahead of the counter finishes the move."""
    states = MicroserviceStates(device)
    counters = device.root / "state" / "rollback.cose"
    old_counters = counters.read_bytes()
    states.transition(hello, "suspend")
    counters.write_bytes(old_counters)  # as if the power failed between the two writes
    assert COUNTER not in Device(device.root).counters()
    assert MicroserviceStates(Device(device.root)).state(hello) == "suspended"
    assert Device(device.root).counters()[COUNTER] >= 1  # rolled forward by the read


def test_state_survives_a_copy_of_the_device(device: Device, hello: str, tmp_path: Path) -> None:
    _suspended(device, hello)
    copy = tmp_path / "copy"
    shutil.copytree(device.root, copy)
    assert MicroserviceStates(Device(copy)).state(hello) == "suspended"


def test_a_full_table_refuses_an_install_before_the_package_is_written(
    device: Device, build_package: Callable[..., bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Otherwise the package would land without its record (a review finding)."""
    from ism.device import microservices

    monkeypatch.setattr(microservices, "MAX_RECORDS", 2)
    states = MicroserviceStates(device)
    for _ in range(2):
        states.transition(uuidlib.uuid4(), "ban")
    package = build_package("hello")
    with pytest.raises(LifecycleError) as err:
        device.install(package)
    assert err.value.rule == "ms-lifecycle.full"
    assert not list(device.root.joinpath("packages").glob("*.suit"))
