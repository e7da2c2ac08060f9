"""CBOR claims-sets: the fast claims decoder against the checked one, and the cached token encodings.

``psa.decode_claims`` first tries ``_decode_fast``, which checks the claims-set against its
profile's schema (``ism.formats.cbor_schema``; natively when the extension is built) and builds the
objects in the same pass, and falls back to ``_decode_checked`` (the reference, which names the
broken rule) at the first thing it does not accept. Every case runs the fast path with the native
and with the pure-Python schema interpreter, and the two must name the same broken rule. These tests mutate valid
claims-sets one claim at a time, and a few at a time, over every claim of both profiles, every
field of a software component and of a submodule: values of every type and of every size and
range edge, nulls, removals and unknown claims. Wherever the checked decoder refuses, the fast one
must return None; wherever it accepts, the fast one returns None or an equal object of the same
types; and ``decode_claims`` gives exactly the checked outcome.

The creation side caches encodings (the claims around the nonce, the COSE headers): the tokens it
makes are byte for byte the ones the plain encoders make.
"""

from __future__ import annotations

import copy
import hashlib
import os
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ism.crypto import attestation as at
from ism.crypto.keystore.software import MemoryKeyFiles, SoftwareKeyStore
from ism.errors import FormatError
from ism.formats import cbor, psa
from ism.formats.cbor import UNDEFINED, Tag
from ism.services.attestation import AttestationService, AttestedMicroservice

PROPERTY = settings(
    derandomize=True, database=None, deadline=None, max_examples=int(os.environ.get("ISM_CBOR_FUZZ_EXAMPLES", "300"))
)


def _ms(name: str, n: int, certifications: tuple[str, ...] = ("PSA Certified Level 1",)) -> psa.MicroserviceClaims:
    return psa.MicroserviceClaims(
        uuidlib.UUID(int=n + 1),
        name,
        "1.2.0-rc.1+build.5",
        n,
        hashlib.sha256(name.encode()).digest(),
        b"\x05" * 48,
        b"\x06" * 64,
        psa.MS_LIFECYCLES[n % len(psa.MS_LIFECYCLES)],
        certifications,
    )


def _component(name: str | None, version: str | None = "1.2.0", desc: str | None = "sha-256") -> psa.SwComponent:
    return psa.SwComponent(hashlib.sha256(str(name).encode()).digest(), b"\x05" * 32, name, version, desc)


DEVICE = psa.Claims(
    profile=psa.PROFILE_PSA,
    nonce=bytes(range(32)),
    instance_id=b"\x01" + bytes(range(100, 132)),
    implementation_id=b"\xaa" * 32,
    client_id=1,
    lifecycle=0x3000,
    software_components=(_component("ism"), _component(None, None, None), _component("fingerprint")),
    boot_seed=b"\x11" * 16,
    certification_reference="1234567890123-12345",
    verification_service="https://store.ism.example/verify",
    submods=(_ms("fingerprint", 0), _ms("door-lock", 1, ()), _ms("m", 2, ("a", "b" * 128))),
    lifecycle_log=b"\x0c" * 32,
)
DEVICE_BARE = psa.Claims(
    profile=psa.PROFILE_PSA,
    nonce=b"\x07" * 64,
    instance_id=b"\x01" + bytes(32),
    implementation_id=b"\xbb" * 32,
    client_id=-(2**31),
    lifecycle=0x60FF,
    software_components=(_component("ism"),),
)
MICROSERVICE = psa.Claims(
    profile=psa.PROFILE_MICROSERVICE,
    nonce=b"\x09" * 48,
    instance_id=b"\x01" + bytes(range(32)),
    implementation_id=b"\xaa" * 32,
    client_id=2**31 - 1,
    lifecycle=0x4000,
    software_components=(_component("fingerprint"),),
    boot_seed=b"\x12" * 8,
    microservice=_ms("fingerprint", 3),
    lifecycle_log=b"\x0d" * 32,
)
LEGACY = psa.Claims(
    profile=psa.PROFILE_PSA_2_0_0,
    nonce=b"\x01" * 32,
    instance_id=b"\x01" + bytes(32),
    implementation_id=b"\xaa" * 32,
    client_id=-1,
    lifecycle=0x3000,
    software_components=(_component("ism"),),
    boot_seed=b"\x13" * 32,
)
BASES = {"device": DEVICE, "device-bare": DEVICE_BARE, "microservice": MICROSERVICE}

#: Values of every type, with the size and range edges of every claim.
POOL: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    7,
    0x0FFF,
    0x3000,
    0x30FF,
    0x60FF,
    0x6100,
    -0x3000,
    2**31 - 1,
    2**31,
    -(2**31),
    -(2**31) - 1,
    2**64 - 1,
    -(2**64),
    1.0,
    b"",
    b"\x01",
    b"\x01" * 7,
    b"\x01" * 8,
    b"\x01" * 15,
    b"\x01" * 16,
    b"\x01" * 17,
    b"\x01" * 31,
    b"\x01" * 32,
    b"\x02" * 32,
    b"\x01" * 33,
    b"\x02" * 33,
    b"\x01" * 48,
    b"\x01" * 64,
    b"\x01" * 65,
    "",
    "a",
    "A",
    "-a",
    "fingerprint",
    "door-lock",
    "a" * 32,
    "a" * 33,
    "1.2.0",
    "01.2.0",
    "1.2",
    "1.2.3-rc.1+b.2",
    "1.2.3-",
    "1.2.3-" + "a" * 1018,  # a semantic version of MAX_TEXT characters
    "1.2.3-" + "a" * 1019,  # and one over
    "x" * 128,
    "x" * 129,
    "x" * 1024,
    "x" * 1025,
    "active",
    "banned",
    "Active",
    "1234567890123",
    "1234567890123-12345",
    "123456789012",
    "1234567890123-1234",
    psa.PROFILE_PSA,
    psa.PROFILE_MICROSERVICE,
    psa.PROFILE_PSA_2_0_0,
    psa.PROFILE_PSA_IOT_1,
    [],
    ["a"],
    [""],
    ["x" * 129],
    ["a"] * 16,
    ["a"] * 17,
    [1],
    [b"\x01" * 32],
    {},
    {1: 2},
    {"x": {}},
    Tag(1, b"\x01" * 32),
    Tag(37, b"\x01" * 16),
    UNDEFINED,
]
UNKNOWN_KEYS: list[Any] = [0, 1, 3, 9999, -1, -75000, -81001, -81010, -81011, psa.EAT_SUBMODS, "nonce", b"\x0a", (10,)]
UNKNOWN_KEYS.append(Tag(1, 10))
ABSENT = object()


def _decode(raw: Any) -> Any:
    """What ``cbor.loads`` makes of ``raw`` on the wire (tuples become lists and so on)."""
    return cbor.loads(cbor.dumps(raw), psa.CLAIMS_LIMITS)


def check(raw: Any) -> None:
    """The fast decoder accepts only what the checked one accepts, giving an equal object."""
    try:
        wire = cbor.dumps(raw)
        decoded = cbor.loads(wire, psa.CLAIMS_LIMITS)
    except FormatError:
        return  # not a claims-set the CBOR layer lets through
    try:
        expected: Any = psa._decode_checked(copy.deepcopy(decoded))
    except FormatError as exc:
        expected = exc
    fast = psa._decode_fast(decoded)
    _same_schema_verdicts(decoded)
    fast_python = psa._decode_fast(decoded, python=True)  # the pure-Python schema checker
    assert repr(fast_python) == repr(fast)
    if isinstance(expected, FormatError):
        assert fast is None, (expected.rule, expected.subject, raw)
        with pytest.raises(FormatError) as info:
            psa.decode_claims(wire)
        assert (info.value.rule, info.value.subject, info.value.got) == (
            expected.rule,
            expected.subject,
            expected.got,
        )
    else:
        if fast is not None:
            assert fast == expected
            assert repr(fast) == repr(expected)  # the same types too (1 vs True, list vs tuple)
        got = psa.decode_claims(wire)
        assert got == expected
        assert repr(got) == repr(expected)


def _same_schema_verdicts(decoded: Any) -> None:
    """Both schema checkers give the same verdict (the same broken rule) under every fast-path schema."""
    for checker in psa._FAST_SCHEMAS.values():
        assert checker.check(decoded) == checker.check_python(decoded)


def _set(target: dict[Any, Any], key: Any, value: Any) -> None:
    if value is ABSENT:
        target.pop(key, None)
    else:
        target[key] = value


def _paths(base: psa.Claims) -> list[tuple[str, Callable[[dict[Any, Any]], dict[Any, Any]], Any]]:
    """Every place a claim lives: (name, how to reach its map, its key)."""
    raw = base.encode_map()
    top = list(raw) + [k for k in (psa.EAT_BOOT_SEED, psa.PSA_CERTIFICATION_REFERENCE) if k not in raw]
    top += [k for k in (psa.PSA_VERIFICATION_SERVICE, psa.EAT_SUBMODS, psa.ISM_LIFECYCLE_LOG) if k not in raw]
    paths: list[tuple[str, Callable[[dict[Any, Any]], dict[Any, Any]], Any]] = [
        (f"top[{k}]", lambda m: m, k) for k in top
    ]
    comp_keys = [psa.SC_MEASUREMENT_TYPE, psa.SC_MEASUREMENT_VALUE, psa.SC_VERSION, psa.SC_SIGNER_ID]
    comp_keys.append(psa.SC_MEASUREMENT_DESC)
    for i in range(len(raw[psa.PSA_SOFTWARE_COMPONENTS])):
        for k in comp_keys:
            paths.append((f"component[{i}][{k}]", lambda m, i=i: m[psa.PSA_SOFTWARE_COMPONENTS][i], k))
    ms_keys = sorted(psa._MS_KEYS)
    for name in raw.get(psa.EAT_SUBMODS, {}):
        for k in ms_keys:
            paths.append((f"submods[{name}][{k}]", lambda m, name=name: m[psa.EAT_SUBMODS][name], k))
    if base.profile == psa.PROFILE_MICROSERVICE:
        paths += [(f"top[{k}]", lambda m: m, k) for k in ms_keys if k not in raw]
    return paths


PATH_CASES = [
    pytest.param(base, name, reach, key, id=f"{label}:{name}")
    for label, base in BASES.items()
    for name, reach, key in _paths(base)
]


@pytest.mark.parametrize(("base", "name", "reach", "key"), PATH_CASES)
def test_one_claim_changed(base: psa.Claims, name: str, reach: Callable[[Any], Any], key: Any) -> None:
    for value in [*POOL, ABSENT]:
        raw = base.encode_map()
        _set(reach(raw), key, value)
        check(raw)


@pytest.mark.parametrize("base", list(BASES.values()), ids=list(BASES))
def test_unknown_claims(base: psa.Claims) -> None:
    for key in UNKNOWN_KEYS:
        for reach in (lambda m: m, lambda m: m[psa.PSA_SOFTWARE_COMPONENTS][0]):
            raw = base.encode_map()
            reach(raw)[key] = b"\x01" * 32
            check(raw)
        raw = base.encode_map()
        for sub in raw.get(psa.EAT_SUBMODS, {}).values():
            sub[key] = "x"
            check(raw)


def test_containers() -> None:
    """The component list and the submodule map: empty, at and over their limits, wrong kinds."""
    raw = DEVICE.encode_map()
    component = raw[psa.PSA_SOFTWARE_COMPONENTS][0]
    for count in (0, 1, psa.MAX_COMPONENTS, psa.MAX_COMPONENTS + 1):
        check({**raw, psa.PSA_SOFTWARE_COMPONENTS: [component] * count})
    sub = raw[psa.EAT_SUBMODS]["fingerprint"]
    for count in (0, 1, psa.MAX_SUBMODS, psa.MAX_SUBMODS + 1):
        subs = {f"m{i}": {**sub, psa.MS_NAME: f"m{i}", psa.MS_UUID: uuidlib.UUID(int=i).bytes} for i in range(count)}
        check({**raw, psa.EAT_SUBMODS: subs})
    # The same UUID twice; a submodule not named after its microservice; a name that is not text.
    subs = raw[psa.EAT_SUBMODS]
    check({**raw, psa.EAT_SUBMODS: {**subs, "door-lock": {**subs["door-lock"], psa.MS_UUID: sub[psa.MS_UUID]}}})
    check({**raw, psa.EAT_SUBMODS: {**subs, "other": subs["door-lock"]}})
    check({**raw, psa.EAT_SUBMODS: {7: {**sub, psa.MS_NAME: "7"}}})
    check({**raw, psa.EAT_SUBMODS: {"x": [sub]}})
    check([raw])
    check(b"")
    check(LEGACY.encode_map())  # a legacy profile: the checked decoder alone


def test_every_valid_base_takes_the_fast_path() -> None:
    for base in BASES.values():
        decoded = _decode(base.encode_map())
        fast = psa._decode_fast(decoded)
        assert fast is not None
        assert repr(fast) == repr(psa._decode_checked(decoded))
        assert fast.encode() == base.encode()
    assert psa._decode_fast(_decode(LEGACY.encode_map())) is None


@st.composite
def mutated_claims(draw: st.DrawFn) -> dict[Any, Any]:
    base = draw(st.sampled_from(list(BASES.values())))
    raw = base.encode_map()
    paths = _paths(base)
    for _ in range(draw(st.integers(1, 3))):
        _, reach, key = draw(st.sampled_from(paths))
        try:
            target = reach(raw)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced the map
        if isinstance(target, dict):
            _set(target, key, draw(st.sampled_from([*POOL, ABSENT])))
    return raw


@PROPERTY
@given(mutated_claims())
def test_several_claims_changed(raw: dict[Any, Any]) -> None:
    check(raw)


# -- creation: cached encodings give the plain encoders' bytes ---------------------------------------


@pytest.mark.parametrize("kid", [None, b"", b"k", bytes(range(32))])
@pytest.mark.parametrize("size", [0, 1, 23, 24, 255, 256, 2616, 65536])
def test_sign_payload_is_the_plain_cose_sign1(kid: bytes | None, size: int) -> None:
    payload = os.urandom(size)
    signature = os.urandom(64)
    signed: list[bytes] = []

    def signer(to_be_signed: bytes) -> bytes:
        signed.append(to_be_signed)
        return signature

    header: dict[int, Any] = {1: -7} if kid is None else {1: -7, 4: kid}
    protected = cbor.dumps(header)
    token = at.sign_payload(payload, signer, kid=kid)
    assert signed == [cbor.dumps(["Signature1", protected, b"", payload])]
    assert token == cbor.dumps(Tag(18, [protected, {}, payload, signature]))


def test_service_tokens_carry_the_plain_claims_encoding() -> None:
    keystore = SoftwareKeyStore(MemoryKeyFiles(), os.urandom(32))
    microservices = {
        (u := uuidlib.UUID(int=i + 1)): AttestedMicroservice(
            u, f"ms-{i}", "1.2.3", i + 1, os.urandom(32), os.urandom(32), os.urandom(32), ("cert-a",) * (i % 2)
        )
        for i in range(4)
    }
    states = dict.fromkeys(microservices, "active")
    service = AttestationService(
        keystore, b"\x01" + os.urandom(32), microservices, states=states.__getitem__, lifecycle_log=os.urandom(32)
    )
    first = next(iter(microservices))

    def payloads_match() -> None:
        for size in (32, 48, 64):
            nonce = os.urandom(size)
            assert cbor.loads(service.device_token(nonce)).value[2] == service.device_claims(nonce).encode()
            for u in service.microservices:
                token = service.microservice_token(u, nonce)
                assert cbor.loads(token).value[2] == service.microservice_claims(u, nonce).encode()

    payloads_match()
    states[first] = "suspended"  # a lifecycle change invalidates the cached encodings
    payloads_match()
    service.replace_microservices({first: microservices[first]})
    payloads_match()
    with pytest.raises(FormatError) as info:
        service.device_token(b"short")  # a nonce of a wrong size: the claims name the rule
    assert info.value.rule == "attest.size"
