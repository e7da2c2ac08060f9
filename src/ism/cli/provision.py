"""``ism provision bundle | command``: the vendor's tool for signed device commands.

Thin: builds a :class:`~ism.formats.command.Command` from the arguments,
signs it with the vendor's key (:func:`~ism.device.commands.sign_command`)
and writes it. The device checks everything again (``ism device provision``,
``factory-reset``, ``decommission``, ``lifecycle``, ``microservice``).
The default sequence is the current Unix time in milliseconds: monotonic
enough for one vendor tool, and printed so it can be recorded.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ism.cli._io import write_file
from ism.crypto.keys import load_private, load_public, public_pem, signer_id
from ism.device.commands import sign_command
from ism.device.virtual import ANCHOR_ROLES, Device
from ism.errors import UsageError
from ism.formats.command import MS_ACTIONS, AnchorChange, Command

__all__ = ["add_provision_commands"]

AddCommand = Callable[..., argparse.ArgumentParser]
#: kinds ``ism provision command`` makes (bundles have their own subcommand)
COMMAND_KINDS = ("factory-reset", "decommission", "lifecycle", "microservice")


def _instance(args: argparse.Namespace) -> bytes:
    if args.device is not None:
        with Device(args.device) as dev:
            return dev.instance_id
    try:
        return bytes.fromhex(args.device_id)
    except ValueError:
        raise UsageError("cli.argument", "--device-id must be the device's instance ID in hex") from None


def _sequence(args: argparse.Namespace) -> int:
    return int(args.sequence) if args.sequence is not None else time.time_ns() // 1_000_000


def _role_and(value: str, what: str) -> tuple[str, str]:
    role, sep, rest = value.partition(":")
    if not sep or role not in ANCHOR_ROLES or not rest:
        raise UsageError("cli.argument", f"{what} is ROLE:{'PUB.pem' if what == '--add' else 'SIGNERIDHEX'}, "
                         f"ROLE one of {list(ANCHOR_ROLES)}", got=value)  # fmt: skip
    return role, rest


def _spki_der(path: Path) -> bytes:
    pem = public_pem(load_public(path))
    return base64.b64decode(b"".join(line for line in pem.splitlines() if not line.startswith(b"-----")))


def _sign_and_write(args: argparse.Namespace, command: Command, extra: dict[str, Any]) -> None:
    key = load_private(args.sign)
    write_file(args.out, sign_command(command, key))
    result = {
        "out": str(args.out),
        "kind": command.kind,
        "instance_id": command.instance_id.hex(),
        "sequence": command.sequence,
        "signer": signer_id(key).hex(),
        **extra,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"wrote {args.out}: signed {command.kind} command for device {command.instance_id.hex()[:18]}..., "
            f"sequence {command.sequence}"
        )


def cmd_provision_bundle(args: argparse.Namespace) -> None:
    changes: list[AnchorChange] = []
    for value in args.add or []:
        role, path = _role_and(value, "--add")
        changes.append(AnchorChange("add", role, key=_spki_der(Path(path))))
    for value in args.remove or []:
        role, hexid = _role_and(value, "--remove")
        try:
            sid = bytes.fromhex(hexid)
        except ValueError:
            sid = b""
        if len(sid) != 32:
            raise UsageError("cli.argument", "--remove names a signer ID: 64 hex digits", got=hexid)
        changes.append(AnchorChange("remove", role, id=sid))
    if not changes:
        raise UsageError("cli.argument", "a bundle needs at least one --add or --remove")
    command = Command("provision", _instance(args), _sequence(args), {"anchors": changes})
    summary = [{"op": c.op, "role": c.role} for c in changes]
    _sign_and_write(args, command, {"anchors": summary})


def cmd_provision_command(args: argparse.Namespace) -> None:
    arguments: dict[str, Any] = {}
    if args.kind == "lifecycle":
        if not args.state:
            raise UsageError("cli.argument", "a lifecycle command needs --state (a PSA security lifecycle state)")
        arguments = {"state": args.state}
    elif args.kind == "microservice":
        if not (args.uuid and args.action):
            raise UsageError("cli.argument", "a microservice command needs --uuid and --action")
        try:
            ms = uuidlib.UUID(args.uuid)
        except ValueError:
            raise UsageError("cli.argument", "--uuid is not a UUID", got=args.uuid) from None
        arguments = {"uuid": ms.bytes, "action": args.action}
    if (args.state and args.kind != "lifecycle") or ((args.uuid or args.action) and args.kind != "microservice"):
        raise UsageError("cli.argument", f"--state is for lifecycle, --uuid/--action for microservice: not {args.kind}")
    command = Command(args.kind, _instance(args), _sequence(args), arguments)
    _sign_and_write(args, command, {k: str(uuidlib.UUID(bytes=v)) if k == "uuid" else v for k, v in arguments.items()})


def _target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sign", type=Path, required=True, help="the vendor's signing key (private PEM)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--device-id", help="the device's instance ID (hex, from 'ism device info')")
    who.add_argument("--device", type=Path, help="a device directory to read the instance ID from")
    parser.add_argument(
        "--sequence", type=int, help="above the device's counter for this kind (default: Unix time in ms)"
    )
    parser.add_argument("--out", type=Path, required=True)


def add_provision_commands(subparsers: Any, add: AddCommand) -> None:
    """Adds ``ism provision ...`` to the top-level ``subparsers``.

    Args:
        subparsers: the top-level subparsers action of the ``ism`` parser.
        add: ``ism.cli.main``'s helper ``add(parent, name, func, help_, json_opt=True)``.
    """
    group = subparsers.add_parser("provision", help="the vendor's signed device commands").add_subparsers(
        dest="sub", required=True, metavar="SUBCOMMAND"
    )
    bundle = add(
        group,
        "bundle",
        cmd_provision_bundle,
        "sign a provisioning bundle: trust anchors to add or remove on one device",
    )
    _target(bundle)
    bundle.add_argument(
        "--add", action="append", metavar="ROLE:PUB.pem", help=f"add an anchor; ROLE one of {list(ANCHOR_ROLES)}"
    )
    bundle.add_argument("--remove", action="append", metavar="ROLE:SIGNERIDHEX", help="remove an anchor")
    command = add(
        group,
        "command",
        cmd_provision_command,
        "sign a factory-reset, decommission, lifecycle or microservice command for one device",
    )
    command.add_argument("kind", choices=COMMAND_KINDS)
    _target(command)
    command.add_argument("--state", help="lifecycle: the state to move to (e.g. non-psa-rot-debug)")
    command.add_argument("--uuid", help="microservice: its UUID")
    command.add_argument("--action", choices=MS_ACTIONS, help="microservice: what to do")
