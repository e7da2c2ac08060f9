"""Per-microservice secure storage with PSA Protected Storage semantics.

Owns: one SQLite database of records (WAL, ``synchronous=FULL``), each in the
namespace of one microservice (its owner UUID, supplied by the host) under a
``uid`` (u64, 0 is invalid), encrypted through the key store; and the
*freshness root*, a small MAC'd file that vouches for the whole database.
Must not import: agent, store, cli, runtime, hostlink.

Flags (``PSA_STORAGE_FLAG_*``): :data:`WRITE_ONCE` (the record can be neither
replaced nor removed; only :meth:`SecureStorage.erase` of the namespace
deletes it), :data:`NO_CONFIDENTIALITY` (stored in clear, still
authenticated), :data:`NO_REPLAY_PROTECTION` (left out of the freshness
digest: an older copy of the record, or its deletion, is not detected, as PSA
allows).

Keys. Each namespace has its own AES-256-GCM key, ``storage.<owner>``, made by
``keystore.derive(root_key_id, "ism-storage-v1" || owner || erase_nonce)``.
The key is derived only while the namespace holds no records (its first
``set`` in a session, or after an erase), each time from a fresh random
``erase_nonce`` that the root then records; a namespace that holds records
uses the key that exists and is never re-derived. So no key an erase destroyed
can be derived again, even from an old root that still holds its nonce. No key
material leaves the key store. The associated data of every record binds the owner
UUID, the uid, the record version (the store-wide generation at its write,
never reused), the flags and the size. A ``NO_CONFIDENTIALITY`` record is
authenticated by an AES-GCM tag over empty plaintext with the data appended
to the associated data. Every decryption/authentication failure of a record
is one :class:`~ism.errors.SignatureError`, ``storage.integrity``.

The freshness root. It lives in the file ``root_path`` (on a virtual device
beside the database in the device's ``state/`` directory), a COSE_Mac0 under
``state_mac_key`` with external AAD ``ism-storage-root-v1``, written only with
:func:`~ism.device._atomic.atomic_write`. Its payload holds the generation
(monotonic, bumped by every write), the committed *state* and, while a write
is in flight, the *pending* state. A state is the per-owner ``erase_nonce``
map and the index digest: HMAC-SHA-256 (key derived from ``state_mac_key``)
over the database's generation and, for every record not flagged
``NO_REPLAY_PROTECTION``, owner, uid, version, flags, size and the SHA-256 of
its stored nonce, ciphertext and tag. At open, the digest of the database must
equal the root's committed digest (or the pending one, see below); records
are then checked against that verified index at every read.

It defends against, on storage modified offline or under the running store:
a record swapped for another record (the index and the associated data
differ: ``storage.rollback`` at open, ``storage.integrity`` at read), a record
rolled back to an older copy of itself or deleted (``storage.rollback``), the
whole database file rolled back to an earlier copy (``storage.rollback``; the
generation is in the digest, so even a content-identical older file is
refused), a record copied into another namespace (owner in the index and in
the associated data, and another key: ``storage.rollback`` at open,
``storage.integrity`` at read), and tampered ciphertext or clear data
(``storage.integrity``).

Its limits: a replay of the whole state — database *and* root file (and, for
the software key store, the key files) — is not detected on a virtual device:
nothing outside that directory remembers the generation. With a TPM or secure
element backend the generation would live in a monotonic NV counter and the
root would be checked against it. Restoring a pre-erase database and root
still leaves the erased records unreadable (their key is gone), but they are
listed. Deleting both the database and the root resets the storage to empty.
The window of one uncommitted write: while a write is in flight (steps 1-4
below) the root accepts the database with or without it, so a power cut there
loses that one write (the caller never saw it succeed), and an attacker who
cuts the power there can keep it from landing — nothing older can be restored. Records
flagged ``NO_REPLAY_PROTECTION`` may be replayed or deleted individually.

Crash ordering of every write (``set``, ``remove``, ``erase``):

1. write the root with ``state`` = the committed state, ``pending`` = the new
   state (new digest, nonces; an erase also lists the owner in ``erasing``);
2. one SQLite transaction: the row change and the database generation
   (fault points ``storage:commit`` before, ``storage:committed`` after);
3. erase only: destroy ``storage.<owner>`` (``storage:key-destroyed``);
4. write the root with ``state`` = the new state, no ``pending``.

At open: a leftover root temporary is removed; if the database matches
``state`` it is current (a ``pending`` write never committed: drop it); if it
matches ``pending`` the write committed but the root was not finished:
destroy the key of every owner in ``erasing``, then promote ``pending``;
anything else is ``storage.rollback``. Either way the root is rewritten
without ``pending``, so an older database copy never matches a settled root.
A crash therefore leaves each record exactly old or new, and an erased
namespace either intact (old key, old nonce, rows) or erased (no rows, new
nonce, key destroyed before anything else runs).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from ism.crypto import cose
from ism.crypto.keystore import KeyStore
from ism.device._atomic import TMP_SUFFIX, Faults, atomic_write, read_capped
from ism.errors import IsmError, PlatformError, SignatureError, StateCorruptError, UsageError
from ism.formats import cbor
from ism.formats.abi import STORAGE_FLAGS

__all__ = [
    "MAX_RECORD_SIZE",
    "NO_CONFIDENTIALITY",
    "NO_REPLAY_PROTECTION",
    "WRITE_ONCE",
    "RecordInfo",
    "SecureStorage",
]

WRITE_ONCE: Final = STORAGE_FLAGS["WRITE_ONCE"]
NO_CONFIDENTIALITY: Final = STORAGE_FLAGS["NO_CONFIDENTIALITY"]
NO_REPLAY_PROTECTION: Final = STORAGE_FLAGS["NO_REPLAY_PROTECTION"]
_KNOWN_FLAGS: Final = WRITE_ONCE | NO_CONFIDENTIALITY | NO_REPLAY_PROTECTION

MAX_RECORD_SIZE: Final = 64 * 1024
MAX_UID: Final = 2**64 - 1
MAX_ROOT_SIZE: Final = 4 * 1024 * 1024
FORMAT: Final = 1

_LABEL: Final = b"ism-storage-v1"
_ROOT_AAD: Final = b"ism-storage-root-v1"
_ERASE_NONCE_SIZE: Final = 16
_GCM_NONCE_SIZE: Final = 12
_GCM_TAG_SIZE: Final = 16

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS records (
    owner TEXT NOT NULL,
    uid BLOB NOT NULL,
    version INTEGER NOT NULL,
    flags INTEGER NOT NULL,
    size INTEGER NOT NULL,
    nonce BLOB NOT NULL,
    tag BLOB NOT NULL,
    body BLOB NOT NULL,
    digest BLOB NOT NULL,
    PRIMARY KEY (owner, uid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    id INTEGER PRIMARY KEY CHECK (id = 0),
    generation INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (id, generation) VALUES (0, 0);
"""


@dataclass(frozen=True, slots=True)
class RecordInfo:
    """What ``psa_ps_get_info`` returns: data size, creation flags, and the record's version."""

    size: int
    flags: int
    version: int


@dataclass(frozen=True, slots=True)
class _Entry:
    """One record in the verified index (no data)."""

    version: int
    flags: int
    size: int
    digest: bytes  # SHA-256(nonce || body || tag) as stored


@dataclass(frozen=True, slots=True)
class _State:
    """What the root vouches for: the index digest and the per-owner erase nonces."""

    digest: bytes
    nonces: dict[bytes, bytes]


@dataclass(frozen=True, slots=True)
class _Root:
    generation: int
    state: _State
    pending: _State | None
    #: owners the pending write erases (their keys are destroyed once it commits)
    erasing: tuple[bytes, ...] = ()


Index = dict[bytes, dict[int, _Entry]]


class SecureStorage:
    """PSA Protected Storage for every microservice of one device.

    Args:
        db_path: the SQLite database (created if missing).
        root_path: the freshness root file (created with an empty database).
        keystore: the device's key store; per-namespace keys are derived in it.
        root_key_id: an ``aes-256`` or ``hmac-sha256`` key the namespace keys are derived from.
        state_mac_key: the device's state MAC key (32 bytes).
        faults: fault injector for power-cut tests.

    Raises:
        StateCorruptError: ``storage.root`` (root fails its MAC) or
            ``storage.rollback`` (the database is not the one the root vouches for).
        PlatformError: ``storage.open`` if the database cannot be opened.

    One instance owns the files; it is not meant for concurrent use from several threads.
    """

    def __init__(
        self,
        db_path: Path,
        root_path: Path,
        keystore: KeyStore,
        root_key_id: str,
        state_mac_key: bytes,
        faults: Faults | None = None,
    ) -> None:
        if not isinstance(state_mac_key, bytes) or len(state_mac_key) < 32:
            raise UsageError("storage.config", "the state MAC key must be at least 32 bytes")
        self._db_path = db_path
        self._root_path = root_path
        self._keystore = keystore
        self._root_key_id = root_key_id
        self._mac_key = state_mac_key
        self._index_key = hmac.new(state_mac_key, _LABEL + b" index digest", hashlib.sha256).digest()
        self._faults = faults or Faults()
        #: owners whose key is known to be the right one for their current erase nonce (this session)
        self._keyed: set[bytes] = set()
        self._db: sqlite3.Connection | None = self._connect()
        try:
            self._generation, self._committed, self._index = self._recover()
        except BaseException:
            self._db.close()
            self._db = None
            raise

    # -- opening and recovery ---------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self._db_path, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise PlatformError("storage.open", f"cannot open the storage: {exc}", subject=str(self._db_path)) from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            db.close()
            raise PlatformError("storage.open", f"cannot open the storage: {exc}", subject=str(self._db_path)) from exc
        return db

    def _recover(self) -> tuple[int, _State, Index]:
        self._root_path.with_name(self._root_path.name + TMP_SUFFIX).unlink(missing_ok=True)
        db_generation, index = self._load_index()
        db_digest = _index_digest(self._index_key, db_generation, index)
        root = self._read_root()
        if root is None:
            if index or db_generation != 0:
                raise StateCorruptError(
                    "storage.rollback",
                    "the storage freshness root is missing but the database is not new",
                    subject=str(self._root_path),
                )
            root = _Root(0, _State(db_digest, {}), None)
            self._write_root(root)
        if hmac.compare_digest(db_digest, root.state.digest):
            committed = root.state  # a pending write, if any, never committed
        elif root.pending is not None and hmac.compare_digest(db_digest, root.pending.digest):
            committed = root.pending  # committed, but the root was not settled
            for owner in root.erasing:
                self._destroy_key(owner)  # an erase committed: finish its crypto-erase
        else:
            raise StateCorruptError(
                "storage.rollback",
                "the storage database is not the one its freshness root vouches for",
                subject=str(self._db_path),
            )
        if root.pending is not None:
            self._write_root(_Root(root.generation, committed, None))
        return root.generation, committed, index

    def _load_index(self) -> tuple[int, Index]:
        db = self._conn()
        try:
            rows = db.execute("SELECT owner, uid, version, flags, size, digest FROM records").fetchall()
            meta = db.execute("SELECT generation FROM meta WHERE id = 0").fetchone()
        except sqlite3.Error as exc:
            raise PlatformError("storage.open", f"cannot read the storage: {exc}", subject=str(self._db_path)) from exc
        if meta is None or not _is_u64(meta[0]):
            raise StateCorruptError("storage.rollback", "the storage database has no valid generation")
        index: Index = {}
        for owner, uid_bytes, version, flags, size, digest in rows:
            try:
                owner_uuid = uuid.UUID(owner)
            except (TypeError, ValueError, AttributeError):
                owner_uuid = None
            if (
                owner_uuid is None
                or str(owner_uuid) != owner
                or not isinstance(uid_bytes, bytes)
                or len(uid_bytes) != 8
                or int.from_bytes(uid_bytes, "big") == 0
                or not _is_u64(version)
                or not _is_u64(flags)
                or flags & ~_KNOWN_FLAGS
                or not _is_u64(size)
                or size > MAX_RECORD_SIZE
                or not isinstance(digest, bytes)
                or len(digest) != 32
            ):
                raise StateCorruptError("storage.rollback", "a storage record row is malformed", subject=str(owner))
            index.setdefault(owner_uuid.bytes, {})[int.from_bytes(uid_bytes, "big")] = _Entry(
                version, flags, size, digest
            )
        return meta[0], index

    def _read_root(self) -> _Root | None:
        try:
            data = read_capped(self._root_path, MAX_ROOT_SIZE)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PlatformError("storage.open", f"cannot read the storage root: {exc}") from exc
        return _open_root(data, self._mac_key, str(self._root_path))

    def _write_root(self, root: _Root) -> None:
        try:
            atomic_write(self._root_path, _seal_root(root, self._mac_key), self._faults, mode=0o600)
        except OSError as exc:
            raise PlatformError("storage.write", f"cannot write the storage root: {exc}") from exc

    # -- the PSA Protected Storage operations ------------------------------------------------------

    def set(self, owner: uuid.UUID, uid: int, data: bytes, flags: int = 0, quota: int | None = None) -> None:
        """Creates or replaces a record (``psa_ps_set``).

        Args:
            owner: the microservice whose namespace this is.
            uid: the record id, 1 .. 2**64-1.
            data: at most :data:`MAX_RECORD_SIZE` bytes.
            flags: ``WRITE_ONCE | NO_CONFIDENTIALITY | NO_REPLAY_PROTECTION``.
            quota: the most bytes the namespace may hold after this write.

        Raises:
            UsageError: ``storage.uid``, ``storage.flags``, ``storage.size``,
                ``storage.write-once``, ``storage.quota`` (nothing is written).
            SignatureError: ``storage.integrity`` if the namespace holds records but its key is gone.
        """
        self._conn()
        ob = _owner(owner)
        _check_uid(uid)
        if not isinstance(flags, int) or isinstance(flags, bool) or flags < 0 or flags & ~_KNOWN_FLAGS:
            raise UsageError("storage.flags", "unknown storage flags", got=flags)
        if not isinstance(data, bytes | bytearray | memoryview):
            raise UsageError("storage.size", "record data must be bytes", got=type(data).__name__)
        data = bytes(data)
        if len(data) > MAX_RECORD_SIZE:
            raise UsageError("storage.size", "record is too large", got=len(data), expected=f"<= {MAX_RECORD_SIZE}")
        records = self._index.get(ob, {})
        old = records.get(uid)
        if old is not None and old.flags & WRITE_ONCE:
            raise UsageError("storage.write-once", "the record was created write-once", subject=f"{owner}/{uid}")
        if quota is not None:
            if not isinstance(quota, int) or isinstance(quota, bool) or quota < 0:
                raise UsageError("storage.quota", "the quota must be a non-negative integer", got=quota)
            used = sum(e.size for e in records.values()) - (old.size if old else 0) + len(data)
            if used > quota:
                raise UsageError(
                    "storage.quota",
                    "the namespace would exceed its quota",
                    subject=str(owner),
                    got=used,
                    expected=f"<= {quota}",
                )
        erase_nonce = self._prepare_key(owner)
        version = self._generation + 1
        nonce = os.urandom(_GCM_NONCE_SIZE)
        aad = _aad(ob, uid, version, flags, len(data))
        key_id = _key_id(owner)
        if flags & NO_CONFIDENTIALITY:
            body, tag = data, self._keystore.encrypt(key_id, nonce, b"", aad + data)
        else:
            sealed = self._keystore.encrypt(key_id, nonce, data, aad)
            body, tag = sealed[:-_GCM_TAG_SIZE], sealed[-_GCM_TAG_SIZE:]
        entry = _Entry(version, flags, len(data), _row_digest(nonce, body, tag))
        index = {**self._index, ob: {**records, uid: entry}}
        nonces = {**self._committed.nonces, ob: erase_nonce}
        row = (str(owner), _uid_bytes(uid), version, flags, len(data), nonce, tag, body, entry.digest)
        self._apply(
            version,
            index,
            nonces,
            [("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)],
        )
        self._keyed.add(ob)

    def get(self, owner: uuid.UUID, uid: int, offset: int = 0, length: int | None = None) -> bytes:
        """Reads ``length`` bytes (default: to the end) from ``offset`` (``psa_ps_get``).

        Raises:
            UsageError: ``storage.uid``, ``storage.missing``, ``storage.range``.
            SignatureError: ``storage.integrity`` for any tampered, moved, replaced or undecryptable record.
        """
        db = self._conn()
        ob = _owner(owner)
        entry = self._entry(ob, uid)
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= entry.size:
            raise UsageError("storage.range", "offset outside the record", got=offset, expected=f"0..{entry.size}")
        if length is None:
            end = entry.size
        elif isinstance(length, int) and not isinstance(length, bool) and length >= 0:
            end = offset + length
        else:
            end = -1
        if not offset <= end <= entry.size:
            raise UsageError(
                "storage.range", "length runs outside the record", got=length, expected=f"0..{entry.size - offset}"
            )
        try:
            row = db.execute(
                "SELECT version, flags, size, nonce, tag, body FROM records WHERE owner = ? AND uid = ?",
                (str(owner), _uid_bytes(uid)),
            ).fetchone()
        except sqlite3.Error as exc:
            raise PlatformError("storage.read", f"cannot read the storage: {exc}") from exc
        if row is None or not _row_matches(row, entry):
            raise _integrity(owner, uid)
        _, flags, size, nonce, tag, body = row
        aad = _aad(ob, uid, entry.version, flags, size)
        try:
            if flags & NO_CONFIDENTIALITY:
                self._keystore.decrypt(_key_id(owner), nonce, tag, aad + body)
                data = bytes(body)
            else:
                data = self._keystore.decrypt(_key_id(owner), nonce, body + tag, aad)
        except IsmError:
            raise _integrity(owner, uid) from None
        if len(data) != entry.size:
            raise _integrity(owner, uid)
        return data[offset:end]

    def get_info(self, owner: uuid.UUID, uid: int) -> RecordInfo:
        """Size, flags and version of a record (``psa_ps_get_info``); the data is not read."""
        self._conn()
        entry = self._entry(_owner(owner), uid)
        return RecordInfo(entry.size, entry.flags, entry.version)

    def remove(self, owner: uuid.UUID, uid: int) -> None:
        """Deletes a record (``psa_ps_remove``).

        Raises:
            UsageError: ``storage.uid``, ``storage.missing``, ``storage.write-once``.
        """
        self._conn()
        ob = _owner(owner)
        entry = self._entry(ob, uid)
        if entry.flags & WRITE_ONCE:
            raise UsageError("storage.write-once", "a write-once record cannot be removed", subject=f"{owner}/{uid}")
        records = {k: v for k, v in self._index[ob].items() if k != uid}
        index = {k: v for k, v in self._index.items() if k != ob}
        if records:
            index[ob] = records
        self._apply(
            self._generation + 1,
            index,
            dict(self._committed.nonces),
            [("DELETE FROM records WHERE owner = ? AND uid = ?", (str(owner), _uid_bytes(uid)))],
        )

    def usage(self, owner: uuid.UUID) -> int:
        """Bytes of data the namespace holds (what a quota limits; overheads not counted)."""
        self._conn()
        return sum(e.size for e in self._index.get(_owner(owner), {}).values())

    def uids(self, owner: uuid.UUID) -> list[int]:
        """The uids present in a namespace, ascending."""
        self._conn()
        return sorted(self._index.get(_owner(owner), {}))

    def erase(self, owner: uuid.UUID) -> None:
        """Crypto-erases a namespace: its rows (write-once ones too), its key, and a fresh erase nonce.

        A copy of the old database is unreadable afterwards even with the
        device's keys: the old namespace key is destroyed, and a new one can
        only be derived from the new erase nonce.
        """
        self._conn()
        ob = _owner(owner)
        index = {k: v for k, v in self._index.items() if k != ob}
        nonces = {**self._committed.nonces, ob: os.urandom(_ERASE_NONCE_SIZE)}
        self._apply(
            self._generation + 1,
            index,
            nonces,
            [("DELETE FROM records WHERE owner = ?", (str(owner),))],
            erasing=ob,
        )

    def namespace_keys(self) -> list[str]:
        """The key-store ids of every namespace key the storage may hold: namespaces with records, or with
        an erase nonce (a key was derived for them). A factory reset destroys them all."""
        owners = set(self._index) | set(self._committed.nonces)
        return sorted(_key_id(uuid.UUID(bytes=ob)) for ob in owners)

    def close(self) -> None:
        """Closes the database; nothing is written."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def __enter__(self) -> SecureStorage:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise UsageError("storage.closed", "the storage is closed", subject=str(self._db_path))
        return self._db

    def _entry(self, ob: bytes, uid: int) -> _Entry:
        _check_uid(uid)
        entry = self._index.get(ob, {}).get(uid)
        if entry is None:
            raise UsageError("storage.missing", "no such record", subject=f"{uuid.UUID(bytes=ob)}/{uid}")
        return entry

    def _prepare_key(self, owner: uuid.UUID) -> bytes:
        """Makes sure the namespace key exists; returns the namespace's erase nonce."""
        ob = owner.bytes
        nonce = self._committed.nonces.get(ob)
        if ob in self._keyed and nonce is not None:
            return nonce
        if self._index.get(ob):
            # The namespace holds records: use its key, never re-derive it (that could undo an erase).
            if nonce is None or not self._keystore.exists(_key_id(owner)):
                raise SignatureError("storage.integrity", "the namespace's key is gone", subject=str(owner))
            self._keyed.add(ob)
            return nonce
        # No records: derive a key from a fresh nonce, so no earlier key (whose nonce a restored
        # old root may still hold) can ever be derived again.
        nonce = os.urandom(_ERASE_NONCE_SIZE)
        self._keystore.derive(self._root_key_id, _LABEL + ob + nonce, _key_id(owner), "aes-256")
        return nonce

    def _destroy_key(self, ob: bytes) -> None:
        key_id = _key_id(uuid.UUID(bytes=ob))
        if self._keystore.exists(key_id):
            self._keystore.destroy(key_id)
        self._faults.point("storage:key-destroyed")

    def _apply(
        self,
        generation: int,
        index: Index,
        nonces: dict[bytes, bytes],
        statements: list[tuple[str, tuple[Any, ...]]],
        erasing: bytes | None = None,
    ) -> None:
        """One write: pending root, SQLite commit, (erase: key destroyed), settled root."""
        target = _State(_index_digest(self._index_key, generation, index), nonces)
        self._generation = generation  # never reused, even if this write fails
        self._write_root(_Root(generation, self._committed, target, () if erasing is None else (erasing,)))
        self._commit(statements, generation)
        self._committed = target
        self._index = index
        if erasing is not None:
            self._keyed.discard(erasing)
            self._destroy_key(erasing)
        self._write_root(_Root(generation, target, None))

    def _commit(self, statements: list[tuple[str, tuple[Any, ...]]], generation: int) -> None:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, params in statements:
                    db.execute(sql, params)
                db.execute("UPDATE meta SET generation = ? WHERE id = 0", (generation,))
                self._faults.point("storage:commit")
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise PlatformError("storage.write", f"cannot write the storage: {exc}") from exc
        self._faults.point("storage:committed")


# -- helpers --------------------------------------------------------------------------------------


def _is_u64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_UID


def _owner(owner: uuid.UUID) -> bytes:
    if not isinstance(owner, uuid.UUID):
        raise UsageError("storage.owner", "the owner must be a microservice UUID", got=type(owner).__name__)
    return owner.bytes


def _check_uid(uid: int) -> None:
    if not _is_u64(uid) or uid == 0:
        raise UsageError("storage.uid", "uid must be an integer in 1..2**64-1", got=uid)


def _uid_bytes(uid: int) -> bytes:
    return uid.to_bytes(8, "big")


def _key_id(owner: uuid.UUID) -> str:
    return f"storage.{owner}"


def _aad(ob: bytes, uid: int, version: int, flags: int, size: int) -> bytes:
    return (
        _LABEL
        + b" record"
        + ob
        + uid.to_bytes(8, "big")
        + version.to_bytes(8, "big")
        + flags.to_bytes(4, "big")
        + size.to_bytes(4, "big")
    )


def _row_digest(nonce: bytes, body: bytes, tag: bytes) -> bytes:
    return hashlib.sha256(nonce + body + tag).digest()


def _row_matches(row: tuple[Any, ...], entry: _Entry) -> bool:
    version, flags, size, nonce, tag, body = row
    return (
        version == entry.version
        and flags == entry.flags
        and size == entry.size
        and isinstance(nonce, bytes)
        and len(nonce) == _GCM_NONCE_SIZE
        and isinstance(tag, bytes)
        and len(tag) == _GCM_TAG_SIZE
        and isinstance(body, bytes)
        and len(body) == size
        and hmac.compare_digest(_row_digest(nonce, body, tag), entry.digest)
    )


def _integrity(owner: uuid.UUID, uid: int) -> SignatureError:
    return SignatureError("storage.integrity", "the record fails its integrity check", subject=f"{owner}/{uid}")


def _index_digest(key: bytes, generation: int, index: Index) -> bytes:
    """HMAC over the generation and every replay-protected record's fixed-width index entry, in order."""
    mac = hmac.new(key, generation.to_bytes(8, "big"), hashlib.sha256)
    for ob in sorted(index):
        records = index[ob]
        for uid in sorted(records):
            e = records[uid]
            if e.flags & NO_REPLAY_PROTECTION:
                continue
            mac.update(
                ob
                + uid.to_bytes(8, "big")
                + e.version.to_bytes(8, "big")
                + e.flags.to_bytes(4, "big")
                + e.size.to_bytes(4, "big")
                + e.digest
            )
    return mac.digest()


def _encode_state(state: _State) -> dict[int, Any]:
    return {1: state.digest, 2: dict(state.nonces)}


def _seal_root(root: _Root, key: bytes) -> bytes:
    body = {
        1: FORMAT,
        2: root.generation,
        3: _encode_state(root.state),
        4: None if root.pending is None else _encode_state(root.pending),
        5: list(root.erasing),
    }
    return cose.mac0(cbor.dumps(body), key, aad=_ROOT_AAD)


def _decode_state(value: Any) -> _State | None:
    if not isinstance(value, dict) or set(value) != {1, 2}:
        return None
    digest, nonces = value[1], value[2]
    if not isinstance(digest, bytes) or len(digest) != 32 or not isinstance(nonces, dict):
        return None
    for owner, nonce in nonces.items():
        if not (isinstance(owner, bytes) and len(owner) == 16 and isinstance(nonce, bytes)):
            return None
        if len(nonce) != _ERASE_NONCE_SIZE:
            return None
    return _State(digest, dict(nonces))


def _open_root(data: bytes, key: bytes, subject: str) -> _Root:
    try:
        msg = cose.parse(data, expect="mac0")
        cose.verify_mac0(msg, key, aad=_ROOT_AAD)
        body = cbor.loads(msg.payload or b"")
    except IsmError:
        raise StateCorruptError("storage.root", "the storage root fails its integrity check", subject=subject) from None
    if isinstance(body, dict) and body.get(1) == FORMAT and set(body) == {1, 2, 3, 4, 5} and _is_u64(body[2]):
        state = _decode_state(body[3])
        pending = None if body[4] is None else _decode_state(body[4])
        erasing = body[5]
        if (
            state is not None
            and (body[4] is None or pending is not None)
            and isinstance(erasing, list)
            and all(isinstance(o, bytes) and len(o) == 16 for o in erasing)
            and (pending is not None or not erasing)
        ):
            return _Root(body[2], state, pending, tuple(erasing))
    raise StateCorruptError("storage.root", "the storage root is malformed", subject=subject)
