"""Per-microservice lifecycle benchmark: a persisted transition, and the read secure boot does, vs raw I/O.

Setup (not timed): a fresh virtual device in a temporary directory with 64
microservice records (``installed``), as ``ism device install`` leaves them.

Timed:

- *transition*: ``suspend`` then ``resume`` of one microservice through
  :class:`ism.device.microservices.MicroserviceStates` — each a locked
  read-verify-modify-write of the MAC'd state file; the suspend also raises
  the ``ms-lifecycle`` anti-rollback counter.
- *load*: what secure boot adds per boot: the state file read and verified
  (MAC, counter, 64 records decoded).

Baselines (the unavoidable work, same run): for *transition*, the same three
crash-safe writes of files of the same sizes (state file twice, counters
once: write, fsync, rename, fsync the directory) with ``ism.device._atomic``;
for *load*, reading the two files and one HMAC-SHA-256 over the state file
with ``hashlib``/``hmac``.

Targets: ``transition / raw <= 1.75`` (a transition also reads and verifies both files under a
lock, and encodes the records); ``load / raw`` is informational (a
fraction of a millisecond per boot either way).

Run from the project root::

    .venv/bin/python benchmarks/ms_lifecycle.py [--quick] [--strict] [--repeat N]
"""

from __future__ import annotations

import hashlib
import hmac
import sys
import tempfile
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Target, check_targets, fmt_time, machine, measure_interleaved, parser
from ism.device._atomic import atomic_write
from ism.device.microservices import MicroserviceStates
from ism.device.virtual import Device

N_SERVICES = 64
TARGET = 1.75


def main() -> int:
    args = parser(__doc__.splitlines()[0]).parse_args()
    repeat = args.repeat or (3 if args.quick else 7)
    number = 5 if args.quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        device = Device.init(Path(tmp) / "dev")
        states = MicroserviceStates(device)
        ids = [uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"ms-{i}") for i in range(N_SERVICES)]
        for ms in ids:
            states.installed(ms, hashlib.sha256(b"developer").digest())  # bound to one signer ID, as installs do
        target = ids[0]
        state_file = device.root / "state" / "microservices.cose"
        counters_file = device.root / "state" / "rollback.cose"

        def transition() -> None:
            states.transition(target, "suspend")
            states.transition(target, "resume")

        transition()  # the counter exists from now on: every suspend afterwards raises it
        state_bytes, counter_bytes = state_file.read_bytes(), counters_file.read_bytes()
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()

        def raw_transition() -> None:
            atomic_write(raw_dir / "state", state_bytes)
            atomic_write(raw_dir / "counters", counter_bytes)
            atomic_write(raw_dir / "state", state_bytes)

        def load() -> None:
            MicroserviceStates(device).load()

        key = device.state_mac_key

        def raw_load() -> None:
            data = state_file.read_bytes()
            counters_file.read_bytes()
            hmac.new(key, data, hashlib.sha256).digest()

        assert MicroserviceStates(device).state(target) == "active"
        t_ours, t_raw, l_ours, l_raw = measure_interleaved(
            [transition, raw_transition, load, raw_load], repeat=repeat, number=number
        )
    print(f"per-microservice lifecycle, {N_SERVICES} records; {machine()}")
    print(
        f"suspend + resume: {fmt_time(t_ours.best)} (raw: three atomic writes, {fmt_time(t_raw.best)}); "
        f"state file read at boot: {fmt_time(l_ours.best)} (raw {fmt_time(l_raw.best)})"
    )
    targets = [
        Target("transition / raw", t_ours.best / t_raw.best, TARGET, upper=True),
        Target("load / raw", l_ours.best / l_raw.best, 20.0, upper=True, informational=True),
    ]
    for t in targets:
        print(t.line())
    return check_targets(targets, args.strict)


if __name__ == "__main__":
    sys.exit(main())
