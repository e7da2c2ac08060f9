"""The ``storage_*`` host functions: a microservice's own namespace of the secure storage.

Owns: mapping the four storage host calls onto :class:`~ism.services.storage.SecureStorage`
for the calling microservice (its UUID is the namespace; its policy's
``storage`` is its quota) and mapping storage errors to ABI error codes.
Must not import: agent, store, cli.

Threat: a microservice reaching another's records or exceeding its quota.
The namespace is the caller's verified identity — no argument names it — and
a microservice without a storage grant that calls storage is a violation
(``policy.storage``). Integrity and freshness failures reach the guest only
as ``ISM_ECORRUPT`` (no oracle on why).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from ism.errors import IsmError, Violation
from ism.formats.abi import ERRORS, STORAGE_FLAGS
from ism.services.storage import SecureStorage

if TYPE_CHECKING:
    from ism.hypervisor.sandbox import Sandbox
    from ism.hypervisor.supervisor import Microservice

__all__ = ["StorageService"]

_CODES: Final = {
    "storage.quota": ERRORS["ISM_ESTORAGE"],
    "storage.write-once": ERRORS["ISM_ENOTPERMITTED"],
    "storage.missing": ERRORS["ISM_ENOTFOUND"],
    "storage.integrity": ERRORS["ISM_ECORRUPT"],
    "storage.rollback": ERRORS["ISM_ECORRUPT"],
    "storage.root": ERRORS["ISM_ECORRUPT"],
}
EINVAL: Final = ERRORS["ISM_EINVAL"]
MAX_FLAGS: Final = sum(STORAGE_FLAGS.values())


class StorageService:
    """Host functions over one device's secure storage."""

    def __init__(self, storage: SecureStorage) -> None:
        self.storage = storage

    def calls(self) -> dict[str, Callable[..., int]]:
        return {
            "storage_set": self.storage_set,
            "storage_get": self.storage_get,
            "storage_info": self.storage_info,
            "storage_remove": self.storage_remove,
        }

    @staticmethod
    def _granted(ms: Microservice) -> None:
        if ms.policy.storage <= 0:
            raise Violation("policy.storage", "no storage is granted", subject=ms.name)

    @staticmethod
    def _code(exc: IsmError) -> int:
        return _CODES.get(exc.rule, EINVAL)

    def storage_set(self, ms: Microservice, sb: Sandbox, uid: int, ptr: int, n: int, flags: int) -> int:
        self._granted(ms)
        data = sb.read(ptr, n, "record")
        if not 0 <= flags <= MAX_FLAGS:
            return EINVAL
        try:
            self.storage.set(ms.uuid, uid & 0xFFFFFFFFFFFFFFFF, data, flags, quota=ms.policy.storage)
        except IsmError as exc:
            return self._code(exc)
        return 0

    def storage_get(self, ms: Microservice, sb: Sandbox, uid: int, offset: int, ptr: int, cap: int) -> int:
        self._granted(ms)
        sb.check_span(ptr, cap, "record buffer")
        try:
            info = self.storage.get_info(ms.uuid, uid & 0xFFFFFFFFFFFFFFFF)
            offset &= 0xFFFFFFFF
            if offset > info.size:
                return EINVAL
            length = min(cap & 0xFFFFFFFF, info.size - offset)
            data = self.storage.get(ms.uuid, uid & 0xFFFFFFFFFFFFFFFF, offset, length)
        except IsmError as exc:
            return self._code(exc)
        sb.write(ptr, data, "record buffer")
        return len(data)

    def storage_info(self, ms: Microservice, sb: Sandbox, uid: int, out: int) -> int:
        self._granted(ms)
        sb.check_span(out, 8, "info buffer")
        try:
            info = self.storage.get_info(ms.uuid, uid & 0xFFFFFFFFFFFFFFFF)
        except IsmError as exc:
            return self._code(exc)
        sb.write(out, struct.pack("<II", info.size, info.flags), "info buffer")
        return 0

    def storage_remove(self, ms: Microservice, sb: Sandbox, uid: int) -> int:
        self._granted(ms)
        try:
            self.storage.remove(ms.uuid, uid & 0xFFFFFFFFFFFFFFFF)
        except IsmError as exc:
            return self._code(exc)
        return 0
