"""Hostile packages: a named table of attacks, each refused with a stable code and rule.

Every attack is checked twice: by the pure secure-boot decision
(:func:`ism.device.trust.boot.check_package`) and by a device's ``install``,
which must refuse and write nothing. Device-level tests then attack the
device's "flash" (the installed package files), the anti-rollback counters and
downgrade authorisations.
"""

from __future__ import annotations

import hashlib
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import wasmtime
from hypothesis import given, settings
from hypothesis import strategies as st

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, public_pem, signer_id
from ism.device.trust.boot import Accepted, check_package
from ism.device.virtual import Device
from ism.errors import (
    ConditionError,
    DigestError,
    ErrorCode,
    FormatError,
    IsmError,
    RollbackError,
    SignatureError,
    TrustError,
    UntrustedSignerError,
)
from ism.formats import cbor, package, suit
from ism.formats.downgrade import Downgrade

INSTANCE = b"\x01" + bytes(32)


# -- attack construction -------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """What an attacker has: a good package, the tools to build others, and foreign keys."""

    good: bytes
    build: Callable[..., bytes]
    make_meta: Callable[..., package.PackageMeta]
    sign_parts: Callable[..., bytes]
    wasm: dict[str, bytes]
    dev_key: PrivateKey
    other_key: PrivateKey


def _body(data: bytes) -> dict[Any, Any]:
    """The envelope map of a (tagged) envelope."""
    value = cbor.loads(data)
    assert isinstance(value, cbor.Tag)
    return dict(value.value)


def _encode(body: dict[Any, Any], tag: int = suit.TAG_ENVELOPE) -> bytes:
    return cbor.dumps(cbor.Tag(tag, body))


def _with(data: bytes, **changes: Any) -> bytes:
    """``data`` with envelope members replaced (``auth``, ``manifest``, ``wasm``, ``meta``, ``text``)."""
    labels = {"auth": suit.AUTH, "manifest": suit.MANIFEST, "wasm": "#wasm", "meta": suit.ISM_METADATA}
    labels["text"] = suit.TEXT
    body = _body(data)
    for name, value in changes.items():
        body[labels[name]] = value
    return _encode(body)


def _without(data: bytes, *labels: Any) -> bytes:
    body = _body(data)
    for label in labels:
        del body[label]
    return _encode(body)


def _flip(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


def _resigned(
    ctx: Ctx,
    edit: Callable[[dict[Any, Any]], None] | None = None,
    *,
    meta: package.PackageMeta | None = None,
    wasm: bytes | None = None,
    members: Callable[[dict[int, bytes]], None] | None = None,
    key: PrivateKey | None = None,
) -> bytes:
    """A hello package whose manifest (and members) were edited, then properly signed.

    ``edit`` receives the decoded manifest map; a severable member edited by
    ``members`` gets its manifest digest updated, so only the intended rule breaks.
    """
    meta = meta or ctx.make_meta("hello")
    payload = ctx.wasm["hello"] if wasm is None else wasm
    manifest_bytes, parts, integrated = package.build_unsigned(meta, payload)
    manifest = cbor.loads(manifest_bytes)
    if members is not None:
        members(parts)
        for label, content in parts.items():
            manifest[label] = suit.make_digest(content).encode()
    if edit is not None:
        edit(manifest)
    return ctx.sign_parts(cbor.dumps(manifest), parts, integrated, key or ctx.dev_key)


def _edit_bstr(manifest: dict[Any, Any], label: int, edit: Callable[[Any], Any]) -> None:
    """Edits the CBOR inside the ``bstr .cbor`` manifest member ``label``."""
    manifest[label] = cbor.dumps(edit(cbor.loads(manifest[label])))


def _edit_common(manifest: dict[Any, Any], edit: Callable[[dict[Any, Any]], None]) -> None:
    def apply(common: dict[Any, Any]) -> dict[Any, Any]:
        edit(common)
        return common

    _edit_bstr(manifest, suit.M_COMMON, apply)


def _edit_shared(manifest: dict[Any, Any], edit: Callable[[list[Any]], list[Any]]) -> None:
    def apply(common: dict[Any, Any]) -> None:
        common[suit.C_SHARED_SEQUENCE] = cbor.dumps(edit(cbor.loads(common[suit.C_SHARED_SEQUENCE])))

    _edit_common(manifest, apply)


def _set_image_size(size: int) -> Callable[[list[Any]], list[Any]]:
    def edit(shared: list[Any]) -> list[Any]:
        shared[1][suit.P_IMAGE_SIZE] = size
        return shared

    return edit


def _metadata(**fields: Any) -> Callable[[dict[int, bytes]], None]:
    """Replaces the iSM metadata member with a map of raw CBOR ``fields`` (keys ``k1``...)."""

    def edit(parts: dict[int, bytes]) -> None:
        parts[suit.ISM_METADATA] = cbor.dumps({int(k[1:]): v for k, v in fields.items()})

    return edit


def _wat(text: str) -> bytes:
    return bytes(wasmtime.wat2wasm(text))


def _manual_auth(manifest_bytes: bytes, key: PrivateKey, kid: bytes) -> bytes:
    """An authentication wrapper signed by ``key`` but naming ``kid``."""
    digest_bytes = cbor.dumps(suit.make_digest(manifest_bytes).encode())
    return cbor.dumps([digest_bytes, cose.sign1(digest_bytes, key, detached=True, kid=kid)])


def _forged_kid(ctx: Ctx) -> bytes:
    manifest = _body(ctx.good)[suit.MANIFEST]
    return _with(ctx.good, auth=_manual_auth(manifest, ctx.other_key, signer_id(ctx.dev_key)))


def _bad_signature(ctx: Ctx) -> bytes:
    auth = cbor.loads(_body(ctx.good)[suit.AUTH])
    block = cbor.loads(auth[1])
    block.value[3] = _flip(block.value[3], 10)
    return _with(ctx.good, auth=cbor.dumps([auth[0], cbor.dumps(block)]))


def _double_wrapped_block(ctx: Ctx) -> bytes:
    """The (valid) COSE_Sign1 block wrapped in one more byte string: not a COSE message."""
    auth = cbor.loads(_body(ctx.good)[suit.AUTH])
    return _with(ctx.good, auth=cbor.dumps([auth[0], cbor.dumps(auth[1])]))


def _tampered_manifest(ctx: Ctx) -> bytes:
    """One byte of the vendor ID inside the signed manifest flipped."""
    vendor = ctx.make_meta("hello").vendor.bytes
    at = ctx.good.index(vendor)
    assert ctx.good.count(vendor) == 1
    return _flip(ctx.good, at + 3)


def _redigested_manifest(ctx: Ctx) -> bytes:
    """The manifest changed (sequence 1 -> 9) and its digest recomputed; the old signature kept."""
    body = _body(ctx.good)
    manifest = cbor.loads(body[suit.MANIFEST])
    manifest[suit.M_SEQUENCE] = 9
    new_manifest = cbor.dumps(manifest)
    auth = cbor.loads(body[suit.AUTH])
    auth[0] = cbor.dumps(suit.make_digest(new_manifest).encode())
    return _with(ctx.good, manifest=new_manifest, auth=cbor.dumps(auth))


def _stripped_signature(ctx: Ctx) -> bytes:
    auth = cbor.loads(_body(ctx.good)[suit.AUTH])
    return _with(ctx.good, auth=cbor.dumps(auth[:1]))


def _swapped_payload(ctx: Ctx) -> bytes:
    """The payload of another signed package of the same size spliced into this one."""
    other = ctx.build("hello", wasm=ctx.wasm["hello-variant"], sequence=5)
    return _with(ctx.good, wasm=_body(other)["#wasm"])


def _payload_of(ctx: Ctx, example: str) -> bytes:
    return _with(ctx.good, wasm=_body(ctx.build(example))["#wasm"])


def _duplicated_component(manifest: dict[Any, Any]) -> None:
    _edit_common(manifest, lambda c: c.__setitem__(suit.C_COMPONENTS, [[b"microservice"], [b"microservice"]]))


def _second_component(manifest: dict[Any, Any]) -> None:
    _edit_common(manifest, lambda c: c.__setitem__(suit.C_COMPONENTS, [[b"microservice"], [b"bootloader"]]))


def _unknown_command(manifest: dict[Any, Any]) -> None:
    _edit_bstr(manifest, suit.M_VALIDATE, lambda seq: [*seq, 99, 0])


def _unknown_command_shared(manifest: dict[Any, Any]) -> None:
    _edit_shared(manifest, lambda seq: [*seq, 13, 15])


def _drop_vendor_condition(manifest: dict[Any, Any]) -> None:
    _edit_shared(manifest, lambda seq: [c for i, c in enumerate(seq) if i not in (2, 3)])


def _duplicate_class_condition(manifest: dict[Any, Any]) -> None:
    _edit_shared(manifest, lambda seq: [*seq, suit.CMD_CLASS_ID, 15])


UNKNOWN_IMPORT_WAT = """
(module
  (import "ism" "launch_missiles" (func (param i32) (result i32)))
  (func (export "init") (result i32) (i32.const 0)))
"""

WRONG_TYPE_IMPORT_WAT = """
(module
  (import "ism" "log" (func (param i32)))
  (func (export "init") (result i32) (i32.const 0)))
"""

MEMORY_IMPORT_WAT = """
(module
  (import "ism" "memory" (memory 1))
  (func (export "init") (result i32) (i32.const 0)))
"""


@dataclass(frozen=True)
class Attack:
    make: Callable[[Ctx], bytes]
    error: type[IsmError]
    rule: str


def _trunc(fraction: float) -> Callable[[Ctx], bytes]:
    return lambda ctx: ctx.good[: int(len(ctx.good) * fraction)]


_HUGE = (1 << 62).to_bytes(8, "big")

ATTACKS: dict[str, Attack] = {
    # -- framing ---------------------------------------------------------------------------------
    "empty-file": Attack(lambda ctx: b"", FormatError, "cbor.truncated"),
    "truncated-1-byte": Attack(lambda ctx: ctx.good[:1], FormatError, "cbor.truncated"),
    "truncated-3-bytes": Attack(lambda ctx: ctx.good[:3], FormatError, "cbor.truncated"),
    "truncated-10-bytes": Attack(lambda ctx: ctx.good[:10], FormatError, "cbor.truncated"),
    "truncated-to-quarter": Attack(_trunc(0.25), FormatError, "cbor.truncated"),
    "truncated-to-half": Attack(_trunc(0.5), FormatError, "cbor.truncated"),
    "truncated-last-byte": Attack(lambda ctx: ctx.good[:-1], FormatError, "cbor.truncated"),
    "trailing-byte": Attack(lambda ctx: ctx.good + b"\x00", FormatError, "cbor.trailing"),
    "huge-bstr-length": Attack(lambda ctx: b"\xd8\x6b\xa1\x02\x5b" + _HUGE, FormatError, "cbor.truncated"),
    "huge-array-count": Attack(lambda ctx: b"\xd8\x6b\xa1\x02\x9b" + _HUGE, FormatError, "cbor.too-many-items"),
    "huge-map-count": Attack(lambda ctx: b"\xd8\x6b\xbb" + _HUGE, FormatError, "cbor.too-many-items"),
    "huge-payload-length": Attack(
        lambda ctx: ctx.good[: ctx.good.rindex(b"#wasm") + 5] + b"\x5b" + _HUGE, FormatError, "cbor.truncated"
    ),
    "wrong-envelope-tag": Attack(lambda ctx: _encode(_body(ctx.good), 106), FormatError, "suit.tag"),
    "unknown-envelope-member": Attack(
        lambda ctx: _encode({**_body(ctx.good), 99: b""}), FormatError, "suit.envelope-key"
    ),
    # -- wrong CBOR types ------------------------------------------------------------------------
    "manifest-as-text": Attack(
        lambda ctx: _with(ctx.good, manifest=_body(ctx.good)[suit.MANIFEST].hex()), FormatError, "suit.manifest"
    ),
    "auth-wrapper-as-array": Attack(
        lambda ctx: _with(ctx.good, auth=cbor.loads(_body(ctx.good)[suit.AUTH])), FormatError, "suit.auth"
    ),
    "payload-as-text": Attack(lambda ctx: _with(ctx.good, wasm="(module)"), FormatError, "suit.integrated"),
    "metadata-as-map": Attack(lambda ctx: _with(ctx.good, meta={1: "hello"}), FormatError, "suit.severable"),
    "sequence-as-string": Attack(
        lambda ctx: _resigned(ctx, lambda m: m.__setitem__(suit.M_SEQUENCE, "2")),
        FormatError,
        "suit.sequence-number",
    ),
    "negative-sequence": Attack(
        lambda ctx: _resigned(ctx, lambda m: m.__setitem__(suit.M_SEQUENCE, -1)),
        FormatError,
        "suit.sequence-number",
    ),
    # -- SUIT commands and profile ---------------------------------------------------------------
    "unknown-command": Attack(lambda ctx: _resigned(ctx, _unknown_command), FormatError, "suit.unknown-command"),
    "unknown-command-in-shared": Attack(
        lambda ctx: _resigned(ctx, _unknown_command_shared), FormatError, "suit.unknown-command"
    ),
    "duplicated-component": Attack(
        lambda ctx: _resigned(ctx, _duplicated_component), FormatError, "suit.duplicate-component"
    ),
    "second-component": Attack(lambda ctx: _resigned(ctx, _second_component), FormatError, "package.profile"),
    "vendor-condition-missing": Attack(
        lambda ctx: _resigned(ctx, _drop_vendor_condition), FormatError, "package.profile"
    ),
    "class-condition-twice": Attack(
        lambda ctx: _resigned(ctx, _duplicate_class_condition), FormatError, "package.profile"
    ),
    # -- authenticity ----------------------------------------------------------------------------
    "untrusted-signer": Attack(
        lambda ctx: ctx.build("hello", key=ctx.other_key), UntrustedSignerError, "suit.untrusted-signer"
    ),
    "forged-kid": Attack(_forged_kid, SignatureError, "suit.signature"),
    "signature-byte-flipped": Attack(_bad_signature, SignatureError, "suit.signature"),
    "tampered-manifest-byte": Attack(_tampered_manifest, DigestError, "suit.manifest-digest"),
    "manifest-redigested": Attack(_redigested_manifest, SignatureError, "suit.signature"),
    "stripped-signature": Attack(_stripped_signature, SignatureError, "suit.unsigned"),
    "auth-block-double-wrapped": Attack(_double_wrapped_block, FormatError, "cose.tag"),
    # -- payload ---------------------------------------------------------------------------------
    "swapped-payload": Attack(_swapped_payload, DigestError, "package.payload-digest"),
    "payload-of-other-size": Attack(lambda ctx: _payload_of(ctx, "echo"), ConditionError, "package.payload-size"),
    "payload-byte-appended": Attack(
        lambda ctx: _with(ctx.good, wasm=_body(ctx.good)["#wasm"] + b"\x00"), ConditionError, "package.payload-size"
    ),
    "payload-byte-dropped": Attack(
        lambda ctx: _with(ctx.good, wasm=_body(ctx.good)["#wasm"][:-1]), ConditionError, "package.payload-size"
    ),
    "signed-size-wrong": Attack(
        lambda ctx: _resigned(ctx, lambda m: _edit_shared(m, _set_image_size(len(ctx.wasm["hello"]) + 1))),
        ConditionError,
        "package.payload-size",
    ),
    "payload-missing": Attack(lambda ctx: _without(ctx.good, "#wasm"), FormatError, "package.payload"),
    "second-payload": Attack(
        lambda ctx: _encode({**_body(ctx.good), "#extra": b"\x00"}), FormatError, "package.payload"
    ),
    "unknown-host-import": Attack(
        lambda ctx: ctx.build("hello", wasm=_wat(UNKNOWN_IMPORT_WAT)), FormatError, "wasm.unknown-import"
    ),
    "host-import-wrong-type": Attack(
        lambda ctx: ctx.build("hello", wasm=_wat(WRONG_TYPE_IMPORT_WAT)), FormatError, "wasm.import-type"
    ),
    "memory-import": Attack(
        lambda ctx: ctx.build("hello", wasm=_wat(MEMORY_IMPORT_WAT)), FormatError, "wasm.import-kind"
    ),
    "payload-not-wasm": Attack(lambda ctx: ctx.build("hello", wasm=b"\x7fELF\x02\x01\x01"), FormatError, "wasm.magic"),
    # -- severable members -----------------------------------------------------------------------
    "metadata-severed": Attack(lambda ctx: _without(ctx.good, suit.ISM_METADATA), FormatError, "package.metadata"),
    "metadata-replaced": Attack(
        lambda ctx: _with(ctx.good, meta=cbor.dumps({1: "evil", 2: "6.6.6"})), DigestError, "suit.severable-digest"
    ),
    "text-replaced": Attack(
        lambda ctx: _with(ctx.good, text=cbor.dumps({"en": {1: "evil"}})), DigestError, "suit.severable-digest"
    ),
    "metadata-bad-name": Attack(
        lambda ctx: _resigned(ctx, members=_metadata(k1="Not A Name", k2="1.0.0")), FormatError, "package.metadata"
    ),
    "metadata-unknown-key": Attack(
        lambda ctx: _resigned(ctx, members=_metadata(k1="hello", k2="1.0.0", k99=1)), FormatError, "package.metadata"
    ),
    "metadata-resource-name-not-text": Attack(
        lambda ctx: _resigned(ctx, members=_metadata(k1="hello", k2="1.0.0", k4={1: {5: ["read"]}})),
        FormatError,
        "package.metadata",
    ),
    "metadata-resource-modes-nested": Attack(
        lambda ctx: _resigned(ctx, members=_metadata(k1="hello", k2="1.0.0", k4={1: {"gpio": [["read"]]}})),
        FormatError,
        "package.metadata",
    ),
}


@pytest.fixture(scope="module")
def ctx(
    build_package: Callable[..., bytes],
    make_meta: Callable[..., package.PackageMeta],
    sign_parts: Callable[..., bytes],
    wasm_modules: dict[str, bytes],
    dev_key: PrivateKey,
    other_key: PrivateKey,
) -> Ctx:
    return Ctx(build_package("hello"), build_package, make_meta, sign_parts, wasm_modules, dev_key, other_key)


@pytest.fixture(scope="module")
def attack_bytes(ctx: Ctx) -> dict[str, bytes]:
    return {name: attack.make(ctx) for name, attack in ATTACKS.items()}


def _assert_refused(exc: IsmError, attack: Attack) -> None:
    assert type(exc) is attack.error, exc
    assert exc.code == attack.error.code
    assert exc.rule == attack.rule, exc


def test_good_package_is_accepted(ctx: Ctx) -> None:
    acc = check_package(ctx.good, [ctx.dev_key.public_key()], {}, INSTANCE)
    assert acc.package.meta == ctx.make_meta("hello")
    assert acc.signer == signer_id(ctx.dev_key)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_refused(name: str, attack_bytes: dict[str, bytes], ctx: Ctx) -> None:
    attack = ATTACKS[name]
    data = attack_bytes[name]
    assert data != ctx.good
    with pytest.raises(IsmError) as info:
        check_package(data, [ctx.dev_key.public_key()], {}, INSTANCE)
    _assert_refused(info.value, attack)
    assert info.value.public() == {"code": int(attack.error.code), "rule": attack.rule}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_install_refuses_and_writes_nothing(
    name: str, attack_bytes: dict[str, bytes], device: Device, tree: Callable[[Path], dict[str, bytes]]
) -> None:
    before = tree(device.root)
    with pytest.raises(IsmError) as info:
        device.install(attack_bytes[name])
    _assert_refused(info.value, ATTACKS[name])
    assert tree(device.root) == before


def test_oversized_package_is_refused_before_parsing(device: Device, tree: Callable[[Path], dict[str, bytes]]) -> None:
    before = tree(device.root)
    with pytest.raises(FormatError) as info:
        device.install(b"\x00" * (16 * 1024 * 1024 + 1))
    assert (info.value.code, info.value.rule) == (ErrorCode.FORMAT, "package.size")
    assert tree(device.root) == before


# -- accepted variants ---------------------------------------------------------------------------


def test_ed25519_signer_is_accepted(ctx: Ctx, ed25519_key: PrivateKey, tmp_path: Path) -> None:
    data = ctx.build("hello", key=ed25519_key)
    acc = check_package(data, [ed25519_key.public_key()], {}, INSTANCE)
    assert acc.signer == signer_id(ed25519_key)
    envelope = suit.parse_envelope(data)
    assert cose.parse(envelope.auth_blocks[0]).alg_name == "EdDSA"

    dev = Device.init(tmp_path / "ed")
    dev.add_anchor(public_pem(ed25519_key))
    dev.install(data)
    (entry,) = dev.boot().microservices
    assert (entry.verdict, entry.signer) == ("booted", signer_id(ed25519_key).hex())


def test_ed25519_signature_under_es256_kid_is_refused(ctx: Ctx, ed25519_key: PrivateKey) -> None:
    manifest = _body(ctx.good)[suit.MANIFEST]
    data = _with(ctx.good, auth=_manual_auth(manifest, ed25519_key, signer_id(ctx.dev_key)))
    with pytest.raises(SignatureError) as info:
        check_package(data, [ctx.dev_key.public_key()], {}, INSTANCE)
    assert (info.value.code, info.value.rule) == (ErrorCode.SIGNATURE, "suit.signature")


def test_untagged_envelope_and_severed_text_are_accepted(ctx: Ctx) -> None:
    untagged = cbor.dumps(_body(ctx.good))
    severed = _without(ctx.good, suit.TEXT)
    for data in (untagged, severed):
        acc = check_package(data, [ctx.dev_key.public_key()], {}, INSTANCE)
        assert acc.package.meta == ctx.make_meta("hello")


# -- the device's flash --------------------------------------------------------------------------

EXAMPLES = ("blinky", "echo", "hello")


@pytest.fixture
def populated(device: Device, build_package: Callable[..., bytes]) -> Device:
    """A device with all examples installed (hello at sequence 2) and booted once."""
    for name in EXAMPLES:
        device.install(build_package(name, sequence=2 if name == "hello" else 1))
    report = device.boot()
    assert [e.verdict for e in report.microservices] == ["booted"] * 3
    return device


def _malformed_metadata_untrusted(ctx: Ctx) -> bytes:
    """Signed by a stranger, with metadata whose resource name is not text: the boot report must not crash."""
    return _resigned(ctx, members=_metadata(k1="hello", k2="1.0.0", k4={1: {5: [["read"]]}}), key=ctx.other_key)


FLASH_TAMPERING: dict[str, tuple[Callable[[Ctx, bytes], bytes], str]] = {
    "payload-byte-flipped": (lambda ctx, data: _flip(data, data.rindex(b"#wasm") + 40), "package.payload-digest"),
    "manifest-byte-flipped": (
        lambda ctx, data: _flip(data, data.index(ctx.make_meta("hello").vendor.bytes)),
        "suit.manifest-digest",
    ),
    "older-signed-version": (lambda ctx, data: ctx.build("hello", sequence=1), "boot.rollback"),
    "re-signed-by-stranger": (
        lambda ctx, data: ctx.build("hello", sequence=9, key=ctx.other_key),
        "suit.untrusted-signer",
    ),
    "stranger-with-malformed-metadata": (lambda ctx, data: _malformed_metadata_untrusted(ctx), "suit.untrusted-signer"),
    "other-microservice-in-slot": (lambda ctx, data: ctx.build("echo"), "boot.slot"),
    "truncated": (lambda ctx, data: data[:100], "cbor.truncated"),
    "emptied": (lambda ctx, data: b"", "cbor.truncated"),
}


def _replace_by_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def _dangling_symlink(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.with_name("nowhere"))


#: Slots that cannot be read at all (rule ``boot.read``, a PlatformError).
UNREADABLE_SLOT: dict[str, Callable[[Path], None]] = {
    "package-is-a-directory": _replace_by_directory,
    "package-is-a-dangling-link": _dangling_symlink,
    "downgrade-file-is-a-directory": lambda path: path.with_name(path.stem + ".downgrade.cose").mkdir(),
}


@pytest.mark.parametrize("name", sorted(FLASH_TAMPERING) + sorted(UNREADABLE_SLOT) + ["oversized"])
def test_boot_refuses_only_the_tampered_package(name: str, populated: Device, ctx: Ctx, uuids: dict[str, str]) -> None:
    path = populated.package_path(uuids["hello"])
    if name in FLASH_TAMPERING:
        tamper, rule = FLASH_TAMPERING[name]
        path.write_bytes(tamper(ctx, path.read_bytes()))
    elif name in UNREADABLE_SLOT:
        UNREADABLE_SLOT[name](path)
        rule = "boot.read"
    else:
        path.write_bytes(path.read_bytes() + bytes(16 * 1024 * 1024))
        rule = "package.size"
    counters = populated.counters()

    report = populated.boot()

    verdicts = {e.uuid: (e.verdict, e.rule) for e in report.microservices}
    assert verdicts == {
        uuids["blinky"]: ("booted", None),
        uuids["echo"]: ("booted", None),
        uuids["hello"]: ("refused", rule),
    }
    assert populated.counters() == counters
    assert [a.name for a in report.accepted] == ["blinky", "echo"]


# -- anti-rollback -------------------------------------------------------------------------------


def test_counter_moves_only_when_boot_accepts(
    device: Device, build_package: Callable[..., bytes], uuids: dict[str, str]
) -> None:
    hello = uuids["hello"]
    device.install(build_package("hello", sequence=2))
    assert device.counters() == {}
    device.boot()
    assert device.counters() == {hello: 2}
    device.install(build_package("hello", sequence=3))
    assert device.counters() == {hello: 2}
    # A refused boot leaves the counter alone.
    path = device.package_path(hello)
    good = path.read_bytes()
    path.write_bytes(_flip(good, good.rindex(b"#wasm") + 40))
    (entry,) = device.boot().microservices
    assert entry.verdict == "refused"
    assert device.counters() == {hello: 2}
    path.write_bytes(good)
    device.boot()
    assert device.counters() == {hello: 3}


def test_rollback_refused_at_install_and_at_boot(
    device: Device, build_package: Callable[..., bytes], uuids: dict[str, str], tree: Callable[[Path], dict[str, bytes]]
) -> None:
    hello = uuids["hello"]
    device.install(build_package("hello", sequence=2))
    device.boot()
    assert device.counters() == {hello: 2}

    old = build_package("hello", sequence=1)
    before = tree(device.root)
    with pytest.raises(RollbackError) as info:
        device.install(old)
    assert (info.value.code, info.value.rule) == (ErrorCode.ROLLBACK, "boot.rollback")
    assert tree(device.root) == before

    device.package_path(hello).write_bytes(old)
    (entry,) = device.boot().microservices
    assert (entry.verdict, entry.rule, entry.code) == ("refused", "boot.rollback", int(ErrorCode.ROLLBACK))
    assert entry.sequence == 1
    assert device.counters() == {hello: 2}


def test_equal_sequence_is_not_a_rollback(device: Device, build_package: Callable[..., bytes]) -> None:
    device.install(build_package("hello", sequence=2))
    device.boot()
    device.install(build_package("hello", sequence=2, version="1.0.1"))
    (entry,) = device.boot().microservices
    assert (entry.verdict, entry.version) == ("booted", "1.0.1")


# -- downgrade authorisations --------------------------------------------------------------------


def _authorise(
    key: PrivateKey, ms: str, target: int, from_counter: int, instance_id: bytes, kid: bytes | None = None
) -> bytes:
    auth = Downgrade(uuidlib.UUID(ms), target, from_counter, instance_id)
    return cose.sign1(auth.encode(), key, kid=signer_id(key) if kid is None else kid)


@pytest.fixture
def at_two(device: Device, build_package: Callable[..., bytes], uuids: dict[str, str]) -> Device:
    """hello at sequence 2, booted: its counter is 2."""
    device.install(build_package("hello", sequence=2))
    device.boot()
    assert device.counters() == {uuids["hello"]: 2}
    return device


def test_signed_downgrade_allows_install_and_boot(
    at_two: Device, build_package: Callable[..., bytes], dev_key: PrivateKey, uuids: dict[str, str]
) -> None:
    hello = uuids["hello"]
    auth = _authorise(dev_key, hello, 1, 2, at_two.instance_id)
    acc = at_two.install(build_package("hello", sequence=1), downgrade=auth)
    assert acc.downgraded
    assert at_two.counters() == {hello: 2}

    (entry,) = at_two.boot().microservices
    assert (entry.verdict, entry.sequence, entry.downgraded) == ("booted", 1, True)
    assert at_two.counters() == {hello: 1}
    # Next boot: the sequence equals the counter, no authorisation needed.
    (entry,) = at_two.boot().microservices
    assert (entry.verdict, entry.downgraded) == ("booted", False)


def test_downgrade_authorisation_cannot_be_replayed_after_the_counter_moved(
    at_two: Device, build_package: Callable[..., bytes], dev_key: PrivateKey, uuids: dict[str, str]
) -> None:
    hello = uuids["hello"]
    auth = _authorise(dev_key, hello, 1, 2, at_two.instance_id)
    at_two.install(build_package("hello", sequence=1), downgrade=auth)
    at_two.boot()
    at_two.install(build_package("hello", sequence=3))
    at_two.boot()
    assert at_two.counters() == {hello: 3}
    with pytest.raises(TrustError) as info:
        at_two.install(build_package("hello", sequence=1), downgrade=auth)
    assert info.value.rule == "boot.downgrade-from"


def _other_device_id(dev: Device) -> bytes:
    return dev.instance_id[:-1] + bytes([dev.instance_id[-1] ^ 1])


BAD_DOWNGRADES: dict[str, tuple[Callable[[Device, dict[str, str], PrivateKey, PrivateKey], bytes], type, str]] = {
    "another-device": (
        lambda dev, u, k, o: _authorise(k, u["hello"], 1, 2, _other_device_id(dev)),
        TrustError,
        "boot.downgrade-device",
    ),
    "another-uuid": (
        lambda dev, u, k, o: _authorise(k, u["echo"], 1, 2, dev.instance_id),
        TrustError,
        "boot.downgrade-uuid",
    ),
    "another-target": (
        lambda dev, u, k, o: _authorise(k, u["hello"], 0, 2, dev.instance_id),
        TrustError,
        "boot.downgrade-target",
    ),
    "stale-from-counter": (
        lambda dev, u, k, o: _authorise(k, u["hello"], 1, 1, dev.instance_id),
        TrustError,
        "boot.downgrade-from",
    ),
    "non-anchor-signer": (
        lambda dev, u, k, o: _authorise(o, u["hello"], 1, 2, dev.instance_id),
        UntrustedSignerError,
        "boot.downgrade-signer",
    ),
    "double-wrapped": (
        lambda dev, u, k, o: cbor.dumps(_authorise(k, u["hello"], 1, 2, dev.instance_id)),
        FormatError,
        "cose.structure",
    ),
    "non-anchor-signer-claiming-anchor-kid": (
        lambda dev, u, k, o: _authorise(o, u["hello"], 1, 2, dev.instance_id, kid=signer_id(k)),
        SignatureError,
        "cose.signature",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_DOWNGRADES))
def test_mismatched_downgrade_is_refused(
    name: str,
    at_two: Device,
    build_package: Callable[..., bytes],
    dev_key: PrivateKey,
    other_key: PrivateKey,
    uuids: dict[str, str],
    tree: Callable[[Path], dict[str, bytes]],
) -> None:
    make, error, rule = BAD_DOWNGRADES[name]
    auth = make(at_two, uuids, dev_key, other_key)
    old = build_package("hello", sequence=1)
    before = tree(at_two.root)
    with pytest.raises(IsmError) as info:
        at_two.install(old, downgrade=auth)
    assert type(info.value) is error
    assert (info.value.code, info.value.rule) == (error.code, rule)
    assert tree(at_two.root) == before

    # The same authorisation placed on flash by hand is refused at boot too.
    hello = uuids["hello"]
    at_two.package_path(hello).write_bytes(old)
    (at_two.root / "packages" / f"{hello}.downgrade.cose").write_bytes(auth)
    (entry,) = at_two.boot().microservices
    assert (entry.verdict, entry.rule, entry.code) == ("refused", rule, int(error.code))
    assert at_two.counters() == {hello: 2}


# -- property: no mutation escapes the error tree ------------------------------------------------


def _mutations(size: int) -> st.SearchStrategy[tuple[str, int, int, bytes]]:
    pos = st.integers(0, size - 1)
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(1, 255), st.just(b"")),
        st.tuples(st.just("truncate"), pos, st.just(0), st.just(b"")),
        st.tuples(st.just("insert"), st.integers(0, size), st.just(0), st.binary(min_size=1, max_size=8)),
        st.tuples(st.just("delete"), pos, st.integers(1, 16), st.just(b"")),
    )


def _mutate(data: bytes, mutation: tuple[str, int, int, bytes]) -> bytes:
    kind, pos, arg, extra = mutation
    if kind == "flip":
        return _flip(data, pos, arg)
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + extra + data[pos:]
    return data[:pos] + data[pos + arg :]


@pytest.fixture(scope="module")
def good_accepted(ctx: Ctx) -> Accepted:
    return check_package(ctx.good, [ctx.dev_key.public_key()], {}, INSTANCE)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_mutated_package_is_refused_or_equivalent(data: st.DataObject, ctx: Ctx, good_accepted: Accepted) -> None:
    mutation = data.draw(_mutations(len(ctx.good)))
    mutated = _mutate(ctx.good, mutation)
    try:
        acc = check_package(mutated, [ctx.dev_key.public_key()], {}, INSTANCE)
    except IsmError:
        return
    # Accepted: only an encoding-level change (e.g. the envelope tag dropped) may get here,
    # and the authenticated content must be exactly the original's.
    original = good_accepted.package
    assert acc.package.envelope.manifest_bytes == original.envelope.manifest_bytes
    assert acc.package.payload == original.payload
    assert acc.package.meta == original.meta
    assert hashlib.sha256(acc.package.payload).digest() == original.measurement
    assert acc.signer == good_accepted.signer
