"""The PKCS#11 key store: keys are objects on a token (an HSM, or SoftHSM2) and never leave it.

Owns: loading a PKCS#11 module, logging in to one token (by label) with the
user PIN, and mapping each :class:`~ism.crypto.keystore.KeyStore` operation
onto token objects and mechanisms through ``python-pkcs11``; mapping every
PKCS#11 failure to an iSM error at this edge.
Must not import: device, hypervisor or anything above.

Threat: private and secret keys leaking from the host. Every key is a token
object (``CKA_TOKEN``) labelled as below; private and secret
keys are created ``CKA_SENSITIVE`` and not ``CKA_EXTRACTABLE``, so the token
refuses to export them, even wrapped. Generated keys (and the private key
of a generated pair) never leave the token; signing, verification,
AES-GCM, HMAC and ECDH run inside it. What an attacker with the host's memory
could still learn is listed per operation below; a stolen key file is no
threat here because there is none (the token's own storage protects it).

Threat: several devices (or other users) sharing one token, each reading,
replacing or destroying another's keys. A store has a *namespace*: its
objects' ``CKA_LABEL`` is ``<namespace>/<key id>`` (e.g.
``3f2a9c0d1b4e5f60/device.iak``), and it only ever finds, replaces and
destroys objects whose label is exactly that. Neither a key id
(:func:`~ism.crypto.keystore.check_key_id`) nor a namespace may contain
``/`` (nor ``~``, which marks temporary labels), so no key id of one
namespace can name an object of another, and a store without a namespace,
whose labels are the bare key id (kept for devices created before
namespaces), never sees a namespaced object. A namespace is at most 16
characters, so the longest label, a temporary one
(``~ism-tmp~<namespace>/<key id>``: 9 + 16 + 1 + 96 characters), is 122
bytes (some HSMs limit label lengths; PKCS#11 itself does not). ``CKA_ID`` is
not used: it is left empty and never searched. Another PKCS#11 client logged in
to the same token can of course still reach every object: the namespace
separates iSM devices, it is no access control (that is the token's PIN).

Objects per key type (the iSM type is inferred from class and key type,
never stored):

===============  ============================================================  ==========================
iSM type         token objects labelled ``<namespace>/<key id>``               mechanism
===============  ============================================================  ==========================
``ecc-p256``     ``CKO_PRIVATE_KEY`` + ``CKO_PUBLIC_KEY``, ``CKK_EC`` (P-256)  ``CKM_ECDSA`` over SHA-256,
                 (the private key ``CKA_SIGN`` and ``CKA_DERIVE``)             ``CKM_ECDH1_DERIVE``
``aes-256``      ``CKO_SECRET_KEY``, ``CKK_AES`` (32 bytes)                    ``CKM_AES_GCM``
``hmac-sha256``  ``CKO_SECRET_KEY``, ``CKK_GENERIC_SECRET`` (32 bytes)         ``CKM_SHA256_HMAC``
===============  ============================================================  ==========================

What transits host memory:

* ``sign``/``verify``: the SHA-256 of the message (computed on the host:
  tokens such as SoftHSM2 have no combined ECDSA-with-SHA-256 mechanism) and
  the signature; ``encrypt``/``decrypt``/``mac``: their inputs and outputs.
* ``import_key``: the material the caller passed (it was already on the host).
* ``ecdh``: the peer's public key and the shared secret, by design of the
  interface (the software store returns it too): ``CKM_ECDH1_DERIVE`` with
  ``CKD_NULL`` (no KDF: the raw X coordinate, 32 bytes, as the software store)
  derives it in the token into a *session* object (``CKA_TOKEN`` false)
  of type ``CKK_GENERIC_SECRET`` with no usage; reading a derived value
  needs ``CKA_SENSITIVE`` false and ``CKA_EXTRACTABLE`` true, so that object
  alone is created readable. Its ``CKA_VALUE`` is read and the object is
  destroyed at once (a session object also dies with its session). The
  private key stays in the token. ECDH needs ``CKA_DERIVE`` on the private
  key: ``ecc-p256`` keys are created with it (and with ``CKA_SIGN``: the same
  key signs and agrees, as in the software store); a key created before
  ECDH support has ``CKA_DERIVE`` false and refuses ``ecdh`` with
  ``keystore.key-usage`` (it is not changed behind the caller's back).
* ``derive`` (HKDF-SHA-256, no salt, 32 bytes, identical to the software
  backend): SoftHSM2 has no ``CKM_HKDF_DERIVE`` and no mechanism that keeps a
  digest inside the token, so Extract is ``C_DigestKey``-based and its
  result crosses the host. The source key (the IKM) itself never leaves the
  token, but these do, transiently: the inner hash
  ``SHA-256((0^64 xor ipad) || IKM)`` (from ``C_DigestUpdate`` +
  ``C_DigestKey``), the PRK ``SHA-256((0^64 xor opad) || inner)`` (which is
  HMAC(zero salt, IKM)), and the output key ``T(1) = HMAC(PRK, info || 0x01)``
  (computed in the token under a session-only PRK object, then imported
  as the new non-extractable token key). Whoever reads process memory during
  a ``derive`` therefore learns the PRK (every key derivable from that
  source) and the new key; the buffers are overwritten afterwards, which is
  best effort in Python.

Login: PKCS#11 login state is per process and token, so every store on one
token in this process shares one login. The first store logs in (the token
checks the PIN); a later store must present the same PIN, compared in
constant time against the one the token accepted, since ``C_Login`` cannot
check it again while logged in. The last store to :meth:`Pkcs11KeyStore.close`
logs out.

Errors: a namespace that is not one → ``keystore.namespace``;
module not loadable or token not found → ``keystore.unavailable``;
wrong or locked PIN → ``keystore.locked``; no such key → ``keystore.missing``;
a peer key that is not a P-256 SubjectPublicKeyInfo with its point on the
curve → ``keystore.peer-key``;
a GCM tag or signature that fails → :class:`~ism.errors.SignatureError`;
any other refusal of the token → ``keystore.token``; use after
:meth:`Pkcs11KeyStore.close` → ``keystore.closed``. A failed operation
leaves no new object behind (``derive`` replaces ``new_id`` only once the
new key exists).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, Final

import pkcs11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pkcs11 import KDF, Attribute, Mechanism, ObjectClass
from pkcs11 import KeyType as P11KeyType
from pkcs11 import exceptions as p11

from ism.crypto.keystore import KeyType, check_key_id, check_key_type, load_p256_peer, load_p256_private
from ism.errors import FormatError, PlatformError, SignatureError, StateCorruptError, UsageError

__all__ = ["Pkcs11KeyStore"]

#: DER of the named-curve OID prime256v1 (1.2.840.10045.3.1.7): the CKA_EC_PARAMS of a P-256 key.
_P256_PARAMS: Final = bytes.fromhex("06082a8648ce3d030107")
_SIZES: Final = {"aes-256": 32, "hmac-sha256": 32}
#: HKDF-Extract with no salt is HMAC keyed with 32 zero bytes: its padded key xor ipad / opad.
_IPAD0: Final = b"\x36" * 64
_OPAD0: Final = b"\x5c" * 64
#: Label prefix of an object being derived; "~" cannot occur in a key id or a namespace.
_TMP_PREFIX: Final = "~ism-tmp~"
#: Between a store's namespace and the key id in a label; "/" cannot occur in a key id or a namespace.
_NAMESPACE_SEPARATOR: Final = "/"
#: Key-id characters, at most 16: ``~ism-tmp~`` + namespace + ``/`` + a 96-character key id is 122 bytes.
_NAMESPACE: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,15}\Z")
#: The ECDH shared secret: the X coordinate of a P-256 point.
_ECDH_SIZE: Final = 32
#: The session object an ECDH derives into: no usage, and readable (the one way to get a derived value out).
_ECDH_SECRET_TEMPLATE: Final = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: False,
    Attribute.EXTRACTABLE: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}

_KEY_CLASSES: Final = (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY, ObjectClass.SECRET_KEY)
_HMAC_KEY_TYPES: Final = (P11KeyType.GENERIC_SECRET, P11KeyType.SHA256_HMAC)

_LOCKED_ERRORS: Final = (
    p11.PinIncorrect,
    p11.PinInvalid,
    p11.PinLenRange,
    p11.PinLocked,
    p11.PinExpired,
    p11.UserNotLoggedIn,
    p11.UserPinNotInitialized,
)
_UNAVAILABLE_ERRORS: Final = (
    p11.NoSuchToken,
    p11.MultipleTokensReturned,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.DeviceMemory,
    p11.SlotIDInvalid,
    p11.SessionClosed,
    p11.SessionHandleInvalid,
)
#: What a token reports for a GCM tag or length failure (SoftHSM2 says CKR_GENERAL_ERROR).
_DECRYPT_ERRORS: Final = (
    p11.EncryptedDataInvalid,
    p11.EncryptedDataLenRange,
    p11.DataInvalid,
    p11.DataLenRange,
    p11.GeneralError,
    p11.FunctionFailed,
)


@dataclass
class _Login:
    """The one login of this process on one token, shared by every store on it."""

    session: Any  # the python-pkcs11 Session that holds the login (closing it logs out)
    pin_digest: bytes
    users: int = 0


_LOGINS: dict[tuple[str, str, str], _Login] = {}
_LOGINS_LOCK = threading.Lock()


class Pkcs11KeyStore:
    """Keys on the token labelled ``token_label`` in the PKCS#11 module ``module_path``.

    Args:
        module_path: the PKCS#11 module (``.so``), e.g. SoftHSM2's ``libsofthsm2.so``.
        token_label: the label of the token to use (``CKA_LABEL`` of the token).
        pin: the token's user PIN.
        namespace: this store's part of the token (1-16 lower-case letters, digits, ``.``,
            ``_`` and ``-``): its objects are labelled ``<namespace>/<key id>`` and it sees no
            other object. ``None`` (the default) is the layout before namespaces, kept for
            backwards compatibility: labels are the bare key id, shared by every such store on
            the token.

    Raises:
        PlatformError: ``keystore.unavailable`` if the module cannot be loaded or
            has no such token; ``keystore.locked`` if the PIN is wrong or locked.
        UsageError: ``keystore.namespace`` if ``namespace`` is not a valid namespace.
    """

    backend = "pkcs11"

    def __init__(self, module_path: str, token_label: str, pin: str, namespace: str | None = None) -> None:
        if namespace is not None and (not isinstance(namespace, str) or not _NAMESPACE.match(namespace)):
            raise UsageError(
                "keystore.namespace",
                "key store namespaces are 1-16 lower-case letters, digits, '.', '_' and '-'",
                got=namespace,
            )
        self.module_path = module_path
        self.token_label = token_label
        self.namespace = namespace
        self._prefix = "" if namespace is None else namespace + _NAMESPACE_SEPARATOR
        self._lock = threading.RLock()
        self._closed = False
        where = f"token {token_label!r} in PKCS#11 module {module_path}"
        try:
            lib = pkcs11.lib(module_path)
        except (p11.PKCS11Error, OSError) as exc:
            raise PlatformError(
                "keystore.unavailable", f"cannot load the PKCS#11 module {module_path}: {exc}", subject=token_label
            ) from exc
        try:
            token = lib.get_token(token_label=token_label)
            login_key = (module_path, token_label, str(token.serial))
        except p11.NoSuchToken as exc:
            raise PlatformError(
                "keystore.unavailable", f"no token labelled {token_label!r} in PKCS#11 module {module_path}"
            ) from exc
        except p11.PKCS11Error as exc:
            raise PlatformError("keystore.unavailable", f"cannot reach {where}: {_name(exc)}") from exc
        digest = hashlib.sha256(pin.encode()).digest()
        with _LOGINS_LOCK:
            login = _LOGINS.get(login_key)
            if login is None:
                login = _Login(self._log_in(token, pin, where), digest)
                _LOGINS[login_key] = login
            elif not hmac.compare_digest(login.pin_digest, digest):
                raise PlatformError("keystore.locked", f"wrong PIN for {where}")
            try:
                # A public session of the same process: it shares the login above.
                self._session = token.open(rw=True)
            except p11.PKCS11Error as exc:
                if login.users == 0:
                    _LOGINS.pop(login_key, None)
                    _close_quietly(login.session)
                raise _map_error(exc, f"open a session on {where}") from exc
            login.users += 1
        self._login_key = login_key

    @staticmethod
    def _log_in(token: Any, pin: str, where: str) -> Any:
        # Note: on a failed C_Login python-pkcs11 does not close the session it opened for it.
        try:
            return token.open(rw=True, user_pin=pin)
        except (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange) as exc:
            raise PlatformError("keystore.locked", f"wrong PIN for {where}") from exc
        except (p11.PinLocked, p11.PinExpired, p11.UserPinNotInitialized) as exc:
            raise PlatformError("keystore.locked", f"the user PIN of {where} is locked ({_name(exc)})") from exc
        except p11.UserAlreadyLoggedIn as exc:
            raise PlatformError(
                "keystore.locked",
                f"{where} is already logged in by another client in this process; the PIN cannot be checked",
            ) from exc
        except p11.PKCS11Error as exc:
            raise _map_error(exc, f"log in to {where}") from exc

    def close(self) -> None:
        """Closes this store's session; the last store on the token logs out. Idempotent."""
        with self._lock, _LOGINS_LOCK:
            if self._closed:
                return
            self._closed = True
            _close_quietly(self._session)
            login = _LOGINS.get(self._login_key)
            if login is not None:
                login.users -= 1
                if login.users <= 0:
                    del _LOGINS[self._login_key]
                    _close_quietly(login.session)

    def __enter__(self) -> Pkcs11KeyStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- token access -----------------------------------------------------------------------------

    @contextmanager
    def _token(self, what: str, key_id: str | None = None) -> Iterator[None]:
        """Serialises the store and maps any PKCS#11 failure inside to an iSM error."""
        with self._lock:
            if self._closed:
                raise UsageError("keystore.closed", "this key store has been closed", subject=self.token_label)
            try:
                yield
            except p11.PKCS11Error as exc:
                raise _map_error(exc, what, key_id) from exc

    def _label(self, key_id: str) -> str:
        """The ``CKA_LABEL`` of this store's objects for ``key_id`` (a checked key id)."""
        return self._prefix + key_id

    def _objects(self, key_id: str) -> list[Any]:
        found = self._session.get_objects({Attribute.LABEL: self._label(key_id), Attribute.TOKEN: True})
        return [obj for obj in found if obj[Attribute.CLASS] in _KEY_CLASSES]

    def _find(self, key_id: str) -> tuple[KeyType, Any, Any]:
        """The key's iSM type, its private/secret object and (ecc-p256 only) its public object."""
        objects = self._objects(check_key_id(key_id))
        if not objects:
            raise UsageError("keystore.missing", "no such key", subject=key_id)
        private = [o for o in objects if o[Attribute.CLASS] == ObjectClass.PRIVATE_KEY]
        public = [o for o in objects if o[Attribute.CLASS] == ObjectClass.PUBLIC_KEY]
        secret = [o for o in objects if o[Attribute.CLASS] == ObjectClass.SECRET_KEY]
        if len(secret) == 1 and not private and not public:
            obj = secret[0]
            kind = obj[Attribute.KEY_TYPE]
            size = obj[Attribute.VALUE_LEN]
            if kind == P11KeyType.AES and size == _SIZES["aes-256"]:
                return "aes-256", obj, None
            if kind in _HMAC_KEY_TYPES and size == _SIZES["hmac-sha256"]:
                return "hmac-sha256", obj, None
        elif (
            len(private) == 1
            and len(public) == 1
            and not secret
            and private[0][Attribute.KEY_TYPE] == P11KeyType.EC
            and public[0][Attribute.KEY_TYPE] == P11KeyType.EC
            and private[0][Attribute.EC_PARAMS] == _P256_PARAMS
        ):
            return "ecc-p256", private[0], public[0]
        raise StateCorruptError(
            "keystore.integrity", "the token objects under this label are not one iSM key", subject=key_id
        )

    def _typed(self, key_id: str, *types: KeyType) -> tuple[Any, Any]:
        key_type, obj, public = self._find(key_id)
        if key_type not in types:
            raise UsageError(
                "keystore.key-type", f"operation needs a {'/'.join(types)} key", subject=key_id, got=key_type
            )
        return obj, public

    def _refuse_existing(self, key_id: str) -> None:
        if self._objects(check_key_id(key_id)):
            raise UsageError("keystore.exists", "a key with this id already exists", subject=key_id)

    # -- the KeyStore interface -------------------------------------------------------------------

    def generate(self, key_id: str, key_type: KeyType) -> None:
        check_key_type(key_type)
        with self._token("generate a key", key_id):
            self._refuse_existing(key_id)
            label = self._label(key_id)
            if key_type == "ecc-p256":
                # One C_GenerateKeyPair call: both objects are created or neither.
                self._session.generate_keypair(
                    P11KeyType.EC,
                    mechanism=Mechanism.EC_KEY_PAIR_GEN,
                    store=True,
                    label=label,
                    public_template=_public_template(label),
                    private_template=_private_template(label),
                )
            else:
                kind, capabilities = _secret_kind(key_type)
                self._session.generate_key(
                    kind,
                    _SIZES[key_type] * 8,
                    store=True,
                    label=label,
                    template=_secret_template(label) | capabilities,
                )

    def import_key(self, key_id: str, key_type: KeyType, material: bytes) -> None:
        check_key_type(key_type)
        check_key_id(key_id)
        if key_type == "ecc-p256":
            key = load_p256_private(material)
            scalar = key.private_numbers().private_value.to_bytes(32, "big")
            point = key.public_key().public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
            with self._token("import a key", key_id):
                self._refuse_existing(key_id)
                label = self._label(key_id)
                private = self._session.create_object(
                    _private_template(label) | {Attribute.EC_PARAMS: _P256_PARAMS, Attribute.VALUE: scalar}
                )
                try:
                    self._session.create_object(_public_template(label) | {Attribute.EC_POINT: _octet_string(point)})
                except BaseException:
                    private.destroy()
                    raise
            return
        if len(material) != _SIZES[key_type]:
            raise FormatError("keystore.import", f"a {key_type} key is {_SIZES[key_type]} bytes", got=len(material))
        with self._token("import a key", key_id):
            self._refuse_existing(key_id)
            self._create_secret(self._label(key_id), key_type, bytes(material))

    def exists(self, key_id: str) -> bool:
        check_key_id(key_id)
        with self._token("look up a key", key_id):
            return bool(self._objects(key_id))

    def key_type(self, key_id: str) -> KeyType:
        with self._token("look up a key", key_id):
            return self._find(key_id)[0]

    def destroy(self, key_id: str) -> None:
        check_key_id(key_id)
        with self._token("destroy a key", key_id):
            for obj in self._objects(key_id):
                obj.destroy()

    def public_key(self, key_id: str) -> bytes:
        with self._token("read a public key", key_id):
            _, public = self._typed(key_id, "ecc-p256")
            encoded = bytes(public[Attribute.EC_POINT])
        try:
            point = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), _unwrap_point(encoded))
        except ValueError as exc:
            raise StateCorruptError("keystore.integrity", "the token's EC point is malformed", subject=key_id) from exc
        return point.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, key_id: str, message: bytes) -> bytes:
        with self._token("sign", key_id):
            private, _ = self._typed(key_id, "ecc-p256")
            signature = bytes(private.sign(hashlib.sha256(message).digest(), mechanism=Mechanism.ECDSA))
        if len(signature) != 64:
            raise PlatformError("keystore.token", "the token returned a malformed ECDSA signature", subject=key_id)
        return signature

    def verify(self, key_id: str, message: bytes, signature: bytes) -> None:
        with self._token("verify", key_id):
            _, public = self._typed(key_id, "ecc-p256")
            if len(signature) != 64:
                raise SignatureError("keystore.signature", "signature does not verify")
            try:
                ok = public.verify(hashlib.sha256(message).digest(), bytes(signature), mechanism=Mechanism.ECDSA)
            except (p11.SignatureInvalid, p11.SignatureLenRange, p11.DataInvalid) as exc:
                raise SignatureError("keystore.signature", "signature does not verify") from exc
        if not ok:
            raise SignatureError("keystore.signature", "signature does not verify")

    def encrypt(self, key_id: str, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        with self._token("encrypt", key_id):
            key, _ = self._typed(key_id, "aes-256")
            if len(nonce) != 12:
                raise UsageError("keystore.nonce", "AES-GCM nonces are 12 bytes")
            return bytes(key.encrypt(bytes(plaintext), mechanism=Mechanism.AES_GCM, mechanism_param=_gcm(nonce, aad)))

    def decrypt(self, key_id: str, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
        with self._token("decrypt", key_id):
            key, _ = self._typed(key_id, "aes-256")
            if len(nonce) != 12 or len(ciphertext) < 16:
                raise SignatureError("keystore.decrypt", "decryption failed")
            try:
                return bytes(
                    key.decrypt(bytes(ciphertext), mechanism=Mechanism.AES_GCM, mechanism_param=_gcm(nonce, aad))
                )
            except _DECRYPT_ERRORS as exc:
                raise SignatureError("keystore.decrypt", "decryption failed") from exc

    def mac(self, key_id: str, data: bytes) -> bytes:
        with self._token("compute a MAC", key_id):
            key, _ = self._typed(key_id, "hmac-sha256")
            return bytes(key.sign(bytes(data), mechanism=Mechanism.SHA256_HMAC))

    def derive(self, key_id: str, info: bytes, new_id: str, new_type: KeyType) -> None:
        """HKDF-SHA-256(IKM = the key ``key_id``, salt = none, ``info``) into ``new_id`` (replaced if present).

        See the module docstring for what crosses host memory. The new key is
        created under a temporary label first, so a failure leaves any key
        already stored under ``new_id`` untouched.
        """
        check_key_type(new_type)
        check_key_id(new_id)
        if new_type == "ecc-p256":
            raise UsageError("keystore.key-type", "derive produces aes-256 or hmac-sha256 keys", got=new_type)
        with self._token("derive a key", key_id):
            source, _ = self._typed(key_id, "hmac-sha256", "aes-256")
            # HKDF-Extract: PRK = HMAC(0^32, IKM) = SHA-256(opad0 || SHA-256(ipad0 || IKM)); IKM via C_DigestKey.
            inner = bytearray(self._session.digest(iter([_IPAD0, source]), mechanism=Mechanism.SHA256))
            prk = bytearray(hashlib.sha256(_OPAD0 + inner).digest())
            okm = bytearray()
            try:
                prk_key: Any = self._session.create_object(
                    {
                        Attribute.CLASS: ObjectClass.SECRET_KEY,
                        Attribute.KEY_TYPE: P11KeyType.GENERIC_SECRET,
                        Attribute.TOKEN: False,
                        Attribute.PRIVATE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                        Attribute.SIGN: True,
                        Attribute.VALUE: bytes(prk),
                    }
                )
                try:
                    # HKDF-Expand for L = 32 = HashLen: OKM = T(1) = HMAC(PRK, info || 0x01).
                    okm[:] = prk_key.sign(bytes(info) + b"\x01", mechanism=Mechanism.SHA256_HMAC)
                finally:
                    prk_key.destroy()
                self._replace_secret(new_id, new_type, bytes(okm[: _SIZES[new_type]]))
            finally:
                inner[:] = bytes(len(inner))
                prk[:] = bytes(len(prk))
                okm[:] = bytes(len(okm))

    def ecdh(self, key_id: str, peer_public_der: bytes) -> bytes:
        """ECDH on P-256 in the token: the shared secret (X coordinate, 32 bytes) of ``key_id`` and the peer key.

        ``CKM_ECDH1_DERIVE`` (``CKD_NULL``) into a readable session secret that
        is read and destroyed at once; see the module docstring for what
        crosses host memory. The caller must run the secret through a KDF at
        once and drop it.

        Raises:
            FormatError: ``keystore.peer-key`` if the peer key is not a P-256 SubjectPublicKeyInfo.
            UsageError: ``keystore.key-type`` if ``key_id`` is not an ``ecc-p256`` key;
                ``keystore.key-usage`` if it was created without ``CKA_DERIVE`` (before ECDH support).
        """
        with self._token("compute an ECDH shared secret", key_id):
            private, _ = self._typed(key_id, "ecc-p256")
            peer = load_p256_peer(peer_public_der)
            if not private[Attribute.DERIVE]:
                raise UsageError(
                    "keystore.key-usage",
                    "this ecc-p256 key was created for signing only (before ECDH support): it cannot do ECDH",
                    subject=key_id,
                )
            point = peer.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            secret = private.derive_key(
                P11KeyType.GENERIC_SECRET,
                _ECDH_SIZE * 8,
                mechanism=Mechanism.ECDH1_DERIVE,
                mechanism_param=(KDF.NULL, None, point),
                template=_ECDH_SECRET_TEMPLATE,
            )
            try:
                shared = bytes(secret[Attribute.VALUE])
            finally:
                secret.destroy()
        if len(shared) != _ECDH_SIZE:
            raise PlatformError("keystore.token", "the token returned a malformed ECDH shared secret", subject=key_id)
        return shared

    # -- writing ----------------------------------------------------------------------------------

    def _create_secret(self, label: str, key_type: KeyType, value: bytes) -> Any:
        kind, capabilities = _secret_kind(key_type)
        template = _secret_template(label) | capabilities
        return self._session.create_object(
            template | {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: kind, Attribute.VALUE: value}
        )

    def _replace_secret(self, key_id: str, key_type: KeyType, value: bytes) -> None:
        """Stores ``value`` under ``key_id``, replacing what is there, never leaving neither."""
        temporary = _TMP_PREFIX + self._label(key_id)
        for stale in self._session.get_objects({Attribute.LABEL: temporary, Attribute.TOKEN: True}):
            stale.destroy()  # left by an earlier interrupted derive
        new = self._create_secret(temporary, key_type, value)
        try:
            for old in self._objects(key_id):
                old.destroy()
        except BaseException:
            new.destroy()
            raise
        new[Attribute.LABEL] = self._label(key_id)


# -- helpers --------------------------------------------------------------------------------------


def _name(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _map_error(exc: p11.PKCS11Error, what: str, key_id: str | None = None) -> PlatformError:
    if isinstance(exc, _LOCKED_ERRORS):
        return PlatformError(
            "keystore.locked", f"cannot {what}: the token is not logged in ({_name(exc)})", subject=key_id
        )
    if isinstance(exc, _UNAVAILABLE_ERRORS):
        return PlatformError("keystore.unavailable", f"cannot {what}: the token is gone ({_name(exc)})", subject=key_id)
    return PlatformError("keystore.token", f"the token refused to {what} ({_name(exc)})", subject=key_id)


def _close_quietly(session: Any) -> None:
    with suppress(p11.PKCS11Error):  # the token is already gone: nothing left to close
        session.close()


def _gcm(nonce: bytes, aad: bytes) -> pkcs11.GCMParams:
    return pkcs11.GCMParams(bytes(nonce), bytes(aad), 128)


def _secret_kind(key_type: KeyType) -> tuple[P11KeyType, dict[Attribute, Any]]:
    """The PKCS#11 key type and the usage attributes of an ``aes-256`` or ``hmac-sha256`` key."""
    if key_type == "aes-256":
        return P11KeyType.AES, {Attribute.ENCRYPT: True, Attribute.DECRYPT: True}
    return P11KeyType.GENERIC_SECRET, {Attribute.SIGN: True, Attribute.VERIFY: True}


def _secret_template(label: str) -> dict[Attribute, Any]:
    """A stored, sensitive, non-extractable secret key with no usage yet (see :func:`_secret_kind`)."""
    return {
        Attribute.LABEL: label,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: False,
        Attribute.DECRYPT: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }


def _private_template(label: str) -> dict[Attribute, Any]:
    """The private half of an ``ecc-p256`` key (``C_GenerateKeyPair`` takes the curve from the public half)."""
    return {
        Attribute.CLASS: ObjectClass.PRIVATE_KEY,
        Attribute.KEY_TYPE: P11KeyType.EC,
        Attribute.LABEL: label,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: True,
        Attribute.DECRYPT: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: True,  # CKM_ECDH1_DERIVE (ecdh)
    }


def _public_template(label: str) -> dict[Attribute, Any]:
    return {
        Attribute.CLASS: ObjectClass.PUBLIC_KEY,
        Attribute.KEY_TYPE: P11KeyType.EC,
        Attribute.EC_PARAMS: _P256_PARAMS,
        Attribute.LABEL: label,
        Attribute.TOKEN: True,
        Attribute.PRIVATE: False,
        Attribute.VERIFY: True,
        Attribute.ENCRYPT: False,
        Attribute.WRAP: False,
    }


def _octet_string(point: bytes) -> bytes:
    """DER OCTET STRING around an uncompressed point (65 bytes: short-form length)."""
    return b"\x04" + bytes([len(point)]) + point


def _unwrap_point(encoded: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING; some tokens return the raw point instead."""
    if len(encoded) == 67 and encoded[:2] == b"\x04\x41":
        return encoded[2:]
    return encoded
