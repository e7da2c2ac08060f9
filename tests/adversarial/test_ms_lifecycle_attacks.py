"""Per-microservice lifecycle on the reference device: signed commands, who may sign them, what they do.

The fingerprint token is provisioned through the CLI, then given a vendor
and a store anchor. Every command is a real signed ``microservice`` command
(``ism.device.commands.sign_command``) applied through ``ism device
microservice``; effects are read back through the services, the boot report,
the runtime and attestation tokens. The power-cut tests cut at every write
point of every transition and check the device comes back in the old state
or the new one, and that applying the command again converges.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _malicious import FakeClock

from ism.cli.main import main
from ism.cli.microservice import LifecycleWatch
from ism.crypto import cose
from ism.crypto.attestation import verify_token
from ism.crypto.keys import PrivateKey, generate, load_private, pem_from_der, public_pem, read_public_pem
from ism.device._atomic import Faults, PowerCut
from ism.device.commands import sign_command
from ism.device.microservices import MicroserviceStates, apply_command
from ism.device.virtual import Device
from ism.errors import ErrorCode, IsmError, RollbackError, StateCorruptError
from ism.formats.command import Command, decode_command
from ism.hypervisor.supervisor import State
from ism.maintenance import decommission, factory_reset
from ism.runtime import Runtime, erase_microservice, open_storage
from ism.services.crypto import key_store_id

BIOMETRIC = uuidlib.UUID("a71f7f87-fecb-4cc4-bd29-c92ce146a9d1")
AUTHENTICATOR = uuidlib.UUID("efeaddc6-46ed-42b1-b68f-7c0d1cd7f69c")
LINK = uuidlib.UUID("f934149c-75bf-4236-9b14-16cf34b94bbc")
ANALYTICS = uuidlib.UUID("193cd08e-78fe-47d0-b3ee-50f90988a3bf")
NAMES = {BIOMETRIC: "biometric", AUTHENTICATOR: "authenticator", LINK: "link", ANALYTICS: "analytics"}


@dataclass
class Token:
    """The reference device with a vendor and a store anchor, and a command factory."""

    root: Path
    work: Path
    vendor: PrivateKey
    store: PrivateKey
    developer: PrivateKey
    sequence: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def command(
        self,
        ms: uuidlib.UUID,
        action: str,
        key: PrivateKey | None = None,
        sequence: int | None = None,
        instance: bytes | None = None,
        kind: str = "microservice",
    ) -> Path:
        seq = next(self.sequence) if sequence is None else sequence
        args: dict[str, Any] = {"uuid": ms.bytes, "action": action} if kind == "microservice" else {}
        command = Command(kind, instance or Device(self.root).instance_id, seq, args)
        path = self.work / f"cmd-{seq}-{action}-{os.urandom(4).hex()}.cose"
        path.write_bytes(sign_command(command, key or self.vendor))
        return path


@pytest.fixture
def token(tmp_path: Path, provision_token: Callable[..., Path]) -> Token:
    root = provision_token(tmp_path)
    vendor, store = generate("es256"), generate("es256")
    with Device(root) as dev:  # a fresh device is still being provisioned: anchors may be added
        dev.add_anchor(public_pem(vendor), role="vendor")
        dev.add_anchor(public_pem(store), role="store")
    work = tmp_path / "commands"
    work.mkdir()
    return Token(root, work, vendor, store, load_private(tmp_path / "dev.pem"))


def ism(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def apply(capsys: pytest.CaptureFixture[str], token: Token, command: Path) -> dict[str, Any]:
    status, out, err = ism(capsys, "device", "microservice", token.root, "--command", command, "--json")
    assert status == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def refused(capsys: pytest.CaptureFixture[str], token: Token, command: Path, code: int, rule: str) -> None:
    status, out, err = ism(capsys, "device", "microservice", token.root, "--command", command)
    assert status == (2 if code == ErrorCode.USAGE else 1)
    assert err.startswith(f"error: [{code} {rule}]"), err
    assert err.count("\n") == 1  # one line, no traceback
    assert "Traceback" not in err
    assert out == ""


def states(capsys: pytest.CaptureFixture[str], token: Token) -> dict[str, str]:
    status, out, err = ism(capsys, "device", "microservices", token.root, "--json")
    assert status == 0, err
    return {e["name"]: e["state"] for e in json.loads(out)["microservices"]}


def running(token: Token, clock: Callable[[], float] | None = None) -> Runtime:
    return Runtime.start(token.root, clock=clock) if clock is not None else Runtime.start(token.root)


def started_names(token: Token) -> dict[str, str]:
    runtime = running(token)
    try:
        return {ms.name: str(ms.state) for ms in runtime.supervisor.microservices.values()}
    finally:
        runtime.close()


def boot_entry(token: Token, ms: uuidlib.UUID) -> tuple[str, str | None]:
    entry = next(e for e in Device(token.root).boot().microservices if e.uuid == str(ms))
    return entry.verdict, entry.rule


# -- suspend / resume, quarantine / release -------------------------------------------------------


def test_suspend_stops_a_microservice_from_starting_until_resumed(
    token: Token, capsys: pytest.CaptureFixture[str]
) -> None:
    assert set(started_names(token)) == set(NAMES.values())
    assert set(states(capsys, token).values()) == {"active"}  # the first start made them active

    result = apply(capsys, token, token.command(LINK, "suspend"))
    assert (result["state"], result["reason"], result["action"]) == ("suspended", "command: suspend", "suspend")
    assert len(result["command"]) == 64
    listing = states(capsys, token)
    assert listing["link"] == "suspended"
    assert {v for k, v in listing.items() if k != "link"} == {"active"}

    assert boot_entry(token, LINK) == ("held", "ms-lifecycle.suspended")
    status, out, _ = ism(capsys, "device", "boot", token.root)
    assert status == 0
    assert "HELD" in out
    assert "ms-lifecycle.suspended" in out
    assert "link" not in started_names(token)

    # 'ism device run' does not start it either, and says why in its boot report
    status, out, err = ism(capsys, "device", "run", token.root, "--for", "0.2", "--json")
    assert status == 0, err
    run = json.loads(out)
    assert "link" not in {m["name"] for m in run["microservices"]}
    (entry,) = [e for e in run["boot"]["microservices"] if e["name"] == "link"]
    assert (entry["verdict"], entry["rule"]) == ("held", "ms-lifecycle.suspended")

    assert apply(capsys, token, token.command(LINK, "resume"))["state"] == "active"
    assert started_names(token)["link"] == "running"
    assert boot_entry(token, LINK) == ("booted", None)


def test_quarantine_and_release_by_command(token: Token, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply(capsys, token, token.command(BIOMETRIC, "quarantine"))["state"] == "quarantined"
    assert boot_entry(token, BIOMETRIC) == ("held", "ms-lifecycle.quarantined")
    assert "biometric" not in started_names(token)
    assert apply(capsys, token, token.command(BIOMETRIC, "release"))["state"] == "active"
    assert started_names(token)["biometric"] == "running"


def test_a_supervisor_quarantine_persists_over_a_reboot_until_released(
    token: Token, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    runtime = running(token, clock)
    try:
        sup = runtime.supervisor
        for _ in range(400):
            clock.advance(0.05)
            sup.step()
            if sup.by_name["analytics"].state is State.QUARANTINED:
                break
        assert sup.by_name["analytics"].state is State.QUARANTINED
        assert runtime.lifecycle is not None
        record = runtime.lifecycle.get(ANALYTICS)
        assert record is not None
        assert (record.state, record.reason, record.command) == ("quarantined", "supervisor.crash-loop", None)
    finally:
        runtime.close()

    # after a reboot: still quarantined, not started, and attested as such
    assert MicroserviceStates(Device(token.root)).state(ANALYTICS) == "quarantined"
    assert boot_entry(token, ANALYTICS) == ("held", "ms-lifecycle.quarantined")
    runtime = running(token)
    try:
        assert "analytics" not in runtime.supervisor.by_name
        assert _device_token_states(runtime)["analytics"] == "quarantined"
    finally:
        runtime.close()
    # an update does not lift it either; only an authorised release does
    refused(capsys, token, token.command(ANALYTICS, "resume"), ErrorCode.TRUST, "ms-lifecycle.transition")
    refused(capsys, token, token.command(ANALYTICS, "release", key=token.store), 204, "command.signer")
    assert apply(capsys, token, token.command(ANALYTICS, "release"))["state"] == "active"
    assert started_names(token)["analytics"] == "running"


# -- remove and ban ---------------------------------------------------------------------------


def _seed_secrets(token: Token) -> bytes:
    """Runs the device once (authenticator creates its key), stores a record for biometric and authenticator."""
    runtime = running(token)
    try:
        public = runtime.crypto.public_key(str(AUTHENTICATOR), "device-2fa")
        runtime.storage.set(BIOMETRIC, 1, b"enrolled template")
        runtime.storage.set(AUTHENTICATOR, 7, b"authenticator state")
    finally:
        runtime.close()
    return public


def _read_back(root: Path, ms: uuidlib.UUID, uid: int) -> bytes | str:
    with Device(root) as dev:
        storage = open_storage(dev)
        try:
            return storage.get(ms, uid)
        except IsmError as exc:
            return exc.rule
        finally:
            storage.close()


def _key(root: Path) -> bytes | str:
    with Device(root) as dev:
        try:
            return dev.keystore().public_key(key_store_id(str(AUTHENTICATOR), "device-2fa"))
        except IsmError as exc:
            return exc.rule


def test_remove_crypto_erases_storage_keys_package_and_sealed_record(
    token: Token, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    public = _seed_secrets(token)
    assert _read_back(token.root, BIOMETRIC, 1) == b"enrolled template"
    assert _key(token.root) == public
    counters = Device(token.root).counters()
    old_state = tmp_path / "old-state"
    shutil.copytree(token.root / "state", old_state)

    for ms in (BIOMETRIC, AUTHENTICATOR):
        result = apply(capsys, token, token.command(ms, "remove"))
        assert (result["state"], result["pending_erase"]) == ("removed", False)
    assert _read_back(token.root, BIOMETRIC, 1) == "storage.missing"
    assert _read_back(token.root, AUTHENTICATOR, 7) == "storage.missing"
    assert _key(token.root) == "keystore.missing"
    dev = Device(token.root)
    for ms in (BIOMETRIC, AUTHENTICATOR):
        assert not dev.package_path(ms).exists()
        assert str(ms) not in dev._load_sealed()
        assert dev.counters()[str(ms)] == counters[str(ms)]  # kept: no older version can come back
    assert set(started_names(token)) == {"link", "analytics"}

    # restoring the old storage files does not bring the template back: its key is gone
    for name in ("storage.sqlite", "storage-root.cose"):
        shutil.copy(old_state / name, token.root / "state" / name)
    for suffix in ("-wal", "-shm"):
        (token.root / "state" / f"storage.sqlite{suffix}").unlink(missing_ok=True)
    assert _read_back(token.root, BIOMETRIC, 1) != b"enrolled template"

    # a removed microservice put back on flash by hand is refused; reinstalled properly it starts afresh
    package = token.work.parent / "biometric.suit"
    shutil.copy(package, dev.package_path(BIOMETRIC))
    assert boot_entry(token, BIOMETRIC) == ("refused", "ms-lifecycle.removed")
    dev.package_path(BIOMETRIC).unlink()
    status, _, err = ism(capsys, "device", "install", token.root, package)
    assert status == 0, err
    assert states(capsys, token)["biometric"] == "installed"
    assert started_names(token)["biometric"] == "running"
    assert states(capsys, token)["biometric"] == "active"


def test_a_ban_by_the_store_is_final(token: Token, capsys: pytest.CaptureFixture[str]) -> None:
    _seed_secrets(token)
    result = apply(capsys, token, token.command(BIOMETRIC, "ban", key=token.store))
    assert result["state"] == "banned"
    assert _read_back(token.root, BIOMETRIC, 1) == "storage.missing"
    assert not Device(token.root).package_path(BIOMETRIC).exists()
    package = token.work.parent / "biometric.suit"
    status, _, err = ism(capsys, "device", "install", token.root, package)
    assert status == 1
    assert err.startswith("error: [200 ms-lifecycle.banned]"), err
    assert not Device(token.root).package_path(BIOMETRIC).exists()
    shutil.copy(package, Device(token.root).package_path(BIOMETRIC))  # put back on flash by hand
    assert boot_entry(token, BIOMETRIC) == ("refused", "ms-lifecycle.banned")
    assert "biometric" not in started_names(token)
    for action in ("release", "resume", "remove", "ban"):
        refused(capsys, token, token.command(BIOMETRIC, action), ErrorCode.TRUST, "ms-lifecycle.banned")

    # the vendor may ban too, and a UUID the device never had can be banned ahead of time
    stranger = uuidlib.uuid4()
    assert apply(capsys, token, token.command(stranger, "ban"))["state"] == "banned"
    assert states(capsys, token)["biometric"] == "banned"


# -- who may command, and what --------------------------------------------------------------------


def test_unauthorised_commands_change_nothing(
    token: Token, capsys: pytest.CaptureFixture[str], tmp_path: Path, provision_token: Callable[..., Path]
) -> None:
    before = states(capsys, token)
    counters = Device(token.root).counters()
    other = tmp_path / "other"
    other.mkdir()
    other_root = provision_token(other)
    cases = [
        # the microservice developer's key is trusted for packages, not for commands
        (token.command(LINK, "suspend", key=token.developer), 204, "command.signer"),
        # the store may ban, nothing else
        (token.command(LINK, "suspend", key=token.store), 204, "command.signer"),
        (token.command(LINK, "remove", key=token.store), 204, "command.signer"),
        (token.command(LINK, "suspend", key=generate("es256")), 204, "command.signer"),
        # made for another device
        (token.command(LINK, "suspend", instance=Device(other_root).instance_id), 200, "command.device"),
        # a command of another kind
        (token.command(LINK, "suspend", kind="factory-reset"), 400, "command.kind"),
    ]
    for command, code, rule in cases:
        refused(capsys, token, command, code, rule)
    bad = token.work / "garbage.cose"
    bad.write_bytes(b"\xa0" * 40)
    refused(capsys, token, bad, 100, "command.format")
    assert states(capsys, token) == before
    assert Device(token.root).counters() == counters

    # a genuine command works once; replayed (or an older one) it is refused
    suspend = token.command(LINK, "suspend", sequence=5)
    apply(capsys, token, suspend)
    resume_old = token.command(LINK, "resume", sequence=4)
    refused(capsys, token, suspend, 203, "command.replay")
    refused(capsys, token, resume_old, 203, "command.replay")
    assert states(capsys, token)["link"] == "suspended"


def test_illegal_transitions_are_refused_and_consume_nothing(token: Token, capsys: pytest.CaptureFixture[str]) -> None:
    started_names(token)  # all active
    refused(capsys, token, token.command(LINK, "resume", sequence=1), 200, "ms-lifecycle.transition")
    refused(capsys, token, token.command(LINK, "release", sequence=1), 200, "ms-lifecycle.transition")
    refused(capsys, token, token.command(uuidlib.uuid4(), "suspend", sequence=1), 200, "ms-lifecycle.unknown")
    # nothing was consumed: a legal command with the same sequence still applies
    assert apply(capsys, token, token.command(LINK, "suspend", sequence=1))["state"] == "suspended"
    refused(capsys, token, token.command(LINK, "suspend", sequence=2), 200, "ms-lifecycle.transition")
    refused(capsys, token, token.command(LINK, "release", sequence=2), 200, "ms-lifecycle.transition")
    assert apply(capsys, token, token.command(LINK, "remove", sequence=2))["state"] == "removed"
    refused(capsys, token, token.command(LINK, "remove", sequence=3), 200, "ms-lifecycle.transition")
    refused(capsys, token, token.command(LINK, "resume", sequence=3), 200, "ms-lifecycle.transition")


# -- attestation ----------------------------------------------------------------------------------


def _device_token_states(runtime: Runtime) -> dict[str, str]:
    nonce = os.urandom(32)
    key = read_public_pem(pem_from_der(runtime.attestation.public_key_der))
    claims = verify_token(runtime.attestation.device_token(nonce), key, nonce=nonce).claims
    return {m.name: m.lifecycle for m in claims.submods}


def test_the_lifecycle_is_attested(token: Token, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    started_names(token)
    apply(capsys, token, token.command(LINK, "suspend"))
    apply(capsys, token, token.command(BIOMETRIC, "quarantine"))
    runtime = running(token)
    try:
        assert _device_token_states(runtime) == {
            "link": "suspended",
            "biometric": "quarantined",
            "authenticator": "active",
            "analytics": "active",
        }
        nonce = os.urandom(32)
        key = read_public_pem(pem_from_der(runtime.attestation.public_key_der))
        for ms, lifecycle in ((LINK, "suspended"), (AUTHENTICATOR, "active")):
            own = verify_token(runtime.attestation.microservice_token(ms, nonce), key, nonce=nonce).claims
            assert own.microservice is not None
            assert (own.microservice.name, own.microservice.lifecycle) == (NAMES[ms], lifecycle)
    finally:
        runtime.close()

    # 'ism device attest' (no runtime) reads the persisted states too
    nonce_hex = os.urandom(32).hex()
    out = tmp_path / "token.cbor"
    status, _, err = ism(capsys, "device", "attest", token.root, "--nonce", nonce_hex, "--out", out)
    assert status == 0, err
    iak = read_public_pem((token.root / "keys" / "iak.pub.pem").read_bytes())
    claims = verify_token(out.read_bytes(), iak, nonce=bytes.fromhex(nonce_hex)).claims
    assert {m.name: m.lifecycle for m in claims.submods}["link"] == "suspended"
    assert {m.name: m.lifecycle for m in claims.submods}["biometric"] == "quarantined"


# -- power cuts -----------------------------------------------------------------------------------

Observed = tuple[str | None, bool, bytes | str, bytes | str]


def _observe(root: Path, ms: uuidlib.UUID) -> Observed:
    """Reopens the device (finishing an interrupted removal) and reads what matters about ``ms``."""
    dev = Device(root)
    MicroserviceStates(dev).roll_forward(functools.partial(erase_microservice, dev))
    uid = 1 if ms == BIOMETRIC else 7
    key = _key(root) if ms == AUTHENTICATOR else b""
    return MicroserviceStates(Device(root)).state(ms), dev.package_path(ms).exists(), _read_back(root, ms, uid), key


def _apply(root: Path, command: bytes, faults: Faults | None = None) -> None:
    dev = Device(root, faults)
    apply_command(dev, command, functools.partial(erase_microservice, dev))


def _every_cut(template: Path, work: Path, ms: uuidlib.UUID, command: bytes) -> None:
    sequence = decode_command(cose.parse(command).payload or b"").sequence
    old_copy = work / "old"
    shutil.copytree(template, old_copy)
    old = _observe(old_copy, ms)
    probe = work / "probe"
    shutil.copytree(template, probe)
    faults = Faults()
    _apply(probe, command, faults)
    points = list(faults.points)
    new = _observe(probe, ms)
    assert points
    assert new != old
    outcomes = set()
    for n in range(1, len(points) + 1):
        path = work / f"cut-{n}"
        shutil.copytree(template, path)
        with pytest.raises(PowerCut):
            _apply(path, command, Faults(cut_at=n))
        after = _observe(path, ms)
        assert after in (old, new), f"cut at point {n} ({points[n - 1]}) left {after}"
        assert not list(path.rglob("*.tmp")), points[n - 1]
        outcomes.add(after == new)
        # the vendor sends the command again: it finishes, or is refused because it already took effect
        counters = Device(path).counters()  # the vendor's counter, or the store's for a store-signed ban
        moved = max(counters.get("command.microservice", 0), counters.get("command.microservice.store", 0))
        if after == new and moved >= sequence:
            with pytest.raises(RollbackError) as err:
                _apply(path, command)
            assert err.value.rule == "command.replay"
        else:
            _apply(path, command)
        assert _observe(path, ms) == new, points[n - 1]
        boot = Device(path).boot()
        assert all(e.verdict != "refused" for e in boot.microservices), boot
        shutil.rmtree(path)
    assert outcomes == {False, True}, "cuts must land before and after the commit point"


@pytest.mark.parametrize(
    ("prior", "action", "ms"),
    [
        ((), "suspend", BIOMETRIC),
        (("suspend",), "resume", BIOMETRIC),
        ((), "quarantine", BIOMETRIC),
        (("quarantine",), "release", BIOMETRIC),
        ((), "remove", AUTHENTICATOR),
        (("suspend",), "remove", BIOMETRIC),
        ((), "ban", AUTHENTICATOR),
    ],
    ids=["suspend", "resume", "quarantine", "release", "remove", "remove-suspended", "ban"],
)
def test_power_cut_at_every_write_point_of_a_transition(
    token: Token, tmp_path: Path, prior: tuple[str, ...], action: str, ms: uuidlib.UUID
) -> None:
    _seed_secrets(token)
    for step in prior:
        _apply(token.root, token.command(ms, step).read_bytes())
    key = token.store if action == "ban" else token.vendor
    command = token.command(ms, action, key=key).read_bytes()
    _every_cut(token.root, tmp_path / "cuts", ms, command)


def test_power_cut_while_reinstalling_a_removed_microservice(token: Token, tmp_path: Path) -> None:
    """The package is written first, then the record: a cut between leaves the old state (removed) plus a
    package that boot refuses (``ms-lifecycle.removed``) until the install is run again."""
    _apply(token.root, token.command(BIOMETRIC, "remove").read_bytes())
    package = (token.work.parent / "biometric.suit").read_bytes()
    probe = tmp_path / "probe"
    shutil.copytree(token.root, probe)
    faults = Faults()
    Device(probe, faults).install(package)
    points = list(faults.points)
    seen = set()
    for n in range(1, len(points) + 1):
        path = tmp_path / f"cut-{n}"
        shutil.copytree(token.root, path)
        with pytest.raises(PowerCut):
            Device(path, Faults(cut_at=n)).install(package)
        state = MicroserviceStates(Device(path)).state(BIOMETRIC)
        assert state in ("removed", "installed"), points[n - 1]
        verdict = boot_entry_at(path, BIOMETRIC)
        assert verdict in (None, ("refused", "ms-lifecycle.removed"), ("booted", None)), (points[n - 1], verdict)
        assert (state == "installed") == (verdict == ("booted", None))
        seen.add(state)
        Device(path).install(package)  # run again: it completes
        assert MicroserviceStates(Device(path)).state(BIOMETRIC) == "installed"
        assert boot_entry_at(path, BIOMETRIC) == ("booted", None)
        shutil.rmtree(path)
    assert seen == {"removed", "installed"}


def boot_entry_at(root: Path, ms: uuidlib.UUID) -> tuple[str, str | None] | None:
    entries = [e for e in Device(root).boot().microservices if e.uuid == str(ms)]
    return (entries[0].verdict, entries[0].rule) if entries else None


def test_power_cut_while_the_supervisor_quarantines(token: Token, tmp_path: Path) -> None:
    """The runtime persists a crash-loop quarantine with the same write as a command's: old or new, never half."""
    started_names(token)
    probe = tmp_path / "probe"
    shutil.copytree(token.root, probe)
    faults = Faults()
    MicroserviceStates(Device(probe, faults)).transition(ANALYTICS, "quarantine", "supervisor.crash-loop")
    points = list(faults.points)
    assert points
    seen = set()
    for n in range(1, len(points) + 1):
        path = tmp_path / f"cut-{n}"
        shutil.copytree(token.root, path)
        with pytest.raises(PowerCut):
            MicroserviceStates(Device(path, Faults(cut_at=n))).transition(
                ANALYTICS, "quarantine", "supervisor.crash-loop"
            )
        state = MicroserviceStates(Device(path)).state(ANALYTICS)
        assert state in ("active", "quarantined")
        seen.add(state)
        # once quarantined, an old copy of the file cannot lift it: the counter moved (or rolls forward now)
        if state == "quarantined":
            original = (token.root / "state" / "microservices.cose").read_bytes()
            (path / "state" / "microservices.cose").write_bytes(original)
            with pytest.raises(StateCorruptError) as err:
                MicroserviceStates(Device(path)).load()
            assert err.value.rule == "state.ms-lifecycle-replay"
        shutil.rmtree(path)
    assert seen == {"active", "quarantined"}


# -- with the vendor's tool, and with the device lifecycle ----------------------------------------


def test_commands_made_by_the_vendor_tool(tmp_path: Path, provision_token: Callable[..., Path]) -> None:
    """``ism provision command microservice`` makes what ``ism device microservice`` applies (locked device)."""
    root = provision_token(tmp_path, lock=True)  # the vendor key is tmp_path/vendor.pem
    cmd = tmp_path / "suspend.cose"
    argv = ["provision", "command", "microservice", "--uuid", str(LINK), "--action", "suspend"]
    assert main([*argv, "--sign", str(tmp_path / "vendor.pem"), "--device", str(root), "--out", str(cmd)]) == 0
    assert main(["device", "microservice", str(root), "--command", str(cmd)]) == 0
    assert MicroserviceStates(Device(root)).state(LINK) == "suspended"
    assert main(["device", "microservice", str(root), "--command", str(cmd)]) == 1  # replayed


def test_factory_reset_removes_every_microservice_but_keeps_bans(
    tmp_path: Path, provision_token: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root = provision_token(tmp_path, lock=True)
    vendor = load_private(tmp_path / "vendor.pem")
    token = Token(root, tmp_path, vendor, vendor, load_private(tmp_path / "dev.pem"))
    started_names(token)
    apply(capsys, token, token.command(LINK, "suspend"))
    apply(capsys, token, token.command(ANALYTICS, "ban"))
    instance = Device(root).instance_id
    factory_reset(Device(root), sign_command(Command("factory-reset", instance, 1, {}), vendor))
    assert states(capsys, token) == {
        "biometric": "removed",
        "authenticator": "removed",
        "link": "removed",
        "analytics": "banned",  # names are kept in the records: no package is left to read them from
    }
    # reinstalled after the reset, a microservice starts afresh; the banned one stays out
    for name in ("link", "biometric"):
        status, _, err = ism(capsys, "device", "install", root, tmp_path / f"{name}.suit")
        assert status == 0, err
    status, _, err = ism(capsys, "device", "install", root, tmp_path / "analytics.suit")
    assert status == 1
    assert err.startswith("error: [200 ms-lifecycle.banned]")
    assert states(capsys, token)["link"] == "installed"

    # decommissioned: nothing about microservices is answered or changed any more
    decommission(Device(root), sign_command(Command("decommission", instance, 1, {}), vendor))
    status, _, err = ism(capsys, "device", "microservices", root)
    assert status == 1
    assert err.startswith("error: [200 lifecycle.decommissioned]")
    refused(capsys, token, token.command(LINK, "resume"), 200, "lifecycle.decommissioned")
    with pytest.raises(IsmError) as err_info:
        Runtime.start(root)
    assert err_info.value.rule == "lifecycle.decommissioned"


# -- on a running device --------------------------------------------------------------------------


def test_commands_take_effect_on_a_running_device(token: Token, capsys: pytest.CaptureFixture[str]) -> None:
    apply(capsys, token, token.command(BIOMETRIC, "suspend"))  # held at boot
    runtime = running(token)
    try:
        sup, watch = runtime.supervisor, LifecycleWatch(runtime, quiet=True)
        assert "biometric" not in sup.by_name
        assert watch.check() is None  # nothing changed yet
        # 'ism device microservice' from another process while the device runs
        apply(capsys, token, token.command(LINK, "suspend"))
        apply(capsys, token, token.command(AUTHENTICATOR, "quarantine"))
        assert watch.check() == {"stopped": ["authenticator", "link"], "started": []}
        assert (sup.by_name["link"].state, sup.by_name["authenticator"].state) == (State.STOPPED, State.QUARANTINED)
        assert sup.by_name["link"].sandbox is None
        sup.step()
        states_now = _device_token_states(runtime)
        assert (states_now["link"], states_now["authenticator"]) == ("suspended", "quarantined")

        apply(capsys, token, token.command(LINK, "resume"))
        apply(capsys, token, token.command(AUTHENTICATOR, "release"))
        apply(capsys, token, token.command(BIOMETRIC, "resume"))
        outcome = watch.check()
        assert outcome is not None
        assert sorted(outcome["started"]) == ["authenticator", "biometric", "link"]
        assert {sup.by_name[n].state for n in ("link", "authenticator", "biometric")} == {State.RUNNING}
        assert _device_token_states(runtime)["biometric"] == "active"
        nonce = os.urandom(32)  # the microservice boot held is registered with the services too
        key = read_public_pem(pem_from_der(runtime.attestation.public_key_der))
        own = verify_token(runtime.attestation.microservice_token(BIOMETRIC, nonce), key, nonce=nonce).claims
        assert own.microservice is not None
        assert own.microservice.lifecycle == "active"
    finally:
        runtime.close()


def test_ism_device_run_applies_a_command_given_while_it_runs(token: Token) -> None:
    """Two processes: 'ism device run' and, meanwhile, 'ism device microservice'."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ism.cli.main", "device", "run", str(token.root), "--for", "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: [lines.put(line) for line in stdout], daemon=True)
    reader.start()
    seen: list[str] = []

    def wait_for(text: str, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                line = lines.get(timeout=0.1)
            except queue.Empty:
                continue
            seen.append(line)
            if text in line:
                return
        raise AssertionError(f"{text!r} not seen in {seen}")

    try:
        wait_for("running 4 microservice(s)")
        assert main(["device", "microservice", str(token.root), "--command", str(token.command(LINK, "suspend"))]) == 0
        wait_for("microservice lifecycle applied (stopped: link)")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    while not lines.empty():
        seen.append(lines.get_nowait())
    output = "".join(seen)
    assert re.search(r"^\s+link\s+stopped\b", output, flags=re.MULTILINE), output


def test_a_store_ban_cannot_use_up_the_vendors_sequence_space(capsys: pytest.CaptureFixture[str], token: Token) -> None:
    """Store and vendor commands are ordered by counters of their own (a review finding)."""
    highest = (1 << 63) - 1
    apply(capsys, token, token.command(uuidlib.uuid4(), "ban", key=token.store, sequence=highest))
    apply(capsys, token, token.command(ANALYTICS, "suspend", sequence=1))  # the vendor still commands
    assert states(capsys, token)["analytics"] == "suspended"
    with Device(token.root) as dev:
        assert dev.counters()["command.microservice"] == 1
        assert dev.counters()["command.microservice.store"] == highest
    replay = token.command(uuidlib.uuid4(), "ban", key=token.store, sequence=highest)
    refused(capsys, token, replay, ErrorCode.ROLLBACK, "command.replay")


def test_preemptive_bans_have_a_quota_of_their_own(
    capsys: pytest.CaptureFixture[str], token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bans of microservices the device never had cannot fill the table and block installs (a review finding)."""
    from ism.device import microservices

    monkeypatch.setattr(microservices, "MAX_PREEMPTIVE_BANS", 3)
    for _ in range(3):
        apply(capsys, token, token.command(uuidlib.uuid4(), "ban", key=token.store))
    refused(capsys, token, token.command(uuidlib.uuid4(), "ban", key=token.store), ErrorCode.TRUST, "ms-lifecycle.full")
    apply(capsys, token, token.command(ANALYTICS, "ban", key=token.store))  # one it has still counts as usual
    assert states(capsys, token)["analytics"] == "banned"
