/*
 * ism.formats._cbor_native: the strict CBOR decoder of ism.formats.cbor, in C.
 *
 * Owns: one function, loads(data, max_depth, max_items, allow_indefinite),
 * that decodes exactly one CBOR data item into the same Python values as the
 * pure-Python decoder (cbor._loads_python, the reference): int, bytes, str,
 * list, dict, bool, None, float, cbor.Tag, cbor.UNDEFINED, and tuples (and
 * tags of them) for arrays used as map keys.
 *
 * It never decides how input is malformed. On ANY refusal (truncation, depth,
 * item count, indefinite length, UTF-8, duplicate or unhashable key, break
 * code, simple value, reserved additional information, trailing bytes, a
 * limit it cannot represent, or nesting beyond HARD_MAX_DEPTH) it raises the
 * private exception Invalid, and cbor.loads re-runs the reference decoder,
 * which raises the FormatError with its rule id (or, for nesting beyond
 * HARD_MAX_DEPTH within the caller's limits, decodes it). So the native
 * decoder can only ever accept what the reference accepts, with the same
 * value; docs/adr/0005-native-cbor-decoder.md.
 *
 * Safety: every declared length and count is compared with the bytes that
 * remain before anything is allocated (an item takes at least one byte), all
 * arithmetic is on unsigned 64-bit values checked against those bounds, and
 * recursion is bounded by min(max_depth, HARD_MAX_DEPTH).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* Deeper input is left to the reference decoder (C stack use stays bounded). */
#define HARD_MAX_DEPTH 256
/* Limits above this behave as unbounded: no input can reach them. */
#define ITEMS_CLAMP (((long long)1) << 62)

static PyObject *Invalid;     /* the private "ask the reference decoder" exception */
static PyObject *tag_type;    /* ism.formats.cbor.Tag */
static PyObject *undefined;   /* ism.formats.cbor.UNDEFINED */
static PyObject *break_mark;  /* the break code (0xff) inside an indefinite item */
static PyObject *str_number;  /* "number" */
static PyObject *str_value;   /* "value" */

typedef struct {
    const unsigned char *data;
    uint64_t len;
    uint64_t pos;
    long long max_depth; /* in [-1, HARD_MAX_DEPTH] */
    long long max_items; /* in [-1, ITEMS_CLAMP] */
    uint64_t items;
    int allow_indefinite;
} Decoder;

static PyObject *decode(Decoder *d, long long depth);

static PyObject *
refuse(const char *why)
{
    PyErr_SetString(Invalid, why);
    return NULL;
}

static int
refuse_int(const char *why)
{
    PyErr_SetString(Invalid, why);
    return -1;
}

static inline uint64_t
remaining(const Decoder *d)
{
    return d->len - d->pos;
}

/* The argument of a head: 0 and *out set, 1 for indefinite length (info 31), -1 refused. */
static int
argument(Decoder *d, int info, uint64_t *out)
{
    unsigned int size;
    uint64_t value = 0;

    if (info < 24) {
        *out = (uint64_t)info;
        return 0;
    }
    switch (info) {
    case 24: size = 1; break;
    case 25: size = 2; break;
    case 26: size = 4; break;
    case 27: size = 8; break;
    case 31: return 1;
    default: return refuse_int("reserved additional information");
    }
    if (remaining(d) < size) {
        return refuse_int("truncated argument");
    }
    for (unsigned int i = 0; i < size; i++) {
        value = (value << 8) | d->data[d->pos + i];
    }
    d->pos += size;
    *out = value;
    return 0;
}

/* Counts n more items against max_items; n must not exceed the bytes that remain. */
static int
count(Decoder *d, uint64_t n)
{
    if (d->max_items < 0) {
        return refuse_int("too many items");
    }
    if (n > remaining(d)) {
        return refuse_int("count larger than the bytes that remain");
    }
    /* items <= ITEMS_CLAMP and n < 2**63: no overflow. */
    d->items += n;
    if (d->items > (uint64_t)d->max_items) {
        return refuse_int("too many items");
    }
    return 0;
}

static PyObject *
text_or_bytes(int major, const unsigned char *p, uint64_t n)
{
    PyObject *out;

    if (major == 2) {
        return PyBytes_FromStringAndSize((const char *)p, (Py_ssize_t)n);
    }
    out = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, "strict");
    if (out == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
        PyErr_Clear();
        return refuse("text string is not valid UTF-8");
    }
    return out;
}

/* An indefinite-length byte or text string: definite chunks of the same major type, then 0xff. */
static PyObject *
chunked(Decoder *d, int major)
{
    PyObject *chunks, *item, *out = NULL;

    if (!d->allow_indefinite) {
        return refuse("indefinite-length item not allowed");
    }
    chunks = PyList_New(0);
    if (chunks == NULL) {
        return NULL;
    }
    for (;;) {
        unsigned char b;
        uint64_t n;

        if (d->pos >= d->len) {
            refuse("unterminated indefinite string");
            goto done;
        }
        b = d->data[d->pos++];
        if (b == 0xff) {
            break;
        }
        if ((b >> 5) != major || (b & 0x1f) == 31) {
            refuse("indefinite string chunk of wrong type");
            goto done;
        }
        if (argument(d, b & 0x1f, &n) != 0) {
            goto done;
        }
        if (n > remaining(d)) {
            refuse("truncated chunk");
            goto done;
        }
        /* Text chunks are each valid UTF-8, so joining the decoded chunks equals decoding the join. */
        item = text_or_bytes(major, d->data + d->pos, n);
        if (item == NULL) {
            goto done;
        }
        d->pos += n;
        if (PyList_Append(chunks, item) < 0) {
            Py_DECREF(item);
            goto done;
        }
        Py_DECREF(item);
    }
    if (major == 3) {
        PyObject *empty = PyUnicode_New(0, 0);
        if (empty != NULL) {
            out = PyUnicode_Join(empty, chunks);
            Py_DECREF(empty);
        }
    }
    else {
        PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
        if (empty != NULL) {
            out = PyObject_CallMethod(empty, "join", "O", chunks);
            Py_DECREF(empty);
        }
    }
done:
    Py_DECREF(chunks);
    return out;
}

static PyObject *
simple(Decoder *d, int info)
{
    const char *p;
    double value;

    switch (info) {
    case 20: Py_RETURN_FALSE;
    case 21: Py_RETURN_TRUE;
    case 22: Py_RETURN_NONE;
    case 23: Py_INCREF(undefined); return undefined;
    case 25:
    case 26:
    case 27: {
        unsigned int size = info == 25 ? 2 : info == 26 ? 4 : 8;
        if (remaining(d) < size) {
            return refuse("truncated float");
        }
        p = (const char *)d->data + d->pos;
        d->pos += size;
        /* The functions struct.unpack uses for ">e", ">f" and ">d". */
        value = size == 2 ? PyFloat_Unpack2(p, 0) : size == 4 ? PyFloat_Unpack4(p, 0) : PyFloat_Unpack8(p, 0);
        if (value == -1.0 && PyErr_Occurred()) {
            return NULL;
        }
        return PyFloat_FromDouble(value);
    }
    case 31:
        if (!d->allow_indefinite) {
            return refuse("break code outside indefinite item");
        }
        Py_INCREF(break_mark);
        return break_mark;
    default:
        /* 0..19 and 24: unassigned simple values; 28..30 reserved. */
        return refuse("unassigned simple value or reserved additional information");
    }
}

static PyObject *
array(Decoder *d, uint64_t n, int indefinite, long long depth)
{
    PyObject *list, *item;

    if (indefinite) {
        if (!d->allow_indefinite) {
            return refuse("indefinite-length item not allowed");
        }
        list = PyList_New(0);
        if (list == NULL) {
            return NULL;
        }
        for (;;) {
            item = decode(d, depth + 1);
            if (item == NULL) {
                goto error;
            }
            if (item == break_mark) {
                Py_DECREF(item);
                return list;
            }
            if (count(d, 1) < 0 || PyList_Append(list, item) < 0) {
                Py_DECREF(item);
                goto error;
            }
            Py_DECREF(item);
        }
    }
    if (count(d, n) < 0) {
        return NULL;
    }
    /* n <= the bytes that remain <= PY_SSIZE_T_MAX */
    list = PyList_New((Py_ssize_t)n);
    if (list == NULL) {
        return NULL;
    }
    for (uint64_t i = 0; i < n; i++) {
        item = decode(d, depth + 1);
        if (item == NULL) {
            goto error;
        }
        if (item == break_mark) {
            Py_DECREF(item);
            refuse("break code inside definite array");
            goto error;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
error:
    Py_DECREF(list);
    return NULL;
}

/* cbor._hashable: map keys that are not int, str or bytes. Arrays become tuples, tags keep their
 * number over a hashable value; bool, float, None, undefined and maps are refused. */
static PyObject *
hashable(PyObject *key)
{
    if (PyList_CheckExact(key)) {
        Py_ssize_t n = PyList_GET_SIZE(key);
        PyObject *tuple = PyTuple_New(n);
        if (tuple == NULL) {
            return NULL;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = hashable(PyList_GET_ITEM(key, i));
            if (item == NULL) {
                Py_DECREF(tuple);
                return NULL;
            }
            PyTuple_SET_ITEM(tuple, i, item);
        }
        return tuple;
    }
    if ((PyObject *)Py_TYPE(key) == tag_type) {
        PyObject *number, *value, *inner, *out;
        number = PyObject_GetAttr(key, str_number);
        if (number == NULL) {
            return NULL;
        }
        value = PyObject_GetAttr(key, str_value);
        if (value == NULL) {
            Py_DECREF(number);
            return NULL;
        }
        inner = hashable(value);
        Py_DECREF(value);
        if (inner == NULL) {
            Py_DECREF(number);
            return NULL;
        }
        out = PyObject_CallFunctionObjArgs(tag_type, number, inner, NULL);
        Py_DECREF(number);
        Py_DECREF(inner);
        return out;
    }
    if (PyLong_CheckExact(key) || PyUnicode_CheckExact(key) || PyBytes_CheckExact(key)) {
        Py_INCREF(key);
        return key;
    }
    return refuse("map key type not allowed");
}

static PyObject *
map(Decoder *d, uint64_t n, int indefinite, long long depth)
{
    PyObject *dict, *key = NULL, *value = NULL;
    Py_ssize_t size;

    if (indefinite) {
        if (!d->allow_indefinite) {
            return refuse("indefinite-length item not allowed");
        }
    }
    else {
        /* 2n items: n <= remaining / 2 keeps 2n exact and within the bytes that remain. */
        if (n > remaining(d) / 2) {
            return refuse("count larger than the bytes that remain");
        }
        if (count(d, 2 * n) < 0) {
            return NULL;
        }
    }
    dict = PyDict_New();
    if (dict == NULL) {
        return NULL;
    }
    for (uint64_t i = 0; indefinite || i < n; i++) {
        key = decode(d, depth + 1);
        if (key == NULL) {
            goto error;
        }
        if (key == break_mark) {
            Py_CLEAR(key);
            if (indefinite) {
                return dict;
            }
            refuse("break code inside definite map");
            goto error;
        }
        if (indefinite && count(d, 2) < 0) {
            goto error;
        }
        if (!PyLong_CheckExact(key) && !PyUnicode_CheckExact(key) && !PyBytes_CheckExact(key)) {
            PyObject *h = hashable(key);
            Py_DECREF(key);
            key = h;
            if (key == NULL) {
                goto error;
            }
        }
        value = decode(d, depth + 1);
        if (value == NULL) {
            goto error;
        }
        if (value == break_mark) {
            refuse("map key without value");
            goto error;
        }
        /* One lookup: the key is new if and only if the map grew (comparing the stored value with
         * ours would not do: equal keys may carry the very same object, such as False or 1). */
        size = PyDict_GET_SIZE(dict);
        if (PyDict_SetDefault(dict, key, value) == NULL) {
            goto error;
        }
        if (PyDict_GET_SIZE(dict) == size) {
            refuse("duplicate map key");
            goto error;
        }
        Py_CLEAR(key);
        Py_CLEAR(value);
    }
    return dict;
error:
    Py_XDECREF(key);
    Py_XDECREF(value);
    Py_DECREF(dict);
    return NULL;
}

static PyObject *
decode(Decoder *d, long long depth)
{
    unsigned char initial;
    int major, info, r;
    uint64_t arg;

    if (depth > d->max_depth) {
        return refuse("nesting too deep");
    }
    if (d->pos >= d->len) {
        return refuse("truncated");
    }
    initial = d->data[d->pos++];
    major = initial >> 5;
    info = initial & 0x1f;
    if (major == 7) {
        return simple(d, info);
    }
    r = argument(d, info, &arg);
    if (r < 0) {
        return NULL;
    }
    switch (major) {
    case 0:
        if (r) {
            return refuse("indefinite unsigned integer");
        }
        return PyLong_FromUnsignedLongLong(arg);
    case 1:
        if (r) {
            return refuse("indefinite negative integer");
        }
        if (arg <= (uint64_t)INT64_MAX) {
            return PyLong_FromLongLong(-1 - (long long)arg);
        }
        else {
            /* -1 - arg == ~arg */
            PyObject *positive = PyLong_FromUnsignedLongLong(arg), *out;
            if (positive == NULL) {
                return NULL;
            }
            out = PyNumber_Invert(positive);
            Py_DECREF(positive);
            return out;
        }
    case 2:
    case 3:
        if (r) {
            return chunked(d, major);
        }
        if (arg > remaining(d)) {
            return refuse("truncated string");
        }
        {
            const unsigned char *p = d->data + d->pos;
            d->pos += arg;
            return text_or_bytes(major, p, arg);
        }
    case 4:
        return array(d, arg, r, depth);
    case 5:
        return map(d, arg, r, depth);
    default: { /* 6: tag */
        PyObject *value, *number, *out;
        if (r) {
            return refuse("indefinite tag");
        }
        value = decode(d, depth + 1);
        if (value == NULL) {
            return NULL;
        }
        if (value == break_mark) {
            Py_DECREF(value);
            return refuse("break code as tag content");
        }
        number = PyLong_FromUnsignedLongLong(arg);
        if (number == NULL) {
            Py_DECREF(value);
            return NULL;
        }
        out = PyObject_CallFunctionObjArgs(tag_type, number, value, NULL);
        Py_DECREF(number);
        Py_DECREF(value);
        return out;
    }
    }
}

/* A limit as a C integer clamped to [-1, high]; -2 if it is not an int (the reference decides). */
static long long
clamp_limit(PyObject *obj, long long high)
{
    int overflow = 0;
    long long v;

    if (!PyLong_Check(obj)) {
        return -2;
    }
    v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -2;
    }
    if (overflow > 0 || v > high) {
        return high;
    }
    if (overflow < 0 || v < -1) {
        return -1;
    }
    return v;
}

PyDoc_STRVAR(loads_doc,
"loads(data, max_depth, max_items, allow_indefinite, /)\n--\n\n"
"Decodes exactly one CBOR data item from ``data`` (bytes) under the limits.\n"
"Raises Invalid on any refusal; ism.formats.cbor.loads then asks the reference decoder.");

static PyObject *
native_loads(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Decoder d;
    PyObject *value;
    int allow;

    (void)module;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "loads() takes exactly 4 arguments");
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "loads() needs bytes");
        return NULL;
    }
    if (tag_type == NULL || undefined == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_cbor_native.configure() was not called");
        return NULL;
    }
    d.data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    d.len = (uint64_t)PyBytes_GET_SIZE(args[0]);
    d.pos = 0;
    d.items = 0;
    d.max_depth = clamp_limit(args[1], HARD_MAX_DEPTH);
    d.max_items = clamp_limit(args[2], ITEMS_CLAMP);
    if (d.max_depth == -2 || d.max_items == -2) {
        return refuse("limit is not an int");
    }
    allow = PyObject_IsTrue(args[3]);
    if (allow < 0) {
        PyErr_Clear();
        return refuse("allow_indefinite has no truth value");
    }
    d.allow_indefinite = allow;
    if (d.len == 0) {
        return refuse("empty input");
    }
    value = decode(&d, 0);
    if (value == NULL) {
        return NULL;
    }
    if (value == break_mark) {
        Py_DECREF(value);
        return refuse("input is a lone break code");
    }
    if (d.pos != d.len) {
        Py_DECREF(value);
        return refuse("trailing bytes");
    }
    return value;
}

PyDoc_STRVAR(configure_doc,
"configure(tag, undefined, /)\n--\n\n"
"Sets the Tag class and the UNDEFINED value decoded items use (ism.formats.cbor calls it once).");

static PyObject *
native_configure(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "configure() takes exactly 2 arguments");
        return NULL;
    }
    if (!PyType_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "configure() needs the Tag class");
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_XSETREF(tag_type, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(undefined, args[1]);
    Py_RETURN_NONE;
}

/* ---- the schema checker and builder ------------------------------------------------------------
 *
 * check(value, schema): whether an already decoded value conforms to a table of rules — types,
 * sizes, ranges, enumerations, patterns, presence of map keys, no unknown keys, map keys tied to
 * their values, unique values — built once by schema(tree) from the tuple tree
 * ism.formats.cbor_schema compiles (that module's pure-Python checker is the reference,
 * interpreting the same tree). It returns None, or the index of the rule the value breaks (the
 * first one in the traversal order both implementations share); it never explains a failure: the
 * caller re-runs its own checked decoder, which raises the error.
 *
 * build(value, schema): the same check, and in the same pass the objects the tree's records make
 * (instances of slotted classes, every slot set through its member descriptor, no __init__); None
 * if the value does not conform. What a node builds is stated in ism.formats.cbor_schema.
 *
 * Tree nodes (index = the rule's pre-order number):
 *   (index, 1 BYTES,  min, max, sizes, prefix)   exact bytes, min <= len <= max, len in sizes if
 *                                                any, starting with prefix
 *   (index, 2 TEXT,   min, max, one_of, pattern) exact str, min <= code points <= max, in one_of if
 *                                                a frozenset, pattern.fullmatch if a pattern
 *   (index, 3 INT,    ranges)                    exact int (not bool) within one of the (lo, hi)
 *   (index, 4 ARRAY,  min, max, item)            exact list, min <= len <= max, every item
 *   (index, 5 RECORD, fields, make)              exact dict, no key but the fields' keys; per field
 *                                                (key, required, nullable, rule): missing and
 *                                                required, or present (not None when nullable) and
 *                                                breaking rule; make: None or (cls, slots), a slot
 *                                                (descriptor, (0, field, default) | (1, constant) |
 *                                                (2, make))
 *   (index, 6 MAPOF,  min, max, key, value, key_is, unique)
 *                                                exact dict, min <= len <= max, every key and value;
 *                                                key_is/unique: -1, or the index of a required field
 *                                                of the value record that must equal the entry's key
 *                                                / must differ between entries
 *
 * Order: a node's own checks first (type, size, unknown keys), then its children in order (record
 * fields in schema order, list items and map entries in their order; a map entry's key before its
 * value, then its key_is, then its unique). Values are only read: borrowed items are held while
 * they are checked.
 *
 * A pattern's accepted strings are remembered (up to MEMO_MAX per rule, then forgotten at once):
 * fullmatch is a pure function of the string, and a fleet's tokens repeat the same names.
 */

enum { RULE_BYTES = 1, RULE_TEXT, RULE_INT, RULE_ARRAY, RULE_RECORD, RULE_MAPOF };
enum { SOURCE_GET = 0, SOURCE_CONST, SOURCE_MAKE };
#define SCHEMA_MAX_DEPTH 64
#define SCHEMA_MAX_FIELDS 64
#define MEMO_MAX 256
#define SCHEMA_CAPSULE "ism.formats._cbor_native.schema"
/* check_rule results besides a rule index: */
#define CHECK_OK (-1)
#define CHECK_ERROR (-2)

typedef struct Rule Rule;
typedef struct Make Make;

typedef struct {
    PyObject *lo, *hi;   /* inclusive bounds (Python ints) */
    long long clo, chi;  /* the same as C integers, when both fit */
    int fits;
} Range;

typedef struct {
    PyObject *key;
    int required;
    int nullable;
    Rule *rule;
} Field;

typedef struct {
    PyObject *descr;     /* the slot's member descriptor */
    int kind;            /* SOURCE_* */
    Py_ssize_t field;    /* GET: the record's field */
    PyObject *value;     /* GET: the default; CONST: the constant */
    Make *make;          /* MAKE: an object built from the same record */
} Slot;

struct Make {
    PyTypeObject *cls;
    Py_ssize_t nslots;
    Slot *slots;
};

struct Rule {
    Py_ssize_t index;
    int kind;
    Py_ssize_t min, max;
    Py_ssize_t nsizes;
    Py_ssize_t *sizes;
    PyObject *prefix;    /* BYTES: a non-empty bytes, or NULL */
    PyObject *one_of;    /* TEXT: a frozenset, or NULL */
    PyObject *fullmatch; /* TEXT: the pattern's bound fullmatch, or NULL */
    PyObject *memo;      /* TEXT: the strings fullmatch accepted (a set), with fullmatch */
    Py_ssize_t nranges;
    Range *ranges;
    Rule *item;          /* ARRAY: the items; MAPOF: the keys */
    Rule *value;         /* MAPOF: the values */
    Py_ssize_t key_is;   /* MAPOF: a field of the value record, or -1 */
    Py_ssize_t unique;   /* MAPOF: a field of the value record, or -1 */
    Py_ssize_t nfields;
    Field *fields;
    Make *make;          /* RECORD: what it builds, or NULL */
};

static void
make_free(Make *m)
{
    if (m == NULL) {
        return;
    }
    for (Py_ssize_t i = 0; i < m->nslots; i++) {
        Py_XDECREF(m->slots[i].descr);
        Py_XDECREF(m->slots[i].value);
        make_free(m->slots[i].make);
    }
    PyMem_Free(m->slots);
    Py_XDECREF((PyObject *)m->cls);
    PyMem_Free(m);
}

static void
rule_free(Rule *r)
{
    if (r == NULL) {
        return;
    }
    PyMem_Free(r->sizes);
    Py_XDECREF(r->prefix);
    Py_XDECREF(r->one_of);
    Py_XDECREF(r->fullmatch);
    Py_XDECREF(r->memo);
    for (Py_ssize_t i = 0; i < r->nranges; i++) {
        Py_XDECREF(r->ranges[i].lo);
        Py_XDECREF(r->ranges[i].hi);
    }
    PyMem_Free(r->ranges);
    rule_free(r->item);
    rule_free(r->value);
    for (Py_ssize_t i = 0; i < r->nfields; i++) {
        Py_XDECREF(r->fields[i].key);
        rule_free(r->fields[i].rule);
    }
    PyMem_Free(r->fields);
    make_free(r->make);
    PyMem_Free(r);
}

static int
bad_tree(const char *why)
{
    PyErr_Format(PyExc_ValueError, "malformed schema tree: %s", why);
    return -1;
}

/* A non-negative Py_ssize_t from an exact int; -1 with an exception otherwise. */
static Py_ssize_t
tree_size(PyObject *obj)
{
    Py_ssize_t v;

    if (!PyLong_CheckExact(obj)) {
        bad_tree("a size is not an int");
        return -1;
    }
    v = PyLong_AsSsize_t(obj);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (v < 0) {
        bad_tree("a size is negative");
        return -1;
    }
    return v;
}

static int
tree_bool(PyObject *obj)
{
    if (obj == Py_True) {
        return 1;
    }
    if (obj == Py_False) {
        return 0;
    }
    return bad_tree("a flag is not a bool");
}

static Rule *compile_rule(PyObject *node, int depth);

static int
compile_bounds(Rule *r, PyObject *node, Py_ssize_t at)
{
    r->min = tree_size(PyTuple_GET_ITEM(node, at));
    if (r->min < 0) {
        return -1;
    }
    r->max = tree_size(PyTuple_GET_ITEM(node, at + 1));
    if (r->max < 0) {
        return -1;
    }
    return 0;
}

static int
compile_ranges(Rule *r, PyObject *ranges)
{
    Py_ssize_t n;

    if (!PyTuple_CheckExact(ranges)) {
        return bad_tree("INT ranges are not a tuple");
    }
    n = PyTuple_GET_SIZE(ranges);
    r->ranges = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Range));
    if (r->ranges == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(ranges, i);
        Range *range = &r->ranges[i];
        int lo_over = 0, hi_over = 0;

        if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(pair, 0))
            || !PyLong_CheckExact(PyTuple_GET_ITEM(pair, 1))) {
            return bad_tree("an INT range is not a pair of ints");
        }
        range->lo = Py_NewRef(PyTuple_GET_ITEM(pair, 0));
        range->hi = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
        r->nranges = i + 1;
        range->clo = PyLong_AsLongLongAndOverflow(range->lo, &lo_over);
        range->chi = PyLong_AsLongLongAndOverflow(range->hi, &hi_over);
        if (PyErr_Occurred()) {
            return -1;
        }
        range->fits = lo_over == 0 && hi_over == 0;
    }
    return 0;
}

static int
compile_fields(Rule *r, PyObject *fields, int depth)
{
    Py_ssize_t n;

    if (!PyTuple_CheckExact(fields)) {
        return bad_tree("RECORD fields are not a tuple");
    }
    n = PyTuple_GET_SIZE(fields);
    if (n > SCHEMA_MAX_FIELDS) {
        return bad_tree("a RECORD has too many fields");
    }
    r->fields = PyMem_Calloc(n ? (size_t)n : 1, sizeof(Field));
    if (r->fields == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *entry = PyTuple_GET_ITEM(fields, i);
        Field *f = &r->fields[i];

        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 4) {
            return bad_tree("a RECORD field is not a 4-tuple");
        }
        if (PyObject_Hash(PyTuple_GET_ITEM(entry, 0)) == -1) {
            return -1;
        }
        f->key = Py_NewRef(PyTuple_GET_ITEM(entry, 0));
        r->nfields = i + 1;
        f->required = tree_bool(PyTuple_GET_ITEM(entry, 1));
        f->nullable = tree_bool(PyTuple_GET_ITEM(entry, 2));
        if (f->required < 0 || f->nullable < 0) {
            return -1;
        }
        f->rule = compile_rule(PyTuple_GET_ITEM(entry, 3), depth + 1);
        if (f->rule == NULL) {
            return -1;
        }
    }
    return 0;
}

/* (cls, ((descriptor, source), ...)) for a record of nfields fields. */
static Make *
compile_make(PyObject *node, Py_ssize_t nfields, int depth)
{
    PyObject *cls, *slots;
    Make *m;

    if (depth > SCHEMA_MAX_DEPTH) {
        bad_tree("nested too deep");
        return NULL;
    }
    if (!PyTuple_CheckExact(node) || PyTuple_GET_SIZE(node) != 2 || !PyType_Check(PyTuple_GET_ITEM(node, 0))
        || !PyTuple_CheckExact(PyTuple_GET_ITEM(node, 1))) {
        bad_tree("a make is not (class, slots)");
        return NULL;
    }
    cls = PyTuple_GET_ITEM(node, 0);
    slots = PyTuple_GET_ITEM(node, 1);
    if (((PyTypeObject *)cls)->tp_alloc == NULL) {
        bad_tree("a make's class cannot be allocated");
        return NULL;
    }
    m = PyMem_Calloc(1, sizeof(Make));
    if (m == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    m->cls = (PyTypeObject *)Py_NewRef(cls);
    m->slots = PyMem_Calloc(PyTuple_GET_SIZE(slots) ? (size_t)PyTuple_GET_SIZE(slots) : 1, sizeof(Slot));
    if (m->slots == NULL) {
        PyErr_NoMemory();
        goto error;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(slots); i++) {
        PyObject *entry = PyTuple_GET_ITEM(slots, i), *descr, *source;
        Slot *s = &m->slots[i];
        long kind;

        if (!PyTuple_CheckExact(entry) || PyTuple_GET_SIZE(entry) != 2) {
            bad_tree("a slot is not (descriptor, source)");
            goto error;
        }
        descr = PyTuple_GET_ITEM(entry, 0);
        source = PyTuple_GET_ITEM(entry, 1);
        /* A member descriptor of this class (or a base): anything else could run code when set. */
        if (!Py_IS_TYPE(descr, &PyMemberDescr_Type)
            || !PyType_IsSubtype(m->cls, PyDescr_TYPE((PyDescrObject *)descr))) {
            bad_tree("a slot is not a member descriptor of the class");
            goto error;
        }
        if (!PyTuple_CheckExact(source) || PyTuple_GET_SIZE(source) < 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(source, 0))) {
            bad_tree("a slot source is not a tuple (kind, ...)");
            goto error;
        }
        s->descr = Py_NewRef(descr);
        m->nslots = i + 1;
        kind = PyLong_AsLong(PyTuple_GET_ITEM(source, 0));
        if (kind == SOURCE_GET && PyTuple_GET_SIZE(source) == 3) {
            s->field = tree_size(PyTuple_GET_ITEM(source, 1));
            if (s->field < 0) {
                goto error;
            }
            if (s->field >= nfields) {
                bad_tree("a slot names a field the record does not have");
                goto error;
            }
            s->value = Py_NewRef(PyTuple_GET_ITEM(source, 2));
        }
        else if (kind == SOURCE_CONST && PyTuple_GET_SIZE(source) == 2) {
            s->value = Py_NewRef(PyTuple_GET_ITEM(source, 1));
        }
        else if (kind == SOURCE_MAKE && PyTuple_GET_SIZE(source) == 2) {
            s->make = compile_make(PyTuple_GET_ITEM(source, 1), nfields, depth + 1);
            if (s->make == NULL) {
                goto error;
            }
        }
        else {
            PyErr_Clear();
            bad_tree("unknown slot source");
            goto error;
        }
        s->kind = (int)kind;
    }
    return m;
error:
    make_free(m);
    return NULL;
}

/* -1 (none), or the index of a required, non-nullable field of the value record. */
static int
compile_value_field(PyObject *obj, const Rule *value, Py_ssize_t *out)
{
    Py_ssize_t i;

    if (!PyLong_CheckExact(obj)) {
        return bad_tree("a MAPOF field index is not an int");
    }
    i = PyLong_AsSsize_t(obj);
    if (i == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (i != -1 && (value->kind != RULE_RECORD || i < 0 || i >= value->nfields || !value->fields[i].required
                    || value->fields[i].nullable)) {
        return bad_tree("a MAPOF field index names no required field of its value record");
    }
    *out = i;
    return 0;
}

static Rule *
compile_rule(PyObject *node, int depth)
{
    static const Py_ssize_t sizes_of[] = {0, 6, 6, 3, 5, 4, 8};
    Rule *r;
    Py_ssize_t index;
    long kind;

    if (depth > SCHEMA_MAX_DEPTH) {
        bad_tree("nested too deep");
        return NULL;
    }
    if (!PyTuple_CheckExact(node) || PyTuple_GET_SIZE(node) < 2 || !PyLong_CheckExact(PyTuple_GET_ITEM(node, 1))) {
        bad_tree("a node is not a tuple (index, kind, ...)");
        return NULL;
    }
    index = tree_size(PyTuple_GET_ITEM(node, 0));
    if (index < 0) {
        return NULL;
    }
    kind = PyLong_AsLong(PyTuple_GET_ITEM(node, 1));
    if (kind < RULE_BYTES || kind > RULE_MAPOF) {
        PyErr_Clear();
        bad_tree("unknown kind");
        return NULL;
    }
    if (PyTuple_GET_SIZE(node) != sizes_of[kind]) {
        bad_tree("a node has the wrong length for its kind");
        return NULL;
    }
    r = PyMem_Calloc(1, sizeof(Rule));
    if (r == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    r->index = index;
    r->kind = (int)kind;
    r->key_is = r->unique = -1;
    switch (r->kind) {
    case RULE_BYTES: {
        PyObject *sizes = PyTuple_GET_ITEM(node, 4), *prefix = PyTuple_GET_ITEM(node, 5);
        if (compile_bounds(r, node, 2) < 0) {
            goto error;
        }
        if (!PyTuple_CheckExact(sizes)) {
            bad_tree("BYTES sizes are not a tuple");
            goto error;
        }
        if (!PyBytes_CheckExact(prefix)) {
            bad_tree("BYTES prefix is not bytes");
            goto error;
        }
        if (PyBytes_GET_SIZE(prefix) > 0) {
            r->prefix = Py_NewRef(prefix);
        }
        r->sizes = PyMem_Calloc(PyTuple_GET_SIZE(sizes) ? (size_t)PyTuple_GET_SIZE(sizes) : 1, sizeof(Py_ssize_t));
        if (r->sizes == NULL) {
            PyErr_NoMemory();
            goto error;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(sizes); i++) {
            r->sizes[i] = tree_size(PyTuple_GET_ITEM(sizes, i));
            if (r->sizes[i] < 0) {
                goto error;
            }
            r->nsizes = i + 1;
        }
        break;
    }
    case RULE_TEXT: {
        PyObject *one_of = PyTuple_GET_ITEM(node, 4), *pattern = PyTuple_GET_ITEM(node, 5);
        if (compile_bounds(r, node, 2) < 0) {
            goto error;
        }
        if (one_of != Py_None) {
            if (!PyFrozenSet_CheckExact(one_of)) {
                bad_tree("TEXT one_of is not a frozenset");
                goto error;
            }
            r->one_of = Py_NewRef(one_of);
        }
        if (pattern != Py_None) {
            r->fullmatch = PyObject_GetAttrString(pattern, "fullmatch");
            if (r->fullmatch == NULL || !PyCallable_Check(r->fullmatch)) {
                PyErr_Clear();
                bad_tree("TEXT pattern has no fullmatch");
                goto error;
            }
            r->memo = PySet_New(NULL);
            if (r->memo == NULL) {
                goto error;
            }
        }
        break;
    }
    case RULE_INT:
        if (compile_ranges(r, PyTuple_GET_ITEM(node, 2)) < 0) {
            goto error;
        }
        break;
    case RULE_ARRAY:
        if (compile_bounds(r, node, 2) < 0) {
            goto error;
        }
        r->item = compile_rule(PyTuple_GET_ITEM(node, 4), depth + 1);
        if (r->item == NULL) {
            goto error;
        }
        break;
    case RULE_RECORD:
        if (compile_fields(r, PyTuple_GET_ITEM(node, 2), depth) < 0) {
            goto error;
        }
        if (PyTuple_GET_ITEM(node, 3) != Py_None) {
            r->make = compile_make(PyTuple_GET_ITEM(node, 3), r->nfields, depth + 1);
            if (r->make == NULL) {
                goto error;
            }
        }
        break;
    default: /* RULE_MAPOF */
        if (compile_bounds(r, node, 2) < 0) {
            goto error;
        }
        r->item = compile_rule(PyTuple_GET_ITEM(node, 4), depth + 1);
        if (r->item == NULL) {
            goto error;
        }
        r->value = compile_rule(PyTuple_GET_ITEM(node, 5), depth + 1);
        if (r->value == NULL) {
            goto error;
        }
        if (compile_value_field(PyTuple_GET_ITEM(node, 6), r->value, &r->key_is) < 0
            || compile_value_field(PyTuple_GET_ITEM(node, 7), r->value, &r->unique) < 0) {
            goto error;
        }
        break;
    }
    return r;
error:
    rule_free(r);
    return NULL;
}

static Py_ssize_t walk(const Rule *r, PyObject *v, PyObject **out);

/* An exact int within one of the rule's ranges: 1 yes, 0 no, -1 error. */
static int
int_in_ranges(const Rule *r, PyObject *v)
{
    int overflow = 0;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);

    if (x == -1 && PyErr_Occurred()) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < r->nranges; i++) {
        const Range *range = &r->ranges[i];
        int ge, le;

        if (overflow == 0 && range->fits) {
            if (x >= range->clo && x <= range->chi) {
                return 1;
            }
            continue;
        }
        ge = PyObject_RichCompareBool(v, range->lo, Py_GE);
        if (ge < 0) {
            return -1;
        }
        le = PyObject_RichCompareBool(v, range->hi, Py_LE);
        if (le < 0) {
            return -1;
        }
        if (ge && le) {
            return 1;
        }
    }
    return 0;
}

/* A str the rule's pattern fully matches: 1 yes, 0 no, -1 error. */
static int
text_matches(const Rule *r, PyObject *v)
{
    PyObject *match;
    int known = PySet_Contains(r->memo, v);

    if (known != 0) {
        return known;
    }
    match = PyObject_CallOneArg(r->fullmatch, v);
    if (match == NULL) {
        return -1;
    }
    if (match == Py_None) {
        Py_DECREF(match);
        return 0;
    }
    Py_DECREF(match);
    if (PySet_GET_SIZE(r->memo) >= MEMO_MAX && PySet_Clear(r->memo) < 0) {
        return -1;
    }
    return PySet_Add(r->memo, v) < 0 ? -1 : 1;
}

/* A new object of the make's class with every slot set from built[] (NULL: the field is absent). */
static PyObject *
make_object(const Make *m, PyObject *const *built)
{
    PyObject *obj = m->cls->tp_alloc(m->cls, 0);

    if (obj == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < m->nslots; i++) {
        const Slot *s = &m->slots[i];
        PyObject *value, *made = NULL;
        int failed;

        if (s->kind == SOURCE_GET) {
            value = built[s->field] != NULL ? built[s->field] : s->value;
        }
        else if (s->kind == SOURCE_CONST) {
            value = s->value;
        }
        else {
            made = value = make_object(s->make, built);
            if (made == NULL) {
                Py_DECREF(obj);
                return NULL;
            }
        }
        failed = Py_TYPE(s->descr)->tp_descr_set(s->descr, obj, value) < 0;
        Py_XDECREF(made);
        if (failed) {
            Py_DECREF(obj);
            return NULL;
        }
    }
    return obj;
}

static Py_ssize_t
walk_record(const Rule *r, PyObject *v, PyObject **out)
{
    PyObject *found[SCHEMA_MAX_FIELDS];
    PyObject *built[SCHEMA_MAX_FIELDS] = {NULL};
    PyObject **into = out != NULL && r->make != NULL ? built : NULL;
    Py_ssize_t present = 0, result = CHECK_OK, i;

    if (!PyDict_CheckExact(v)) {
        return r->index;
    }
    for (i = 0; i < r->nfields; i++) {
        found[i] = PyDict_GetItemWithError(v, r->fields[i].key);
        if (found[i] == NULL) {
            if (PyErr_Occurred()) {
                result = CHECK_ERROR;
                break;
            }
            continue;
        }
        Py_INCREF(found[i]);
        present++;
    }
    if (result == CHECK_OK && present != PyDict_GET_SIZE(v)) {
        result = r->index; /* a key that is no field's */
    }
    for (Py_ssize_t j = 0; result == CHECK_OK && j < r->nfields; j++) {
        const Field *f = &r->fields[j];
        if (found[j] == NULL) {
            if (f->required) {
                result = f->rule->index;
            }
        }
        else if (!(f->nullable && found[j] == Py_None)) {
            result = walk(f->rule, found[j], into != NULL ? &into[j] : NULL);
        }
    }
    if (result == CHECK_OK && out != NULL) {
        *out = into != NULL ? make_object(r->make, built) : Py_NewRef(v);
        if (*out == NULL) {
            result = CHECK_ERROR;
        }
    }
    for (Py_ssize_t j = 0; j < i; j++) {
        Py_XDECREF(found[j]);
    }
    for (Py_ssize_t j = 0; j < r->nfields; j++) {
        Py_XDECREF(built[j]);
    }
    return result;
}

/* One entry's key_is and unique (after its key and value conform): CHECK_OK, the map's index, or an error. */
static Py_ssize_t
entry_ties(const Rule *r, PyObject *key, PyObject *value, PyObject *seen)
{
    if (r->key_is >= 0) {
        PyObject *held = PyDict_GetItemWithError(value, r->value->fields[r->key_is].key);
        int equal;
        if (held == NULL) {
            return PyErr_Occurred() ? CHECK_ERROR : r->index;
        }
        Py_INCREF(held);
        equal = PyObject_RichCompareBool(held, key, Py_EQ);
        Py_DECREF(held);
        if (equal <= 0) {
            return equal < 0 ? CHECK_ERROR : r->index;
        }
    }
    if (r->unique >= 0) {
        PyObject *held = PyDict_GetItemWithError(value, r->value->fields[r->unique].key);
        int known;
        if (held == NULL) {
            return PyErr_Occurred() ? CHECK_ERROR : r->index;
        }
        known = PySet_Contains(seen, held);
        if (known != 0) {
            return known < 0 ? CHECK_ERROR : r->index;
        }
        if (PySet_Add(seen, held) < 0) {
            return CHECK_ERROR;
        }
    }
    return CHECK_OK;
}

/* Puts a built item at index at of a tuple of n (or drops it if the container grew meanwhile). */
static void
put_built(PyObject *tuple, Py_ssize_t at, Py_ssize_t n, PyObject *built)
{
    if (at < n) {
        PyTuple_SET_ITEM(tuple, at, built);
    }
    else {
        Py_DECREF(built);
    }
}

/* Hands a built tuple to *out if the walk succeeded and filled it (complete), else drops it. */
static Py_ssize_t
finish_tuple(PyObject *tuple, Py_ssize_t result, int complete, PyObject **out)
{
    if (tuple == NULL) {
        return result;
    }
    if (result == CHECK_OK && !complete) {
        PyErr_SetString(PyExc_RuntimeError, "a container changed while it was built");
        result = CHECK_ERROR;
    }
    if (result == CHECK_OK) {
        *out = tuple;
    }
    else {
        Py_DECREF(tuple);
    }
    return result;
}

static Py_ssize_t
walk_mapof(const Rule *r, PyObject *v, PyObject **out)
{
    Py_ssize_t pos = 0, at = 0, n, result = CHECK_OK;
    PyObject *key, *value, *seen = NULL, *tuple = NULL;

    if (!PyDict_CheckExact(v)) {
        return r->index;
    }
    n = PyDict_GET_SIZE(v);
    if (n < r->min || n > r->max) {
        return r->index;
    }
    if (r->unique >= 0 && (seen = PySet_New(NULL)) == NULL) {
        return CHECK_ERROR;
    }
    if (out != NULL && (tuple = PyTuple_New(n)) == NULL) {
        Py_XDECREF(seen);
        return CHECK_ERROR;
    }
    while (result == CHECK_OK && PyDict_Next(v, &pos, &key, &value)) {
        PyObject *built = NULL;
        Py_INCREF(key);
        Py_INCREF(value);
        result = walk(r->item, key, NULL);
        if (result == CHECK_OK) {
            result = walk(r->value, value, tuple != NULL ? &built : NULL);
        }
        if (result == CHECK_OK) {
            result = entry_ties(r, key, value, seen);
        }
        Py_DECREF(key);
        Py_DECREF(value);
        if (built != NULL) {
            put_built(tuple, at++, n, built);
        }
    }
    Py_XDECREF(seen);
    return finish_tuple(tuple, result, at == n, out);
}

static Py_ssize_t
walk_array(const Rule *r, PyObject *v, PyObject **out)
{
    Py_ssize_t n, result = CHECK_OK;
    PyObject *tuple = NULL;

    if (!PyList_CheckExact(v)) {
        return r->index;
    }
    n = PyList_GET_SIZE(v);
    if (n < r->min || n > r->max) {
        return r->index;
    }
    if (out != NULL && (tuple = PyTuple_New(n)) == NULL) {
        return CHECK_ERROR;
    }
    for (Py_ssize_t i = 0; result == CHECK_OK && i < PyList_GET_SIZE(v); i++) {
        PyObject *item = Py_NewRef(PyList_GET_ITEM(v, i)), *built = NULL;
        result = walk(r->item, item, tuple != NULL ? &built : NULL);
        Py_DECREF(item);
        if (built != NULL) {
            put_built(tuple, i, n, built);
        }
    }
    return finish_tuple(tuple, result, PyList_GET_SIZE(v) == n, out);
}

/* Checks v against r: CHECK_OK, the index of the broken rule, or CHECK_ERROR (an exception is set).
 * With out, on CHECK_OK *out is a new reference to what v builds. */
static Py_ssize_t
walk(const Rule *r, PyObject *v, PyObject **out)
{
    Py_ssize_t n, result = CHECK_OK;

    switch (r->kind) {
    case RULE_BYTES:
        if (!PyBytes_CheckExact(v)) {
            return r->index;
        }
        n = PyBytes_GET_SIZE(v);
        if (n < r->min || n > r->max) {
            return r->index;
        }
        if (r->nsizes) {
            result = r->index;
            for (Py_ssize_t i = 0; i < r->nsizes; i++) {
                if (r->sizes[i] == n) {
                    result = CHECK_OK;
                    break;
                }
            }
        }
        if (result == CHECK_OK && r->prefix != NULL
            && (n < PyBytes_GET_SIZE(r->prefix)
                || memcmp(PyBytes_AS_STRING(v), PyBytes_AS_STRING(r->prefix), (size_t)PyBytes_GET_SIZE(r->prefix)) != 0)) {
            result = r->index;
        }
        break;
    case RULE_TEXT:
        if (!PyUnicode_CheckExact(v)) {
            return r->index;
        }
        n = PyUnicode_GET_LENGTH(v);
        if (n < r->min || n > r->max) {
            return r->index;
        }
        if (r->one_of != NULL) {
            int in = PySet_Contains(r->one_of, v);
            if (in <= 0) {
                return in < 0 ? CHECK_ERROR : r->index;
            }
        }
        if (r->fullmatch != NULL) {
            int in = text_matches(r, v);
            if (in <= 0) {
                return in < 0 ? CHECK_ERROR : r->index;
            }
        }
        break;
    case RULE_INT: {
        int in;
        if (!PyLong_CheckExact(v)) {
            return r->index;
        }
        in = int_in_ranges(r, v);
        if (in <= 0) {
            return in < 0 ? CHECK_ERROR : r->index;
        }
        break;
    }
    case RULE_ARRAY:
        return walk_array(r, v, out);
    case RULE_RECORD:
        return walk_record(r, v, out);
    default: /* RULE_MAPOF */
        return walk_mapof(r, v, out);
    }
    if (result == CHECK_OK && out != NULL) {
        *out = Py_NewRef(v);
    }
    return result;
}

static void
schema_destroy(PyObject *capsule)
{
    rule_free(PyCapsule_GetPointer(capsule, SCHEMA_CAPSULE));
}

PyDoc_STRVAR(schema_doc,
"schema(tree, /)\n--\n\n"
"Compiles a rule tree of ism.formats.cbor_schema into an opaque schema for check() and build().");

static PyObject *
native_schema(PyObject *module, PyObject *tree)
{
    PyObject *capsule;
    Rule *root;

    (void)module;
    root = compile_rule(tree, 0);
    if (root == NULL) {
        return NULL;
    }
    capsule = PyCapsule_New(root, SCHEMA_CAPSULE, schema_destroy);
    if (capsule == NULL) {
        rule_free(root);
    }
    return capsule;
}

static const Rule *
schema_args(const char *name, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly 2 arguments", name);
        return NULL;
    }
    return PyCapsule_GetPointer(args[1], SCHEMA_CAPSULE);
}

PyDoc_STRVAR(check_doc,
"check(value, schema, /)\n--\n\n"
"None if the decoded value conforms to the schema, else the index of the rule it breaks.");

static PyObject *
native_check(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const Rule *root = schema_args("check", args, nargs);
    Py_ssize_t result;

    (void)module;
    if (root == NULL) {
        return NULL;
    }
    result = walk(root, args[0], NULL);
    if (result == CHECK_ERROR) {
        return NULL;
    }
    if (result == CHECK_OK) {
        Py_RETURN_NONE;
    }
    return PyLong_FromSsize_t(result);
}

PyDoc_STRVAR(build_doc,
"build(value, schema, /)\n--\n\n"
"The object the schema's root record makes from the decoded value, or None if it does not conform.");

static PyObject *
native_build(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    const Rule *root = schema_args("build", args, nargs);
    PyObject *out = NULL;
    Py_ssize_t result;

    (void)module;
    if (root == NULL) {
        return NULL;
    }
    if (root->kind != RULE_RECORD || root->make == NULL) {
        PyErr_SetString(PyExc_ValueError, "only a schema whose root is a record with a Make builds");
        return NULL;
    }
    result = walk(root, args[0], &out);
    if (result == CHECK_ERROR) {
        return NULL;
    }
    if (result == CHECK_OK) {
        return out;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"loads", (PyCFunction)(void (*)(void))native_loads, METH_FASTCALL, loads_doc},
    {"configure", (PyCFunction)(void (*)(void))native_configure, METH_FASTCALL, configure_doc},
    {"schema", native_schema, METH_O, schema_doc},
    {"check", (PyCFunction)(void (*)(void))native_check, METH_FASTCALL, check_doc},
    {"build", (PyCFunction)(void (*)(void))native_build, METH_FASTCALL, build_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "ism.formats._cbor_native",
    "The strict CBOR decoder of ism.formats.cbor in C (the pure-Python decoder is the reference).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__cbor_native(void)
{
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL) {
        return NULL;
    }
    if (Invalid == NULL) {
        Invalid = PyErr_NewExceptionWithDoc(
            "ism.formats._cbor_native.Invalid",
            "The native decoder refused the input: the reference decoder names the rule.", NULL, NULL);
        break_mark = PyObject_CallNoArgs((PyObject *)&PyBaseObject_Type);
        str_number = PyUnicode_InternFromString("number");
        str_value = PyUnicode_InternFromString("value");
        if (Invalid == NULL || break_mark == NULL || str_number == NULL || str_value == NULL) {
            Py_DECREF(m);
            return NULL;
        }
    }
    if (PyModule_AddIntConstant(m, "HARD_MAX_DEPTH", HARD_MAX_DEPTH) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(Invalid);
    if (PyModule_AddObject(m, "Invalid", Invalid) < 0) {
        Py_DECREF(Invalid);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
