"""The C example end to end: ``include/ism.h`` compiled by clang, and a C microservice run on a device.

``examples/sealed-counter/sealed-counter.c`` is compiled from source here with Debian's clang for
wasm32 and linked with wasm-ld, exactly as ``examples/build.py`` (and ``make examples``) does. Its
import section is checked against the ABI table; it is signed, installed on a fresh device and run
by the real supervisor. Its counter must survive activations, reboots (in-process and through
``ism device run``) and end with a crypto-erase; each value must carry a signature that verifies
under the key the device reports; a policy that withdraws its storage stops it with a record naming
the rule, and so do a key without the ``sign`` usage and a quota too small for its record.

There is no skip: without clang and wasm-ld these tests fail (``make test`` installs them).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from _cli import ism, ism_ok
from ism.formats import wasm
from ism.formats.abi import HOST_ABI, MODULE
from ism.formats.board import parse_board
from ism.formats.policy import parse_policy
from ism.hypervisor.supervisor import State
from ism.runtime import Runtime

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "sealed-counter"
SOURCE = EXAMPLE / "sealed-counter.c"
META = EXAMPLE / "sealed-counter.toml"
POLICY = EXAMPLE / "policy.toml"
BOARD = ROOT / "examples" / "fingerprint-token" / "board.toml"
NAME, KEY = "sealed-counter", "heartbeat"
DOMAIN = b"ism.sealed-counter.v1"
LINE = re.compile(r"sealed-counter: epoch=([0-9a-f]{32}) count=(\d+) t=(\d+) sig=([0-9a-f]{128})")
POLICY_TEXT = POLICY.read_text()
GRANT = 'keys = { heartbeat = { type = "ecc-p256", usage = ["sign", "export-public"] } }'


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("ism_examples_build", ROOT / "examples" / "build.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


build = _load_build()


@pytest.fixture(scope="module")
def toolchain() -> Any:
    found = build.find_toolchain()
    if found is None:
        pytest.fail(build.INSTALL_HINT)
    return found


def edited(old: str, new: str) -> str:
    assert POLICY_TEXT.count(old) == 1, old
    return POLICY_TEXT.replace(old, new)


# -- the header, compiled ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        ("-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"),
        ("-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic"),
        ("-std=c17", "-Wall", "-Wextra", "-Werror", "-pedantic"),
        ("-std=c11", "-Weverything", "-Werror"),
    ],
    ids=["c99", "c11", "c17", "c11-everything"],
)
def test_the_header_compiles_alone_with_every_warning_an_error(
    toolchain: Any, tmp_path: Path, flags: tuple[str, ...]
) -> None:
    unit = tmp_path / "header.c"
    unit.write_text('#include "ism.h"\n')
    include, obj = f"-I{ROOT / 'include'}", str(tmp_path / "header.o")
    done = subprocess.run(
        [toolchain.clang, "--target=wasm32", "-ffreestanding", *flags, include, "-c", str(unit), "-o", obj],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_the_header_declares_exactly_the_abi_table(toolchain: Any, tmp_path: Path) -> None:
    """A module that calls every function of ism.h imports exactly HOST_ABI, with the table's wasm types."""
    calls = "\n".join(
        f"    (void)ism_{name}({', '.join(['0'] * len(ftype.params))});" for (_, name), ftype in HOST_ABI.items()
    )
    unit = tmp_path / "every.c"
    unit.write_text(f'#include "ism.h"\n\nISM_EXPORT("init") int32_t init(void) {{\n{calls}\n    return 0;\n}}\n')
    build.compile_c(unit, tmp_path / "every.wasm", toolchain)
    module = wasm.parse_module((tmp_path / "every.wasm").read_bytes())
    assert {(imp.module, imp.name): imp.type for imp in module.imports} == dict(HOST_ABI)
    assert all(imp.kind == "func" for imp in module.imports)
    wasm.check_imports(module, HOST_ABI)


# -- the example, compiled -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def counter_wasm(toolchain: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sealed-counter.c compiled from source (with the flags of examples/build.py)."""
    out = tmp_path_factory.mktemp("sealed-counter") / "sealed-counter.wasm"
    build.compile_c(SOURCE, out, toolchain)
    return out


def test_the_example_imports_only_host_abi_functions(counter_wasm: Path) -> None:
    module = wasm.parse_module(counter_wasm.read_bytes())
    wasm.check_imports(module, HOST_ABI)  # what package build and device install check
    assert {imp.module for imp in module.imports} == {MODULE}
    assert {imp.name for imp in module.imports} == {
        "storage_get",
        "storage_set",
        "random",
        "key_open",
        "key_sign",
        "time_ms",
        "log",
    }
    assert {(e.name, e.kind) for e in module.exports} == {("memory", "memory"), ("init", "func"), ("tick", "func")}
    assert module.memory_min_pages == 1  # fits the policy's default of 2 pages


def test_a_libc_call_fails_the_link_instead_of_becoming_an_import(toolchain: Any, tmp_path: Path) -> None:
    unit = tmp_path / "libc.c"
    unit.write_text(
        '#include "ism.h"\nvoid *memset(void *, int, unsigned long);\n'
        'ISM_EXPORT("init") int32_t init(void) {\n    char buf[64];\n    memset(buf, 0, sizeof buf);\n'
        "    ism_log(1, buf, 1);\n    return 0;\n}\n"
    )
    with pytest.raises(build.BuildError, match="undefined symbol: memset"):
        build.compile_c(unit, tmp_path / "libc.wasm", toolchain)
    assert not (tmp_path / "libc.wasm").exists()


# -- the example, on a device --------------------------------------------------------------------


@pytest.fixture(scope="module")
def package(counter_wasm: Path) -> dict[str, Path]:
    """The example signed into a package with a fresh developer key."""
    work = counter_wasm.parent
    ism_ok("keygen", "--alg", "es256", "--out", work / "developer.pem")
    ism_ok(
        "package",
        "build",
        "--wasm",
        counter_wasm,
        "--meta",
        META,
        "--key",
        work / "developer.pem",
        "--out",
        work / "sealed-counter.suit",
    )
    return {"suit": work / "sealed-counter.suit", "anchor": work / "developer.pub.pem"}


def new_device(tmp_path: Path, package: dict[str, Path], policy_text: str = POLICY_TEXT) -> Path:
    dev = tmp_path / "device"
    ism_ok("device", "init", dev)
    ism_ok("device", "trust", dev, "--add", package["anchor"])
    policy = tmp_path / "policy.toml"
    policy.write_text(policy_text)
    ism_ok("device", "configure", dev, "--board", BOARD, "--policy", policy)
    ism_ok("device", "install", dev, package["suit"])
    return dev


@pytest.fixture
def device(tmp_path: Path, package: dict[str, Path]) -> Path:
    """A fresh device with the reference board, the example's policy and the example installed."""
    return new_device(tmp_path, package)


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Session:
    """The device booted in-process on a test clock, collecting what the microservice logs."""

    def __init__(self, dev: Path) -> None:
        self.clock = Clock()
        self.lines: list[tuple[int, str]] = []
        self.runtime = Runtime.start(dev, clock=self.clock, on_log=self._log)

    def _log(self, name: str, level: int, text: str) -> None:
        assert name == NAME
        self.lines.append((level, text))

    def steps(self, n: int, period: float = 0.1) -> None:
        """``n`` supervisor passes, ``period`` seconds apart: one timer tick each."""
        for _ in range(n):
            self.runtime.supervisor.step()
            self.clock.now += period

    @property
    def state(self) -> State:
        return self.runtime.supervisor.by_name[NAME].state

    @property
    def rules(self) -> list[str]:
        return [r.rule for r in self.runtime.supervisor.records]

    def public_key(self) -> bytes:
        return self.runtime.crypto.public_key(str(self.runtime.policy.by_name[NAME].uuid), KEY)


@pytest.fixture
def session(device: Path) -> Iterator[Session]:
    s = Session(device)
    yield s
    s.runtime.close()


def values(lines: list[str]) -> list[tuple[bytes, int, int, bytes]]:
    """(epoch, count, t, signature) of every counter line."""
    out = []
    for line in lines:
        m = LINE.fullmatch(line)
        assert m is not None, line
        out.append((bytes.fromhex(m[1]), int(m[2]), int(m[3]), bytes.fromhex(m[4])))
    return out


def signed_by(pem: bytes, epoch: bytes, count: int, signature: bytes) -> bool:
    public = load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        public.verify(encode_dss_signature(r, s), DOMAIN + epoch + count.to_bytes(8, "big"), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def test_the_counter_survives_activations_reboots_and_ends_with_an_erase(device: Path) -> None:
    first = Session(device)
    try:
        first.steps(4)  # init, then one tick per pass
        assert first.state is State.RUNNING
        pem = ism_ok("device", "key", device, NAME, KEY).encode()
    finally:
        first.runtime.close()
    assert first.rules == []
    assert all(level == 1 for level, _ in first.lines)
    seen = values([text for _, text in first.lines])
    assert [count for _, count, _, _ in seen] == [1, 2, 3, 4, 5]
    epoch = seen[0][0]
    assert all(e == epoch for e, _, _, _ in seen)
    assert [t for _, _, t, _ in seen] == [0, 0, 100, 200, 300]  # time_ms on the test clock
    assert all(signed_by(pem, epoch, count, sig) for _, count, _, sig in seen)
    assert not signed_by(pem, epoch, 6, seen[-1][3])  # the signature covers the count

    # a reboot through the CLI: the count goes on from the stored record, under the same epoch and key
    out = ism_ok("device", "run", device, "--for", "0.25")
    later = values([line.removeprefix(f"[{NAME}] ") for line in out.splitlines() if line.startswith(f"[{NAME}]")])
    assert len(later) >= 2
    assert [count for _, count, _, _ in later] == list(range(6, 6 + len(later)))
    assert all(e == epoch and signed_by(pem, e, c, sig) for e, c, _, sig in later)
    assert re.search(rf"^\s+{NAME}\s+running\s+faults=0\b", out, flags=re.MULTILINE), out

    # a crypto-erase forgets record and key: a new epoch from 1, signatures the old key does not verify
    ism_ok("device", "erase", device, NAME)
    again = Session(device)
    try:
        again.steps(1)
        new_pem = ism_ok("device", "key", device, NAME, KEY).encode()
    finally:
        again.runtime.close()
    fresh = values([text for _, text in again.lines])
    assert [count for _, count, _, _ in fresh] == [1, 2]
    assert fresh[0][0] != epoch
    assert new_pem != pem
    assert all(signed_by(new_pem, e, c, sig) and not signed_by(pem, e, c, sig) for e, c, _, sig in fresh)


def test_a_policy_without_the_storage_grant_stops_it(session: Session, device: Path, tmp_path: Path) -> None:
    session.steps(2)
    assert [c for _, c, _, _ in values([t for _, t in session.lines])] == [1, 2, 3]
    board = parse_board(BOARD.read_text(), "board.toml")
    no_storage = edited("storage = 64\n", "")

    outcome = session.runtime.apply_policy(parse_policy(no_storage, board, "policy.toml"))
    assert outcome["stopped"] == [NAME]
    assert NAME not in session.runtime.supervisor.by_name  # no longer run under this policy
    (record,) = [r for r in session.runtime.supervisor.records if r.rule == "policy.capability"]
    assert record.name == NAME
    assert "storage (imports storage_*)" in record.details
    assert record.action == "stopped"
    before = len(session.lines)
    session.steps(3)
    assert len(session.lines) == before  # stopped: no activation, no value handed out

    # the record is durable; and such a policy is refused outright at configure, naming the same rule
    records = json.loads(ism_ok("device", "violations", device, "--json"))["violations"]
    assert {r["name"] for r in records} == {NAME}
    assert "policy.capability" in {r["rule"] for r in records}
    bad = tmp_path / "no-storage.toml"
    bad.write_text(no_storage)
    status, _, err = ism("device", "configure", device, "--board", BOARD, "--policy", bad)
    assert status == 1
    assert "policy.capability" in err
    assert "storage" in err


def test_a_key_granted_without_sign_usage_is_a_violation(tmp_path: Path, package: dict[str, Path]) -> None:
    dev = new_device(tmp_path, package, edited(GRANT, 'keys = { heartbeat = { type = "hmac-sha256" } }'))
    s = Session(dev)
    try:
        s.steps(20)  # restarts with backoff (100, 200 ms), then quarantine
        assert s.state is State.QUARANTINED
        records = s.runtime.supervisor.records
    finally:
        s.runtime.close()
    assert [r.rule for r in records] == ["crypto.usage"] * 3 + ["supervisor.crash-loop"]
    assert all(r.target == KEY and "sign" in r.details for r in records[:3])
    assert s.lines == []  # nothing was ever signed, so no value was ever shown


def test_a_quota_too_small_for_the_record_fails_init(tmp_path: Path, package: dict[str, Path]) -> None:
    dev = new_device(tmp_path, package, edited("storage = 64\n", "storage = 16\n"))
    s = Session(dev)
    try:
        s.steps(1)
        records = s.runtime.supervisor.records
    finally:
        s.runtime.close()
    assert s.lines == [(3, "sealed-counter: storage_set failed (-10)")]  # ISM_ESTORAGE
    assert records[0].rule == "sandbox.init"
    assert "-10" in records[0].details
