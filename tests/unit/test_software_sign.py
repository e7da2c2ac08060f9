"""SoftwareKeyStore.sign on its lean path: the same signatures and the same errors as the checked path.

``sign`` skips the key-id check and the key-type lookup for a key id already in its cache (it was
checked when it was loaded), reuses one ``ECDSA(SHA256())`` and converts the DER signature to
r||s with slices. These tests hold the conversion to ``decode_dss_signature`` + ``int.to_bytes``
on every integer length and on malformed DER, and the refusals of ``sign`` to their rules.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from cryptography.hazmat.primitives.serialization import load_der_public_key
from hypothesis import given, settings
from hypothesis import strategies as st

from ism.crypto.keystore.software import MemoryKeyFiles, SoftwareKeyStore, _raw_signature
from ism.errors import IsmError, StateCorruptError, UsageError

PROPERTY = settings(derandomize=True, database=None, deadline=None, max_examples=2000)
MESSAGE = b"attestation token ToBeSigned"


def reference(der: bytes) -> Any:
    """What the conversion gave before the fast path: r||s, or the exception type."""
    try:
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    except (ValueError, OverflowError) as exc:
        return type(exc)


def fast(der: bytes) -> Any:
    try:
        return _raw_signature(der)
    except (ValueError, OverflowError) as exc:
        return type(exc)


EDGES = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 2**248 - 1, 2**248, 2**255 - 1, 2**255, 2**256 - 1, 2**256, 2**264]


@pytest.mark.parametrize("r", EDGES)
@pytest.mark.parametrize("s", EDGES)
def test_every_integer_length(r: int, s: int) -> None:
    der = encode_dss_signature(r, s)
    assert fast(der) == reference(der)


def _mutations(der: bytes) -> list[bytes]:
    out = [der[:i] for i in range(len(der))] + [der + b"\0", b"", b"\x30", b"\x30\x00"]
    out += [der[:i] + bytes([der[i] ^ (1 << bit)]) + der[i + 1 :] for i in range(min(len(der), 8)) for bit in range(8)]
    out += [der[:i] + bytes([v]) + der[i + 1 :] for i in (1, 3) for v in (0, 0x7F, 0x80, 0x81, 0xFF)]
    return out


@pytest.mark.parametrize("r", [1, 0x80, 2**255])
def test_malformed_der_behaves_as_before(r: int) -> None:
    for der in _mutations(encode_dss_signature(r, 2**200 + 5)):
        assert fast(der) == reference(der), der.hex()
    # non-minimal integers (a superfluous leading zero) and a negative one
    for body in (b"\x02\x02\x00\x01\x02\x01\x01", b"\x02\x01\x01\x02\x02\x00\x7f", b"\x02\x01\xff\x02\x01\x01"):
        der = bytes([0x30, len(body)]) + body
        assert fast(der) == reference(der), der.hex()


@PROPERTY
@given(st.integers(0, 2**256 - 1), st.integers(0, 2**256 - 1))
def test_random_integers(r: int, s: int) -> None:
    der = encode_dss_signature(r, s)
    assert _raw_signature(der) == r.to_bytes(32, "big") + s.to_bytes(32, "big")


@PROPERTY
@given(st.binary(max_size=80))
def test_random_bytes(data: bytes) -> None:
    assert fast(data) == reference(data)


def _store() -> SoftwareKeyStore:
    store = SoftwareKeyStore(MemoryKeyFiles(), os.urandom(32))
    store.generate("device.iak", "ecc-p256")
    store.generate("device.mac", "hmac-sha256")
    return store


def test_signatures_verify_on_first_and_later_use() -> None:
    store = _store()
    public = load_der_public_key(store.public_key("device.iak"))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    for _ in range(50):  # first use loads the key; later ones take the cached path
        signature = store.sign("device.iak", MESSAGE)
        assert len(signature) == 64
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        public.verify(der, MESSAGE, ec.ECDSA(hashes.SHA256()))
        store.verify("device.iak", MESSAGE, signature)


def _rule(call: Callable[[], object]) -> tuple[type[IsmError], str]:
    with pytest.raises(IsmError) as info:
        call()
    return type(info.value), info.value.rule


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_refusals_keep_their_rules(warm: bool) -> None:
    store = _store()
    if warm:  # the cache holds both keys
        store.sign("device.iak", MESSAGE)
        store.mac("device.mac", MESSAGE)
    bad_ids: list[Any] = ["../escape", "Device.iak", "", "a" * 97, "a..b", None, 7, b"device.iak", ["device.iak"]]
    for key_id in bad_ids:
        assert _rule(lambda k=key_id: store.sign(k, MESSAGE)) == (UsageError, "keystore.key-id")
    assert _rule(lambda: store.sign("device.mac", MESSAGE)) == (UsageError, "keystore.key-type")
    assert _rule(lambda: store.sign("absent", MESSAGE)) == (UsageError, "keystore.missing")
    store.destroy("device.iak")
    assert _rule(lambda: store.sign("device.iak", MESSAGE)) == (UsageError, "keystore.missing")


def test_a_replaced_or_tampered_key_is_not_signed_with_from_the_cache() -> None:
    files = MemoryKeyFiles()
    store = SoftwareKeyStore(files, os.urandom(32))
    store.generate("k", "ecc-p256")
    first = store.public_key("k")
    store.sign("k", MESSAGE)
    store.destroy("k")
    store.generate("k", "ecc-p256")  # a new key under the same id: the cached one is gone
    assert store.public_key("k") != first
    store.verify("k", MESSAGE, store.sign("k", MESSAGE))
    other = SoftwareKeyStore(files, os.urandom(32))  # another root key: the sealed blob fails its tag
    assert _rule(lambda: other.sign("k", MESSAGE)) == (StateCorruptError, "keystore.integrity")
