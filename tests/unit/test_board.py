"""The board file: the reference board parses, and every malformed board is refused by rule and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from ism.errors import FormatError
from ism.formats.board import MODE_BITS, PERIPHERALS, Board, mode_bits, parse_board

BOARD_FILE = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token" / "board.toml"


def test_example_board_parses() -> None:
    board = parse_board(BOARD_FILE.read_text(), "board.toml")
    assert isinstance(board, Board)
    assert board.name == "fingerprint-token"
    assert set(board.resources) == {"spi.fingerprint", "gpio.led0", "uart.host", "timer", "rng", "mem.scratch"}
    sensor = board.resources["spi.fingerprint"]
    assert (sensor.peripheral, sensor.exclusive, sensor.modes) == ("fingerprint", True, frozenset({"read", "control"}))
    assert board.resources["uart.host"].exclusive
    assert board.resources["uart.host"].modes == frozenset({"read", "write", "control"})
    assert not board.resources["gpio.led0"].exclusive
    assert board.resources["rng"].modes == frozenset({"read"})
    assert board.resources["mem.scratch"].size == 4096
    for resource in board.resources.values():
        assert resource.modes <= PERIPHERALS[resource.peripheral]
        assert resource.description


def test_modes_default_to_everything_the_peripheral_supports() -> None:
    board = parse_board('name = "b"\n[resources.led]\nperipheral = "led"\n')
    assert board.resources["led"].modes == PERIPHERALS["led"]
    assert not board.resources["led"].exclusive


def test_mode_bits() -> None:
    assert MODE_BITS == {"read": 1, "write": 2, "control": 4}
    assert mode_bits(["read", "control"]) == 5
    assert mode_bits(frozenset()) == 0


def _refused(text: str, rule: str, key: str | None, source: str = "board.toml") -> FormatError:
    with pytest.raises(FormatError) as info:
        parse_board(text, source)
    assert info.value.rule == rule, str(info.value)
    assert info.value.subject == (f"{source}: {key}" if key else source)
    return info.value


GOOD_RESOURCE = '[resources.timer]\nperipheral = "timer"\n'


@pytest.mark.parametrize(
    ("text", "rule", "key"),
    [
        pytest.param('name = "b"\ncolour = "red"\n', "board.key", "colour", id="unknown-top-level-key"),
        pytest.param(
            'name = "b"\n[resources.timer]\nperipheral = "timer"\nspeed = 3\n',
            "board.key",
            "resources.timer.speed",
            id="unknown-resource-key",
        ),
        pytest.param(GOOD_RESOURCE, "board.name", "name", id="missing-name"),
        pytest.param('name = "Fingerprint Token"\n', "board.name", "name", id="bad-name"),
        pytest.param("name = 7\n", "board.name", "name", id="name-not-text"),
        pytest.param('name = "token\\n"\n', "board.name", "name", id="name-with-trailing-newline"),
        pytest.param('name = "b"\nresources = 3\n', "board.resources", "resources", id="resources-not-a-table"),
        pytest.param(
            'name = "b"\n[resources."Bad Name"]\nperipheral = "led"\n',
            "board.resource-name",
            "resources.Bad Name",
            id="bad-resource-name",
        ),
        pytest.param(
            'name = "b"\n[resources."led\\n"]\nperipheral = "led"\n',
            "board.resource-name",
            "resources.led\n",
            id="resource-name-with-trailing-newline",
        ),
        pytest.param('name = "b"\nresources = { led = 1 }\n', "board.resource", "resources.led", id="not-a-table"),
        pytest.param(
            'name = "b"\n[resources.x]\nperipheral = "teleporter"\n',
            "board.peripheral",
            "resources.x.peripheral",
            id="unknown-peripheral",
        ),
        pytest.param(
            'name = "b"\n[resources.x]\nmodes = ["read"]\n',
            "board.peripheral",
            "resources.x.peripheral",
            id="missing-peripheral",
        ),
        pytest.param(
            'name = "b"\n[resources.rng]\nperipheral = "rng"\nmodes = ["read", "write"]\n',
            "board.modes",
            "resources.rng.modes",
            id="mode-the-peripheral-does-not-support",
        ),
        pytest.param(
            'name = "b"\n[resources.s]\nperipheral = "fingerprint"\nmodes = ["write"]\n',
            "board.modes",
            "resources.s.modes",
            id="fingerprint-is-not-writable",
        ),
        pytest.param(
            'name = "b"\n[resources.u]\nperipheral = "uart"\nmodes = ["read", "read"]\n',
            "board.modes",
            "resources.u.modes",
            id="duplicate-mode",
        ),
        pytest.param(
            'name = "b"\n[resources.u]\nperipheral = "uart"\nmodes = ["execute"]\n',
            "board.modes",
            "resources.u.modes",
            id="unknown-mode",
        ),
        pytest.param(
            'name = "b"\n[resources.u]\nperipheral = "uart"\nmodes = []\n',
            "board.modes",
            "resources.u.modes",
            id="empty-modes",
        ),
        pytest.param(
            'name = "b"\n[resources.m]\nperipheral = "memory"\n',
            "board.resource",
            "resources.m.size",
            id="memory-region-without-size",
        ),
        pytest.param(
            'name = "b"\n[resources.m]\nperipheral = "memory"\nsize = 0\n',
            "board.resource",
            "resources.m.size",
            id="memory-region-of-size-zero",
        ),
        pytest.param(
            'name = "b"\n[resources.m]\nperipheral = "memory"\nsize = 16777217\n',
            "board.resource",
            "resources.m.size",
            id="memory-region-too-large",
        ),
        pytest.param(
            'name = "b"\n[resources.m]\nperipheral = "memory"\nsize = true\n',
            "board.resource",
            "resources.m.size",
            id="size-is-a-bool",
        ),
        pytest.param(
            'name = "b"\n[resources.s]\nperipheral = "fingerprint"\nexclusive = "yes"\n',
            "board.resource",
            "resources.s.exclusive",
            id="exclusive-not-bool",
        ),
        pytest.param(
            'name = "b"\n[resources.s]\nperipheral = "fingerprint"\nexclusive = 1\n',
            "board.resource",
            "resources.s.exclusive",
            id="exclusive-is-an-integer",
        ),
        pytest.param(
            'name = "b"\n[resources.s]\nperipheral = "led"\ndescription = 5\n',
            "board.resource",
            "resources.s.description",
            id="description-not-text",
        ),
        pytest.param('name = "b"\n[resources\n', "board.syntax", None, id="bad-toml"),
        pytest.param('name = "b"\nname = "c"\n', "board.syntax", None, id="duplicate-toml-key"),
    ],
)
def test_rejections_name_rule_file_and_key(text: str, rule: str, key: str | None) -> None:
    _refused(text, rule, key)


def test_subject_names_the_file_it_was_given() -> None:
    err = _refused('name = "b"\nextra = 1\n', "board.key", "extra", source="boards/token.toml")
    assert "boards/token.toml: extra" in str(err)


def test_bad_toml_message_says_so() -> None:
    err = _refused("name = \n", "board.syntax", None)
    assert "TOML" in err.message


def test_a_board_with_every_peripheral_kind() -> None:
    lines = ['name = "all-kinds"']
    for kind, modes in sorted(PERIPHERALS.items()):
        lines += [f"[resources.{kind}]", f'peripheral = "{kind}"', f"modes = {sorted(modes)!r}".replace("'", '"')]
        if kind == "memory":
            lines.append("size = 1024")
    board = parse_board("\n".join(lines) + "\n")
    assert {name: r.modes for name, r in board.resources.items()} == dict(PERIPHERALS)
