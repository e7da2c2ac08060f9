"""The TPM 2.0 key store: keys are TPM objects wrapped under a storage primary key; only this TPM can use them.

Owns: talking to a TPM 2.0 through ``tpm2-pytss`` (ESAPI over any TCTI:
``device:/dev/tpmrm0``, ``swtpm:host=...,port=...``, ``mssim:...``); the
storage primary key; the key files ``<state_dir>/<key_id>.tpmkey``; mapping
every TSS/TPM failure to an iSM error at this edge; and :class:`TpmCounter`,
a monotonic NV counter for anti-rollback.
Must not import: device, hypervisor or anything above.

Threat: private and secret keys leaking from the host or its disk. Keys live
in files under ``state_dir`` as TPM-wrapped blobs (``TPM2B_PUBLIC`` +
``TPM2B_PRIVATE``): the private part is encrypted and integrity-protected
under a storage primary key that the TPM derives from its owner-hierarchy
seed, so a stolen key file is useless without *this* TPM (and its current
owner seed). Blob and key id are bound: every TPM object's ``authPolicy``
is ``SHA-256("ism-tpm-key" 0x00 key_id 0x00 role)`` and, after the TPM has
loaded a blob (which proves the public area belongs to the private part),
the store checks that tag and the rest of the template; a blob copied to
another key id or role is refused (``keystore.integrity``).

Objects per key type (all children of the storage primary, ``nameAlg``
SHA-256, ``userWithAuth``, empty auth value, ``noDA``):

===============  ===========================================================  =============================
iSM type         TPM objects in the key file (role)                           operations in the TPM
===============  ===========================================================  =============================
``ecc-p256``     ECC NIST P-256 key, ``sign`` + ``decrypt``, not restricted,  ``TPM2_Sign`` (host hashes,
                 scheme NULL (each ``TPM2_Sign`` names ECDSA/SHA-256)         ECDSA/SHA-256),
                                                                              ``TPM2_ECDH_ZGen``
``hmac-sha256``  keyed-hash HMAC-SHA-256 key; plus the HKDF PRK as another    ``TPM2_HMAC`` / HMAC sequence
                 keyed-hash HMAC key (role ``prk``)
``aes-256``      sealed data object holding the 32-byte key; plus ``prk``     ``TPM2_Unseal`` (see below)
===============  ===========================================================  =============================

What never leaves the TPM (is never in host memory, in clear, after the
moment described):

* the storage primary key and the owner seed it is derived from;
* the private scalar of a *generated* ``ecc-p256`` key (created inside the
  TPM with ``fixedTPM``/``fixedParent``/``sensitiveDataOrigin``: it exists
  outside the TPM only inside its wrapped blob);
* the private scalar of an *imported* ``ecc-p256`` key once
  :meth:`TpmKeyStore.import_key` returns (it arrives by ``TPM2_Import``,
  wrapped to the primary key with an ECDH seed and an inner AES-128-CFB key;
  the TPM requires imported objects to have ``fixedTPM``/``fixedParent``
  clear, but ``TPM2_Duplicate`` needs a policy session matching the
  object's ``authPolicy``, which is the tag above, a digest no policy
  command sequence can reach);
* an ``hmac-sha256`` key and every PRK once the key is stored (they go in by
  ``TPM2_Create`` with caller-supplied sensitive data, ``fixedTPM`` and
  ``fixedParent`` set, and no operation unseals them).

What transits host memory (buffers holding secrets are overwritten
afterwards, which is best effort in Python: ``bytes`` copies made by the
libraries are not):

* ``generate`` of ``aes-256``/``hmac-sha256``: the 32 random bytes (from
  ``TPM2_GetRandom``) and their PRK, once, while the objects are created.
  HKDF-Extract needs the key as a *message*, which no TPM command can take
  from a loaded key, so the PRK is computed on the host at creation time.
* ``import_key``: the material the caller passed (it was already on the
  host) and, for ``aes-256``/``hmac-sha256``, its PRK.
* ``encrypt``/``decrypt`` (``aes-256``): TPMs offer no AES-GCM (swtpm's
  ``TPM2_EncryptDecrypt`` offers CFB, CTR, OFB, CBC and ECB only, and the
  command is optional: not every TPM implements it), so an ``aes-256`` key is
  a sealed 32-byte secret: each call unseals it into host memory
  (``TPM2_Unseal``, response encrypted on the TPM bus), runs one AES-GCM
  operation with ``cryptography`` and drops the key. The AES key is thus in
  host memory for the duration of every ``encrypt``/``decrypt`` and is
  recoverable by anyone who can both read the key file and send commands to
  the TPM. Plaintext, associated data, nonce and ciphertext are on the host
  as in every backend.
* ``sign``/``verify``: the SHA-256 of the message (hashed on the host) and
  the signature. ``verify`` loads the key in the TPM (binding check) and
  verifies with ``cryptography`` against the TPM-checked public area.
* ``mac``: its input and output.
* ``ecdh``: the peer's public key and the shared secret, by design of the
  interface (the software store returns it too): ``TPM2_ECDH_ZGen`` returns
  the point ``Z``, whose X coordinate (32 bytes) is the secret; the private
  scalar stays in the TPM. ``ZGen`` needs the ``decrypt`` attribute on an
  unrestricted key whose scheme is NULL or ECDH, and a key that also signs
  must have scheme NULL, so ``ecc-p256`` keys are created ``sign`` +
  ``decrypt`` with scheme NULL and every ``TPM2_Sign`` passes ECDSA/SHA-256
  explicitly: the same key signs and agrees, as in the software store (a
  scheme-NULL key would also sign with the TPM's other ECC schemes for
  whoever holds its key file and this TPM; the store uses ECDSA only).
  Key files written before ECDH support hold sign-only keys (scheme
  ECDSA/SHA-256, no ``decrypt``): they still load, sign and verify, and
  refuse ``ecdh`` with ``keystore.key-usage`` (TPM object attributes cannot
  change).
* ``derive`` (HKDF-SHA-256, no salt, 32 bytes, equal to the software
  backend): Expand runs in the TPM, ``OKM = TPM2_HMAC(PRK, info || 0x01)``;
  the output key and its own PRK then transit host memory while the new
  objects are created. Note that the ``prk`` object is an HMAC oracle whose
  outputs *are* derived keys: whoever can read the key file and send
  commands to this TPM can compute every key derivable from it (as with the
  PKCS#11 backend's ``C_DigestKey`` path).

The TPM bus: every command that carries or returns a secret (``Create``
with sensitive data, ``Import``'s inner key, ``Unseal``, ``HMAC``,
``GetRandom``, ``ECDH_ZGen``'s point Z) runs in an HMAC session salted to
the storage primary key with AES-128-CFB parameter encryption, so a
passive observer of the TPM bus or socket sees no key material. The primary
key's name is pinned in ``state_dir/primary.name`` on first use (trust on first use): a later open
against another TPM, a cleared owner hierarchy or an interposer answering
with its own key is refused (``keystore.integrity``).

``destroy`` deletes the key file. A copy of the file made earlier remains
loadable on this TPM until its owner seed changes (``TPM2_Clear``): erasure
is of the file, not in the TPM.

Errors: TPM not reachable (TCTI failure), not started or in failure mode →
``keystore.unavailable``; no such key → ``keystore.missing``; a peer key
that is not a P-256 SubjectPublicKeyInfo with its point on the curve →
``keystore.peer-key``; a key file
that does not parse, fails the TPM's integrity check or is bound to another
id → ``keystore.integrity``; a GCM tag or signature that fails →
:class:`~ism.errors.SignatureError`; any other TPM or TSS refusal →
``keystore.token``; use after :meth:`TpmKeyStore.close` → ``keystore.closed``.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_ECC,
    TPM2_NT,
    TPM2_RC,
    TPM2_RH,
    TPM2_SE,
    TPM2_ST,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_SESSION,
    TSS2_RC,
)
from tpm2_pytss.types import (
    TPM2B_ECC_PARAMETER,
    TPM2B_ECC_POINT,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPMS_ECC_PARMS,
    TPMS_ECC_POINT,
    TPMS_KEYEDHASH_PARMS,
    TPMS_NV_PUBLIC,
    TPMS_SCHEME_HASH,
    TPMS_SENSITIVE_CREATE,
    TPMT_ECC_SCHEME,
    TPMT_KDF_SCHEME,
    TPMT_KEYEDHASH_SCHEME,
    TPMT_PUBLIC,
    TPMT_SENSITIVE,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMT_SYM_DEF_OBJECT,
    TPMT_TK_HASHCHECK,
    TPMU_ASYM_SCHEME,
    TPMU_PUBLIC_ID,
    TPMU_PUBLIC_PARMS,
    TPMU_SCHEME_KEYEDHASH,
    TPMU_SENSITIVE_COMPOSITE,
    TPMU_SIG_SCHEME,
    TPMU_SYM_KEY_BITS,
    TPMU_SYM_MODE,
)
from tpm2_pytss.utils import wrap

from ism.crypto.keystore import KeyType, check_key_id, check_key_type, load_p256_peer, load_p256_private
from ism.errors import FormatError, PlatformError, SignatureError, StateCorruptError, UsageError
from ism.formats import cbor

__all__ = ["TpmCounter", "TpmKeyStore"]

_SIZES: Final = {"aes-256": 32, "hmac-sha256": 32}
#: The roles of the objects in a key file, in order (the first one is the key itself).
_LAYOUT: Final[dict[str, tuple[str, ...]]] = {
    "ecc-p256": ("ecc-p256",),
    "hmac-sha256": ("hmac-sha256", "prk"),
    "aes-256": ("aes-256", "prk"),
}
_SUFFIX: Final = ".tpmkey"
_FORMAT: Final = "ism-tpm-key-v1"
_PRIMARY_NAME: Final = "primary.name"
#: TPM2B_MAX_BUFFER: the most data one TPM2_HMAC / TPM2_SequenceUpdate takes.
_MAX_BUFFER: Final = 1024
#: HKDF-Extract with no salt: HMAC keyed with HashLen zero bytes.
_ZERO_SALT: Final = bytes(32)

_AES128_CFB: Final = TPMT_SYM_DEF_OBJECT(
    algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
)
_SESSION_SYMMETRIC: Final = TPMT_SYM_DEF(
    algorithm=TPM2_ALG.AES, keyBits=TPMU_SYM_KEY_BITS(aes=128), mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB)
)
_ECDSA_SHA256: Final = TPMT_SIG_SCHEME(
    scheme=TPM2_ALG.ECDSA, details=TPMU_SIG_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
)
#: Signing an externally hashed digest with an unrestricted key needs only a NULL ticket.
_NULL_TICKET: Final = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)

_A = TPMA_OBJECT
_CHILD_ATTRIBUTES: Final = _A.USERWITHAUTH | _A.NODA
_FIXED: Final = _A.FIXEDTPM | _A.FIXEDPARENT

#: TPM response codes meaning "there is no usable TPM", not "the TPM refused".
_UNAVAILABLE_RCS: Final = frozenset({int(TPM2_RC.INITIALIZE), int(TPM2_RC.FAILURE), int(TPM2_RC.REBOOT)})


def _storage_primary_template() -> TPM2B_PUBLIC:
    """The usual ECC P-256 storage root key template (as ``tpm2_createprimary -G ecc``): deterministic per TPM."""
    return TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=_FIXED | _A.SENSITIVEDATAORIGIN | _A.USERWITHAUTH | _A.NODA | _A.RESTRICTED | _A.DECRYPT,
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=_AES128_CFB,
                    scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    )


def _tag(key_id: str, role: str) -> bytes:
    """The ``authPolicy`` that binds an object to its key id and role."""
    return hashlib.sha256(b"ism-tpm-key\x00" + key_id.encode() + b"\x00" + role.encode()).digest()


def _template(key_id: str, role: str, *, imported: bool = False, sign_only: bool = False) -> TPMT_PUBLIC:
    """The public template of the object playing ``role`` in key ``key_id`` (``unique`` left empty).

    ``sign_only``: the ``ecc-p256`` template of key files written before ECDH
    support (no ``decrypt``, scheme ECDSA/SHA-256); still accepted, never created.
    """
    tag = _tag(key_id, role)
    if role == "ecc-p256":
        attributes = _CHILD_ATTRIBUTES | _A.SIGN_ENCRYPT
        if sign_only:
            scheme = TPMT_ECC_SCHEME(
                scheme=TPM2_ALG.ECDSA, details=TPMU_ASYM_SCHEME(ecdsa=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
            )
        else:  # sign and ECDH (TPM2_ECDH_ZGen): a key with both needs scheme NULL
            attributes |= _A.DECRYPT
            scheme = TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL)
        if not imported:
            attributes |= _FIXED | _A.SENSITIVEDATAORIGIN
        return TPMT_PUBLIC(
            type=TPM2_ALG.ECC,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=attributes,
            authPolicy=tag,
            parameters=TPMU_PUBLIC_PARMS(
                eccDetail=TPMS_ECC_PARMS(
                    symmetric=TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL),
                    scheme=scheme,
                    curveID=TPM2_ECC.NIST_P256,
                    kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                )
            ),
        )
    if role in ("hmac-sha256", "prk"):
        scheme = TPMT_KEYEDHASH_SCHEME(
            scheme=TPM2_ALG.HMAC, details=TPMU_SCHEME_KEYEDHASH(hmac=TPMS_SCHEME_HASH(hashAlg=TPM2_ALG.SHA256))
        )
        attributes = _FIXED | _CHILD_ATTRIBUTES | _A.SIGN_ENCRYPT
    else:  # "aes-256": a sealed data object (no sign, no decrypt: only TPM2_Unseal uses it)
        scheme = TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL)
        attributes = _FIXED | _CHILD_ATTRIBUTES
    return TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        objectAttributes=attributes,
        authPolicy=tag,
        parameters=TPMU_PUBLIC_PARMS(keyedHashDetail=TPMS_KEYEDHASH_PARMS(scheme=scheme)),
    )


def _rc_layer(exc: TSS2_Exception) -> int:
    return int(exc.rc) & int(TSS2_RC.RC_LAYER_MASK)


def _map_error(exc: TSS2_Exception, what: str, key_id: str | None = None) -> PlatformError:
    layer = _rc_layer(exc)
    if layer == int(TSS2_RC.TCTI_RC_LAYER):
        return PlatformError("keystore.unavailable", f"cannot {what}: the TPM is not reachable ({exc})", subject=key_id)
    if layer == int(TSS2_RC.TPM_RC_LAYER) and int(exc.error) in _UNAVAILABLE_RCS:
        return PlatformError("keystore.unavailable", f"cannot {what}: the TPM is not usable ({exc})", subject=key_id)
    return PlatformError("keystore.token", f"the TPM refused to {what} ({exc})", subject=key_id)


def _corrupt(key_id: str, why: str) -> StateCorruptError:
    return StateCorruptError("keystore.integrity", f"a TPM key file {why}", subject=key_id)


class _KeyFile:
    """A parsed key file: the key type and one (public, private) blob pair per role."""

    __slots__ = ("key_id", "key_type", "objects")

    def __init__(self, key_id: str, key_type: KeyType, objects: list[tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]]) -> None:
        self.key_id = key_id
        self.key_type = key_type
        self.objects = objects

    @classmethod
    def parse(cls, key_id: str, data: bytes) -> _KeyFile:
        try:
            body = cbor.loads(data)
        except FormatError:
            raise _corrupt(key_id, "does not parse") from None
        if not isinstance(body, dict) or body.get(0) != _FORMAT or not isinstance(body.get(1), str):
            raise _corrupt(key_id, "is not an iSM TPM key")
        if body[1] not in _LAYOUT:
            raise _corrupt(key_id, "is not an iSM TPM key")
        key_type: KeyType = body[1]
        pairs = body.get(2)
        if not isinstance(pairs, list) or len(pairs) != len(_LAYOUT[key_type]):
            raise _corrupt(key_id, "has the wrong objects for its key type")
        objects = []
        for pair in pairs:
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(b, bytes) for b in pair)):
                raise _corrupt(key_id, "is malformed")
            try:
                public, used_public = TPM2B_PUBLIC.unmarshal(pair[0])
                private, used_private = TPM2B_PRIVATE.unmarshal(pair[1])
            except TSS2_Exception:
                raise _corrupt(key_id, "holds a blob that does not unmarshal") from None
            if used_public != len(pair[0]) or used_private != len(pair[1]):
                raise _corrupt(key_id, "holds a blob with trailing bytes")
            objects.append((public, private))
        return cls(key_id, key_type, objects)

    @staticmethod
    def dump(key_type: KeyType, objects: list[tuple[bytes, bytes]]) -> bytes:
        return cbor.dumps({0: _FORMAT, 1: key_type, 2: [list(pair) for pair in objects]})


class TpmKeyStore:
    """Keys as TPM 2.0 objects under a storage primary key; key files in ``state_dir``.

    Args:
        tcti: a TCTI name and configuration, e.g. ``device:/dev/tpmrm0`` or
            ``swtpm:host=127.0.0.1,port=2321``.
        state_dir: where key files live (created 0700 if missing).
        owner_auth: the owner hierarchy's authorization value (``TPM2_CreatePrimary``), if set.

    Raises:
        PlatformError: ``keystore.unavailable`` if the TPM cannot be reached or
            is not started; ``keystore.token`` if it refuses to create the
            primary key or the session.
        StateCorruptError: ``keystore.integrity`` if the storage primary key is
            not the one pinned in ``state_dir`` (another TPM, or a cleared one).
    """

    backend = "tpm"

    def __init__(self, tcti: str, state_dir: Path, *, owner_auth: bytes = b"") -> None:
        self.tcti = tcti
        self.state_dir = Path(state_dir)
        self._lock = threading.RLock()
        self._closed = False
        self._session: Any = None
        try:
            self._tcti: Any = TCTILdr.parse(tcti)
        except (TSS2_Exception, RuntimeError) as exc:
            raise PlatformError("keystore.unavailable", f"cannot open the TPM at {tcti!r}: {exc}") from exc
        try:
            self._esapi: Any = ESAPI(self._tcti)
        except TSS2_Exception as exc:
            self._tcti.close()
            raise _map_error(exc, f"open the TPM at {tcti!r}") from exc
        try:
            self._open(owner_auth)
        except BaseException:
            self._shutdown()
            raise

    def _open(self, owner_auth: bytes) -> None:
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise PlatformError("keystore.unavailable", f"cannot create the key directory: {exc}") from exc
        try:
            if owner_auth:
                self._esapi.tr_set_auth(ESYS_TR.OWNER, owner_auth)
            primary, public, *_ = self._esapi.create_primary(None, _storage_primary_template())
            try:
                self._primary_public: TPM2B_PUBLIC = public
                self._primary_context = self._esapi.context_save(primary)
                # Salted to the primary key: the session key is unknown to whoever watches the bus.
                self._session = self._esapi.start_auth_session(
                    tpm_key=primary,
                    bind=ESYS_TR.NONE,
                    session_type=TPM2_SE.HMAC,
                    symmetric=_SESSION_SYMMETRIC,
                    auth_hash=TPM2_ALG.SHA256,
                )
                self._esapi.trsess_set_attributes(
                    self._session, TPMA_SESSION.CONTINUESESSION | TPMA_SESSION.DECRYPT | TPMA_SESSION.ENCRYPT
                )
            finally:
                self._esapi.flush_context(primary)
        except TSS2_Exception as exc:
            raise _map_error(exc, f"create the storage primary key on the TPM at {self.tcti!r}") from exc
        try:
            self._pin_primary(bytes(public.get_name()))
        except OSError as exc:
            raise PlatformError("keystore.unavailable", f"cannot read or write the primary key pin: {exc}") from exc

    def _pin_primary(self, name: bytes) -> None:
        pinned = self.state_dir / _PRIMARY_NAME
        try:
            known = pinned.read_bytes()
        except FileNotFoundError:
            try:
                _write_file(pinned, name, replace=False)
                return
            except FileExistsError:  # another store pinned it first: compare with that
                known = pinned.read_bytes()
        if not hmac.compare_digest(known, name):
            raise StateCorruptError(
                "keystore.integrity",
                "the TPM's storage primary key is not the one these keys were created under "
                "(another TPM, or its owner hierarchy was cleared)",
                subject=str(self.state_dir),
                got=name,
                expected=known,
            )

    def _shutdown(self) -> None:
        with contextlib.suppress(TSS2_Exception):
            if self._session is not None:
                self._esapi.flush_context(self._session)
        self._session = None
        with contextlib.suppress(TSS2_Exception):
            self._esapi.close()
        with contextlib.suppress(TSS2_Exception):
            self._tcti.close()

    def counter(self, nv_index: int) -> TpmCounter:
        """A monotonic NV counter in this TPM (the device's anti-rollback freshness root with this backend)."""
        return TpmCounter(self._esapi, nv_index)

    def close(self) -> None:
        """Flushes the session and disconnects from the TPM. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shutdown()

    def __del__(self) -> None:
        # A TPM has few session slots: a store dropped without close() must still give its slot back.
        try:
            if not getattr(self, "_closed", True):
                self.close()
        except Exception:  # noqa: S110 - nothing useful to do while being collected
            pass

    def __enter__(self) -> TpmKeyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- TPM access -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tpm(self, what: str, key_id: str | None = None) -> Iterator[None]:
        """Serialises the store and maps any TSS/TPM failure inside to an iSM error."""
        with self._lock:
            if self._closed:
                raise UsageError("keystore.closed", "this key store has been closed", subject=self.tcti)
            try:
                yield
            except TSS2_Exception as exc:
                raise _map_error(exc, what, key_id) from exc

    def _flush(self, handle: Any) -> None:
        with contextlib.suppress(TSS2_Exception):  # already gone (e.g. the TPM went away): nothing to free
            self._esapi.flush_context(handle)

    @contextlib.contextmanager
    def _primary(self) -> Iterator[Any]:
        """The storage primary key, loaded from its saved context for one command (TPMs have ~3 object slots)."""
        handle = self._esapi.context_load(self._primary_context)
        try:
            yield handle
        finally:
            self._flush(handle)

    def _create(self, template: TPMT_PUBLIC, data: bytes | bytearray | None) -> tuple[bytes, bytes]:
        """``TPM2_Create`` under the primary; ``data`` (if any) travels parameter-encrypted."""
        sensitive = None
        if data is not None:
            sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(bytes(data))))
        with self._primary() as primary:
            private, public, *_ = self._esapi.create(
                primary, sensitive, TPM2B_PUBLIC(publicArea=template), session1=self._session
            )
        return bytes(public.marshal()), bytes(private.marshal())

    def _secret_objects(self, key_id: str, key_type: KeyType, material: bytes | bytearray) -> list[tuple[bytes, bytes]]:
        """The key object and its HKDF PRK object for a 32-byte ``aes-256``/``hmac-sha256`` key."""
        prk = bytearray(hmac.new(_ZERO_SALT, bytes(material), hashlib.sha256).digest())
        try:
            return [
                self._create(_template(key_id, key_type), material),
                self._create(_template(key_id, "prk"), prk),
            ]
        finally:
            prk[:] = bytes(len(prk))

    @contextlib.contextmanager
    def _loaded(self, key: _KeyFile, index: int = 0) -> Iterator[tuple[Any, TPMT_PUBLIC]]:
        """Loads object ``index`` of ``key`` and checks it is bound to the key id and role; flushed after."""
        public, private = key.objects[index]
        with self._primary() as primary:
            try:
                handle = self._esapi.load(primary, private, public, session1=self._session)
            except TSS2_Exception as exc:
                if _rc_layer(exc) == int(TSS2_RC.TPM_RC_LAYER) and exc.fmt1 and exc.parameter in (1, 2):
                    raise _corrupt(key.key_id, f"is refused by the TPM ({exc})") from exc
                raise
        try:
            role = _LAYOUT[key.key_type][index]
            area = public.publicArea
            expected = _template(
                key.key_id,
                role,
                imported=not (area.objectAttributes & _A.FIXEDTPM),
                sign_only=role == "ecc-p256" and not (area.objectAttributes & _A.DECRYPT),
            )
            expected.unique = area.unique
            if expected.marshal() != area.marshal():
                raise _corrupt(key.key_id, "holds an object bound to another key id or role")
            yield handle, area
        finally:
            self._flush(handle)

    def _hmac(self, handle: Any, data: bytes) -> bytearray:
        """HMAC-SHA-256 in the TPM: one ``TPM2_HMAC``, or an HMAC sequence for more than 1024 bytes."""
        if len(data) <= _MAX_BUFFER:
            return bytearray(bytes(self._esapi.hmac(handle, data, TPM2_ALG.SHA256, session1=self._session)))
        sequence = self._esapi.hmac_start(handle, b"", TPM2_ALG.SHA256, session1=self._session)
        try:
            chunks = [data[i : i + _MAX_BUFFER] for i in range(0, len(data), _MAX_BUFFER)]
            for chunk in chunks[:-1]:
                self._esapi.sequence_update(sequence, chunk, session1=ESYS_TR.PASSWORD)
            result, _ = self._esapi.sequence_complete(
                sequence, chunks[-1], hierarchy=ESYS_TR.NULL, session1=self._session
            )
        except BaseException:
            self._flush(sequence)  # a completed sequence is gone already; an interrupted one is not
            raise
        return bytearray(bytes(result))

    @contextlib.contextmanager
    def _unsealed(self, key: _KeyFile) -> Iterator[bytearray]:
        """The sealed AES key, in host memory for the duration of the block (see the module docstring)."""
        with self._loaded(key) as (handle, _):
            secret = bytearray(bytes(self._esapi.unseal(handle, session1=self._session)))
        try:
            if len(secret) != _SIZES["aes-256"]:
                raise _corrupt(key.key_id, "unseals to a key of the wrong size")
            yield secret
        finally:
            secret[:] = bytes(len(secret))

    # -- key files --------------------------------------------------------------------------------

    def _path(self, key_id: str) -> Path:
        return self.state_dir / (check_key_id(key_id) + _SUFFIX)

    def _read(self, key_id: str, *types: KeyType) -> _KeyFile:
        try:
            data = self._path(key_id).read_bytes()
        except FileNotFoundError:
            raise UsageError("keystore.missing", "no such key", subject=key_id) from None
        except OSError as exc:
            raise PlatformError("keystore.unavailable", f"cannot read the key file: {exc}", subject=key_id) from exc
        key = _KeyFile.parse(key_id, data)
        if types and key.key_type not in types:
            raise UsageError(
                "keystore.key-type", f"operation needs a {'/'.join(types)} key", subject=key_id, got=key.key_type
            )
        return key

    def _refuse_existing(self, key_id: str) -> None:
        if self._path(key_id).exists():
            raise UsageError("keystore.exists", "a key with this id already exists", subject=key_id)

    def _write(self, key_id: str, key_type: KeyType, objects: list[tuple[bytes, bytes]], replace: bool) -> None:
        try:
            _write_file(self._path(key_id), _KeyFile.dump(key_type, objects), replace=replace)
        except FileExistsError:
            raise UsageError("keystore.exists", "a key with this id already exists", subject=key_id) from None
        except OSError as exc:
            raise PlatformError("keystore.unavailable", f"cannot write the key file: {exc}", subject=key_id) from exc

    # -- the KeyStore interface -------------------------------------------------------------------

    def generate(self, key_id: str, key_type: KeyType) -> None:
        check_key_type(key_type)
        with self._tpm("generate a key", key_id):
            self._refuse_existing(key_id)
            if key_type == "ecc-p256":
                objects = [self._create(_template(key_id, "ecc-p256"), None)]
            else:
                material = bytearray(bytes(self._esapi.get_random(_SIZES[key_type], session1=self._session)))
                try:
                    if len(material) != _SIZES[key_type]:
                        raise PlatformError("keystore.token", "the TPM returned too few random bytes", subject=key_id)
                    objects = self._secret_objects(key_id, key_type, material)
                finally:
                    material[:] = bytes(len(material))
            self._write(key_id, key_type, objects, replace=False)

    def import_key(self, key_id: str, key_type: KeyType, material: bytes) -> None:
        check_key_type(key_type)
        check_key_id(key_id)
        if key_type == "ecc-p256":
            key = load_p256_private(material)
            with self._tpm("import a key", key_id):
                self._refuse_existing(key_id)
                objects = [self._import_ecc(key_id, key)]
                self._write(key_id, key_type, objects, replace=False)
            return
        if len(material) != _SIZES[key_type]:
            raise FormatError("keystore.import", f"a {key_type} key is {_SIZES[key_type]} bytes", got=len(material))
        with self._tpm("import a key", key_id):
            self._refuse_existing(key_id)
            self._write(key_id, key_type, self._secret_objects(key_id, key_type, material), replace=False)

    def _import_ecc(self, key_id: str, key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
        """``TPM2_Import`` of a P-256 key: wrapped to the primary key (ECDH seed) with an inner AES-128-CFB key."""
        numbers = key.private_numbers()
        scalar = bytearray(numbers.private_value.to_bytes(32, "big"))
        try:
            area = _template(key_id, "ecc-p256", imported=True)
            area.unique = TPMU_PUBLIC_ID(
                ecc=TPMS_ECC_POINT(
                    x=TPM2B_ECC_PARAMETER(numbers.public_numbers.x.to_bytes(32, "big")),
                    y=TPM2B_ECC_PARAMETER(numbers.public_numbers.y.to_bytes(32, "big")),
                )
            )
            public = TPM2B_PUBLIC(publicArea=area)
            sensitive = TPM2B_SENSITIVE(
                sensitiveArea=TPMT_SENSITIVE(
                    sensitiveType=TPM2_ALG.ECC,
                    sensitive=TPMU_SENSITIVE_COMPOSITE(ecc=TPM2B_ECC_PARAMETER(bytes(scalar))),
                )
            )
            inner_key, duplicate, seed = wrap(self._primary_public.publicArea, public, sensitive, symdef=_AES128_CFB)
            with self._primary() as primary:
                private = self._esapi.import_(
                    primary, inner_key, public, duplicate, seed, _AES128_CFB, session1=self._session
                )
        finally:
            scalar[:] = bytes(len(scalar))
        return bytes(public.marshal()), bytes(private.marshal())

    def exists(self, key_id: str) -> bool:
        with self._tpm("look up a key", key_id):
            return self._path(key_id).exists()

    def key_type(self, key_id: str) -> KeyType:
        with self._tpm("look up a key", key_id):
            return self._read(key_id).key_type

    def destroy(self, key_id: str) -> None:
        with self._tpm("destroy a key", key_id):
            with contextlib.suppress(FileNotFoundError):
                self._path(key_id).unlink()
            _sync_dir(self.state_dir)

    def public_key(self, key_id: str) -> bytes:
        with self._tpm("read a public key", key_id):
            key = self._read(key_id, "ecc-p256")
            with self._loaded(key) as (_, area):
                public = _ec_public(key_id, area)
        return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, key_id: str, message: bytes) -> bytes:
        digest = hashlib.sha256(message).digest()
        with self._tpm("sign", key_id):
            key = self._read(key_id, "ecc-p256")
            with self._loaded(key) as (handle, _):
                signature = self._esapi.sign(handle, digest, _ECDSA_SHA256, _NULL_TICKET, session1=self._session)
        if signature.sigAlg != TPM2_ALG.ECDSA:
            raise PlatformError("keystore.token", "the TPM returned a non-ECDSA signature", subject=key_id)
        r, s = bytes(signature.signature.ecdsa.signatureR), bytes(signature.signature.ecdsa.signatureS)
        if len(r) > 32 or len(s) > 32:
            raise PlatformError("keystore.token", "the TPM returned a malformed ECDSA signature", subject=key_id)
        return r.rjust(32, b"\x00") + s.rjust(32, b"\x00")

    def verify(self, key_id: str, message: bytes, signature: bytes) -> None:
        with self._tpm("verify", key_id):
            key = self._read(key_id, "ecc-p256")
            with self._loaded(key) as (_, area):
                public = _ec_public(key_id, area)
        if len(signature) != 64:
            raise SignatureError("keystore.signature", "signature does not verify")
        der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
        try:
            public.verify(der, message, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SignatureError("keystore.signature", "signature does not verify") from None

    def encrypt(self, key_id: str, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        with self._tpm("encrypt", key_id):
            key = self._read(key_id, "aes-256")
            if len(nonce) != 12:
                raise UsageError("keystore.nonce", "AES-GCM nonces are 12 bytes")
            with self._unsealed(key) as secret:
                return AESGCM(secret).encrypt(nonce, plaintext, aad)

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        with self._tpm("decrypt", key_id):
            key = self._read(key_id, "aes-256")
            if len(nonce) != 12 or len(ciphertext) < 16:
                raise SignatureError("keystore.decrypt", "decryption failed")
            with self._unsealed(key) as secret:
                try:
                    return AESGCM(secret).decrypt(nonce, ciphertext, aad)
                except (InvalidTag, ValueError):
                    raise SignatureError("keystore.decrypt", "decryption failed") from None

    def mac(self, key_id: str, data: bytes) -> bytes:
        with self._tpm("compute a MAC", key_id):
            key = self._read(key_id, "hmac-sha256")
            with self._loaded(key) as (handle, _):
                return bytes(self._hmac(handle, bytes(data)))

    def derive(self, key_id: str, info: bytes, new_id: str, new_type: KeyType) -> None:
        """HKDF-SHA-256(IKM = the key ``key_id``, salt = none, ``info``) into ``new_id`` (replaced if present).

        Extract was done when the source key was stored (its ``prk`` object);
        Expand is one HMAC in the TPM. See the module docstring for what
        crosses host memory. The new key file replaces ``new_id`` atomically,
        so a failure leaves any key already stored there untouched.
        """
        with self._tpm("derive a key", key_id):
            key = self._read(key_id, "hmac-sha256", "aes-256")
            check_key_type(new_type)
            check_key_id(new_id)
            if new_type == "ecc-p256":
                raise UsageError("keystore.key-type", "derive produces aes-256 or hmac-sha256 keys", got=new_type)
            with self._loaded(key, 1) as (handle, _):
                # HKDF-Expand for L = 32 = HashLen: OKM = T(1) = HMAC(PRK, info || 0x01).
                okm = self._hmac(handle, bytes(info) + b"\x01")
            try:
                if len(okm) != _SIZES[new_type]:
                    raise PlatformError("keystore.token", "the TPM returned a malformed HMAC", subject=key_id)
                objects = self._secret_objects(new_id, new_type, okm)
            finally:
                okm[:] = bytes(len(okm))
            self._write(new_id, new_type, objects, replace=True)

    def ecdh(self, key_id: str, peer_public_der: bytes) -> bytes:
        """ECDH on P-256 in the TPM: the shared secret (X coordinate, 32 bytes) of ``key_id`` and the peer key.

        ``TPM2_ECDH_ZGen`` in the parameter-encrypted session; see the module
        docstring for what crosses host memory. The caller must run the secret
        through a KDF at once and drop it.

        Raises:
            FormatError: ``keystore.peer-key`` if the peer key is not a P-256 SubjectPublicKeyInfo.
            UsageError: ``keystore.key-type`` if ``key_id`` is not an ``ecc-p256`` key;
                ``keystore.key-usage`` if it is a sign-only key (created before ECDH support).
        """
        with self._tpm("compute an ECDH shared secret", key_id):
            key = self._read(key_id, "ecc-p256")
            numbers = load_p256_peer(peer_public_der).public_numbers()
            point = TPM2B_ECC_POINT(
                point=TPMS_ECC_POINT(
                    x=TPM2B_ECC_PARAMETER(numbers.x.to_bytes(32, "big")),
                    y=TPM2B_ECC_PARAMETER(numbers.y.to_bytes(32, "big")),
                )
            )
            with self._loaded(key) as (handle, area):
                if not area.objectAttributes & _A.DECRYPT:
                    raise UsageError(
                        "keystore.key-usage",
                        "this ecc-p256 key was created for signing only (before ECDH support): it cannot do ECDH",
                        subject=key_id,
                    )
                z = self._esapi.ecdh_zgen(handle, point, session1=self._session)
        shared = bytes(z.point.x)
        if len(shared) > 32:
            raise PlatformError("keystore.token", "the TPM returned a malformed ECDH point", subject=key_id)
        return shared.rjust(32, b"\x00")


def _ec_public(key_id: str, area: TPMT_PUBLIC) -> ec.EllipticCurvePublicKey:
    x, y = bytes(area.unique.ecc.x), bytes(area.unique.ecc.y)
    try:
        numbers = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), ec.SECP256R1())
        return numbers.public_key()
    except ValueError as exc:
        raise _corrupt(key_id, "holds an invalid P-256 point") from exc


def _sync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # best effort: not every filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes, *, replace: bool) -> None:
    """Writes ``path`` crash-safely: a complete new file or the old one, never a torn one.

    With ``replace=False`` the file must not exist yet (``FileExistsError``),
    decided atomically by ``link(2)``.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        if replace:
            os.replace(temporary, path)
        else:
            os.link(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _sync_dir(path.parent)


class TpmCounter:
    """A monotonic counter in TPM NV memory (``TPM_NT_COUNTER``): the anti-rollback reference.

    The NV index is defined in the owner hierarchy on first use (the
    ``esapi`` must carry the owner authorization if one is set), with an
    empty auth value, ``AUTHREAD``/``AUTHWRITE`` and ``NO_DA``. A TPM counter
    only ever goes up: it cannot be written, only incremented, and if the
    index is deleted and defined again it restarts at least at the highest
    value any counter in this TPM has had, so it never repeats a value. Its
    first value is therefore not necessarily 0; callers compare, never
    assume. Increments are not ``ORDERLY``: each one is written to NV
    before the TPM answers.

    Args:
        esapi: an open ``tpm2_pytss.ESAPI`` (the caller owns and closes it).
        nv_index: the NV index handle, ``0x01000000``-``0x01FFFFFF``.
    """

    def __init__(self, esapi: Any, nv_index: int) -> None:
        self.nv_index = nv_index
        self._esapi = esapi
        self._handle: Any = None

    def _index(self) -> Any:
        """The ESYS handle of the counter, defining and initialising the index if the TPM has none."""
        if self._handle is not None:
            return self._handle
        try:
            handle = self._esapi.tr_from_tpmpublic(self.nv_index)
        except TSS2_Exception as exc:
            if _rc_layer(exc) != int(TSS2_RC.TPM_RC_LAYER) or exc.error != TPM2_RC.HANDLE:
                raise
            handle = self._define()
        public, _ = self._esapi.nv_read_public(handle)
        attributes = int(public.nvPublic.attributes)
        kind = (attributes & int(TPMA_NV.TPM2_NT_MASK)) >> int(TPMA_NV.TPM2_NT_SHIFT)
        if kind != TPM2_NT.COUNTER or public.nvPublic.dataSize != 8:
            raise PlatformError(
                "keystore.token", "the NV index exists but is not a counter", subject=hex(self.nv_index)
            )
        if not attributes & int(TPMA_NV.WRITTEN):
            self._esapi.nv_increment(handle, auth_handle=handle)  # a counter is readable once incremented
        self._handle = handle
        return handle

    def _define(self) -> Any:
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=self.nv_index,
                nameAlg=TPM2_ALG.SHA256,
                attributes=TPMA_NV.AUTHREAD
                | TPMA_NV.AUTHWRITE
                | TPMA_NV.NO_DA
                | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT),
                dataSize=8,
            )
        )
        return self._esapi.nv_define_space(b"", public, auth_handle=ESYS_TR.OWNER)

    def read(self) -> int:
        """The counter's current value."""
        try:
            handle = self._index()
            data = bytes(self._esapi.nv_read(handle, 8, 0, auth_handle=handle))
        except TSS2_Exception as exc:
            raise _map_error(exc, "read the NV counter", hex(self.nv_index)) from exc
        return int.from_bytes(data, "big")

    def increment(self) -> int:
        """Adds one in the TPM (persisted before this returns) and returns the new value."""
        try:
            handle = self._index()
            self._esapi.nv_increment(handle, auth_handle=handle)
        except TSS2_Exception as exc:
            raise _map_error(exc, "increment the NV counter", hex(self.nv_index)) from exc
        return self.read()
