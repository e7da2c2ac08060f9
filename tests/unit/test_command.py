"""Signed device commands: strict payload format and device-side authorisation."""

from __future__ import annotations

import pytest

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, generate, public_pem, signer_id
from ism.device.commands import authorise, consume, sign_command
from ism.device.virtual import Device
from ism.errors import FormatError, RollbackError, SignatureError, TrustError, UntrustedSignerError, UsageError
from ism.formats import cbor
from ism.formats.command import AnchorChange, Command, decode_command


@pytest.fixture
def vendor(device: Device) -> PrivateKey:
    key = generate("es256")
    device.add_anchor(public_pem(key), role="vendor")
    return key


def _reset(device: Device, sequence: int = 1) -> Command:
    return Command("factory-reset", device.instance_id, sequence, {})


def test_round_trip_every_kind() -> None:
    ueid = b"\x01" + bytes(32)
    key = generate("es256")
    der = public_pem(key)
    commands = [
        Command("provision", ueid, 3, {"anchors": [AnchorChange("add", "microservice", key=der)]}),
        Command("provision", ueid, 4, {"anchors": [AnchorChange("remove", "vendor", id=signer_id(key))]}),
        Command("factory-reset", ueid, 1, {}),
        Command("decommission", ueid, 1, {}),
        Command("lifecycle", ueid, 1, {"state": "non-psa-rot-debug"}),
        Command("microservice", ueid, 9, {"uuid": bytes(16), "action": "ban"}),
    ]
    for command in commands:
        assert decode_command(command.encode()) == command


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop(4),
        lambda m: m.update({6: 1}),
        lambda m: m.update({1: "ism/policy/v1"}),
        lambda m: m.update({2: "reboot"}),
        lambda m: m.update({3: b"short"}),
        lambda m: m.update({4: 0}),
        lambda m: m.update({4: True}),
        lambda m: m.update({5: {"extra": 1}}),
        lambda m: m.update({5: []}),
    ],
    ids=["missing", "unknown-key", "type", "kind", "ueid", "seq-zero", "seq-bool", "args-extra", "args-type"],
)
def test_malformed_payloads_are_refused(mutate: object) -> None:
    raw = cbor.loads(Command("factory-reset", b"\x01" + bytes(32), 1, {}).encode())
    mutate(raw)  # type: ignore[operator]
    with pytest.raises(FormatError) as err:
        decode_command(cbor.dumps(raw))
    assert err.value.rule == "command.format"


def test_bad_anchor_changes_and_non_deterministic_encoding_are_refused() -> None:
    ueid = b"\x01" + bytes(32)
    for anchors in (
        [],
        [{"op": "add", "role": "vendor"}],
        [{"op": "remove", "role": "vendor", "id": b"x"}],
        [{"op": "swap"}],
    ):
        payload = {1: "ism/command/v1", 2: "provision", 3: ueid, 4: 1, 5: {"anchors": anchors}}
        with pytest.raises(FormatError, match="anchor"):
            decode_command(cbor.dumps(payload))
    good = Command("factory-reset", ueid, 1, {}).encode()
    padded = good.replace(b"\x04\x01", b"\x04\x18\x01")  # sequence 1 in a two-byte form
    with pytest.raises(FormatError) as err:
        decode_command(padded)
    assert err.value.rule == "command.format"


def test_authorise_accepts_then_refuses_a_replay(device: Device, vendor: PrivateKey) -> None:
    signed = sign_command(_reset(device, 5), vendor)
    command = authorise(device, signed, "factory-reset")
    assert command.sequence == 5
    assert authorise(device, signed, "factory-reset") == command  # not consumed yet: may be re-applied
    consume(device, command)
    with pytest.raises(RollbackError) as err:
        authorise(device, signed, "factory-reset")
    assert err.value.rule == "command.replay"
    assert device.counters()["command.factory-reset"] == 5


def test_authorise_refusals(device: Device, vendor: PrivateKey, dev_key: PrivateKey, tmp_path: object) -> None:
    with pytest.raises(UntrustedSignerError) as err:  # a microservice signer is no vendor
        authorise(device, sign_command(_reset(device), dev_key), "factory-reset")
    assert err.value.rule == "command.signer"
    with pytest.raises(UsageError) as err2:
        authorise(device, sign_command(_reset(device), vendor), "decommission")
    assert err2.value.rule == "command.kind"
    other = Command("factory-reset", b"\x01" + bytes(32), 1, {})
    with pytest.raises(TrustError) as err3:
        authorise(device, sign_command(other, vendor), "factory-reset")
    assert err3.value.rule == "command.device"
    signed = bytearray(sign_command(_reset(device), vendor))
    signed[-1] ^= 1
    with pytest.raises(SignatureError) as err4:
        authorise(device, bytes(signed), "factory-reset")
    assert err4.value.rule == "command.signature"
    unsigned_type = cose.sign1(_reset(device).encode(), vendor, kid=signer_id(vendor))
    for data in (b"", b"\xa0", unsigned_type, bytes(70_000)):
        with pytest.raises(FormatError) as err5:
            authorise(device, data, "factory-reset")
        assert err5.value.rule == "command.format"


def test_only_a_ban_may_be_signed_by_the_store(device: Device) -> None:
    store = generate("es256")
    device.add_anchor(public_pem(store), role="store")
    ban = Command("microservice", device.instance_id, 1, {"uuid": bytes(16), "action": "ban"})
    assert authorise(device, sign_command(ban, store), "microservice") == ban
    suspend = Command("microservice", device.instance_id, 1, {"uuid": bytes(16), "action": "suspend"})
    with pytest.raises(UntrustedSignerError):
        authorise(device, sign_command(suspend, store), "microservice")
