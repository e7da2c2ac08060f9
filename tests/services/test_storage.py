"""Secure storage: PSA Protected Storage semantics, isolation, integrity, freshness, crypto-erase, power cuts.

Every test works on a storage directory (``Env``): the SQLite database, the
freshness root, the state MAC key and a software key store whose sealed key
files live in ``keys/``. Attacks edit the database with :mod:`sqlite3`
directly or copy files back from snapshots, as someone with offline access to
the device's storage would.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from _storage import ROOT_KEY_ID, StorageEnv
from ism.crypto import cose
from ism.device._atomic import Faults, PowerCut
from ism.errors import IsmError, PlatformError, SignatureError, StateCorruptError, UsageError
from ism.formats import cbor
from ism.services.storage import (
    MAX_RECORD_SIZE,
    NO_CONFIDENTIALITY,
    NO_REPLAY_PROTECTION,
    WRITE_ONCE,
    RecordInfo,
    SecureStorage,
)

A = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000a")
B = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000b")
C = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000c")
OWNERS = (A, B, C)


class Env(StorageEnv):
    """One storage directory (see ``_storage.StorageEnv``) and an attacker's tools on it."""

    @classmethod
    def create_at(cls, path: Path) -> Env:
        env = cls(path)
        env.create()
        return env

    def copy(self, dest: Path) -> Env:
        shutil.copytree(self.path, dest)
        return Env(dest)

    def restore_files(self, source: Path, *names: str) -> None:
        """Copies the named files from a snapshot directory over ours (attacker with disk access)."""
        for name in names:
            for suffix in ("-wal", "-shm"):
                (self.path / (name + suffix)).unlink(missing_ok=True)
            shutil.copy2(source / name, self.path / name)

    def sql(self, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
        con = sqlite3.connect(self.db)
        try:
            with con:
                return con.execute(statement, params).fetchall()
        finally:
            con.close()

    def row(self, owner: uuid.UUID, uid: int) -> tuple[Any, ...]:
        rows = self.sql("SELECT * FROM records WHERE owner = ? AND uid = ?", (str(owner), uid.to_bytes(8, "big")))
        assert len(rows) == 1
        return tuple(rows[0])

    def put_row(self, row: tuple[Any, ...]) -> None:
        self.sql("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env.create_at(tmp_path / "env")


@pytest.fixture
def store(env: Env) -> Iterator[SecureStorage]:
    st = env.open()
    yield st
    st.close()


def snapshot(env: Env, name: str) -> Path:
    """Copies the database and root (store closed) aside."""
    dest = env.path.parent / f"snap-{name}"
    dest.mkdir()
    for f in (env.db, env.root):
        shutil.copy2(f, dest / f.name)
    return dest


def expect(exc_type: type[IsmError], rule: str) -> Any:
    return pytest.raises(exc_type, match=rf"\[\d+ {rule}\]")


# -- PSA semantics ---------------------------------------------------------------------------------


def test_set_get_info_remove_round_trip(env: Env, store: SecureStorage) -> None:
    store.set(A, 1, b"hello, storage")
    assert store.get(A, 1) == b"hello, storage"
    assert store.get(A, 1, offset=7) == b"storage"
    assert store.get(A, 1, offset=0, length=5) == b"hello"
    assert store.get(A, 1, offset=14, length=0) == b""
    info = store.get_info(A, 1)
    assert info == RecordInfo(size=14, flags=0, version=info.version)

    store.set(A, 1, b"replaced")
    assert store.get(A, 1) == b"replaced"
    assert store.get_info(A, 1).version > info.version

    store.set(A, 2**64 - 1, b"", flags=NO_CONFIDENTIALITY)
    assert store.get(A, 2**64 - 1) == b""
    assert store.get_info(A, 2**64 - 1).flags == NO_CONFIDENTIALITY
    big = bytes(range(256)) * (MAX_RECORD_SIZE // 256)
    store.set(A, 3, big)
    assert store.get(A, 3) == big
    assert store.uids(A) == [1, 3, 2**64 - 1]
    assert store.usage(A) == len(b"replaced") + len(big)

    store.remove(A, 1)
    with expect(UsageError, "storage.missing"):
        store.get(A, 1)
    with expect(UsageError, "storage.missing"):
        store.get_info(A, 1)
    with expect(UsageError, "storage.missing"):
        store.remove(A, 1)
    store.close()

    with env.open() as again:  # survives reopening
        assert again.get(A, 3) == big
        assert again.uids(A) == [3, 2**64 - 1]
    with expect(UsageError, "storage.closed"):
        store.get(A, 3)


def test_arguments_are_checked(store: SecureStorage) -> None:
    for uid in (0, -1, 2**64, True, "1"):
        with expect(UsageError, "storage.uid"):
            store.set(A, uid, b"x")  # type: ignore[arg-type]
        with expect(UsageError, "storage.uid"):
            store.get(A, uid)  # type: ignore[arg-type]
    for flags in (8, -1, 0x100):
        with expect(UsageError, "storage.flags"):
            store.set(A, 1, b"x", flags=flags)
    with expect(UsageError, "storage.size"):
        store.set(A, 1, bytes(MAX_RECORD_SIZE + 1))
    with expect(UsageError, "storage.owner"):
        store.set(str(A), 1, b"x")  # type: ignore[arg-type]
    assert store.usage(A) == 0
    store.set(A, 1, b"0123456789")
    for offset, length in ((11, None), (-1, None), (0, 11), (5, 6), (10, 1), (0, -1)):
        with expect(UsageError, "storage.range"):
            store.get(A, 1, offset, length)
    assert store.get(A, 1, 10) == b""


def test_namespaces_are_isolated(env: Env, store: SecureStorage) -> None:
    store.set(A, 1, b"alpha")
    store.set(B, 1, b"bravo")
    store.set(A, 2, b"only A")
    assert store.get(A, 1) == b"alpha"
    assert store.get(B, 1) == b"bravo"
    with expect(UsageError, "storage.missing"):
        store.get(B, 2)
    assert store.uids(B) == [1]
    assert store.usage(A) == 11
    assert store.usage(B) == 5
    assert store.usage(C) == 0
    keys = env.keystore()
    assert keys.exists(f"storage.{A}")
    assert keys.exists(f"storage.{B}")
    assert not keys.exists(f"storage.{C}")
    # Different keys: the same uid's ciphertexts share nothing, and plaintext is not in the file.
    store.close()
    assert b"alpha" not in env.db.read_bytes()
    assert b"bravo" not in env.db.read_bytes()


def test_write_once(store: SecureStorage) -> None:
    store.set(A, 1, b"forever", flags=WRITE_ONCE)
    with expect(UsageError, "storage.write-once"):
        store.set(A, 1, b"changed")
    with expect(UsageError, "storage.write-once"):
        store.set(A, 1, b"forever", flags=WRITE_ONCE)
    with expect(UsageError, "storage.write-once"):
        store.remove(A, 1)
    assert store.get(A, 1) == b"forever"
    assert store.get_info(A, 1).flags == WRITE_ONCE
    store.erase(A)  # only erasing the namespace removes it
    with expect(UsageError, "storage.missing"):
        store.get(A, 1)


def test_quota_exhaustion_writes_nothing(env: Env, store: SecureStorage) -> None:
    store.set(A, 1, b"x" * 60, quota=100)
    store.set(A, 2, b"y" * 40, quota=100)
    assert store.usage(A) == 100
    before = store.get_info(A, 2)
    store.close()
    db_before, root_before = env.db.read_bytes(), env.root.read_bytes()
    store = env.open()
    with expect(UsageError, "storage.quota"):
        store.set(A, 3, b"z", quota=100)
    with expect(UsageError, "storage.quota"):
        store.set(A, 2, b"y" * 41, quota=100)
    assert store.usage(A) == 100
    assert store.get_info(A, 2) == before
    assert store.get(A, 2) == b"y" * 40
    store.close()
    assert env.root.read_bytes() == root_before
    assert env.db.read_bytes() == db_before
    with env.open() as again:
        again.set(A, 2, b"y" * 39, quota=100)  # a replacement counts without the old size
        again.set(B, 1, b"b" * 100, quota=100)  # quotas are per namespace
        with expect(UsageError, "storage.quota"):
            again.set(A, 9, b"", quota=-1)


# -- integrity and freshness ---------------------------------------------------------------------


def test_record_copied_into_another_namespace_is_refused(env: Env, store: SecureStorage) -> None:
    store.set(A, 1, b"A's secret")
    store.set(B, 1, b"B's data")
    # Online: the row under B's uid 1 is replaced by a copy of A's row.
    stolen = env.row(A, 1)
    env.put_row((str(B), *stolen[1:]))
    with expect(SignatureError, "storage.integrity"):
        store.get(B, 1)
    store.close()
    # Offline: the index no longer matches the freshness root.
    with expect(StateCorruptError, "storage.rollback"):
        env.open()


def test_unprotected_record_copied_into_another_namespace_fails_decryption(env: Env, store: SecureStorage) -> None:
    """Records outside the freshness digest are still bound to their namespace by the AEAD."""
    store.set(A, 5, b"A's replayable", flags=NO_REPLAY_PROTECTION)
    store.set(A, 6, b"A's clear", flags=NO_REPLAY_PROTECTION | NO_CONFIDENTIALITY)
    store.set(B, 5, b"B's replayable", flags=NO_REPLAY_PROTECTION)
    store.close()
    env.put_row((str(B), *env.row(A, 5)[1:]))  # over B's own uid 5
    env.put_row((str(B), *env.row(A, 6)[1:]))  # as a new uid 6 in B
    with env.open() as st:
        assert st.uids(B) == [5, 6]
        with expect(SignatureError, "storage.integrity"):
            st.get(B, 5)
        with expect(SignatureError, "storage.integrity"):
            st.get(B, 6)
        assert st.get(A, 5) == b"A's replayable"


def test_record_moved_to_another_uid_is_refused(env: Env) -> None:
    with env.open() as st:
        st.set(A, 1, b"one", flags=NO_REPLAY_PROTECTION)
    env.sql("UPDATE records SET uid = ? WHERE uid = ?", ((2).to_bytes(8, "big"), (1).to_bytes(8, "big")))
    with env.open() as st, expect(SignatureError, "storage.integrity"):
        st.get(A, 2)


def test_record_swapped_for_an_older_copy_of_itself_is_refused(env: Env, store: SecureStorage) -> None:
    store.set(A, 1, b"PIN tries left: 3")
    old_row = env.row(A, 1)
    store.set(A, 1, b"PIN tries left: 2")
    env.put_row(old_row)
    with expect(SignatureError, "storage.integrity"):  # online: the verified index says otherwise
        store.get(A, 1)
    store.close()
    with expect(StateCorruptError, "storage.rollback"):  # offline: the root says otherwise
        env.open()


def test_deleted_record_is_detected(env: Env, store: SecureStorage) -> None:
    store.set(A, 1, b"must not vanish")
    store.set(A, 2, b"other")
    store.close()
    env.sql("DELETE FROM records WHERE uid = ?", ((1).to_bytes(8, "big"),))
    with expect(StateCorruptError, "storage.rollback"):
        env.open()


def test_whole_database_rollback_is_detected(env: Env, store: SecureStorage) -> None:
    store.set(A, 1, b"v1")
    store.close()
    snap = snapshot(env, "v1")
    with env.open() as st:
        st.set(A, 1, b"v2")
    env.restore_files(snap, env.db.name)
    with expect(StateCorruptError, "storage.rollback"):
        env.open()


def test_content_identical_older_database_is_detected(env: Env) -> None:
    """The generation is in the digest: a file from before set-then-remove is still refused."""
    with env.open() as st:
        st.set(A, 1, b"v1")
    snap = snapshot(env, "before")
    with env.open() as st:
        st.set(A, 2, b"temporary")
        st.remove(A, 2)
    env.restore_files(snap, env.db.name)
    with expect(StateCorruptError, "storage.rollback"):
        env.open()


@pytest.mark.parametrize("column", ["body", "tag", "nonce"])
def test_tampered_ciphertext_is_refused(env: Env, store: SecureStorage, column: str) -> None:
    store.set(A, 1, b"secret value")
    store.close()
    (value,) = env.sql(f"SELECT {column} FROM records")[0]
    env.sql(f"UPDATE records SET {column} = ?", (bytes([value[0] ^ 1]) + value[1:],))
    with env.open() as st, expect(SignatureError, "storage.integrity"):
        st.get(A, 1)


def test_tampered_record_with_a_recomputed_row_digest_is_refused(env: Env) -> None:
    with env.open() as st:
        st.set(A, 1, b"protected")
        st.set(A, 2, b"unprotected", flags=NO_REPLAY_PROTECTION)
    _, _, _, _, _, nonce, tag, body, _ = env.row(A, 2)
    body = bytes([body[0] ^ 1]) + body[1:]
    digest = hashlib.sha256(nonce + body + tag).digest()
    env.sql("UPDATE records SET body = ?, digest = ? WHERE uid = ?", (body, digest, (2).to_bytes(8, "big")))
    with env.open() as st:  # outside the digest: the AEAD catches it
        assert st.get(A, 1) == b"protected"
        with expect(SignatureError, "storage.integrity"):
            st.get(A, 2)


def test_clear_records_are_readable_but_authenticated(env: Env) -> None:
    clear = b"public calibration table 0123456789"
    secret = b"private calibration table 987654321"
    with env.open() as st:
        st.set(A, 1, clear, flags=NO_CONFIDENTIALITY)
        st.set(A, 2, secret)
        st.set(A, 3, clear.upper(), flags=NO_CONFIDENTIALITY | NO_REPLAY_PROTECTION)
        assert st.get(A, 1) == clear
    raw = env.db.read_bytes()
    assert clear in raw
    assert secret not in raw

    # Same length, one character changed: caught by the row digest at read...
    snap = snapshot(env, "clear")
    env.sql("UPDATE records SET body = ? WHERE uid = ?", (clear.replace(b"public", b"PUBLIC"), (1).to_bytes(8, "big")))
    with env.open() as st, expect(SignatureError, "storage.integrity"):
        st.get(A, 1)
    # ...and by the AEAD tag when the attacker also fixes the row digest (outside the freshness digest).
    env.restore_files(snap, env.db.name)
    _, _, _, _, _, nonce, tag, body, _ = env.row(A, 3)
    forged = body.replace(b"PUBLIC", b"PRIVATE")[: len(body)]
    env.sql(
        "UPDATE records SET body = ?, digest = ? WHERE uid = ?",
        (forged, hashlib.sha256(nonce + forged + tag).digest(), (3).to_bytes(8, "big")),
    )
    with env.open() as st:
        assert st.get(A, 1) == clear
        with expect(SignatureError, "storage.integrity"):
            st.get(A, 3)


def test_flags_cannot_be_changed_in_the_database(env: Env) -> None:
    with env.open() as st:
        st.set(A, 1, b"write once", flags=WRITE_ONCE | NO_REPLAY_PROTECTION)
    env.sql("UPDATE records SET flags = ?", (NO_REPLAY_PROTECTION,))
    with env.open() as st, expect(SignatureError, "storage.integrity"):
        st.get(A, 1)


def test_unprotected_record_replay_is_accepted(env: Env) -> None:
    """Documented PSA behaviour: NO_REPLAY_PROTECTION records may be replayed or deleted individually."""
    with env.open() as st:
        st.set(A, 1, b"protected")
        st.set(A, 2, b"cache v1", flags=NO_REPLAY_PROTECTION)
        st.set(A, 3, b"scratch", flags=NO_REPLAY_PROTECTION)
    old = env.row(A, 2)
    with env.open() as st:
        st.set(A, 2, b"cache v2", flags=NO_REPLAY_PROTECTION)
    env.put_row(old)
    env.sql("DELETE FROM records WHERE uid = ?", ((3).to_bytes(8, "big"),))
    with env.open() as st:
        assert st.get(A, 2) == b"cache v1"
        with expect(UsageError, "storage.missing"):
            st.get(A, 3)
        assert st.get(A, 1) == b"protected"
        st.set(A, 4, b"still works")


# The root file as the module docstring describes it, read here without the module: two slots of
# equal size, each a 4-byte length and a COSE_Mac0 whose external AAD binds it to its slot.
ROOT_AAD = b"ism-storage-root-v2"


def slot_regions(env: Env) -> list[bytes]:
    data = env.root.read_bytes()
    assert len(data) % 8192 == 0
    size = len(data) // 2
    return [data[k * size : (k + 1) * size] for k in (0, 1)]


def slot_body(env: Env, slot: int) -> dict[int, Any]:
    region = slot_regions(env)[slot]
    sealed = region[4 : 4 + int.from_bytes(region[:4], "big")]
    msg = cose.parse(sealed, expect="mac0")
    cose.verify_mac0(msg, (env.path / "state.key").read_bytes(), aad=ROOT_AAD + bytes([slot]))
    body = cbor.loads(msg.payload or b"")
    assert isinstance(body, dict)
    return body


def current_slot(env: Env) -> int:
    """The slot with the higher sequence."""
    return max((0, 1), key=lambda k: slot_body(env, k)[6])


def put_region(env: Env, slot: int, region: bytes) -> None:
    data = bytearray(env.root.read_bytes())
    size = len(data) // 2
    assert len(region) == size
    data[slot * size : (slot + 1) * size] = region
    env.root.write_bytes(bytes(data))


def damage_slot(env: Env, slot: int) -> None:
    region = bytearray(slot_regions(env)[slot])
    region[20] ^= 1  # inside the sealed root
    put_region(env, slot, bytes(region))


def test_root_is_checked(env: Env, tmp_path: Path) -> None:
    with env.open() as st:
        st.set(A, 1, b"data")
    good = env.root.read_bytes()
    assert len(good) == 8192
    assert slot_body(env, current_slot(env))[4] is None  # settled: no pending state
    # One damaged slot (a torn write looks the same) is survived, and repaired by the open.
    for slot in (0, 1):
        damage_slot(env, slot)
        with env.open() as st:
            assert st.get(A, 1) == b"data"
        for k in (0, 1):
            slot_body(env, k)  # both verify again
        env.root.write_bytes(good)
    for slot in (0, 1):
        damage_slot(env, slot)
    with expect(StateCorruptError, "storage.root"):
        env.open()
    # A root that passes its MAC but is not a storage root of this format.
    env.root.write_bytes(good)
    state_key = (env.path / "state.key").read_bytes()
    slot = current_slot(env)
    forged = cose.mac0(cbor.dumps({1: 2, 2: {}}), state_key, aad=ROOT_AAD + bytes([slot]))
    put_region(env, slot, (len(forged).to_bytes(4, "big") + forged).ljust(4096, b"\0"))
    with expect(StateCorruptError, "storage.root"):
        env.open()
    # Not a root file at all (not two slots, not a format-1 root); a valid COSE_Mac0 of another state file.
    for data in (good[:100], cose.mac0(cbor.dumps({1: 1, 2: {}}), state_key)):
        env.root.write_bytes(data)
        with expect(StateCorruptError, "storage.root"):
            env.open()
    env.root.unlink()
    with expect(StateCorruptError, "storage.rollback"):
        env.open()
    env.root.write_bytes(good)
    with env.open() as st:
        assert st.get(A, 1) == b"data"
    # A root from another device (other state key) does not verify.
    other = Env.create_at(tmp_path / "other")
    with other.open() as st:
        st.set(A, 1, b"data")
    env.restore_files(other.path, env.root.name)
    with expect(StateCorruptError, "storage.root"):
        env.open()


def test_a_damaged_slot_never_brings_back_the_last_write(env: Env, tmp_path: Path) -> None:
    """After a write, one slot holds it settled and the other holds it pending (which, alone, would also
    accept the database from before it). Whatever is done to one slot, the older database is refused."""
    with env.open() as st:
        st.set(A, 1, b"PIN tries left: 3")
    before = snapshot(env, "before")
    with env.open() as st:
        st.set(A, 1, b"PIN tries left: 2")
    settled = current_slot(env)
    pending = 1 - settled
    assert slot_body(env, settled)[4] is None
    assert slot_body(env, pending)[4] is not None
    regions = slot_regions(env)
    attacks: dict[str, Callable[[Env], None]] = {
        "settled slot damaged": lambda e: damage_slot(e, settled),
        "pending slot damaged": lambda e: damage_slot(e, pending),
        "settled slot zeroed": lambda e: put_region(e, settled, bytes(len(regions[0]))),
        # the pending root copied over the settled one: the AAD binds a root to its slot
        "pending root in both slots": lambda e: put_region(e, settled, regions[pending]),
    }
    for name, attack in attacks.items():
        victim = env.copy(tmp_path / name.replace(" ", "-"))
        attack(victim)
        victim.restore_files(before, victim.db.name)
        with expect(StateCorruptError, "storage.rollback"):
            victim.open()
        attacked = env.copy(tmp_path / (name.replace(" ", "-") + "-db-kept"))
        attack(attacked)
        with attacked.open() as st:
            assert st.get(A, 1) == b"PIN tries left: 2"


def test_missing_database_with_a_root_is_a_rollback(env: Env) -> None:
    with env.open() as st:
        st.set(A, 1, b"data")
    env.db.unlink()
    with expect(StateCorruptError, "storage.rollback"):
        env.open()


def test_config_and_io_errors_are_typed(env: Env, tmp_path: Path) -> None:
    with expect(UsageError, "storage.config"):
        SecureStorage(env.db, env.root, env.keystore(), ROOT_KEY_ID, b"short")
    with pytest.raises(PlatformError):
        SecureStorage(tmp_path / "nowhere" / "x.sqlite", env.root, env.keystore(), ROOT_KEY_ID, bytes(32))


# -- the index digest ------------------------------------------------------------------------------


def documented_digest(env: Env) -> bytes:
    """The digest of the database as the module docstring defines it, computed here from the rows."""
    state_key = (env.path / "state.key").read_bytes()
    k_rec = hmac.new(state_key, b"ism-storage-v1 record mac", hashlib.sha256).digest()
    k_top = hmac.new(state_key, b"ism-storage-v1 index digest v2", hashlib.sha256).digest()
    (generation,) = env.sql("SELECT generation FROM meta")[0]
    acc = count = 0
    for owner, uid, version, flags, size, digest in env.sql(
        "SELECT owner, uid, version, flags, size, digest FROM records"
    ):
        if flags & NO_REPLAY_PROTECTION:
            continue
        entry = uuid.UUID(owner).bytes + uid + version.to_bytes(8, "big") + flags.to_bytes(4, "big")
        mac = hmac.new(k_rec, entry + size.to_bytes(4, "big") + digest, hashlib.sha256).digest()
        acc ^= int.from_bytes(mac, "big")
        count += 1
    top = generation.to_bytes(8, "big") + count.to_bytes(8, "big") + acc.to_bytes(32, "big")
    return hmac.new(k_top, top, hashlib.sha256).digest()


def test_the_incremental_digest_is_the_documented_one(env: Env) -> None:
    """Random writes, each updating the digest in O(1); after each, the settled root holds exactly the
    digest recomputed from every row (and every reopen, which recomputes it too, accepts the database)."""
    rng = random.Random(1234)
    st = env.open()
    live: dict[tuple[uuid.UUID, int], int] = {}
    try:
        for step in range(300):
            owner = rng.choice(OWNERS)
            ours = [uid for (o, uid), flags in live.items() if o == owner and not flags & WRITE_ONCE]
            roll = rng.random()
            if roll < 0.02:
                st.erase(owner)
                live = {k: v for k, v in live.items() if k[0] != owner}
            elif roll < 0.25 and ours:
                uid = rng.choice(ours)
                st.remove(owner, uid)
                del live[(owner, uid)]
            else:
                uid = rng.choice(ours) if ours and rng.random() < 0.5 else rng.randrange(1, 2**64)
                flags = rng.choice((0, 0, NO_REPLAY_PROTECTION, NO_CONFIDENTIALITY, WRITE_ONCE))
                st.set(owner, uid, rng.randbytes(rng.randrange(0, 200)), flags=flags)
                live[(owner, uid)] = flags
            body = slot_body(env, current_slot(env))
            assert body[4] is None
            assert body[3][1] == documented_digest(env), step
            if step % 50 == 49:
                st.close()
                st = env.open()
                assert {(o, uid) for o in OWNERS for uid in st.uids(o)} == set(live)
    finally:
        st.close()


def test_a_format_1_root_is_migrated(env: Env) -> None:
    """A storage made before the two-slot root: checked with format 1's digest, then rewritten."""
    with env.open() as st:
        st.set(A, 1, b"protected")
        st.set(A, 2, b"unprotected", flags=NO_REPLAY_PROTECTION)
        st.set(B, 1, b"B's")
        st.erase(C)
    nonces = slot_body(env, current_slot(env))[3][2]
    state_key = (env.path / "state.key").read_bytes()
    (generation,) = env.sql("SELECT generation FROM meta")[0]
    rows = sorted(env.sql("SELECT owner, uid, version, flags, size, digest FROM records"))
    key = hmac.new(state_key, b"ism-storage-v1 index digest", hashlib.sha256).digest()

    def legacy_root(digest_generation: int) -> bytes:
        mac = hmac.new(key, digest_generation.to_bytes(8, "big"), hashlib.sha256)
        for owner, uid, version, flags, size, digest in sorted(rows, key=lambda r: (uuid.UUID(r[0]).bytes, r[1])):
            if not flags & NO_REPLAY_PROTECTION:
                mac.update(uuid.UUID(owner).bytes + uid + version.to_bytes(8, "big") + flags.to_bytes(4, "big"))
                mac.update(size.to_bytes(4, "big") + digest)
        body = {1: 1, 2: generation, 3: {1: mac.digest(), 2: nonces}, 4: None, 5: []}
        return cose.mac0(cbor.dumps(body), state_key, aad=b"ism-storage-root-v1")

    env.root.write_bytes(legacy_root(generation - 1))  # vouches for another database
    with expect(StateCorruptError, "storage.rollback"):
        env.open()
    env.root.write_bytes(legacy_root(generation))
    with env.open() as st:
        assert st.get(A, 1) == b"protected"
        assert st.get(A, 2) == b"unprotected"
        assert st.get(B, 1) == b"B's"
        assert sorted(st.namespace_keys()) == sorted(f"storage.{o}" for o in OWNERS)
        st.set(C, 1, b"after the migration")
    assert env.root.stat().st_size == 8192
    with env.open() as st:
        assert st.get(C, 1) == b"after the migration"


# -- crypto-erase ---------------------------------------------------------------------------------


def test_erase_crypto_erases_a_namespace(env: Env) -> None:
    with env.open() as st:
        st.set(A, 1, b"A one")
        st.set(A, 2, b"A two", flags=WRITE_ONCE)
        st.set(A, 3, b"A three", flags=NO_REPLAY_PROTECTION)
        st.set(B, 1, b"B one")
    pre = snapshot(env, "pre-erase")
    with env.open() as st:
        st.erase(A)
        assert st.uids(A) == []
        assert st.usage(A) == 0
        assert st.get(B, 1) == b"B one"
        assert not env.keystore().exists(f"storage.{A}")
        st.set(A, 1, b"fresh start")  # a new key from a new nonce
        assert st.get(A, 1) == b"fresh start"
    post = snapshot(env, "post-erase")

    # The pre-erase database with the post-erase root is refused.
    env.restore_files(pre, env.db.name)
    with expect(StateCorruptError, "storage.rollback"):
        env.open()

    # The pre-erase database and root with today's key store: listed, but unreadable.
    env.restore_files(pre, env.root.name)
    with env.open() as st:
        assert st.uids(A) == [1, 2, 3]
        for uid in (1, 2, 3):
            with expect(SignatureError, "storage.integrity"):
                st.get(A, uid)
        assert st.get(B, 1) == b"B one"

    # Back to the real post-erase files: the new record is there.
    env.restore_files(post, env.db.name, env.root.name)
    with env.open() as st:
        assert st.get(A, 1) == b"fresh start"


def test_restored_namespace_cannot_recover_its_key(env: Env) -> None:
    """After an erase, an old copy stays unreadable whatever the app does with the restored namespace."""
    with env.open() as st:
        st.set(A, 1, b"old secret")
        st.set(A, 2, b"old secret 2")
    pre = snapshot(env, "pre")
    with env.open() as st:
        st.erase(A)
    env.restore_files(pre, env.db.name, env.root.name)
    with env.open() as st:
        with expect(SignatureError, "storage.integrity"):
            st.set(A, 3, b"new")  # the namespace's key is gone; it is not re-derived from the old nonce
        st.remove(A, 1)
        st.remove(A, 2)
        st.set(A, 3, b"new")  # empty again: a key from a fresh nonce
    env.restore_files(pre, env.db.name, env.root.name)
    with env.open() as st, expect(SignatureError, "storage.integrity"):
        st.get(A, 1)


# -- power cuts ------------------------------------------------------------------------------------

State = dict[tuple[str, int], tuple[bytes, int]]


def read_all(env: Env) -> State:
    """Re-opens the storage (which recovers) and reads every record."""
    with env.open() as st:
        owners = {uuid.UUID(k.removeprefix("storage.")) for k in st.namespace_keys()} | set(OWNERS)
        return {(str(o), uid): (st.get(o, uid), st.get_info(o, uid).flags) for o in owners for uid in st.uids(o)}


def prepare(env: Env) -> None:
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


def check_usable(env: Env, state: State) -> None:
    """After a crash, further operations work and persist."""
    with env.open() as st:
        for owner in OWNERS:
            st.set(owner, 99, b"after the crash " + owner.bytes)
            assert st.get(owner, 99) == b"after the crash " + owner.bytes
    after = read_all(env)
    assert {k: v for k, v in after.items() if k[1] != 99} == state
    assert not list(env.path.glob("*.tmp"))


def count_points(action: Callable[[Faults], None]) -> list[str]:
    faults = Faults()
    action(faults)
    return faults.points


def sweep(tmp_path: Path, prepare: Callable[[Env], None], op: Callable[[SecureStorage], None]) -> list[str]:
    """Cuts the power at every fault point of ``op`` on a prepared storage, and at every point of the
    recovery after each cut; every outcome is the old or the new state and the storage stays usable.
    Returns the fault points of an uninterrupted ``op``."""
    template = Env.create_at(tmp_path / "template")
    prepare(template)
    old = read_all(template)
    pre_op = snapshot(template, "template-files")

    dry = template.copy(tmp_path / "dry")

    def run(faults: Faults) -> None:
        with dry.open(faults) as st:
            op(st)

    points = count_points(run)
    new = read_all(dry)
    assert new != old

    outcomes = set()
    for n in range(1, len(points) + 1):
        work = template.copy(tmp_path / f"cut-{n}")
        st = work.open(Faults(cut_at=n))
        with pytest.raises(PowerCut):
            op(st)
        st.close()  # the process is gone; nothing more is written

        # A second power cut while the storage recovers at open, at each of its points.
        probe = work.copy(tmp_path / f"cut-{n}-probe")
        recovery_points = count_points(lambda f: probe.open(f).close())  # noqa: B023 (called at once)
        for m in range(1, len(recovery_points) + 1):
            again = work.copy(tmp_path / f"cut-{n}-{m}")
            with pytest.raises(PowerCut):
                again.open(Faults(cut_at=m))
            state = read_all(again)
            assert state in (old, new), (points[n - 1], recovery_points[m - 1])
            check_usable(again, state)
            shutil.rmtree(again.path)
        shutil.rmtree(probe.path)

        state = read_all(work)
        assert state in (old, new), f"cut at {points[n - 1]}"
        outcomes.add("new" if state == new else "old")
        if any(k[0] == str(A) for k in old) and not any(k[0] == str(A) for k in state):
            assert not work.keystore().exists(f"storage.{A}")
            # Crypto-erased even though the crash came mid-way: the old files with today's keys are unreadable.
            attacker = work.copy(tmp_path / f"cut-{n}-attack")
            attacker.restore_files(pre_op, attacker.db.name, attacker.root.name)
            with attacker.open() as st, expect(SignatureError, "storage.integrity"):
                st.get(A, 1)
        check_usable(work, state)
        shutil.rmtree(work.path)
    assert outcomes == {"old", "new"}
    return points


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_power_cut_at_every_write_point(tmp_path: Path, operation: str) -> None:
    points = sweep(tmp_path, prepare, OPERATIONS[operation])
    assert "storage:commit" in points
    assert "storage:committed" in points
    assert sum(p.endswith(":slot-synced") for p in points) == 2  # two root writes, in place
    assert not any(p.endswith(":dir-synced") for p in points)  # no rename, no directory sync
    assert "storage:counter" not in points
    if operation == "erase":
        assert "storage:key-destroyed" in points


def test_power_cut_while_the_root_grows(tmp_path: Path) -> None:
    """Every namespace's erase nonce is in the root: the write whose root outgrows its slot rewrites the
    file with bigger slots (a temporary file, renamed), carrying the anchor root over."""
    owners = [uuid.UUID(int=0x6A1E2C3D_0000_4000_8000_000000010000 + i) for i in range(200)]
    probe = Env.create_at(tmp_path / "probe")
    with probe.open() as st:
        for grows, owner in enumerate(owners):  # noqa: B007 (grows is used after the loop)
            st.set(owner, 1, b"x")
            if probe.root.stat().st_size > 8192:
                break
    assert probe.root.stat().st_size == 16384

    def fill(env: Env) -> None:
        with env.open() as st:
            for owner in owners[:grows]:
                st.set(owner, 1, b"x")

    def op(st: SecureStorage) -> None:
        st.set(owners[grows], 1, b"the one that grows the root")

    points = sweep(tmp_path / "sweep", fill, op)
    assert any(p.endswith(":dir-synced") for p in points)  # the rewrite of the whole file
    assert sum(p.endswith(":slot-synced") for p in points) == 1  # then the settled root, in place


def test_failed_write_leaves_storage_consistent(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails (not a crash) after the pending root leaves a store that still works."""
    with env.open() as st:
        st.set(A, 1, b"before")

        def broken(*args: Any) -> None:
            raise PlatformError("storage.write", "disk full")

        monkeypatch.setattr(st, "_commit", broken)
        with expect(PlatformError, "storage.write"):
            st.set(A, 1, b"lost")
        monkeypatch.undo()
        assert st.get(A, 1) == b"before"
        st.set(A, 2, b"next")
    assert read_all(env) == {(str(A), 1): (b"before", 0), (str(A), 2): (b"next", 0)}


def test_power_cut_in_the_write_after_a_failed_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After a failed write its pending root is useless; the next write overwrites it, never the settled
    root, so a power cut anywhere in that next write (and in the recovery after it) leaves old or new."""
    template = Env.create_at(tmp_path / "template")
    with template.open() as st:
        st.set(A, 1, b"before")
    old, new = {(str(A), 1): (b"before", 0)}, {(str(A), 1): (b"after", 0)}

    def broken(*args: Any) -> None:
        raise PlatformError("storage.write", "disk full")

    def session(env: Env, faults: Faults) -> None:
        with env.open(faults) as st:
            with monkeypatch.context() as patch:
                patch.setattr(st, "_commit", broken)
                with expect(PlatformError, "storage.write"):
                    st.set(A, 1, b"lost")
            faults.point("test:failed-write-done")
            st.set(A, 1, b"after")

    dry = template.copy(tmp_path / "dry")
    points = count_points(lambda f: session(dry, f))
    assert read_all(dry) == new
    for n in range(points.index("test:failed-write-done") + 2, len(points) + 1):
        work = template.copy(tmp_path / f"cut-{n}")
        with pytest.raises(PowerCut):
            session(work, Faults(cut_at=n))
        probe = work.copy(tmp_path / f"cut-{n}-probe")
        recovery_points = count_points(lambda f: probe.open(f).close())  # noqa: B023 (called at once)
        for m in range(1, len(recovery_points) + 1):
            again = work.copy(tmp_path / f"cut-{n}-{m}")
            with pytest.raises(PowerCut):
                again.open(Faults(cut_at=m))
            assert read_all(again) in (old, new), (points[n - 1], recovery_points[m - 1])
        assert read_all(work) in (old, new), points[n - 1]
