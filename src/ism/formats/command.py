"""Signed device commands: the payload of every authorised lifecycle operation.

Owns: the one format in which a product vendor (or, for a ban, the store)
tells one device to change its security lifecycle — provisioning bundles,
factory reset, decommissioning, debug-state changes and per-microservice
lifecycle actions — and its strict decoding. Signing and verification are
:mod:`ism.device.commands`; what each command does is the device's.
Must not import: crypto, device or anything above.

Payload (deterministic CBOR map, integer keys; carried in a COSE_Sign1)::

    {
      1: "ism/command/v1",     / type: nothing else is a command /
      2: tstr,                 / kind: one of KINDS /
      3: bstr,                 / instance ID (UEID) of the one device it is for /
      4: uint,                 / sequence: above the device's counter for this kind /
      5: { * tstr => any },    / arguments, checked per kind (ARGUMENTS) /
    }

Arguments per kind::

    provision      {"anchors": [{"op": "add", "role": tstr, "key": bstr (SPKI DER)}
                                / {"op": "remove", "role": tstr, "id": bstr (signer ID)}, ...]}
    factory-reset  {}
    decommission   {}
    lifecycle      {"state": tstr}                      / a PSA security lifecycle state name /
    microservice   {"uuid": bstr .size 16, "action": tstr}   / one of MS_ACTIONS /

Threat: a command replayed on another device (the instance ID binds it), or
replayed later on the same device (the sequence must exceed the device's
counter for the kind, kept with the anti-rollback counters), a command whose
arguments two parsers read differently (deterministic encoding only, unknown
keys refused), oversize argument lists. Decoding refuses all of these with
``command.format``; authorisation (who may sign which kind) is the device's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from ism.errors import FormatError
from ism.formats import cbor

__all__ = [
    "ANCHOR_OPS",
    "COMMAND_TYPE",
    "KINDS",
    "MAX_ANCHORS",
    "MAX_COMMAND_SIZE",
    "MS_ACTIONS",
    "AnchorChange",
    "Command",
    "decode_command",
]

COMMAND_TYPE: Final = "ism/command/v1"
KINDS: Final = ("provision", "factory-reset", "decommission", "lifecycle", "microservice")
#: per-microservice actions (the states they lead to are the device's business)
MS_ACTIONS: Final = ("suspend", "resume", "quarantine", "release", "remove", "ban")
ANCHOR_OPS: Final = ("add", "remove")
#: most anchor changes one provisioning bundle may carry
MAX_ANCHORS: Final = 64
#: largest signed command a device reads
MAX_COMMAND_SIZE: Final = 64 * 1024
_MAX_KEY_DER: Final = 512
_MAX_NAME: Final = 64
_UEID_MIN, _UEID_MAX = 7, 33
_MAX_SEQUENCE: Final = (1 << 63) - 1
_K_TYPE, _K_KIND, _K_INSTANCE, _K_SEQUENCE, _K_ARGS = 1, 2, 3, 4, 5
_KEYS: Final = frozenset({_K_TYPE, _K_KIND, _K_INSTANCE, _K_SEQUENCE, _K_ARGS})
#: argument names each kind requires (exactly these, no others)
ARGUMENTS: Final[dict[str, frozenset[str]]] = {
    "provision": frozenset({"anchors"}),
    "factory-reset": frozenset(),
    "decommission": frozenset(),
    "lifecycle": frozenset({"state"}),
    "microservice": frozenset({"uuid", "action"}),
}


def _bad(message: str, got: Any = None) -> FormatError:
    return FormatError("command.format", message, got=got)


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= _MAX_NAME:
        raise _bad(f"{what} must be text of 1..{_MAX_NAME} characters", value)
    return value


@dataclass(frozen=True, slots=True)
class AnchorChange:
    """One trust-anchor change in a provisioning bundle: add ``key`` or remove signer ``id`` for ``role``."""

    op: str
    role: str
    key: bytes | None = None
    id: bytes | None = None

    def __post_init__(self) -> None:
        if self.op not in ANCHOR_OPS:
            raise _bad(f"an anchor change's op is one of {list(ANCHOR_OPS)}", self.op)
        _name(self.role, "an anchor's role")
        if self.op == "add":
            if self.id is not None or not isinstance(self.key, bytes) or not 0 < len(self.key) <= _MAX_KEY_DER:
                raise _bad(f"an anchor to add carries 'key', a public key of 1..{_MAX_KEY_DER} bytes (SPKI DER)")
        elif self.key is not None or not isinstance(self.id, bytes) or len(self.id) != 32:
            raise _bad("an anchor to remove carries 'id', a 32-byte signer ID")

    def to_cbor(self) -> dict[str, Any]:
        if self.op == "add":
            return {"op": self.op, "role": self.role, "key": self.key}
        return {"op": self.op, "role": self.role, "id": self.id}


@dataclass(frozen=True, slots=True)
class Command:
    """A decoded command (not yet authorised: the signature and the counter are the device's to check).

    The constructor checks every field; :meth:`encode` is the deterministic encoding.
    """

    kind: str
    instance_id: bytes
    sequence: int
    args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise _bad(f"a command's kind is one of {list(KINDS)}", self.kind)
        if not isinstance(self.instance_id, bytes) or not _UEID_MIN <= len(self.instance_id) <= _UEID_MAX:
            raise _bad(f"instance ID must be a UEID of {_UEID_MIN}..{_UEID_MAX} bytes", self.instance_id)
        if (
            not isinstance(self.sequence, int)
            or isinstance(self.sequence, bool)
            or not 0 < self.sequence <= _MAX_SEQUENCE
        ):
            raise _bad("sequence must be a positive 63-bit integer", self.sequence)
        if not isinstance(self.args, dict) or set(self.args) != ARGUMENTS[self.kind]:
            got = sorted(map(str, self.args)) if isinstance(self.args, dict) else self.args
            raise _bad(f"a {self.kind} command takes the arguments {sorted(ARGUMENTS[self.kind])}", got)
        if self.kind == "provision":
            anchors = self.args["anchors"]
            if not isinstance(anchors, list | tuple) or not 0 < len(anchors) <= MAX_ANCHORS:
                raise _bad(f"a provisioning bundle carries 1..{MAX_ANCHORS} anchor changes")
            if not all(isinstance(a, AnchorChange) for a in anchors):
                raise _bad("anchor changes must be AnchorChange values")
        elif self.kind == "lifecycle":
            _name(self.args["state"], "a lifecycle state")
        elif self.kind == "microservice":
            uuid = self.args["uuid"]
            if not isinstance(uuid, bytes) or len(uuid) != 16:
                raise _bad("a microservice command names its microservice by a 16-byte UUID", uuid)
            if self.args["action"] not in MS_ACTIONS:
                raise _bad(f"a microservice action is one of {list(MS_ACTIONS)}", self.args["action"])

    @property
    def anchors(self) -> tuple[AnchorChange, ...]:
        """The anchor changes of a provisioning bundle (empty for other kinds)."""
        return tuple(self.args.get("anchors", ()))

    def encode(self) -> bytes:
        """The deterministic CBOR encoding (the COSE_Sign1 payload)."""
        args = dict(self.args)
        if self.kind == "provision":
            args["anchors"] = [a.to_cbor() for a in self.anchors]
        return cbor.dumps(
            {
                _K_TYPE: COMMAND_TYPE,
                _K_KIND: self.kind,
                _K_INSTANCE: self.instance_id,
                _K_SEQUENCE: self.sequence,
                _K_ARGS: args,
            }
        )


def _anchor_change(raw: Any) -> AnchorChange:
    if not isinstance(raw, dict) or not all(isinstance(k, str) for k in raw):
        raise _bad("an anchor change is a map with text keys")
    allowed = {"op", "role", "key", "id"}
    if not set(raw) <= allowed:
        raise _bad("unknown key in an anchor change", sorted(set(raw) - allowed))
    return AnchorChange(raw.get("op", ""), raw.get("role", ""), raw.get("key"), raw.get("id"))


def decode_command(data: bytes) -> Command:
    """Strictly decodes a command payload (what a command's COSE_Sign1 carries).

    Raises:
        FormatError: ``cbor.*`` if it is not CBOR; ``command.format`` for a wrong type,
            missing or unknown keys, wrong field types or sizes, arguments that do not
            fit the kind, or an encoding that is not the deterministic one.
    """
    if len(data) > MAX_COMMAND_SIZE:
        raise _bad(f"a command is at most {MAX_COMMAND_SIZE} bytes", len(data))
    raw: Any = cbor.loads(data)
    if not isinstance(raw, dict) or set(raw) != _KEYS:
        raise _bad("a command is a map with keys 1..5")
    if raw[_K_TYPE] != COMMAND_TYPE:
        raise _bad(f"not a {COMMAND_TYPE} payload", raw[_K_TYPE])
    args = raw[_K_ARGS]
    if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
        raise _bad("a command's arguments are a map with text keys")
    if raw[_K_KIND] == "provision" and isinstance(args.get("anchors"), list):
        if len(args["anchors"]) > MAX_ANCHORS:
            raise _bad(f"a provisioning bundle carries 1..{MAX_ANCHORS} anchor changes")
        args = {**args, "anchors": [_anchor_change(a) for a in args["anchors"]]}
    command = Command(raw[_K_KIND], raw[_K_INSTANCE], raw[_K_SEQUENCE], args)
    if command.encode() != bytes(data):
        raise _bad("the command is not deterministically encoded")
    return command
