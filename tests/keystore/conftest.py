"""Key-store fixtures: a fresh SoftHSM2 token, a fresh swtpm, and one conformance suite run against every backend.

The SoftHSM2 token is real (``softhsm2-util --init-token`` in a temporary
token directory), and so is the TPM (``swtpm`` on loopback ports with its
state in a temporary directory, stopped at session end). There is no skip:
without SoftHSM2 the PKCS#11 tests fail and without swtpm the TPM tests
fail, so CI (``CI=true``) can never pass with a backend untested.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from _softhsm import INSTALL_HINT, SoftHsm, find_module, find_util, init_token
from _swtpm import INSTALL_HINT as SWTPM_INSTALL_HINT
from _swtpm import Swtpm, find_swtpm, start_swtpm

from ism.crypto.keystore import KeyStore
from ism.crypto.keystore.pkcs11 import Pkcs11KeyStore
from ism.crypto.keystore.software import MemoryKeyFiles, SoftwareKeyStore
from ism.crypto.keystore.tpm import TpmKeyStore

BACKENDS = ("software", "pkcs11", "pkcs11_ns", "tpm")


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """A freshly initialised SoftHSM2 token (label ``ism-test``, PIN ``1234``); ``SOFTHSM2_CONF`` points at it."""
    util, module = find_util(), find_module()
    if util is None or module is None:
        pytest.fail(f"{INSTALL_HINT} (softhsm2-util: {util}, module: {module})")
    hsm = init_token(tmp_path_factory.mktemp("softhsm"), util, module)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SOFTHSM2_CONF", str(hsm.conf))
        yield hsm


@pytest.fixture(scope="session")
def pkcs11_store(softhsm: SoftHsm) -> Iterator[Pkcs11KeyStore]:
    """One logged-in store on the test token for the whole session (tests use unique key ids)."""
    store = Pkcs11KeyStore(softhsm.module, softhsm.label, softhsm.pin)
    yield store
    store.close()


@pytest.fixture(scope="session")
def pkcs11_ns_store(softhsm: SoftHsm) -> Iterator[Pkcs11KeyStore]:
    """A store confined to a namespace of the same token, as a device's is (labels ``conformance/<key id>``)."""
    store = Pkcs11KeyStore(softhsm.module, softhsm.label, softhsm.pin, namespace="conformance")
    yield store
    store.close()


@pytest.fixture(scope="session")
def swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    """A fresh software TPM 2.0 for the session (its own state directory); stopped at the end."""
    binary = find_swtpm()
    if binary is None:
        pytest.fail(SWTPM_INSTALL_HINT)
    tpm = start_swtpm(tmp_path_factory.mktemp("swtpm"), binary)
    yield tpm
    tpm.stop()


@pytest.fixture(scope="session")
def tpm_store(swtpm: Swtpm, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TpmKeyStore]:
    """One store on the session's swtpm for the whole session (tests use unique key ids)."""
    store = TpmKeyStore(swtpm.tcti, tmp_path_factory.mktemp("tpm-keys"))
    yield store
    store.close()


@pytest.fixture
def software_store() -> SoftwareKeyStore:
    return SoftwareKeyStore(MemoryKeyFiles(), bytes(range(32)))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> KeyStore:
    """Each backend in turn: the conformance suite runs once per backend (PKCS#11 with and without a namespace)."""
    store: KeyStore = request.getfixturevalue(f"{request.param}_store")
    return store


@pytest.fixture
def new_id() -> Callable[[str], str]:
    """Unique key ids (the token outlives each test): ``new_id("sig")`` -> ``sig-1a2b3c4d5e6f``."""
    return lambda name: f"{name}-{uuid.uuid4().hex[:12]}"
