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

static PyMethodDef methods[] = {
    {"loads", (PyCFunction)(void (*)(void))native_loads, METH_FASTCALL, loads_doc},
    {"configure", (PyCFunction)(void (*)(void))native_configure, METH_FASTCALL, configure_doc},
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
