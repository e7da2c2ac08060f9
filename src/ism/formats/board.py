"""The board file: which logical resources exist on this device and what they map to.

Owns: parsing the human-written board TOML into a frozen :class:`Board`.
Must not import: crypto, device or anything above.

Threat: a resource that silently does not exist, or an ignored field that
was meant as a restriction. The parser refuses unknown keys (naming file and
key), unknown peripheral kinds, and modes a peripheral does not support.

Example::

    name = "fingerprint-token"
    [resources."spi.fingerprint"]
    peripheral = "fingerprint"
    exclusive = true
    modes = ["read", "control"]
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from ism.errors import FormatError

__all__ = ["MODE_BITS", "PERIPHERALS", "Board", "Resource", "mode_bits", "parse_board"]

MODE_BITS: Final[Mapping[str, int]] = {"read": 1, "write": 2, "control": 4}
#: peripheral kind -> modes it can support
PERIPHERALS: Final[Mapping[str, frozenset[str]]] = {
    "fingerprint": frozenset({"read", "control"}),
    "led": frozenset({"read", "write"}),
    "uart": frozenset({"read", "write", "control"}),
    "timer": frozenset({"read", "control"}),
    "rng": frozenset({"read"}),
    "memory": frozenset({"read", "write"}),
}
_NAME_RE: Final = re.compile(r"^[a-z][a-z0-9_-]*(\.[a-z0-9_-]+)*\Z")
_RESOURCE_KEYS: Final = frozenset({"peripheral", "exclusive", "modes", "size", "description"})
MAX_RESOURCES: Final = 4096


@dataclass(frozen=True, slots=True)
class Resource:
    """One logical resource of the board."""

    name: str
    peripheral: str
    exclusive: bool
    modes: frozenset[str]
    size: int = 0
    description: str = ""


@dataclass(frozen=True, slots=True)
class Board:
    """The board: a name and its logical resources."""

    name: str
    resources: Mapping[str, Resource] = field(default_factory=dict)


def mode_bits(modes: frozenset[str] | tuple[str, ...] | list[str]) -> int:
    """The bitmask of a set of access modes."""
    bits = 0
    for m in modes:
        bits |= MODE_BITS[m]
    return bits


def _err(rule: str, message: str, source: str, key: str | None = None, got: Any = None) -> FormatError:
    return FormatError(rule, message, subject=f"{source}: {key}" if key else source, got=got)


def _modes(value: Any, source: str, key: str) -> frozenset[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(m, str) and m in MODE_BITS for m in value):
        raise _err("board.modes", f"modes must be a non-empty list of {sorted(MODE_BITS)}", source, key, value)
    if len(set(value)) != len(value):
        raise _err("board.modes", "lists a mode twice", source, key, value)
    return frozenset(value)


def parse_board(text: str, source: str = "board.toml") -> Board:
    """Parses a board file.

    Raises:
        FormatError: ``board.*`` naming the file and key.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _err("board.syntax", f"not valid TOML: {exc}", source) from None
    unknown = set(raw) - {"name", "resources", "description"}
    if unknown:
        raise _err("board.key", "unknown key", source, sorted(unknown)[0])
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _err("board.name", "board needs a name (lower-case identifier)", source, "name", name)
    resources_raw = raw.get("resources", {})
    if not isinstance(resources_raw, dict) or len(resources_raw) > MAX_RESOURCES:
        raise _err("board.resources", "resources must be a table", source, "resources")
    resources: dict[str, Resource] = {}
    for rname, spec in resources_raw.items():
        key = f"resources.{rname}"
        if not _NAME_RE.match(rname) or len(rname) > 64:
            raise _err("board.resource-name", "is not a logical resource name", source, key)
        if not isinstance(spec, dict):
            raise _err("board.resource", "must be a table", source, key)
        bad = set(spec) - _RESOURCE_KEYS
        if bad:
            raise _err("board.key", "unknown key", source, f"{key}.{sorted(bad)[0]}")
        peripheral = spec.get("peripheral")
        if not isinstance(peripheral, str) or peripheral not in PERIPHERALS:
            raise _err(
                "board.peripheral",
                f"peripheral must be one of {sorted(PERIPHERALS)}",
                source,
                f"{key}.peripheral",
                peripheral,
            )
        modes = _modes(spec.get("modes", sorted(PERIPHERALS[peripheral])), source, f"{key}.modes")
        if not modes <= PERIPHERALS[peripheral]:
            raise _err(
                "board.modes",
                f"a {peripheral} supports only {sorted(PERIPHERALS[peripheral])}",
                source,
                f"{key}.modes",
                sorted(modes),
            )
        exclusive = spec.get("exclusive", False)
        size = spec.get("size", 0)
        description = spec.get("description", "")
        if not isinstance(exclusive, bool):
            raise _err("board.resource", "exclusive must be true or false", source, f"{key}.exclusive")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= 1 << 24:
            raise _err("board.resource", "size must be a byte count up to 16 MiB", source, f"{key}.size")
        if peripheral == "memory" and size == 0:
            raise _err("board.resource", "a memory region needs a size", source, f"{key}.size")
        if not isinstance(description, str):
            raise _err("board.resource", "description must be text", source, f"{key}.description")
        resources[rname] = Resource(rname, peripheral, exclusive, modes, size, description)
    return Board(name, resources)
