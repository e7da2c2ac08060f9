"""Builds a running device from its directory: boot, board file, policy, peripherals, supervisor.

Owns: the wiring (as a Tock board's ``main.rs`` does): secure boot first, then
the board's peripherals, the compiled policy, the static check of each booted
module against its policy entry, the durable outbox, and the supervisor.
Must not import: agent, store, cli.

Threat: running something that should not run. Only packages secure boot
accepted are loaded; a microservice the policy does not name, or whose
imports need capabilities the policy does not grant, is not started and a
record says why. A new policy (:meth:`Runtime.apply_policy`,
:meth:`Runtime.reload_policy`) takes effect between two supervisor steps,
all at once: no activation runs under half of it.
"""

from __future__ import annotations

import functools
import hashlib
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ism.boards.virtual import Peripheral, make_peripherals
from ism.device.microservices import NOT_STARTED, MicroserviceStates, attested_state, crash_loop_recorder
from ism.device.outbox import Outbox
from ism.device.virtual import Booted, BootReport, Device
from ism.errors import IsmError, UsageError
from ism.formats import wasm
from ism.formats.board import Board
from ism.formats.policy import MicroservicePolicy, Policy, check_module, policy_digest
from ism.hypervisor.supervisor import Image, State, Supervisor
from ism.services.attestation import AttestationService, AttestedMicroservice, attested
from ism.services.crypto import CryptoService
from ism.services.identity import IdentityService
from ism.services.storage import SecureStorage
from ism.services.storage_host import StorageService

__all__ = ["STORAGE_KEY_ID", "Runtime", "attestation_service", "erase_microservice", "open_storage"]

#: the device storage key in the key store; per-microservice storage keys are derived from it
STORAGE_KEY_ID = "device.storage"
STORAGE_DB = Path("state") / "storage.sqlite"
#: the storage's TPM NV counter, from the device's NV index (outside the range device indices are drawn from)
STORAGE_COUNTER_OFFSET = 0x10000


def open_storage(device: Device) -> SecureStorage:
    """The device's secure storage (its key in the device key store, its freshness root in DIR/state).

    On a TPM-backed device the root is bound to a TPM NV counter of its own, at the device's NV index
    + 0x10000 (outside the range device NV indices are drawn from): the device's counter binds
    ``state/rollback.cose``, and a storage write moves only the storage's.
    """
    keystore = device.keystore()
    if not keystore.exists(STORAGE_KEY_ID):
        keystore.generate(STORAGE_KEY_ID, "aes-256")
    return SecureStorage(
        device.root / STORAGE_DB,
        device.root / "state" / "storage-root.cose",
        keystore,
        STORAGE_KEY_ID,
        device.state_mac_key,
        device.faults,
        device.hardware_counter(STORAGE_COUNTER_OFFSET),  # None without a TPM
    )


#: supervisor state -> the microservice lifecycle state attested (docs/attestation.md)
_LIFECYCLE = {"running": "active", "restarting": "active", "stopped": "suspended", "quarantined": "quarantined"}


def attestation_service(
    device: Device, report: BootReport, policy: Policy | None, states: Callable[[uuidlib.UUID], str | None]
) -> AttestationService:
    """The attestation service for what this boot accepted (policy digests from ``policy`` when configured).

    A microservice's lifecycle claim is ``states(uuid)``, else its persisted state (ism.device.microservices).
    """
    persisted = MicroserviceStates(device)
    persisted.load()
    return AttestationService(
        device.keystore(),
        device.instance_id,
        _attested(report, policy),
        lifecycle=device.lifecycle_state,
        lifecycle_log=device.lifecycle_head,
        states=lambda ms_uuid: states(ms_uuid) or attested_state(persisted.state(ms_uuid), None),
    )


def _attested(report: BootReport, policy: Policy | None) -> dict[uuidlib.UUID, AttestedMicroservice]:
    def digest(ms_uuid: uuidlib.UUID) -> bytes:
        entry = policy.get(ms_uuid) if policy is not None else None
        return policy_digest(entry) if entry is not None else hashlib.sha256(b"ism: no policy entry").digest()

    return {b.uuid: attested(b, digest) for b in (*report.accepted, *report.held)}


def erase_microservice(device: Device, ms_uuid: uuidlib.UUID, key_names: list[str]) -> None:
    """Crypto-erases a microservice: its storage namespace and every key the policy granted it."""
    storage = open_storage(device)
    try:
        storage.erase(ms_uuid)
    finally:
        storage.close()
    CryptoService(device.keystore()).erase(str(ms_uuid), key_names)


def _image(booted: Booted) -> Image:
    return Image(booted.uuid, booted.name, booted.version, booted.measurement, booted.signer, booted.payload)


@dataclass
class Runtime:
    """A booted, supervised device."""

    device: Device
    report: BootReport
    board: Board
    policy: Policy
    peripherals: dict[str, Peripheral]
    outbox: Outbox
    supervisor: Supervisor
    crypto: CryptoService
    identity: IdentityService
    storage: SecureStorage
    attestation: AttestationService
    #: the persisted per-microservice lifecycle (ism.device.microservices)
    lifecycle: MicroserviceStates | None = None
    #: microservices :meth:`apply_lifecycle` stopped (suspended on the running device)
    paused: set[uuidlib.UUID] = field(default_factory=set)

    @classmethod
    def start(
        cls,
        root: Path,
        clock: Callable[[], float] = time.monotonic,
        on_log: Callable[[str, int, str], None] | None = None,
    ) -> Runtime:
        """Boots the device in ``root`` and starts every microservice its policy names."""
        device = Device(root)
        lifecycle = MicroserviceStates(device)
        lifecycle.roll_forward(functools.partial(erase_microservice, device))  # a removal cut short: finish it
        report = device.boot()  # suspended and quarantined microservices are held, not accepted
        board = device.board()
        policy = device.policy()
        peripherals = dict(make_peripherals(board, clock))
        outbox = device.outbox()
        images: list[Image] = []
        refused: list[tuple[Image, IsmError]] = []
        for booted in report.accepted:
            image = _image(booted)
            entry = policy.get(booted.uuid)
            try:
                if entry is not None:
                    check_module(entry, wasm.parse_module(booted.payload))
            except IsmError as exc:
                refused.append((image, exc))
                continue
            images.append(image)
        keystore = device.keystore()
        crypto = CryptoService(keystore)
        registrations = {b.uuid: b.measurement for b in (*report.accepted, *report.held)}
        identity = IdentityService(keystore, device.identity_ca(), device.instance_id, registrations, crypto)
        if identity.ca_der != device.identity_ca():
            device.store_identity_ca(identity.ca_der)
        storage = open_storage(device)
        states: dict[uuidlib.UUID, str] = {}
        attestation = attestation_service(device, report, policy, states.get)
        services = {
            **crypto.calls(),
            **identity.calls(),
            **StorageService(storage).calls(),
            **attestation.calls(),
        }
        supervisor = Supervisor(
            images,
            policy.by_uuid,
            peripherals,
            crash_loop_recorder(lifecycle, outbox.append),  # a crash-loop quarantine is persisted
            services,
            clock=clock,
            on_log=on_log,
        )
        attestation.states = lambda ms_uuid: attested_state(
            lifecycle.state(ms_uuid),
            _LIFECYCLE.get(
                str(supervisor.microservices[ms_uuid].state) if ms_uuid in supervisor.microservices else "", "installed"
            ),
        )
        for image, error in refused:
            supervisor.record(image, error.rule, error.message, 1, "not started")
        for image in supervisor.unmanaged:
            supervisor.record(
                image,
                "policy.not-named",
                "the access policy does not name this microservice: default deny, so it is not started",
                1,
                "not started",
            )
        supervisor.start()
        for ms in supervisor.microservices.values():
            if ms.state is State.RUNNING:
                lifecycle.started(ms.uuid)  # installed -> active at its first successful start
        return cls(
            device,
            report,
            board,
            policy,
            peripherals,
            outbox,
            supervisor,
            crypto,
            identity,
            storage,
            attestation,
            lifecycle,
        )

    def apply_policy(self, policy: Policy) -> dict[str, list[str]]:
        """Puts ``policy`` into effect now, without reinstalling or rebooting anything.

        Call it between two supervisor steps (the run loop's thread). Each booted
        module is checked against its new entry first (a module the new policy does
        not grant its imports is stopped, with a record naming the rule); then the
        supervisor swaps every entry at once (:meth:`Supervisor.apply_policy`) and
        attestation reports the new policy digests.

        Returns:
            Microservice names by outcome (``restarted``, ``stopped``, ``started``, ``unchanged``).

        Raises:
            UsageError: ``policy.board-change`` if the policy is for another board than the one running.
        """
        if policy.board != self.board.name:
            raise UsageError(
                "policy.board-change",
                "the new policy is for another board: restart the device to apply it",
                got=policy.board,
                expected=self.board.name,
            )
        granted: dict[uuidlib.UUID, MicroservicePolicy] = {}
        refused: list[tuple[Image, IsmError]] = []
        for booted in self.report.accepted:
            entry = policy.get(booted.uuid)
            if entry is None:
                continue
            try:
                check_module(entry, wasm.parse_module(booted.payload))
            except IsmError as exc:
                refused.append((_image(booted), exc))
                continue
            granted[booted.uuid] = entry
        outcome = self.supervisor.apply_policy(granted)
        for image, error in refused:
            self.supervisor.record(image, error.rule, error.message, 1, "stopped")
        self.policy = policy
        self.attestation.replace_microservices(_attested(self.report, policy))
        return outcome

    def reload_policy(self) -> dict[str, list[str]] | None:
        """Applies the device's stored policy if it is not the one running (after ``ism device policy``).

        Returns:
            What :meth:`apply_policy` returned, or None if the stored policy is the running one.

        Raises:
            UsageError: ``policy.board-change`` if the stored board file is not the running one.
            TrustError, FormatError: if the stored policy no longer opens (it is not applied).
        """
        board, policy = self.device.board(), self.device.policy()
        if policy == self.policy:
            return None
        if board != self.board:
            raise UsageError(
                "policy.board-change",
                "the stored board file differs from the running one: restart the device to apply it",
                subject=str(self.device.root),
            )
        return self.apply_policy(policy)

    def apply_lifecycle(self) -> dict[str, list[str]]:
        """Puts the persisted per-microservice lifecycle into effect now, between two supervisor steps.

        After ``ism device microservice`` from another process: a microservice
        now suspended, quarantined, removed or banned stops; one resumed or
        released starts (also one that boot held). Nothing else is touched.

        Returns:
            Microservice names by outcome (``stopped``, ``started``).
        """
        outcome: dict[str, list[str]] = {"stopped": [], "started": []}
        if self.lifecycle is None:
            return outcome
        self.lifecycle.load()
        sup = self.supervisor
        for ms in list(sup.microservices.values()):
            state = self.lifecycle.state(ms.uuid)
            if state in NOT_STARTED:
                if ms.state in (State.RUNNING, State.RESTARTING):
                    sup.hold(ms.name, quarantine=state == "quarantined")
                    self.paused.add(ms.uuid)
                    outcome["stopped"].append(ms.name)
            elif ms.state is State.QUARANTINED or (ms.state is State.STOPPED and ms.uuid in self.paused):
                self.paused.discard(ms.uuid)
                sup.release(ms.name)
                outcome["started"].append(ms.name)
        for booted in self.report.held:
            entry = self.policy.get(booted.uuid)
            if booted.uuid in sup.microservices or entry is None:
                continue
            if self.lifecycle.state(booted.uuid) not in ("installed", "active"):
                continue
            try:
                check_module(entry, wasm.parse_module(booted.payload))
            except IsmError as exc:
                sup.record(_image(booted), exc.rule, exc.message, 1, "not started")
                continue
            if sup.admit(_image(booted), entry):
                outcome["started"].append(entry.name)
        for ms in sup.microservices.values():
            if ms.state is State.RUNNING and ms.name in outcome["started"]:
                self.lifecycle.started(ms.uuid)
        return outcome

    @property
    def storage_path(self) -> Path:
        return self.device.root / STORAGE_DB

    def close(self) -> None:
        self.supervisor.stop()
        self.outbox.close()
        self.storage.close()
        self.device.close()
