/* iSM host ABI, version 1 — for microservices written in C and compiled to wasm32.
 *
 * Build (freestanding C, no libc; examples/build.py does exactly this):
 *   clang --target=wasm32 -std=c11 -O2 -ffreestanding -nostdlib -Wall -Wextra -Werror -pedantic -c m.c -o m.o
 *   wasm-ld --no-entry -z stack-size=16384 m.o -o m.wasm
 * Mark the exports the supervisor calls with ISM_EXPORT; wasm-ld exports the memory. Do not link with
 * --allow-undefined: a call into a libc that is not there must fail the link, not become an import
 * the device refuses. The contract is documented in docs/ABI.md; src/ism/formats/abi.py is the
 * source of truth.
 */
#ifndef ISM_H
#define ISM_H

#include <stdint.h>

#define ISM_ABI_VERSION 1

#define ISM_OK            0
#define ISM_EINVAL       (-1)
#define ISM_EUNAVAILABLE (-2)
#define ISM_ETOOBIG      (-3)
#define ISM_ECALLEE      (-4)
#define ISM_EAGAIN       (-5)
#define ISM_EIO          (-6)
#define ISM_EREFUSED     (-7)
#define ISM_EVERIFY      (-8)
#define ISM_ENOTFOUND    (-9)
#define ISM_ESTORAGE     (-10)
#define ISM_ENOTPERMITTED (-11)
#define ISM_ECORRUPT     (-12)

#define ISM_STORAGE_WRITE_ONCE           1
#define ISM_STORAGE_NO_CONFIDENTIALITY   2
#define ISM_STORAGE_NO_REPLAY_PROTECTION 4

#define ISM_MODE_READ    1
#define ISM_MODE_WRITE   2
#define ISM_MODE_CONTROL 4

#define ISM_MAX_IO       65536
#define ISM_GATEWAY_MAX  4096

#define ISM_IMPORT(name) __attribute__((import_module("ism"), import_name(name)))
#define ISM_EXPORT(name) __attribute__((export_name(name)))

ISM_IMPORT("log") void ism_log(int32_t level, const void *ptr, int32_t len);
ISM_IMPORT("resource_open") int32_t ism_resource_open(const char *name, int32_t name_len, int32_t mode);
ISM_IMPORT("resource_read") int32_t ism_resource_read(int32_t handle, void *buf, int32_t cap);
ISM_IMPORT("resource_write") int32_t ism_resource_write(int32_t handle, const void *buf, int32_t len);
ISM_IMPORT("resource_control") int32_t ism_resource_control(int32_t handle, int32_t op, const void *arg,
                                                             int32_t arg_len);
ISM_IMPORT("gateway_call") int32_t ism_gateway_call(const char *target, int32_t target_len, const void *req,
                                                     int32_t req_len, void *resp, int32_t resp_cap);
ISM_IMPORT("caller_id") int32_t ism_caller_id(uint8_t uuid_out[16]);
ISM_IMPORT("self_id") int32_t ism_self_id(uint8_t uuid_out[16]);
ISM_IMPORT("random") int32_t ism_random(void *buf, int32_t len);
ISM_IMPORT("time_ms") int64_t ism_time_ms(void);
ISM_IMPORT("key_open") int32_t ism_key_open(const char *name, int32_t name_len);
ISM_IMPORT("key_sign") int32_t ism_key_sign(int32_t handle, const void *msg, int32_t msg_len, void *sig,
                                             int32_t sig_cap);
ISM_IMPORT("key_verify") int32_t ism_key_verify(int32_t handle, const void *msg, int32_t msg_len, const void *sig,
                                                 int32_t sig_len);
ISM_IMPORT("key_encrypt") int32_t ism_key_encrypt(int32_t handle, const void *pt, int32_t pt_len, const void *aad,
                                                   int32_t aad_len, void *out, int32_t out_cap);
ISM_IMPORT("key_decrypt") int32_t ism_key_decrypt(int32_t handle, const void *in, int32_t in_len, const void *aad,
                                                   int32_t aad_len, void *out, int32_t out_cap);
ISM_IMPORT("key_mac") int32_t ism_key_mac(int32_t handle, const void *data, int32_t data_len, void *out,
                                           int32_t out_cap);
ISM_IMPORT("key_export_public") int32_t ism_key_export_public(int32_t handle, void *out, int32_t out_cap);
ISM_IMPORT("key_destroy") int32_t ism_key_destroy(int32_t handle);
ISM_IMPORT("storage_set") int32_t ism_storage_set(int64_t uid, const void *data, int32_t data_len, int32_t flags);
ISM_IMPORT("storage_get") int32_t ism_storage_get(int64_t uid, int32_t offset, void *out, int32_t out_cap);
ISM_IMPORT("storage_info") int32_t ism_storage_info(int64_t uid, uint32_t info_out[2]);
ISM_IMPORT("storage_remove") int32_t ism_storage_remove(int64_t uid);
ISM_IMPORT("identity_id") int32_t ism_identity_id(uint8_t id_out[32]);
ISM_IMPORT("identity_cert") int32_t ism_identity_cert(int32_t handle, void *out, int32_t out_cap);
ISM_IMPORT("trust_bundle") int32_t ism_trust_bundle(void *out, int32_t out_cap);
ISM_IMPORT("attest") int32_t ism_attest(const void *nonce, int32_t nonce_len, void *out, int32_t out_cap);

/* Exports the supervisor calls (define the ones you need), e.g. ISM_EXPORT("init") int32_t init(void):
 *   int32_t init(void);
 *   int32_t tick(void);
 *   int32_t event(int32_t handle);
 *   int32_t gateway_buffer(void);                         returns the address of a 4096-byte buffer
 *   int32_t op_<operation>(int32_t req_ptr, int32_t req_len); reply written in place, returns its length
 */

#endif /* ISM_H */
