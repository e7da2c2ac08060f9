"""SecureStorage.get on its lean path: the same checks, and no cipher that outlives its key.

``get`` reads a record with one prepared select that finds the row only if its version, flags and
size are the index entry's, checks the row digest against the index, and decrypts through the key
store, which keeps one ``AESGCM`` object per loaded ``aes-256`` key. These tests hold that an erase
(or any destroy or replacement of a namespace key) drops that object, so no read succeeds after it
even through the same key store object, and that every column of the row is still checked.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest

from _storage import ROOT_KEY_ID, StorageEnv
from ism.crypto.keystore.software import MemoryKeyFiles, SoftwareKeyStore
from ism.errors import IsmError, SignatureError, UsageError
from ism.services.storage import NO_CONFIDENTIALITY, NO_REPLAY_PROTECTION, WRITE_ONCE, SecureStorage, _aad

A = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000a")
B = uuid.UUID("6a1e2c3d-0000-4000-8000-00000000000b")


def expect(exc_type: type[IsmError], rule: str) -> Any:
    return pytest.raises(exc_type, match=rf"\[\d+ {rule}\]")


def _open(env: StorageEnv, keystore: SoftwareKeyStore) -> SecureStorage:
    """The storage over ``keystore``: one key store object for every open, so its cache lives on."""
    return SecureStorage(env.db, env.root, keystore, ROOT_KEY_ID, (env.path / "state.key").read_bytes())


def _sql(env: StorageEnv, statement: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Another connection to the database: someone editing it under the running store."""
    con = sqlite3.connect(env.db)
    try:
        with con:
            return con.execute(statement, params).fetchall()
    finally:
        con.close()


def _sealed(env: StorageEnv, owner: uuid.UUID, uid: int) -> tuple[bytes, bytes, int, int]:
    """(nonce, ciphertext || tag, version, flags) of a record's row."""
    ((nonce, tag, body, version, flags),) = _sql(
        env,
        "SELECT nonce, tag, body, version, flags FROM records WHERE owner = ? AND uid = ?",
        (str(owner), uid.to_bytes(8, "big")),
    )
    return nonce, body + tag, version, flags


def _copy(env: StorageEnv, dest: Path) -> None:
    dest.mkdir()
    for f in (env.db, env.root):
        shutil.copy2(f, dest / f.name)


def _restore(env: StorageEnv, source: Path) -> None:
    for f in (env.db, env.root):
        for suffix in ("-wal", "-shm"):
            f.with_name(f.name + suffix).unlink(missing_ok=True)
        shutil.copy2(source / f.name, f)


def test_erase_drops_the_cached_cipher(tmp_path: Path) -> None:
    env = StorageEnv(tmp_path / "env").create()
    keystore = env.keystore()
    key_id = f"storage.{A}"
    with _open(env, keystore) as st:
        st.set(A, 1, b"A's secret")
        st.set(B, 1, b"B's data")
        assert st.get(A, 1) == b"A's secret"
    nonce, sealed, version, flags = _sealed(env, A, 1)
    aad = _aad(A.bytes, 1, version, flags, len(b"A's secret"))
    pre = tmp_path / "pre-erase"
    _copy(env, pre)

    with _open(env, keystore) as st:
        assert st.get(A, 1) == b"A's secret"
        cached = keystore._cache[key_id].aead
        assert cached is not None  # warm: the namespace key's cipher is cached
        assert cached.decrypt(nonce, sealed, aad) == b"A's secret"
        st.erase(A)
        assert key_id not in keystore._cache
        with expect(UsageError, "keystore.missing"):
            keystore.decrypt(key_id, nonce, sealed, aad)
        assert st.get(B, 1) == b"B's data"

    # The pre-erase database and root, opened over the same key store object: listed, never readable.
    _restore(env, pre)
    with _open(env, keystore) as st:
        assert st.uids(A) == [1]
        with expect(SignatureError, "storage.integrity"):
            st.get(A, 1)
        assert st.get(B, 1) == b"B's data"


def test_a_namespace_key_derived_again_is_not_decrypted_with_from_the_cache(tmp_path: Path) -> None:
    """After an erase the next set derives a new key under the same id: the old cipher is not reused."""
    env = StorageEnv(tmp_path / "env").create()
    keystore = env.keystore()
    with _open(env, keystore) as st:
        st.set(A, 1, b"old secret")
        assert st.get(A, 1) == b"old secret"
    nonce, sealed, version, flags = _sealed(env, A, 1)
    aad = _aad(A.bytes, 1, version, flags, len(b"old secret"))
    pre = tmp_path / "pre-erase"
    _copy(env, pre)
    with _open(env, keystore) as st:
        assert st.get(A, 1) == b"old secret"
        st.erase(A)
        st.set(A, 2, b"new secret")  # a new key, storage.<A> again
        assert st.get(A, 2) == b"new secret"
        with expect(SignatureError, "keystore.decrypt"):
            keystore.decrypt(f"storage.{A}", nonce, sealed, aad)
    _restore(env, pre)
    with _open(env, keystore) as st, expect(SignatureError, "storage.integrity"):
        st.get(A, 1)


def test_a_replaced_or_destroyed_key_is_not_used_from_the_cache() -> None:
    store = SoftwareKeyStore(MemoryKeyFiles(), os.urandom(32))
    store.generate("root", "hmac-sha256")
    store.derive("root", b"one", "k", "aes-256")
    nonce = os.urandom(12)
    first = store.encrypt("k", nonce, b"data", b"aad")
    assert store.decrypt("k", nonce, first, b"aad") == b"data"
    store.derive("root", b"two", "k", "aes-256")  # replaced (what a namespace's new key does)
    with expect(SignatureError, "keystore.decrypt"):
        store.decrypt("k", nonce, first, b"aad")
    second = store.encrypt("k", nonce, b"data", b"aad")
    assert second != first
    assert store.decrypt("k", nonce, second, b"aad") == b"data"
    store.destroy("k")
    with expect(UsageError, "keystore.missing"):
        store.decrypt("k", nonce, second, b"aad")
    with expect(UsageError, "keystore.missing"):
        store.encrypt("k", nonce, b"data", b"aad")
    store.import_key("k", "aes-256", bytes(32))  # imported over the same id: that key, not a cached one
    assert store.decrypt("k", nonce, store.encrypt("k", nonce, b"x", b""), b"") == b"x"
    with expect(SignatureError, "keystore.decrypt"):
        store.decrypt("k", nonce, second, b"aad")


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_cipher_refusals_keep_their_rules(warm: bool) -> None:
    store = SoftwareKeyStore(MemoryKeyFiles(), os.urandom(32))
    store.generate("aes", "aes-256")
    store.generate("mac", "hmac-sha256")
    nonce = os.urandom(12)
    if warm:
        store.decrypt("aes", nonce, store.encrypt("aes", nonce, b"x", b""), b"")
        store.mac("mac", b"x")
    for key_id in ("../escape", "Aes", "", "a" * 97, "a..b", None, 7, b"aes"):
        with expect(UsageError, "keystore.key-id"):
            store.encrypt(key_id, nonce, b"x", b"")  # type: ignore[arg-type]
        with expect(UsageError, "keystore.key-id"):
            store.decrypt(key_id, nonce, bytes(17), b"")  # type: ignore[arg-type]
    for op in (store.encrypt, store.decrypt):
        with expect(UsageError, "keystore.key-type"):
            op("mac", nonce, bytes(17), b"")
        with expect(UsageError, "keystore.missing"):
            op("absent", nonce, bytes(17), b"")
    with expect(UsageError, "keystore.nonce"):
        store.encrypt("aes", nonce[:11], b"x", b"")
    with expect(SignatureError, "keystore.decrypt"):
        store.decrypt("aes", nonce[:11], bytes(17), b"")


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("version", lambda v: v + 1),
        ("version", lambda v: v - 1),
        ("version", lambda v: v.to_bytes(8, "big")),
        ("flags", lambda f: f | NO_CONFIDENTIALITY),
        ("flags", lambda f: f & ~WRITE_ONCE),
        ("size", lambda s: s + 1),
        ("size", lambda s: str(s) + "x"),
    ],
)
def test_a_row_that_differs_from_its_index_entry_is_refused_online(tmp_path: Path, column: str, value: Any) -> None:
    """Edited under the running store (the index is in memory): ``storage.integrity``, then readable again."""
    env = StorageEnv(tmp_path / "env").create()
    with _open(env, env.keystore()) as st:
        st.set(A, 1, b"bound to its index entry", flags=WRITE_ONCE | NO_REPLAY_PROTECTION)
        where = (str(A), (1).to_bytes(8, "big"))
        ((original,),) = _sql(env, f"SELECT {column} FROM records WHERE owner = ? AND uid = ?", where)
        _sql(env, f"UPDATE records SET {column} = ? WHERE owner = ? AND uid = ?", (value(original), *where))
        with expect(SignatureError, "storage.integrity"):
            st.get(A, 1)
        _sql(env, f"UPDATE records SET {column} = ? WHERE owner = ? AND uid = ?", (original, *where))
        assert st.get(A, 1) == b"bound to its index entry"


def test_uids_on_the_lean_path(tmp_path: Path) -> None:
    """An index hit skips the uid check (the index holds only valid uids); every miss is checked first."""

    class Uid(int):
        pass

    env = StorageEnv(tmp_path / "env").create()
    with _open(env, env.keystore()) as st:
        st.set(A, 1, b"one")
        st.set(A, 2**64 - 1, b"last", flags=NO_REPLAY_PROTECTION)
        assert st.get(A, Uid(1)) == b"one"
        assert st.get(A, 2**64 - 1) == b"last"
        assert st.get_info(A, Uid(2**64 - 1)).size == 4
        for uid in (0, -1, 2**64, True, False, 1.0, "1", None):
            with expect(UsageError, "storage.uid"):
                st.get(A, uid)  # type: ignore[arg-type]
        for uid in (3, Uid(3)):
            with expect(UsageError, "storage.missing"):
                st.get(A, uid)
            with expect(UsageError, "storage.missing"):
                st.get(B, uid)


def test_the_associated_data_is_the_documented_one() -> None:
    ob = A.bytes
    for uid, version, flags, size in ((1, 1, 0, 0), (2**64 - 1, 2**63 - 1, 7, 64 * 1024), (0x0102, 0x0304, 5, 17)):
        expected = (
            b"ism-storage-v1 record"
            + ob
            + uid.to_bytes(8, "big")
            + version.to_bytes(8, "big")
            + flags.to_bytes(4, "big")
            + size.to_bytes(4, "big")
        )
        assert _aad(ob, uid, version, flags, size) == expected
