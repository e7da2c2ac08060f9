"""The reference device end to end: a fingerprint 2FA token built, signed, configured, installed and run.

A real ``ism device run`` process serves the token's UART on loopback; the test
talks to it over TCP as a host computer would, checks the signature it returns
against the device key, and then reads the violation records the misbehaving
``analytics`` microservice left in the outbox. Configuring a bad policy and
installing a module that needs capabilities its policy does not grant are
refused with one line naming the rule.
"""

from __future__ import annotations

import json
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import wasmtime
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from _cli import ism
from ism.errors import ErrorCode

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
TOKEN = ("biometric", "authenticator", "link", "analytics")
ANALYTICS_UUID = "193cd08e-78fe-47d0-b3ee-50f90988a3bf"
POLICY_TEXT = (SOURCE / "policy.toml").read_text()


def ism_ok(*argv: str | Path) -> str:
    status, out, err = ism(*argv)
    assert status == 0, err
    assert err == ""
    return out


def ism_refuses(rule: str, *argv: str | Path) -> str:
    """Asserts ``ism ARGV`` exits 1 with exactly one line ``error: [CODE rule] ...``; returns that line."""
    status, _, err = ism(*argv)
    assert status == 1, err
    assert err.endswith("\n")
    assert err.count("\n") == 1, err
    assert re.match(rf"error: \[{int(ErrorCode.FORMAT)} {re.escape(rule)}\] \S", err), err
    return err


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four microservices compiled, and signed into packages with a fresh developer key."""
    work = tmp_path_factory.mktemp("token")
    ism_ok("keygen", "--alg", "es256", "--out", work / "developer.pem")
    paths = {"key": work / "developer.pem", "anchor": work / "developer.pub.pem"}
    for name in TOKEN:
        wasm = work / f"{name}.wasm"
        wasm.write_bytes(bytes(wasmtime.wat2wasm((SOURCE / name / f"{name}.wat").read_text())))
        ism_ok(
            "package",
            "build",
            "--wasm",
            wasm,
            "--meta",
            SOURCE / name / f"{name}.toml",
            "--key",
            paths["key"],
            "--out",
            work / f"{name}.suit",
        )
        paths[name] = work / f"{name}.suit"
    return paths


@pytest.fixture
def device(tmp_path: Path, token: dict[str, Path]) -> Path:
    """A device that trusts the developer, runs the reference board and policy, and has the token installed."""
    dev = tmp_path / "device"
    ism_ok("device", "init", dev)
    ism_ok("device", "trust", dev, "--add", token["anchor"])
    ism_ok("device", "configure", dev, "--board", SOURCE / "board.toml", "--policy", SOURCE / "policy.toml")
    for name in TOKEN:
        ism_ok("device", "install", dev, token[name])
    return dev


# -- (a) the token works over a real UART link, and analytics is quarantined ---------------------


class Lines:
    """Collects a child process's stdout lines on a thread, so the pipe never fills."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        self._thread.start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.queue.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if m := re.fullmatch(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r}; output so far: {self.seen}")

    def rest(self, timeout: float = 10) -> list[str]:
        self._thread.join(timeout)
        while True:
            try:
                line = self.queue.get_nowait()
            except queue.Empty:
                return self.seen
            if line is not None:
                self.seen.append(line)


def receive(sock: socket.socket, n: int, timeout: float = 5.0) -> bytes:
    """Exactly ``n`` bytes from ``sock`` (fails after ``timeout`` seconds)."""
    data = b""
    deadline = time.monotonic() + timeout
    while len(data) < n:
        left = deadline - time.monotonic()
        assert left > 0, f"got {data.hex()} after {timeout} s, wanted {n} bytes"
        sock.settimeout(left)
        chunk = sock.recv(n - len(data))
        assert chunk, f"connection closed after {data.hex()}"
        data += chunk
    return data


def verify_raw(pem: bytes, message: bytes, signature: bytes) -> bool:
    public = load_pem_public_key(pem)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.curve.name == "secp256r1"
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    try:
        public.verify(encode_dss_signature(r, s), message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def test_the_token_signs_over_its_uart_and_analytics_is_quarantined(device: Path, tmp_path: Path) -> None:
    owner = tmp_path / "owner.finger"
    owner.write_bytes(os.urandom(64))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ism.cli.main",
            "device",
            "run",
            str(device),
            "--for",
            "4",
            "--uart-port",
            "0",
            "--finger",
            str(owner),
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    stderr = ""
    try:
        lines = Lines(proc)
        port = int(lines.wait_for(r"uart\.host on 127\.0\.0\.1:(\d+)", timeout=30).group(1))
        challenge = os.urandom(32)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as host:
            host.sendall(b"E")
            assert receive(host, 2) == bytes([0x45, 0x00])  # enrolled
            host.sendall(b"C" + challenge)
            reply = receive(host, 66)
        assert reply[:2] == bytes([0x43, 0x00])  # signed
        signature = reply[2:]
        status = proc.wait(timeout=30)
        stderr = proc.stderr.read() if proc.stderr else ""
        output = lines.rest()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 0, (stderr, lines.seen)
    assert stderr == ""
    assert "[analytics] analytics: collecting usage" in output
    assert re.search(r"^\s+analytics\s+quarantined\b", "\n".join(output), flags=re.MULTILINE), output
    for name in ("biometric", "authenticator", "link"):
        assert re.search(rf"^\s+{name}\s+running\s+faults=0\b", "\n".join(output), flags=re.MULTILINE), output

    # the signature verifies with the device key the CLI prints, and only over this challenge
    pem = ism_ok("device", "key", device, "authenticator", "device-2fa").encode()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert verify_raw(pem, challenge, signature)
    assert not verify_raw(pem, os.urandom(32), signature)

    # the outbox kept what analytics did, and what the supervisor did about it
    records = json.loads(ism_ok("device", "violations", device, "--json"))["violations"]
    assert records, "no violation records"
    assert {r["name"] for r in records} == {"analytics"}, records  # the other three never misbehaved
    assert {r["ms_uuid"] for r in records} == {ANALYTICS_UUID}
    rules = [r["rule"] for r in records]
    assert "policy.resource" in rules
    assert "supervisor.crash-loop" in rules
    assert "quarantined" in {r["action"] for r in records}
    denied = [r for r in records if r["rule"] == "policy.resource"]
    assert all("spi.fingerprint" in r["details"] for r in denied), denied
    assert any(r["action"].startswith("restart in") for r in denied)  # backoff first, then quarantine
    assert rules.index("supervisor.crash-loop") > rules.index("policy.resource")
    ids = [r["id"] for r in records]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


# -- (b) configure refuses bad policies ----------------------------------------------------------


def edited(old: str, new: str) -> str:
    assert POLICY_TEXT.count(old) == 1, old
    return POLICY_TEXT.replace(old, new)


SENSOR_TWICE = edited(
    'resources = { timer = ["read"] }', 'resources = { timer = ["read"], "spi.fingerprint" = ["read"] }'
)


@pytest.mark.parametrize(
    ("policy_text", "rule", "mentions"),
    [
        pytest.param(
            edited('gateways = ["biometric.verify"]', 'gateways = ["biometric.unlock"]'),
            "policy.gateway",
            "policy.toml: microservice.authenticator.gateways",
            id="gateway-to-an-operation-the-callee-does-not-export",
        ),
        pytest.param(
            edited(
                'exports = ["enroll", "verify"]\n',
                'exports = ["enroll", "verify", "unlock"]\n',
            ).replace('gateways = ["biometric.verify"]', 'gateways = ["biometric.verify", "biometric.unlock"]'),
            "policy.gateway",
            "op_unlock",
            id="gateway-to-an-operation-the-installed-module-lacks",
        ),
        pytest.param(
            SENSOR_TWICE,
            "policy.exclusive",
            "policy.toml: microservice.analytics.resources.spi.fingerprint",
            id="sensor-granted-to-biometric-and-analytics",
        ),
        pytest.param(
            edited('keys = ["device-2fa"]\n', ""),
            "policy.capability",
            "keys (imports key_* or identity_cert)",
            id="installed-module-imports-key-calls-without-a-key",
        ),
    ],
)
def test_configure_refuses_a_bad_policy(
    device: Path, tmp_path: Path, policy_text: str, rule: str, mentions: str
) -> None:
    before = (device / "config" / "policy.toml").read_bytes()
    bad = tmp_path / "bad-policy.toml"
    bad.write_text(policy_text)
    line = ism_refuses(rule, "device", "configure", device, "--board", SOURCE / "board.toml", "--policy", bad)
    assert mentions in line
    assert (device / "config" / "policy.toml").read_bytes() == before  # nothing was written


def test_exclusive_refusal_names_the_first_owner(device: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad-policy.toml"
    bad.write_text(SENSOR_TWICE)
    line = ism_refuses(
        "policy.exclusive", "device", "configure", device, "--board", SOURCE / "board.toml", "--policy", bad
    )
    assert "biometric" in line
    assert "microservice.analytics.resources.spi.fingerprint" in line


# -- (c) install refuses a module that needs what its policy does not grant ----------------------

GREEDY_ANALYTICS = """
(module
  (import "ism" "key_open" (func $key_open (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "device-2fa")
  (func (export "init") (result i32) (i32.const 0))
  (func (export "tick") (result i32)
    (call $key_open (i32.const 0) (i32.const 10))))
"""


def test_install_refuses_a_module_needing_ungranted_capabilities(
    device: Path, tmp_path: Path, token: dict[str, Path]
) -> None:
    wasm = tmp_path / "greedy.wasm"
    wasm.write_bytes(bytes(wasmtime.wat2wasm(GREEDY_ANALYTICS)))
    meta = tmp_path / "analytics.toml"
    meta_text = (SOURCE / "analytics" / "analytics.toml").read_text()
    assert "sequence = 1\n" in meta_text
    meta.write_text(meta_text.replace("sequence = 1\n", "sequence = 2\n"))
    package = tmp_path / "greedy.suit"
    ism_ok("package", "build", "--wasm", wasm, "--meta", meta, "--key", token["key"], "--out", package)
    installed = (device / "packages" / f"{ANALYTICS_UUID}.suit").read_bytes()

    line = ism_refuses("policy.capability", "device", "install", device, package)
    assert "keys" in line
    assert "analytics" in line
    assert (device / "packages" / f"{ANALYTICS_UUID}.suit").read_bytes() == installed

    # the same package installs on a device that has no policy yet (nothing to check against) ...
    bare = tmp_path / "bare"
    ism_ok("device", "init", bare)
    ism_ok("device", "trust", bare, "--add", token["anchor"])
    ism_ok("device", "install", bare, package)
    # ... and then the reference policy is refused there, because it does not grant what is installed
    ism_refuses(
        "policy.capability",
        "device",
        "configure",
        bare,
        "--board",
        SOURCE / "board.toml",
        "--policy",
        SOURCE / "policy.toml",
    )
    assert not (bare / "config" / "policy.toml").exists()
