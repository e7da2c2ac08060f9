"""``ism device lock | provision | factory-reset | decommission | lifecycle | statement``: the device lifecycle.

Thin: read the files, call :mod:`ism.device.lifecycle` or :mod:`ism.maintenance`,
print. Refusals are :class:`~ism.errors.IsmError` and reach ``ism.cli.main``'s
one-line error handler.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ism.cli._io import read_file, write_file
from ism.crypto.keys import load_public
from ism.crypto.statement import MAX_STATEMENT_SIZE, verify_statement
from ism.device.lifecycle import lock, log_json, provision
from ism.device.virtual import Device
from ism.formats.command import MAX_COMMAND_SIZE

__all__ = ["add_lifecycle_commands", "format_log"]

AddCommand = Callable[..., argparse.ArgumentParser]


def _emit(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj, indent=2) if getattr(args, "json", False) else text)


def _when(seconds: int) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def format_log(entries: list[dict[str, Any]]) -> list[str]:
    """One line per lifecycle log entry."""
    lines = []
    for e in entries:
        change = e["to"] if e["from"] == e["to"] else f"{e['from']} -> {e['to']}"
        command = f" command {e['command'][:16]}... seq {e['command_sequence']}" if e["command"] else ""
        lines.append(f"  #{e['sequence']} {_when(e['time'])} {e['event']:13} {change}: {e['reason']}{command}")
    return lines


def _command(path: Path) -> bytes:
    return read_file(path, "signed command", MAX_COMMAND_SIZE)


def cmd_device_lock(args: argparse.Namespace) -> None:
    with Device(args.dir) as dev:
        entry = lock(dev)
    _emit(
        args,
        entry.to_json(),
        f"locked {args.dir}: {entry.from_state} -> {entry.to_state} (lifecycle entry {entry.sequence}); "
        "trust anchors now change only through signed provisioning bundles",
    )


def cmd_device_provision(args: argparse.Namespace) -> None:
    data = read_file(args.bundle, "provisioning bundle", MAX_COMMAND_SIZE)
    with Device(args.dir) as dev:
        done = provision(dev, data)
    lines = [f"applied provisioning bundle (sequence {done.command.sequence}) to {args.dir}"]
    lines += [f"  + {role:12} {sid}" for role, sid in done.added]
    lines += [f"  - {role:12} {sid}" for role, sid in done.removed]
    _emit(args, done.to_json(), "\n".join(lines))


def cmd_device_factory_reset(args: argparse.Namespace) -> None:
    from ism.maintenance import factory_reset

    with Device(args.dir) as dev:
        done = factory_reset(dev, _command(args.command))
    _emit(
        args,
        done.to_json(),
        f"factory reset {args.dir}: {len(done.keys)} key(s) destroyed, {len(done.files)} file(s) removed; "
        f"counters, trust anchors, policy and device keys kept; state {done.entry.to_state}",
    )


def cmd_device_decommission(args: argparse.Namespace) -> None:
    from ism.maintenance import decommission

    with Device(args.dir) as dev:
        done = decommission(dev, _command(args.command))
    assert done.statement is not None
    if args.out:
        write_file(args.out, done.statement)
    where = f" and {args.out}" if args.out else ""
    _emit(
        args,
        {**done.to_json(), "statement": str(args.out) if args.out else None},
        f"decommissioned {args.dir}: {len(done.keys)} key(s) destroyed, {len(done.files)} file(s) removed\n"
        f"final statement signed by the attestation key: state/decommission.cose{where} "
        "(verify: ism device statement verify STATEMENT --key keys/iak.pub.pem)",
    )


def cmd_device_lifecycle(args: argparse.Namespace) -> None:
    with Device(args.dir) as dev:
        if args.command:
            from ism.maintenance import apply_lifecycle_command

            entry = apply_lifecycle_command(dev, _command(args.command))
            regenerated = (
                "; re-provisioned: device keys regenerated, microservice data and keys erased, the protected "
                "policy removed (seal a new one to the new policy key)"
                if entry.from_state == "recoverable-psa-rot-debug"
                else ""
            )
            _emit(
                args,
                entry.to_json(),
                f"{entry.from_state} -> {entry.to_state} (lifecycle entry {entry.sequence}){regenerated}",
            )
            return
        entries = log_json(dev)
        state = dev.lifecycle_state
    _emit(
        args,
        {"valid": True, "state": state, "head": entries[-1]["digest"], "entries": entries},
        "\n".join(
            [
                f"lifecycle log of {args.dir}: {len(entries)} entries; MAC, hash chain, transitions and "
                f"counter verify; state {state}",
                *format_log(entries),
                f"  head {entries[-1]['digest']}",
            ]
        ),
    )


def cmd_device_statement_verify(args: argparse.Namespace) -> None:
    statement = verify_statement(
        read_file(args.statement, "statement", MAX_STATEMENT_SIZE), load_public(args.key)
    ).to_json()
    erased = statement["erased"]
    _emit(
        args,
        {"valid": True, **statement},
        f"OK decommission statement verifies: device {statement['instance_id'][:18]}... decommissioned at "
        f"{_when(statement['time'])}\n  lifecycle entry {statement['sequence']}, head {statement['head']}\n"
        f"  command {statement['command']}\n"
        f"  erased {len(erased['keys'])} key(s): {', '.join(erased['keys'])}\n"
        f"  removed {len(erased['files'])} file(s)",
    )


def add_lifecycle_commands(device: Any, add: AddCommand) -> None:
    """Adds the lifecycle subcommands to ``ism device``.

    Args:
        device: the ``ism device`` subparsers action.
        add: ``ism.cli.main``'s helper ``add(parent, name, func, help_, json_opt=True)``.
    """
    lk = add(
        device,
        "lock",
        cmd_device_lock,
        "factory step: psa-rot-provisioning -> secured (trust anchors then change only by signed bundles)",
    )
    lk.add_argument("dir", type=Path)
    pr = add(device, "provision", cmd_device_provision, "apply a signed provisioning bundle (ism provision bundle)")
    pr.add_argument("dir", type=Path)
    pr.add_argument("bundle", type=Path)
    fr = add(
        device,
        "factory-reset",
        cmd_device_factory_reset,
        "crypto-erase every microservice's data and keys and its packages (signed factory-reset command)",
    )
    fr.add_argument("dir", type=Path)
    fr.add_argument("--command", type=Path, required=True, help="the signed command (ism provision command)")
    dc = add(
        device,
        "decommission",
        cmd_device_decommission,
        "retire the device for good: a signed final statement, then every key destroyed (signed command)",
    )
    dc.add_argument("dir", type=Path)
    dc.add_argument("--command", type=Path, required=True, help="the signed command (ism provision command)")
    dc.add_argument("--out", type=Path, help="also write the final statement here")
    lc = add(
        device,
        "lifecycle",
        cmd_device_lifecycle,
        "apply a signed lifecycle command (debug states), or print and verify the lifecycle log",
    )
    lc.add_argument("dir", type=Path)
    what = lc.add_mutually_exclusive_group(required=True)
    what.add_argument("--command", type=Path, help="the signed lifecycle command (ism provision command lifecycle)")
    what.add_argument("--log", action="store_true", help="print the lifecycle log and verify its chain")
    st = device.add_parser("statement", help="decommission statements").add_subparsers(
        dest="statement_sub", required=True, metavar="SUBCOMMAND"
    )
    sv = add(st, "verify", cmd_device_statement_verify, "verify a decommission statement with the device's IAK")
    sv.add_argument("statement", type=Path)
    sv.add_argument("--key", type=Path, required=True, help="the device's attestation public key (PEM)")
