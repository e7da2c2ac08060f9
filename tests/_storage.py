"""A secure-storage directory for tests: database, root, state MAC key and a software key store."""

from __future__ import annotations

import os
from pathlib import Path

from ism.crypto.keystore.software import SoftwareKeyStore
from ism.device._atomic import Faults
from ism.services.storage import MonotonicCounter, SecureStorage

ROOT_KEY_ID = "storage-root"


class DirKeyFiles:
    """Sealed key blobs, one file each (what the device supplies to the software key store)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def read(self, name: str) -> bytes | None:
        path = self.root / name
        return path.read_bytes() if path.exists() else None

    def write(self, name: str, data: bytes) -> None:
        (self.root / name).write_bytes(data)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)


class StorageEnv:
    """One storage directory, its root optionally bound to a hardware ``counter``."""

    def __init__(self, path: Path, counter: MonotonicCounter | None = None) -> None:
        self.path, self.counter = path, counter
        self.db = path / "storage.sqlite"
        self.root = path / "storage.cose"
        self.keys = path / "keys"

    def create(self) -> StorageEnv:
        """Makes the directory: key-store root key, state MAC key, the storage root key."""
        self.path.mkdir(parents=True)
        (self.path / "keystore-root.key").write_bytes(os.urandom(32))
        (self.path / "state.key").write_bytes(os.urandom(32))
        self.keystore().generate(ROOT_KEY_ID, "hmac-sha256")
        return self

    def keystore(self) -> SoftwareKeyStore:
        return SoftwareKeyStore(DirKeyFiles(self.keys), (self.path / "keystore-root.key").read_bytes())

    def open(self, faults: Faults | None = None, counter: bool = True) -> SecureStorage:
        """The storage, with the counter unless ``counter`` is False."""
        state_key = (self.path / "state.key").read_bytes()
        bound = self.counter if counter else None
        return SecureStorage(self.db, self.root, self.keystore(), ROOT_KEY_ID, state_key, faults, bound)
