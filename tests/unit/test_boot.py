"""The pure secure-boot decision: check_package and check_downgrade."""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable
from typing import Any

import pytest

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, signer_id
from ism.device.trust.boot import check_downgrade, check_package
from ism.errors import (
    ErrorCode,
    FormatError,
    RollbackError,
    SignatureError,
    TrustError,
    UntrustedSignerError,
)
from ism.formats import cbor, package, suit
from ism.formats.downgrade import DOWNGRADE_TYPE, Downgrade

INSTANCE = b"\x01" + b"\x5a" * 32
HELLO = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a01"


def _auth(key: PrivateKey, target: int = 1, frm: int = 2, instance: bytes = INSTANCE, ms: str = HELLO) -> bytes:
    return cose.sign1(Downgrade(uuidlib.UUID(ms), target, frm, instance).encode(), key, kid=signer_id(key))


def test_accepts_good_package_and_names_its_signer(build_package: Callable[..., bytes], dev_key: PrivateKey) -> None:
    acc = check_package(build_package("hello", sequence=4), [dev_key.public_key()], {}, INSTANCE)
    assert acc.signer == signer_id(dev_key.public_key())
    assert acc.counter == 4
    assert not acc.downgraded
    assert str(acc.package.meta.uuid) == HELLO


def test_picks_the_right_anchor_among_several(
    build_package: Callable[..., bytes], dev_key: PrivateKey, other_key: PrivateKey, ed25519_key: PrivateKey
) -> None:
    anchors = [other_key.public_key(), ed25519_key.public_key(), dev_key.public_key()]
    assert check_package(build_package("echo"), anchors, {}, INSTANCE).signer == signer_id(dev_key)
    signed_ed = build_package("echo", key=ed25519_key)
    assert check_package(signed_ed, anchors, {}, INSTANCE).signer == signer_id(ed25519_key)


def test_no_anchor_means_untrusted(build_package: Callable[..., bytes]) -> None:
    with pytest.raises(UntrustedSignerError) as info:
        check_package(build_package("hello"), [], {}, INSTANCE)
    assert (info.value.code, info.value.rule) == (ErrorCode.UNTRUSTED_SIGNER, "suit.untrusted-signer")


@pytest.mark.parametrize(("sequence", "counter"), [(5, 5), (6, 5), (0, 0)])
def test_sequence_at_or_above_counter_is_accepted(
    build_package: Callable[..., bytes], dev_key: PrivateKey, sequence: int, counter: int
) -> None:
    acc = check_package(build_package("hello", sequence=sequence), [dev_key.public_key()], {HELLO: counter}, INSTANCE)
    assert (acc.counter, acc.downgraded) == (sequence, False)


def test_sequence_below_counter_is_a_rollback(build_package: Callable[..., bytes], dev_key: PrivateKey) -> None:
    with pytest.raises(RollbackError) as info:
        check_package(build_package("hello", sequence=1), [dev_key.public_key()], {HELLO: 2}, INSTANCE)
    exc = info.value
    assert (exc.code, exc.rule, exc.subject, exc.got) == (ErrorCode.ROLLBACK, "boot.rollback", HELLO, 1)


def test_counters_of_other_microservices_do_not_apply(build_package: Callable[..., bytes], dev_key: PrivateKey) -> None:
    other = "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a02"
    acc = check_package(build_package("hello", sequence=1), [dev_key.public_key()], {other: 100}, INSTANCE)
    assert acc.counter == 1


def test_sequence_is_compared_only_after_the_signature(
    build_package: Callable[..., bytes], dev_key: PrivateKey, other_key: PrivateKey
) -> None:
    """An untrusted package with a low sequence number is refused for its signer, not for rollback."""
    with pytest.raises(UntrustedSignerError):
        check_package(build_package("hello", sequence=1, key=other_key), [dev_key.public_key()], {HELLO: 9}, INSTANCE)


def test_wasm_imports_are_checked_before_rollback(
    build_package: Callable[..., bytes], dev_key: PrivateKey, wasm_modules: dict[str, bytes]
) -> None:
    bad = bytearray(wasm_modules["hello"])
    at = bad.index(b"log")
    bad[at : at + 3] = b"lag"
    with pytest.raises(FormatError) as info:
        check_package(build_package("hello", wasm=bytes(bad)), [dev_key.public_key()], {HELLO: 9}, INSTANCE)
    assert info.value.rule == "wasm.unknown-import"


# -- downgrades ------------------------------------------------------------------------------------


def test_downgrade_authorisation_allows_lower_sequence(
    build_package: Callable[..., bytes], dev_key: PrivateKey
) -> None:
    acc = check_package(
        build_package("hello", sequence=1), [dev_key.public_key()], {HELLO: 2}, INSTANCE, downgrade=_auth(dev_key)
    )
    assert (acc.counter, acc.downgraded) == (1, True)


def test_unneeded_downgrade_authorisation_is_ignored(build_package: Callable[..., bytes], dev_key: PrivateKey) -> None:
    acc = check_package(
        build_package("hello", sequence=3), [dev_key.public_key()], {HELLO: 2}, INSTANCE, downgrade=b"garbage"
    )
    assert (acc.counter, acc.downgraded) == (3, False)


@pytest.fixture
def hello_pkg(build_package: Callable[..., bytes]) -> package.Package:
    return package.read_package(suit.parse_envelope(build_package("hello", sequence=1)))


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"instance": b"\x01" + b"\x5b" * 32}, "boot.downgrade-device"),
        ({"ms": "5c0fa1e2-0b6e-4d43-9d1c-7d2f1c7f0a02"}, "boot.downgrade-uuid"),
        ({"target": 0}, "boot.downgrade-target"),
        ({"frm": 3}, "boot.downgrade-from"),
    ],
)
def test_downgrade_mismatch(hello_pkg: package.Package, dev_key: PrivateKey, kwargs: dict[str, Any], rule: str) -> None:
    with pytest.raises(TrustError) as info:
        check_downgrade(_auth(dev_key, **kwargs), [dev_key.public_key()], hello_pkg, 2, INSTANCE)
    assert type(info.value) is TrustError
    assert (info.value.code, info.value.rule, info.value.subject) == (ErrorCode.TRUST, rule, HELLO)


def test_downgrade_signed_by_stranger(hello_pkg: package.Package, dev_key: PrivateKey, other_key: PrivateKey) -> None:
    with pytest.raises(UntrustedSignerError) as info:
        check_downgrade(_auth(other_key), [dev_key.public_key()], hello_pkg, 2, INSTANCE)
    assert info.value.rule == "boot.downgrade-signer"
    no_kid = cose.sign1(Downgrade(uuidlib.UUID(HELLO), 1, 2, INSTANCE).encode(), dev_key)
    with pytest.raises(UntrustedSignerError) as info:
        check_downgrade(no_kid, [dev_key.public_key()], hello_pkg, 2, INSTANCE)
    assert info.value.rule == "boot.downgrade-signer"


def test_downgrade_with_forged_signature(hello_pkg: package.Package, dev_key: PrivateKey) -> None:
    msg = cbor.loads(_auth(dev_key))
    msg.value[3] = bytes(64)
    with pytest.raises(SignatureError) as info:
        check_downgrade(cbor.dumps(msg), [dev_key.public_key()], hello_pkg, 2, INSTANCE)
    assert info.value.rule == "cose.signature"


def test_downgrade_malformed(hello_pkg: package.Package, dev_key: PrivateKey) -> None:
    anchors = [dev_key.public_key()]
    detached = cose.sign1(b"x", dev_key, detached=True, kid=signer_id(dev_key))
    with pytest.raises(TrustError) as info:
        check_downgrade(detached, anchors, hello_pkg, 2, INSTANCE)
    assert info.value.rule == "boot.downgrade-format"

    wrong_type = cbor.dumps({1: "ism/other/v1", 2: hello_pkg.meta.uuid.bytes, 3: 1, 4: 2, 5: INSTANCE})
    missing_field = cbor.dumps({1: DOWNGRADE_TYPE, 2: hello_pkg.meta.uuid.bytes, 3: 1, 4: 2})
    for payload in (wrong_type, missing_field):
        with pytest.raises(FormatError) as fmt:
            check_downgrade(cose.sign1(payload, dev_key, kid=signer_id(dev_key)), anchors, hello_pkg, 2, INSTANCE)
        assert fmt.value.rule == "downgrade.format"

    mac = cose.mac0(b"x", b"k" * 32)
    with pytest.raises(FormatError) as fmt:
        check_downgrade(mac, anchors, hello_pkg, 2, INSTANCE)
    assert fmt.value.rule == "cose.tag"


def test_downgrade_round_trips() -> None:
    auth = Downgrade(uuidlib.UUID(HELLO), 3, 7, INSTANCE)
    assert Downgrade.decode(auth.encode()) == auth
