"""The protected policy end to end: compile -> ism device policy -> run, then a new version applied live.

The vendor compiles the reference policy into an artifact signed with its
policy key and encrypted to the device (``ism policy compile``), the device
installs it (``ism device policy``) and the token keeps working. Version 2
takes ``gpio.led0`` away from ``link``: installed while the device runs, it
takes effect without reinstalling anything — link is restarted under the new
rules and its next use of the LED is a violation, while the other
microservices run on undisturbed. Replaying version 1 afterwards is refused.
"""

from __future__ import annotations

import io
import json
import os
import threading
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key

from _cli import ism, ism_ok
from ism.boards.virtual import Fingerprint, Led, Uart
from ism.cli.main import main
from ism.device.virtual import Device
from ism.errors import ErrorCode, UsageError
from ism.formats.policy import policy_digest
from ism.runtime import Runtime

TOKEN = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
POLICY_TEXT = (TOKEN / "policy.toml").read_text()
LED_GRANT = ', "gpio.led0" = ["write"]'


def policy_version(version: int, *, led: bool = True, analytics: bool = True) -> str:
    assert LED_GRANT in POLICY_TEXT
    text = POLICY_TEXT.replace("version = 1", f"version = {version}", 1)
    if not led:
        text = text.replace(LED_GRANT, "")
    if not analytics:
        text = text[: text.index("# Third-party usage analytics")]
    return text


@pytest.fixture
def vendor(token_device: Path, tmp_path: Path) -> dict[str, Path]:
    """The vendor's policy key, trusted by the device as a policy signer, and the device's info.

    The device is locked (secured): the policy signer anchor comes in a provisioning bundle signed
    by the vendor's device-command key.
    """
    key = tmp_path / "vendor-policy.pem"
    ism_ok("keygen", "--out", key)
    bundle = tmp_path / "policy-signer.bundle"
    ism_ok("provision", "bundle", "--sign", tmp_path / "vendor.pem", "--device", token_device,
           "--add", f"policy:{tmp_path / 'vendor-policy.pub.pem'}", "--out", bundle)  # fmt: skip
    ism_ok("device", "provision", token_device, bundle)
    info = tmp_path / "device-info.json"
    info.write_text(ism_ok("device", "info", token_device, "--json"))
    ism_ok("device", "policy-key", token_device, "--out", tmp_path / "device-policy.pub.pem")
    return {"key": key, "info": info, "device_key": tmp_path / "device-policy.pub.pem"}


def compile_policy(vendor: dict[str, Path], text: str, out: Path, board: Path = TOKEN / "board.toml") -> Path:
    source = out.with_suffix(".toml")
    source.write_text(text)
    ism_ok(
        "policy",
        "compile",
        source,
        "--board",
        board,
        "--sign",
        vendor["key"],
        "--device-info",
        vendor["info"],
        "--out",
        out,
    )
    return out


def test_compile_with_the_device_key_and_instance(token_device: Path, vendor: dict[str, Path], tmp_path: Path) -> None:
    instance = json.loads(vendor["info"].read_text())["instance_id"]
    out = json.loads(
        ism_ok(
            "policy",
            "compile",
            TOKEN / "policy.toml",
            "--board",
            TOKEN / "board.toml",
            "--sign",
            vendor["key"],
            "--device",
            vendor["device_key"],
            "--instance",
            instance,
            "--out",
            tmp_path / "p.cose",
            "--json",
        )
    )
    assert (out["version"], out["instance_id"]) == (1, instance)
    assert json.loads(ism_ok("device", "policy", token_device, tmp_path / "p.cose", "--json"))["version"] == 1
    # naming no device, or two different ones, is a usage error
    status, _, err = ism(
        "policy", "compile", TOKEN / "policy.toml", "--board", TOKEN / "board.toml", "--sign", vendor["key"],
        "--device", vendor["device_key"], "--out", tmp_path / "q.cose",
    )  # fmt: skip
    assert (status, "cli.argument" in err) == (2, True)


def test_the_token_runs_under_a_protected_policy_and_loses_its_led_live(
    token_device: Path, vendor: dict[str, Path], tmp_path: Path
) -> None:
    dev = token_device
    v1 = compile_policy(vendor, policy_version(1), tmp_path / "v1.cose")
    v2 = compile_policy(vendor, policy_version(2, led=False), tmp_path / "v2.cose")
    assert json.loads(ism_ok("device", "policy", dev, v1, "--json"))["version"] == 1
    assert sorted(p.name for p in (dev / "config").iterdir()) == ["policy.cose"]  # the cleartext files are gone
    packages = {p.name: p.read_bytes() for p in (dev / "packages").iterdir()}

    runtime = Runtime.start(dev)
    try:
        sup = runtime.supervisor
        sensor, uart, led = (runtime.peripherals[n] for n in ("spi.fingerprint", "uart.host", "gpio.led0"))
        assert isinstance(sensor, Fingerprint)
        assert isinstance(uart, Uart)
        assert isinstance(led, Led)
        assert runtime.policy.version == 1

        def exchange(frame: bytes) -> bytes:
            uart.host_send(frame)
            sup.step()
            return uart.host_receive()

        sensor.place(os.urandom(64))
        assert exchange(b"E") == b"\x45\x00"
        challenge = os.urandom(32)
        reply = exchange(b"C" + challenge)
        assert reply[:2] == b"\x43\x00"
        public = load_der_public_key(runtime.crypto.public_key(str(sup.by_name["authenticator"].uuid), "device-2fa"))
        assert isinstance(public, ec.EllipticCurvePublicKey)
        sig = reply[2:]
        der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
        public.verify(der, challenge, ec.ECDSA(hashes.SHA256()))
        assert led.state == 1
        led_writes = len(led.history)
        others = {name: sup.by_name[name].sandbox for name in ("biometric", "authenticator", "analytics")}
        seen = len(sup.records)

        # version 2 arrives while the device runs (as from another process), and is applied between two steps
        ism_ok("device", "policy", dev, v2)
        outcome = runtime.reload_policy()
        assert outcome is not None
        assert outcome["restarted"] == ["link"]
        assert sorted(outcome["unchanged"]) == ["analytics", "authenticator", "biometric"]
        assert runtime.policy.version == 2
        assert "gpio.led0" not in sup.by_name["link"].policy.resources
        violations = [r for r in sup.records[seen:] if r.name == "link"]
        assert [(r.rule, r.target) for r in violations] == [("policy.resource", "gpio.led0")]
        assert len(led.history) == led_writes  # the LED was not written under the new policy
        assert {name: sup.by_name[name].sandbox for name in others} == others  # undisturbed
        link = sup.by_name["link"].uuid
        assert runtime.attestation.microservices[link].policy_digest == policy_digest(runtime.policy.by_uuid[link])
        assert runtime.reload_policy() is None  # nothing new
    finally:
        runtime.close()

    assert {p.name: p.read_bytes() for p in (dev / "packages").iterdir()} == packages  # nothing reinstalled
    status, _, err = ism("device", "policy", dev, v1)
    assert status == 1
    assert f"[{int(ErrorCode.ROLLBACK)} policy.rollback]" in err
    assert Device(dev).policy().version == 2


def test_dropping_a_microservice_and_what_cannot_be_applied_live(
    token_device: Path, vendor: dict[str, Path], tmp_path: Path
) -> None:
    dev = token_device
    ism_ok("device", "policy", dev, compile_policy(vendor, policy_version(1), tmp_path / "v1.cose"))
    runtime = Runtime.start(dev)
    try:
        sup = runtime.supervisor
        ism_ok(
            "device", "policy", dev, compile_policy(vendor, policy_version(2, analytics=False), tmp_path / "v2.cose")
        )
        outcome = runtime.reload_policy()
        assert outcome is not None
        assert outcome["stopped"] == ["analytics"]
        assert "analytics" not in sup.by_name
        assert [r.rule for r in sup.records if r.name == "analytics"][-1] == "policy.not-named"
        # and back: analytics is named again and starts
        ism_ok("device", "policy", dev, compile_policy(vendor, policy_version(3), tmp_path / "v3.cose"))
        outcome = runtime.reload_policy()
        assert outcome is not None
        assert outcome["started"] == ["analytics"]
        assert str(sup.by_name["analytics"].state) == "running"

        # a board that is not the running one needs a restart
        board = tmp_path / "board.toml"
        board.write_text((TOKEN / "board.toml").read_text().replace("Status LED", "Status light"))
        ism_ok("device", "policy", dev, compile_policy(vendor, policy_version(4), tmp_path / "v4.cose", board))
        with pytest.raises(UsageError) as info:
            runtime.reload_policy()
        assert info.value.rule == "policy.board-change"

        # and nothing is swapped in the middle of an activation
        sup.by_name["biometric"].active = True
        with pytest.raises(UsageError) as info:
            runtime.apply_policy(runtime.policy)
        assert info.value.rule == "supervisor.busy"
        sup.by_name["biometric"].active = False
    finally:
        runtime.close()


def test_device_run_applies_a_new_policy_live(token_device: Path, vendor: dict[str, Path], tmp_path: Path) -> None:
    dev = token_device
    ism_ok("device", "policy", dev, compile_policy(vendor, policy_version(1), tmp_path / "v1.cose"))
    v2 = compile_policy(vendor, policy_version(2, led=False), tmp_path / "v2.cose").read_bytes()
    out, err = io.StringIO(), io.StringIO()
    status: list[int] = []

    def run() -> None:
        with redirect_stdout(out), redirect_stderr(err):
            status.append(main(["device", "run", str(dev), "--for", "2"]))

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 10
    while "running" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.02)
    with Device(dev) as other:
        assert other.install_policy(v2).version == 2
    thread.join(15)
    assert status == [0], err.getvalue()
    text = out.getvalue()
    assert "policy version 2 in effect (restarted: link)" in text
    assert "policy.resource [gpio.led0]" in text
