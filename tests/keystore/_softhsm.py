"""Finding SoftHSM2 and initialising a throw-away token for the PKCS#11 key-store tests.

SoftHSM2 reads ``SOFTHSM2_CONF`` when the module is initialised, so the
configuration (a token directory under pytest's temporary directory) must be
in the environment before the first :class:`~ism.crypto.keystore.pkcs11.Pkcs11KeyStore`
is created in the process.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from pathlib import Path

#: Where Debian puts the module (the first is a symlink to the multiarch one).
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
)
TOKEN_LABEL = "ism-test"
USER_PIN = "1234"
SO_PIN = "5678"
INSTALL_HINT = "SoftHSM2 is required: run scripts/bootstrap.sh as root, or apt-get install softhsm2"


@dataclasses.dataclass(frozen=True)
class SoftHsm:
    """An initialised token: what a :class:`Pkcs11KeyStore` needs, plus the config file."""

    module: str
    label: str
    pin: str
    conf: Path


def find_util() -> str | None:
    return shutil.which("softhsm2-util")


def find_module() -> str | None:
    """The SoftHSM2 PKCS#11 module: the usual Debian paths, then the installed packages' file lists."""
    for candidate in MODULE_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    util = find_util()
    if util is None or shutil.which("dpkg-query") is None:
        return None
    packages = {"libsofthsm2"}
    owner = subprocess.run(
        ["dpkg-query", "--search", str(Path(util).resolve())], capture_output=True, text=True, check=False
    )
    if owner.returncode == 0 and ":" in owner.stdout:
        packages.add(owner.stdout.split(":", 1)[0].strip())
    for package in sorted(packages):
        listing = subprocess.run(["dpkg-query", "--listfiles", package], capture_output=True, text=True, check=False)
        for line in listing.stdout.splitlines():
            if line.endswith("/libsofthsm2.so") and Path(line).is_file():
                return line
    return None


def init_token(root: Path, util: str, module: str) -> SoftHsm:
    """Writes ``root/softhsm2.conf`` (tokens in ``root/tokens``) and initialises the test token there.

    The caller must then put ``SOFTHSM2_CONF=<SoftHsm.conf>`` in this process's
    environment, before the module is first loaded.
    """
    tokens = root / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = root / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    result = subprocess.run(
        [util, "--init-token", "--free", "--label", TOKEN_LABEL, "--pin", USER_PIN, "--so-pin", SO_PIN],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SOFTHSM2_CONF": str(conf)},
    )
    if result.returncode != 0:
        raise RuntimeError(f"softhsm2-util --init-token failed: {result.stdout}{result.stderr}")
    return SoftHsm(module, TOKEN_LABEL, USER_PIN, conf)
