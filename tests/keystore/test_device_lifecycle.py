"""Factory reset and decommissioning on a TPM-backed device (swtpm).

The TPM holds the device's keys as TPM objects and binds the counters file
to an NV counter. A reset must destroy the microservices' TPM keys and keep
the device's; a decommissioned device must still open (its counters are
checked against the NV counter, which outlives its keys) and show its
state, while every key is gone and nothing works. (SoftHSM2 is not used
here: the test token is shared by every device of the session, and these
operations destroy device keys by id.)
"""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from _swtpm import Swtpm

from ism.cli.main import main
from ism.crypto.keys import load_public
from ism.crypto.statement import verify_statement
from ism.device.virtual import POLICY_KEY_ID, Device
from ism.errors import TrustError
from ism.services.attestation import IAK_ID
from ism.services.crypto import key_store_id

AUTHENTICATOR = "efeaddc6-46ed-42b1-b68f-7c0d1cd7f69c"


def ism_ok(*argv: str | Path) -> str:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        status = main([str(a) for a in argv])
    assert status == 0, err.getvalue()
    return out.getvalue()


@pytest.fixture
def tpm_token(swtpm: Swtpm, tmp_path: Path, provision_token: object) -> Iterator[Path]:
    assert callable(provision_token)
    dev = provision_token(tmp_path, "--keystore", "tpm", "--tpm-tcti", swtpm.tcti, lock=True)
    yield dev
    gc.collect()  # a TPM has few session slots


def test_reset_and_decommission_on_a_tpm(tpm_token: Path, tmp_path: Path) -> None:
    key = key_store_id(AUTHENTICATOR, "device-2fa")
    with Device(tpm_token) as dev:
        store = dev.keystore()
        assert store.backend == "tpm"
        store.generate(key, "ecc-p256")
        store.generate(IAK_ID, "ecc-p256")
        iak = store.public_key(IAK_ID)
    vendor = tmp_path / "vendor.pem"
    reset, retire = tmp_path / "reset.cose", tmp_path / "retire.cose"
    ism_ok("provision", "command", "factory-reset", "--sign", vendor, "--device", tpm_token, "--out", reset)
    ism_ok("device", "factory-reset", tpm_token, "--command", reset)
    with Device(tpm_token) as dev:
        store = dev.keystore()
        assert not store.exists(key)
        assert store.public_key(IAK_ID) == iak  # the device's own keys stay
        assert store.exists(POLICY_KEY_ID)
        assert dev.installed() == []

    ism_ok("provision", "command", "decommission", "--sign", vendor, "--device", tpm_token, "--out", retire)
    ism_ok("device", "decommission", tpm_token, "--command", retire, "--out", tmp_path / "statement.cose")
    statement = verify_statement(
        (tmp_path / "statement.cose").read_bytes(), load_public(tpm_token / "keys" / "iak.pub.pem")
    )
    assert {IAK_ID, POLICY_KEY_ID} <= set(statement.erased_keys)
    with Device(tpm_token) as dev:  # opens: the counters still check out against the TPM's NV counter
        assert dev.lifecycle_state == "decommissioned"
        assert dev.counters()["lifecycle"] == 3  # init 0, lock 1, reset 2, decommission 3
        with pytest.raises(TrustError) as info:
            dev.keystore()
        assert info.value.rule == "lifecycle.decommissioned"
        raw = dev._open_keystore()  # what is left in the TPM for this device: nothing
        assert not any(raw.exists(k) for k in (IAK_ID, POLICY_KEY_ID, key, "device.identity-ca", "device.storage"))
