"""Authorising signed device commands: who signed it, for which device, and is it fresh.

Owns: signing a :class:`~ism.formats.command.Command` (vendor tooling) and
the device-side check every lifecycle operation starts with —
:func:`authorise` — plus :func:`consume`, which advances the command's
anti-rollback counter once its effect is durable. What a command *does* is
the caller's (provisioning, reset, decommission, lifecycle transitions).
Must not import: hypervisor, services, cli.

Threat: an unauthorised party resetting, decommissioning or re-provisioning
a device, or a genuine command used twice or on another device. A command
must be a COSE_Sign1 whose ``kid`` names a trust anchor of a role allowed
for its kind (``vendor``; ``store`` may also ban a microservice), whose
signature verifies before its payload is decoded, whose instance ID is this
device's (compared in constant time) and whose sequence is above the
device's counter for the kind and the signer's role (``command.<kind>`` for
the vendor, ``command.<kind>.store`` for the store). The counter moves only after the
effect is durable (:func:`consume`): a power cut in between leaves the
command valid, so it can be applied again — every effect must therefore be
idempotent.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Final

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, anchor_map, signer_id
from ism.errors import RollbackError, SignatureError, TrustError, UntrustedSignerError, UsageError
from ism.formats.command import MAX_COMMAND_SIZE, Command, decode_command

if TYPE_CHECKING:
    from ism.device.virtual import Device

__all__ = ["CONTENT_TYPE", "authorise", "authorise_signed", "consume", "counter_name", "sign_command", "signer_roles"]

CONTENT_TYPE: Final = "application/ism-command+cbor"


def signer_roles(command: Command) -> tuple[str, ...]:
    """The trust-anchor roles whose keys may sign ``command``."""
    if command.kind == "microservice" and command.args["action"] == "ban":
        return ("vendor", "store")
    return ("vendor",)


def counter_name(kind: str, role: str = "vendor") -> str:
    """The anti-rollback counter that orders commands of ``kind`` signed by a ``role`` anchor.

    Each signer role has counters of its own, so one role cannot use up another's sequence
    space (a store ban at the largest sequence would otherwise block every later vendor
    command of its kind).
    """
    return f"command.{kind}" if role == "vendor" else f"command.{kind}.{role}"


def sign_command(command: Command, key: PrivateKey) -> bytes:
    """The signed command (COSE_Sign1, the signer's ID as ``kid``)."""
    return cose.sign1(command.encode(), key, kid=signer_id(key), protected={cose.HDR_CONTENT_TYPE: CONTENT_TYPE})


def authorise(device: Device, data: bytes, kind: str) -> Command:
    """Checks a signed command of ``kind`` for ``device``; returns it, without applying it.

    For kinds only a vendor may sign; see :func:`authorise_signed` for the signer's role.
    """
    return authorise_signed(device, data, kind)[0]


def authorise_signed(device: Device, data: bytes, kind: str) -> tuple[Command, str]:
    """Checks a signed command of ``kind`` for ``device``; returns it and its signer's role, without applying it.

    Raises:
        FormatError: ``command.format`` (not a COSE_Sign1 with an embedded payload,
            too large, or a malformed payload).
        UsageError: ``command.kind`` (a valid command of another kind).
        UntrustedSignerError: ``command.signer`` (no anchor of an allowed role has the ``kid``).
        SignatureError: ``command.signature``.
        TrustError: ``command.device`` (made for another device).
        RollbackError: ``command.replay`` (sequence not above the counter: old or replayed).
    """
    msg, payload = cose.parse_typed_sign1(data, CONTENT_TYPE, MAX_COMMAND_SIZE, "command.format", "a signed command")
    kid = msg.kid or b""
    # The signature is checked before the payload is decoded, against every role that could sign a command.
    anchors = {role: anchor_map(device.anchors(role)) for role in ("vendor", "store")}
    key = next((a[kid] for a in anchors.values() if kid in a), None)
    if key is None:
        raise UntrustedSignerError(
            "command.signer", "the command is not signed by a vendor or store anchor of this device", got=kid.hex()
        )
    try:
        cose.verify_sign1(msg, key)
    except SignatureError as exc:
        raise SignatureError("command.signature", "the command's signature does not verify") from exc
    command = decode_command(payload)
    if command.kind != kind:
        raise UsageError("command.kind", f"this is a {command.kind} command, not {kind}", got=command.kind)
    role = next((r for r in signer_roles(command) if kid in anchors[r]), None)
    if role is None:
        raise UntrustedSignerError(
            "command.signer", f"a {command.kind} command must be signed by a {'/'.join(signer_roles(command))} anchor"
        )
    if not hmac.compare_digest(command.instance_id, device.instance_id):
        raise TrustError("command.device", "the command was made for another device", got=command.instance_id.hex())
    current = device.counters().get(counter_name(kind, role), 0)
    if command.sequence <= current:
        raise RollbackError(
            "command.replay",
            "the command's sequence is not above the device's counter (older, or replayed)",
            got=command.sequence,
            expected=f"> {current}",
        )
    return command, role


def consume(device: Device, command: Command, role: str = "vendor") -> None:
    """Advances the counter of the command's kind and signer role: call once its effect is durable."""
    device.advance_counter(counter_name(command.kind, role), command.sequence)
