"""The host ABI table: which functions a microservice may import from the iSM.

Owns: the names and signatures of import module ``ism`` (ABI version 0).
Must not import: anything above formats.

Threat: a module that imports a host function the iSM does not provide (or
with a different signature) would fail at link time on the device, or worse,
bind to something unintended. Packages are checked against this table at
build and at install, so such a module never reaches a device. The runtime
semantics of each call are implemented by the hypervisor; this table is the
single source of the names and types.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ism.formats.wasm import FuncType

__all__ = ["ABI_VERSION", "HOST_ABI", "MODULE"]

ABI_VERSION: Final = 0
MODULE: Final = "ism"

_I32 = "i32"


def _f(n_params: int, n_results: int = 1) -> FuncType:
    return FuncType((_I32,) * n_params, (_I32,) * n_results)


#: (module, name) -> signature. Pointers and lengths are i32 into the caller's memory.
HOST_ABI: Final[Mapping[tuple[str, str], FuncType]] = {
    (MODULE, "log"): _f(3, 0),  # level, ptr, len
    (MODULE, "resource_open"): _f(3),  # name_ptr, name_len, mode -> handle | -errno
    (MODULE, "resource_read"): _f(3),  # handle, buf_ptr, buf_cap -> n | -errno
    (MODULE, "resource_write"): _f(3),  # handle, buf_ptr, buf_len -> n | -errno
    (MODULE, "resource_control"): _f(4),  # handle, op, arg_ptr, arg_len -> value | -errno
    (MODULE, "gateway_call"): _f(8),  # target, target_len, op, op_len, req, req_len, resp, resp_cap
    (MODULE, "caller_id"): _f(1),  # buf_ptr (16 bytes) -> 0 | -errno
    (MODULE, "self_id"): _f(1),  # buf_ptr (16 bytes) -> 0 | -errno
    (MODULE, "random"): _f(2),  # buf_ptr, len -> 0 | -errno
    (MODULE, "time_ms"): FuncType((), ("i64",)),
}
