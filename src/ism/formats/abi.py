"""The host ABI table: which functions a microservice may import from the iSM.

Owns: the names and signatures of import module ``ism`` (ABI version 1), the
error codes host calls return, and the names of the exports the supervisor
calls. ``docs/ABI.md`` and ``include/ism.h`` describe the same contract for
developers; a test checks that the three agree.
Must not import: anything above formats.

Threat: a module that imports a host function the iSM does not provide (or
with a different signature) would fail at link time on the device, or worse,
bind to something unintended. Packages are checked against this table at
build and at install, so such a module never reaches a device. The runtime
semantics of each call are implemented by :mod:`ism.hypervisor.host`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from ism.formats.wasm import FuncType

__all__ = [
    "ABI_VERSION",
    "ERRORS",
    "EVENT_EXPORT",
    "GATEWAY_BUFFER_EXPORT",
    "GATEWAY_MAX",
    "HOST_ABI",
    "INIT_EXPORT",
    "MAX_IO",
    "MODULE",
    "STORAGE_FLAGS",
    "TICK_EXPORT",
]

ABI_VERSION: Final = 1
MODULE: Final = "ism"

#: Largest buffer a single host call moves (bytes).
MAX_IO: Final = 64 * 1024
#: Largest gateway request or reply (bytes).
GATEWAY_MAX: Final = 4096

# Guest exports the supervisor calls.
INIT_EXPORT: Final = "init"  # () -> i32, once after instantiation; < 0 is a fault
TICK_EXPORT: Final = "tick"  # () -> i32, on every timer tick (needs the "timer" resource)
EVENT_EXPORT: Final = "event"  # (handle i32) -> i32, when a resource it opened has data
GATEWAY_BUFFER_EXPORT: Final = "gateway_buffer"  # () -> i32: address of a GATEWAY_MAX-byte buffer

#: Errors host calls return (negative i32). Policy violations are not errors: they stop the caller.
ERRORS: Final[Mapping[str, int]] = {
    "ISM_OK": 0,
    "ISM_EINVAL": -1,  # an argument value is wrong (unknown operation, bad mode)
    "ISM_EUNAVAILABLE": -2,  # the gateway callee is stopped, restarting or quarantined
    "ISM_ETOOBIG": -3,  # the reply does not fit the caller's buffer (nothing is truncated)
    "ISM_ECALLEE": -4,  # the gateway callee faulted while serving the call
    "ISM_EAGAIN": -5,  # no data yet (try again on the next event)
    "ISM_EIO": -6,  # the peripheral failed
    "ISM_EREFUSED": -7,  # the callee answered with an error of its own
    "ISM_EVERIFY": -8,  # a signature, MAC or ciphertext does not verify (one code for all)
    "ISM_ENOTFOUND": -9,  # no such storage record
    "ISM_ESTORAGE": -10,  # the storage quota would be exceeded
    "ISM_ENOTPERMITTED": -11,  # a write-once record cannot be changed or removed
    "ISM_ECORRUPT": -12,  # stored data failed its integrity or freshness check
}

#: PSA Protected Storage flags of ``storage_set``.
STORAGE_FLAGS: Final[Mapping[str, int]] = {
    "WRITE_ONCE": 1,
    "NO_CONFIDENTIALITY": 2,
    "NO_REPLAY_PROTECTION": 4,
}

_I32 = "i32"


def _f(n_params: int, n_results: int = 1) -> FuncType:
    return FuncType((_I32,) * n_params, (_I32,) * n_results)


#: (module, name) -> signature. Pointers and lengths are i32 into the caller's memory.
HOST_ABI: Final[Mapping[tuple[str, str], FuncType]] = {
    (MODULE, "log"): _f(3, 0),  # level, ptr, len
    (MODULE, "resource_open"): _f(3),  # name_ptr, name_len, mode -> handle
    (MODULE, "resource_read"): _f(3),  # handle, buf_ptr, buf_cap -> n | error
    (MODULE, "resource_write"): _f(3),  # handle, buf_ptr, buf_len -> n | error
    (MODULE, "resource_control"): _f(4),  # handle, op, arg_ptr, arg_len -> value | error
    (MODULE, "gateway_call"): _f(6),  # target_ptr, target_len, req_ptr, req_len, resp_ptr, resp_cap -> n | error
    (MODULE, "caller_id"): _f(1),  # buf_ptr (16 bytes) -> 0 | ISM_EINVAL outside a gateway call
    (MODULE, "self_id"): _f(1),  # buf_ptr (16 bytes) -> 0
    (MODULE, "random"): _f(2),  # buf_ptr, len -> 0 (needs the "rng" resource)
    (MODULE, "time_ms"): FuncType((), ("i64",)),
    # crypto service (PSA Crypto semantics): keys named in the policy, used through opaque handles
    (MODULE, "key_open"): _f(2),  # name_ptr, name_len -> handle (the key is created on first open)
    (MODULE, "key_sign"): _f(5),  # handle, msg, msg_len, sig, sig_cap -> 64
    (MODULE, "key_verify"): _f(5),  # handle, msg, msg_len, sig, sig_len -> 0 | ISM_EVERIFY
    (MODULE, "key_encrypt"): _f(7),  # handle, pt, pt_len, aad, aad_len, out, out_cap -> n (nonce||ct||tag)
    (MODULE, "key_decrypt"): _f(7),  # handle, in, in_len, aad, aad_len, out, out_cap -> n | ISM_EVERIFY
    (MODULE, "key_mac"): _f(5),  # handle, data, data_len, out, out_cap -> 32
    (MODULE, "key_export_public"): _f(3),  # handle, out, out_cap -> n (SubjectPublicKeyInfo DER)
    (MODULE, "key_destroy"): _f(1),  # handle -> 0
    # secure storage service (PSA Protected Storage semantics)
    (MODULE, "storage_set"): FuncType(("i64", "i32", "i32", "i32"), ("i32",)),  # uid, ptr, len, flags
    (MODULE, "storage_get"): FuncType(("i64", "i32", "i32", "i32"), ("i32",)),  # uid, offset, ptr, cap
    (MODULE, "storage_info"): FuncType(("i64", "i32"), ("i32",)),  # uid, out (size u32, flags u32)
    (MODULE, "storage_remove"): FuncType(("i64",), ("i32",)),  # uid
    # identity service (the workload API)
    (MODULE, "identity_id"): _f(1),  # out (32 bytes): this instance's ID
    (MODULE, "identity_cert"): _f(3),  # key handle, out, out_cap -> n (X.509 DER, issued by the device CA)
    (MODULE, "trust_bundle"): _f(2),  # out, out_cap -> n (the device identity CA certificate, DER)
    # attestation service
    (MODULE, "attest"): _f(4),  # nonce, nonce_len (32/48/64), out, out_cap -> n (a PSA token, COSE_Sign1)
}
