"""Starting and stopping ``swtpm`` (a software TPM 2.0) for the TPM key-store tests.

Each :class:`Swtpm` is one ``swtpm socket`` process on two free loopback
ports (the TPM command port ``P`` and its control port ``P + 1``) with its
state in a directory; restarting on the same directory keeps the TPM's NV
memory and seeds (the same TPM, rebooted), a fresh directory is another TPM.
The TPM is started by swtpm itself (``--flags not-need-init,startup-clear``).
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import time
from pathlib import Path

INSTALL_HINT = "swtpm is required: run scripts/bootstrap.sh as root, or apt-get install swtpm"
HOST = "127.0.0.1"


def find_swtpm() -> str | None:
    return shutil.which("swtpm")


def _free_port_pair() -> int:
    """A port ``P`` such that ``P`` and ``P + 1`` are both free on loopback right now."""
    for _ in range(100):
        with socket.socket() as first:
            first.bind((HOST, 0))
            port = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as second:
                try:
                    second.bind((HOST, port + 1))
                except OSError:
                    continue
        return int(port)
    raise RuntimeError("no two adjacent free loopback ports")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclasses.dataclass
class Swtpm:
    """A running swtpm; :attr:`tcti` is what :class:`TpmKeyStore` and ``TCTILdr.parse`` take."""

    binary: str
    state_dir: Path
    port: int
    process: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:host={HOST},port={self.port}"

    @property
    def log(self) -> Path:
        return self.state_dir / "swtpm.log"

    def stop(self) -> None:
        """Terminates swtpm (SIGTERM, then SIGKILL after 5 s). Idempotent."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def restart(self) -> Swtpm:
        """Stops swtpm and starts it again on the same state (a TPM reboot), in place: new ports, same object."""
        self.stop()
        fresh = start_swtpm(self.state_dir, self.binary)
        self.port, self.process = fresh.port, fresh.process
        return self


def start_swtpm(state_dir: Path, binary: str, timeout: float = 10.0) -> Swtpm:
    """Starts swtpm with its state in ``state_dir`` and waits until both of its ports accept connections."""
    state_dir.mkdir(parents=True, exist_ok=True)
    failure = ""
    for _ in range(5):  # another process may grab a port between choosing and binding it
        port = _free_port_pair()
        errors = state_dir / "swtpm.stderr"
        with errors.open("wb") as stderr:
            process = subprocess.Popen(
                [
                    binary,
                    "socket",
                    "--tpm2",
                    "--server",
                    f"type=tcp,port={port},bindaddr={HOST}",
                    "--ctrl",
                    f"type=tcp,port={port + 1},bindaddr={HOST}",
                    "--tpmstate",
                    f"dir={state_dir}",
                    "--flags",
                    "not-need-init,startup-clear",
                    "--log",
                    f"file={state_dir / 'swtpm.log'},level=1",
                ],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and process.poll() is None:
            if _accepts(port + 1) and _accepts(port):
                return Swtpm(binary, state_dir, port, process)
            time.sleep(0.02)
        if process.poll() is None:
            process.kill()
        process.wait(timeout=5)
        failure = errors.read_text(errors="replace")
    raise RuntimeError(f"swtpm did not start: {failure}")
