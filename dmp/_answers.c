/* The bid-time lookup's cache-miss path in C (dmp/answer_build.py, docs/decisions/0012).
 *
 * AnswerBuilder: one rule version's answer shape. ``build`` reads a cookie's run of the
 * replica's user-major index (decision 0002) from a pyroaring iterator, maps slots to
 * ranks, adds the composites the ranks satisfy (a small stack program, in dependency
 * order), sorts, and returns the names both as a tuple and as the JSON array the lookup
 * sends. The Python in dmp/replica.py does the same and stays as the fallback; a property
 * test holds the two equal.
 *
 * build_at: the same answer read from the bitmap's CRoaring structure directly, through the
 * iterator functions pyroaring's own module exports (bind_roaring), 64 values a call
 * instead of a Python int per value (docs/decisions/0013).
 *
 * interleave: a replica load's step, not a lookup's: one chunk's memberships put in
 * user-major order by a counting sort (docs/decisions/0014).
 *
 * find_position: the id index's binary search (numpy arrays of uint64, by buffer), so a
 * miss does not pay numpy's per-call overhead twice.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#define INACTIVE (1u << 30)
#define MAX_SLOTS 4096

/* CRoaring's 64-bit iterator API (roaring64.h, stable since CRoaring 4), as pyroaring's
 * extension module exports it. Both types are opaque here: only pointers pass through. */
typedef struct roaring64_bitmap_s roaring64_bitmap_t;
typedef struct roaring64_iterator_s roaring64_iterator_t;
static roaring64_iterator_t *(*r64_iterator_create)(const roaring64_bitmap_t *);
static void (*r64_iterator_reinit)(const roaring64_bitmap_t *, roaring64_iterator_t *);
static bool (*r64_iterator_move_equalorlarger)(roaring64_iterator_t *, uint64_t);
static uint64_t (*r64_iterator_read)(roaring64_iterator_t *, uint64_t *, uint64_t);
/* One iterator, re-pointed at each call's bitmap: every call holds the GIL throughout. */
static roaring64_iterator_t *r64_iterator;
#define READ_AT_ONCE 64

enum { OP_REF = 0, OP_FALSE = 1, OP_NOT = 2, OP_AND = 3, OP_OR = 4, OP_SET = 5 };

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;          /* ranks: segments of the rule file */
    PyObject **names;      /* str per rank, strong references */
    PyObject **encoded;    /* bytes per rank: the name as a JSON string, strong references */
    int32_t *program;
    Py_ssize_t program_len;
    int32_t *stack;        /* program stack, sized by the check at construction */
    uint32_t *ranks;       /* scratch: the answer's ranks (base + composites) */
    Py_ssize_t ranks_cap;
    uint8_t *held;         /* scratch: one byte per rank, cleared after every build */
    int busy;              /* re-entry guard: the iterator could run Python */
} AnswerPlan;

static void plan_free_arrays(AnswerPlan *self) {
    if (self->names != NULL) {
        for (Py_ssize_t i = 0; i < self->n; i++) Py_XDECREF(self->names[i]);
        PyMem_Free(self->names);
        self->names = NULL;
    }
    if (self->encoded != NULL) {
        for (Py_ssize_t i = 0; i < self->n; i++) Py_XDECREF(self->encoded[i]);
        PyMem_Free(self->encoded);
        self->encoded = NULL;
    }
    PyMem_Free(self->program);
    self->program = NULL;
    PyMem_Free(self->stack);
    self->stack = NULL;
    PyMem_Free(self->ranks);
    self->ranks = NULL;
    PyMem_Free(self->held);
    self->held = NULL;
    self->n = 0;
}

static void plan_dealloc(AnswerPlan *self) {
    plan_free_arrays(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Checks every operand and the stack depth once, so build() runs the program unchecked. */
static int check_program(const int32_t *prog, Py_ssize_t len, Py_ssize_t n, Py_ssize_t *depth) {
    Py_ssize_t sp = 0, max = 0;
    for (Py_ssize_t pc = 0; pc < len; pc++) {
        int32_t op = prog[pc];
        int32_t arg = 0;
        if (op == OP_REF || op == OP_AND || op == OP_OR || op == OP_SET) {
            if (pc + 1 >= len) goto bad;
            arg = prog[++pc];
        }
        switch (op) {
        case OP_REF:
            if (arg < 0 || arg >= n) goto bad;
            sp++;
            break;
        case OP_FALSE:
            sp++;
            break;
        case OP_NOT:
            if (sp < 1) goto bad;
            break;
        case OP_AND:
        case OP_OR:
            if (arg < 0 || arg > sp) goto bad;
            sp = sp - arg + 1;
            break;
        case OP_SET:
            if (arg < 0 || arg >= n || sp != 1) goto bad;
            sp = 0;
            break;
        default:
            goto bad;
        }
        if (sp > max) max = sp;
    }
    if (sp != 0) goto bad;
    *depth = max;
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "malformed composite program");
    return -1;
}

static int plan_init(AnswerPlan *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"names", "encoded", "program", NULL};
    PyObject *names, *encoded;
    Py_buffer prog;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOy*", kwlist, &names, &encoded, &prog))
        return -1;
    if (self->busy) {
        PyBuffer_Release(&prog);
        PyErr_SetString(PyExc_RuntimeError, "AnswerBuilder re-initialised while in use");
        return -1;
    }
    /* Busy while the sequences are read (that can run Python, which must not re-enter). */
    self->busy = 1;
    int ok = -1;
    PyObject *names_seq = PySequence_Fast(names, "names must be a sequence");
    PyObject *enc_seq = names_seq ? PySequence_Fast(encoded, "encoded must be a sequence") : NULL;
    plan_free_arrays(self);
    if (enc_seq == NULL) goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(names_seq);
    if (PySequence_Fast_GET_SIZE(enc_seq) != n) {
        PyErr_SetString(PyExc_ValueError, "names and encoded differ in length");
        goto done;
    }
    if (n >= (Py_ssize_t)INACTIVE) {
        PyErr_SetString(PyExc_ValueError, "too many segments");
        goto done;
    }
    if (prog.len % (Py_ssize_t)sizeof(int32_t) != 0) {
        PyErr_SetString(PyExc_ValueError, "program must be int32 values");
        goto done;
    }
    Py_ssize_t plen = prog.len / (Py_ssize_t)sizeof(int32_t);
    self->names = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    self->encoded = PyMem_Calloc((size_t)n + 1, sizeof(PyObject *));
    self->program = PyMem_Malloc(((size_t)plen + 1) * sizeof(int32_t));
    self->ranks_cap = n; /* each rank once: held[] drops repeats */
    self->ranks = PyMem_Malloc((size_t)self->ranks_cap * sizeof(uint32_t));
    self->held = PyMem_Calloc((size_t)n + 1, 1);
    if (!self->names || !self->encoded || !self->program || !self->ranks || !self->held) {
        PyErr_NoMemory();
        goto done;
    }
    self->n = n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(names_seq, i);
        PyObject *enc = PySequence_Fast_GET_ITEM(enc_seq, i);
        if (!PyUnicode_Check(name) || !PyBytes_Check(enc)) {
            PyErr_SetString(PyExc_TypeError, "names are str and encoded are bytes");
            goto done;
        }
        Py_INCREF(name);
        self->names[i] = name;
        Py_INCREF(enc);
        self->encoded[i] = enc;
    }
    if (plen) memcpy(self->program, prog.buf, (size_t)plen * sizeof(int32_t));
    self->program_len = plen;
    Py_ssize_t depth = 0;
    if (check_program(self->program, plen, n, &depth) < 0) goto done;
    self->stack = PyMem_Malloc(((size_t)depth + 1) * sizeof(int32_t));
    if (self->stack == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    ok = 0;
done:
    if (ok < 0) plan_free_arrays(self);
    self->busy = 0;
    Py_XDECREF(names_seq);
    Py_XDECREF(enc_seq);
    PyBuffer_Release(&prog);
    return ok;
}

static Py_ssize_t run_program(AnswerPlan *self, Py_ssize_t count) {
    const int32_t *prog = self->program;
    int32_t *stack = self->stack;
    uint8_t *held = self->held;
    Py_ssize_t sp = 0;
    for (Py_ssize_t pc = 0; pc < self->program_len; pc++) {
        switch (prog[pc]) {
        case OP_REF:
            stack[sp++] = held[prog[++pc]];
            break;
        case OP_FALSE:
            stack[sp++] = 0;
            break;
        case OP_NOT:
            stack[sp - 1] = !stack[sp - 1];
            break;
        case OP_AND:
        case OP_OR: {
            int all = prog[pc] == OP_AND;
            int32_t k = prog[++pc];
            int32_t result = all ? 1 : 0;
            for (int32_t i = 0; i < k; i++) {
                int32_t v = stack[sp - 1 - i];
                result = all ? (result && v) : (result || v);
            }
            sp -= k;
            stack[sp++] = result;
            break;
        }
        case OP_SET: {
            int32_t rank = prog[++pc];
            if (stack[--sp] && !held[rank]) {
                held[rank] = 1;
                self->ranks[count++] = (uint32_t)rank;
            }
            break;
        }
        }
    }
    return count;
}

static int cmp_u32(const void *a, const void *b) {
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return (x > y) - (x < y);
}

static void sort_ranks(uint32_t *r, Py_ssize_t count) {
    if (count > 64) {
        qsort(r, (size_t)count, sizeof(uint32_t), cmp_u32);
        return;
    }
    for (Py_ssize_t i = 1; i < count; i++) {
        uint32_t v = r[i];
        Py_ssize_t j = i;
        while (j > 0 && r[j - 1] > v) {
            r[j] = r[j - 1];
            j--;
        }
        r[j] = v;
    }
}

/* Adds the slot's rank to the answer being built; -1 with an exception when the slot or its
 * rank is out of range. */
static int hold_slot(AnswerPlan *self, const uint32_t *slot_ranks, Py_ssize_t slots,
                     uint64_t slot, Py_ssize_t *count) {
    if (slot >= (uint64_t)slots) {
        PyErr_SetString(PyExc_IndexError, "slot without a rank");
        return -1;
    }
    uint32_t rank = slot_ranks[slot];
    if (rank >= INACTIVE) return 0; /* paused or gone: never answered */
    if ((Py_ssize_t)rank >= self->n) {
        PyErr_SetString(PyExc_IndexError, "rank past the plan's segments");
        return -1;
    }
    if (!self->held[rank]) {
        self->held[rank] = 1;
        self->ranks[(*count)++] = rank;
    }
    return 0;
}

/* The held base ranks -> (names, json): composites added, sorted, named. */
static PyObject *finish_answer(AnswerPlan *self, Py_ssize_t count, Py_ssize_t *final_count) {
    if (count) count = run_program(self, count); /* none held: no composite either */
    *final_count = count;
    sort_ranks(self->ranks, count);
    PyObject *names = PyTuple_New(count);
    if (names == NULL) return NULL;
    Py_ssize_t size = 2 + (count ? count - 1 : 0);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = self->names[self->ranks[i]];
        Py_INCREF(name);
        PyTuple_SET_ITEM(names, i, name);
        size += PyBytes_GET_SIZE(self->encoded[self->ranks[i]]);
    }
    /* Strings only, so never in a cycle: untracked now, the cyclic collector never walks
     * the answer cache's tuples (a young collection walking ~25,000 fresh ones of ~47
     * names each stalled the loop ~40 ms). CPython untracks such tuples itself, but only
     * when a collection first visits them. */
    if (PyObject_GC_IsTracked(names)) PyObject_GC_UnTrack(names);
    PyObject *json = PyBytes_FromStringAndSize(NULL, size);
    if (json == NULL) {
        Py_DECREF(names);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(json);
    *out++ = '[';
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *enc = self->encoded[self->ranks[i]];
        if (i) *out++ = ',';
        memcpy(out, PyBytes_AS_STRING(enc), (size_t)PyBytes_GET_SIZE(enc));
        out += PyBytes_GET_SIZE(enc);
    }
    *out = ']';
    PyObject *result = PyTuple_Pack(2, names, json);
    Py_DECREF(names);
    Py_DECREF(json);
    return result;
}

/* Both builds' (source, start, slot_ranks) arguments and checks; 0 when the builder may
 * run, with ``table`` to release; -1 with an exception and nothing to release. */
static int build_args(AnswerPlan *self, PyObject *args, PyObject **source, Py_buffer *table,
                      unsigned long long *start) {
    PyObject *start_obj;
    if (!PyArg_ParseTuple(args, "OOy*", source, &start_obj, table)) return -1;
    /* Not "K", which wraps negative and oversized ints silently. */
    *start = PyLong_AsUnsignedLongLong(start_obj);
    if (*start == (unsigned long long)-1 && PyErr_Occurred()) goto bad;
    if (self->names == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "AnswerBuilder not initialised");
        goto bad;
    }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "AnswerBuilder.build re-entered");
        goto bad;
    }
    return 0;
bad:
    PyBuffer_Release(table);
    return -1;
}

/* build(values, start, slot_ranks) -> (names, json): see the module comment. */
static PyObject *plan_build(AnswerPlan *self, PyObject *args) {
    PyObject *values;
    Py_buffer table;
    unsigned long long start;
    if (build_args(self, args, &values, &table, &start) < 0) return NULL;
    const uint32_t *slot_ranks = (const uint32_t *)table.buf;
    Py_ssize_t slots = table.len / (Py_ssize_t)sizeof(uint32_t);
    PyObject *it = PyObject_GetIter(values);
    if (it == NULL) {
        PyBuffer_Release(&table);
        return NULL;
    }
    self->busy = 1;
    Py_ssize_t count = 0;
    PyObject *result = NULL;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        unsigned long long v = PyLong_AsUnsignedLongLong(item);
        Py_DECREF(item);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) goto fail;
        if (v < start) {
            PyErr_SetString(PyExc_ValueError, "value below the run's start");
            goto fail;
        }
        if (v - start >= MAX_SLOTS) break; /* the next cookie's run */
        if (hold_slot(self, slot_ranks, slots, v - start, &count) < 0) goto fail;
    }
    if (PyErr_Occurred()) goto fail;
    result = finish_answer(self, count, &count);
fail:
    for (Py_ssize_t i = 0; i < count; i++) self->held[self->ranks[i]] = 0;
    self->busy = 0;
    Py_DECREF(it);
    PyBuffer_Release(&table);
    return result;
}

/* build_at(bitmap_pointer, start, slot_ranks) -> (names, json): as build, reading the
 * BitMap64 at ``bitmap_pointer`` (its ``raw_pointer``, alive for the call) directly. */
static PyObject *plan_build_at(AnswerPlan *self, PyObject *args) {
    PyObject *pointer_obj;
    Py_buffer table;
    unsigned long long start;
    if (build_args(self, args, &pointer_obj, &table, &start) < 0) return NULL;
    void *pointer = PyLong_AsVoidPtr(pointer_obj);
    if (pointer == NULL) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "null bitmap pointer");
        PyBuffer_Release(&table);
        return NULL;
    }
    if (r64_iterator_read == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "CRoaring is not bound (bind_roaring)");
        PyBuffer_Release(&table);
        return NULL;
    }
    const roaring64_bitmap_t *bitmap = (const roaring64_bitmap_t *)pointer;
    if (r64_iterator == NULL) {
        r64_iterator = r64_iterator_create(bitmap);
        if (r64_iterator == NULL) {
            PyBuffer_Release(&table);
            return PyErr_NoMemory();
        }
    } else {
        r64_iterator_reinit(bitmap, r64_iterator);
    }
    const uint32_t *slot_ranks = (const uint32_t *)table.buf;
    Py_ssize_t slots = table.len / (Py_ssize_t)sizeof(uint32_t);
    self->busy = 1;
    Py_ssize_t count = 0;
    PyObject *result = NULL;
    if (r64_iterator_move_equalorlarger(r64_iterator, start)) {
        uint64_t values[READ_AT_ONCE];
        for (;;) {
            uint64_t got = r64_iterator_read(r64_iterator, values, READ_AT_ONCE);
            for (uint64_t i = 0; i < got; i++) {
                if (values[i] - start >= MAX_SLOTS) goto read; /* the next cookie's run */
                if (hold_slot(self, slot_ranks, slots, values[i] - start, &count) < 0)
                    goto fail;
            }
            if (got < READ_AT_ONCE) break; /* the bitmap's end */
        }
    }
read:
    result = finish_answer(self, count, &count);
fail:
    for (Py_ssize_t i = 0; i < count; i++) self->held[self->ranks[i]] = 0;
    self->busy = 0;
    PyBuffer_Release(&table);
    return result;
}

static PyMethodDef plan_methods[] = {
    {"build", (PyCFunction)plan_build, METH_VARARGS,
     "build(values, start, slot_ranks) -> (names, json): one cookie's answer."},
    {"build_at", (PyCFunction)plan_build_at, METH_VARARGS,
     "build_at(bitmap_pointer, start, slot_ranks) -> (names, json): build, read in C."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject AnswerPlanType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dmp._answers.AnswerBuilder",
    .tp_basicsize = sizeof(AnswerPlan),
    .tp_dealloc = (destructor)plan_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One rule version's answer shape (dmp/answer_build.py).",
    .tp_methods = plan_methods,
    .tp_init = (initproc)plan_init,
    .tp_new = PyType_GenericNew,
};

/* A one-dimensional contiguous buffer of unsigned integers of ``size`` bytes (numpy's
 * uint64 says "L" or "Q", uint32 "I", possibly after a byte-order mark). */
static int uint_buffer_flags(PyObject *obj, Py_buffer *view, Py_ssize_t size, const char *what,
                             int flags) {
    if (PyObject_GetBuffer(obj, view, PyBUF_ND | PyBUF_FORMAT | flags) < 0) return -1;
    const char *f = view->format;
    if (f != NULL && (*f == '<' || *f == '=' || *f == '@')) f++;
    if (view->itemsize != size || view->ndim != 1 || f == NULL || f[0] == '\0' || f[1] != '\0' ||
        strchr("BHILQ", f[0]) == NULL) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous array of uint%d", what,
                     (int)(size * 8));
        return -1;
    }
    return 0;
}

static int uint_buffer(PyObject *obj, Py_buffer *view, Py_ssize_t size, const char *what) {
    return uint_buffer_flags(obj, view, size, what, 0);
}

/* find_position(hashes, positions, buckets, shift, h) -> the position of the last
 * hashes[i] == h, or None. ``buckets[k]`` is the first index whose hash >> shift is >= k
 * (len 2**(64 - shift) + 1), so the search touches one short range instead of ~23 probes
 * spread over the whole array, most of them cache misses at 10M cookies. Empty buckets:
 * the whole array. */
static PyObject *find_position(PyObject *module, PyObject *args) {
    PyObject *hashes_obj, *positions_obj, *buckets_obj, *h_obj;
    unsigned int shift;
    if (!PyArg_ParseTuple(args, "OOOIO", &hashes_obj, &positions_obj, &buckets_obj, &shift, &h_obj))
        return NULL;
    unsigned long long h = PyLong_AsUnsignedLongLong(h_obj); /* not "K": it wraps */
    if (h == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    Py_buffer hv, pv, bv;
    if (uint_buffer(hashes_obj, &hv, 8, "hashes") < 0) return NULL;
    if (uint_buffer(positions_obj, &pv, 8, "positions") < 0) {
        PyBuffer_Release(&hv);
        return NULL;
    }
    if (uint_buffer(buckets_obj, &bv, 4, "buckets") < 0) {
        PyBuffer_Release(&hv);
        PyBuffer_Release(&pv);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = hv.shape[0];
    Py_ssize_t lo = 0, hi = n;
    if (pv.shape[0] != n) {
        PyErr_SetString(PyExc_ValueError, "hashes and positions differ in length");
        goto done;
    }
    if (bv.shape[0] > 0) {
        if (shift < 2 || shift > 63 || bv.shape[0] != ((Py_ssize_t)1 << (64 - shift)) + 1) {
            PyErr_SetString(PyExc_ValueError, "buckets do not match shift");
            goto done;
        }
        const uint32_t *bs = (const uint32_t *)bv.buf;
        uint64_t k = (uint64_t)h >> shift;
        lo = (Py_ssize_t)bs[k];
        hi = (Py_ssize_t)bs[k + 1];
        if (lo > hi || hi > n) {
            PyErr_SetString(PyExc_ValueError, "buckets out of range");
            goto done;
        }
    }
    const uint64_t *hs = (const uint64_t *)hv.buf;
    /* First index with hs[i] > h: the one before it is the last entry <= h. */
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (hs[mid] <= h) lo = mid + 1;
        else hi = mid;
    }
    if (lo > 0 && hs[lo - 1] == h) {
        result = PyLong_FromUnsignedLongLong(((const uint64_t *)pv.buf)[lo - 1]);
    } else {
        result = Py_NewRef(Py_None);
    }
done:
    PyBuffer_Release(&hv);
    PyBuffer_Release(&pv);
    PyBuffer_Release(&bv);
    return result;
}

/* interleave(parts, low, span, slot_bits, out): one chunk's memberships, user-major.
 * ``parts`` is a sequence of (slot, locals) with locals a uint32 array, every local in
 * [low, low + span); ``out`` (uint32, as long as all locals together) receives
 * ``(local - low) << slot_bits | slot`` sorted when the parts come in ascending slot order
 * (the locals themselves may come in any order): a counting sort over the locals, two
 * passes, instead of a comparison sort of the lot (the load's largest cost,
 * docs/decisions/0014). An ``out`` sharing memory with a part is refused. */
static PyObject *interleave(PyObject *module, PyObject *args) {
    PyObject *parts_obj, *out_obj;
    unsigned long long low, span;
    unsigned int slot_bits;
    if (!PyArg_ParseTuple(args, "OKKIO", &parts_obj, &low, &span, &slot_bits, &out_obj))
        return NULL;
    if (slot_bits > 31 || span == 0 || span > ((uint64_t)1 << (32 - slot_bits)) ||
        low > UINT32_MAX || low + span - 1 > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "low, span and slot_bits do not fit 32 bits");
        return NULL;
    }
    PyObject *parts = PySequence_Fast(parts_obj, "parts must be a sequence");
    if (parts == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(parts);
    Py_buffer *views = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(Py_buffer));
    uint32_t *slots = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(uint32_t));
    uint32_t *next = PyMem_Calloc((size_t)span + 1, sizeof(uint32_t));
    Py_buffer out;
    int have_out = 0;
    Py_ssize_t held = 0;
    PyObject *result = NULL;
    if (views == NULL || slots == NULL || next == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    uint64_t total = 0;
    for (; held < n; held++) {
        PyObject *part = PySequence_Fast_GET_ITEM(parts, held);
        PyObject *slot_obj, *locals_obj;
        if (!PyTuple_Check(part) || !PyArg_ParseTuple(part, "OO", &slot_obj, &locals_obj)) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "parts are (slot, locals)");
            goto done;
        }
        unsigned long slot = PyLong_AsUnsignedLong(slot_obj);
        if (slot == (unsigned long)-1 && PyErr_Occurred()) goto done;
        if (slot >= (1UL << slot_bits)) {
            PyErr_SetString(PyExc_ValueError, "slot does not fit slot_bits");
            goto done;
        }
        slots[held] = (uint32_t)slot;
        if (uint_buffer(locals_obj, &views[held], 4, "locals") < 0) goto done;
        const uint32_t *vs = (const uint32_t *)views[held].buf;
        Py_ssize_t m = views[held].shape[0];
        for (Py_ssize_t i = 0; i < m; i++) {
            uint64_t at = (uint64_t)vs[i] - low; /* wraps past span when below low */
            if (at >= span) {
                held++;
                PyErr_SetString(PyExc_ValueError, "a local is outside [low, low + span)");
                goto done;
            }
            next[at + 1]++;
        }
        total += (uint64_t)m;
    }
    if (total > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "more than 2**32 locals");
        goto done;
    }
    if (uint_buffer_flags(out_obj, &out, 4, "out", PyBUF_WRITABLE) < 0) goto done;
    have_out = 1;
    if ((uint64_t)out.shape[0] != total) {
        PyErr_SetString(PyExc_ValueError, "out must be a uint32 array as long as all locals");
        goto done;
    }
    /* The second pass trusts the first: the GIL is held throughout, so only ``out`` itself
     * could change the locals under it. */
    const char *out_start = (const char *)out.buf, *out_end = out_start + out.len;
    for (Py_ssize_t p = 0; p < n; p++) {
        const char *start = (const char *)views[p].buf, *end = start + views[p].len;
        if (start < out_end && out_start < end) {
            PyErr_SetString(PyExc_ValueError, "out shares memory with the locals");
            goto done;
        }
    }
    for (uint64_t k = 1; k <= span; k++) next[k] += next[k - 1]; /* first place per local */
    uint32_t *dst = (uint32_t *)out.buf;
    for (Py_ssize_t p = 0; p < n; p++) {
        const uint32_t *vs = (const uint32_t *)views[p].buf;
        Py_ssize_t m = views[p].shape[0];
        uint32_t slot = slots[p];
        for (Py_ssize_t i = 0; i < m; i++) {
            uint32_t at = (uint32_t)(vs[i] - low);
            dst[next[at]++] = (at << slot_bits) | slot;
        }
    }
    result = Py_NewRef(Py_None);
done:
    for (Py_ssize_t p = 0; p < held; p++) PyBuffer_Release(&views[p]);
    if (have_out) PyBuffer_Release(&out);
    PyMem_Free(views);
    PyMem_Free(slots);
    PyMem_Free(next);
    Py_DECREF(parts);
    return result;
}

/* bind_roaring(path) -> bool: find CRoaring's iterator functions in pyroaring's extension
 * module at ``path``, already loaded (RTLD_NOLOAD: never a second copy). False when any is
 * missing: build_at is then unusable and dmp/answer_build.py keeps to build. */
static PyObject *bind_roaring(PyObject *module, PyObject *args) {
    const char *path;
    if (!PyArg_ParseTuple(args, "s", &path)) return NULL;
    void *handle = dlopen(path, RTLD_NOW | RTLD_NOLOAD);
    if (handle == NULL) Py_RETURN_FALSE;
    void *create = dlsym(handle, "roaring64_iterator_create");
    void *reinit = dlsym(handle, "roaring64_iterator_reinit");
    void *move = dlsym(handle, "roaring64_iterator_move_equalorlarger");
    void *read = dlsym(handle, "roaring64_iterator_read");
    if (!create || !reinit || !move || !read) {
        dlclose(handle);
        Py_RETURN_FALSE;
    }
    if (r64_iterator_read != NULL) {
        /* Bound already: the shared iterator belongs to that CRoaring; never mix copies. */
        int same = *(void **)&r64_iterator_read == read;
        dlclose(handle);
        return PyBool_FromLong(same);
    }
    /* The handle stays open: the functions must outlive this call. */
    *(void **)&r64_iterator_create = create;
    *(void **)&r64_iterator_reinit = reinit;
    *(void **)&r64_iterator_move_equalorlarger = move;
    *(void **)&r64_iterator_read = read;
    Py_RETURN_TRUE;
}

static PyMethodDef module_methods[] = {
    {"bind_roaring", bind_roaring, METH_VARARGS,
     "bind_roaring(path) -> bool: use CRoaring from pyroaring's module at path."},
    {"interleave", interleave, METH_VARARGS,
     "interleave(parts, low, span, slot_bits, out): one chunk's memberships, user-major."},
    {"find_position", find_position, METH_VARARGS,
     "find_position(hashes, positions, buckets, shift, h) -> position or None."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef answers_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "dmp._answers",
    .m_doc = "The lookup's cache-miss path in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC PyInit__answers(void) {
    if (PyType_Ready(&AnswerPlanType) < 0) return NULL;
    PyObject *m = PyModule_Create(&answers_module);
    if (m == NULL) return NULL;
    Py_INCREF(&AnswerPlanType);
    if (PyModule_AddObject(m, "AnswerBuilder", (PyObject *)&AnswerPlanType) < 0) {
        Py_DECREF(&AnswerPlanType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "MAX_SLOTS", MAX_SLOTS) < 0 ||
        PyModule_AddIntConstant(m, "INACTIVE", INACTIVE) < 0 ||
        PyModule_AddIntConstant(m, "OP_REF", OP_REF) < 0 ||
        PyModule_AddIntConstant(m, "OP_FALSE", OP_FALSE) < 0 ||
        PyModule_AddIntConstant(m, "OP_NOT", OP_NOT) < 0 ||
        PyModule_AddIntConstant(m, "OP_AND", OP_AND) < 0 ||
        PyModule_AddIntConstant(m, "OP_OR", OP_OR) < 0 ||
        PyModule_AddIntConstant(m, "OP_SET", OP_SET) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
