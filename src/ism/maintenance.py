"""Factory reset and decommissioning: what each erases, planned where the services' keys are known.

Owns: the authorised ``factory-reset`` and ``decommission`` commands
(:func:`factory_reset`, :func:`decommission`): which keys and files each
erases (the storage's namespace keys and the keys the policy granted are
named by the services, so the plan is made at this layer), and the final
statement a decommissioned device signs with its attestation key. Carrying
the plan out — intent first, every step idempotent, rolled forward when the
device is next opened — is :mod:`ism.device.lifecycle`'s.
Must not import: cli.

A factory reset crypto-erases every microservice's storage (every namespace
key, the storage root key, the database and its freshness root) and keys,
removes the installed packages and their sealed boot records, and keeps the
anti-rollback counters (an old, vulnerable version cannot come back after a
reset), the trust anchors, the policy and the device's own keys (identity,
attestation, policy): the vendor's provisioning. It ends in ``secured``.

Decommissioning records its intent with the digest of its final statement
(instance ID, time, the digest of the log's ``decommissioned`` entry, the
command's digest, every key and file it erases), then destroys every key —
the microservices', the storage's, the policy key, the identity CA key —
then signs the statement with the initial attestation key, writes it, and
destroys the attestation key last; then it removes every file but the ones
that show what the device was and that it is decommissioned (:data:`KEPT`).
It ends in ``decommissioned``, for good. The statement is signed only once
the intent moved the ``lifecycle`` counter (the log from before cannot come
back) and every other key is gone: a statement never exists for a device
that could still come up with its keys.

Threat: a device reset or retired by someone without the vendor's authority
(a signed, device-bound, fresh command: :func:`~ism.device.commands.authorise`),
data or keys that survive a reset or a decommissioning (every key the
storage, the policy or the software key store knows is destroyed; on the
software key store decommissioning also removes the root key every sealed
key depends on), an old vulnerable version reinstalled after a reset (the
counters stay), a power cut that leaves half a reset (see
:mod:`ism.device.lifecycle`), and a decommissioned device that still
answers (every key use, boot, install, policy and provisioning refuses with
``lifecycle.decommissioned``). Limits: keys that the policy no longer names,
held by a PKCS#11 token or a TPM (which cannot be listed), survive a reset;
plain files are removed, not overwritten (the file system decides when the
bytes go) — which is why keys live sealed, and erasing means destroying keys.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Final

from ism.crypto.keys import pem_from_der
from ism.device import lifecycle
from ism.device._atomic import TMP_SUFFIX, atomic_write
from ism.device.commands import authorise
from ism.device.lifecycle import LOG_FILE, STATEMENT_FILE, perform, prepare, stored_key_ids
from ism.device.virtual import POLICY_KEY_ID, STATE_KEY_ID, Device
from ism.errors import IsmError
from ism.formats.lifecycle import Entry
from ism.formats.lifecycle import require as require_state
from ism.runtime import STORAGE_DB, STORAGE_KEY_ID, open_storage
from ism.services.attestation import IAK_ID
from ism.services.crypto import key_store_id
from ism.services.identity import CA_KEY_ID

__all__ = [
    "DEVICE_KEYS",
    "KEPT",
    "Erased",
    "apply_lifecycle_command",
    "decommission",
    "decommission_plan",
    "factory_reset",
    "reprovision_plan",
    "reset_plan",
]

#: the secure storage's files under DIR (the database, SQLite's side files, the freshness root)
STORAGE_FILES: Final = (
    STORAGE_DB.as_posix(),
    f"{STORAGE_DB.as_posix()}-wal",
    f"{STORAGE_DB.as_posix()}-shm",
    f"{STORAGE_DB.as_posix()}-journal",
    "state/storage-root.cose",
)
#: what a decommissioned device keeps: its identity, its public keys, its counters, its log and its statement,
#: and what verifies them: the state MAC key (a file, or the TPM's ``device.state`` key file and the pinned
#: primary key name; on a token, ``device.state`` is never in an erase plan)
KEPT: Final = frozenset(
    {
        "device.json",
        "keys/state.key",
        f"keys/tpm/{STATE_KEY_ID}.tpmkey",
        "keys/tpm/primary.name",
        "keys/device.pub.pem",
        "keys/iak.pub.pem",
        "state/rollback.cose",
        LOG_FILE.as_posix(),
        STATEMENT_FILE.as_posix(),
    }
)
IAK_PUBLIC: Final = "keys/iak.pub.pem"
#: the device's own keys in its key store: what re-provisioning generates afresh
DEVICE_KEYS: Final = (POLICY_KEY_ID, CA_KEY_ID, IAK_ID)
#: files that re-provisioning removes besides the reset's: the policy sealed to the old policy key (now
#: unreadable), the identity CA certificate and the IAK's public key (both of old keys), the software store's
#: root key (every key it sealed is destroyed; a fresh one seals the new keys)
REPROVISION_FILES: Final = ("config/policy.cose", "keys/identity-ca.der", IAK_PUBLIC, "keys/root.key")


@dataclass(frozen=True, slots=True)
class Erased:
    """What a factory reset or a decommissioning did."""

    entry: Entry
    keys: tuple[str, ...]
    files: tuple[str, ...]
    statement: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.entry.to_state,
            "erased": {"keys": list(self.keys), "files": list(self.files)},
            "lifecycle": self.entry.to_json(),
        }


def _microservice_keys(device: Device) -> list[str]:
    """Every key of a microservice the device may hold: storage namespaces and the policy's grants."""
    ids: set[str] = set(stored_key_ids(device, "ms.", "storage."))
    with contextlib.suppress(IsmError):  # a storage that fails its checks is erased all the same
        storage = open_storage(device)
        try:
            ids.update(storage.namespace_keys())
        finally:
            storage.close()
    with contextlib.suppress(IsmError):  # no policy, or one that no longer opens: nothing granted by it
        policy = device.policy() if device.configured() else None
        for entry in policy.by_uuid.values() if policy is not None else ():
            ids.update(key_store_id(str(entry.uuid), name) for name in entry.keys)
    ids.update(f"storage.{ms}" for ms in device.installed())
    return sorted(ids)


def _existing(device: Device, names: list[str]) -> tuple[str, ...]:
    return tuple(n for n in names if (device.root / n).is_file())


def reset_plan(device: Device) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys, files) a factory reset erases: microservice storage and keys, packages, sealed boot records."""
    keys = (*_microservice_keys(device), STORAGE_KEY_ID)
    packages = sorted(p.relative_to(device.root).as_posix() for p in (device.root / "packages").glob("*"))
    return keys, _existing(device, [*STORAGE_FILES, "state/sealed.cose", *packages])


def reprovision_plan(device: Device) -> lifecycle.Plan:
    """(keys, files, regenerate) of re-provisioning from recoverable-psa-rot-debug.

    What a factory reset erases (the microservices' data and keys may have
    been exposed with the RoT), plus the device's own keys (:data:`DEVICE_KEYS`,
    destroyed then generated afresh; the device key pair too) and
    :data:`REPROVISION_FILES`. Kept: the counters, the log, the trust anchors,
    a cleartext configuration, the state MAC key.
    """
    keys, files = reset_plan(device)
    keys = tuple(dict.fromkeys([*keys, *DEVICE_KEYS]))
    return keys, (*files, *_existing(device, list(REPROVISION_FILES))), DEVICE_KEYS


def apply_lifecycle_command(device: Device, data: bytes) -> Entry:
    """A signed ``lifecycle`` command (:func:`ism.device.lifecycle.apply_lifecycle_command`); re-provisioning
    (recoverable-psa-rot-debug -> psa-rot-provisioning) regenerates the device's keys (:func:`reprovision_plan`).
    """
    return lifecycle.apply_lifecycle_command(device, data, reprovision_plan)


def decommission_plan(device: Device) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(keys, files) decommissioning erases: every key (the attestation key last), every file not :data:`KEPT`."""
    device_keys = [STORAGE_KEY_ID, POLICY_KEY_ID, CA_KEY_ID]
    keys = tuple(dict.fromkeys([*_microservice_keys(device), *device_keys, IAK_ID]))
    files = sorted(
        rel
        for path in device.root.rglob("*")
        if path.is_file()
        and not path.name.endswith(TMP_SUFFIX)
        and (rel := path.relative_to(device.root).as_posix()) not in KEPT
    )
    return keys, tuple(files)


def factory_reset(device: Device, data: bytes) -> Erased:
    """Applies a signed ``factory-reset`` command (see the module docstring for what it erases and keeps).

    Raises:
        TrustError: ``lifecycle.decommissioned``, ``lifecycle.transition`` (from recoverable-psa-rot-debug:
            re-provision first); the refusals of :func:`~ism.device.commands.authorise`.
    """
    require_state(device.lifecycle_state, "be reset")
    command = authorise(device, data, "factory-reset")
    body, entry = prepare(
        device, "factory-reset", "secured", "factory reset: microservice data and keys crypto-erased", command, data
    )
    keys, files = reset_plan(device)
    perform(device, body, entry, command=data, keys=keys, files=files)
    return Erased(entry, keys, files)


def decommission(device: Device, data: bytes) -> Erased:
    """Applies a signed ``decommission`` command: every key destroyed, the final statement signed before the IAK.

    Returns:
        What was erased, with the signed statement (also kept as ``DIR/state/decommission.cose``).

    Raises:
        TrustError: ``lifecycle.decommissioned``; the refusals of :func:`~ism.device.commands.authorise`.
    """
    require_state(device.lifecycle_state, "be decommissioned again")
    command = authorise(device, data, "decommission")
    body, entry = prepare(
        device, "decommission", "decommissioned", "decommissioned: every key crypto-erased", command, data
    )
    keystore = device.keystore()
    if not keystore.exists(IAK_ID):
        keystore.generate(IAK_ID, "ecc-p256")
    iak = keystore.public_key(IAK_ID)
    atomic_write(device.root / IAK_PUBLIC, pem_from_der(iak), device.faults)  # public: how the statement verifies
    keys, files = decommission_plan(device)
    perform(device, body, entry, command=data, keys=keys, files=files, signer=IAK_ID)
    return Erased(entry, keys, files, (device.root / STATEMENT_FILE).read_bytes())
