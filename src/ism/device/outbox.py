"""The durable outbox: violation records kept on the device until the store acknowledges them.

Owns: an append-only SQLite database (WAL, synchronous=FULL) in the device
directory, and listing/acknowledging its records.
Must not import: hypervisor, services, agent, store, cli.

Threat: losing evidence. A record is committed in one SQLite transaction
before the supervisor acts on the fault, so a power cut leaves it either
fully written or not started; acknowledged records are kept (flagged), not
deleted, until compaction. Records and their number are bounded so a
microservice cannot fill the disk through its violations: beyond
``MAX_RECORDS`` the oldest acknowledged records go first, then the oldest
unacknowledged ones (a crash loop is quarantined long before that).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Final

from ism.errors import PlatformError

__all__ = ["MAX_RECORDS", "Outbox"]

MAX_RECORDS: Final = 10_000
MAX_FIELD: Final = 2048

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS violations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ms_uuid TEXT NOT NULL,
    rule TEXT NOT NULL,
    time REAL NOT NULL,
    record TEXT NOT NULL,
    acked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS violations_ms ON violations (ms_uuid);
"""


def _clip(value: Any) -> Any:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[: MAX_FIELD - 3] + "..."
    if isinstance(value, list | tuple):
        return [_clip(v) for v in value[:16]]
    return value


class Outbox:
    """Violation records in ``DIR/state/outbox.sqlite``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise PlatformError("outbox.open", f"cannot open the outbox: {exc}", subject=str(path)) from exc

    def append(self, record: dict[str, Any]) -> int:
        """Durably appends one record; returns its id."""
        body = {k: _clip(v) for k, v in record.items() if k != "id"}
        try:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                cur = self._db.execute(
                    "INSERT INTO violations (ms_uuid, rule, time, record) VALUES (?, ?, ?, ?)",
                    (
                        str(body.get("ms_uuid", "")),
                        str(body.get("rule", "")),
                        float(body.get("time", 0.0)),
                        json.dumps(body, sort_keys=True),
                    ),
                )
                self._compact()
        except sqlite3.Error as exc:
            raise PlatformError("outbox.write", f"cannot write the outbox: {exc}", subject=str(self.path)) from exc
        return int(cur.lastrowid or 0)

    def _compact(self) -> None:
        (count,) = self._db.execute("SELECT COUNT(*) FROM violations").fetchone()
        if count > MAX_RECORDS:
            self._db.execute(
                "DELETE FROM violations WHERE id IN (SELECT id FROM violations ORDER BY acked DESC, id ASC LIMIT ?)",
                (count - MAX_RECORDS,),
            )

    def records(self, include_acked: bool = False) -> list[dict[str, Any]]:
        """Records, oldest first."""
        query = "SELECT id, record, acked FROM violations"
        if not include_acked:
            query += " WHERE acked = 0"
        out = []
        for rid, text, acked in self._db.execute(query + " ORDER BY id"):
            rec = json.loads(text)
            rec["id"] = rid
            rec["acked"] = bool(acked)
            out.append(rec)
        return out

    def acknowledge(self, ids: Iterable[int]) -> int:
        """Marks records as received by the store; returns how many changed."""
        with self._db:
            cur = self._db.executemany("UPDATE violations SET acked = 1 WHERE id = ?", [(int(i),) for i in ids])
        return cur.rowcount

    def close(self) -> None:
        self._db.close()
