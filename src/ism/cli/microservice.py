"""``ism device microservice`` and ``ism device microservices``: the per-microservice lifecycle.

Thin: reads the signed command, calls :func:`ism.device.microservices.apply_command`
(authorise, transition, erase through :func:`ism.runtime.erase_microservice`,
consume) and prints; lists each microservice's persisted state.

Threat: none of its own — every decision is the device's (who signed the
command, for which device, whether it is fresh, whether the transition is
legal). Bad input ends in one ``error: [CODE rule] message`` line.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ism.cli._io import read_file
from ism.device.microservices import FILE, MicroserviceStates, apply_command
from ism.device.virtual import Device
from ism.errors import IsmError
from ism.formats.command import MAX_COMMAND_SIZE

__all__ = ["LifecycleWatch", "add_microservice_commands"]

if TYPE_CHECKING:
    from ism.runtime import Runtime

Add = Callable[..., argparse.ArgumentParser]


class LifecycleWatch:
    """For ``ism device run``: applies lifecycle commands given to the running device from another process.

    :meth:`check` (between two supervisor steps) looks at ``DIR/state/microservices.cose``
    and, when it changed, calls :meth:`ism.runtime.Runtime.apply_lifecycle`.
    """

    def __init__(self, runtime: Runtime, quiet: bool = False) -> None:
        self.runtime = runtime
        self.quiet = quiet
        self.path = runtime.device.root / "state" / FILE
        self.stamp = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size

    def check(self) -> dict[str, list[str]] | None:
        """Applies the stored lifecycle if the file changed; returns what changed (None: nothing to do)."""
        stamp = self._stamp()
        if stamp == self.stamp:
            return None
        self.stamp = stamp
        try:
            outcome = self.runtime.apply_lifecycle()
        except IsmError as exc:
            print(f"lifecycle not applied: {exc}", file=sys.stderr, flush=True)
            return None
        if not self.quiet and any(outcome.values()):
            changes = ", ".join(f"{k}: {', '.join(v)}" for k, v in outcome.items() if v)
            print(f"microservice lifecycle applied ({changes})", flush=True)
        return outcome


def _print(args: argparse.Namespace, obj: dict[str, Any], text: str) -> None:
    print(json.dumps(obj, indent=2) if args.json else text)


def cmd_device_microservice(args: argparse.Namespace) -> None:
    from ism.runtime import erase_microservice

    data = read_file(args.command, "command", MAX_COMMAND_SIZE)
    with Device(args.dir) as dev:
        try:
            command, record = apply_command(dev, data, functools.partial(erase_microservice, dev))
        except IsmError as exc:
            if args.json:
                print(json.dumps({"valid": False, "command": str(args.command), **exc.to_dict()}, indent=2))
            raise
    ms = str(uuidlib.UUID(bytes=command.args["uuid"]))
    action = command.args["action"]
    erased = (
        " (its package, sealed boot record, storage and keys are gone)" if record.state in ("removed", "banned") else ""
    )
    _print(
        args,
        {"valid": True, "uuid": ms, "action": action, "sequence": command.sequence, **record.to_json()},
        f"{action}: microservice {ms} is {record.state}{erased}",
    )


def cmd_device_microservices(args: argparse.Namespace) -> None:
    from ism.runtime import erase_microservice

    with Device(args.dir) as dev:
        states = MicroserviceStates(dev)
        states.roll_forward(functools.partial(erase_microservice, dev))  # a removal cut short: finish it
        listing = states.listing()
    lines = [f"{len(listing)} microservice(s)"]
    for e in listing:
        since = e["since"] or "-"
        lines.append(f"  {e['name'] or '?':14} {e['uuid']}  {e['state']:11} since {since:25}  {e['reason']}")
    _print(args, {"microservices": listing}, "\n".join(lines))


def add_microservice_commands(device_sub: Any, add: Add) -> None:
    """Registers ``device microservice`` and ``device microservices`` under ``ism device``."""
    ms = add(
        device_sub,
        "microservice",
        cmd_device_microservice,
        "apply a signed microservice lifecycle command (suspend, resume, quarantine, release, remove, ban)",
    )
    ms.add_argument("dir", type=Path)
    ms.add_argument("--command", type=Path, required=True, help="the signed command (COSE_Sign1)")
    lst = add(device_sub, "microservices", cmd_device_microservices, "list each microservice's lifecycle state")
    lst.add_argument("dir", type=Path)
