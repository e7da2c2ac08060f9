"""The durable outbox: records round-trip, survive reopening and crashes, and stay bounded."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ism.device import outbox as outbox_module
from ism.device.outbox import MAX_FIELD, Outbox
from ism.errors import PlatformError


def record(n: int, **extra: Any) -> dict[str, Any]:
    return {
        "ms_uuid": "193cd08e-78fe-47d0-b3ee-50f90988a3bf",
        "name": "analytics",
        "rule": "policy.resource",
        "details": f"violation {n}",
        "time": 1000.0 + n,
        "count": n,
        "action": "restart in 100 ms",
        "backtrace": ["tick", "analytics.wasm+0x12"],
        **extra,
    }


@pytest.fixture
def box(tmp_path: Path) -> Any:
    ob = Outbox(tmp_path / "outbox.sqlite")
    yield ob
    ob.close()


def test_append_records_acknowledge_round_trip(box: Outbox) -> None:
    assert box.records() == []
    ids = [box.append(record(n)) for n in range(3)]
    assert ids == sorted(ids)
    assert len(set(ids)) == 3
    got = box.records()
    assert [r["id"] for r in got] == ids
    for n, rec in enumerate(got):
        assert rec == {**record(n), "id": ids[n], "acked": False}
    assert box.acknowledge([ids[0], ids[2]]) == 2
    assert [r["id"] for r in box.records()] == [ids[1]]
    everything = box.records(include_acked=True)
    assert [(r["id"], r["acked"]) for r in everything] == [(ids[0], True), (ids[1], False), (ids[2], True)]
    assert box.acknowledge([9999]) == 0
    assert box.acknowledge([]) == 0


def test_the_caller_cannot_choose_the_id(box: Outbox) -> None:
    first = box.append(record(0, id=4242))
    assert first != 4242
    assert box.records()[0]["id"] == first


def test_records_survive_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    ob = Outbox(path)
    ids = [ob.append(record(n)) for n in range(4)]
    ob.acknowledge([ids[1]])
    before = ob.records(include_acked=True)
    ob.close()

    again = Outbox(path)
    try:
        assert again.records(include_acked=True) == before
        assert [r["id"] for r in again.records()] == [ids[0], ids[2], ids[3]]
        new = again.append(record(4))
        assert new > ids[-1]  # ids are never reused
    finally:
        again.close()


def test_compaction_keeps_at_most_max_records_and_drops_acknowledged_first(
    box: Outbox, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbox_module, "MAX_RECORDS", 5)
    ids = [box.append(record(n)) for n in range(5)]
    assert len(box.records(include_acked=True)) == 5
    box.acknowledge([ids[1], ids[3]])
    a, b = box.append(record(5)), box.append(record(6))
    kept = box.records(include_acked=True)
    assert len(kept) == 5
    # the two acknowledged records went first, although older unacknowledged ones exist
    assert [r["id"] for r in kept] == [ids[0], ids[2], ids[4], a, b]
    assert not any(r["acked"] for r in kept)
    # with nothing acknowledged left, the oldest records go
    c = box.append(record(7))
    assert [r["id"] for r in box.records(include_acked=True)] == [ids[2], ids[4], a, b, c]
    for n in range(8, 30):
        box.append(record(n))
        assert len(box.records(include_acked=True)) == 5


def test_a_long_field_is_clipped(box: Outbox) -> None:
    long = "A" * (10 * MAX_FIELD)
    box.append(record(0, details=long, backtrace=[long] * 40, target="B" * MAX_FIELD))
    (rec,) = box.records()
    assert MAX_FIELD == 2048
    assert len(rec["details"]) == MAX_FIELD
    assert rec["details"].endswith("...")
    assert rec["details"].startswith("A" * (MAX_FIELD - 3))
    assert len(rec["backtrace"]) == 16  # lists are clipped too, element by element
    assert all(len(frame) == MAX_FIELD for frame in rec["backtrace"])
    assert rec["target"] == "B" * MAX_FIELD  # exactly 2 KiB is not clipped
    assert len(rec["rule"]) < MAX_FIELD


def test_an_unopenable_outbox_is_a_platform_error(tmp_path: Path) -> None:
    with pytest.raises(PlatformError) as info:
        Outbox(tmp_path / "no" / "such" / "dir" / "outbox.sqlite")
    assert info.value.rule == "outbox.open"


_APPEND_FOREVER = """
import sys
from pathlib import Path
from ism.device.outbox import Outbox

box = Outbox(Path(sys.argv[1]))
n = 0
while True:
    box.append({"ms_uuid": "u", "rule": "test.crash", "time": float(n), "seq": n,
                "details": "x" * 1500, "backtrace": ["frame"] * 16, "done": True})
    if n == 0:
        print("appending", flush=True)
    n += 1
"""


def _append_until_killed(path: Path, seconds: float) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _APPEND_FOREVER, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline() if child.stdout else ""
        assert line.strip() == "appending", child.stderr.read() if child.stderr else ""
        time.sleep(seconds)
        assert child.poll() is None, "the child stopped appending by itself"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()


def _check_complete(path: Path) -> list[dict[str, Any]]:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        db.close()
    ob = Outbox(path)
    try:
        recs = ob.records(include_acked=True)
    finally:
        ob.close()
    assert recs, "the child appended nothing"
    ids = [r["id"] for r in recs]
    assert ids == list(range(ids[0], ids[0] + len(ids))), "ids are not contiguous"
    for rec in recs:
        assert rec["rule"] == "test.crash"
        assert rec["details"] == "x" * 1500
        assert rec["backtrace"] == ["frame"] * 16
        assert rec["done"] is True
        assert rec["time"] == float(rec["seq"])
    return recs


def test_a_killed_writer_leaves_only_complete_records(tmp_path: Path) -> None:
    path = tmp_path / "outbox.sqlite"
    _append_until_killed(path, 0.3)
    first = _check_complete(path)
    # the child numbers its records from 0 and ids start at 1: nothing was lost in between
    assert all(r["seq"] == r["id"] - 1 for r in first)
    # a second writer recovers the database and carries on where the first stopped
    _append_until_killed(path, 0.3)
    both = _check_complete(path)
    assert len(both) > len(first) or len(both) == outbox_module.MAX_RECORDS
    assert len(both) <= outbox_module.MAX_RECORDS
    if len(both) < outbox_module.MAX_RECORDS:  # nothing compacted: the first run's records are intact
        assert both[: len(first)] == first
