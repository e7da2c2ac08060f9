"""Unit tests for COSE_Sign1 / COSE_Mac0 (ism.crypto.cose)."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, signer_id
from ism.errors import ErrorCode, FormatError, IsmError, SignatureError, UsageError
from ism.formats import cbor

# Fixed keys so that every run exercises the same material.
ES256_KEY = ec.derive_private_key(0x1234_5678_9ABC_DEF0_1234_5678_9ABC_DEF0, ec.SECP256R1())
ES256_OTHER = ec.derive_private_key(0x0FED_CBA9_8765_4321, ec.SECP256R1())
P384_KEY = ec.derive_private_key(0x4242_4242, ec.SECP384R1())
ED25519_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
ED25519_OTHER = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
ED448_KEY = ed448.Ed448PrivateKey.from_private_bytes(bytes(range(57)))

PAYLOAD = b"the payload under test"
HMAC_KEY = bytes(range(32))

SIGNERS = [
    pytest.param(ES256_KEY, cose.ALG_ES256, "ES256", 64, id="es256"),
    pytest.param(ED25519_KEY, cose.ALG_EDDSA, "EdDSA", 64, id="ed25519"),
]


def _expect(exc_type: type[IsmError], rule: str, fn: Any, *args: Any, **kwargs: Any) -> IsmError:
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    assert type(info.value) is exc_type
    assert info.value.rule == rule
    assert info.value.code == exc_type.code
    return info.value


def _signature_error(fn: Any, *args: Any, rule: str = "cose.signature", **kwargs: Any) -> None:
    err = _expect(SignatureError, rule, fn, *args, **kwargs)
    assert err.code == ErrorCode.SIGNATURE == 201


def _format_error(rule: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    err = _expect(FormatError, rule, fn, *args, **kwargs)
    assert err.code == ErrorCode.FORMAT == 100


def _body(encoded: bytes) -> tuple[int, list[Any]]:
    value = cbor.loads(encoded)
    assert isinstance(value, cbor.Tag)
    return value.number, list(value.value)


def _rebuild(number: int, body: list[Any]) -> bytes:
    return cbor.dumps(cbor.Tag(number, body))


def _sign1_raw(protected: bytes, unprotected: dict[Any, Any], payload: bytes | None, sig: bytes) -> bytes:
    return _rebuild(cose.TAG_SIGN1, [protected, unprotected, payload, sig])


# ---------------------------------------------------------------------------
# COSE_Sign1: good paths
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "alg", "name", "siglen"), SIGNERS)
@pytest.mark.parametrize("aad", [b"", b"external aad"])
def test_sign1_attached(key: PrivateKey, alg: int, name: str, siglen: int, aad: bytes) -> None:
    encoded = cose.sign1(PAYLOAD, key, aad=aad, kid=b"kid-1")
    msg = cose.parse(encoded)
    assert msg.kind == "sign1"
    assert msg.tagged
    assert msg.alg == alg
    assert msg.alg_name == name
    assert msg.payload == PAYLOAD
    assert msg.kid == b"kid-1"
    assert len(msg.tag) == siglen
    assert msg.protected == {cose.HDR_ALG: alg, cose.HDR_KID: b"kid-1"}
    cose.verify_sign1(msg, key.public_key(), aad=aad)
    # Parsing from an already-decoded value gives the same message.
    assert cose.parse(cbor.loads(encoded)) == msg


@pytest.mark.parametrize(("key", "alg", "name", "siglen"), SIGNERS)
@pytest.mark.parametrize("aad", [b"", b"external aad"])
def test_sign1_detached(key: PrivateKey, alg: int, name: str, siglen: int, aad: bytes) -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, key, detached=True, aad=aad))
    assert msg.payload is None
    assert msg.alg == alg
    cose.verify_sign1(msg, key.public_key(), detached_payload=PAYLOAD, aad=aad)


@pytest.mark.parametrize(("key", "alg", "name", "siglen"), SIGNERS)
def test_sign1_untagged_needs_expect(key: PrivateKey, alg: int, name: str, siglen: int) -> None:
    encoded = cose.sign1(PAYLOAD, key, tagged=False)
    _format_error("cose.tag", cose.parse, encoded)
    msg = cose.parse(encoded, expect="sign1")
    assert not msg.tagged
    cose.verify_sign1(msg, key.public_key())


def test_sign1_esp256_alg_verifies_with_p256_key() -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, ES256_KEY, protected={cose.HDR_ALG: cose.ALG_ESP256}))
    assert msg.alg == cose.ALG_ESP256
    assert msg.alg_name == "ESP256"
    cose.verify_sign1(msg, ES256_KEY.public_key())


def test_sign1_understood_crit_is_accepted() -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, ES256_KEY, kid=b"k", protected={cose.HDR_CRIT: [cose.HDR_KID]}))
    cose.verify_sign1(msg, ES256_KEY.public_key())


def test_sign1_unsupported_private_key() -> None:
    _expect(UsageError, "cose.key", cose.sign1, PAYLOAD, P384_KEY.public_key())


# ---------------------------------------------------------------------------
# COSE_Sign1: tampering
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(("key", "alg", "name", "siglen"), SIGNERS)
def test_tampered_protected_header(key: PrivateKey, alg: int, name: str, siglen: int) -> None:
    number, body = _body(cose.sign1(PAYLOAD, key, kid=b"kid-1"))
    body[0] = cbor.dumps({cose.HDR_ALG: alg, cose.HDR_KID: b"kid-2"})
    msg = cose.parse(_rebuild(number, body))
    _signature_error(cose.verify_sign1, msg, key.public_key())


@pytest.mark.parametrize(("key", "alg", "name", "siglen"), SIGNERS)
def test_tampered_payload(key: PrivateKey, alg: int, name: str, siglen: int) -> None:
    number, body = _body(cose.sign1(PAYLOAD, key))
    body[2] = PAYLOAD[:-1] + bytes([PAYLOAD[-1] ^ 1])
    msg = cose.parse(_rebuild(number, body))
    _signature_error(cose.verify_sign1, msg, key.public_key())


@pytest.mark.parametrize(("key", "alg", "name", "siglen"), SIGNERS)
@pytest.mark.parametrize("index", [0, 31, 32, 63])
def test_tampered_signature(key: PrivateKey, alg: int, name: str, siglen: int, index: int) -> None:
    number, body = _body(cose.sign1(PAYLOAD, key))
    sig = bytearray(body[3])
    sig[index] ^= 0x01
    body[3] = bytes(sig)
    msg = cose.parse(_rebuild(number, body))
    _signature_error(cose.verify_sign1, msg, key.public_key())


@pytest.mark.parametrize(("key", "alg", "name", "siglen"), SIGNERS)
def test_wrong_detached_payload_or_aad(key: PrivateKey, alg: int, name: str, siglen: int) -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, key, detached=True, aad=b"aad"))
    _signature_error(cose.verify_sign1, msg, key.public_key(), detached_payload=PAYLOAD + b"x", aad=b"aad")
    _signature_error(cose.verify_sign1, msg, key.public_key(), detached_payload=PAYLOAD, aad=b"aaD")
    _signature_error(cose.verify_sign1, msg, key.public_key(), detached_payload=PAYLOAD)


@pytest.mark.parametrize(
    ("key", "other"),
    [pytest.param(ES256_KEY, ES256_OTHER, id="es256"), pytest.param(ED25519_KEY, ED25519_OTHER, id="ed25519")],
)
def test_wrong_key_of_right_type(key: PrivateKey, other: PrivateKey) -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, key))
    _signature_error(cose.verify_sign1, msg, other.public_key())


def test_tampered_ed25519_signature_of_wrong_length() -> None:
    number, body = _body(cose.sign1(PAYLOAD, ED25519_KEY))
    for sig in (body[3][:-1], body[3] + b"\x00", b""):
        body[3] = sig
        _signature_error(cose.verify_sign1, cose.parse(_rebuild(number, body)), ED25519_KEY.public_key())


@pytest.mark.parametrize("length", [0, 32, 63, 65, 72])
def test_es256_signature_of_wrong_length(length: int) -> None:
    number, body = _body(cose.sign1(PAYLOAD, ES256_KEY))
    body[3] = (body[3] * 2)[:length]
    msg = cose.parse(_rebuild(number, body))
    with pytest.raises(SignatureError) as info:
        cose.verify_sign1(msg, ES256_KEY.public_key())
    assert info.value.rule == "cose.signature"
    assert info.value.code == ErrorCode.SIGNATURE
    assert info.value.got == length


def test_es256_signature_of_zeros() -> None:
    number, body = _body(cose.sign1(PAYLOAD, ES256_KEY))
    body[3] = b"\x00" * 64
    _signature_error(cose.verify_sign1, cose.parse(_rebuild(number, body)), ES256_KEY.public_key())
    body[3] = b"\xff" * 64  # r and s above the group order
    _signature_error(cose.verify_sign1, cose.parse(_rebuild(number, body)), ES256_KEY.public_key())


# ---------------------------------------------------------------------------
# COSE_Sign1: algorithm confusion and header rules
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer", "verifier"),
    [
        pytest.param(ES256_KEY, ED25519_KEY.public_key(), id="es256-msg-ed25519-key"),
        pytest.param(ES256_KEY, P384_KEY.public_key(), id="es256-msg-p384-key"),
        pytest.param(ED25519_KEY, ES256_KEY.public_key(), id="eddsa-msg-p256-key"),
        pytest.param(ED25519_KEY, ED448_KEY.public_key(), id="eddsa-msg-ed448-key"),
    ],
)
def test_alg_key_mismatch(signer: PrivateKey, verifier: Any) -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, signer))
    _signature_error(cose.verify_sign1, msg, verifier, rule="cose.alg-key")


def test_alg_relabelled_is_refused() -> None:
    # An Ed25519 signature relabelled as ES256: the key no longer fits the alg.
    number, body = _body(cose.sign1(PAYLOAD, ED25519_KEY))
    body[0] = cbor.dumps({cose.HDR_ALG: cose.ALG_ES256})
    msg = cose.parse(_rebuild(number, body))
    _signature_error(cose.verify_sign1, msg, ED25519_KEY.public_key(), rule="cose.alg-key")


def test_alg_in_unprotected() -> None:
    protected = cbor.dumps({cose.HDR_KID: b"k"})
    data = _sign1_raw(protected, {cose.HDR_ALG: cose.ALG_ES256}, PAYLOAD, b"\x00" * 64)
    _format_error("cose.alg-unprotected", cose.parse, data)
    data = _sign1_raw(b"", {cose.HDR_ALG: cose.ALG_EDDSA}, PAYLOAD, b"\x00" * 64)
    _format_error("cose.alg-unprotected", cose.parse, data)


def test_duplicate_label_across_buckets() -> None:
    data = cose.sign1(PAYLOAD, ES256_KEY, kid=b"k", unprotected={cose.HDR_KID: b"k"})
    _format_error("cose.header-duplicate", cose.parse, data)
    # alg in both buckets: still a duplicate, whatever the values.
    data = cose.sign1(PAYLOAD, ES256_KEY, unprotected={cose.HDR_ALG: cose.ALG_ES256})
    _format_error("cose.header-duplicate", cose.parse, data)


@pytest.mark.parametrize(
    "crit",
    [
        pytest.param([99], id="unknown-int"),
        pytest.param(["x-private"], id="unknown-text"),
        pytest.param([cose.HDR_KID, 99], id="one-unknown"),
        pytest.param([], id="empty"),
        pytest.param(99, id="not-an-array"),
        pytest.param([[cose.HDR_ALG]], id="array-label"),
        pytest.param([{1: 2}], id="map-label"),
        pytest.param([True], id="bool-label"),
    ],
)
def test_crit(crit: Any) -> None:
    data = cose.sign1(PAYLOAD, ES256_KEY, protected={cose.HDR_CRIT: crit, 99: 1, "x-private": 1})
    _format_error("cose.crit", cose.parse, data)


def test_crit_must_be_protected() -> None:
    data = cose.sign1(PAYLOAD, ES256_KEY, kid=b"k", unprotected={cose.HDR_CRIT: [cose.HDR_KID]})
    _format_error("cose.crit", cose.parse, data)


def test_crit_label_must_be_present() -> None:
    data = cose.sign1(PAYLOAD, ES256_KEY, protected={cose.HDR_CRIT: [cose.HDR_CONTENT_TYPE]})
    _format_error("cose.crit", cose.parse, data)


def test_wrong_tag() -> None:
    number, body = _body(cose.sign1(PAYLOAD, ES256_KEY))
    assert number == cose.TAG_SIGN1
    _format_error("cose.tag", cose.parse, _rebuild(98, body))  # COSE_Sign, not supported
    _format_error("cose.tag", cose.parse, _rebuild(cose.TAG_SIGN1, body), expect="mac0")
    _format_error("cose.tag", cose.parse, cose.mac0(PAYLOAD, HMAC_KEY), expect="sign1")
    mac = cose.parse(cose.mac0(PAYLOAD, HMAC_KEY))
    _format_error("cose.tag", cose.verify_sign1, mac, ES256_KEY.public_key())
    sign = cose.parse(cose.sign1(PAYLOAD, ES256_KEY))
    _format_error("cose.tag", cose.verify_mac0, sign, HMAC_KEY)


def test_mac_alg_in_sign1_is_unsupported() -> None:
    data = _sign1_raw(cbor.dumps({cose.HDR_ALG: cose.ALG_HMAC256}), {}, PAYLOAD, b"\x00" * 32)
    _format_error("cose.alg-unsupported", cose.parse, data)


@pytest.mark.parametrize(
    ("body", "rule"),
    [
        ([b"", {}, None], "cose.structure"),
        ([b"", {}, None, b"", b""], "cose.structure"),
        ({1: 2}, "cose.structure"),
        (["", {}, b"p", b"s"], "cose.protected"),
        ([cbor.dumps([1]), {}, b"p", b"s"], "cose.protected"),
        ([b"\xa1\x01", {}, b"p", b"s"], "cbor.truncated"),
        ([cbor.dumps({1: -7}), [], b"p", b"s"], "cose.unprotected"),
        ([cbor.dumps({1: -7}), {}, "text", b"s"], "cose.payload"),
        ([cbor.dumps({1: -7}), {}, b"p", "sig"], "cose.signature"),
        ([b"", {}, b"p", b"s"], "cose.alg-missing"),
        ([cbor.dumps({1: "ES256"}), {}, b"p", b"s"], "cose.alg-missing"),
        ([cbor.dumps({1: True}), {}, b"p", b"s"], "cose.alg-missing"),
        ([cbor.dumps({1: -35}), {}, b"p", b"s"], "cose.alg-unsupported"),
    ],
)
def test_structure(body: Any, rule: str) -> None:
    _format_error(rule, cose.parse, _rebuild(cose.TAG_SIGN1, body))


def test_payload_arrangement() -> None:
    attached = cose.parse(cose.sign1(PAYLOAD, ES256_KEY))
    _format_error("cose.payload", cose.verify_sign1, attached, ES256_KEY.public_key(), detached_payload=PAYLOAD)
    detached = cose.parse(cose.sign1(PAYLOAD, ES256_KEY, detached=True))
    _format_error("cose.payload", cose.verify_sign1, detached, ES256_KEY.public_key())


def test_kid_is_bytes_only() -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, ES256_KEY, kid=signer_id(ES256_KEY)))
    assert msg.kid == signer_id(ES256_KEY)
    msg = cose.parse(cose.sign1(PAYLOAD, ES256_KEY, unprotected={cose.HDR_KID: b"u"}))
    assert msg.kid == b"u"
    msg = cose.parse(cose.sign1(PAYLOAD, ES256_KEY, protected={cose.HDR_KID: "text"}))
    assert msg.kid is None


def test_signature_error_is_public_safe() -> None:
    msg = cose.parse(cose.sign1(PAYLOAD, ES256_KEY))
    with pytest.raises(SignatureError) as info:
        cose.verify_sign1(msg, ES256_OTHER.public_key())
    assert info.value.public() == {"code": 201, "rule": "cose.signature"}


# ---------------------------------------------------------------------------
# COSE_Mac0
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "name", "taglen"),
    [
        (cose.ALG_HMAC256, "HMAC256/256", 32),
        (cose.ALG_HMAC384, "HMAC384/384", 48),
        (cose.ALG_HMAC512, "HMAC512/512", 64),
    ],
)
@pytest.mark.parametrize("detached", [False, True])
def test_mac0_round_trip(alg: int, name: str, taglen: int, detached: bool) -> None:
    encoded = cose.mac0(PAYLOAD, HMAC_KEY, alg=alg, detached=detached, aad=b"aad")
    msg = cose.parse(encoded)
    assert msg.kind == "mac0"
    assert msg.alg == alg
    assert msg.alg_name == name
    assert len(msg.tag) == taglen
    assert msg.payload == (None if detached else PAYLOAD)
    kwargs: dict[str, Any] = {"detached_payload": PAYLOAD} if detached else {}
    cose.verify_mac0(msg, HMAC_KEY, aad=b"aad", **kwargs)
    _signature_error(cose.verify_mac0, msg, HMAC_KEY, **kwargs)  # aad missing
    _signature_error(cose.verify_mac0, msg, HMAC_KEY[:-1] + b"\x00", aad=b"aad", **kwargs)  # wrong key
    _signature_error(cose.verify_mac0, msg, b"", aad=b"aad", **kwargs)


def test_mac0_tampering() -> None:
    number, body = _body(cose.mac0(PAYLOAD, HMAC_KEY))
    assert number == cose.TAG_MAC0
    tampered = list(body)
    tampered[3] = bytes([body[3][0] ^ 0x80]) + body[3][1:]
    _signature_error(cose.verify_mac0, cose.parse(_rebuild(number, tampered)), HMAC_KEY)
    tampered = list(body)
    tampered[3] = body[3][:16]
    _signature_error(cose.verify_mac0, cose.parse(_rebuild(number, tampered)), HMAC_KEY)
    tampered = list(body)
    tampered[2] = PAYLOAD + b"!"
    _signature_error(cose.verify_mac0, cose.parse(_rebuild(number, tampered)), HMAC_KEY)
    tampered = list(body)
    tampered[0] = cbor.dumps({cose.HDR_ALG: cose.ALG_HMAC256, cose.HDR_KID: b"k"})
    _signature_error(cose.verify_mac0, cose.parse(_rebuild(number, tampered)), HMAC_KEY)
    # Downgrading the algorithm label does not help either.
    tampered = list(body)
    tampered[0] = cbor.dumps({cose.HDR_ALG: cose.ALG_HMAC384})
    _signature_error(cose.verify_mac0, cose.parse(_rebuild(number, tampered)), HMAC_KEY)


def test_mac0_rules() -> None:
    _expect(UsageError, "cose.alg-unsupported", cose.mac0, PAYLOAD, HMAC_KEY, alg=cose.ALG_ES256)
    data = _rebuild(cose.TAG_MAC0, [cbor.dumps({cose.HDR_ALG: cose.ALG_ES256}), {}, PAYLOAD, b"\x00" * 32])
    _format_error("cose.alg-unsupported", cose.parse, data)
    data = _rebuild(cose.TAG_MAC0, [b"", {cose.HDR_ALG: cose.ALG_HMAC256}, PAYLOAD, b"\x00" * 32])
    _format_error("cose.alg-unprotected", cose.parse, data)
    detached = cose.parse(cose.mac0(PAYLOAD, HMAC_KEY, detached=True))
    _format_error("cose.payload", cose.verify_mac0, detached, HMAC_KEY)


# -- the DER signature verify_sign1 hands to OpenSSL -----------------------------------------------

_EDGES = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 2**248 - 1, 2**248, 2**255 - 1, 2**255, 2**256 - 1]


@pytest.mark.parametrize("r", _EDGES)
@pytest.mark.parametrize("s", _EDGES)
def test_der_signature_is_encode_dss_signature(r: int, s: int) -> None:
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    assert cose._der_signature(raw) == encode_dss_signature(r, s)


def test_parse_builds_the_same_message_as_the_constructor() -> None:
    token = cose.sign1(PAYLOAD, ES256_KEY, kid=b"k", unprotected={3: "text/plain"})
    msg = cose.parse(token)
    expected = cose.CoseMessage(
        "sign1", msg.protected_bytes, {1: -7, 4: b"k"}, {3: "text/plain"}, PAYLOAD, msg.tag, -7, True
    )
    assert msg == expected
    assert repr(msg) == repr(expected)
