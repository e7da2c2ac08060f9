/* sealed-counter: a counter that survives restarts and reboots, each value signed by its own key.
 *
 * At start (init) it loads its record from secure storage, or draws a random 16-byte epoch if it
 * has none yet. On every activation (init, then every timer tick) it adds one to the count,
 * writes the record back, and only then signs and logs the new value, so that no value is ever
 * handed out twice, even across a crash or a power cut. (epoch, count) is unique for the life of
 * the microservice's storage; an erase starts a new epoch. A record that is unreadable or of the
 * wrong size stops the microservice (init fails) rather than restarting the count from zero.
 *
 * Every activation logs one line:
 *   sealed-counter: epoch=<32 hex> count=<decimal> t=<ms> sig=<128 hex>
 * where sig is the ECDSA P-256 signature (raw r||s) by the key "heartbeat" over
 *   "ism.sealed-counter.v1" || epoch (16 bytes) || count (8 bytes, big-endian).
 * Its public key: `ism device key DIR sealed-counter heartbeat`.
 *
 * Host calls: storage_get, storage_set, random, key_open, key_sign, time_ms, log.
 * Freestanding C (no libc), built by examples/build.py with clang for wasm32; see docs/ABI.md.
 */
#include <stdint.h>

#include "ism.h"

#define RECORD_UID 1
#define EPOCH_LEN 16
#define COUNT_LEN 8
#define RECORD_LEN (EPOCH_LEN + COUNT_LEN)
#define SIG_LEN 64
#define LOG_INFO 1
#define LOG_ERROR 3

static const char DOMAIN[] = "ism.sealed-counter.v1";
static const char KEY_NAME[] = "heartbeat";
#define DOMAIN_LEN ((int32_t)sizeof DOMAIN - 1)

static uint8_t epoch[EPOCH_LEN];
static uint64_t count;
static int32_t key = -1;

/* -- the few helpers a libc would give ---------------------------------------------------------- */

static void copy(uint8_t *dst, const uint8_t *src, int32_t n) {
    for (int32_t i = 0; i < n; i++) dst[i] = src[i];
}

/* A log line under construction (at most 1 KiB is accepted by the host; ours are < 300 bytes). */
typedef struct {
    char text[320];
    int32_t len;
} line_t;

static void put(line_t *line, const char *s) {
    while (*s && line->len < (int32_t)sizeof line->text) line->text[line->len++] = *s++;
}

static void put_u64(line_t *line, uint64_t v) {
    char digits[20];
    int32_t n = 0;
    do {
        digits[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n && line->len < (int32_t)sizeof line->text) line->text[line->len++] = digits[--n];
}

static void put_i32(line_t *line, int32_t v) {
    if (v < 0) {
        put(line, "-");
        put_u64(line, (uint64_t)(-(int64_t)v));
    } else {
        put_u64(line, (uint64_t)v);
    }
}

static void put_hex(line_t *line, const uint8_t *data, int32_t n) {
    static const char HEX[] = "0123456789abcdef";
    for (int32_t i = 0; i < n && line->len + 2 <= (int32_t)sizeof line->text; i++) {
        line->text[line->len++] = HEX[data[i] >> 4];
        line->text[line->len++] = HEX[data[i] & 15];
    }
}

static void put_be64(uint8_t *dst, uint64_t v) {
    for (int32_t i = 7; i >= 0; i--, v >>= 8) dst[i] = (uint8_t)v;
}

static void put_le64(uint8_t *dst, uint64_t v) {
    for (int32_t i = 0; i < 8; i++, v >>= 8) dst[i] = (uint8_t)v;
}

static uint64_t get_le64(const uint8_t *src) {
    uint64_t v = 0;
    for (int32_t i = 7; i >= 0; i--) v = v << 8 | src[i];
    return v;
}

/* Logs "sealed-counter: <what> failed (<rc>)" as an error and returns rc (negative: a fault). */
static int32_t fail(const char *what, int32_t rc) {
    line_t line;
    line.len = 0; /* not "= {0}": that would be a memset call, and there is no libc */
    put(&line, "sealed-counter: ");
    put(&line, what);
    put(&line, " failed (");
    put_i32(&line, rc);
    put(&line, ")");
    ism_log(LOG_ERROR, line.text, line.len);
    return rc < 0 ? rc : ISM_EINVAL;
}

/* -- the counter -------------------------------------------------------------------------------- */

/* Loads the record, or starts a new epoch if there is none. */
static int32_t load(void) {
    uint8_t record[RECORD_LEN + 1]; /* one byte more: a longer record is noticed, not truncated */
    int32_t n = ism_storage_get(RECORD_UID, 0, record, (int32_t)sizeof record);
    if (n == ISM_ENOTFOUND) {
        int32_t rc = ism_random(epoch, EPOCH_LEN);
        if (rc < 0) return fail("random", rc);
        count = 0;
        return ISM_OK;
    }
    if (n < 0) return fail("storage_get", n);
    if (n != RECORD_LEN) return fail("record size check", ISM_ECORRUPT);
    copy(epoch, record, EPOCH_LEN);
    count = get_le64(record + EPOCH_LEN);
    return ISM_OK;
}

/* count += 1, persisted before it is signed and shown. */
static int32_t advance(void) {
    uint8_t record[RECORD_LEN];
    copy(record, epoch, EPOCH_LEN);
    put_le64(record + EPOCH_LEN, count + 1);
    int32_t rc = ism_storage_set(RECORD_UID, record, RECORD_LEN, 0);
    if (rc < 0) return fail("storage_set", rc);
    count += 1;

    uint8_t message[DOMAIN_LEN + EPOCH_LEN + COUNT_LEN];
    copy(message, (const uint8_t *)DOMAIN, DOMAIN_LEN);
    copy(message + DOMAIN_LEN, epoch, EPOCH_LEN);
    put_be64(message + DOMAIN_LEN + EPOCH_LEN, count);
    uint8_t sig[SIG_LEN];
    rc = ism_key_sign(key, message, (int32_t)sizeof message, sig, SIG_LEN);
    if (rc != SIG_LEN) return fail("key_sign", rc);

    line_t line;
    line.len = 0;
    put(&line, "sealed-counter: epoch=");
    put_hex(&line, epoch, EPOCH_LEN);
    put(&line, " count=");
    put_u64(&line, count);
    put(&line, " t=");
    put_u64(&line, (uint64_t)ism_time_ms());
    put(&line, " sig=");
    put_hex(&line, sig, SIG_LEN);
    ism_log(LOG_INFO, line.text, line.len);
    return ISM_OK;
}

ISM_EXPORT("init") int32_t init(void) {
    key = ism_key_open(KEY_NAME, (int32_t)sizeof KEY_NAME - 1);
    if (key < 0) return fail("key_open", key);
    int32_t rc = load();
    if (rc < 0) return rc;
    return advance();
}

ISM_EXPORT("tick") int32_t tick(void) {
    return advance();
}
