"""Conformance of the SUIT parser and authenticator against public vectors.

Vectors (see vectors/PROVENANCE.md):

* ``vectors/suit-manifest-spec``: the examples of draft-ietf-suit-manifest-34
  (suit-wg/manifest-spec), signed with ES256, and their unsigned variants.
* ``vectors/libcsuit``: the testfiles of kentakayama/libcsuit, signed with
  ES256/ESP256 (COSE_Sign1) or HMAC 256/256 (COSE_Mac0).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from ism.crypto import cose, keys
from ism.crypto import suit as suit_auth
from ism.errors import DigestError, ErrorCode, FormatError, SignatureError
from ism.formats import cbor, suit

VECTORS = Path(__file__).parent / "vectors"
SPEC = VECTORS / "suit-manifest-spec"
LIBCSUIT = VECTORS / "libcsuit"

SPEC_KEY = keys.load_public(SPEC / "public_key.pem")
LIBCSUIT_KEY = keys.load_public(LIBCSUIT / "trust_anchor_secp256r1_pub.pem")

#: The published HMAC-SHA256 test secret of libcsuit ("a" * 32), from
#: examples/inc/trust_anchor_hmac256_cose_key_secret.h of kentakayama/libcsuit.
LIBCSUIT_HMAC_KEY = b"a" * 32
WRONG_HMAC_KEY = b"b" * 32

SPEC_SIGNED = sorted(p.name for p in SPEC.glob("example*-signed*.suit"))
SPEC_UNSIGNED = sorted(p.name for p in SPEC.glob("example*-unsigned*.suit"))
LIBCSUIT_ALL = sorted(p.name for p in LIBCSUIT.glob("*.suit"))
MAC0_FILES = ["suit_manifest_expAF.suit", "suit_manifest_expAFS.suit", "suit_manifest_expAW.suit"]

#: From example{N}.json / example{N}.txt of the specification: sequence number,
#: component identifiers (common/components), severed members.
SPEC_EXPECTED: dict[str, tuple[int, list[list[bytes]], list[int]]] = {
    "example0-signed.suit": (0, [[b"\x00"]], []),
    "example1-signed.suit": (1, [[b"\x00"]], []),
    "example2-signed-full.suit": (2, [[b"\x00"]], []),
    "example2-signed-severed.suit": (2, [[b"\x00"]], [20, 23]),
    "example3-signed.suit": (3, [[b"\x00"]], []),
    "example4-signed.suit": (4, [[b"\x00"], [b"\x02"], [b"\x01"]], []),
    "example5-signed.suit": (5, [[b"\x00"], [b"\x01"]], []),
}

ALLOWED_ERRORS = (FormatError, DigestError, SignatureError)


def _read(directory: Path, name: str) -> bytes:
    return (directory / name).read_bytes()


def _auth_kind(env: suit.Envelope) -> str:
    kinds = {cose.parse(cbor.loads(block)).kind for block in env.auth_blocks}
    assert len(kinds) == 1
    return kinds.pop()


def _libcsuit_sign1() -> list[str]:
    return [n for n in LIBCSUIT_ALL if _auth_kind(suit.parse_envelope(_read(LIBCSUIT, n))) == "sign1"]


LIBCSUIT_SIGN1 = _libcsuit_sign1()


def _process(data: bytes, authenticate: Callable[[suit.Envelope], object]) -> list[int]:
    env = suit.parse_envelope(data)
    authenticate(env)
    return suit.check_severed(env)


def _with_spec_key(env: suit.Envelope) -> object:
    return suit_auth.authenticate(env, [SPEC_KEY])


def _with_libcsuit_key(env: suit.Envelope) -> object:
    return suit_auth.authenticate(env, [LIBCSUIT_KEY])


def _with_libcsuit_hmac(env: suit.Envelope) -> object:
    return suit_auth.authenticate(env, hmac_key=LIBCSUIT_HMAC_KEY)


# ---------------------------------------------------------------------------
# The vector sets are what we expect them to be
# ---------------------------------------------------------------------------


def test_vector_sets_present() -> None:
    assert sorted(SPEC_EXPECTED) == SPEC_SIGNED
    assert len(SPEC_UNSIGNED) == 6
    assert len(LIBCSUIT_ALL) == 22
    assert set(MAC0_FILES) == set(LIBCSUIT_ALL) - set(LIBCSUIT_SIGN1)
    assert len(LIBCSUIT_SIGN1) == 19
    # The two projects publish the same trust anchor.
    assert keys.signer_id(SPEC_KEY) == keys.signer_id(LIBCSUIT_KEY)
    for directory in (SPEC, LIBCSUIT):
        for pem in directory.glob("*.pem"):
            assert b"PRIVATE" not in pem.read_bytes()


# ---------------------------------------------------------------------------
# Genuine vectors authenticate
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_SIGNED)
def test_spec_signed_example(name: str) -> None:
    sequence, components, severed = SPEC_EXPECTED[name]
    env = suit.parse_envelope(_read(SPEC, name))
    assert env.tagged
    assert env.digest.alg == -16
    assert len(env.auth_blocks) == 1
    assert env.manifest.sequence == sequence
    assert [list(c) for c in env.manifest.components] == components
    result = suit_auth.authenticate(env, [SPEC_KEY])
    assert result.kind == "sign1"
    assert result.alg == "ES256"
    assert result.signer_id == keys.signer_id(SPEC_KEY)
    assert suit.check_severed(env) == severed


def test_example2_severed_and_full_share_a_manifest() -> None:
    severed = suit.parse_envelope(_read(SPEC, "example2-signed-severed.suit"))
    full = suit.parse_envelope(_read(SPEC, "example2-signed-full.suit"))
    assert severed.manifest_bytes == full.manifest_bytes
    assert severed.members == {}
    assert sorted(full.members) == [suit.INSTALL, suit.TEXT]
    assert suit.check_severed(severed) == [suit.INSTALL, suit.TEXT]
    assert suit.check_severed(full) == []
    assert suit.member(severed, suit.TEXT) is None
    assert suit.member(full, suit.TEXT) == full.members[suit.TEXT]


@pytest.mark.parametrize("name", LIBCSUIT_SIGN1)
def test_libcsuit_sign1(name: str) -> None:
    env = suit.parse_envelope(_read(LIBCSUIT, name))
    result = suit_auth.authenticate(env, [LIBCSUIT_KEY])
    assert result.kind == "sign1"
    assert result.alg in ("ES256", "ESP256")
    assert result.signer_id == keys.signer_id(LIBCSUIT_KEY)
    suit.check_severed(env)


@pytest.mark.parametrize(
    ("name", "sequence", "members", "severed"),
    [
        ("suit_manifest_exp0.suit", 0, [], []),
        ("suit_manifest_exp2A.suit", 2, [], [suit.INSTALL, suit.TEXT]),
        ("suit_manifest_exp2B.suit", 2, [suit.INSTALL, suit.TEXT], []),
        ("suit_manifest_exp4.suit", 4, [], []),
        ("suit_manifest_expU2.suit", 0, [suit.COSWID], []),
    ],
)
def test_libcsuit_details(name: str, sequence: int, members: list[int], severed: list[int]) -> None:
    env = suit.parse_envelope(_read(LIBCSUIT, name))
    assert env.manifest.sequence == sequence
    assert sorted(env.members) == members
    assert suit.check_severed(env) == severed


@pytest.mark.parametrize("name", MAC0_FILES)
def test_libcsuit_mac0(name: str) -> None:
    env = suit.parse_envelope(_read(LIBCSUIT, name))
    assert _auth_kind(env) == "mac0"
    assert env.manifest.sequence == 1
    suit.check_severed(env)
    result = suit_auth.authenticate(env, hmac_key=LIBCSUIT_HMAC_KEY)
    assert result.kind == "mac0"
    assert result.alg == "HMAC256/256"
    assert result.signer_id is None
    for wrong in (WRONG_HMAC_KEY, LIBCSUIT_HMAC_KEY[:-1], b""):
        with pytest.raises(SignatureError) as info:
            suit_auth.authenticate(env, hmac_key=wrong)
        assert info.value.rule == "suit.signature"
        assert info.value.code == ErrorCode.SIGNATURE
    # A public key is no substitute for the MAC key.
    with pytest.raises(SignatureError) as info:
        suit_auth.authenticate(env, [LIBCSUIT_KEY], hmac_key=WRONG_HMAC_KEY)
    assert info.value.rule == "suit.signature"


@pytest.mark.parametrize("name", SPEC_UNSIGNED)
def test_spec_unsigned_is_refused(name: str) -> None:
    env = suit.parse_envelope(_read(SPEC, name))
    assert env.auth_blocks == ()
    with pytest.raises(SignatureError) as info:
        suit_auth.authenticate(env, [SPEC_KEY])
    assert info.value.rule == "suit.unsigned"
    assert info.value.code == ErrorCode.SIGNATURE


def test_wrong_trust_anchor_is_refused() -> None:
    other = keys.generate("es256").public_key()
    env = suit.parse_envelope(_read(SPEC, "example0-signed.suit"))
    with pytest.raises(SignatureError) as info:
        suit_auth.authenticate(env, [other])
    assert info.value.rule == "suit.signature"


# ---------------------------------------------------------------------------
# Every single-byte change of the signed parts is caught
# ---------------------------------------------------------------------------


def _signed_regions(data: bytes) -> list[tuple[str, int, int]]:
    """Offsets of the manifest bstr content and of the SUIT_Digest bstr content."""
    env = suit.parse_envelope(data)
    regions = []
    for what, part in (("manifest", env.manifest_bytes), ("digest", env.digest_bytes)):
        assert data.count(part) == 1, f"{what} is not uniquely locatable"
        start = data.index(part)
        regions.append((what, start, start + len(part)))
    return regions


def _assert_every_flip_fails(data: bytes, authenticate: Callable[[suit.Envelope], object]) -> int:
    """Flips every byte of the signed regions two ways (all bits, lowest bit)."""
    checked = 0
    problems: list[str] = []
    for what, start, end in _signed_regions(data):
        for offset in range(start, end):
            for mask in (0xFF, 0x01):
                mutated = bytearray(data)
                mutated[offset] ^= mask
                try:
                    _process(bytes(mutated), authenticate)
                except ALLOWED_ERRORS:
                    pass
                except Exception as exc:
                    problems.append(f"{what} byte {offset} ^{mask:#x}: {type(exc).__name__}: {exc}")
                else:
                    problems.append(f"{what} byte {offset} ^{mask:#x}: accepted")
                checked += 1
    assert not problems, "\n".join(problems[:20])
    return checked


@pytest.mark.parametrize("name", SPEC_SIGNED)
def test_spec_every_byte_flip_is_refused(name: str) -> None:
    data = _read(SPEC, name)
    _process(data, _with_spec_key)  # the genuine file passes
    checked = _assert_every_flip_fails(data, _with_spec_key)
    assert checked >= 2 * (len(suit.parse_envelope(data).manifest_bytes) + 34)


@pytest.mark.parametrize("name", LIBCSUIT_ALL)
def test_libcsuit_byte_flips_are_refused(name: str) -> None:
    data = _read(LIBCSUIT, name)
    authenticate = _with_libcsuit_hmac if name in MAC0_FILES else _with_libcsuit_key
    _process(data, authenticate)
    _assert_every_flip_fails(data, authenticate)


def test_flip_harness_notices_acceptance() -> None:
    # Without authentication many flips parse fine: the harness must say so.
    with pytest.raises(AssertionError, match="accepted"):
        _assert_every_flip_fails(_read(SPEC, "example0-signed.suit"), lambda env: None)


def test_flipped_signature_is_refused() -> None:
    data = _read(SPEC, "example0-signed.suit")
    env = suit.parse_envelope(data)
    block = cose.parse(cbor.loads(env.auth_blocks[0]))
    start = data.index(block.tag)
    for offset in range(start, start + len(block.tag)):
        mutated = bytearray(data)
        mutated[offset] ^= 0x01
        with pytest.raises(SignatureError) as info:
            _process(bytes(mutated), _with_spec_key)
        assert info.value.rule == "suit.signature"


# ---------------------------------------------------------------------------
# Severable members
# ---------------------------------------------------------------------------


def _replace_member(data: bytes, key: int, content: bytes) -> bytes:
    value = cbor.loads(data)
    assert isinstance(value, cbor.Tag)
    body = dict(value.value)
    body[key] = content
    return cbor.dumps(cbor.Tag(value.number, body))


def test_changed_severable_member_is_refused() -> None:
    data = _read(SPEC, "example2-signed-full.suit")
    env = suit.parse_envelope(data)
    text = env.members[suit.TEXT]
    # Re-encoding the untouched envelope must not change it (the test edits by re-encoding).
    assert _replace_member(data, suit.TEXT, text) == data
    for changed in (text[:-1] + bytes([text[-1] ^ 1]), text + b"\x00", b"", text[:-1]):
        mutated = suit.parse_envelope(_replace_member(data, suit.TEXT, changed))
        suit_auth.authenticate(mutated, [SPEC_KEY])  # the manifest itself is untouched
        with pytest.raises(DigestError) as info:
            suit.check_severed(mutated)
        assert info.value.rule == "suit.severable-digest"
        assert info.value.code == ErrorCode.DIGEST


def test_each_byte_of_a_severable_member_is_covered() -> None:
    data = _read(SPEC, "example2-signed-full.suit")
    env = suit.parse_envelope(data)
    for key, content in env.members.items():
        start = data.index(content)
        for offset in range(start, start + len(content)):
            mutated = bytearray(data)
            mutated[offset] ^= 0xFF
            try:
                _process(bytes(mutated), _with_spec_key)
            except (FormatError, DigestError):
                continue
            pytest.fail(f"member {key}: flipped byte {offset} accepted")


def test_member_not_named_by_manifest_is_refused() -> None:
    data = _read(SPEC, "example0-signed.suit")
    mutated = suit.parse_envelope(_replace_member(data, suit.TEXT, cbor.dumps({1: "x"})))
    suit_auth.authenticate(mutated, [SPEC_KEY])
    with pytest.raises(FormatError) as info:
        suit.check_severed(mutated)
    assert info.value.rule == "suit.severable"
