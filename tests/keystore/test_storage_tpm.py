"""Secure storage bound to a TPM NV counter (swtpm): a replayed storage directory is refused, power cuts recover.

Device-level tests make a TPM-backed device (``ism device init --keystore tpm``)
and open its storage through :func:`ism.runtime.open_storage`, which binds the
root to the storage's own NV counter. The power-cut sweeps use a
:class:`SecureStorage` over a software key store in a temporary directory and
one real NV counter of the session's swtpm: a fresh storage binds to whatever
value the counter has, so every run starts from a freshly prepared storage
(copies of one storage would share the counter and so be replays of each other).
"""

from __future__ import annotations

import gc
import secrets
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _swtpm import Swtpm

from _storage import StorageEnv
from ism.cli.main import main
from ism.crypto import cose
from ism.crypto.keystore.tpm import TpmCounter, TpmKeyStore
from ism.device._atomic import Faults, PowerCut
from ism.device.virtual import Device
from ism.errors import IsmError, StateCorruptError
from ism.formats import cbor
from ism.runtime import open_storage
from ism.services.storage import NO_REPLAY_PROTECTION, WRITE_ONCE, SecureStorage

A = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000a")
B = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000b")
C = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000c")
OWNERS = (A, B, C)


def expect(exc_type: type[IsmError], rule: str) -> Any:
    return pytest.raises(exc_type, match=rf"\[\d+ {rule}\]")


# -- a TPM-backed device ---------------------------------------------------------------------------


@pytest.fixture
def tpm_root(swtpm: Swtpm, tmp_path: Path) -> Iterator[Path]:
    """A TPM-backed device's directory. Every Device opened on it must be closed (few TPM session slots)."""
    root = tmp_path / "device"
    assert main(["device", "init", str(root), "--keystore", "tpm", "--tpm-tcti", swtpm.tcti]) == 0
    yield root
    gc.collect()


def _set(root: Path, uid: int, data: bytes, faults: Faults | None = None) -> None:
    with Device(root, faults) as device, open_storage(device) as storage:
        storage.set(A, uid, data)


def _get(root: Path, uid: int) -> bytes:
    with Device(root) as device, open_storage(device) as storage:
        return storage.get(A, uid)


def _replay_state(root: Path, saved: Path) -> None:
    """Puts a copy of the device's state directory back (storage database, its side files and root)."""
    shutil.rmtree(root / "state")
    shutil.copytree(saved, root / "state")


def test_replaying_the_storage_directory_is_refused_with_the_tpm(tpm_root: Path, tmp_path: Path) -> None:
    _set(tpm_root, 1, b"PIN tries left: 3")
    saved = tmp_path / "state-copy"
    shutil.copytree(tpm_root / "state", saved)
    _replay_state(tpm_root, saved)  # nothing written since the copy: it is the current state
    assert _get(tpm_root, 1) == b"PIN tries left: 3"

    _set(tpm_root, 1, b"PIN tries left: 2")
    _replay_state(tpm_root, saved)
    with Device(tpm_root) as device, expect(StateCorruptError, "storage.rollback-replay"):
        open_storage(device)


def test_without_a_tpm_the_same_replay_is_the_documented_limit(device: Device, tmp_path: Path) -> None:
    """The contrast: a software device cannot tell a replayed storage directory (module docstring)."""
    root = device.root
    _set(root, 1, b"PIN tries left: 3")
    saved = tmp_path / "state-copy"
    shutil.copytree(root / "state", saved)
    _set(root, 1, b"PIN tries left: 2")
    _replay_state(root, saved)
    assert _get(root, 1) == b"PIN tries left: 3"


def _points(root: Path, data: bytes) -> list[str]:
    """The fault points of one set on the device (a real write: copies would share the TPM counter)."""
    faults = Faults()
    _set(root, 1, data, faults)
    return faults.points


def test_a_power_cut_between_the_root_and_the_counter_recovers(tpm_root: Path, tmp_path: Path) -> None:
    _set(tpm_root, 1, b"v0")  # the first set also creates the key and the root
    points = _points(tpm_root, b"v1")
    before = tmp_path / "before"
    shutil.copytree(tpm_root / "state", before)
    with pytest.raises(PowerCut):  # root and commit durable, the counter not moved
        _set(tpm_root, 1, b"v2", Faults(cut_at=points.index("storage:counter") + 1))
    cut = tmp_path / "cut"
    shutil.copytree(tpm_root / "state", cut)
    for _ in range(2):  # the first open finishes the increment; the state then stays consistent
        assert _get(tpm_root, 1) == b"v2"
    # The files as the power cut left them hold the new value: putting them back brings nothing older.
    _replay_state(tpm_root, cut)
    assert _get(tpm_root, 1) == b"v2"
    # The state from before the write is a replay.
    _replay_state(tpm_root, before)
    with Device(tpm_root) as device, expect(StateCorruptError, "storage.rollback-replay"):
        open_storage(device)


def test_a_power_cut_before_the_commit_keeps_the_old_value(tpm_root: Path) -> None:
    _set(tpm_root, 1, b"v0")
    points = _points(tpm_root, b"v1")
    with pytest.raises(PowerCut):
        _set(tpm_root, 1, b"v2", Faults(cut_at=points.index("storage:commit") + 1))
    for _ in range(2):
        assert _get(tpm_root, 1) == b"v1"
    _set(tpm_root, 1, b"v3")
    assert _get(tpm_root, 1) == b"v3"


def test_erase_then_a_replayed_directory(tpm_root: Path, tmp_path: Path) -> None:
    with Device(tpm_root) as device, open_storage(device) as storage:
        storage.set(A, 1, b"secret")
    saved = tmp_path / "saved"
    shutil.copytree(tpm_root / "state", saved)
    with Device(tpm_root) as device, open_storage(device) as storage:
        storage.erase(A)
    _replay_state(tpm_root, saved)
    with Device(tpm_root) as device, expect(StateCorruptError, "storage.rollback-replay"):
        open_storage(device)
    with Device(tpm_root) as device:
        assert not device.keystore().exists(f"storage.{A}")


# -- the storage on one NV counter: every power cut --------------------------------------------------


def bound_env(path: Path, counter: TpmCounter) -> StorageEnv:
    """A storage directory (software key store) whose root is bound to ``counter``."""
    return StorageEnv(path, counter).create()


@pytest.fixture(scope="module")
def counter(swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmCounter]:
    """One NV counter of the session's swtpm (an index no device of this session uses)."""
    store = TpmKeyStore(swtpm.tcti, tmp_path_factory.mktemp("storage-counter"))
    yield store.counter(0x01530000 + secrets.randbelow(0x10000))
    store.close()


State = dict[tuple[str, int], tuple[bytes, int]]


def read_all(env: StorageEnv, faults: Faults | None = None) -> State:
    with env.open(faults) as st:
        return {(str(o), uid): (st.get(o, uid), st.get_info(o, uid).flags) for o in OWNERS for uid in st.uids(o)}


def prepare(env: StorageEnv) -> None:
    with env.open() as st:
        st.set(A, 1, b"old value")
        st.set(A, 2, b"write once", flags=WRITE_ONCE)
        st.set(A, 3, b"replayable", flags=NO_REPLAY_PROTECTION)
        st.set(B, 1, b"B's value")


OPERATIONS: dict[str, Callable[[SecureStorage], None]] = {
    "set-replace": lambda st: st.set(A, 1, b"new value"),
    "set-new-owner": lambda st: st.set(C, 1, b"C's first record"),
    "remove": lambda st: st.remove(A, 1),
    "erase": lambda st: st.erase(A),
}
OLD: State = {
    (str(A), 1): (b"old value", 0),
    (str(A), 2): (b"write once", WRITE_ONCE),
    (str(A), 3): (b"replayable", NO_REPLAY_PROTECTION),
    (str(B), 1): (b"B's value", 0),
}
NEW: dict[str, State] = {
    "set-replace": {**OLD, (str(A), 1): (b"new value", 0)},
    "set-new-owner": {**OLD, (str(C), 1): (b"C's first record", 0)},
    "remove": {k: v for k, v in OLD.items() if k != (str(A), 1)},
    "erase": {k: v for k, v in OLD.items() if k[0] != str(A)},
}


def run_op(op: Callable[[SecureStorage], None]) -> Callable[[StorageEnv, Faults], None]:
    def run(env: StorageEnv, faults: Faults) -> None:
        with env.open(faults) as st:
            op(st)

    return run


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_power_cut_at_every_point_with_a_counter(tmp_path: Path, counter: TpmCounter, operation: str) -> None:
    op = OPERATIONS[operation]
    run = run_op(op)
    dry = bound_env(tmp_path / "dry", counter)
    prepare(dry)
    faults = Faults()  # counted as the runs below go: the open (which settles prepare's last root), then op
    with dry.open(faults) as st:
        at = counter.read()
        op(st)
        assert counter.read() == at + 1  # one increment per write
    points = faults.points
    assert "storage:counter" in points
    after_commit = points[points.index("storage:committed") :]
    assert not any(p.endswith(":slot-begin") for p in after_commit)  # the counter replaces the settling root
    assert not any(p.endswith(":dir-synced") for p in points)
    assert read_all(dry) == NEW[operation]

    outcomes = set()
    for n in range(1, len(points) + 1):
        recovery = 1
        m = 0
        while m < recovery:  # m = 0: recover without a fault; then a second cut at each recovery point
            env = bound_env(tmp_path / f"cut-{n}-{m}", counter)
            prepare(env)
            with pytest.raises(PowerCut):  # the open settles the root left by prepare(): its points count too
                run(env, Faults(cut_at=n))
            if m:
                with pytest.raises(PowerCut):
                    env.open(Faults(cut_at=m))
            recovered = Faults()
            state = read_all(env, recovered)
            if m == 0:
                recovery = len(recovered.points) + 1
            assert state in (OLD, NEW[operation]), (points[n - 1], m)
            outcomes.add("new" if state == NEW[operation] else "old")
            if operation == "erase" and state == NEW[operation]:
                assert not env.keystore().exists(f"storage.{A}")
            with env.open() as st:  # usable afterwards, and still bound: the next write moves the counter
                at = counter.read()
                st.set(C, 99, b"after the crash")
                assert counter.read() == at + 1
            assert read_all(env)[(str(C), 99)] == (b"after the crash", 0)
            assert not list(env.path.glob("*.tmp"))
            shutil.rmtree(env.path)
            m += 1
    assert outcomes == {"old", "new"}


def test_an_older_root_with_its_database_is_refused(tmp_path: Path, counter: TpmCounter) -> None:
    env = bound_env(tmp_path / "env", counter)
    with env.open() as st:
        st.set(A, 1, b"v1")
    saved = tmp_path / "saved"
    shutil.copytree(env.path, saved)
    with env.open() as st:
        st.set(A, 1, b"v2")
    shutil.rmtree(env.path)
    shutil.copytree(saved, env.path)
    with expect(StateCorruptError, "storage.rollback-replay"):
        env.open()


def test_the_counter_moved_by_someone_else(tmp_path: Path, counter: TpmCounter) -> None:
    env = bound_env(tmp_path / "env", counter)
    with env.open() as st:
        st.set(A, 1, b"v1")
        counter.increment()  # under the running storage: its next write binds the root where the counter is
        st.set(A, 1, b"v2")
    assert read_all(env) == {(str(A), 1): (b"v2", 0)}
    counter.increment()  # while it is closed: indistinguishable from a replayed copy
    with expect(StateCorruptError, "storage.rollback-replay"):
        env.open()


def test_bound_and_unbound_roots_are_not_interchangeable(tmp_path: Path, counter: TpmCounter) -> None:
    bound = bound_env(tmp_path / "bound", counter)
    with bound.open() as st:
        st.set(A, 1, b"bound")
    with expect(StateCorruptError, "storage.root"):
        bound.open(counter=False)  # a counter-bound root opened without its counter
    unbound = bound_env(tmp_path / "unbound", counter)
    with unbound.open(counter=False) as st:
        st.set(A, 1, b"unbound")
    with expect(StateCorruptError, "storage.rollback-replay"):
        unbound.open()  # a root without a binding where there is a counter
    with bound.open() as st:
        assert st.get(A, 1) == b"bound"


def test_a_format_1_root_is_not_migrated_on_a_counter(tmp_path: Path, counter: TpmCounter) -> None:
    """A root from before the binding would let any copy from before the upgrade come back: refused."""
    env = bound_env(tmp_path / "env", counter)
    state_key = (env.path / "state.key").read_bytes()
    body = {1: 1, 2: 0, 3: {1: bytes(32), 2: {}}, 4: None, 5: []}
    (env.path / "storage.cose").write_bytes(cose.mac0(cbor.dumps(body), state_key, aad=b"ism-storage-root-v1"))
    with expect(StateCorruptError, "storage.rollback-replay"):
        env.open()
