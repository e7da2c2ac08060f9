"""The Microservice Access Policy: who gets which resources, gateways, keys and limits.

Owns: parsing the vendor-written policy TOML against a :class:`~ism.formats.board.Board`
into a frozen, compiled :class:`Policy` whose checks are O(1) dictionary or
set lookups (the cost is the same with 10 rules or 10,000), and the static
link check of a policy against the modules it governs.
Must not import: crypto, device or anything above.

Threat: an over-broad or ambiguous policy. Default deny: anything not
granted is absent. The parser refuses unknown keys (naming file and key),
resources the board does not have, modes a resource does not offer, an
exclusive resource granted to two microservices, duplicate names or UUIDs,
and gateways to microservices that are not in the policy;
:func:`check_modules` refuses gateways to operations the callee does not
export and modules whose imports need capabilities the policy does not grant.

Example::

    version = 1
    board = "fingerprint-token"
    [microservice.biometric]
    uuid = "..."
    resources = { "spi.fingerprint" = ["read", "control"] }
    exports = ["verify"]
    [microservice.authenticator]
    uuid = "..."
    gateways = ["biometric.verify"]
    keys = { device-2fa = { type = "ecc-p256", usage = ["sign", "export-public"] } }
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import tomllib
import uuid as uuidlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ism.errors import FormatError
from ism.formats import cbor
from ism.formats.board import MODE_BITS, Board, mode_bits
from ism.formats.wasm import WasmModule

__all__ = [
    "GATEWAY_EXPORT_PREFIX",
    "KeyGrant",
    "MicroservicePolicy",
    "Policy",
    "RestartPolicy",
    "check_module",
    "check_modules",
    "parse_policy",
    "policy_digest",
]

GATEWAY_EXPORT_PREFIX: Final = "op_"
_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9-]{0,31}\Z")
_OP_RE: Final = re.compile(r"^[a-z_][a-z0-9_]{0,31}\Z")
_KEY_RE: Final = re.compile(r"^[a-z][a-z0-9_-]{0,31}\Z")
_MS_KEYS: Final = frozenset(
    {
        "uuid",
        "resources",
        "gateways",
        "exports",
        "keys",
        "storage",
        "memory_pages",
        "fuel",
        "stack",
        "deadline_ms",
        "restart",
    }
)
_RESTART_KEYS: Final = frozenset({"policy", "max_faults", "window", "backoff_ms", "max_backoff_ms"})
RESTART_POLICIES: Final = frozenset({"backoff", "stop"})
MAX_MICROSERVICES: Final = 4096
#: The largest wasm stack limit a policy may grant: what the wasmtime engine accepts (it aborts the
#: whole process, uncatchably, when asked for a larger ``max_wasm_stack`` than its 2 MiB async stack).
MAX_STACK: Final = 2 * 1024 * 1024
WASM_PAGE: Final = 65536

# Which host functions need which capability (static check at install).
_NEEDS_RESOURCE: Final = frozenset({"resource_open", "resource_read", "resource_write", "resource_control"})
_NEEDS_KEYS: Final = frozenset(
    {
        "key_open",
        "key_sign",
        "key_verify",
        "key_encrypt",
        "key_decrypt",
        "key_mac",
        "key_export_public",
        "key_destroy",
        "identity_cert",
    }
)
_NEEDS_STORAGE: Final = frozenset({"storage_set", "storage_get", "storage_info", "storage_remove"})


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """What the supervisor does when a microservice faults."""

    policy: str = "backoff"
    max_faults: int = 3
    window: float = 60.0
    backoff_ms: int = 100
    max_backoff_ms: int = 10_000


KEY_TYPES: Final = ("ecc-p256", "aes-256", "hmac-sha256")
KEY_USAGES: Final = frozenset({"sign", "verify", "encrypt", "decrypt", "mac", "export-public"})
_DEFAULT_USAGE: Final = {
    "ecc-p256": frozenset({"sign", "verify", "export-public"}),
    "aes-256": frozenset({"encrypt", "decrypt"}),
    "hmac-sha256": frozenset({"mac"}),
}
_USAGE_FOR_TYPE: Final = {
    "ecc-p256": frozenset({"sign", "verify", "export-public"}),
    "aes-256": frozenset({"encrypt", "decrypt"}),
    "hmac-sha256": frozenset({"mac"}),
}


@dataclass(frozen=True, slots=True)
class KeyGrant:
    """A key a microservice may create and use: its type and the operations allowed on it."""

    type: str = "ecc-p256"
    usage: frozenset[str] = field(default_factory=lambda: _DEFAULT_USAGE["ecc-p256"])


@dataclass(frozen=True, slots=True)
class MicroservicePolicy:
    """Everything one microservice is granted. Absent means denied."""

    name: str
    uuid: uuidlib.UUID
    #: resource name -> granted mode bits
    resources: Mapping[str, int] = field(default_factory=dict)
    #: (callee name, operation) pairs this microservice may call
    gateways: frozenset[tuple[str, str]] = frozenset()
    #: operations this microservice offers to callers
    exports: frozenset[str] = frozenset()
    keys: Mapping[str, KeyGrant] = field(default_factory=dict)
    storage: int = 0
    memory_pages: int = 2
    fuel: int = 5_000_000
    stack: int = 256 * 1024
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    #: wall-clock budget of one activation (bounds time spent in host calls, which fuel does not)
    deadline_ms: int = 1000

    def allows(self, resource: str, bits: int) -> bool:
        """True when every bit of ``bits`` is granted on ``resource``."""
        granted = self.resources.get(resource, 0)
        return bits != 0 and granted & bits == bits


@dataclass(frozen=True, slots=True)
class Policy:
    """A compiled access policy."""

    version: int
    board: str
    by_uuid: Mapping[uuidlib.UUID, MicroservicePolicy]
    by_name: Mapping[str, MicroservicePolicy]

    def get(self, ms_uuid: uuidlib.UUID) -> MicroservicePolicy | None:
        return self.by_uuid.get(ms_uuid)


def _err(rule: str, message: str, source: str, key: str | None = None, got: Any = None) -> FormatError:
    return FormatError(rule, message, subject=f"{source}: {key}" if key else source, got=got)


def _uint(value: Any, lo: int, hi: int, rule: str, source: str, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise _err(rule, f"must be an integer in [{lo}, {hi}]", source, key, value)
    return value


def _restart(raw: Any, base: RestartPolicy, source: str, key: str) -> RestartPolicy:
    if isinstance(raw, str):
        raw = {"policy": raw}
    if not isinstance(raw, dict):
        raise _err("policy.restart", "must be a policy name or a table", source, key)
    bad = set(raw) - _RESTART_KEYS
    if bad:
        raise _err("policy.key", "unknown key", source, f"{key}.{sorted(bad)[0]}")
    policy = raw.get("policy", base.policy)
    if policy not in RESTART_POLICIES:
        raise _err(
            "policy.restart", f"policy must be one of {sorted(RESTART_POLICIES)}", source, f"{key}.policy", policy
        )
    window = raw.get("window", base.window)
    if not isinstance(window, int | float) or isinstance(window, bool) or not 0 < window <= 86400 * 365:
        raise _err("policy.restart", "window must be a positive number of seconds", source, f"{key}.window")
    backoff = _uint(raw.get("backoff_ms", base.backoff_ms), 0, 3_600_000, "policy.restart", source, f"{key}.backoff_ms")
    return RestartPolicy(
        policy=policy,
        max_faults=_uint(
            raw.get("max_faults", base.max_faults), 1, 1_000_000, "policy.restart", source, f"{key}.max_faults"
        ),
        window=float(window),
        backoff_ms=backoff,
        max_backoff_ms=_uint(
            raw.get("max_backoff_ms", max(base.max_backoff_ms, backoff)),
            backoff,
            86_400_000,
            "policy.restart",
            source,
            f"{key}.max_backoff_ms",
        ),
    )


def _string_list(value: Any, pattern: re.Pattern[str], rule: str, source: str, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and pattern.match(v) for v in value):
        raise _err(rule, "must be a list of identifiers", source, key, value)
    if len(set(value)) != len(value):
        raise _err(rule, "lists an entry twice", source, key, value)
    return value


def _key_grants(raw: Any, source: str, key: str) -> dict[str, KeyGrant]:
    """``keys = ["name", ...]`` (P-256 signing keys) or ``keys = { name = { type, usage } }``."""
    if isinstance(raw, list):
        return {name: KeyGrant() for name in _string_list(raw, _KEY_RE, "policy.key-grant", source, key)}
    if not isinstance(raw, dict):
        raise _err("policy.key-grant", "must be a list of key names or a table of key grants", source, key)
    out: dict[str, KeyGrant] = {}
    for name, spec in raw.items():
        where = f"{key}.{name}"
        if not isinstance(name, str) or not _KEY_RE.match(name):
            raise _err("policy.key-grant", "key names are lower-case identifiers", source, where)
        if not isinstance(spec, dict) or set(spec) - {"type", "usage"}:
            raise _err("policy.key-grant", "a key grant is a table with type and usage", source, where)
        ktype = spec.get("type", "ecc-p256")
        if ktype not in KEY_TYPES:
            raise _err("policy.key-grant", f"type must be one of {list(KEY_TYPES)}", source, f"{where}.type", ktype)
        usage_raw = spec.get("usage", sorted(_DEFAULT_USAGE[ktype]))
        if not isinstance(usage_raw, list) or not all(isinstance(u, str) for u in usage_raw):
            raise _err("policy.key-grant", "usage must be a list", source, f"{where}.usage")
        usage = frozenset(usage_raw)
        if not usage or not usage <= _USAGE_FOR_TYPE[ktype]:
            raise _err(
                "policy.key-grant",
                f"a {ktype} key allows usage {sorted(_USAGE_FOR_TYPE[ktype])}",
                source,
                f"{where}.usage",
                sorted(usage),
            )
        out[name] = KeyGrant(ktype, usage)
    return out


def parse_policy(text: str, board: Board, source: str = "policy.toml") -> Policy:
    """Parses and compiles a policy for ``board``.

    Raises:
        FormatError: ``policy.*`` naming the file, key and the rule broken.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _err("policy.syntax", f"not valid TOML: {exc}", source) from None
    bad = set(raw) - {"version", "board", "defaults", "microservice"}
    if bad:
        raise _err("policy.key", "unknown key", source, sorted(bad)[0])
    version = _uint(raw.get("version"), 0, (1 << 63) - 1, "policy.version", source, "version")
    if raw.get("board") != board.name:
        raise _err("policy.board", "policy is for another board", source, "board", raw.get("board"))
    defaults_raw = raw.get("defaults", {})
    if not isinstance(defaults_raw, dict):
        raise _err("policy.key", "must be a table", source, "defaults")
    bad = set(defaults_raw) - {"memory_pages", "fuel", "stack", "deadline_ms", "restart", "storage"}
    if bad:
        raise _err("policy.key", "unknown key", source, f"defaults.{sorted(bad)[0]}")
    base = MicroservicePolicy("defaults", uuidlib.UUID(int=0))
    d_pages = _uint(
        defaults_raw.get("memory_pages", base.memory_pages), 1, 65536, "policy.limits", source, "defaults.memory_pages"
    )
    d_fuel = _uint(defaults_raw.get("fuel", base.fuel), 1000, 10**12, "policy.limits", source, "defaults.fuel")
    d_stack = _uint(
        defaults_raw.get("stack", base.stack), 16 * 1024, MAX_STACK, "policy.limits", source, "defaults.stack"
    )
    d_storage = _uint(defaults_raw.get("storage", 0), 0, 1 << 32, "policy.limits", source, "defaults.storage")
    d_deadline = _uint(
        defaults_raw.get("deadline_ms", base.deadline_ms),
        10,
        3_600_000,
        "policy.limits",
        source,
        "defaults.deadline_ms",
    )
    d_restart = _restart(defaults_raw.get("restart", {}), RestartPolicy(), source, "defaults.restart")

    entries = raw.get("microservice", {})
    if not isinstance(entries, dict) or len(entries) > MAX_MICROSERVICES:
        raise _err("policy.key", "microservice must be a table of microservices", source, "microservice")
    owners: dict[str, str] = {}
    by_name: dict[str, MicroservicePolicy] = {}
    by_uuid: dict[uuidlib.UUID, MicroservicePolicy] = {}
    pending_gateways: list[tuple[str, str, str, str]] = []
    for name, spec in entries.items():
        key = f"microservice.{name}"
        if not _NAME_RE.match(name):
            raise _err("policy.name", "microservice names are lower-case identifiers", source, key)
        if not isinstance(spec, dict):
            raise _err("policy.key", "must be a table", source, key)
        bad = set(spec) - _MS_KEYS
        if bad:
            raise _err("policy.key", "unknown key", source, f"{key}.{sorted(bad)[0]}")
        try:
            ms_uuid = uuidlib.UUID(spec.get("uuid", ""))
        except (ValueError, TypeError, AttributeError):
            raise _err("policy.uuid", "needs a valid uuid", source, f"{key}.uuid", spec.get("uuid")) from None
        if ms_uuid in by_uuid:
            raise _err("policy.uuid", "two microservices share a uuid", source, f"{key}.uuid", str(ms_uuid))
        resources: dict[str, int] = {}
        res_raw = spec.get("resources", {})
        if not isinstance(res_raw, dict):
            raise _err("policy.resource", "must be a table of resource = [modes]", source, f"{key}.resources")
        for rname, modes in res_raw.items():
            rkey = f"{key}.resources.{rname}"
            resource = board.resources.get(rname)
            if resource is None:
                raise _err("policy.unknown-resource", "the board has no such resource", source, rkey)
            if isinstance(modes, str):
                modes = [modes]
            if (
                not isinstance(modes, list)
                or not modes
                or not all(isinstance(m, str) and m in MODE_BITS for m in modes)
            ):
                raise _err(
                    "policy.resource", f"modes must be a non-empty list of {sorted(MODE_BITS)}", source, rkey, modes
                )
            if not set(modes) <= resource.modes:
                raise _err(
                    "policy.resource", f"{rname} offers only {sorted(resource.modes)}", source, rkey, sorted(modes)
                )
            if resource.exclusive:
                if rname in owners:
                    raise _err(
                        "policy.exclusive",
                        f"exclusive resource {rname} is already granted to {owners[rname]}",
                        source,
                        rkey,
                    )
                owners[rname] = name
            resources[rname] = mode_bits(modes)
        for target in _string_list(
            spec.get("gateways", []),
            re.compile(r"^[a-z][a-z0-9-]*\.[a-z_][a-z0-9_]*\Z"),
            "policy.gateway",
            source,
            f"{key}.gateways",
        ):
            callee, op = target.split(".", 1)
            pending_gateways.append((name, callee, op, f"{key}.gateways"))
        exports = _string_list(spec.get("exports", []), _OP_RE, "policy.export", source, f"{key}.exports")
        keys = _key_grants(spec.get("keys", {}), source, f"{key}.keys")
        entry = MicroservicePolicy(
            name=name,
            uuid=ms_uuid,
            resources=resources,
            exports=frozenset(exports),
            keys=keys,
            storage=_uint(spec.get("storage", d_storage), 0, 1 << 32, "policy.limits", source, f"{key}.storage"),
            memory_pages=_uint(
                spec.get("memory_pages", d_pages), 1, 65536, "policy.limits", source, f"{key}.memory_pages"
            ),
            fuel=_uint(spec.get("fuel", d_fuel), 1000, 10**12, "policy.limits", source, f"{key}.fuel"),
            stack=_uint(spec.get("stack", d_stack), 16 * 1024, MAX_STACK, "policy.limits", source, f"{key}.stack"),
            restart=_restart(spec.get("restart", {}), d_restart, source, f"{key}.restart"),
            deadline_ms=_uint(
                spec.get("deadline_ms", d_deadline), 10, 3_600_000, "policy.limits", source, f"{key}.deadline_ms"
            ),
        )
        by_name[name] = entry
        by_uuid[ms_uuid] = entry
    gateways: dict[str, set[tuple[str, str]]] = {}
    for caller, callee, op, key in pending_gateways:
        callee_entry = by_name.get(callee)
        if callee_entry is None:
            raise _err("policy.gateway", f"gateway to unknown microservice {callee}", source, key)
        if op not in callee_entry.exports:
            raise _err("policy.gateway", f"{callee} does not offer operation {op} (not in its exports)", source, key)
        if callee == caller:
            raise _err("policy.gateway", "a microservice may not grant itself a gateway", source, key)
        gateways.setdefault(caller, set()).add((callee, op))
    for name, grants in gateways.items():
        new = dataclasses.replace(by_name[name], gateways=frozenset(grants))
        by_name[name] = new
        by_uuid[new.uuid] = new
    return Policy(version, board.name, by_uuid, by_name)


def policy_digest(entry: MicroservicePolicy) -> bytes:
    """SHA-256 of the deterministic CBOR of a microservice's compiled policy entry (attested as ms-policy-digest)."""
    restart = entry.restart
    body = {
        "name": entry.name,
        "uuid": entry.uuid.bytes,
        "resources": dict(entry.resources),
        "gateways": sorted(f"{callee}.{op}" for callee, op in entry.gateways),
        "exports": sorted(entry.exports),
        "keys": {name: [grant.type, sorted(grant.usage)] for name, grant in entry.keys.items()},
        "limits": [entry.storage, entry.memory_pages, entry.fuel, entry.stack, entry.deadline_ms],
        "restart": [
            restart.policy,
            restart.max_faults,
            str(restart.window),
            restart.backoff_ms,
            restart.max_backoff_ms,
        ],
    }
    return hashlib.sha256(cbor.dumps(body)).digest()


def check_module(entry: MicroservicePolicy, module: WasmModule) -> None:
    """Static check of one module against its policy entry.

    Refuses a granted operation the module does not export as
    ``op_<operation>(i32, i32) -> i32`` (or without ``gateway_buffer``), and a
    module that imports host functions whose capability the policy does not
    grant it.

    Raises:
        FormatError: ``policy.gateway`` / ``policy.capability``.
    """
    for op in sorted(entry.exports):
        ftype = module.export_type(GATEWAY_EXPORT_PREFIX + op)
        if ftype is None or ftype.params != ("i32", "i32") or ftype.results != ("i32",):
            raise FormatError(
                "policy.gateway",
                f"{entry.name} does not export {GATEWAY_EXPORT_PREFIX}{op}(i32, i32) -> i32",
                subject=entry.name,
            )
    if entry.exports:
        ftype = module.export_type("gateway_buffer")
        if ftype is None or ftype.params != () or ftype.results != ("i32",):
            raise FormatError(
                "policy.gateway",
                f"{entry.name} offers operations but does not export gateway_buffer() -> i32",
                subject=entry.name,
            )
    imported = {imp.name for imp in module.imports if imp.module == "ism"}
    needs = []
    if imported & _NEEDS_RESOURCE and not entry.resources:
        needs.append("resources (imports resource_*)")
    if "gateway_call" in imported and not entry.gateways:
        needs.append("gateways (imports gateway_call)")
    if imported & _NEEDS_KEYS and not entry.keys:
        needs.append("keys (imports key_* or identity_cert)")
    if imported & _NEEDS_STORAGE and not entry.storage:
        needs.append("storage (imports storage_*)")
    if "random" in imported and "rng" not in entry.resources:
        needs.append("rng (imports random)")
    if needs:
        raise FormatError(
            "policy.capability",
            f"{entry.name} imports host functions its policy does not grant: {', '.join(needs)}",
            subject=entry.name,
        )


def check_modules(policy: Policy, modules: Mapping[uuidlib.UUID, WasmModule]) -> None:
    """:func:`check_module` for every module the policy names."""
    for ms_uuid, module in modules.items():
        entry = policy.get(ms_uuid)
        if entry is not None:
            check_module(entry, module)
