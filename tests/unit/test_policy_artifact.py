"""The policy artifact's payload (``ism/policy/v1``): deterministic encoding and strict decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ism.errors import ErrorCode, FormatError
from ism.formats import cbor
from ism.formats.policy_artifact import MAX_TEXT, POLICY_TYPE, PolicyPayload, decode_payload, make_payload

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fingerprint-token"
BOARD_TEXT = (EXAMPLE / "board.toml").read_text()
POLICY_TEXT = (EXAMPLE / "policy.toml").read_text()
INSTANCE = bytes([0x01]) + bytes(range(32))


def _raw(**changes: Any) -> dict[int, Any]:
    raw: dict[int, Any] = {1: POLICY_TYPE, 2: 1, 3: INSTANCE, 4: BOARD_TEXT, 5: POLICY_TEXT}
    for key, value in changes.items():
        index = {"type": 1, "version": 2, "instance": 3, "board": 4, "policy": 5}[key]
        if value is None:
            del raw[index]
        else:
            raw[index] = value
    return raw


def test_make_payload_takes_the_version_from_the_policy_and_round_trips() -> None:
    payload = make_payload(BOARD_TEXT, POLICY_TEXT.replace("version = 1", "version = 7"), INSTANCE)
    assert payload.version == 7
    data = payload.encode()
    assert decode_payload(data) == payload
    assert cbor.loads(data)[1] == "ism/policy/v1"
    board, policy = decode_payload(data).compile()
    assert board.name == policy.board == "fingerprint-token"
    assert sorted(policy.by_name) == ["analytics", "authenticator", "biometric", "link"]


def test_encoding_is_deterministic() -> None:
    payload = make_payload(BOARD_TEXT, POLICY_TEXT, INSTANCE)
    assert payload.encode() == payload.encode() == cbor.dumps(_raw())


def test_make_payload_refuses_a_policy_that_does_not_compile() -> None:
    with pytest.raises(FormatError) as info:
        make_payload(BOARD_TEXT, POLICY_TEXT.replace('"gpio.led0"', '"gpio.led9"'), INSTANCE)
    assert info.value.rule == "policy.unknown-resource"
    with pytest.raises(FormatError) as info:
        make_payload("name = 3", POLICY_TEXT, INSTANCE)
    assert info.value.rule == "board.name"


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("wrong type", _raw(type="ism/downgrade/v1")),
        ("missing instance", _raw(instance=None)),
        ("unknown key", {**_raw(), 6: "extra"}),
        ("text keys", {"type": POLICY_TYPE, "version": 1, "instance": INSTANCE, "board": "", "policy": ""}),
        ("negative version", _raw(version=-1)),
        ("boolean version", _raw(version=True)),
        ("version too large", _raw(version=1 << 63)),
        ("instance as text", _raw(instance=INSTANCE.hex())),
        ("instance too short", _raw(instance=b"\x01" * 6)),
        ("instance too long", _raw(instance=b"\x01" * 34)),
        ("board as bytes", _raw(board=BOARD_TEXT.encode())),
        ("policy too large", _raw(policy="#" * (MAX_TEXT + 1))),
    ],
)
def test_strict_decoding(name: str, raw: Any) -> None:
    with pytest.raises(FormatError) as info:
        decode_payload(cbor.dumps(raw))
    assert info.value.rule == "policy.artifact", name
    assert info.value.code == ErrorCode.FORMAT


def test_not_a_map_and_not_cbor() -> None:
    with pytest.raises(FormatError) as info:
        decode_payload(cbor.dumps([POLICY_TYPE, 1]))
    assert info.value.rule == "policy.artifact"
    with pytest.raises(FormatError) as info:
        decode_payload(cbor.dumps(_raw()) + b"\x00")
    assert info.value.rule == "cbor.trailing"


def test_a_non_deterministic_encoding_is_refused() -> None:
    canonical = cbor.dumps(_raw())
    # the same map with the version as a two-byte integer (0x19 0x0001) instead of the shortest form
    padded = canonical.replace(b"\x02\x01", b"\x02\x19\x00\x01", 1)
    assert padded != canonical
    with pytest.raises(FormatError) as info:
        decode_payload(padded)
    assert info.value.rule == "policy.artifact"


def test_compile_refuses_a_version_that_is_not_the_policys() -> None:
    payload = decode_payload(cbor.dumps(_raw(version=2)))  # the policy inside says version = 1
    with pytest.raises(FormatError) as info:
        payload.compile()
    assert (info.value.rule, info.value.got, info.value.expected) == ("policy.artifact-version", 2, 1)


def test_compile_names_the_broken_policy_rule() -> None:
    payload = PolicyPayload(1, INSTANCE, BOARD_TEXT, POLICY_TEXT + "\n[unknown]\n")
    with pytest.raises(FormatError) as info:
        payload.compile()
    assert info.value.rule == "policy.key"
    assert "policy artifact" in str(info.value.subject)
