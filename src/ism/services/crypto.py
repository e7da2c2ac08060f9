"""The crypto service: per-microservice keys with PSA Crypto semantics, reached through the host ABI.

Owns: the ``key_*`` host functions. A key belongs to one microservice: it is
named in that microservice's policy (``keys``) with a type and usage flags,
stored in the device's key store under an id that includes the owner's UUID,
created on first open, and used only through an opaque handle valid for its
owner and only until the owner restarts. Random numbers for nonces come from
the OS CSPRNG.
Must not import: agent, store, cli.

Threat: a microservice using a key it was not granted, using a granted key
for an operation outside its usage flags (e.g. decrypting with a signing
key), or forging/replaying another microservice's handle to use its key.
Each of these is a violation (the caller stops). Private and secret key
material never crosses the ABI: only signatures, ciphertexts, MACs and public
keys do.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from ism.crypto.keystore import KeyStore, KeyType
from ism.errors import SignatureError, Violation
from ism.formats.abi import ERRORS

if TYPE_CHECKING:
    from ism.hypervisor.sandbox import Sandbox
    from ism.hypervisor.supervisor import Microservice

__all__ = ["CryptoService", "KeyHandle", "key_store_id"]

ETOOBIG, EVERIFY = ERRORS["ISM_ETOOBIG"], ERRORS["ISM_EVERIFY"]
MAX_NAME: Final = 64
MAX_HANDLES: Final = 32
NONCE: Final = 12
TAG: Final = 16


@dataclass(frozen=True, slots=True)
class KeyHandle:
    """What an opaque handle stands for."""

    name: str
    store_id: str
    type: str
    usage: frozenset[str]


def key_store_id(ms_uuid: str, name: str) -> str:
    """The key store id of a microservice's key: the owner is part of the id."""
    return f"ms.{ms_uuid}.{name}"


def _handles(ms: Microservice) -> dict[int, KeyHandle]:
    table = ms.scratch.setdefault("crypto.handles", {})
    assert isinstance(table, dict)
    return table


class CryptoService:
    """The ``key_*`` host functions over a key store."""

    def __init__(self, keystore: KeyStore) -> None:
        self.keystore = keystore

    def calls(self) -> dict[str, Callable[..., int]]:
        return {
            "key_open": self.key_open,
            "key_sign": self.key_sign,
            "key_verify": self.key_verify,
            "key_encrypt": self.key_encrypt,
            "key_decrypt": self.key_decrypt,
            "key_mac": self.key_mac,
            "key_export_public": self.key_export_public,
            "key_destroy": self.key_destroy,
        }

    # -- handles ------------------------------------------------------------------------------------

    def key_open(self, ms: Microservice, sb: Sandbox, name_ptr: int, name_len: int) -> int:
        if name_len & 0xFFFFFFFF > MAX_NAME:
            raise Violation("abi.bounds", "key name longer than 64 bytes")
        try:
            name = sb.read(name_ptr, name_len, "key name").decode("ascii")
        except UnicodeDecodeError:
            raise Violation("abi.name", "key name is not ASCII") from None
        grant = ms.policy.keys.get(name)
        if grant is None:
            raise Violation("policy.key", f"key {name} is not granted", subject=name)
        store_id = key_store_id(str(ms.uuid), name)
        if not self.keystore.exists(store_id):
            ktype: KeyType = grant.type  # type: ignore[assignment]
            self.keystore.generate(store_id, ktype)
        table = _handles(ms)
        if len(table) >= MAX_HANDLES:
            raise Violation("crypto.handles", f"more than {MAX_HANDLES} open key handles")
        while True:  # opaque: a random non-zero 31-bit value, private to this microservice and this start
            handle = secrets.randbits(31) | 1
            if handle not in table:
                break
        table[handle] = KeyHandle(name, store_id, grant.type, grant.usage)
        return handle

    def handle(self, ms: Microservice, handle: int, usage: str) -> KeyHandle:
        """The key behind a handle, if the owner may use it for ``usage``; otherwise a violation."""
        entry = _handles(ms).get(handle)
        if entry is None:
            raise Violation(
                "crypto.handle", "not a key handle of this microservice (forged, stale or foreign)", subject=str(handle)
            )
        if usage not in entry.usage:
            raise Violation("crypto.usage", f"key {entry.name} does not allow {usage}", subject=entry.name)
        return entry

    def key_destroy(self, ms: Microservice, sb: Sandbox, handle: int) -> int:
        entry = _handles(ms).get(handle)
        if entry is None:
            raise Violation("crypto.handle", "not a key handle of this microservice", subject=str(handle))
        self.keystore.destroy(entry.store_id)
        for h, other in list(_handles(ms).items()):
            if other.store_id == entry.store_id:
                del _handles(ms)[h]
        return 0

    # -- operations ---------------------------------------------------------------------------------

    def key_sign(self, ms: Microservice, sb: Sandbox, h: int, mp: int, ml: int, sp: int, sc: int) -> int:
        key = self.handle(ms, h, "sign")
        message = sb.read(mp, ml, "message")
        sb.check_span(sp, sc, "signature buffer")
        if sc & 0xFFFFFFFF < 64:
            return ETOOBIG
        sb.write(sp, self.keystore.sign(key.store_id, message), "signature buffer")
        return 64

    def key_verify(self, ms: Microservice, sb: Sandbox, h: int, mp: int, ml: int, sp: int, sl: int) -> int:
        key = self.handle(ms, h, "verify")
        message, signature = sb.read(mp, ml, "message"), sb.read(sp, sl, "signature")
        try:
            self.keystore.verify(key.store_id, message, signature)
        except SignatureError:
            return EVERIFY
        return 0

    def key_encrypt(
        self, ms: Microservice, sb: Sandbox, h: int, pp: int, pl: int, ap: int, al: int, op: int, oc: int
    ) -> int:
        key = self.handle(ms, h, "encrypt")
        plaintext, aad = sb.read(pp, pl, "plaintext"), sb.read(ap, al, "associated data")
        sb.check_span(op, oc, "output buffer")
        if oc & 0xFFFFFFFF < len(plaintext) + NONCE + TAG:
            return ETOOBIG
        nonce = os.urandom(NONCE)
        out = nonce + self.keystore.encrypt(key.store_id, nonce, plaintext, aad)
        sb.write(op, out, "output buffer")
        return len(out)

    def key_decrypt(
        self, ms: Microservice, sb: Sandbox, h: int, ip: int, il: int, ap: int, al: int, op: int, oc: int
    ) -> int:
        key = self.handle(ms, h, "decrypt")
        data, aad = sb.read(ip, il, "ciphertext"), sb.read(ap, al, "associated data")
        sb.check_span(op, oc, "output buffer")
        if len(data) < NONCE + TAG:
            return EVERIFY
        try:
            plaintext = self.keystore.decrypt(key.store_id, data[:NONCE], data[NONCE:], aad)
        except SignatureError:
            return EVERIFY
        if len(plaintext) > oc & 0xFFFFFFFF:
            return ETOOBIG
        sb.write(op, plaintext, "output buffer")
        return len(plaintext)

    def key_mac(self, ms: Microservice, sb: Sandbox, h: int, dp: int, dl: int, op: int, oc: int) -> int:
        key = self.handle(ms, h, "mac")
        data = sb.read(dp, dl, "data")
        sb.check_span(op, oc, "output buffer")
        if oc & 0xFFFFFFFF < 32:
            return ETOOBIG
        sb.write(op, self.keystore.mac(key.store_id, data), "output buffer")
        return 32

    def key_export_public(self, ms: Microservice, sb: Sandbox, h: int, op: int, oc: int) -> int:
        key = self.handle(ms, h, "export-public")
        der = self.keystore.public_key(key.store_id)
        sb.check_span(op, oc, "output buffer")
        if len(der) > oc & 0xFFFFFFFF:
            return ETOOBIG
        sb.write(op, der, "output buffer")
        return len(der)

    def public_key(self, ms_uuid: str, name: str) -> bytes:
        """For the host side (tests, the demo's relying party): the public key of a microservice's key."""
        return self.keystore.public_key(key_store_id(ms_uuid, name))

    def erase(self, ms_uuid: str, names: list[str]) -> None:
        """Crypto-erase: destroy every key of a microservice."""
        for name in names:
            store_id = key_store_id(ms_uuid, name)
            if self.keystore.exists(store_id):
                self.keystore.destroy(store_id)
