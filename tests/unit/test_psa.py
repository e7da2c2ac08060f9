"""PSA token claims (ism.formats.psa), token signing/verification and appraisal (ism.crypto.attestation).

Own tokens round-trip; every single-bit flip of a token is refused; malformed
input (wrong tag or algorithm, missing claims, wrong sizes, duplicate keys,
indefinite lengths, deep nesting, huge arrays) gives a typed error naming the
rule; the appraisal's verdict per component follows docs/attestation.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from ism.crypto import attestation as at
from ism.crypto import cose
from ism.crypto.keys import generate, signer_id
from ism.errors import ErrorCode, FormatError, IsmError, SignatureError, TrustError, UsageError
from ism.formats import cbor, psa

NONCE = bytes(range(32))
UEID = b"\x01" + bytes(range(100, 132))
IMPL = b"\xaa" * 32
HMAC_KEY = b"k" * 32
KEY = generate("es256")
assert isinstance(KEY, ec.EllipticCurvePrivateKey)
PUB = KEY.public_key()

MS_UUID = uuidlib.UUID("6c1b3a1e-5f7e-4a39-9d7b-1f2a3b4c5d6e")


def ms(name: str = "fingerprint", **kw: Any) -> psa.MicroserviceClaims:
    fields: dict[str, Any] = {
        "uuid": MS_UUID,
        "name": name,
        "version": "1.2.0",
        "sequence": 7,
        "measurement": hashlib.sha256(name.encode()).digest(),
        "signer": b"\x05" * 32,
        "policy_digest": b"\x06" * 32,
        "lifecycle": "active",
        "certifications": ("PSA Certified Level 1",),
    }
    fields.update(kw)
    return psa.MicroserviceClaims(**fields)


def component(name: str = "ism", **kw: Any) -> psa.SwComponent:
    fields: dict[str, Any] = {
        "measurement_type": name,
        "measurement_value": hashlib.sha256(name.encode()).digest(),
        "version": "1.2.0",
        "signer_id": b"\x05" * 32,
        "measurement_desc": "sha-256",
    }
    fields.update(kw)
    return psa.SwComponent(**fields)


HEAD = hashlib.sha256(b"lifecycle log head").digest()


def device_claims(**kw: Any) -> psa.Claims:
    fields: dict[str, Any] = {
        "profile": psa.PROFILE_PSA,
        "nonce": NONCE,
        "instance_id": UEID,
        "implementation_id": IMPL,
        "client_id": -1,
        "lifecycle": 0x3000,
        "software_components": (component("ism"), component("fingerprint")),
        "boot_seed": b"\x11" * 16,
        "certification_reference": "1234567890123-12345",
        "verification_service": "https://store.ism.example/verify",
        "submods": (ms(),),
        "lifecycle_log": HEAD,
    }
    fields.update(kw)
    return psa.Claims(**fields)


def ms_claims(**kw: Any) -> psa.Claims:
    fields: dict[str, Any] = {
        "profile": psa.PROFILE_MICROSERVICE,
        "nonce": NONCE,
        "instance_id": UEID,
        "implementation_id": IMPL,
        "client_id": -2,
        "lifecycle": 0x3000,
        "software_components": (component("fingerprint"),),
        "microservice": ms(),
        "lifecycle_log": HEAD,
    }
    fields.update(kw)
    return psa.Claims(**fields)


def rule_of(fn: Callable[[], object]) -> tuple[type[IsmError], str, str | None]:
    with pytest.raises(IsmError) as info:
        fn()
    return type(info.value), info.value.rule, info.value.subject


def raw_map(claims: psa.Claims) -> dict[int, Any]:
    return claims.encode_map()


def decode_map(mutate: Callable[[dict[int, Any]], None], base: psa.Claims | None = None) -> psa.Claims:
    raw = raw_map(base or device_claims())
    mutate(raw)
    return psa.decode_claims(cbor.dumps(raw))


# -- round trips ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [device_claims, ms_claims], ids=["device", "microservice"])
def test_claims_round_trip_and_deterministic_encoding(make: Callable[[], psa.Claims]) -> None:
    claims = make()
    data = claims.encode()
    assert data == make().encode()
    assert psa.decode_claims(data) == claims
    assert psa.decode_claims(data).encode() == data


def test_device_token_sign1_round_trip_with_submodules() -> None:
    token = at.sign_token(device_claims(), KEY)
    assert token[0] == 0xD2  # tag 18
    verified = at.verify_token(token, key=PUB, nonce=NONCE)
    assert verified.kind == "sign1"
    assert verified.alg == "ES256"
    assert verified.signer == signer_id(PUB)
    assert verified.claims == device_claims()
    assert verified.claims.submods[0].name == "fingerprint"
    assert verified.claims.lifecycle_state == "secured"
    assert json.loads(json.dumps(verified.to_json()))["claims"]["submods"]["fingerprint"]["uuid"] == str(MS_UUID)


def test_microservice_token_mac0_round_trip() -> None:
    token = at.mac_token(ms_claims(), HMAC_KEY)
    assert token[0] == 0xD1  # tag 17
    verified = at.verify_token(token, hmac_key=HMAC_KEY, nonce=NONCE)
    assert verified.kind == "mac0"
    assert verified.claims.microservice == ms()
    assert verified.claims.microservices() == (ms(),)


def test_a_token_verifier_is_verify_token_for_many_tokens() -> None:
    verifier = at.TokenVerifier(PUB, HMAC_KEY)
    for token in (at.sign_token(device_claims(), KEY), at.mac_token(ms_claims(), HMAC_KEY)):
        for _ in range(2):  # nothing about one token carries over to the next
            assert verifier.verify(token, NONCE) == at.verify_token(token, PUB, HMAC_KEY, NONCE)
    assert verifier.verify(at.sign_token(device_claims(), KEY)).signer == signer_id(PUB)
    assert rule_of(lambda: verifier.verify(at.sign_token(device_claims(), KEY), b"\0" * 32))[:2] == (
        TrustError,
        "attest.nonce",
    )
    other = generate("es256").public_key()  # type: ignore[union-attr]
    forged = at.sign_token(device_claims(), generate("es256"))  # type: ignore[arg-type]
    assert rule_of(lambda: at.TokenVerifier(other).verify(forged))[:2] == (SignatureError, "cose.signature")
    assert rule_of(at.TokenVerifier)[:2] == (UsageError, "attest.key")
    mac_only = at.TokenVerifier(hmac_key=HMAC_KEY)
    assert rule_of(lambda: mac_only.verify(at.sign_token(device_claims(), KEY)))[:2] == (UsageError, "attest.key")


def test_sign_with_an_external_signer_like_the_key_store() -> None:
    def keystore_sign(message: bytes) -> bytes:
        r, s = decode_dss_signature(KEY.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    token = at.sign_token(device_claims(), keystore_sign, kid=b"iak")
    verified = at.verify_token(token, key=PUB)
    assert verified.kid == b"iak"
    assert at.verify_token(
        at.mac_token(ms_claims(), lambda m: cose._mac(cose.ALG_HMAC256, HMAC_KEY, m)), hmac_key=HMAC_KEY
    )


def test_sign_refuses_unusable_keys() -> None:
    assert rule_of(lambda: at.sign_token(device_claims(), generate("ed25519")))[1] == "attest.key"  # type: ignore[arg-type]
    assert rule_of(lambda: at.sign_token(device_claims(), lambda m: b"short"))[1] == "attest.key"
    assert rule_of(lambda: at.mac_token(device_claims(), b"short"))[1] == "attest.key"


def _flips(token: bytes) -> list[bytes]:
    return [token[:i] + bytes([token[i] ^ (1 << bit)]) + token[i + 1 :] for i in range(len(token)) for bit in range(8)]


SMALL = psa.Claims(
    profile=psa.PROFILE_PSA,
    nonce=NONCE,
    instance_id=UEID,
    implementation_id=IMPL,
    client_id=1,
    lifecycle=0x3000,
    software_components=(psa.SwComponent(b"\x03" * 32, b"\x04" * 32),),
)


@pytest.mark.parametrize("kind", ["sign1", "mac0"])
def test_every_single_bit_flip_is_rejected(kind: str) -> None:
    token = at.sign_token(SMALL, KEY) if kind == "sign1" else at.mac_token(SMALL, HMAC_KEY)
    at.verify_token(token, key=PUB, hmac_key=HMAC_KEY)
    for flipped in _flips(token):
        with pytest.raises(IsmError):
            at.verify_token(flipped, key=PUB, hmac_key=HMAC_KEY)


# -- verification failures -----------------------------------------------------------------------


def test_wrong_key_and_wrong_nonce() -> None:
    token = at.sign_token(device_claims(), KEY)
    other = generate("es256").public_key()  # type: ignore[union-attr]
    err, rule, _ = rule_of(lambda: at.verify_token(token, key=other))
    assert (err, rule) == (SignatureError, "cose.signature")
    err, rule, _ = rule_of(lambda: at.verify_token(token, key=PUB, nonce=b"\x00" * 32))
    assert (err, rule) == (TrustError, "attest.nonce")
    mac = at.mac_token(device_claims(), HMAC_KEY)
    assert rule_of(lambda: at.verify_token(mac, hmac_key=b"x" * 32))[:2] == (SignatureError, "cose.signature")


def test_key_kind_must_fit_the_token() -> None:
    token = at.sign_token(device_claims(), KEY)
    assert rule_of(lambda: at.verify_token(token, hmac_key=HMAC_KEY))[:2] == (UsageError, "attest.key")
    mac = at.mac_token(device_claims(), HMAC_KEY)
    assert rule_of(lambda: at.verify_token(mac, key=PUB))[:2] == (UsageError, "attest.key")
    assert rule_of(lambda: at.verify_token(token))[:2] == (UsageError, "attest.key")


def _cose(tag: int | None, protected: dict[int, Any], payload: bytes | None, signature: bytes = b"\0" * 64) -> bytes:
    body = [cbor.dumps(protected), {}, payload, signature]
    return cbor.dumps(body if tag is None else cbor.Tag(tag, body))


PAYLOAD = SMALL.encode()

BAD_TOKENS: list[tuple[str, bytes, type[IsmError], str]] = [
    ("empty", b"", FormatError, "cbor.truncated"),
    ("not cbor", b"\xff\x00", FormatError, "cbor.unexpected-break"),
    ("untagged", _cose(None, {1: -7}, PAYLOAD), FormatError, "cose.tag"),
    ("CWT tag 61", _cose(61, {1: -7}, PAYLOAD), FormatError, "cose.tag"),
    ("COSE_Sign tag 98", _cose(98, {1: -7}, PAYLOAD), FormatError, "cose.tag"),
    ("ES384 alg", _cose(18, {1: -35}, PAYLOAD), FormatError, "cose.alg-unsupported"),
    ("HMAC alg in Sign1", _cose(18, {1: 5}, PAYLOAD), FormatError, "cose.alg-unsupported"),
    ("no alg", _cose(18, {}, PAYLOAD), FormatError, "cose.alg-missing"),
    ("detached payload", _cose(18, {1: -7}, None), FormatError, "attest.payload"),
    ("forged signature", _cose(18, {1: -7}, PAYLOAD), SignatureError, "cose.signature"),
    ("too large", b"\xd2" + b"\0" * at.MAX_TOKEN, FormatError, "attest.token-size"),
    ("trailing bytes", at.sign_token(SMALL, KEY) + b"\0", FormatError, "cbor.trailing"),
]


@pytest.mark.parametrize(("data", "error", "rule"), [t[1:] for t in BAD_TOKENS], ids=[t[0] for t in BAD_TOKENS])
def test_bad_tokens_are_typed_errors(data: bytes, error: type[IsmError], rule: str) -> None:
    assert rule_of(lambda: at.verify_token(data, key=PUB, hmac_key=HMAC_KEY))[:2] == (error, rule)


def _signed_raw(payload: bytes) -> bytes:
    """A validly signed token over arbitrary payload bytes: the claims check is what must refuse it."""
    return cose.sign1(payload, KEY)


def test_claims_are_checked_after_the_signature() -> None:
    raw = raw_map(SMALL)
    del raw[psa.EAT_NONCE]
    token = _signed_raw(cbor.dumps(raw))
    assert rule_of(lambda: at.verify_token(token, key=PUB))[1:] == ("attest.missing", "nonce")


# -- claims: missing, type, size, value, unknown ---------------------------------------------------

MANDATORY = [
    (psa.EAT_NONCE, "nonce"),
    (psa.EAT_UEID, "instance-id"),
    (psa.PSA_IMPLEMENTATION_ID, "implementation-id"),
    (psa.PSA_CLIENT_ID, "client-id"),
    (psa.PSA_LIFECYCLE, "security-lifecycle"),
    (psa.PSA_SOFTWARE_COMPONENTS, "software-components"),
]


@pytest.mark.parametrize(("key", "name"), MANDATORY, ids=[n for _, n in MANDATORY])
def test_missing_mandatory_claim(key: int, name: str) -> None:
    err, rule, subject = rule_of(lambda: decode_map(lambda m: m.pop(key)))
    assert (err, rule, subject) == (FormatError, "attest.missing", name)
    assert err.code == ErrorCode.FORMAT


MS_MANDATORY = [
    (psa.MS_UUID, "ms-uuid"),
    (psa.MS_NAME, "ms-name"),
    (psa.MS_VERSION, "ms-version"),
    (psa.MS_SEQUENCE, "ms-sequence"),
    (psa.MS_MEASUREMENT, "ms-measurement"),
    (psa.MS_SIGNER, "ms-signer"),
    (psa.MS_POLICY_DIGEST, "ms-policy-digest"),
    (psa.MS_LIFECYCLE, "ms-lifecycle"),
]


@pytest.mark.parametrize(("key", "name"), MS_MANDATORY, ids=[n for _, n in MS_MANDATORY])
def test_missing_microservice_claim_in_token_and_in_submodule(key: int, name: str) -> None:
    assert rule_of(lambda: decode_map(lambda m: m.pop(key), ms_claims()))[1:] == ("attest.missing", name)

    def drop_in_submodule(m: dict[int, Any]) -> None:
        del m[psa.EAT_SUBMODS]["fingerprint"][key]

    assert rule_of(lambda: decode_map(drop_in_submodule))[1:] == ("attest.missing", f"submods[fingerprint].{name}")


def _set(key: int, value: Any) -> Callable[[dict[int, Any]], None]:
    def mutate(m: dict[int, Any]) -> None:
        m[key] = value

    return mutate


def _set_component(field_key: int, value: Any) -> Callable[[dict[int, Any]], None]:
    def mutate(m: dict[int, Any]) -> None:
        m[psa.PSA_SOFTWARE_COMPONENTS][1][field_key] = value

    return mutate


def _set_ms(field_key: int, value: Any) -> Callable[[dict[int, Any]], None]:
    def mutate(m: dict[int, Any]) -> None:
        m[psa.EAT_SUBMODS]["fingerprint"][field_key] = value

    return mutate


BAD_CLAIMS: list[tuple[str, Callable[[dict[int, Any]], None], str, str | None]] = [
    ("nonce 31 bytes", _set(psa.EAT_NONCE, b"\0" * 31), "attest.size", "nonce"),
    ("nonce 65 bytes", _set(psa.EAT_NONCE, b"\0" * 65), "attest.size", "nonce"),
    ("nonce array", _set(psa.EAT_NONCE, [NONCE, NONCE]), "attest.type", "nonce"),
    ("nonce text", _set(psa.EAT_NONCE, "abc"), "attest.type", "nonce"),
    ("ueid 32 bytes", _set(psa.EAT_UEID, UEID[:32]), "attest.size", "instance-id"),
    ("ueid type 2", _set(psa.EAT_UEID, b"\x02" + UEID[1:]), "attest.value", "instance-id"),
    ("impl 31 bytes", _set(psa.PSA_IMPLEMENTATION_ID, IMPL[:31]), "attest.size", "implementation-id"),
    ("client id text", _set(psa.PSA_CLIENT_ID, "1"), "attest.type", "client-id"),
    ("client id bool", _set(psa.PSA_CLIENT_ID, True), "attest.type", "client-id"),
    ("client id zero", _set(psa.PSA_CLIENT_ID, 0), "attest.value", "client-id"),
    ("client id 2**31", _set(psa.PSA_CLIENT_ID, 2**31), "attest.value", "client-id"),
    ("lifecycle 0x7000", _set(psa.PSA_LIFECYCLE, 0x7000), "attest.value", "security-lifecycle"),
    ("lifecycle 0x3100", _set(psa.PSA_LIFECYCLE, 0x3100), "attest.value", "security-lifecycle"),
    ("lifecycle bytes", _set(psa.PSA_LIFECYCLE, b"\x30"), "attest.type", "security-lifecycle"),
    ("boot seed 7", _set(psa.EAT_BOOT_SEED, b"\0" * 7), "attest.size", "boot-seed"),
    ("boot seed 33", _set(psa.EAT_BOOT_SEED, b"\0" * 33), "attest.size", "boot-seed"),
    ("cert ref 12 digits", _set(psa.PSA_CERTIFICATION_REFERENCE, "123456789012"), "attest.value", None),
    ("cert ref +4", _set(psa.PSA_CERTIFICATION_REFERENCE, "1234567890123-1234"), "attest.value", None),
    ("vsi empty", _set(psa.PSA_VERIFICATION_SERVICE, ""), "attest.value", "verification-service-indicator"),
    ("vsi bytes", _set(psa.PSA_VERIFICATION_SERVICE, b"x"), "attest.type", "verification-service-indicator"),
    ("components map", _set(psa.PSA_SOFTWARE_COMPONENTS, {}), "attest.type", "software-components"),
    ("components empty", _set(psa.PSA_SOFTWARE_COMPONENTS, []), "attest.size", "software-components"),
    (
        "components too many",
        _set(psa.PSA_SOFTWARE_COMPONENTS, [component().encode()] * (psa.MAX_COMPONENTS + 1)),
        "attest.size",
        "software-components",
    ),
    (
        "component not a map",
        _set(psa.PSA_SOFTWARE_COMPONENTS, [b"x"]),
        "attest.type",
        "software-components[0].software-component",
    ),
    (
        "component measurement 20 bytes",
        _set_component(psa.SC_MEASUREMENT_VALUE, b"\0" * 20),
        "attest.size",
        "software-components[1].measurement-value",
    ),
    (
        "component signer text",
        _set_component(psa.SC_SIGNER_ID, "x"),
        "attest.type",
        "software-components[1].signer-id",
    ),
    ("component version int", _set_component(psa.SC_VERSION, 1), "attest.type", "software-components[1].version"),
    ("component unknown key 3", _set_component(3, 1), "attest.unknown-claim", "software-components[1].3"),
    ("unknown claim exp", _set(4, 1700000000), "attest.unknown-claim", "4"),
    ("text claim key", _set("iss", "x"), "attest.unknown-claim", "'iss'"),  # type: ignore[arg-type]
    ("legacy key in RFC 9783", _set(psa.P1_NONCE, NONCE), "attest.unknown-claim", "-75008"),
    ("P2 boot seed key in RFC 9783", _set(psa.PSA_BOOT_SEED_2_0_0, b"\0" * 8), "attest.unknown-claim", "2397"),
    ("ms claim at top of device token", _set(psa.MS_NAME, "x"), "attest.unknown-claim", "-81002"),
    ("unknown profile", _set(psa.EAT_PROFILE, "http://example.com"), "attest.profile", "profile"),
    ("profile as OID", _set(psa.EAT_PROFILE, cbor.Tag(111, b"\x2b\x06")), "attest.profile", "profile"),
    ("legacy profile under 265", _set(psa.EAT_PROFILE, psa.PROFILE_PSA_IOT_1), "attest.profile", "profile"),
    ("submods not a map", _set(psa.EAT_SUBMODS, []), "attest.type", "submods"),
    ("submods empty", _set(psa.EAT_SUBMODS, {}), "attest.size", "submods"),
    ("submod nested token", _set(psa.EAT_SUBMODS, {"x": b"\xd2"}), "attest.submod", "submods[x]"),
    ("submod name mismatch", _set(psa.EAT_SUBMODS, {"other": ms().encode()}), "attest.submod", "submods[other]"),
    ("submod int name", _set(psa.EAT_SUBMODS, {1: ms().encode()}), "attest.type", "submods"),
    ("submod uuid 15 bytes", _set_ms(psa.MS_UUID, b"\0" * 15), "attest.size", "submods[fingerprint].ms-uuid"),
    ("submod bad version", _set_ms(psa.MS_VERSION, "1.2"), "attest.value", "submods[fingerprint].ms-version"),
    ("submod negative seq", _set_ms(psa.MS_SEQUENCE, -1), "attest.value", "submods[fingerprint].ms-sequence"),
    ("submod lifecycle", _set_ms(psa.MS_LIFECYCLE, "zombie"), "attest.value", "submods[fingerprint].ms-lifecycle"),
    (
        "submod certifications text",
        _set_ms(psa.MS_CERTIFICATIONS, "x"),
        "attest.type",
        "submods[fingerprint].ms-certifications",
    ),
    (
        "submod too many certifications",
        _set_ms(psa.MS_CERTIFICATIONS, ["x"] * 17),
        "attest.size",
        "submods[fingerprint].ms-certifications",
    ),
    ("submod unknown key", _set_ms(psa.EAT_NONCE, NONCE), "attest.unknown-claim", "submods[fingerprint].10"),
    ("lifecycle log 31 bytes", _set(psa.ISM_LIFECYCLE_LOG, HEAD[:31]), "attest.size", "lifecycle-log"),
    ("lifecycle log 33 bytes", _set(psa.ISM_LIFECYCLE_LOG, HEAD + b"\0"), "attest.size", "lifecycle-log"),
    ("lifecycle log 64 bytes", _set(psa.ISM_LIFECYCLE_LOG, HEAD * 2), "attest.size", "lifecycle-log"),
    ("lifecycle log text", _set(psa.ISM_LIFECYCLE_LOG, HEAD.hex()), "attest.type", "lifecycle-log"),
    ("lifecycle log null", _set(psa.ISM_LIFECYCLE_LOG, None), "attest.type", "lifecycle-log"),
    (
        "lifecycle log in a submodule",
        _set_ms(psa.ISM_LIFECYCLE_LOG, HEAD),
        "attest.unknown-claim",
        "submods[fingerprint].-81010",
    ),
]


@pytest.mark.parametrize(("mutate", "rule", "subject"), [t[1:] for t in BAD_CLAIMS], ids=[t[0] for t in BAD_CLAIMS])
def test_bad_claims_name_rule_and_claim(
    mutate: Callable[[dict[int, Any]], None], rule: str, subject: str | None
) -> None:
    err, got_rule, got_subject = rule_of(lambda: decode_map(mutate))
    assert err is FormatError
    assert got_rule == rule
    if subject is not None:
        assert got_subject == subject


def test_lifecycle_log_claim() -> None:
    """Optional in decoding (a PSA token without it still verifies), 32 bytes, only in the iSM's two profiles."""
    for make in (device_claims, ms_claims):
        claims = make()
        assert claims.encode_map()[psa.ISM_LIFECYCLE_LOG] == HEAD
        assert psa.decode_claims(claims.encode()).lifecycle_log == HEAD
        assert claims.to_json()["lifecycle_log"] == HEAD.hex()
        without = make(lifecycle_log=None)
        assert psa.ISM_LIFECYCLE_LOG not in without.encode_map()
        assert psa.decode_claims(without.encode()).lifecycle_log is None
    assert rule_of(lambda: device_claims(lifecycle_log=HEAD[:16]))[1:] == ("attest.size", "lifecycle-log")
    assert rule_of(lambda: device_claims(lifecycle_log=HEAD.hex()))[1:] == ("attest.type", "lifecycle-log")
    legacy = {"profile": psa.PROFILE_PSA_2_0_0, "submods": (), "lifecycle_log": HEAD}
    assert rule_of(lambda: device_claims(**legacy))[1:] == ("attest.unknown-claim", "lifecycle-log")
    raw = raw_map(device_claims(submods=(), lifecycle_log=None, boot_seed=None))
    raw[psa.EAT_PROFILE] = psa.PROFILE_PSA_2_0_0
    psa.decode_claims(cbor.dumps(raw))
    raw[psa.ISM_LIFECYCLE_LOG] = HEAD
    assert rule_of(lambda: psa.decode_claims(cbor.dumps(raw)))[1:] == ("attest.unknown-claim", "-81010")


def test_duplicate_submodule_uuid() -> None:
    twin = ms("other")
    assert rule_of(lambda: device_claims(submods=(ms(), twin)))[1] == "attest.submod"


def test_profile_specific_claims() -> None:
    assert rule_of(lambda: device_claims(profile=psa.PROFILE_MICROSERVICE))[1:] == ("attest.missing", "ms-uuid")
    assert rule_of(lambda: ms_claims(submods=(ms(),)))[1:] == ("attest.unknown-claim", "submods")
    assert rule_of(lambda: device_claims(microservice=ms(), submods=()))[1:] == ("attest.unknown-claim", "ms-uuid")
    assert rule_of(lambda: device_claims(profile="tag:other"))[1] == "attest.profile"
    assert rule_of(lambda: device_claims(no_sw_measurements=True))[1] == "attest.unknown-claim"
    assert rule_of(lambda: device_claims(profile_claim="x"))[1] == "attest.value"


def test_no_profile_at_all() -> None:
    def strip(m: dict[int, Any]) -> None:
        del m[psa.EAT_PROFILE]

    assert rule_of(lambda: decode_map(strip))[1:] == ("attest.profile", "profile")
    assert rule_of(lambda: psa.decode_claims(cbor.dumps([1, 2])))[1] == "attest.claims"


def _p1(changes: dict[int, Any] | None = None) -> dict[int, Any]:
    raw: dict[int, Any] = {
        psa.P1_CLIENT_ID: 1,
        psa.P1_LIFECYCLE: 0x3000,
        psa.P1_IMPLEMENTATION_ID: IMPL,
        psa.P1_BOOT_SEED: b"\x07" * 32,
        psa.P1_SOFTWARE_COMPONENTS: [component().encode()],
        psa.P1_NONCE: NONCE,
        psa.P1_UEID: UEID,
    }
    raw.update(changes or {})
    return {k: v for k, v in raw.items() if v is not None}


def test_legacy_profile_1_rules() -> None:
    claims = psa.decode_claims(cbor.dumps(_p1()))
    assert (claims.profile, claims.profile_claim, claims.legacy) == (psa.PROFILE_PSA_IOT_1, None, True)
    assert psa.decode_claims(claims.encode()) == claims
    both = _p1({psa.P1_NO_SW_MEASUREMENTS: 1})
    assert rule_of(lambda: psa.decode_claims(cbor.dumps(both)))[1] == "attest.conflict"
    two = _p1({psa.P1_NO_SW_MEASUREMENTS: 2, psa.P1_SOFTWARE_COMPONENTS: None})
    assert rule_of(lambda: psa.decode_claims(cbor.dumps(two)))[1:] == ("attest.value", "no-sw-measurements")
    short_seed = _p1({psa.P1_BOOT_SEED: b"\0" * 16})
    assert rule_of(lambda: psa.decode_claims(cbor.dumps(short_seed)))[1:] == ("attest.size", "boot-seed")
    no_seed = _p1({psa.P1_BOOT_SEED: None})
    assert rule_of(lambda: psa.decode_claims(cbor.dumps(no_seed)))[1:] == ("attest.missing", "boot-seed")
    neither = _p1({psa.P1_SOFTWARE_COMPONENTS: None})
    assert rule_of(lambda: psa.decode_claims(cbor.dumps(neither)))[1:] == ("attest.missing", "software-components")
    bad_profile = _p1({psa.P1_PROFILE: 1})
    assert rule_of(lambda: psa.decode_claims(cbor.dumps(bad_profile)))[1:] == ("attest.type", "profile")
    ean13 = psa.decode_claims(cbor.dumps(_p1({psa.P1_CERTIFICATION_REFERENCE: "1234567890123"})))
    assert ean13.certification_reference == "1234567890123"


# -- strict CBOR under the claims limits ---------------------------------------------------------


def _map_bytes(pairs: list[tuple[bytes, bytes]], indefinite: bool = False) -> bytes:
    if indefinite:
        return b"\xbf" + b"".join(k + v for k, v in pairs) + b"\xff"
    assert len(pairs) < 24
    return bytes([0xA0 + len(pairs)]) + b"".join(k + v for k, v in pairs)


def _encoded_pairs(claims: psa.Claims) -> list[tuple[bytes, bytes]]:
    return [(cbor.dumps(k), cbor.dumps(v)) for k, v in raw_map(claims).items()]


def test_duplicate_claim_keys_are_refused() -> None:
    pairs = _encoded_pairs(SMALL)
    data = _map_bytes([*pairs, (cbor.dumps(psa.EAT_NONCE), cbor.dumps(b"\x09" * 32))])
    assert rule_of(lambda: psa.decode_claims(data))[1] == "cbor.duplicate-key"
    token = _signed_raw(data)
    assert rule_of(lambda: at.verify_token(token, key=PUB))[1] == "cbor.duplicate-key"


def test_indefinite_lengths_are_refused() -> None:
    data = _map_bytes(_encoded_pairs(SMALL), indefinite=True)
    assert rule_of(lambda: psa.decode_claims(data))[1] == "cbor.indefinite"
    pairs = _encoded_pairs(SMALL)
    chunked_nonce = b"\x5f\x50" + NONCE[:16] + b"\x50" + NONCE[16:] + b"\xff"
    pairs = [(k, chunked_nonce if k == cbor.dumps(psa.EAT_NONCE) else v) for k, v in pairs]
    assert rule_of(lambda: psa.decode_claims(_map_bytes(pairs)))[1] == "cbor.indefinite"


def test_deep_nesting_and_huge_arrays_are_refused() -> None:
    deep: Any = 1
    for _ in range(50):
        deep = [deep]
    assert rule_of(lambda: decode_map(_set(psa.PSA_SOFTWARE_COMPONENTS, deep)))[1] == "cbor.too-deep"
    huge = b"\x9b" + (2**40).to_bytes(8, "big")  # an array claiming 2**40 items
    components_key = cbor.dumps(psa.PSA_SOFTWARE_COMPONENTS)
    liar = [(k, huge if k == components_key else v) for k, v in _encoded_pairs(SMALL)]
    assert rule_of(lambda: psa.decode_claims(_map_bytes(liar)))[1] in ("cbor.too-many-items", "cbor.truncated")
    many = cbor.dumps({psa.EAT_PROFILE: psa.PROFILE_PSA, 7: list(range(5000))})
    assert rule_of(lambda: psa.decode_claims(many))[1] == "cbor.too-many-items"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_verifier(data: bytes) -> None:
    with contextlib.suppress(IsmError):
        at.verify_token(data, key=PUB, hmac_key=HMAC_KEY)


_claim_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**64) + 1, 2**64 - 1) | st.binary(max_size=70) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.integers(-5, 300), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([k for k in raw_map(device_claims())]), _claim_values)
def test_any_claim_value_gives_a_claims_set_or_a_typed_error(key: int, value: Any) -> None:
    with contextlib.suppress(FormatError):
        decode_map(_set(key, value))


# -- lifecycle ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "state"),
    [
        (0x0000, "unknown"),
        (0x10FF, "assembly-and-test"),
        (0x2001, "psa-rot-provisioning"),
        (0x3000, "secured"),
        (0x4000, "non-psa-rot-debug"),
        (0x50AB, "recoverable-psa-rot-debug"),
        (0x6000, "decommissioned"),
    ],
)
def test_lifecycle_state_names(value: int, state: str) -> None:
    assert psa.lifecycle_state(value) == state


# -- appraisal ------------------------------------------------------------------------------------


def reference(**kw: Any) -> psa.Reference:
    doc: dict[str, Any] = {
        "version": 1,
        "implementation_id": IMPL.hex(),
        "components": [
            {
                "name": "ism",
                "measurements": [hashlib.sha256(b"ism").hexdigest()],
                "signers": ["05" * 32],
                "min_version": "1.0.0",
            },
            {
                "name": "fingerprint",
                "uuid": str(MS_UUID),
                "measurements": [hashlib.sha256(b"fingerprint").hexdigest()],
                "signers": ["05" * 32],
                "min_version": "1.2.0",
                "min_sequence": 7,
                "policy_digests": ["06" * 32],
                "required": True,
            },
        ],
    }
    doc.update(kw)
    return psa.parse_reference(json.dumps(doc))


def by_name(appraisal: at.Appraisal, kind: str, name: str) -> at.ComponentAppraisal:
    return next(c for c in appraisal.components if c.kind == kind and c.name == name)


def test_appraisal_affirming() -> None:
    result = at.appraise(at.verify_token(at.sign_token(device_claims(), KEY), key=PUB), reference())
    assert result.status is at.Status.AFFIRMING
    assert result.affirming
    assert [c.kind for c in result.components] == [
        "platform",
        "software-component",
        "software-component",
        "microservice",
    ]
    assert all(c.reasons for c in result.components)
    assert json.loads(json.dumps(result.to_json()))["status"] == "affirming"
    assert at.appraise(ms_claims(), reference()).status is at.Status.AFFIRMING


APPRAISALS: list[tuple[str, Callable[[], psa.Claims], Callable[[], psa.Reference], str, str, str]] = [
    (
        "unknown component",
        lambda: device_claims(software_components=(component("ism"), component("fingerprint"), component("x"))),
        reference,
        "warning",
        "software-component",
        "x",
    ),
    (
        "unknown component contraindicated by policy",
        lambda: device_claims(software_components=(component("ism"), component("fingerprint"), component("x"))),
        lambda: reference(unknown_components="contraindicated"),
        "contraindicated",
        "software-component",
        "x",
    ),
    (
        "measurement mismatch",
        lambda: device_claims(software_components=(component("ism", measurement_value=b"\0" * 32),)),
        reference,
        "contraindicated",
        "software-component",
        "ism",
    ),
    (
        "signer mismatch",
        lambda: device_claims(software_components=(component("ism", signer_id=b"\x09" * 32),)),
        reference,
        "contraindicated",
        "software-component",
        "ism",
    ),
    (
        "version below minimum",
        lambda: device_claims(software_components=(component("ism", version="0.9.9"),)),
        reference,
        "contraindicated",
        "software-component",
        "ism",
    ),
    (
        "pre-release below minimum",
        lambda: device_claims(software_components=(component("ism", version="1.0.0-rc1"),)),
        reference,
        "contraindicated",
        "software-component",
        "ism",
    ),
    (
        "no version claimed",
        lambda: device_claims(software_components=(component("ism", version=None),)),
        reference,
        "warning",
        "software-component",
        "ism",
    ),
    (
        "version not comparable",
        lambda: device_claims(software_components=(component("ism", version="beta"),)),
        reference,
        "warning",
        "software-component",
        "ism",
    ),
    (
        "unnamed component found by measurement",
        lambda: device_claims(software_components=(component("ism", measurement_type=None),)),
        reference,
        "affirming",
        "software-component",
        "#0",
    ),
    (
        "implementation ID mismatch",
        lambda: device_claims(implementation_id=b"\xbb" * 32),
        reference,
        "contraindicated",
        "platform",
        "platform",
    ),
    ("non-PSA-RoT debug", lambda: device_claims(lifecycle=0x4000), reference, "warning", "platform", "platform"),
    ("decommissioned", lambda: device_claims(lifecycle=0x6000), reference, "contraindicated", "platform", "platform"),
    ("provisioning", lambda: device_claims(lifecycle=0x2000), reference, "contraindicated", "platform", "platform"),
    (
        "reference accepts debug",
        lambda: device_claims(lifecycle=0x4000),
        lambda: reference(lifecycles=["secured", "non-psa-rot-debug"]),
        "affirming",
        "platform",
        "platform",
    ),
    (
        "reference refuses secured",
        device_claims,
        lambda: reference(lifecycles=["non-psa-rot-debug"]),
        "contraindicated",
        "platform",
        "platform",
    ),
    (
        "microservice quarantined",
        lambda: device_claims(submods=(ms(lifecycle="quarantined"),)),
        reference,
        "contraindicated",
        "microservice",
        "fingerprint",
    ),
    (
        "microservice suspended",
        lambda: device_claims(submods=(ms(lifecycle="suspended"),)),
        reference,
        "warning",
        "microservice",
        "fingerprint",
    ),
    (
        "microservice impersonated (name, other uuid)",
        lambda: device_claims(submods=(ms(uuid=uuidlib.uuid4()),)),
        reference,
        "contraindicated",
        "microservice",
        "fingerprint",
    ),
    (
        "microservice sequence below minimum",
        lambda: device_claims(submods=(ms(sequence=6),)),
        reference,
        "contraindicated",
        "microservice",
        "fingerprint",
    ),
    (
        "microservice policy digest",
        lambda: device_claims(submods=(ms(policy_digest=b"\x07" * 32),)),
        reference,
        "contraindicated",
        "microservice",
        "fingerprint",
    ),
    (
        "unknown microservice",
        lambda: device_claims(submods=(ms(), ms("door", uuid=uuidlib.uuid4()))),
        reference,
        "warning",
        "microservice",
        "door",
    ),
    (
        "lifecycle log head as the reference expects",
        device_claims,
        lambda: reference(lifecycle_log=HEAD.hex()),
        "affirming",
        "platform",
        "platform",
    ),
    (
        "lifecycle log head differs",
        lambda: device_claims(lifecycle_log=b"\x01" * 32),
        lambda: reference(lifecycle_log=HEAD.hex()),
        "contraindicated",
        "platform",
        "platform",
    ),
    (
        "lifecycle log head expected but not claimed",
        lambda: device_claims(lifecycle_log=None),
        lambda: reference(lifecycle_log=HEAD.hex()),
        "contraindicated",
        "platform",
        "platform",
    ),
    (
        "lifecycle log head not in the reference",
        lambda: device_claims(lifecycle_log=b"\x01" * 32),
        reference,
        "affirming",
        "platform",
        "platform",
    ),
    (
        "required microservice missing",
        lambda: device_claims(software_components=(component("ism"),), submods=()),
        reference,
        "contraindicated",
        "expected",
        "fingerprint",
    ),
]


@pytest.mark.parametrize(
    ("claims", "ref", "status", "kind", "name"), [a[1:] for a in APPRAISALS], ids=[a[0] for a in APPRAISALS]
)
def test_appraisal_verdicts(
    claims: Callable[[], psa.Claims], ref: Callable[[], psa.Reference], status: str, kind: str, name: str
) -> None:
    result = at.appraise(claims(), ref())
    item = by_name(result, kind, name)
    assert item.status.value == status
    assert item.reasons
    assert result.status.rank >= item.status.rank


def test_empty_reference_warns_about_everything_known_only_by_lifecycle() -> None:
    result = at.appraise(device_claims(), psa.parse_reference('{"version": 1}'))
    assert result.status is at.Status.WARNING
    assert by_name(result, "platform", "platform").status is at.Status.AFFIRMING


@pytest.mark.parametrize(
    ("a", "b", "order"),
    [
        ("1.2", "1.2.0", 0),
        ("1.10.0", "1.9.9", 1),
        ("0.0.0", "0.0.1", -1),
        ("1.0.0-rc1", "1.0.0", -1),
        ("v2", "1.99", 1),
        ("1.0.0+build", "1.0.0", 0),
        ("x", "1.0", None),
    ],
)
def test_compare_versions(a: str, b: str, order: int | None) -> None:
    assert at.compare_versions(a, b) == order


BAD_REFERENCES = [
    ("not json", "{", "attest.reference"),
    ("array", "[]", "attest.reference"),
    ("no version", "{}", "attest.reference"),
    ("version 2", '{"version": 2}', "attest.reference"),
    ("unknown key", '{"version": 1, "extra": 1}', "attest.reference"),
    ("duplicate key", '{"version": 1, "version": 1}', "attest.reference"),
    ("bad hex", '{"version": 1, "implementation_id": "zz"}', "attest.reference"),
    ("short impl", '{"version": 1, "implementation_id": "00"}', "attest.reference"),
    ("bad lifecycle", '{"version": 1, "lifecycles": ["fine"]}', "attest.reference"),
    ("bad verdict", '{"version": 1, "unknown_components": "ok"}', "attest.reference"),
    ("no selector", '{"version": 1, "components": [{}]}', "attest.reference"),
    ("bad uuid", '{"version": 1, "components": [{"uuid": "x"}]}', "attest.reference"),
    ("bad measurement", '{"version": 1, "components": [{"name": "a", "measurements": ["00"]}]}', "attest.reference"),
    ("empty measurements", '{"version": 1, "components": [{"name": "a", "measurements": []}]}', "attest.reference"),
    ("bad min_version", '{"version": 1, "components": [{"name": "a", "min_version": "one"}]}', "attest.reference"),
    ("bad sequence", '{"version": 1, "components": [{"name": "a", "min_sequence": -1}]}', "attest.reference"),
    ("bad ms lifecycle", '{"version": 1, "components": [{"name": "a", "lifecycles": ["x"]}]}', "attest.reference"),
    ("component key", '{"version": 1, "components": [{"name": "a", "colour": 1}]}', "attest.reference"),
    ("same name twice", '{"version": 1, "components": [{"name": "a"}, {"name": "a"}]}', "attest.reference"),
    ("required text", '{"version": 1, "components": [{"name": "a", "required": "yes"}]}', "attest.reference"),
    ("lifecycle log short", '{"version": 1, "lifecycle_log": "00"}', "attest.reference"),
    ("lifecycle log 48 bytes", '{"version": 1, "lifecycle_log": "' + "00" * 48 + '"}', "attest.reference"),
    ("lifecycle log not hex", '{"version": 1, "lifecycle_log": "' + "zz" * 32 + '"}', "attest.reference"),
    ("lifecycle log number", '{"version": 1, "lifecycle_log": 1}', "attest.reference"),
]


@pytest.mark.parametrize(("text", "rule"), [r[1:] for r in BAD_REFERENCES], ids=[r[0] for r in BAD_REFERENCES])
def test_bad_references(text: str, rule: str) -> None:
    assert rule_of(lambda: psa.parse_reference(text))[:2] == (FormatError, rule)


def test_dataclass_fields_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        device_claims().nonce = b""  # type: ignore[misc]
