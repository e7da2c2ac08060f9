"""Crypto-erase of a microservice: its records and keys are gone, even for someone holding old copies."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ism.boards.virtual import Fingerprint, Uart
from ism.cli.main import main
from ism.runtime import Runtime


def _session(dev: Path, frames: list[bytes], finger: bytes) -> tuple[list[bytes], bytes]:
    """Starts the device, sends frames over the UART, returns the replies and the 2FA public key."""
    runtime = Runtime.start(dev)
    try:
        sensor, uart = runtime.peripherals["spi.fingerprint"], runtime.peripherals["uart.host"]
        assert isinstance(sensor, Fingerprint)
        assert isinstance(uart, Uart)
        sensor.place(finger)
        replies = []
        for frame in frames:
            uart.host_send(frame)
            runtime.supervisor.step()
            replies.append(uart.host_receive())
        authenticator = runtime.policy.by_name["authenticator"].uuid
        return replies, runtime.crypto.public_key(str(authenticator), "device-2fa")
    finally:
        runtime.close()


def test_erase_forgets_the_template_and_the_key(token_device: Path, tmp_path: Path) -> None:
    device = token_device
    owner = os.urandom(64)
    replies, key_before = _session(device, [b"E", b"C" + os.urandom(32)], owner)
    assert replies[0] == b"\x45\x00"
    assert replies[1][:2] == b"\x43\x00"
    # the template survives a restart (it is in secure storage, not in memory)
    replies, key_again = _session(device, [b"C" + os.urandom(32)], owner)
    assert replies[0][:2] == b"\x43\x00"
    assert key_again == key_before
    old = tmp_path / "old-state"
    shutil.copytree(device / "state", old)

    assert main(["device", "erase", str(device), "biometric"]) == 0
    assert main(["device", "erase", str(device), "authenticator"]) == 0
    replies, key_after = _session(device, [b"C" + os.urandom(32)], owner)
    assert replies[0] == b"\x43\x03"  # not enrolled any more
    assert key_after != key_before  # a new 2FA key was created on first use

    # restoring the old storage files does not bring the template back
    for name in ("storage.sqlite", "storage-root.cose"):
        shutil.copy(old / name, device / "state" / name)
    for suffix in ("-wal", "-shm"):
        (device / "state" / f"storage.sqlite{suffix}").unlink(missing_ok=True)
    replies, _ = _session(device, [b"C" + os.urandom(32)], owner)
    # the old record is back in the database, but its key was destroyed: biometric reads ISM_ECORRUPT
    # and answers "not enrolled"; the owner's finger no longer gets a signature
    assert replies[0] == b"\x43\x03"
