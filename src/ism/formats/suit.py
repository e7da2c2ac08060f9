"""SUIT envelopes and manifests (draft-ietf-suit-manifest-34): bytes <-> frozen objects.

Owns: the SUIT data model, strict parsing of envelopes from untrusted bytes,
digest computation, and encoding of envelopes.
Must not import: crypto, device or anything above (signature checks live in
:mod:`ism.crypto.suit`).

Threat: a hostile envelope that is malformed, oversized, ambiguous, smuggles
unknown commands the device would silently skip, or pairs a severable member
with a different digest. Parsing is strict: every map key and command must
be known (or in a private-use / custom range the spec reserves), every
``bstr .cbor`` member is decoded under the CBOR limits, digests must have the
length of their algorithm, and integrated payloads must be byte strings.
Nothing here decides trust; it only guarantees the object is what it claims
to be structurally.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ism.errors import DigestError, FormatError
from ism.formats import cbor

__all__ = [
    "Command",
    "Digest",
    "Envelope",
    "Manifest",
    "encode_envelope",
    "make_digest",
    "parse_envelope",
    "parse_sequence",
    "wrap",
]

TAG_ENVELOPE: Final = 107
TAG_MANIFEST: Final = 1070

# Envelope / manifest element labels.
AUTH: Final = 2
MANIFEST: Final = 3
COSWID: Final = 14
DEPENDENCY_RESOLUTION: Final = 15
PAYLOAD_FETCH: Final = 16
CANDIDATE_VERIFICATION: Final = 18
INSTALL: Final = 20
TEXT: Final = 23
#: iSM metadata: a severable member in the SUIT private-use range (< -255).
ISM_METADATA: Final = -257

SEVERABLE: Final = frozenset({COSWID, DEPENDENCY_RESOLUTION, PAYLOAD_FETCH, CANDIDATE_VERIFICATION, INSTALL, TEXT})

M_VERSION, M_SEQUENCE, M_COMMON, M_REFERENCE_URI = 1, 2, 3, 4
M_COMPONENT_ID, M_SET_VERSION, M_VALIDATE, M_LOAD, M_INVOKE, M_UNINSTALL = 5, 6, 7, 8, 9, 24
_MANIFEST_KEYS: Final = frozenset(
    {M_VERSION, M_SEQUENCE, M_COMMON, M_REFERENCE_URI, M_COMPONENT_ID, M_SET_VERSION}
    | {M_VALIDATE, M_LOAD, M_INVOKE, M_UNINSTALL}
    | SEVERABLE
)
_SEQUENCE_MEMBERS: Final = frozenset({M_VALIDATE, M_LOAD, M_INVOKE, M_UNINSTALL})

C_DEPENDENCIES, C_COMPONENTS, C_SHARED_SEQUENCE = 1, 2, 4

# Commands (IANA "SUIT Commands", incl. trust-domains and update-management drafts).
CMD_VENDOR_ID, CMD_CLASS_ID, CMD_IMAGE_MATCH = 1, 2, 3
CMD_SET_COMPONENT_INDEX, CMD_TRY_EACH = 12, 15
CMD_SET_PARAMETERS, CMD_OVERRIDE_PARAMETERS, CMD_FETCH = 19, 20, 21
CMD_INVOKE, CMD_RUN_SEQUENCE = 23, 32
CMD_OVERRIDE_MULTIPLE, CMD_COPY_PARAMS = 34, 35

COMMAND_NAMES: Final[Mapping[int, str]] = {
    1: "condition-vendor-identifier",
    2: "condition-class-identifier",
    3: "condition-image-match",
    4: "condition-use-before",
    5: "condition-component-slot",
    6: "condition-check-content",
    7: "condition-dependency-integrity",
    8: "condition-is-dependency",
    11: "directive-process-dependency",
    12: "directive-set-component-index",
    14: "condition-abort",
    15: "directive-try-each",
    18: "directive-write",
    19: "directive-set-parameters",
    20: "directive-override-parameters",
    21: "directive-fetch",
    22: "directive-copy",
    23: "directive-invoke",
    24: "condition-device-identifier",
    25: "condition-image-not-match",
    26: "condition-minimum-battery",
    27: "condition-update-authorized",
    28: "condition-version",
    29: "directive-wait",
    31: "directive-swap",
    32: "directive-run-sequence",
    33: "directive-unlink",
    34: "directive-override-multiple",
    35: "directive-copy-params",
}

# Parameters.
P_VENDOR_ID, P_CLASS_ID, P_IMAGE_DIGEST, P_IMAGE_SIZE, P_URI = 1, 2, 3, 14, 21

DIGEST_ALGS: Final[Mapping[int, tuple[str, int]]] = {
    -16: ("sha-256", 32),
    -18: ("shake128", 32),
    -43: ("sha-384", 48),
    -44: ("sha-512", 64),
    -45: ("shake256", 64),
}
_HASHERS: Final = {-16: hashlib.sha256, -43: hashlib.sha384, -44: hashlib.sha512}


@dataclass(frozen=True, slots=True)
class Digest:
    """A SUIT_Digest: algorithm id and digest bytes."""

    alg: int
    value: bytes

    @property
    def alg_name(self) -> str:
        return DIGEST_ALGS[self.alg][0]

    def compute(self, data: bytes) -> bytes:
        """Digest of ``data`` with this digest's algorithm."""
        if self.alg in _HASHERS:
            return _HASHERS[self.alg](data).digest()
        size = DIGEST_ALGS[self.alg][1]
        return (hashlib.shake_128 if self.alg == -18 else hashlib.shake_256)(data).digest(size)

    def check(self, data: bytes, rule: str, what: str) -> None:
        """Raises DigestError(rule) unless ``data`` hashes to this digest."""
        got = self.compute(data)
        if got != self.value:
            raise DigestError(rule, f"{what} does not match its digest", got=got, expected=self.value)

    def encode(self) -> list[Any]:
        return [self.alg, self.value]


@dataclass(frozen=True, slots=True)
class Command:
    """One SUIT command: its code and its parsed argument.

    ``arg`` is: an int report policy; a parameter dict; a tuple of nested
    command tuples (try-each); a command tuple (run-sequence); or the raw value.
    """

    code: int
    arg: Any

    @property
    def name(self) -> str:
        return COMMAND_NAMES.get(self.code, f"custom({self.code})")


Sequence = tuple[Command, ...]


@dataclass(frozen=True, slots=True)
class Manifest:
    """A parsed SUIT_Manifest."""

    sequence: int
    components: tuple[tuple[bytes, ...], ...]
    shared: Sequence
    dependencies: Mapping[Any, Any]
    reference_uri: str | None
    sequences: Mapping[int, Sequence]
    #: severable members: a Digest when severed out, or the inline raw bstr content.
    severable: Mapping[int, Digest | bytes]
    raw: Mapping[Any, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Envelope:
    """A parsed SUIT_Envelope. Nothing in it has been authenticated yet."""

    tagged: bool
    digest: Digest
    #: the encoded SUIT_Digest exactly as received: the detached COSE payload.
    digest_bytes: bytes
    auth_blocks: tuple[bytes, ...]
    manifest_bytes: bytes
    manifest: Manifest
    members: Mapping[int, bytes]
    integrated: Mapping[str, bytes]


def wrap(data: bytes) -> bytes:
    """The CBOR byte-string encoding of ``data`` (what SUIT digests cover)."""
    return cbor.dumps(data)


def make_digest(data: bytes, alg: int = -16) -> Digest:
    """SUIT_Digest over the bstr-wrapped ``data``."""
    proto = Digest(alg, b"")
    return Digest(alg, proto.compute(wrap(data)))


def _bstr_cbor(value: Any, rule: str, what: str) -> Any:
    if not isinstance(value, bytes):
        raise FormatError(rule, f"{what} must be a byte string", got=type(value).__name__)
    try:
        return cbor.loads(value)
    except FormatError as exc:
        raise FormatError(rule, f"{what} is not valid CBOR: {exc.message}") from exc


def parse_digest(value: Any, what: str = "digest") -> Digest:
    """Parses a SUIT_Digest array."""
    if not isinstance(value, list) or len(value) < 2:
        raise FormatError("suit.digest-format", f"{what} must be [alg, bytes]")
    alg, raw = value[0], value[1]
    if not isinstance(alg, int) or isinstance(alg, bool) or alg not in DIGEST_ALGS:
        raise FormatError("suit.digest-alg", f"{what} uses an unsupported algorithm", got=alg)
    if not isinstance(raw, bytes) or len(raw) != DIGEST_ALGS[alg][1]:
        raise FormatError("suit.digest-format", f"{what} has the wrong length for {DIGEST_ALGS[alg][0]}")
    return Digest(alg, raw)


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _parse_parameters(value: Any) -> dict[int, Any]:
    if not isinstance(value, dict):
        raise FormatError("suit.parameters", "parameters must be a map")
    for key in value:
        if not isinstance(key, int) or isinstance(key, bool):
            raise FormatError("suit.parameters", "parameter labels must be integers", got=key)
    return dict(value)


def parse_sequence(value: Any, depth: int = 0) -> Sequence:
    """Parses a SUIT_Command_Sequence (already CBOR-decoded array).

    Raises:
        FormatError: ``suit.sequence`` (shape), ``suit.unknown-command``,
            ``suit.command-arg`` (argument of the wrong type).
    """
    if depth > 8:
        raise FormatError("suit.sequence", "command sequences nested too deeply")
    if not isinstance(value, list) or not value or len(value) % 2:
        raise FormatError("suit.sequence", "a command sequence is a non-empty array of code/argument pairs")
    out: list[Command] = []
    for i in range(0, len(value), 2):
        code, arg = value[i], value[i + 1]
        if not isinstance(code, int) or isinstance(code, bool):
            raise FormatError("suit.sequence", "command code must be an integer", got=code)
        out.append(Command(code, _parse_arg(code, arg, depth)))
    return tuple(out)


def _parse_arg(code: int, arg: Any, depth: int) -> Any:
    if code < 0:  # suit-command-custom
        return arg
    if code not in COMMAND_NAMES:
        raise FormatError("suit.unknown-command", "unknown SUIT command", got=code)
    name = COMMAND_NAMES[code]
    if code in (CMD_SET_PARAMETERS, CMD_OVERRIDE_PARAMETERS):
        return _parse_parameters(arg)
    if code in (CMD_OVERRIDE_MULTIPLE, CMD_COPY_PARAMS):
        if not isinstance(arg, dict):
            raise FormatError("suit.command-arg", f"{name} takes a map")
        return dict(arg)
    if code == CMD_SET_COMPONENT_INDEX:
        ok = arg is True or _is_uint(arg) or (isinstance(arg, list) and arg and all(_is_uint(a) for a in arg))
        if not ok:
            raise FormatError("suit.command-arg", "component index must be uint, true or [+uint]", got=arg)
        return tuple(arg) if isinstance(arg, list) else arg
    if code == CMD_TRY_EACH:
        if not isinstance(arg, list) or len(arg) < 1:
            raise FormatError("suit.command-arg", "try-each takes an array of sequences")
        options: list[Sequence | None] = []
        for j, item in enumerate(arg):
            if item is None and j == len(arg) - 1:
                options.append(None)
                continue
            options.append(parse_sequence(_bstr_cbor(item, "suit.command-arg", "try-each option"), depth + 1))
        return tuple(options)
    if code == CMD_RUN_SEQUENCE:
        return parse_sequence(_bstr_cbor(arg, "suit.command-arg", "run-sequence argument"), depth + 1)
    if not _is_uint(arg):
        raise FormatError("suit.command-arg", f"{name} takes a reporting policy (uint)", got=arg)
    return arg


def _parse_common(value: Any) -> tuple[tuple[tuple[bytes, ...], ...], Sequence, Mapping[Any, Any]]:
    common = _bstr_cbor(value, "suit.common", "common")
    if not isinstance(common, dict):
        raise FormatError("suit.common", "common must be a map")
    unknown = set(common) - {C_DEPENDENCIES, C_COMPONENTS, C_SHARED_SEQUENCE}
    if unknown:
        raise FormatError("suit.common", "unknown key in common", got=sorted(map(str, unknown)))
    components: list[tuple[bytes, ...]] = []
    raw_components = common.get(C_COMPONENTS, [])
    if not isinstance(raw_components, list) or (C_COMPONENTS in common and not raw_components):
        raise FormatError("suit.components", "components must be a non-empty array")
    for comp in raw_components:
        if not isinstance(comp, list) or not all(isinstance(p, bytes) for p in comp):
            raise FormatError("suit.components", "a component identifier is an array of byte strings")
        ident = tuple(comp)
        if ident in components:
            raise FormatError("suit.duplicate-component", "component listed twice", got=b"/".join(ident))
        components.append(ident)
    shared: Sequence = ()
    if C_SHARED_SEQUENCE in common:
        shared = parse_sequence(_bstr_cbor(common[C_SHARED_SEQUENCE], "suit.sequence", "shared sequence"))
    deps = common.get(C_DEPENDENCIES, {})
    if not isinstance(deps, dict):
        raise FormatError("suit.common", "dependencies must be a map")
    return tuple(components), shared, deps


def _is_private(key: Any) -> bool:
    return isinstance(key, int) and not isinstance(key, bool) and key < -255


def parse_manifest(manifest_bytes: bytes) -> Manifest:
    """Parses the bytes of a SUIT_Manifest (the content of envelope key 3)."""
    raw = _bstr_cbor(manifest_bytes, "suit.manifest", "manifest")
    if isinstance(raw, cbor.Tag) and raw.number == TAG_MANIFEST:
        raw = raw.value
    if not isinstance(raw, dict):
        raise FormatError("suit.manifest", "manifest must be a map")
    unknown = [k for k in raw if k not in _MANIFEST_KEYS and not _is_private(k)]
    if unknown:
        raise FormatError("suit.manifest-key", "unknown manifest element", got=sorted(map(str, unknown)))
    if raw.get(M_VERSION) != 1 or isinstance(raw.get(M_VERSION), bool):
        raise FormatError("suit.manifest-version", "manifest version must be 1", got=raw.get(M_VERSION))
    seq = raw.get(M_SEQUENCE)
    if not isinstance(seq, int) or not _is_uint(seq) or seq >= 1 << 64:
        raise FormatError("suit.sequence-number", "sequence number must be a uint", got=seq)
    if M_COMMON not in raw:
        raise FormatError("suit.common", "manifest has no common section")
    components, shared, deps = _parse_common(raw[M_COMMON])
    ref = raw.get(M_REFERENCE_URI)
    if ref is not None and not isinstance(ref, str):
        raise FormatError("suit.reference-uri", "reference URI must be text")
    sequences: dict[int, Sequence] = {}
    for key in _SEQUENCE_MEMBERS & set(raw):
        sequences[key] = parse_sequence(_bstr_cbor(raw[key], "suit.sequence", f"sequence {key}"))
    severable: dict[int, Digest | bytes] = {}
    for key, value in raw.items():
        if key in SEVERABLE or _is_private(key):
            if isinstance(value, list):
                severable[key] = parse_digest(value, f"digest of member {key}")
            elif isinstance(value, bytes):
                severable[key] = value
            else:
                raise FormatError("suit.severable", f"member {key} must be a digest or a byte string")
    for key in (PAYLOAD_FETCH, INSTALL):
        value = severable.get(key)
        if isinstance(value, bytes):
            sequences[key] = parse_sequence(_bstr_cbor(value, "suit.sequence", f"sequence {key}"))
    return Manifest(seq, components, shared, deps, ref, sequences, severable, raw)


def parse_envelope(data: bytes) -> Envelope:
    """Parses a SUIT envelope, tagged (107) or untagged.

    Raises:
        FormatError: ``cbor.*`` or ``suit.*`` naming the broken rule.
    """
    value = cbor.loads(data)
    tagged = isinstance(value, cbor.Tag)
    if tagged:
        if value.number != TAG_ENVELOPE:
            raise FormatError("suit.tag", "not a SUIT envelope tag (107)", got=value.number)
        value = value.value
    if not isinstance(value, dict):
        raise FormatError("suit.envelope", "envelope must be a map")
    if AUTH not in value or MANIFEST not in value:
        raise FormatError("suit.envelope", "envelope needs an authentication wrapper and a manifest")
    members: dict[int, bytes] = {}
    integrated: dict[str, bytes] = {}
    for key, item in value.items():
        if isinstance(key, str):
            if not isinstance(item, bytes):
                raise FormatError("suit.integrated", "integrated payload must be a byte string", got=key)
            integrated[key] = item
        elif key in (AUTH, MANIFEST):
            continue
        elif key in SEVERABLE or _is_private(key):
            if not isinstance(item, bytes):
                raise FormatError("suit.severable", f"envelope member {key} must be a byte string")
            members[key] = item
        else:
            raise FormatError("suit.envelope-key", "unknown envelope element", got=key)
    auth = _bstr_cbor(value[AUTH], "suit.auth", "authentication wrapper")
    if not isinstance(auth, list) or not auth:
        raise FormatError("suit.auth", "authentication wrapper must be a non-empty array")
    digest = parse_digest(_bstr_cbor(auth[0], "suit.auth", "manifest digest"), "manifest digest")
    digest_bytes = auth[0]
    blocks = auth[1:]
    if not all(isinstance(b, bytes) for b in blocks):
        raise FormatError("suit.auth", "authentication blocks must be byte strings")
    manifest_bytes = value[MANIFEST]
    if not isinstance(manifest_bytes, bytes):
        raise FormatError("suit.manifest", "manifest must be a byte string")
    manifest = parse_manifest(manifest_bytes)
    return Envelope(tagged, digest, digest_bytes, tuple(blocks), manifest_bytes, manifest, members, integrated)


def check_severed(env: Envelope) -> list[int]:
    """Checks every severable member present in the envelope against its digest.

    Returns:
        The labels whose content is absent (severed and not supplied).

    Raises:
        DigestError: ``suit.severable-digest`` on a mismatch.
        FormatError: ``suit.severable`` when a member appears in the envelope
            but the manifest carries it inline or does not name it.
    """
    severed: list[int] = []
    for key, held in env.manifest.severable.items():
        present = env.members.get(key)
        if isinstance(held, Digest):
            if present is None:
                severed.append(key)
            else:
                held.check(wrap(present), "suit.severable-digest", f"severable member {key}")
        elif present is not None:
            raise FormatError("suit.severable", f"member {key} is both inline and in the envelope")
    stray = set(env.members) - set(env.manifest.severable)
    if stray:
        raise FormatError("suit.severable", "envelope member not named by the manifest", got=sorted(stray))
    return sorted(severed)


def member(env: Envelope, key: int) -> bytes | None:
    """Content of a severable member, inline or from the envelope, or None if severed."""
    held = env.manifest.severable.get(key)
    if isinstance(held, bytes):
        return held
    return env.members.get(key)


def encode_envelope(
    auth: list[bytes],
    manifest_bytes: bytes,
    members: Mapping[int, bytes],
    integrated: Mapping[str, bytes],
    tagged: bool = True,
) -> bytes:
    """Encodes an envelope from an authentication wrapper array and its parts."""
    body: dict[Any, Any] = {AUTH: cbor.dumps(auth), MANIFEST: manifest_bytes}
    body.update(members)
    body.update(integrated)
    return cbor.dumps(cbor.Tag(TAG_ENVELOPE, body) if tagged else body)
