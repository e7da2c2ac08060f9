"""TPM 2.0 backend on swtpm: cross-backend equality, persistence, binding, bus secrecy, errors, the NV counter.

The conformance suite in ``test_keystore.py`` already runs against
:class:`TpmKeyStore` (the ``tpm`` backend); these are the TPM-specific
properties. Tests that restart, stop or compare TPMs start their own swtpm
(:func:`own_tpm`); the rest share the session's.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from _swtpm import INSTALL_HINT, Swtpm, find_swtpm, start_swtpm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPMA_NV, TPMA_OBJECT
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPM2B_PUBLIC, TPMS_NV_PUBLIC

from ism.crypto.keystore.software import SoftwareKeyStore
from ism.crypto.keystore.tpm import TpmCounter, TpmKeyStore, _KeyFile, _storage_primary_template, _template
from ism.errors import FormatError, IsmError, PlatformError, StateCorruptError, UsageError

NewId = Callable[[str], str]
NONCE = bytes(range(12))
MESSAGE = b"measured boot of microservice 7"


def p256_pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@contextmanager
def raises_rule(kind: type[IsmError], rule: str) -> Iterator[pytest.ExceptionInfo[IsmError]]:
    with pytest.raises(kind) as caught:
        yield caught
    assert caught.value.rule == rule, caught.value


@pytest.fixture
def own_tpm(tmp_path: Path) -> Iterator[Callable[[str], Swtpm]]:
    """Starts private swtpms (``own_tpm("a")``: state in ``tmp_path/a``), all stopped after the test."""
    binary = find_swtpm()
    if binary is None:
        pytest.fail(INSTALL_HINT)
    started: list[Swtpm] = []

    def start(name: str) -> Swtpm:
        tpm = start_swtpm(tmp_path / name, binary)
        started.append(tpm)
        return tpm

    yield start
    for tpm in started:
        tpm.stop()


@contextmanager
def esapi(tpm: Swtpm) -> Iterator[ESAPI]:
    tcti = TCTILdr.parse(tpm.tcti)
    context = ESAPI(tcti)
    try:
        yield context
    finally:
        context.close()
        tcti.close()


# -- cross-backend equality -----------------------------------------------------------------------


def test_same_material_same_results_as_software(
    software_store: SoftwareKeyStore, tpm_store: TpmKeyStore, new_id: NewId
) -> None:
    material = os.urandom(32)
    aes, mac = new_id("t-aes"), new_id("t-mac")
    for store in (software_store, tpm_store):
        store.import_key(aes, "aes-256", material)
        store.import_key(mac, "hmac-sha256", material)
    for plaintext, aad in ((MESSAGE, b"aad"), (b"", b""), (bytes(3000), b"")):
        sealed = software_store.encrypt(aes, NONCE, plaintext, aad)
        assert tpm_store.encrypt(aes, NONCE, plaintext, aad) == sealed
        assert tpm_store.decrypt(aes, NONCE, sealed, aad) == plaintext
    for data in (b"", MESSAGE, bytes(1024), bytes(1025), os.urandom(4097)):  # one TPM2_HMAC, and sequences
        assert software_store.mac(mac, data) == tpm_store.mac(mac, data)


@pytest.mark.parametrize("source_type", ["hmac-sha256", "aes-256"])
def test_derive_is_equal_to_software(
    software_store: SoftwareKeyStore, tpm_store: TpmKeyStore, new_id: NewId, source_type: str
) -> None:
    material = os.urandom(32)
    source, to_mac, to_aes, chained = new_id("t-src"), new_id("t-dmac"), new_id("t-daes"), new_id("t-chain")
    long_info = b"i" * 2000  # Expand's HMAC input exceeds one TPM2_HMAC buffer
    for store in (software_store, tpm_store):
        store.import_key(source, source_type, material)  # type: ignore[arg-type]
        store.derive(source, b"storage key for ms-7", to_mac, "hmac-sha256")
        store.derive(source, long_info, to_aes, "aes-256")
        store.derive(to_aes, b"second generation", chained, "hmac-sha256")  # derived keys derive too
    assert software_store.mac(to_mac, MESSAGE) == tpm_store.mac(to_mac, MESSAGE)
    assert software_store.encrypt(to_aes, NONCE, MESSAGE, b"") == tpm_store.encrypt(to_aes, NONCE, MESSAGE, b"")
    assert software_store.mac(chained, MESSAGE) == tpm_store.mac(chained, MESSAGE)
    expected = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=long_info).derive(material)
    assert tpm_store.encrypt(to_aes, NONCE, MESSAGE, b"") == AESGCM(expected).encrypt(NONCE, MESSAGE, b"")


def test_ecc_import_is_equal_to_software(
    software_store: SoftwareKeyStore, tpm_store: TpmKeyStore, new_id: NewId
) -> None:
    pkcs8, key_id = p256_pkcs8(ec.generate_private_key(ec.SECP256R1())), new_id("t-ecc")
    software_store.import_key(key_id, "ecc-p256", pkcs8)
    tpm_store.import_key(key_id, "ecc-p256", pkcs8)
    assert software_store.public_key(key_id) == tpm_store.public_key(key_id)
    software_store.verify(key_id, MESSAGE, tpm_store.sign(key_id, MESSAGE))
    tpm_store.verify(key_id, MESSAGE, software_store.sign(key_id, MESSAGE))


def test_generated_keys_derive_and_sign_many_times(tpm_store: TpmKeyStore, new_id: NewId) -> None:
    """Generated secret keys carry a PRK too; signatures are always 64 bytes (r, s left-padded)."""
    mac, aes, ecc = new_id("g-mac"), new_id("g-aes"), new_id("g-ecc")
    tpm_store.generate(mac, "hmac-sha256")
    tpm_store.generate(aes, "aes-256")
    tpm_store.generate(ecc, "ecc-p256")
    tpm_store.derive(mac, b"a", new_id("g-d1"), "aes-256")
    tpm_store.derive(aes, b"a", new_id("g-d2"), "hmac-sha256")
    for i in range(40):
        message = i.to_bytes(2, "big")
        tpm_store.verify(ecc, message, tpm_store.sign(ecc, message))


# -- persistence and binding ----------------------------------------------------------------------


def test_keys_survive_reopen_and_tpm_restart(own_tpm: Callable[[str], Swtpm], tmp_path: Path, new_id: NewId) -> None:
    tpm = own_tpm("tpm")
    keys = tmp_path / "keys"
    material = os.urandom(32)
    ecc, mac, aes = new_id("p-ecc"), new_id("p-mac"), new_id("p-aes")
    with TpmKeyStore(tpm.tcti, keys) as store:
        store.generate(ecc, "ecc-p256")
        store.import_key(mac, "hmac-sha256", material)
        store.generate(aes, "aes-256")
        public = store.public_key(ecc)
        sealed = store.encrypt(aes, NONCE, MESSAGE, b"ad")
    peer = ec.generate_private_key(ec.SECP256R1())
    own = serialization.load_der_public_key(public)
    assert isinstance(own, ec.EllipticCurvePublicKey)
    with TpmKeyStore(tpm.tcti, keys) as store:  # the primary key is recreated from its template
        store.verify(ecc, MESSAGE, store.sign(ecc, MESSAGE))
    tpm.restart()
    with TpmKeyStore(tpm.tcti, keys) as store:
        assert store.public_key(ecc) == public
        assert store.ecdh(ecc, spki(peer.public_key())) == peer.exchange(ec.ECDH(), own)
        assert store.mac(mac, MESSAGE) == hmac.new(material, MESSAGE, hashlib.sha256).digest()
        assert store.decrypt(aes, NONCE, sealed, b"ad") == MESSAGE
        assert sorted(p.name for p in keys.iterdir()) == sorted(
            [f"{ecc}.tpmkey", f"{mac}.tpmkey", f"{aes}.tpmkey", "primary.name"]
        )


def test_key_files_are_useless_on_another_tpm(own_tpm: Callable[[str], Swtpm], tmp_path: Path, new_id: NewId) -> None:
    first, second = own_tpm("first"), own_tpm("second")
    keys, stolen = tmp_path / "keys", tmp_path / "stolen"
    key_ids = {t: new_id(t) for t in ("ecc-p256", "hmac-sha256", "aes-256")}
    with TpmKeyStore(first.tcti, keys) as store:
        for key_type, key_id in key_ids.items():
            store.generate(key_id, key_type)  # type: ignore[arg-type]
    # the pinned primary key name refuses the whole directory on another TPM
    with raises_rule(StateCorruptError, "keystore.integrity") as caught:
        TpmKeyStore(second.tcti, keys)
    assert "another TPM" in str(caught.value)
    # and without the pin, the TPM itself refuses every blob (they are wrapped under the first TPM's seed)
    stolen.mkdir()
    for key_id in key_ids.values():
        shutil.copy(keys / f"{key_id}.tpmkey", stolen / f"{key_id}.tpmkey")
    with TpmKeyStore(second.tcti, stolen) as thief:
        calls: list[Callable[[], object]] = [
            lambda: thief.sign(key_ids["ecc-p256"], MESSAGE),
            lambda: thief.public_key(key_ids["ecc-p256"]),
            lambda: thief.mac(key_ids["hmac-sha256"], MESSAGE),
            lambda: thief.encrypt(key_ids["aes-256"], NONCE, MESSAGE, b""),
            lambda: thief.derive(key_ids["aes-256"], b"x", new_id("loot"), "aes-256"),
            lambda: thief.ecdh(key_ids["ecc-p256"], spki(ec.generate_private_key(ec.SECP256R1()).public_key())),
        ]
        for call in calls:
            with raises_rule(StateCorruptError, "keystore.integrity") as caught:
                call()
            assert "refused by the TPM" in str(caught.value)


def test_key_file_bound_to_its_id_and_roles(tpm_store: TpmKeyStore, new_id: NewId) -> None:
    mac, other, aes = new_id("b-mac"), new_id("b-other"), new_id("b-aes")
    tpm_store.import_key(mac, "hmac-sha256", bytes(32))
    tpm_store.import_key(aes, "aes-256", bytes(32))
    path = tpm_store.state_dir / f"{mac}.tpmkey"
    blob = path.read_bytes()
    # a valid blob copied to another key id
    (tpm_store.state_dir / f"{other}.tpmkey").write_bytes(blob)
    with raises_rule(StateCorruptError, "keystore.integrity") as caught:
        tpm_store.mac(other, MESSAGE)
    assert "another key id or role" in str(caught.value)
    # the key's PRK object put in the key's place: HMAC(PRK, .) would be a derived key, not the MAC
    key = _KeyFile.parse(mac, blob)
    swapped = [(bytes(p.marshal()), bytes(q.marshal())) for p, q in reversed(key.objects)]
    path.write_bytes(_KeyFile.dump("hmac-sha256", swapped))
    with raises_rule(StateCorruptError, "keystore.integrity"):
        tpm_store.mac(mac, MESSAGE)
    # an HMAC key relabelled as an aes-256 key (its objects are not a sealed AES key)
    relabelled = [(bytes(p.marshal()), bytes(q.marshal())) for p, q in key.objects]
    path.write_bytes(_KeyFile.dump("aes-256", relabelled))
    with raises_rule(StateCorruptError, "keystore.integrity"):
        tpm_store.encrypt(mac, NONCE, MESSAGE, b"")
    # flipped bits in each object's public or private blob (encrypt loads object 0, derive object 1)
    aes_path = tpm_store.state_dir / f"{aes}.tpmkey"
    aes_blob = aes_path.read_bytes()
    pairs = [(bytes(p.marshal()), bytes(q.marshal())) for p, q in _KeyFile.parse(aes, aes_blob).objects]
    uses: list[Callable[[], object]] = [
        lambda: tpm_store.encrypt(aes, NONCE, MESSAGE, b""),
        lambda: tpm_store.derive(aes, b"x", new_id("b-out"), "aes-256"),
    ]
    for index, use in enumerate(uses):
        for part in (0, 1):
            for offset in (1, 20, -1):
                tampered = [list(pair) for pair in pairs]
                damaged = bytearray(tampered[index][part])
                damaged[offset] ^= 0x01
                tampered[index][part] = bytes(damaged)
                aes_path.write_bytes(_KeyFile.dump("aes-256", [(a, b) for a, b in tampered]))
                with raises_rule(StateCorruptError, "keystore.integrity"):
                    use()
    for junk in (aes_blob[:-1], b"", b"\xa0", os.urandom(200), aes_blob.replace(b"ism-tpm-key-v1", b"ism-tpm-key-v2")):
        aes_path.write_bytes(junk)
        with raises_rule(StateCorruptError, "keystore.integrity"):
            tpm_store.encrypt(aes, NONCE, MESSAGE, b"")
    aes_path.write_bytes(aes_blob)
    tpm_store.encrypt(aes, NONCE, MESSAGE, b"")  # the intact file still works


def test_sign_only_keys_from_before_ecdh_still_sign_and_refuse_ecdh(
    tpm_store: TpmKeyStore, swtpm: Swtpm, new_id: NewId
) -> None:
    """Key files written before ECDH support (sign-only, scheme ECDSA) load, sign and verify; ECDH is refused."""
    key_id = new_id("sign-only")
    with esapi(swtpm) as tpm:
        primary, *_ = tpm.create_primary(None, _storage_primary_template())
        try:
            private, public, *_ = tpm.create(
                primary, None, TPM2B_PUBLIC(publicArea=_template(key_id, "ecc-p256", sign_only=True))
            )
        finally:
            tpm.flush_context(primary)
    assert not public.publicArea.objectAttributes & TPMA_OBJECT.DECRYPT
    assert public.publicArea.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA
    path = tpm_store.state_dir / f"{key_id}.tpmkey"
    path.write_bytes(_KeyFile.dump("ecc-p256", [(bytes(public.marshal()), bytes(private.marshal()))]))
    assert tpm_store.key_type(key_id) == "ecc-p256"
    verifier = serialization.load_der_public_key(tpm_store.public_key(key_id))
    assert isinstance(verifier, ec.EllipticCurvePublicKey)
    signature = tpm_store.sign(key_id, MESSAGE)
    tpm_store.verify(key_id, MESSAGE, signature)
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    verifier.verify(encode_dss_signature(r, s), MESSAGE, ec.ECDSA(hashes.SHA256()))
    with raises_rule(UsageError, "keystore.key-usage"):
        tpm_store.ecdh(key_id, spki(ec.generate_private_key(ec.SECP256R1()).public_key()))
    # the peer key is checked before the key is loaded, as for every other key
    with raises_rule(FormatError, "keystore.peer-key"):
        tpm_store.ecdh(key_id, b"not a key")


def test_objects_have_the_documented_attributes(tpm_store: TpmKeyStore, swtpm: Swtpm, new_id: NewId) -> None:
    """Generated ECC keys are TPM-born and fixed; HMAC and PRK objects cannot be unsealed; only AES keys can."""
    ids = {t: new_id(f"a-{t}") for t in ("ecc-p256", "hmac-sha256", "aes-256")}
    for key_type, key_id in ids.items():
        tpm_store.generate(key_id, key_type)  # type: ignore[arg-type]
    imported = new_id("a-imported")
    tpm_store.import_key(imported, "ecc-p256", p256_pkcs8(ec.generate_private_key(ec.SECP256R1())))
    files = {
        key_id: _KeyFile.parse(key_id, (tpm_store.state_dir / f"{key_id}.tpmkey").read_bytes())
        for key_id in ids.values()
    }
    fixed = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
    ((ecc_public, _),) = files[ids["ecc-p256"]].objects
    assert ecc_public.publicArea.objectAttributes & (fixed | TPMA_OBJECT.SENSITIVEDATAORIGIN) == (
        fixed | TPMA_OBJECT.SENSITIVEDATAORIGIN
    )
    ((imported_public, _),) = _KeyFile.parse(
        imported, (tpm_store.state_dir / f"{imported}.tpmkey").read_bytes()
    ).objects
    assert len(bytes(imported_public.publicArea.authPolicy)) == 32  # no empty policy: Duplicate is unreachable
    # ECC keys sign and agree (TPM2_ECDH_ZGen needs decrypt, unrestricted; both uses need scheme NULL)
    for area in (ecc_public.publicArea, imported_public.publicArea):
        usage = TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.DECRYPT
        assert area.objectAttributes & usage == usage
        assert not area.objectAttributes & TPMA_OBJECT.RESTRICTED
        assert area.parameters.eccDetail.scheme.scheme == TPM2_ALG.NULL
    with esapi(swtpm) as tpm:
        primary, *_ = tpm.create_primary(None, _storage_primary_template())
        try:
            for key_id in (ids["hmac-sha256"], ids["aes-256"]):
                for index, (public, private) in enumerate(files[key_id].objects):
                    assert public.publicArea.objectAttributes & fixed == fixed
                    handle = tpm.load(primary, private, public)
                    try:
                        if key_id == ids["aes-256"] and index == 0:
                            assert len(bytes(tpm.unseal(handle))) == 32  # the documented exception
                        else:
                            with pytest.raises(TSS2_Exception):
                                tpm.unseal(handle)
                    finally:
                        tpm.flush_context(handle)
        finally:
            tpm.flush_context(primary)


def test_no_secret_crosses_the_tpm_bus_in_clear(
    swtpm: Swtpm, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new_id: NewId
) -> None:
    """Every byte exchanged with the TPM, captured by the pcap TCTI, contains no key material."""
    capture = tmp_path / "bus.pcap"
    monkeypatch.setenv("TCTI_PCAP_FILE", str(capture))
    material, ecc_key = os.urandom(32), ec.generate_private_key(ec.SECP256R1())
    scalar = ecc_key.private_numbers().private_value.to_bytes(32, "big")
    prk = hmac.new(bytes(32), material, hashlib.sha256).digest()
    okm = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"derived").derive(material)
    aes, mac, ecc, derived = new_id("bus-aes"), new_id("bus-mac"), new_id("bus-ecc"), new_id("bus-derived")
    with TpmKeyStore("pcap:" + swtpm.tcti, tmp_path / "keys") as store:
        store.import_key(aes, "aes-256", material)
        store.import_key(mac, "hmac-sha256", material)
        store.import_key(ecc, "ecc-p256", p256_pkcs8(ecc_key))
        store.derive(aes, b"derived", derived, "aes-256")
        sealed = store.encrypt(aes, NONCE, MESSAGE, b"")
        assert store.decrypt(derived, NONCE, store.encrypt(derived, NONCE, MESSAGE, b""), b"") == MESSAGE
        store.mac(mac, MESSAGE)
        store.sign(ecc, MESSAGE)
        peer = ec.generate_private_key(ec.SECP256R1())
        shared = store.ecdh(ecc, spki(peer.public_key()))
    assert AESGCM(material).decrypt(NONCE, sealed, b"") == MESSAGE
    assert shared == peer.exchange(ec.ECDH(), ecc_key.public_key())
    traffic = capture.read_bytes()
    assert hashlib.sha256(b"ism-tpm-key\x00" + aes.encode() + b"\x00prk").digest() in traffic  # the capture works
    for secret in (material, prk, okm, hmac.new(bytes(32), okm, hashlib.sha256).digest(), scalar, shared):
        assert secret not in traffic


# -- errors and lifecycle -------------------------------------------------------------------------


def test_unreachable_tpm_is_unavailable(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    for tcti in (f"swtpm:host=127.0.0.1,port={port}", "no-such-tcti:whatever", "device:/nonexistent/tpmrm0"):
        with raises_rule(PlatformError, "keystore.unavailable") as caught:
            TpmKeyStore(tcti, tmp_path / "keys")
        assert tcti in str(caught.value)


def test_tpm_gone_is_unavailable_and_close_is_final(
    own_tpm: Callable[[str], Swtpm], tmp_path: Path, new_id: NewId
) -> None:
    tpm = own_tpm("tpm")
    store = TpmKeyStore(tpm.tcti, tmp_path / "keys")
    key_id = new_id("gone")
    store.generate(key_id, "hmac-sha256")
    tpm.stop()
    with raises_rule(PlatformError, "keystore.unavailable"):
        store.mac(key_id, MESSAGE)
    store.close()
    store.close()  # idempotent
    with raises_rule(UsageError, "keystore.closed"):
        store.mac(key_id, MESSAGE)


def test_failed_operations_write_nothing(tpm_store: TpmKeyStore, new_id: NewId) -> None:
    def files() -> list[str]:
        return sorted(p.name for p in tpm_store.state_dir.iterdir())

    key_id = new_id("once")
    tpm_store.generate(key_id, "ecc-p256")
    before = files()
    attempts: list[Callable[[], object]] = [
        lambda: tpm_store.generate(key_id, "aes-256"),
        lambda: tpm_store.import_key(key_id, "ecc-p256", p256_pkcs8(ec.generate_private_key(ec.SECP256R1()))),
        lambda: tpm_store.import_key(new_id("bad"), "ecc-p256", b"junk"),
        lambda: tpm_store.derive(new_id("missing"), b"x", new_id("out"), "aes-256"),
        lambda: tpm_store.derive(key_id, b"x", new_id("out"), "aes-256"),
    ]
    for attempt in attempts:
        with pytest.raises(IsmError):
            attempt()
    assert files() == before
    assert not [name for name in files() if name.startswith(".")]  # no temporary files left


# -- the NV counter -------------------------------------------------------------------------------


def test_counter_is_monotonic_and_survives_reconnect_and_restart(own_tpm: Callable[[str], Swtpm]) -> None:
    tpm = own_tpm("tpm")
    index, other_index = 0x01500100, 0x01500101
    with esapi(tpm) as context:
        counter = TpmCounter(context, index)
        start = counter.read()  # defines and initialises the index
        values = [counter.increment() for _ in range(5)]
        assert values == [start + i for i in range(1, 6)]
        assert counter.read() == values[-1]
        other = TpmCounter(context, other_index)  # an independent index
        assert other.increment() == other.read()
        assert counter.read() == values[-1]
    with esapi(tpm) as context:  # reconnect: the value is in the TPM, not in the object
        assert TpmCounter(context, index).read() == values[-1]
    tpm.restart()
    with esapi(tpm) as context:  # TPM reboot: increments are not orderly, each one was in NV already
        counter = TpmCounter(context, index)
        assert counter.read() == values[-1]
        assert counter.increment() == values[-1] + 1
        highest = counter.read()
        # deleting and redefining the index does not roll it back
        context.nv_undefine_space(context.tr_from_tpmpublic(index))
        assert TpmCounter(context, index).read() >= highest


def test_counter_refuses_an_index_that_is_not_a_counter(own_tpm: Callable[[str], Swtpm]) -> None:
    tpm = own_tpm("tpm")
    index = 0x01500200
    with esapi(tpm) as context:
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=index,
                nameAlg=TPM2_ALG.SHA256,
                attributes=TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA,
                dataSize=8,
            )
        )
        context.nv_define_space(b"", public)
        counter = TpmCounter(context, index)
        with raises_rule(PlatformError, "keystore.token") as caught:
            counter.read()
        assert "not a counter" in str(caught.value)
        with raises_rule(PlatformError, "keystore.token"):
            counter.increment()
