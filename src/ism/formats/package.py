"""The iSM microservice package: our profile of a SUIT envelope.

Owns: the developer-written metadata (``M.toml``), the layout of a
microservice package inside a SUIT envelope (one component, vendor/class
conditions, an integrated Wasm payload, severable text and iSM metadata),
building the unsigned parts of such an envelope, and reading a parsed
envelope back into a :class:`Package`.
Must not import: crypto, device or anything above.

Threat: a package whose parts disagree with each other — a payload that is
not the one the manifest digests, a size that differs, metadata naming
another microservice or sequence number, a second component smuggled in, a
duplicated or missing condition. :func:`read_package` checks every such
link, so a Package object is internally consistent (authenticity is checked
separately by :mod:`ism.crypto.suit`).

Package layout (see README "Package metadata")::

    envelope {2: auth, 3: manifest, 23: text, -257: ism-metadata, "#wasm": payload}
    manifest.common.components = [[ 'microservice' ]]
    manifest.common.shared     = override(vendor-id, class-id, image-digest, image-size),
                                 condition-vendor-identifier, condition-class-identifier
    manifest.install           = override(uri "#wasm"), fetch, condition-image-match
    manifest.validate          = condition-image-match
    manifest.invoke            = directive-invoke
    manifest.text / -257       = digests of the severable members
"""

from __future__ import annotations

import hashlib
import re
import tomllib
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ism.errors import ConditionError, DigestError, FormatError
from ism.formats import cbor, suit

__all__ = [
    "COMPONENT",
    "PAYLOAD_URI",
    "Package",
    "PackageMeta",
    "Requests",
    "build_unsigned",
    "claimed_identity",
    "parse_meta",
    "read_package",
]

COMPONENT: Final = (b"microservice",)
PAYLOAD_URI: Final = "#wasm"
REPORT: Final = 15  # SUIT reporting policy: report on success and failure, record all

MAX_NAME = 32
MAX_TEXT = 1024
RESOURCE_MODES: Final = frozenset({"read", "write", "control"})
_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")
_RESOURCE_RE: Final = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*\Z")
_KEY_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
_GATEWAY_RE: Final = re.compile(r"^[a-z][a-z0-9-]{0,31}\.[a-z_][a-z0-9_]{0,31}\Z")
_SEMVER_RE: Final = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?\Z"
)

# Keys of the iSM metadata map (envelope/manifest member -257).
_MK_NAME, _MK_VERSION, _MK_DESCRIPTION, _MK_REQUESTS, _MK_CERTS, _MK_VENDOR_NAME = 1, 2, 3, 4, 5, 6
_RK_RESOURCES, _RK_GATEWAYS, _RK_STORAGE, _RK_KEYS = 1, 2, 3, 4


@dataclass(frozen=True, slots=True)
class Requests:
    """What a microservice asks for. The access policy decides what it gets."""

    resources: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gateways: tuple[str, ...] = ()
    storage: int = 0
    keys: tuple[str, ...] = ()

    def encode(self) -> dict[int, Any]:
        out: dict[int, Any] = {}
        if self.resources:
            out[_RK_RESOURCES] = {k: list(v) for k, v in self.resources.items()}
        if self.gateways:
            out[_RK_GATEWAYS] = list(self.gateways)
        if self.storage:
            out[_RK_STORAGE] = self.storage
        if self.keys:
            out[_RK_KEYS] = list(self.keys)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "resources": {k: list(v) for k, v in self.resources.items()},
            "gateways": list(self.gateways),
            "storage": self.storage,
            "keys": list(self.keys),
        }


@dataclass(frozen=True, slots=True)
class PackageMeta:
    """Developer-supplied identity and requests of a microservice."""

    uuid: uuidlib.UUID
    vendor: uuidlib.UUID
    name: str
    version: str
    sequence: int
    description: str = ""
    vendor_name: str = ""
    requests: Requests = field(default_factory=Requests)
    certifications: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Package:
    """A structurally consistent microservice package (authenticity not implied)."""

    envelope: suit.Envelope
    meta: PackageMeta
    payload: bytes = field(repr=False)
    #: SHA-256 of the Wasm payload: the microservice's measurement.
    measurement: bytes

    def summary(self) -> dict[str, Any]:
        """JSON-friendly description of every field."""
        m = self.meta
        return {
            "uuid": str(m.uuid),
            "vendor": str(m.vendor),
            "name": m.name,
            "version": m.version,
            "sequence": m.sequence,
            "description": m.description,
            "vendor_name": m.vendor_name,
            "measurement": self.measurement.hex(),
            "payload_size": len(self.payload),
            "requests": m.requests.to_json(),
            "certifications": list(m.certifications),
            "components": [
                "/".join(p.decode("utf-8", "replace") for p in c) for c in self.envelope.manifest.components
            ],
        }


def _err(rule: str, message: str, source: str, key: str | None = None, got: Any = None) -> FormatError:
    where = f"{source}: {key}" if key else source
    return FormatError(rule, message, subject=where, got=got)


def _text(value: Any, key: str, source: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or len(value) > limit:
        raise _err("package.meta-type", f"must be a string of at most {limit} characters", source, key)
    return value


def _uuid(value: Any, key: str, source: str) -> uuidlib.UUID:
    try:
        return uuidlib.UUID(_text(value, key, source))
    except ValueError:
        raise _err("package.meta-uuid", "is not a UUID", source, key, value) from None


def _parse_requests(raw: Any, source: str) -> Requests:
    if not isinstance(raw, dict):
        raise _err("package.meta-type", "must be a table", source, "requests")
    unknown = set(raw) - {"resources", "gateways", "storage", "keys"}
    if unknown:
        raise _err("package.meta-key", "unknown key", source, f"requests.{sorted(unknown)[0]}")
    resources: dict[str, tuple[str, ...]] = {}
    res = raw.get("resources", {})
    if not isinstance(res, dict):
        raise _err("package.meta-type", "must be a table of resource = [modes]", source, "requests.resources")
    for name, modes in res.items():
        if not isinstance(name, str) or not _RESOURCE_RE.match(name) or len(name) > 64:
            raise _err("package.meta-resource", "is not a logical resource name", source, f"requests.resources.{name}")
        if isinstance(modes, str):
            modes = [modes]
        if (
            not isinstance(modes, list)
            or not modes
            or not all(isinstance(m, str) for m in modes)
            or not set(modes) <= RESOURCE_MODES
            or len(set(modes)) != len(modes)
        ):
            raise _err(
                "package.meta-resource",
                f"modes must be distinct values of {sorted(RESOURCE_MODES)}",
                source,
                f"requests.resources.{name}",
                modes,
            )
        resources[name] = tuple(modes)
    gateways = raw.get("gateways", [])
    if not isinstance(gateways, list) or not all(isinstance(g, str) and _GATEWAY_RE.match(g) for g in gateways):
        raise _err("package.meta-gateway", "must be a list of 'microservice.operation'", source, "requests.gateways")
    if len(set(gateways)) != len(gateways):
        raise _err("package.meta-gateway", "lists a gateway twice", source, "requests.gateways")
    storage = raw.get("storage", 0)
    if not isinstance(storage, int) or isinstance(storage, bool) or not 0 <= storage <= 1 << 32:
        raise _err("package.meta-type", "must be a byte count", source, "requests.storage")
    keys = raw.get("keys", [])
    if (
        not isinstance(keys, list)
        or not all(isinstance(k, str) and _KEY_RE.match(k) for k in keys)
        or len(set(keys)) != len(keys)
    ):
        raise _err("package.meta-key-name", "must be a list of distinct key names", source, "requests.keys")
    return Requests(resources, tuple(gateways), storage, tuple(keys))


def parse_meta(text: str, source: str = "M.toml") -> PackageMeta:
    """Parses the developer's ``M.toml``; unknown keys are refused, naming file and key.

    Raises:
        FormatError: ``package.meta-*``.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _err("package.meta-syntax", f"not valid TOML: {exc}", source) from None
    allowed = {
        "uuid",
        "vendor",
        "name",
        "version",
        "sequence",
        "description",
        "vendor_name",
        "requests",
        "certifications",
    }
    unknown = set(raw) - allowed
    if unknown:
        raise _err("package.meta-key", "unknown key", source, sorted(unknown)[0])
    for key in ("uuid", "vendor", "name", "version", "sequence"):
        if key not in raw:
            raise _err("package.meta-missing", "is required", source, key)
    name = _text(raw["name"], "name", source, MAX_NAME)
    if not _NAME_RE.match(name):
        raise _err(
            "package.meta-name",
            "must be lower-case letters, digits and '-', starting with a letter",
            source,
            "name",
            name,
        )
    version = _text(raw["version"], "version", source, 64)
    if not _SEMVER_RE.match(version):
        raise _err("package.meta-version", "is not a semantic version (MAJOR.MINOR.PATCH)", source, "version", version)
    sequence = raw["sequence"]
    if not isinstance(sequence, int) or isinstance(sequence, bool) or not 0 <= sequence < 1 << 63:
        raise _err("package.meta-sequence", "must be a non-negative integer", source, "sequence", sequence)
    certs = raw.get("certifications", [])
    if not isinstance(certs, list) or not all(isinstance(c, str) and 0 < len(c) <= 128 for c in certs):
        raise _err("package.meta-type", "must be a list of strings", source, "certifications")
    return PackageMeta(
        uuid=_uuid(raw["uuid"], "uuid", source),
        vendor=_uuid(raw["vendor"], "vendor", source),
        name=name,
        version=version,
        sequence=sequence,
        description=_text(raw.get("description", ""), "description", source),
        vendor_name=_text(raw.get("vendor_name", ""), "vendor_name", source, 128),
        requests=_parse_requests(raw.get("requests", {}), source),
        certifications=tuple(certs),
    )


def _metadata_bytes(meta: PackageMeta) -> bytes:
    body: dict[int, Any] = {_MK_NAME: meta.name, _MK_VERSION: meta.version}
    if meta.description:
        body[_MK_DESCRIPTION] = meta.description
    requests = meta.requests.encode()
    if requests:
        body[_MK_REQUESTS] = requests
    if meta.certifications:
        body[_MK_CERTS] = list(meta.certifications)
    if meta.vendor_name:
        body[_MK_VENDOR_NAME] = meta.vendor_name
    return cbor.dumps(body)


def _text_bytes(meta: PackageMeta) -> bytes:
    component: dict[int, str] = {2: meta.name, 6: meta.version}
    if meta.vendor_name:
        component[1] = meta.vendor_name
    lmap: dict[Any, Any] = {COMPONENT: component}
    if meta.description:
        lmap[1] = meta.description
    return cbor.dumps({"en": lmap})


def build_unsigned(meta: PackageMeta, wasm: bytes) -> tuple[bytes, dict[int, bytes], dict[str, bytes]]:
    """Builds the manifest bytes, severable members and integrated payload of a package.

    Returns:
        ``(manifest_bytes, members, integrated)`` ready for signing and
        :func:`ism.formats.suit.encode_envelope`.
    """
    image_digest = [-16, hashlib.sha256(wasm).digest()]
    shared = [
        suit.CMD_OVERRIDE_PARAMETERS,
        {
            suit.P_VENDOR_ID: meta.vendor.bytes,
            suit.P_CLASS_ID: meta.uuid.bytes,
            suit.P_IMAGE_DIGEST: cbor.dumps(image_digest),
            suit.P_IMAGE_SIZE: len(wasm),
        },
        suit.CMD_VENDOR_ID,
        REPORT,
        suit.CMD_CLASS_ID,
        REPORT,
    ]
    install = [suit.CMD_OVERRIDE_PARAMETERS, {suit.P_URI: PAYLOAD_URI}, suit.CMD_FETCH, 2, suit.CMD_IMAGE_MATCH, REPORT]
    members = {suit.TEXT: _text_bytes(meta), suit.ISM_METADATA: _metadata_bytes(meta)}
    manifest: dict[int, Any] = {
        suit.M_VERSION: 1,
        suit.M_SEQUENCE: meta.sequence,
        suit.M_COMMON: cbor.dumps({suit.C_COMPONENTS: [list(COMPONENT)], suit.C_SHARED_SEQUENCE: cbor.dumps(shared)}),
        suit.M_VALIDATE: cbor.dumps([suit.CMD_IMAGE_MATCH, REPORT]),
        suit.M_INVOKE: cbor.dumps([suit.CMD_INVOKE, 2]),
        suit.INSTALL: cbor.dumps(install),
    }
    for key, content in members.items():
        manifest[key] = suit.make_digest(content).encode()
    return cbor.dumps(manifest), members, {PAYLOAD_URI: wasm}


def _single(seq: tuple[suit.Command, ...], code: int, what: str) -> suit.Command:
    found = [c for c in seq if c.code == code]
    if len(found) != 1:
        raise FormatError("package.profile", f"{what} must appear exactly once", got=len(found))
    return found[0]


def _parameters(seq: tuple[suit.Command, ...]) -> dict[int, Any]:
    return dict(_single(seq, suit.CMD_OVERRIDE_PARAMETERS, "override-parameters").arg)


def _meta_from_member(raw: Any) -> dict[int, Any]:
    if not isinstance(raw, dict):
        raise FormatError("package.metadata", "iSM metadata must be a map")
    unknown = set(raw) - {_MK_NAME, _MK_VERSION, _MK_DESCRIPTION, _MK_REQUESTS, _MK_CERTS, _MK_VENDOR_NAME}
    if unknown:
        raise FormatError("package.metadata", "unknown key in iSM metadata", got=sorted(map(str, unknown)))
    return raw


def _requests_from_member(raw: Any) -> Requests:
    if not isinstance(raw, dict) or set(raw) - {_RK_RESOURCES, _RK_GATEWAYS, _RK_STORAGE, _RK_KEYS}:
        raise FormatError("package.metadata", "malformed requests map")
    toml_like: dict[str, Any] = {}
    if _RK_RESOURCES in raw:
        toml_like["resources"] = raw[_RK_RESOURCES]
    if _RK_GATEWAYS in raw:
        toml_like["gateways"] = raw[_RK_GATEWAYS]
    if _RK_STORAGE in raw:
        toml_like["storage"] = raw[_RK_STORAGE]
    if _RK_KEYS in raw:
        toml_like["keys"] = raw[_RK_KEYS]
    try:
        return _parse_requests(toml_like, "package metadata")
    except FormatError as exc:
        raise FormatError("package.metadata", exc.message, subject=exc.subject) from None


def claimed_identity(env: suit.Envelope) -> dict[str, Any]:
    """Best-effort identity of a package that failed its checks, for reports only.

    Nothing returned here is verified: it is what the (possibly forged)
    envelope claims, plus the SHA-256 of whatever payload it carries.
    """
    out: dict[str, Any] = {"sequence": env.manifest.sequence}
    try:
        klass = _parameters(env.manifest.shared).get(suit.P_CLASS_ID)
        if isinstance(klass, bytes) and len(klass) == 16:
            out["uuid"] = str(uuidlib.UUID(bytes=klass))
    except FormatError:
        pass
    raw = suit.member(env, suit.ISM_METADATA)
    try:
        meta = cbor.loads(raw) if raw is not None else {}
    except FormatError:
        meta = {}
    if isinstance(meta, dict):
        for key, field_name in ((_MK_NAME, "name"), (_MK_VERSION, "version")):
            if isinstance(meta.get(key), str):
                out[field_name] = meta[key][: MAX_NAME * 2]
    payload = env.integrated.get(PAYLOAD_URI)
    if payload is not None:
        out["measurement"] = hashlib.sha256(payload).hexdigest()
    return out


def read_package(env: suit.Envelope) -> Package:
    """Reads a parsed envelope as an iSM microservice package and checks its consistency.

    Raises:
        FormatError: ``package.profile`` / ``package.metadata`` / ``package.payload``.
        DigestError: ``package.payload-digest`` when the payload is not the digested one.
        ConditionError: ``package.payload-size``.
    """
    man = env.manifest
    if man.components != (COMPONENT,):
        raise FormatError(
            "package.profile",
            "a package has exactly one 'microservice' component",
            got=[b"/".join(c) for c in man.components],
        )
    params = _parameters(man.shared)
    _single(man.shared, suit.CMD_VENDOR_ID, "condition-vendor-identifier")
    _single(man.shared, suit.CMD_CLASS_ID, "condition-class-identifier")
    vendor, klass = params.get(suit.P_VENDOR_ID), params.get(suit.P_CLASS_ID)
    if not isinstance(vendor, bytes) or len(vendor) != 16 or not isinstance(klass, bytes) or len(klass) != 16:
        raise FormatError("package.profile", "vendor-id and class-id must be 16-byte UUIDs")
    raw_digest = params.get(suit.P_IMAGE_DIGEST)
    if not isinstance(raw_digest, bytes):
        raise FormatError("package.profile", "image-digest parameter missing")
    image_digest = suit.parse_digest(cbor.loads(raw_digest), "image digest")
    if image_digest.alg != -16:
        raise FormatError("package.profile", "image digest must be SHA-256", got=image_digest.alg_name)
    size = params.get(suit.P_IMAGE_SIZE)
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise FormatError("package.profile", "image-size parameter missing")
    install = man.sequences.get(suit.INSTALL)
    if install is None:
        raise FormatError("package.profile", "install sequence missing")
    if _parameters(install).get(suit.P_URI) != PAYLOAD_URI:
        raise FormatError("package.profile", f"install must fetch the integrated payload {PAYLOAD_URI}")
    _single(install, suit.CMD_FETCH, "directive-fetch")
    if set(env.integrated) != {PAYLOAD_URI}:
        raise FormatError(
            "package.payload", f"exactly one integrated payload {PAYLOAD_URI} expected", got=sorted(env.integrated)
        )
    payload = env.integrated[PAYLOAD_URI]
    if len(payload) != size:
        raise ConditionError(
            "package.payload-size", "payload size differs from image-size", got=len(payload), expected=size
        )
    measurement = hashlib.sha256(payload).digest()
    if measurement != image_digest.value:
        raise DigestError(
            "package.payload-digest",
            "payload does not match the signed image digest",
            got=measurement,
            expected=image_digest.value,
        )
    suit.check_severed(env)
    member = suit.member(env, suit.ISM_METADATA)
    if member is None:
        raise FormatError("package.metadata", "iSM metadata member is missing (severed)")
    meta = _meta_from_member(cbor.loads(member))
    name, version = meta.get(_MK_NAME), meta.get(_MK_VERSION)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise FormatError("package.metadata", "metadata name is missing or invalid", got=name)
    if not isinstance(version, str) or not _SEMVER_RE.match(version):
        raise FormatError("package.metadata", "metadata version is not semver", got=version)
    certs = meta.get(_MK_CERTS, [])
    if not isinstance(certs, list) or not all(isinstance(c, str) for c in certs):
        raise FormatError("package.metadata", "certifications must be strings")
    desc, vname = meta.get(_MK_DESCRIPTION, ""), meta.get(_MK_VENDOR_NAME, "")
    if not isinstance(desc, str) or not isinstance(vname, str):
        raise FormatError("package.metadata", "description and vendor name must be text")
    pmeta = PackageMeta(
        uuid=uuidlib.UUID(bytes=klass),
        vendor=uuidlib.UUID(bytes=vendor),
        name=name,
        version=version,
        sequence=man.sequence,
        description=desc,
        vendor_name=vname,
        requests=_requests_from_member(meta.get(_MK_REQUESTS, {})),
        certifications=tuple(certs),
    )
    return Package(env, pmeta, payload, measurement)
