/*
 * dmp._states: dmp/state_codec.py's format 1 of a cookie state, in C, byte for byte.
 *
 * encode(local, history, members) -> bytes, or None when the state holds something format
 * 1 does not carry (the Python then stores that state as JSON); decode(bytes) -> (local,
 * history, members), ValueError when the bytes are not a format 1 state. With 1,000
 * segments, orjson spent ~8 us a state writing each time as decimal text, a fifth of a
 * batch's commit (docs/decisions/0019). Doubles are copied as they are: little-endian only.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if PY_BIG_ENDIAN
#error "format 1 stores doubles little-endian: this build assumes a little-endian machine"
#endif

#define FORMAT_1 0x01

typedef struct {
    char *data;
    Py_ssize_t len, cap;
} Buf;

static int grow(Buf *b, Py_ssize_t need) {
    if (b->len + need <= b->cap) return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + need) cap *= 2;
    char *data = PyMem_Realloc(b->data, cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static int put(Buf *b, const void *src, Py_ssize_t n) {
    if (grow(b, n) < 0) return -1;
    memcpy(b->data + b->len, src, n);
    b->len += n;
    return 0;
}

static int put_byte(Buf *b, char c) { return put(b, &c, 1); }

static int put_uvarint(Buf *b, uint64_t v) {
    char tmp[10];
    int n = 0;
    while (v >= 0x80) {
        tmp[n++] = (char)((v & 0x7F) | 0x80);
        v >>= 7;
    }
    tmp[n++] = (char)v;
    return put(b, tmp, n);
}

enum { OK = 0, FAIL = -1, NO = -2 }; /* NO: not encodable in format 1 */

static int hex_value(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

/* 2n lowercase hex digits (a trait id): n bytes, flagged in the length's low bit. */
static int put_hex(Buf *b, PyObject *text) {
    Py_ssize_t n = PyUnicode_GET_LENGTH(text);
    if (n == 0 || n % 2 || PyUnicode_KIND(text) != PyUnicode_1BYTE_KIND) return NO;
    const Py_UCS1 *s = PyUnicode_1BYTE_DATA(text);
    for (Py_ssize_t i = 0; i < n; i++)
        if (hex_value(s[i]) < 0) return NO;
    if (put_uvarint(b, (uint64_t)(n / 2) << 1 | 1) < 0 || grow(b, n / 2) < 0) return FAIL;
    for (Py_ssize_t i = 0; i < n; i += 2)
        b->data[b->len++] = (char)(hex_value(s[i]) << 4 | hex_value(s[i + 1]));
    return OK;
}

static int put_text(Buf *b, PyObject *text) {
    if (!PyUnicode_CheckExact(text)) return NO;
    if (PyUnicode_READY(text) < 0) return FAIL; /* a legacy str: kind and length first */
    int r = put_hex(b, text);
    if (r != NO) return r;
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(text, &size);
    if (utf8 == NULL) {
        PyErr_Clear(); /* not encodable as UTF-8 (lone surrogates): JSON says so */
        return NO;
    }
    if (put_uvarint(b, (uint64_t)size << 1) < 0) return FAIL;
    return put(b, utf8, size);
}

static int put_number(Buf *b, PyObject *v) {
    if (PyFloat_CheckExact(v)) {
        double d = PyFloat_AS_DOUBLE(v);
        if (put_byte(b, 'd') < 0) return FAIL;
        return put(b, &d, 8);
    }
    if (PyLong_CheckExact(v)) {
        int overflow;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow) return NO;
        if (x == -1 && PyErr_Occurred()) return FAIL;
        int64_t i = (int64_t)x;
        if (put_byte(b, 'i') < 0) return FAIL;
        return put(b, &i, 8);
    }
    return NO;
}

static int all_floats(PyObject *list) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyFloat_CheckExact(PyList_GET_ITEM(list, i))) return 0;
    return 1;
}

static int all_float_pairs(PyObject *list) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(list, i);
        if (!PyList_CheckExact(e) || PyList_GET_SIZE(e) != 2 || !all_floats(e)) return 0;
    }
    return 1;
}

static int put_entries(Buf *b, PyObject *list) {
    if (!PyList_CheckExact(list)) return NO;
    Py_ssize_t n = PyList_GET_SIZE(list);
    if (all_floats(list)) {
        if (put_byte(b, 'D') < 0 || put_uvarint(b, (uint64_t)n) < 0 || grow(b, 8 * n) < 0)
            return FAIL;
        for (Py_ssize_t i = 0; i < n; i++) {
            double d = PyFloat_AS_DOUBLE(PyList_GET_ITEM(list, i));
            memcpy(b->data + b->len, &d, 8);
            b->len += 8;
        }
        return OK;
    }
    if (all_float_pairs(list)) {
        if (put_byte(b, 'P') < 0 || put_uvarint(b, (uint64_t)n) < 0 || grow(b, 16 * n) < 0)
            return FAIL;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *e = PyList_GET_ITEM(list, i);
            double pair[2] = {PyFloat_AS_DOUBLE(PyList_GET_ITEM(e, 0)),
                              PyFloat_AS_DOUBLE(PyList_GET_ITEM(e, 1))};
            memcpy(b->data + b->len, pair, 16);
            b->len += 16;
        }
        return OK;
    }
    if (put_byte(b, 'G') < 0 || put_uvarint(b, (uint64_t)n) < 0) return FAIL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *e = PyList_GET_ITEM(list, i);
        int r;
        if (PyList_CheckExact(e)) {
            Py_ssize_t m = PyList_GET_SIZE(e);
            if (put_byte(b, 'l') < 0 || put_uvarint(b, (uint64_t)m) < 0) return FAIL;
            for (Py_ssize_t j = 0; j < m; j++)
                if ((r = put_number(b, PyList_GET_ITEM(e, j))) != OK) return r;
        } else if ((r = put_number(b, e)) != OK) {
            return r;
        }
    }
    return OK;
}

static int encode_into(Buf *b, PyObject *local, PyObject *history, PyObject *members) {
    if (!PyLong_CheckExact(local) || !PyDict_CheckExact(history) || !PyList_CheckExact(members))
        return NO;
    int overflow;
    long long loc = PyLong_AsLongLongAndOverflow(local, &overflow);
    if (overflow || loc < 0) return NO;
    if (loc == -1 && PyErr_Occurred()) return FAIL;
    int r;
    if (put_byte(b, FORMAT_1) < 0 || put_uvarint(b, (uint64_t)loc) < 0) return FAIL;
    Py_ssize_t nm = PyList_GET_SIZE(members);
    if (put_uvarint(b, (uint64_t)nm) < 0) return FAIL;
    for (Py_ssize_t i = 0; i < nm; i++)
        if ((r = put_text(b, PyList_GET_ITEM(members, i))) != OK) return r;
    if (put_uvarint(b, (uint64_t)PyDict_GET_SIZE(history)) < 0) return FAIL;
    Py_ssize_t pos = 0;
    PyObject *key, *value;
    while (PyDict_Next(history, &pos, &key, &value)) {
        if ((r = put_text(b, key)) != OK) return r;
        if ((r = put_entries(b, value)) != OK) return r;
    }
    return OK;
}

static PyObject *states_encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "encode(local, history, members)");
        return NULL;
    }
    Buf b = {NULL, 0, 0};
    int r = encode_into(&b, args[0], args[1], args[2]);
    PyObject *out = NULL;
    if (r == OK) {
        out = PyBytes_FromStringAndSize(b.data, b.len);
    } else if (r == NO) {
        out = Py_NewRef(Py_None);
    }
    PyMem_Free(b.data);
    return out;
}

/* -- decode ------------------------------------------------------------------------------- */

typedef struct {
    const unsigned char *p, *end;
} Reader;

static int malformed(const char *what) {
    PyErr_Format(PyExc_ValueError, "malformed state: %s", what);
    return -1;
}

static int get_uvarint(Reader *r, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift <= 63; shift += 7) {
        if (r->p >= r->end) return malformed("truncated");
        unsigned char byte = *r->p++;
        if (shift == 63 && byte > 1) return malformed("varint past 64 bits");
        v |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) {
            *out = v;
            return 0;
        }
    }
    return malformed("varint too long");
}

static int get_count(Reader *r, Py_ssize_t *out, Py_ssize_t unit) {
    uint64_t n;
    if (get_uvarint(r, &n) < 0) return -1;
    /* Every counted thing takes at least ``unit`` bytes: a count the rest cannot hold is
     * malformed, and never allocates. */
    if (n > (uint64_t)(r->end - r->p) / (uint64_t)unit) return malformed("count past the end");
    *out = (Py_ssize_t)n;
    return 0;
}

/* Texts read are mostly the same few thousand trait and segment ids, again and again: one
 * str object each, kept here, saves making and hashing a new str per trait per state (which
 * made reading slower than orjson's, whose own key cache does the same). A slot holds the
 * last text that hashed to it. */
#define TEXT_CACHE_SLOTS 4096
#define TEXT_CACHE_BYTES 32
typedef struct {
    unsigned char flagged_len; /* 0: empty; else (n << 1 | hex) + 1, n <= TEXT_CACHE_BYTES */
    unsigned char bytes[TEXT_CACHE_BYTES];
    PyObject *text;
} CachedText;
static CachedText text_cache[TEXT_CACHE_SLOTS];

static PyObject *make_text(const unsigned char *p, uint64_t n, int hex) {
    if (!hex) return PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, "strict");
    static const char digits[] = "0123456789abcdef";
    PyObject *s = PyUnicode_New((Py_ssize_t)(2 * n), 127);
    if (s == NULL) return NULL;
    Py_UCS1 *out = PyUnicode_1BYTE_DATA(s);
    for (uint64_t i = 0; i < n; i++) {
        out[2 * i] = (Py_UCS1)digits[p[i] >> 4];
        out[2 * i + 1] = (Py_UCS1)digits[p[i] & 15];
    }
    return s;
}

static PyObject *cached_text(const unsigned char *p, uint64_t n, int hex) {
    if (n > TEXT_CACHE_BYTES) return make_text(p, n, hex);
    uint32_t h = 2166136261u ^ (uint32_t)hex;
    for (uint64_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    CachedText *slot = &text_cache[h & (TEXT_CACHE_SLOTS - 1)];
    unsigned char flagged = (unsigned char)((n << 1 | (uint64_t)hex) + 1);
    if (slot->flagged_len == flagged && memcmp(slot->bytes, p, n) == 0)
        return Py_NewRef(slot->text);
    PyObject *text = make_text(p, n, hex);
    if (text == NULL) return NULL;
    Py_XSETREF(slot->text, Py_NewRef(text));
    slot->flagged_len = flagged;
    memcpy(slot->bytes, p, n);
    return text;
}

static PyObject *get_text(Reader *r) {
    uint64_t size;
    if (get_uvarint(r, &size) < 0) return NULL;
    uint64_t n = size >> 1;
    if (n > (uint64_t)(r->end - r->p)) {
        malformed("count past the end");
        return NULL;
    }
    PyObject *s = cached_text(r->p, n, (int)(size & 1));
    r->p += n;
    return s;
}

/* Eight bytes as they are (a double or an int64, little-endian as stored). */
static int get8(Reader *r, void *out) {
    if (r->end - r->p < 8) return malformed("truncated number");
    memcpy(out, r->p, 8);
    r->p += 8;
    return 0;
}

static PyObject *get_double(Reader *r) {
    double d;
    return get8(r, &d) < 0 ? NULL : PyFloat_FromDouble(d);
}

static PyObject *get_number(Reader *r) {
    if (r->p >= r->end) {
        malformed("truncated number");
        return NULL;
    }
    unsigned char tag = *r->p++;
    if (tag == 'd') return get_double(r);
    if (tag == 'i') {
        int64_t i;
        return get8(r, &i) < 0 ? NULL : PyLong_FromLongLong((long long)i);
    }
    malformed("unknown number tag");
    return NULL;
}

static PyObject *get_entries(Reader *r) {
    if (r->p >= r->end) {
        malformed("truncated list");
        return NULL;
    }
    unsigned char tag = *r->p++;
    Py_ssize_t n;
    Py_ssize_t unit = tag == 'D' ? 8 : tag == 'P' ? 16 : 1;
    if (tag != 'D' && tag != 'P' && tag != 'G') {
        malformed("unknown list tag");
        return NULL;
    }
    if (get_count(r, &n, unit) < 0) return NULL;
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item;
        if (tag == 'D') {
            item = get_double(r);
        } else if (tag == 'P') {
            item = PyList_New(2);
            if (item != NULL) {
                for (int j = 0; j < 2; j++) {
                    PyObject *d = get_double(r);
                    if (d == NULL) {
                        Py_CLEAR(item);
                        break;
                    }
                    PyList_SET_ITEM(item, j, d);
                }
            }
        } else if (r->p < r->end && *r->p == 'l') {
            r->p++;
            Py_ssize_t m;
            item = get_count(r, &m, 9) < 0 ? NULL : PyList_New(m);
            for (Py_ssize_t j = 0; item != NULL && j < m; j++) {
                PyObject *x = get_number(r);
                if (x == NULL) {
                    Py_CLEAR(item);
                    break;
                }
                PyList_SET_ITEM(item, j, x);
            }
        } else {
            item = get_number(r);
        }
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject *states_decode(PyObject *module, PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    Reader r = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len};
    PyObject *local = NULL, *members = NULL, *history = NULL, *out = NULL;
    uint64_t loc;
    Py_ssize_t n;
    if (r.p >= r.end || *r.p != FORMAT_1) {
        malformed("not format 1");
        goto done;
    }
    r.p++;
    if (get_uvarint(&r, &loc) < 0 || (local = PyLong_FromUnsignedLongLong(loc)) == NULL) goto done;
    if (get_count(&r, &n, 1) < 0 || (members = PyList_New(n)) == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *m = get_text(&r);
        if (m == NULL) goto done;
        PyList_SET_ITEM(members, i, m);
    }
    if (get_count(&r, &n, 2) < 0 || (history = PyDict_New()) == NULL) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = get_text(&r);
        if (key == NULL) goto done;
        PyObject *entries = get_entries(&r);
        int failed = entries == NULL || PyDict_SetItem(history, key, entries) < 0;
        Py_DECREF(key);
        Py_XDECREF(entries);
        if (failed) goto done;
    }
    if (r.p != r.end) {
        malformed("trailing bytes after the state");
        goto done;
    }
    out = PyTuple_Pack(3, local, history, members);
done:
    Py_XDECREF(local);
    Py_XDECREF(members);
    Py_XDECREF(history);
    PyBuffer_Release(&view);
    return out;
}

static PyMethodDef methods[] = {
    {"encode", (PyCFunction)(void (*)(void))states_encode, METH_FASTCALL,
     "encode(local, history, members) -> bytes, or None when format 1 cannot carry it"},
    {"decode", states_decode, METH_O, "decode(data) -> (local, history, members)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "dmp._states", NULL, 0, methods};

PyMODINIT_FUNC PyInit__states(void) { return PyModule_Create(&module); }
