"""One developer's key cannot take over another developer's microservice.

A device trusts two developer keys (two ``microservice`` anchors: say the
authenticator's developer and a third-party analytics developer). The first
install of a UUID binds it to the signer of its package; from then on an
update signed by the other developer — even with a higher sequence number —,
such a package put on flash, and a downgrade authorisation signed by the other
developer are refused (``ms-lifecycle.signer``), so the other developer's code
never gets the microservice's grants, keys, storage or identity. Only a signed
``remove`` from the vendor (which crypto-erases the microservice) unbinds it.
The binding survives reboots, suspension and the first start.
"""

from __future__ import annotations

import uuid as uuidlib
from collections.abc import Callable

import pytest

from ism.crypto import cose
from ism.crypto.keys import PrivateKey, generate, public_pem, signer_id
from ism.device.commands import sign_command
from ism.device.microservices import MicroserviceStates, apply_command
from ism.device.virtual import Device
from ism.errors import UntrustedSignerError
from ism.formats.command import Command
from ism.formats.downgrade import Downgrade


@pytest.fixture
def two_developers(device: Device, other_key: PrivateKey) -> tuple[Device, PrivateKey]:
    """The device trusts the dev key (the owner) and ``other_key`` (another developer)."""
    device.add_anchor(public_pem(other_key))
    return device, other_key


def _refused_signer(exc: pytest.ExceptionInfo[UntrustedSignerError]) -> None:
    assert exc.value.rule == "ms-lifecycle.signer"


def test_an_update_signed_by_another_developer_is_refused(
    two_developers: tuple[Device, PrivateKey], build_package: Callable[..., bytes], uuids: dict[str, str]
) -> None:
    device, other = two_developers
    device.install(build_package("hello", sequence=1))
    before = device.package_path(uuids["hello"]).read_bytes()
    with pytest.raises(UntrustedSignerError) as info:
        device.install(build_package("hello", key=other, sequence=9))
    _refused_signer(info)
    assert device.package_path(uuids["hello"]).read_bytes() == before  # nothing written
    device.install(build_package("hello", sequence=2))  # its own developer still updates it
    report = device.boot()
    assert [e.verdict for e in report.microservices] == ["booted"]


def test_another_developers_package_put_on_flash_is_refused_at_boot(
    two_developers: tuple[Device, PrivateKey], build_package: Callable[..., bytes], uuids: dict[str, str]
) -> None:
    device, other = two_developers
    device.install(build_package("hello", sequence=1))
    device.boot()
    device.package_path(uuids["hello"]).write_bytes(build_package("hello", key=other, sequence=5))
    for full in (False, True):
        (entry,) = device.boot(full=full).microservices
        assert (entry.verdict, entry.rule) == ("refused", "ms-lifecycle.signer")
    assert device.counters()[uuids["hello"]] == 1  # the foreign package moved no counter


def test_a_downgrade_authorised_by_another_developer_is_refused(
    two_developers: tuple[Device, PrivateKey],
    build_package: Callable[..., bytes],
    uuids: dict[str, str],
    dev_key: PrivateKey,
) -> None:
    device, other = two_developers
    device.install(build_package("hello", sequence=3))
    device.boot()
    old = build_package("hello", sequence=1)  # the owner's own older version

    def authorisation(key: PrivateKey) -> bytes:
        auth = Downgrade(uuidlib.UUID(uuids["hello"]), 1, 3, device.instance_id)
        return cose.sign1(auth.encode(), key, kid=signer_id(key))

    with pytest.raises(UntrustedSignerError) as info:
        device.install(old, downgrade=authorisation(other))
    _refused_signer(info)
    assert device.install(old, downgrade=authorisation(dev_key)).downgraded  # its owner may


def test_the_vendors_remove_unbinds(
    two_developers: tuple[Device, PrivateKey], build_package: Callable[..., bytes], uuids: dict[str, str]
) -> None:
    device, other = two_developers
    vendor = generate("es256")
    device.add_anchor(public_pem(vendor), role="vendor")
    device.install(build_package("hello", sequence=1))
    states = MicroserviceStates(device)
    states.started(uuids["hello"])  # the binding survives the first start ...
    suspend = Command("microservice", device.instance_id, 1, {"uuid": _uuid(uuids), "action": "suspend"})
    apply_command(device, sign_command(suspend, vendor), lambda ms, keys: None)  # ... and a suspension
    with pytest.raises(UntrustedSignerError) as info:
        device.install(build_package("hello", key=other, sequence=2))
    _refused_signer(info)
    remove = Command("microservice", device.instance_id, 2, {"uuid": _uuid(uuids), "action": "remove"})
    apply_command(device, sign_command(remove, vendor), lambda ms, keys: None)
    device.install(build_package("hello", key=other, sequence=2))  # a new owner after the vendor's removal
    record = MicroserviceStates(device).get(uuids["hello"])
    assert record is not None
    assert record.signer == signer_id(other)
    with pytest.raises(UntrustedSignerError):  # ... and now the first developer is the foreign one
        device.install(build_package("hello", sequence=3))


def _uuid(uuids: dict[str, str]) -> bytes:
    return uuidlib.UUID(uuids["hello"]).bytes
