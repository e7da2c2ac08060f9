"""Per-microservice secure storage with PSA Protected Storage semantics.

Owns: one SQLite database of records (WAL, ``synchronous=FULL``), each in the
namespace of one microservice (its owner UUID, supplied by the host) under a
``uid`` (u64, 0 is invalid), encrypted through the key store; and the
*freshness root*, a small MAC'd file that vouches for the whole database,
optionally bound to a hardware monotonic counter.
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

The index digest. Two keys are derived from ``state_mac_key``: ``K_rec`` and
``K_top`` (HMAC-SHA-256 of the key over distinct labels; neither is used for
anything else). Every record not flagged ``NO_REPLAY_PROTECTION`` has a
*record MAC* ``m = HMAC-SHA-256(K_rec, owner || uid || version || flags ||
size || SHA-256(nonce || ciphertext || tag))`` (fixed width, 72 bytes). The
state's digest is ``HMAC-SHA-256(K_top, generation || count || A)``, where
``A`` is the XOR of the record MACs of the index (one per ``(owner, uid)``:
the index is a map, so no record appears twice) and ``count`` their number.
``A`` and the record MACs exist only in memory — they are never written
anywhere — so a write updates the digest in O(1) (``A ^= m_old ^ m_new``)
instead of hashing the whole store. At open the digest is recomputed from
every row of the database: that is the check.

Why the XOR is sound here. Model ``HMAC(K_rec, .)`` and ``HMAC(K_top, .)`` as
independent random functions ``F`` and ``G`` (PRF security of HMAC-SHA-256
under keys the attacker does not know). For a database ``D'`` that differs
from the vouched-for ``D`` (as sets of record index entries) to be accepted,
``G(g' || n' || A(D'))`` (generation, count and XOR of ``D'``) must equal a
digest in the root, ``G(g || n || A(D))``, which needs ``(g', n', A(D')) =
(g, n, A(D))`` (else it is a forgery of ``G``, probability ``2^-256``).
``A(D') ^ A(D)`` is the XOR of ``F`` over the symmetric difference of ``D``
and ``D'``: a non-empty set of *distinct* inputs, so for
a random ``F`` it is uniform and zero with probability ``2^-256`` — provided
the attacker's view is independent of ``F``. It is: the only values ever
published that depend on ``F`` go through ``G`` (the digests in roots), and
rows, nonces and ciphertexts do not depend on ``K_rec``. The known attacks
on XOR set hashes (Bellare and Micciancio's on XHASH: linear algebra over GF(2)
once more than 256 element hashes or sums are known; Wagner's generalised
birthday) need those element hashes or sums, and here neither the per-record
values nor any sum of them ever leaves memory. An unkeyed per-record hash, or
writing ``A`` itself into the root, would break this argument. Each guess
costs the attacker one open of the device's storage (an online check), not
an offline search.

The freshness root. It lives in the file ``root_path`` (on a virtual device
beside the database in the device's ``state/`` directory). The file holds two
*slots* of equal size (a multiple of 4096 bytes, so that a torn write of one
never touches the other), each a 4-byte length and a COSE_Mac0 under
``state_mac_key`` whose external AAD ``ism-storage-root-v2 || slot`` binds it
to its slot (a root copied into the other slot does not verify). A root
carries a sequence number (one per root write), the generation (monotonic,
bumped by every write), the committed *state*, while a write is in flight the
*pending* state, and, when the storage has a hardware counter, the counter
value it is bound to. A state is the index digest and the per-owner
``erase_nonce`` map. The *current* root is the valid slot with the higher
sequence. The *anchor* is the slot whose root's newest state (pending if it
has one, else committed) is what the database holds; no write ever touches
it. A root write overwrites the other slot in place and flushes it
(``fdatasync``: one flush, no rename and no directory sync), so a power cut
in it leaves the anchor intact, and a slot that fails its MAC is a torn write
(or damage). A pending root becomes the anchor once its commit has landed, a
settled root as soon as it is written; after a write that failed before its
commit, the anchor stays where it was and the next write overwrites the
useless pending root. If the root outgrows its slot, the file is rewritten
with bigger slots by :func:`~ism.device._atomic.atomic_write` (both slots:
the new root and the anchor).

At open, the digest of the database must equal the current root's newest
state (its pending state if it has one, else its committed state), or — only
if both slots are valid, and the hardware counter (if any) allows it, see
below — its committed state (a write that never committed). Records are then
checked against that verified index at every read.

It defends against, on storage modified offline or under the running store:
a record swapped for another record (the index and the associated data
differ: ``storage.rollback`` at open, ``storage.integrity`` at read), a record
rolled back to an older copy of itself or deleted (``storage.rollback``), the
whole database file rolled back to an earlier copy (``storage.rollback``; the
generation is in the digest, so even a content-identical older file is
refused), a record copied into another namespace (owner in the index and in
the associated data, and another key: ``storage.rollback`` at open,
``storage.integrity`` at read), tampered ciphertext or clear data
(``storage.integrity``), a damaged or deleted root slot (the other slot then
vouches for its newest state only, so a damaged slot never brings back the
state before the last write), and, with a hardware counter, the replay of the
whole state (``storage.rollback-replay``, below).

The hardware counter (``counter``: on TPM-backed devices
:func:`ism.runtime.open_storage` passes a TPM NV counter of the storage's
own). The root records the counter value ``h`` it is bound to; every write
moves the counter by one, *after* its root and its commit are durable:

- current root ``h`` = counter: only its newest state is accepted;
- ``h`` = counter + 1 and a pending state: the power failed before the
  increment — the committed or the pending state is accepted, and if the
  pending one landed the increment is finished;
- anything else — an older root (``h`` below the counter) put back with its
  database, or a root without a binding — is ``storage.rollback-replay``.

So a copy of the whole storage directory (database, root, key files) put back
after any later write is refused: the counter has moved past the copy's
``h``. A root bound to a counter opened without one, or the reverse, is refused
(``storage.root`` / ``storage.rollback-replay``). A storage from before the
binding (format 1) is migrated at open when it has no counter; a counter-bound
storage refuses it (the device needs a factory reset): accepting it would let
any copy made before the upgrade come back.

Its limits: without a hardware counter (software and PKCS#11 devices), a
replay of the whole state — database *and* root file, or an older copy of
one slot of the root (and, for the software key store, the key files) — is not
detected: nothing outside that directory remembers the generation.
Restoring a pre-erase database and root
still leaves the erased records unreadable (their key is gone), but they are
listed. Deleting both the database and the root resets the storage to empty
(with a counter too: a new root binds to the counter's value then). With a
counter, every write is one NV increment: TPM NV memory has a finite write
endurance and a TPM may rate-limit NV writes, so a microservice that writes
very often wears the TPM (no write-rate limit exists yet).
The window of one uncommitted write: while a write is in flight the root
accepts the database with or without it, so a power cut there loses that one
write (the caller never saw it succeed), and an attacker who cuts the power
there can keep it from landing — nothing older can be restored. Records
flagged ``NO_REPLAY_PROTECTION`` may be replayed or deleted individually.

Crash ordering of every write (``set``, ``remove``, ``erase``):

1. write the slot that is not the anchor: ``state`` = the committed state,
   ``pending`` = the new state (new digest, nonces; an erase also lists the
   owner in ``erasing``), ``h`` = counter + 1 if there is a counter;
2. one SQLite transaction: the row change and the database generation
   (fault points ``storage:commit`` before, ``storage:committed`` after);
   the slot of step 1 is now the anchor;
3. erase only: destroy ``storage.<owner>`` (``storage:key-destroyed``);
4. without a counter: write the other slot (the one step 1 did not write)
   with ``state`` = the new state, no ``pending``; it is the anchor;
   with a counter: increment it (``storage:counter``). The root of step 1,
   ``h`` = counter, now accepts only the new state: no second root write
   (should the increment answer another value than ``h``, something else
   moved the counter: a settled root bound to that value is written).

At open: a leftover root temporary is removed; the current root is checked
against the counter as above; if the database matches the newest state the
write landed: destroy the key of every owner in ``erasing``, finish the
counter increment if it is missing, and promote ``pending``; if it matches
the committed state (both slots valid, the counter not yet moved) the write
never committed: drop it (the other slot, the anchor when it was written, is
the anchor again); anything else is ``storage.rollback``. If the current
root had a pending state, or the other slot was not valid, a settled root
(no ``pending``, ``h`` = counter) is written to the slot that is not the
anchor, so an older database copy never matches a settled root, and a power
cut in that write leaves the anchor, which accepts the database. A crash
therefore leaves each record exactly old or new, and an erased namespace
either intact (old key, old nonce, rows) or erased (no rows, new nonce, key
destroyed before anything else runs).

Cost of a write: three flushes without a counter (the slot of step 1, the
SQLite commit, the slot of step 4); with a counter two flushes and one NV
increment (``TpmCounter.increment`` reads the value back: two TPM commands),
plus one flush at every open (the settled root). Before the two-slot root a
write made five flushes: each root write was a temporary file, its fsync, a
rename and a directory fsync. None of the three can go: step 1 must be
durable before the commit (else a committed database has no root that
vouches for it), the commit is the write, and step 4 (or the increment) must
be durable before the write is acknowledged (else a power cut after it
returns, plus the old database put back, would undo a write the caller saw
succeed). A slot write needs no directory sync because it neither creates
nor renames a file. The CPU cost of a write is O(1) in the records of the
store (the digest update) plus O(namespaces) for the root, which lists every
namespace's erase nonce; the quota check sums the written namespace.

A read makes every check, every time: one select by owner and uid that
finds the row only if its version, flags and size are its index entry's, the
row's nonce, tag and body against the entry (lengths, then SHA-256 against
the entry's digest), and one AES-GCM decryption (or tag check) through the
key store under associated data rebuilt from the entry. Nothing about a
record is cached between reads; what is cached is fixed per namespace (the
owner's database spelling and key id) or lives in the key store (the
software key store keeps an ``AESGCM`` object per loaded key and drops it
when the key is destroyed or replaced).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Final, Protocol

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
    "MonotonicCounter",
    "RecordInfo",
    "SecureStorage",
]

WRITE_ONCE: Final = STORAGE_FLAGS["WRITE_ONCE"]
NO_CONFIDENTIALITY: Final = STORAGE_FLAGS["NO_CONFIDENTIALITY"]
NO_REPLAY_PROTECTION: Final = STORAGE_FLAGS["NO_REPLAY_PROTECTION"]
_KNOWN_FLAGS: Final = WRITE_ONCE | NO_CONFIDENTIALITY | NO_REPLAY_PROTECTION

MAX_RECORD_SIZE: Final = 64 * 1024
MAX_UID: Final = 2**64 - 1
#: the largest root file (two slots)
MAX_ROOT_SIZE: Final = 8 * 1024 * 1024
FORMAT: Final = 2
_LEGACY_FORMAT: Final = 1

_LABEL: Final = b"ism-storage-v1"
_ROOT_AAD: Final = b"ism-storage-root-v2"
_LEGACY_ROOT_AAD: Final = b"ism-storage-root-v1"
_SLOT_ALIGN: Final = 4096
_SLOT_LEN: Final = 4
_ERASE_NONCE_SIZE: Final = 16
_GCM_NONCE_SIZE: Final = 12
_GCM_TAG_SIZE: Final = 16
_AAD_PREFIX: Final = _LABEL + b" record"
#: the associated data's fields after the owner: uid, version, flags, size
_AAD_FIELDS: Final = struct.Struct(">QQII")
#: a record's row, found only if its version, flags and size are the index entry's
_SELECT_RECORD: Final = (
    "SELECT nonce, tag, body FROM records WHERE owner = ? AND uid = ? AND version = ? AND flags = ? AND size = ?"
)

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


class MonotonicCounter(Protocol):
    """A hardware monotonic counter (a TPM NV counter, :class:`~ism.crypto.keystore.tpm.TpmCounter`)."""

    def read(self) -> int: ...

    def increment(self) -> int:
        """Adds one, durably, and returns the new value."""
        ...


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
    seq: int
    generation: int
    state: _State
    pending: _State | None
    #: owners the pending write erases (their keys are destroyed once it commits)
    erasing: tuple[bytes, ...] = ()
    #: the hardware counter value this root is bound to (None: the storage has no counter)
    counter: int | None = None

    @property
    def newest(self) -> _State:
        return self.state if self.pending is None else self.pending


Index = dict[bytes, dict[int, _Entry]]


class _IndexMac:
    """The record MACs and the digest of a state (see the module docstring): HMAC-SHA-256 under two keys."""

    def __init__(self, state_mac_key: bytes) -> None:
        rec = hmac.new(state_mac_key, _LABEL + b" record mac", hashlib.sha256).digest()
        top = hmac.new(state_mac_key, _LABEL + b" index digest v2", hashlib.sha256).digest()
        self._rec = hmac.new(rec, digestmod=hashlib.sha256)
        self._top = hmac.new(top, digestmod=hashlib.sha256)

    def record(self, ob: bytes, uid: int, e: _Entry) -> int:
        """The record's MAC as a 256-bit integer (0, the XOR identity, for a record outside the digest)."""
        if e.flags & NO_REPLAY_PROTECTION:
            return 0
        mac = self._rec.copy()
        mac.update(
            ob
            + uid.to_bytes(8, "big")
            + e.version.to_bytes(8, "big")
            + e.flags.to_bytes(4, "big")
            + e.size.to_bytes(4, "big")
            + e.digest
        )
        return int.from_bytes(mac.digest(), "big")

    def accumulate(self, index: Index) -> tuple[int, int]:
        """(XOR of every record MAC, number of records in the digest) over a whole index."""
        acc = count = 0
        for ob, records in index.items():
            for uid, e in records.items():
                if not e.flags & NO_REPLAY_PROTECTION:
                    acc ^= self.record(ob, uid, e)
                    count += 1
        return acc, count

    def digest(self, generation: int, count: int, acc: int) -> bytes:
        mac = self._top.copy()
        mac.update(generation.to_bytes(8, "big") + count.to_bytes(8, "big") + acc.to_bytes(32, "big"))
        return mac.digest()


class SecureStorage:
    """PSA Protected Storage for every microservice of one device.

    Args:
        db_path: the SQLite database (created if missing).
        root_path: the freshness root file (created with an empty database).
        keystore: the device's key store; per-namespace keys are derived in it.
        root_key_id: an ``aes-256`` or ``hmac-sha256`` key the namespace keys are derived from.
        state_mac_key: the device's state MAC key (32 bytes).
        faults: fault injector for power-cut tests.
        counter: a hardware monotonic counter the root is bound to (TPM-backed devices), or None.

    Raises:
        StateCorruptError: ``storage.root`` (no root slot passes its MAC, or the root is malformed),
            ``storage.rollback`` (the database is not the one the root vouches for) or
            ``storage.rollback-replay`` (the root is older than the hardware counter, or not bound to it).
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
        counter: MonotonicCounter | None = None,
    ) -> None:
        if not isinstance(state_mac_key, bytes) or len(state_mac_key) < 32:
            raise UsageError("storage.config", "the state MAC key must be at least 32 bytes")
        self._db_path = db_path
        self._root_path = root_path
        self._keystore = keystore
        self._root_key_id = root_key_id
        self._mac_key = state_mac_key
        self._macs = _IndexMac(state_mac_key)
        self._faults = faults or Faults()
        self._counter = counter
        #: the counter's value as this instance left it (None: unknown, read it before the next write)
        self._hw: int | None = None
        #: owners whose key is known to be the right one for their current erase nonce (this session)
        self._keyed: set[bytes] = set()
        #: the anchor: the slot whose root's newest state is the database's (never written: writes go
        #: to the other slot) and its sealed bytes; the highest root sequence; the slot size
        self._anchor = 0
        self._anchor_root = b""
        self._seq = 0
        self._slot_size = _SLOT_ALIGN
        self._acc = self._count = 0
        #: per namespace: the owner as the database spells it, and its key id (see :meth:`_names`)
        self._owner_names: dict[bytes, tuple[str, str]] = {}
        self._db: sqlite3.Connection | None = self._connect()
        #: the cursor ``get`` reads with (one, rather than a new one per read)
        self._reader = self._db.cursor()
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
        self._acc, self._count = self._macs.accumulate(index)
        db_digest = self._macs.digest(db_generation, self._count, self._acc)
        current = self._counter.read() if self._counter is not None else None
        data = self._read_root_file()
        if data is None:
            if index or db_generation != 0:
                raise StateCorruptError(
                    "storage.rollback",
                    "the storage freshness root is missing but the database is not new",
                    subject=str(self._root_path),
                )
            state = _State(db_digest, {})
            self._create_root_file(_Root(1, 0, state, None, (), current))
            self._hw = current
            return 0, state, index
        if len(data) % (2 * _SLOT_ALIGN):
            return self._migrate(data, db_generation, index, current)
        slot_size, slots = _open_slots(data, self._mac_key, str(self._root_path))
        valid = [(slot, root) for slot, (root, _) in enumerate(slots) if root is not None]
        if not valid:
            raise StateCorruptError(
                "storage.root", "no slot of the storage root passes its integrity check", subject=str(self._root_path)
            )
        slot, root = max(valid, key=lambda v: v[1].seq)
        self._seq, self._slot_size = root.seq, slot_size
        bound = self._check_counter(root, current)
        newest_only = bound or len(valid) < 2  # a damaged slot never brings back the state before the last write
        if hmac.compare_digest(db_digest, root.newest.digest):
            committed, landed = root.newest, root.pending is not None
            self._anchor, self._anchor_root = slot, slots[slot][1]
        elif not newest_only and root.pending is not None and hmac.compare_digest(db_digest, root.state.digest):
            committed, landed = root.state, False  # the pending write never committed
            # The other slot holds the root that was the anchor when this one was written: its newest
            # state is the database's. The settled root below overwrites the dropped one, not it.
            self._anchor, self._anchor_root = 1 - slot, slots[1 - slot][1]
        else:
            raise StateCorruptError(
                "storage.rollback",
                "the storage database is not the one its freshness root vouches for",
                subject=str(self._db_path),
            )
        if landed:
            for owner in root.erasing:
                self._destroy_key(owner)  # an erase committed: finish its crypto-erase
            if self._counter is not None and current is not None and root.counter == current + 1:
                self._faults.point("storage:counter")
                current = self._counter.increment()  # the power failed before the increment: finish it
        self._hw = current
        if root.pending is not None or len(valid) < 2:
            self._write_root(_Root(self._seq + 1, root.generation, committed, None, (), current), anchor=True)
        return root.generation, committed, index

    def _check_counter(self, root: _Root, current: int | None) -> bool:
        """Checks the root against the hardware counter; True if only the root's newest state may be accepted."""
        if self._counter is None or current is None:
            if root.counter is not None:
                raise StateCorruptError(
                    "storage.root",
                    "the storage root is bound to a hardware counter, but the storage was opened without one",
                    subject=str(self._root_path),
                )
            return False
        if root.counter == current:
            return True
        if root.counter == current + 1 and root.pending is not None:
            return False  # written, then the power failed before the counter moved
        raise StateCorruptError(
            "storage.rollback-replay",
            "the storage root is not the one the hardware counter vouches for: a replayed copy of the storage",
            subject=str(self._root_path),
            got=root.counter,
            expected=current,
        )

    def _migrate(self, data: bytes, db_generation: int, index: Index, current: int | None) -> tuple[int, _State, Index]:
        """A root of format 1 (one COSE_Mac0, a digest over every record): checked as then, rewritten as now."""
        if self._counter is not None:
            raise StateCorruptError(
                "storage.rollback-replay",
                "the storage root predates its binding to the hardware counter (a factory reset starts it afresh)",
                subject=str(self._root_path),
            )
        generation, state, pending, erasing = _open_legacy_root(data, self._mac_key, str(self._root_path))
        legacy_key = hmac.new(self._mac_key, _LABEL + b" index digest", hashlib.sha256).digest()
        db_digest = _legacy_index_digest(legacy_key, db_generation, index)
        new_digest = self._macs.digest(db_generation, self._count, self._acc)
        if hmac.compare_digest(db_digest, state[0]):
            nonces = state[1]
        elif pending is not None and hmac.compare_digest(db_digest, pending[0]):
            nonces = pending[1]
            for owner in erasing:
                self._destroy_key(owner)
        else:
            raise StateCorruptError(
                "storage.rollback",
                "the storage database is not the one its freshness root vouches for",
                subject=str(self._db_path),
            )
        committed = _State(new_digest, nonces)
        self._create_root_file(_Root(1, generation, committed, None, (), current))
        return generation, committed, index

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

    def _read_root_file(self) -> bytes | None:
        try:
            data = read_capped(self._root_path, MAX_ROOT_SIZE)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise PlatformError("storage.open", f"cannot read the storage root: {exc}") from exc
        if len(data) > MAX_ROOT_SIZE:
            raise StateCorruptError("storage.root", "the storage root is too large", subject=str(self._root_path))
        return data

    def _create_root_file(self, root: _Root) -> None:
        """A new root file (atomic_write): ``root`` in slot 0 and again, one sequence on, in slot 1."""
        first = _seal_root(root, self._mac_key, 0)
        second = _seal_root(_Root(root.seq + 1, root.generation, root.state, None, (), root.counter), self._mac_key, 1)
        self._replace_root_file([first, second])
        self._anchor, self._anchor_root, self._seq = 1, second, root.seq + 1

    def _replace_root_file(self, sealed: list[bytes]) -> None:
        size = _slot_size_for(max(len(s) for s in sealed))
        if 2 * size > MAX_ROOT_SIZE:
            raise PlatformError("storage.write", "the storage root would be too large (too many namespaces)")
        data = b"".join(_region(s, size) for s in sealed)
        try:
            atomic_write(self._root_path, data, self._faults, mode=0o600)
        except OSError as exc:
            raise PlatformError("storage.write", f"cannot write the storage root: {exc}") from exc
        self._slot_size = size

    def _write_root(self, root: _Root, anchor: bool) -> tuple[int, bytes]:
        """Writes ``root`` to the slot that is not the anchor, in place, and flushes it.

        The anchor's root vouches for the database as it is, so whatever happens to this write
        (torn, lost), the slot that survives untouched accepts the database. With ``anchor`` the
        written root becomes the anchor (its newest state is the database's: a settled root).
        Returns (slot, sealed root).
        """
        slot = 1 - self._anchor
        sealed = _seal_root(root, self._mac_key, slot)
        if _SLOT_LEN + len(sealed) > self._slot_size:
            regions = [sealed, self._anchor_root] if slot == 0 else [self._anchor_root, sealed]
            self._replace_root_file(regions)  # bigger slots: the new root and the anchor
        else:
            name = self._root_path.name
            data = len(sealed).to_bytes(_SLOT_LEN, "big") + sealed
            half = len(data) // 2
            offset = slot * self._slot_size
            try:
                fd = os.open(self._root_path, os.O_WRONLY)
                try:
                    self._faults.point(f"{name}:slot-begin")
                    _pwrite(fd, data[:half], offset)
                    self._faults.point(f"{name}:slot-torn")
                    _pwrite(fd, data[half:], offset + half)
                    _fdatasync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise PlatformError("storage.write", f"cannot write the storage root: {exc}") from exc
            self._faults.point(f"{name}:slot-synced")
        self._seq = root.seq
        if anchor:
            self._anchor, self._anchor_root = slot, sealed
        return slot, sealed

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
        text, key_id = self._names(ob)
        if flags & NO_CONFIDENTIALITY:
            body, tag = data, self._keystore.encrypt(key_id, nonce, b"", aad + data)
        else:
            sealed = self._keystore.encrypt(key_id, nonce, data, aad)
            body, tag = sealed[:-_GCM_TAG_SIZE], sealed[-_GCM_TAG_SIZE:]
        entry = _Entry(version, flags, len(data), _row_digest(nonce, body, tag))
        acc, count = self._acc, self._count
        if old is not None and not old.flags & NO_REPLAY_PROTECTION:
            acc, count = acc ^ self._macs.record(ob, uid, old), count - 1
        if not flags & NO_REPLAY_PROTECTION:
            acc, count = acc ^ self._macs.record(ob, uid, entry), count + 1
        nonces = {**self._committed.nonces, ob: erase_nonce}
        row = (text, _uid_bytes(uid), version, flags, len(data), nonce, tag, body, entry.digest)

        def landed() -> None:
            self._index.setdefault(ob, {})[uid] = entry

        self._apply(
            version,
            acc,
            count,
            nonces,
            [("INSERT OR REPLACE INTO records VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)],
            landed,
        )
        self._keyed.add(ob)

    def get(self, owner: uuid.UUID, uid: int, offset: int = 0, length: int | None = None) -> bytes:
        """Reads ``length`` bytes (default: to the end) from ``offset`` (``psa_ps_get``).

        Raises:
            UsageError: ``storage.uid``, ``storage.missing``, ``storage.range``.
            SignatureError: ``storage.integrity`` for any tampered, moved, replaced or undecryptable record.
        """
        self._conn()
        ob = _owner(owner)
        entry = self._entry(ob, uid)
        size = entry.size
        if not isinstance(offset, int) or isinstance(offset, bool) or not 0 <= offset <= size:
            raise UsageError("storage.range", "offset outside the record", got=offset, expected=f"0..{size}")
        if length is None:
            end = size
        elif isinstance(length, int) and not isinstance(length, bool) and length >= 0:
            end = offset + length
        else:
            end = -1
        if not offset <= end <= size:
            raise UsageError(
                "storage.range", "length runs outside the record", got=length, expected=f"0..{size - offset}"
            )
        text, key_id = self._names(ob)
        try:
            # fetchall: the statement runs to its end, so the reused cursor holds no read transaction open
            rows = self._reader.execute(
                _SELECT_RECORD, (text, _uid_bytes(uid), entry.version, entry.flags, size)
            ).fetchall()
        except sqlite3.Error as exc:
            raise PlatformError("storage.read", f"cannot read the storage: {exc}") from exc
        if len(rows) != 1:
            raise _integrity(owner, uid)
        ((nonce, tag, body),) = rows
        if not _row_matches(nonce, tag, body, entry):
            raise _integrity(owner, uid)
        aad = _aad(ob, uid, entry.version, entry.flags, size)
        try:
            if entry.flags & NO_CONFIDENTIALITY:
                self._keystore.decrypt(key_id, nonce, tag, aad + body)
                data = bytes(body)
            else:
                data = self._keystore.decrypt(key_id, nonce, body + tag, aad)
        except IsmError:
            raise _integrity(owner, uid) from None
        if len(data) != size:
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
        acc, count = self._acc, self._count
        if not entry.flags & NO_REPLAY_PROTECTION:
            acc, count = acc ^ self._macs.record(ob, uid, entry), count - 1

        def landed() -> None:
            records = self._index[ob]
            del records[uid]
            if not records:
                del self._index[ob]

        self._apply(
            self._generation + 1,
            acc,
            count,
            dict(self._committed.nonces),
            [("DELETE FROM records WHERE owner = ? AND uid = ?", (str(owner), _uid_bytes(uid)))],
            landed,
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
        acc, count = self._acc, self._count
        for uid, entry in self._index.get(ob, {}).items():
            if not entry.flags & NO_REPLAY_PROTECTION:
                acc, count = acc ^ self._macs.record(ob, uid, entry), count - 1
        nonces = {**self._committed.nonces, ob: os.urandom(_ERASE_NONCE_SIZE)}

        def landed() -> None:
            self._index.pop(ob, None)

        self._apply(
            self._generation + 1,
            acc,
            count,
            nonces,
            [("DELETE FROM records WHERE owner = ?", (str(owner),))],
            landed,
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
        # An int found in the index is a valid uid (the index holds no other): it is checked when not found.
        entry = self._index.get(ob, {}).get(uid) if type(uid) is int else None
        if entry is None:
            _check_uid(uid)
            entry = self._index.get(ob, {}).get(uid)
            if entry is None:
                raise UsageError("storage.missing", "no such record", subject=f"{uuid.UUID(bytes=ob)}/{uid}")
        return entry

    def _names(self, ob: bytes) -> tuple[str, str]:
        """The owner as the database's ``owner`` column spells it, and its namespace key id (made once)."""
        names = self._owner_names.get(ob)
        if names is None:
            owner = uuid.UUID(bytes=ob)
            names = self._owner_names[ob] = (str(owner), _key_id(owner))
        return names

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
        acc: int,
        count: int,
        nonces: dict[bytes, bytes],
        statements: list[tuple[str, tuple[Any, ...]]],
        landed: Callable[[], None],
        erasing: bytes | None = None,
    ) -> None:
        """One write: pending root, SQLite commit, (erase: key destroyed), settled root or counter increment.

        ``landed`` applies the write to the in-memory index once it has committed.
        """
        target = _State(self._macs.digest(generation, count, acc), nonces)
        self._generation = generation  # never reused, even if this write fails
        bound: int | None = None
        if self._counter is not None:
            if self._hw is None:
                self._hw = self._counter.read()
            bound = self._hw + 1
        erase = () if erasing is None else (erasing,)
        written = self._write_root(_Root(self._seq + 1, generation, self._committed, target, erase, bound), False)
        self._commit(statements, generation)
        self._anchor, self._anchor_root = written  # its pending state is now the database's
        self._committed = target
        self._acc, self._count = acc, count
        landed()
        if erasing is not None:
            self._keyed.discard(erasing)
            self._destroy_key(erasing)
        if self._counter is None:
            self._write_root(_Root(self._seq + 1, generation, target, None), anchor=True)
            return
        self._faults.point("storage:counter")
        self._hw = None  # unknown until the increment answers
        value = self._counter.increment()
        self._hw = value
        if value != bound:
            # Something else moved the counter: bind a settled root to where it is now (this
            # instance knows the state is current), so the next open does not take it for a replay.
            self._write_root(_Root(self._seq + 1, generation, target, None, (), value), anchor=True)

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
    """``"ism-storage-v1 record" || owner || uid (8) || version (8) || flags (4) || size (4)``, big-endian."""
    return _AAD_PREFIX + ob + _AAD_FIELDS.pack(uid, version, flags, size)


def _row_digest(nonce: bytes, body: bytes, tag: bytes) -> bytes:
    return hashlib.sha256(nonce + body + tag).digest()


def _row_matches(nonce: Any, tag: Any, body: Any, entry: _Entry) -> bool:
    """A row's nonce, tag and body against its index entry (its version, flags and size: :data:`_SELECT_RECORD`)."""
    return (
        type(nonce) is bytes
        and len(nonce) == _GCM_NONCE_SIZE
        and type(tag) is bytes
        and len(tag) == _GCM_TAG_SIZE
        and type(body) is bytes
        and len(body) == entry.size
        and hmac.compare_digest(_row_digest(nonce, body, tag), entry.digest)
    )


def _integrity(owner: uuid.UUID, uid: int) -> SignatureError:
    return SignatureError("storage.integrity", "the record fails its integrity check", subject=f"{owner}/{uid}")


# -- the root file: two slots -------------------------------------------------------------------


def _pwrite(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _fdatasync(fd: int) -> None:
    getattr(os, "fdatasync", os.fsync)(fd)


def _slot_size_for(length: int) -> int:
    """The slot size for a sealed root of ``length`` bytes: a power of two, at least 4096."""
    size = _SLOT_ALIGN
    while size < _SLOT_LEN + length:
        size *= 2
    return size


def _region(sealed: bytes, size: int) -> bytes:
    return (len(sealed).to_bytes(_SLOT_LEN, "big") + sealed).ljust(size, b"\0")


def _open_slots(data: bytes, key: bytes, subject: str) -> tuple[int, list[tuple[_Root | None, bytes]]]:
    """(slot size, [(root or None if the slot fails its MAC, its sealed bytes)] for slots 0 and 1)."""
    size = len(data) // 2
    slots: list[tuple[_Root | None, bytes]] = []
    for slot in (0, 1):
        region = data[slot * size : (slot + 1) * size]
        length = int.from_bytes(region[:_SLOT_LEN], "big")
        sealed = region[_SLOT_LEN : _SLOT_LEN + length] if 0 < length <= size - _SLOT_LEN else b""
        slots.append((_open_root(sealed, key, slot, subject) if sealed else None, sealed))
    return size, slots


def _encode_state(state: _State) -> dict[int, Any]:
    return {1: state.digest, 2: dict(state.nonces)}


def _seal_root(root: _Root, key: bytes, slot: int) -> bytes:
    body = {
        1: FORMAT,
        2: root.generation,
        3: _encode_state(root.state),
        4: None if root.pending is None else _encode_state(root.pending),
        5: list(root.erasing),
        6: root.seq,
        7: root.counter,
    }
    return cose.mac0(cbor.dumps(body), key, aad=_ROOT_AAD + bytes([slot]))


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


_MALFORMED: Final = object()


def _verified_payload(data: bytes, key: bytes, aad: bytes) -> Any:
    """The decoded payload of a COSE_Mac0 that verifies, else None."""
    try:
        msg = cose.parse(data, expect="mac0")
        cose.verify_mac0(msg, key, aad=aad)
    except IsmError:
        return None
    try:
        return cbor.loads(msg.payload or b"")
    except IsmError:
        return _MALFORMED


def _open_root(data: bytes, key: bytes, slot: int, subject: str) -> _Root | None:
    """The root in ``slot``; None if it fails its MAC (a torn write, or damage). A root that passes
    its MAC but is malformed is ``storage.root``."""
    body = _verified_payload(data, key, _ROOT_AAD + bytes([slot]))
    if body is None:
        return None
    if isinstance(body, dict) and body.get(1) == FORMAT and set(body) == {1, 2, 3, 4, 5, 6, 7}:
        state = _decode_state(body[3])
        pending = None if body[4] is None else _decode_state(body[4])
        erasing, seq, counter = body[5], body[6], body[7]
        if (
            _is_u64(body[2])
            and _is_u64(seq)
            and (counter is None or _is_u64(counter))
            and state is not None
            and (body[4] is None or pending is not None)
            and isinstance(erasing, list)
            and all(isinstance(o, bytes) and len(o) == 16 for o in erasing)
            and (pending is not None or not erasing)
        ):
            return _Root(seq, body[2], state, pending, tuple(erasing), counter)
    raise StateCorruptError("storage.root", "the storage root is malformed", subject=subject)


# -- format 1 (read once, to migrate) -------------------------------------------------------------

_LegacyState = tuple[bytes, dict[bytes, bytes]]


def _open_legacy_root(
    data: bytes, key: bytes, subject: str
) -> tuple[int, _LegacyState, _LegacyState | None, tuple[bytes, ...]]:
    """(generation, state, pending, erasing) of a format-1 root: one COSE_Mac0, the whole file."""
    body = _verified_payload(data, key, _LEGACY_ROOT_AAD)
    if body is None:
        raise StateCorruptError("storage.root", "the storage root fails its integrity check", subject=subject)
    if isinstance(body, dict) and body.get(1) == _LEGACY_FORMAT and set(body) == {1, 2, 3, 4, 5}:
        state = _decode_state(body[3])
        pending = None if body[4] is None else _decode_state(body[4])
        erasing = body[5]
        if (
            _is_u64(body[2])
            and state is not None
            and (body[4] is None or pending is not None)
            and isinstance(erasing, list)
            and all(isinstance(o, bytes) and len(o) == 16 for o in erasing)
            and (pending is not None or not erasing)
        ):
            return (
                body[2],
                (state.digest, state.nonces),
                None if pending is None else (pending.digest, pending.nonces),
                tuple(erasing),
            )
    raise StateCorruptError("storage.root", "the storage root is malformed", subject=subject)


def _legacy_index_digest(key: bytes, generation: int, index: Index) -> bytes:
    """Format 1's digest: one HMAC over the generation and every replay-protected index entry, in order."""
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
