"""The virtual device: a directory that holds keys, trust anchors, counters and packages.

Owns: the device's persistent layout and the I/O shell around the pure
secure-boot decision in :mod:`ism.device.trust.boot`: read with size caps,
ask ``trust``, persist only what was accepted, atomically.
Must not import: hypervisor, services, agent, store, cli.

Threat: offline modification of the device's storage — tampered or swapped
packages, older signed packages (rollback), a deleted or edited counter file
(counter reset), a crash mid-write. Packages are re-verified at every boot;
counters live in a MAC'd file that must exist once the device is
initialised; every write is atomic (:mod:`ism.device._atomic`).

The protected access policy (:meth:`Device.install_policy`) is kept only as
the artifact the vendor sent — signed by a *policy signer* anchor (kept apart
from microservice-signer anchors), encrypted to the device's policy key —
and decrypted through the key store whenever it is read: the board file and
the grants never sit on disk in clear. Its version is checked against the
``policy`` entry of the anti-rollback counters.

Layout::

    DIR/device.json                 format, instance ID (UEID), key-store backend
    DIR/keys/device.pem, .pub.pem   device key pair (0600 private)
    DIR/keys/state.key              MAC key for state files (0600; software key store only, see below)
    DIR/keys/root.key               root key of the software key store (0600)
    DIR/keys/store/<key-id>.key     keys sealed under the root key (software key store), among them
                                    ``device.policy``, the P-256 key policies are encrypted to
    DIR/keys/identity-ca.der        the device identity CA certificate
    DIR/trust/<signer-id>.pem       trust anchors for microservice signers
    DIR/trust/policy/<signer-id>.pem  trust anchors for policy signers (the vendor's policy key)
    DIR/trust/vendor/<signer-id>.pem  trust anchors for the vendor's device commands (ism.device.commands)
    DIR/trust/store/<signer-id>.pem   trust anchors for the store's commands (bans)
    DIR/config/board.toml, policy.toml  board file and policy in clear (``configure``; unprotected devices only)
    DIR/config/policy.cose          the protected policy artifact (``install_policy``), encrypted to the device
    DIR/state/rollback.cose         COSE_Mac0 over the anti-rollback counters
    DIR/state/sealed.cose           COSE_Mac0 over sealed boot records (validate-once, see trust.boot.Sealed)
    DIR/state/microservices.cose    COSE_Mac0 over the per-microservice lifecycle (ism.device.microservices)
    DIR/state/lifecycle.cose        COSE_Mac0 over the device's hash-chained security lifecycle log
                                    (ism.device.lifecycle; its last sequence is the ``lifecycle`` counter)
    DIR/state/decommission.cose     the final statement of a decommissioned device (signed by its IAK)
    DIR/packages/<uuid>.suit        installed packages
    DIR/packages/<uuid>.downgrade.cose  downgrade authorisation, if one was used

The state MAC key: on a device whose key store is ``tpm`` or ``pkcs11`` it is
not on disk: it is
``HMAC(device.state, "ism-state-mac-v1")``, computed inside the TPM or token
with the non-exportable ``hmac-sha256`` key ``device.state`` that
:meth:`Device.init` generates. It is in host memory only while the device is
open (like the TPM store's AES keys), so whoever reads or copies the disk
cannot forge a state file, and a device directory copied to another TPM or
token (or whose ``device.state`` is gone) no longer verifies
(``StateCorruptError``). ``device.state`` survives factory reset,
re-provisioning and decommissioning: a decommissioned device still verifies
its own log. Software devices keep ``keys/state.key`` (their key store's
root key is on disk anyway). The backend alone decides where the key comes
from: a TPM or token device never reads a key file (one an attacker wrote
would let them re-MAC rolled-back state files while the device kept its
genuine IAK), and a ``keys/state.key`` found on such a device is ignored.
Rewriting device.json to a software backend is possible, but then the
genuine IAK is out of reach (docs/THREAT-MODEL.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from ism.crypto import cose
from ism.crypto.keys import (
    Anchors,
    PublicKey,
    anchor_map,
    generate,
    pem_from_der,
    public_pem,
    read_public_pem,
    signer_id,
    write_keypair,
)
from ism.crypto.keystore import KeyStore
from ism.crypto.keystore.software import SoftwareKeyStore
from ism.crypto.policy_seal import open_sealed
from ism.device._atomic import Faults, atomic_remove, atomic_write, read_capped, recover
from ism.device.lifecycle import log_json, open_log
from ism.device.microservices import MicroserviceStates
from ism.device.outbox import Outbox
from ism.device.trust.boot import Accepted, Sealed, check_package, check_sealed, seal
from ism.errors import (
    FormatError,
    IsmError,
    PlatformError,
    RollbackError,
    StateCorruptError,
    TrustError,
    UsageError,
)
from ism.formats import cbor, suit, wasm
from ism.formats.board import Board, parse_board
from ism.formats.lifecycle import require as require_state
from ism.formats.package import claimed_identity, read_package
from ism.formats.policy import Policy, check_module, parse_policy
from ism.formats.policy_artifact import MAX_TEXT, PolicyPayload, decode_payload

__all__ = [
    "ANCHOR_ROLES",
    "BootEntry",
    "BootReport",
    "Booted",
    "Device",
    "MAX_PACKAGE_SIZE",
    "MAX_POLICY_SIZE",
    "POLICY_COUNTER",
    "POLICY_KEY_ID",
    "STATE_KEY_ID",
]

FORMAT: Final = 1
MAX_PACKAGE_SIZE: Final = 16 * 1024 * 1024
MAX_AUTH_SIZE: Final = 4096
MAX_STATE_SIZE: Final = 1024 * 1024
UEID_RAND: Final = 0x01
#: the device key (P-256, in the key store) policy artifacts are encrypted to
POLICY_KEY_ID: Final = "device.policy"
#: the hmac-sha256 key (in a tpm or pkcs11 key store) the state MAC key is computed with
STATE_KEY_ID: Final = "device.state"
_STATE_KEY_LABEL: Final = b"ism-state-mac-v1"
#: the anti-rollback counter of the protected policy (reserved: microservice counters are keyed by UUID)
POLICY_COUNTER: Final = "policy"
#: largest policy artifact the device accepts (two texts of at most MAX_TEXT, plus the envelope)
MAX_POLICY_SIZE: Final = 2 * MAX_TEXT + 4096
#: who a trust anchor vouches for: microservice packages, the access policy, the vendor's device
#: commands (provisioning bundles, reset, decommission, lifecycle), the store (bans)
ANCHOR_ROLES: Final = ("microservice", "policy", "vendor", "store")


@dataclass(frozen=True, slots=True)
class BootEntry:
    """The measured-boot record of one microservice."""

    uuid: str
    name: str | None
    version: str | None
    sequence: int | None
    measurement: str | None
    signer: str | None
    verdict: str
    rule: str | None = None
    message: str | None = None
    code: int | None = None
    downgraded: bool = False
    verified: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "uuid": self.uuid,
            "name": self.name,
            "version": self.version,
            "sequence": self.sequence,
            "measurement": self.measurement,
            "signer": self.signer,
            "verdict": self.verdict,
            "rule": self.rule,
            "message": self.message,
            "code": self.code,
            "downgraded": self.downgraded,
            "verified": self.verified,
        }


@dataclass(frozen=True, slots=True)
class Booted:
    """A microservice secure boot accepted: what runs, and how it was verified."""

    uuid: uuidlib.UUID
    name: str
    version: str
    sequence: int
    measurement: bytes
    signer: bytes
    downgraded: bool
    payload: bytes = field(repr=False)
    #: "full" (parsed and verified now) or "sealed" (unchanged since a full verification)
    verified: str = "sealed"
    certifications: tuple[str, ...] = ()

    @classmethod
    def from_sealed(cls, record: Sealed, payload: bytes, verified: str = "sealed") -> Booted:
        # A sealed record is used only when sequence >= counter: no downgrade happens in that boot.
        return cls(
            uuidlib.UUID(bytes=record.uuid),
            record.name,
            record.version,
            record.sequence,
            record.measurement,
            record.signer,
            record.downgraded and verified == "full",
            payload,
            verified,
            record.certifications,
        )


@dataclass(frozen=True, slots=True)
class BootReport:
    """Result of one secure boot: one entry per installed microservice."""

    instance_id: str
    microservices: tuple[BootEntry, ...] = field(default_factory=tuple)
    accepted: tuple[Booted, ...] = field(default_factory=tuple, repr=False)
    #: verified, but not to be started: suspended or quarantined (verdict "held"; attested, never run)
    held: tuple[Booted, ...] = field(default_factory=tuple, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "booted": sum(e.verdict == "booted" for e in self.microservices),
            "refused": sum(e.verdict == "refused" for e in self.microservices),
            "held": sum(e.verdict == "held" for e in self.microservices),
            "microservices": [e.to_json() for e in self.microservices],
        }


class _KeyDir:
    """Sealed key blobs as files in one directory, written atomically (the software key store's KeyFiles)."""

    def __init__(self, path: Path, faults: Faults) -> None:
        self.path = path
        self.faults = faults

    def read(self, name: str) -> bytes | None:
        try:
            return read_capped(self.path / f"{name}.key", 64 * 1024)
        except FileNotFoundError:
            return None

    def write(self, name: str, data: bytes) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path / f"{name}.key", data, self.faults, mode=0o600)

    def remove(self, name: str) -> None:
        atomic_remove(self.path / f"{name}.key", self.faults)


class Device:
    """An initialised virtual device directory.

    Args:
        root: the device directory (created by :meth:`init`).
        faults: fault injector for power-cut tests.

    Raises:
        UsageError: ``device.missing`` if ``root`` is not a device.
        StateCorruptError: ``state.*`` if persisted state fails its checks.
    """

    def __init__(self, root: Path, faults: Faults | None = None) -> None:
        self.root = root
        self.faults = faults or Faults()
        cfg_path = root / "device.json"
        if not cfg_path.is_file():
            raise UsageError("device.missing", "not an initialised device directory", subject=str(root))
        recover(root)
        self._keystore: KeyStore | None = None
        try:
            cfg = json.loads(read_capped(cfg_path, 64 * 1024))
            self._config = cfg if isinstance(cfg, dict) else {}
            self.instance_id = bytes.fromhex(cfg["instance_id"])
            if cfg["format"] != FORMAT:
                raise ValueError("format")
        except (ValueError, KeyError, TypeError) as exc:
            raise StateCorruptError("state.config", "device.json is unreadable", subject=str(root)) from exc
        if self._config.get("keystore", "software") == "software":
            self._state_key = self._read_secret(root / "keys" / "state.key")
        else:  # the backend decides, never a marker (see the module docstring)
            self._state_key = self._keystore_state_key()
        self._protected_cache: tuple[bytes, PolicyPayload, Board, Policy] | None = None
        if self._artifact_path.is_file():
            self._drop_cleartext_config()  # an install_policy cut short before it removed them
        self._lifecycle_state = "assembly-and-test"
        self._lifecycle_head = b""
        self._lifecycle_error: StateCorruptError | None = None
        try:
            last = open_log(self)  # finishes a lifecycle transition a power cut interrupted
            self._lifecycle_state, self._lifecycle_head = last.to_state, last.digest
        except StateCorruptError as exc:
            self._lifecycle_error = exc  # the state is unknown: every lifecycle-checked operation refuses

    # -- creation ---------------------------------------------------------------------------------

    @classmethod
    def init(cls, root: Path, faults: Faults | None = None, keystore: dict[str, Any] | None = None) -> Device:
        """Creates a device: key pair, instance ID (UEID, random type), empty counters.

        Args:
            keystore: the key-store backend: None (software) or
                ``{"backend": "pkcs11", "module": PATH, "token": LABEL, "pin_file": PATH}``.
        """
        faults = faults or Faults()
        if (root / "device.json").exists():
            raise UsageError("device.exists", "a device already exists here", subject=str(root))
        if keystore is not None and keystore.get("backend") == "pkcs11":
            _open_pkcs11(keystore).close()  # a missing or locked token is refused before anything is written
        for sub in ("keys", "trust", "state", "packages"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "keys", 0o700)
        key_path = root / "keys" / "device.pem"
        for stale in (key_path, root / "keys" / "device.pub.pem"):
            stale.unlink(missing_ok=True)  # left by an init that was cut short
        write_keypair(generate("es256"), key_path)
        instance_id = bytes([UEID_RAND]) + secrets.token_bytes(32)
        # device.json is written last: until it exists, the directory is not a device.
        dev_cfg: dict[str, Any] = {"format": FORMAT, "instance_id": instance_id.hex(), "keystore": "software"}
        generation = None
        if keystore is not None and keystore.get("backend") == "pkcs11":
            dev_cfg["keystore"] = "pkcs11"
            dev_cfg["pkcs11"] = {k: str(keystore[k]) for k in ("module", "token", "pin_file")}
            # this device's part of the token: its objects are labelled <namespace>/<key id>
            dev_cfg["pkcs11"]["namespace"] = hashlib.sha256(instance_id).hexdigest()[:16]
        elif keystore is not None and keystore.get("backend") == "tpm":
            nv_index = 0x01500000 + secrets.randbelow(0x10000)
            dev_cfg["keystore"] = "tpm"
            dev_cfg["tpm"] = {"tcti": str(keystore["tcti"]), "nv_index": nv_index}
            tpm = _open_tpm(dev_cfg["tpm"], root)
            try:
                generation = tpm.counter(nv_index).read()
            finally:
                tpm.close()
        if dev_cfg["keystore"] == "software":
            state_key = secrets.token_bytes(32)
            atomic_write(root / "keys" / "state.key", state_key, faults, mode=0o600)
        else:  # computed in the TPM/token with a key made now: never on disk (see the module docstring)
            (root / "keys" / "state.key").unlink(missing_ok=True)  # left by an init that was cut short
            store = _open_tpm(dev_cfg["tpm"], root) if "tpm" in dev_cfg else _open_pkcs11(dev_cfg["pkcs11"])
            try:
                if not store.exists(STATE_KEY_ID):  # (one left by an init that was cut short is kept)
                    store.generate(STATE_KEY_ID, "hmac-sha256")
                state_key = store.mac(STATE_KEY_ID, _STATE_KEY_LABEL)
            finally:
                store.close()
        atomic_write(root / "state" / "rollback.cose", _seal_counters({}, state_key, generation), faults)
        atomic_write(root / "device.json", json.dumps(dev_cfg, indent=2).encode() + b"\n", faults)
        device = cls(root, faults)
        device.policy_public_key()  # a cut before this point is repaired on first use
        return device

    def _keystore_state_key(self) -> bytes:
        """The state MAC key computed in the TPM/token (which is released again: opened on demand)."""
        try:
            key = self._open_keystore().mac(STATE_KEY_ID, _STATE_KEY_LABEL)
        except UsageError as exc:
            if exc.rule not in ("keystore.missing", "keystore.key-type"):
                raise
            raise StateCorruptError(
                "state.device-key", "device state key is not in the key store", subject=STATE_KEY_ID
            ) from exc
        finally:
            self.close()
        if len(key) != 32:
            raise StateCorruptError("state.device-key", "device state key has the wrong size", subject=STATE_KEY_ID)
        return key

    def _read_secret(self, path: Path, create: bool = False) -> bytes:
        if create and not path.exists():
            atomic_write(path, secrets.token_bytes(32), self.faults, mode=0o600)
        try:
            data = read_capped(path, 64)
        except OSError as exc:
            raise StateCorruptError("state.device-key", "device state key is missing", subject=str(path)) from exc
        if len(data) != 32:
            raise StateCorruptError("state.device-key", "device state key has the wrong size", subject=str(path))
        return data

    # -- trust anchors ----------------------------------------------------------------------------

    def add_anchor(self, pem: bytes, role: str = "microservice") -> bytes:
        """Adds a trust anchor for ``role`` (one of :data:`ANCHOR_ROLES`): microservice signers by default.

        Returns:
            The anchor's signer ID.

        Raises:
            UsageError: ``device.anchor-role`` for an unknown role.
            TrustError: ``lifecycle.locked`` once the device is locked (``ism device lock``): from then on
                anchors change only through signed provisioning bundles (:func:`ism.device.lifecycle.provision`).
        """
        self._require("add a trust anchor", factory=True)
        return self._put_anchor(read_public_pem(pem, "trust anchor"), role)

    def _put_anchor(self, key: PublicKey, role: str) -> bytes:
        """Writes a trust anchor (no lifecycle check: the factory, or a provisioning bundle); idempotent."""
        sid = signer_id(key)
        directory = self._anchor_dir(role)
        directory.mkdir(exist_ok=True)
        path, pem = directory / f"{sid.hex()}.pem", public_pem(key)
        with contextlib.suppress(OSError):
            if read_capped(path, 16 * 1024) == pem:
                return sid
        atomic_write(path, pem, self.faults)
        return sid

    def _require(self, action: str, factory: bool = False) -> None:
        """Refuses ``action`` in the current lifecycle state (``lifecycle.decommissioned``, ``lifecycle.locked``)."""
        require_state(self.lifecycle_state, action, factory=factory)

    @property
    def lifecycle_state(self) -> str:
        """The device's PSA security lifecycle state: the last entry of its lifecycle log.

        Raises:
            StateCorruptError: ``state.*`` if the log (or the counters it is checked against) failed its
                checks when the device was opened.
        """
        if self._lifecycle_error is not None:
            raise self._lifecycle_error
        return self._lifecycle_state

    @property
    def lifecycle_head(self) -> bytes:
        """The head of the device's lifecycle log: the SHA-256 digest of its last entry (32 bytes).

        Attested as the ``lifecycle-log`` claim (docs/attestation.md).

        Raises:
            StateCorruptError: as :attr:`lifecycle_state`.
        """
        if self._lifecycle_error is not None:
            raise self._lifecycle_error
        return self._lifecycle_head

    def _anchor_dir(self, role: str) -> Path:
        if role not in ANCHOR_ROLES:
            raise UsageError("device.anchor-role", f"a trust anchor's role is one of {list(ANCHOR_ROLES)}", got=role)
        return self.root / "trust" if role == "microservice" else self.root / "trust" / role

    def remove_anchor(self, sid: bytes, role: str) -> bool:
        """Removes the ``role`` trust anchor with signer ID ``sid``; False if there was none.

        Raises:
            TrustError: ``lifecycle.locked`` once the device is locked (as :meth:`add_anchor`).
        """
        self._require("remove a trust anchor", factory=True)
        return self._drop_anchor(sid, role)

    def _drop_anchor(self, sid: bytes, role: str) -> bool:
        path = self._anchor_dir(role) / f"{sid.hex()}.pem"
        if not path.is_file():
            return False
        atomic_remove(path, self.faults)
        return True

    def anchors(self, role: str = "microservice") -> list[PublicKey]:
        """The provisioned trust anchors of ``role``; a file that does not match its name is ignored."""
        out = []
        for path in sorted(self._anchor_dir(role).glob("*.pem")):
            try:
                key = read_public_pem(read_capped(path, 16 * 1024), str(path))
            except (FormatError, OSError):
                continue
            if signer_id(key).hex() == path.stem:
                out.append(key)
        return out

    # -- counters ---------------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        """Anti-rollback counters by microservice UUID, verified against their MAC."""
        path = self.root / "state" / "rollback.cose"
        try:
            data = read_capped(path, MAX_STATE_SIZE)
        except FileNotFoundError:
            raise StateCorruptError("state.rollback-missing", "anti-rollback counters are missing") from None
        counters = _open_counters(data, self._state_key)
        self._check_fresh(data)
        return counters

    def advance_counter(self, name: str, value: int) -> None:
        """Raises the anti-rollback counter ``name`` to ``value`` (never lowers it)."""
        counters = self.counters()
        if value > counters.get(name, 0):
            counters[name] = value
            self._store_counters(counters)

    def hardware_counter(self, offset: int = 0) -> Any:
        """A monotonic TPM NV counter of this device, or None without a TPM.

        Offset 0 is the anti-rollback counters' freshness root; other freshness roots (the secure
        storage's) use their own offset from the device's NV index.
        """
        if self._config.get("keystore") != "tpm":
            return None
        return self._open_keystore().counter(int(self._config["tpm"]["nv_index"]) + offset)  # type: ignore[attr-defined]

    def _nv_counter(self) -> Any:
        return self.hardware_counter()

    def _check_fresh(self, data: bytes) -> None:
        """On a TPM-backed device, the counters file must carry the TPM counter's current value.

        The file is written with generation n+1 before the TPM counter moves to n+1: a file one
        ahead means the power failed in between (finish the increment); a file behind is a replay.
        """
        nv = self._nv_counter()
        if nv is None:
            return
        generation, current = _counters_generation(data, self._state_key), nv.read()
        if generation == current + 1:
            nv.increment()
        elif generation != current:
            raise StateCorruptError(
                "state.rollback-replay",
                "the anti-rollback counters are older than the TPM's monotonic counter: a replayed copy",
                got=generation,
                expected=current,
            )

    def _store_counters(self, counters: dict[str, int]) -> None:
        nv = self._nv_counter()
        generation = None if nv is None else nv.read() + 1
        atomic_write(
            self.root / "state" / "rollback.cose", _seal_counters(counters, self._state_key, generation), self.faults
        )
        if nv is not None:
            self.faults.point("rollback.cose:tpm-increment")
            nv.increment()

    # -- packages ---------------------------------------------------------------------------------

    def package_path(self, ms_uuid: uuidlib.UUID | str) -> Path:
        return self.root / "packages" / f"{ms_uuid}.suit"

    def _downgrade_path(self, ms_uuid: uuidlib.UUID | str) -> Path:
        return self.root / "packages" / f"{ms_uuid}.downgrade.cose"

    def install(self, data: bytes, downgrade: bytes | None = None) -> Accepted:
        """Verifies a package as secure boot would, then stages it.

        Nothing is written unless every check passes. The anti-rollback counter
        is not advanced here: it moves when boot accepts the package.
        """
        self._require("install a package")
        if len(data) > MAX_PACKAGE_SIZE:
            raise FormatError(
                "package.size",
                "package is larger than the device accepts",
                got=len(data),
                expected=f"<= {MAX_PACKAGE_SIZE}",
            )
        if downgrade is not None and len(downgrade) > MAX_AUTH_SIZE:
            raise FormatError("downgrade.size", "downgrade authorisation is too large")
        accepted = check_package(data, self.anchors(), self.counters(), self.instance_id, downgrade)
        self._check_against_policy(accepted)
        ms = accepted.package.meta.uuid
        lifecycle = MicroserviceStates(self)
        # a banned UUID, or one bound to another signer, is refused before anything is written
        dg_signer = cose.parse(downgrade, expect="sign1").kid if downgrade is not None and accepted.downgraded else None
        lifecycle.check_install(ms, accepted.signer, dg_signer)
        if downgrade is not None and accepted.downgraded:
            atomic_write(self._downgrade_path(ms), downgrade, self.faults)
        atomic_write(self.package_path(ms), data, self.faults)
        if not accepted.downgraded:
            atomic_remove(self._downgrade_path(ms), self.faults)
        lifecycle.installed(ms, accepted.signer)
        return accepted

    def forget_package(self, ms_uuid: uuidlib.UUID | str) -> None:
        """Removes a microservice's package, downgrade authorisation and sealed boot record (lifecycle removal).

        Its anti-rollback counter stays: an older version cannot come back by reinstalling it.
        """
        ms = str(ms_uuid)
        atomic_remove(self.package_path(ms), self.faults)
        atomic_remove(self._downgrade_path(ms), self.faults)
        sealed = self._load_sealed()
        if sealed.pop(ms, None) is not None:
            self._store_sealed(sealed)

    def _check_against_policy(self, accepted: Accepted) -> None:
        """Static check at install: the module may import only what its policy grants."""
        if not self.configured():
            return
        entry = self.policy().get(accepted.package.meta.uuid)
        if entry is not None:
            check_module(entry, wasm.parse_module(accepted.package.payload))

    # -- configuration: board file and access policy ----------------------------------------------

    def configured(self) -> bool:
        return self._artifact_path.is_file() or (self.root / "config" / "policy.toml").is_file()

    def protected(self) -> bool:
        """True once the device takes only signed, encrypted policies.

        That is: it has a policy signer anchor, a protected policy, or a policy
        counter above 0 (it had one: the MAC'd counter outlives a deleted artifact).
        """
        return (
            self._artifact_path.is_file() or bool(self.anchors("policy")) or self.counters().get(POLICY_COUNTER, 0) > 0
        )

    def configure(self, board_text: str, policy_text: str) -> Policy:
        """Installs a board file and an access policy (both validated first; written atomically).

        The policy is checked against the installed packages before anything is
        written, so a policy that grants a gateway to a missing operation, or
        that does not grant what an installed module imports, is refused.

        Raises:
            TrustError: ``policy.protected`` once the device has a policy signer or a
                protected policy: from then on only :meth:`install_policy` changes it;
                ``lifecycle.locked`` once the device is locked (a cleartext policy is a factory step).
        """
        self._require("take a cleartext configuration", factory=True)
        if self.protected():
            raise TrustError(
                "policy.protected",
                "this device takes only signed, encrypted policies ('ism device policy')",
                subject=str(self.root),
            )
        board = parse_board(board_text, "board.toml")
        policy = parse_policy(policy_text, board, "policy.toml")
        self._check_installed(policy)
        config = self.root / "config"
        config.mkdir(exist_ok=True)
        atomic_write(config / "board.toml", board_text.encode(), self.faults)
        atomic_write(config / "policy.toml", policy_text.encode(), self.faults)
        return policy

    def _check_installed(self, policy: Policy) -> None:
        """What a new policy must pass against the installed packages (``policy.gateway``, ``policy.capability``)."""
        for ms in self.installed():
            try:
                pkg = read_package(suit.parse_envelope(read_capped(self.package_path(ms), MAX_PACKAGE_SIZE)))
            except IsmError:
                continue  # boot reports it; a broken package constrains nothing
            entry = policy.get(pkg.meta.uuid)
            if entry is not None:
                check_module(entry, wasm.parse_module(pkg.payload))

    def board(self) -> Board:
        """The board file: from the protected policy artifact when there is one, else from config/board.toml."""
        self._require("read its board")
        if self._artifact_path.is_file():
            return self._protected()[1]
        return parse_board(self._cleartext("board.toml"), "board.toml")

    def policy(self) -> Policy:
        """The access policy: decrypted from the protected artifact when there is one, else config/policy.toml."""
        self._require("read its policy")
        if self._artifact_path.is_file():
            return self._protected()[2]
        return parse_policy(self._cleartext("policy.toml"), self.board(), "policy.toml")

    def _cleartext(self, name: str) -> str:
        """A cleartext configuration file, unless the device ever had a protected policy.

        Raises:
            TrustError: ``policy.protected`` if the policy counter is above 0 but the artifact is
                gone: a cleartext policy in its place (written offline) is not used.
        """
        if self.counters().get(POLICY_COUNTER, 0) > 0:
            raise TrustError(
                "policy.protected",
                "the protected policy is missing; this device does not use a cleartext policy",
                subject=str(self.root),
            )
        return self._config_text(name)

    # -- the protected access policy ---------------------------------------------------------------

    @property
    def _artifact_path(self) -> Path:
        return self.root / "config" / "policy.cose"

    def policy_public_key(self) -> bytes:
        """The SubjectPublicKeyInfo DER of the device policy key (created in the key store on first use)."""
        keystore = self.keystore()
        if not keystore.exists(POLICY_KEY_ID):
            keystore.generate(POLICY_KEY_ID, "ecc-p256")
        return keystore.public_key(POLICY_KEY_ID)

    def _open_policy(self, data: bytes) -> tuple[PolicyPayload, Board, Policy]:
        """Verify (policy signers only), decrypt (through the key store), decode, check the device, compile."""
        if len(data) > MAX_POLICY_SIZE:
            raise FormatError(
                "policy.artifact-size",
                "policy artifact is larger than the device accepts",
                got=len(data),
                expected=f"<= {MAX_POLICY_SIZE}",
            )
        self.policy_public_key()
        payload = decode_payload(open_sealed(data, anchor_map(self.anchors("policy")), self.keystore(), POLICY_KEY_ID))
        if payload.instance_id != self.instance_id:
            raise TrustError(
                "policy.device",
                "the policy is for another device",
                got=payload.instance_id,
                expected=self.instance_id,
            )
        board, policy = payload.compile()
        return payload, board, policy

    def _protected(self) -> tuple[PolicyPayload, Board, Policy]:
        """The stored artifact, verified and decrypted (in memory only), and its counter reconciled.

        A stored version below the counter is an offline rollback of the file
        (``policy.rollback``); one above it means an install was cut between
        writing the artifact and advancing the counter: the counter rolls forward.
        """
        try:
            data = read_capped(self._artifact_path, MAX_POLICY_SIZE)
        except OSError as exc:
            raise StateCorruptError("state.config", "the policy artifact is unreadable") from exc
        digest = hashlib.sha256(data).digest()
        cached = self._protected_cache
        if cached is not None and cached[0] == digest:
            return cached[1], cached[2], cached[3]
        payload, board, policy = self._open_policy(data)
        counters = self.counters()
        counter = counters.get(POLICY_COUNTER, 0)
        if payload.version < counter:
            raise RollbackError(
                "policy.rollback",
                "the stored policy is older than the policy counter: an older artifact was put back",
                got=payload.version,
                expected=f">= {counter}",
            )
        if payload.version > counter:
            counters[POLICY_COUNTER] = payload.version
            self._store_counters(counters)
        self._protected_cache = (digest, payload, board, policy)
        return payload, board, policy

    def install_policy(self, data: bytes) -> Policy:
        """Installs a protected policy artifact (``ism policy compile``).

        It takes effect at the next start, or on a running device through
        ``Runtime.reload_policy`` (``ism device run`` looks for it twice a second).

        Checks, in order: size, signature by a policy signer anchor, decryption
        with the device policy key (in the key store), payload format, this
        device's instance ID, version above the policy counter, board file and
        policy, and the installed modules against the new policy. Only then is
        the artifact written (``config/policy.cose``, atomically), the counter
        advanced and any cleartext configuration removed. A power cut at any
        point leaves the old policy or the new one (an artifact newer than the
        counter rolls the counter forward when it is next read).

        Raises:
            SignatureError: ``policy.unsigned``, ``policy.signature``, ``policy.decrypt``.
            UntrustedSignerError: ``policy.signer`` (foreign key, or a microservice signer's).
            TrustError: ``policy.recipient``, ``policy.device``.
            RollbackError: ``policy.rollback`` (older than, or the same version as, the current policy).
            FormatError: ``policy.artifact*``, ``board.*``, ``policy.*``.
            TrustError: ``lifecycle.decommissioned``.
        """
        self._require("install a policy")
        payload, _, policy = self._open_policy(data)
        if self._artifact_path.is_file():
            with contextlib.suppress(IsmError):
                self._protected()  # rolls the counter forward if an earlier install was cut short
        counters = self.counters()
        counter = counters.get(POLICY_COUNTER, 0)
        if payload.version <= counter:
            raise RollbackError(
                "policy.rollback",
                "the policy's version is not above the device's policy counter (older, or replayed)",
                got=payload.version,
                expected=f"> {counter}",
            )
        self._check_installed(policy)
        self._artifact_path.parent.mkdir(exist_ok=True)
        atomic_write(self._artifact_path, data, self.faults)
        self._protected_cache = None
        counters[POLICY_COUNTER] = payload.version
        self._store_counters(counters)
        self._drop_cleartext_config()
        return policy

    def _drop_cleartext_config(self) -> None:
        for name in ("policy.toml", "board.toml"):
            path = self.root / "config" / name
            if path.exists():
                atomic_remove(path, self.faults)

    def _config_text(self, name: str) -> str:
        path = self.root / "config" / name
        try:
            return read_capped(path, MAX_STATE_SIZE).decode("utf-8")
        except FileNotFoundError:
            raise UsageError(
                "device.unconfigured",
                "no board file and policy installed; run 'ism device configure'",
                subject=str(self.root),
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise StateCorruptError("state.config", f"{name} is unreadable", subject=str(path)) from exc

    # -- the key store (HSM platform abstraction) ------------------------------------------------

    def keystore(self) -> KeyStore:
        """The device's key store, as configured in device.json (``software`` unless set otherwise).

        Raises:
            TrustError: ``lifecycle.decommissioned``: a decommissioned device's keys are gone.
        """
        self._require("use a key")
        return self._open_keystore()

    def _open_keystore(self) -> KeyStore:
        """The key store without the lifecycle check (the TPM's NV counter; erasing keys)."""
        if self._keystore is None:
            cfg = self._config.get("keystore", "software")
            if cfg == "software":
                root = self._read_secret(self.root / "keys" / "root.key", create=True)
                self._keystore = SoftwareKeyStore(_KeyDir(self.root / "keys" / "store", self.faults), root)
            elif cfg == "pkcs11":
                self._keystore = _open_pkcs11(self._config.get("pkcs11", {}))
            elif cfg == "tpm":
                self._keystore = _open_tpm(self._config.get("tpm", {}), self.root)
            else:
                raise StateCorruptError("state.config", "unknown key store backend", got=cfg)
        return self._keystore

    def close(self) -> None:
        """Releases the key store (a TPM or token session), if one was opened."""
        store, self._keystore = self._keystore, None
        closer = getattr(store, "close", None)
        if callable(closer):
            closer()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def state_mac_key(self) -> bytes:
        """The key that MACs the device's state files (for services that seal state of their own)."""
        return self._state_key

    def identity_ca(self) -> bytes | None:
        path = self.root / "keys" / "identity-ca.der"
        return path.read_bytes() if path.is_file() else None

    def store_identity_ca(self, der: bytes) -> None:
        atomic_write(self.root / "keys" / "identity-ca.der", der, self.faults)

    def outbox(self) -> Outbox:
        return Outbox(self.root / "state" / "outbox.sqlite")

    def installed(self) -> list[str]:
        return sorted(p.name.removesuffix(".suit") for p in (self.root / "packages").glob("*.suit"))

    def boot(self, full: bool = False) -> BootReport:
        """Secure and measured boot of every installed microservice, each independently.

        Args:
            full: re-parse and re-verify every package even when its sealed boot
                record shows it unchanged since a full verification.

        A package in the slot of a removed or banned microservice is refused
        (``ms-lifecycle.removed``, ``ms-lifecycle.banned``); a suspended or
        quarantined one is verified but *held*: not in ``accepted``, in ``held``
        (``ms-lifecycle.suspended``, ``ms-lifecycle.quarantined``).

        Raises:
            TrustError: ``lifecycle.decommissioned``: nothing boots on a decommissioned device.
        """
        self._require("boot")
        lifecycle = MicroserviceStates(self)
        lifecycle.load()  # first: it may roll its counter forward, and the counters are read next
        anchors = anchor_map(self.anchors())
        counters = self.counters()
        before = dict(counters)
        existing = self._load_sealed()
        sealed = {} if full else existing
        fresh: dict[str, Sealed] = {}
        entries: list[BootEntry] = []
        booted: list[Booted] = []
        held: list[Booted] = []
        for ms in self.installed():
            try:
                refusal = lifecycle.boot_refusal(ms)
                if refusal is not None:
                    raise refusal
                result, record = self._boot_one(ms, anchors, counters, sealed.get(ms))
                bound = lifecycle.signer_refusal(ms, result.signer)
                if bound is not None:  # another developer's package put in this slot
                    raise bound
            except IsmError as exc:
                entries.append(_refused(ms, self.package_path(ms), exc))
                continue
            fresh[ms] = record
            counters[str(result.uuid)] = result.sequence
            hold = lifecycle.hold(ms)
            (held if hold is not None else booted).append(result)
            entries.append(
                BootEntry(
                    str(result.uuid),
                    result.name,
                    result.version,
                    result.sequence,
                    result.measurement.hex(),
                    result.signer.hex(),
                    "booted" if hold is None else "held",
                    rule=hold.rule if hold is not None else None,
                    message=hold.message if hold is not None else None,
                    code=int(hold.code) if hold is not None else None,
                    downgraded=result.downgraded,
                    verified=result.verified,
                )
            )
        if counters != before:
            self._store_counters(counters)
        if fresh != existing:
            self._store_sealed(fresh)
        return BootReport(self.instance_id.hex(), tuple(entries), tuple(booted), tuple(held))

    def _boot_one(
        self, ms: str, anchors: Anchors, counters: dict[str, int], sealed: Sealed | None
    ) -> tuple[Booted, Sealed]:
        dg_path = self._downgrade_path(ms)
        try:
            data = read_capped(self.package_path(ms), MAX_PACKAGE_SIZE)
            downgrade = read_capped(dg_path, MAX_AUTH_SIZE) if dg_path.exists() else None
        except OSError as exc:  # one unreadable slot must not stop the others from booting
            raise PlatformError("boot.read", f"cannot read the stored package: {exc.strerror}", subject=ms) from exc
        if len(data) > MAX_PACKAGE_SIZE:
            raise FormatError("package.size", "stored package is larger than the device accepts")
        if sealed is not None and str(uuidlib.UUID(bytes=sealed.uuid)) == ms:
            try:
                check_sealed(sealed, hashlib.sha256(data).digest(), anchors, counters)
                payload = data[sealed.payload_offset : sealed.payload_offset + sealed.payload_length]
                return Booted.from_sealed(sealed, payload), sealed
            except TrustError:
                pass  # changed, re-anchored or below the counter: verify it in full
        acc = check_package(data, anchors, counters, self.instance_id, downgrade, check_wasm=False)
        if str(acc.package.meta.uuid) != ms:
            raise TrustError(
                "boot.slot",
                "package is stored under another microservice's slot",
                got=str(acc.package.meta.uuid),
                expected=ms,
            )
        record = seal(acc, data)
        return Booted.from_sealed(record, acc.package.payload, verified="full"), record

    def _load_sealed(self) -> dict[str, Sealed]:
        """Sealed boot records; anything unreadable means none (every package is then verified in full)."""
        try:
            data = read_capped(self.root / "state" / "sealed.cose", MAX_STATE_SIZE)
            msg = cose.parse(data, expect="mac0")
            cose.verify_mac0(msg, self._state_key)
            body = cbor.loads(msg.payload or b"")
            if not isinstance(body, dict) or body.get(1) != FORMAT or not isinstance(body.get(2), dict):
                return {}
            return {str(k): Sealed.decode(v) for k, v in body[2].items()}
        except (OSError, IsmError):
            return {}

    def _store_sealed(self, records: dict[str, Sealed]) -> None:
        body = cbor.dumps({1: FORMAT, 2: {k: v.encode() for k, v in records.items()}})
        atomic_write(self.root / "state" / "sealed.cose", cose.mac0(body, self._state_key), self.faults)

    def info(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id.hex(),
            "keystore": self._config.get("keystore", "software"),
            "trust_anchors": [signer_id(k).hex() for k in self.anchors()],
            "policy_signers": [signer_id(k).hex() for k in self.anchors("policy")],
            "policy_key": None
            if self.lifecycle_state == "decommissioned"
            else pem_from_der(self.policy_public_key()).decode(),
            "counters": self.counters(),
            "installed": self.installed(),
            "lifecycle": self.lifecycle_state,
            "lifecycle_log": log_json(self),
        }


def _open_tpm(config: dict[str, Any], root: Path) -> Any:
    """The TPM key store a device configuration names (key files in DIR/keys/tpm)."""
    try:
        from ism.crypto.keystore.tpm import TpmKeyStore
    except ImportError as exc:
        raise UsageError("device.keystore", "the tpm backend needs tpm2-pytss (pip install 'ism[tpm]')") from exc
    try:
        tcti = str(config["tcti"])
    except (KeyError, TypeError) as exc:
        raise UsageError("device.keystore", "tpm key store configuration needs a tcti") from exc
    return TpmKeyStore(tcti, root / "keys" / "tpm")


def _open_pkcs11(config: dict[str, Any]) -> Any:
    """The PKCS#11 key store a device configuration names (the PIN is read from its file).

    The store is confined to the configuration's ``namespace`` (set by :meth:`Device.init`: the
    first 16 hex digits of SHA-256(instance ID)), so devices sharing a token never see each
    other's keys. A configuration without one (a device.json made before namespaces) keeps the
    bare key ids as labels, for backwards compatibility: such devices still share one token's keys.
    """
    from ism.crypto.keystore.pkcs11 import Pkcs11KeyStore

    try:
        pin = Path(config["pin_file"]).read_text().strip()
        module, token = str(config["module"]), str(config["token"])
    except (KeyError, TypeError, OSError) as exc:
        raise UsageError("device.keystore", f"pkcs11 key store configuration unusable: {exc}") from exc
    return Pkcs11KeyStore(module, token, pin, namespace=config.get("namespace"))


def _refused(ms: str, path: Path, exc: IsmError) -> BootEntry:
    """A refusal entry; identity fields are what the envelope claims, when it parses."""
    claimed: dict[str, Any] = {}
    with contextlib.suppress(IsmError, OSError):
        claimed = claimed_identity(suit.parse_envelope(read_capped(path, MAX_PACKAGE_SIZE)))
    return BootEntry(
        ms,
        claimed.get("name"),
        claimed.get("version"),
        claimed.get("sequence"),
        claimed.get("measurement"),
        None,
        "refused",
        exc.rule,
        exc.message,
        int(exc.code),
    )


def _seal_counters(counters: dict[str, int], key: bytes, generation: int | None = None) -> bytes:
    body: dict[int, Any] = {1: FORMAT, 2: counters}
    if generation is not None:
        body[3] = generation
    return cose.mac0(cbor.dumps(body), key)


def _counters_generation(data: bytes, key: bytes) -> int | None:
    """The freshness generation sealed with the counters (TPM-backed devices), if any."""
    msg = cose.parse(data, expect="mac0")
    cose.verify_mac0(msg, key)
    body = cbor.loads(msg.payload or b"")
    generation = body.get(3) if isinstance(body, dict) else None
    return generation if isinstance(generation, int) and not isinstance(generation, bool) else None


def _open_counters(data: bytes, key: bytes) -> dict[str, int]:
    try:
        msg = cose.parse(data, expect="mac0")
        cose.verify_mac0(msg, key)
        assert msg.payload is not None
        body = cbor.loads(msg.payload)
    except (IsmError, AssertionError) as exc:
        raise StateCorruptError(
            "state.rollback-integrity", "anti-rollback counters fail their integrity check"
        ) from exc
    counters = body.get(2) if isinstance(body, dict) and body.get(1) == FORMAT else None
    if not isinstance(counters, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in counters.items()
    ):
        raise StateCorruptError("state.rollback-integrity", "anti-rollback counters are malformed")
    return dict(counters)
