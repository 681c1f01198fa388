/*
 * segment_rules._fastmatch: the all-hits path of rule matching, in C.
 *
 * The Python side (segment_rules/fast_match.py) describes, per event type, the fields the
 * tests read and the groups of tests reading the same fields; this object answers an event
 * from remembered group answers. Why C: in Python, reading the fields, building the keys and
 * one dictionary look-up per group cost more than decoding the event (decisions 0006, 0011).
 *
 * Every value a key is made of becomes a small integer id:
 *   - a text value through a table of the texts seen (hashed here over the raw characters,
 *     so a URL is cut without building the cut text);
 *   - a missing value is 0; a list is a chain of cons cells from the LIST id over its
 *     elements' ids; a group's key is the chain from the group's own id over its fields.
 * A cons cell (a, b) -> id is one open-addressing table. A group key's answer (a tuple of
 * test ids, each sys.intern'ed by the caller, so equal ids are the same object) is kept in
 * a dense array indexed by the key's id.
 *
 * "Elementwise" groups (one field, every test a positive existential test of one value:
 * a list passes if any element passes) are keyed per element, and a list's answer is the
 * union of its elements' answers: a page view's 1-3 categories make ever-new lists, but
 * few distinct categories.
 *
 * Anything else (numbers, true/false, objects, a URL that is not http(s)://host/...) is
 * not for this table: the Python fallback answers it, with the same result by construction.
 * On a group key never seen, the group's Python matcher is called and its answer stored.
 * Everything is dropped when the ids pass `limit` (checked before an event, never during).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define ID_NONE 0u
#define ID_LIST 1u
#define FIRST_GROUP_ID 2u

/* ---- text table: (kind, bytes) -> id ------------------------------------------------ */

#define INLINE_BYTES 40

/* 64 bytes: a text up to INLINE_BYTES long (a category, a region, most cut URLs) is kept in
   the slot itself, so a look-up touches one cache line. */
typedef struct {
    uint64_t hash; /* 0: empty slot */
    uint32_t id;
    uint32_t nbytes;
    uint32_t kind;
    uint32_t pad;
    union {
        char inline_data[INLINE_BYTES];
        char *data;
    } u;
} TextSlot;

static inline const char *slot_data(const TextSlot *s) {
    return s->nbytes <= INLINE_BYTES ? s->u.inline_data : s->u.data;
}

typedef struct {
    TextSlot *slots;
    size_t mask;
    size_t used;
} TextTable;

/* ---- cons table: (a << 32 | b) -> id ----------------------------------------------- */

typedef struct {
    uint64_t key; /* 0: empty slot (a is never 0: chains start at LIST or a group id) */
    uint32_t id;
} ConsSlot;

typedef struct {
    ConsSlot *slots;
    size_t mask;
    size_t used;
} ConsTable;

/* ---- rule-set description ----------------------------------------------------------- */

typedef struct {
    PyObject **keys; /* the path, interned str, borrowed from `spec` (kept alive) */
    Py_ssize_t depth;
    Py_ssize_t shared; /* leading keys equal to the previous field's (fields come sorted) */
    int url;                 /* cut http(s) URLs for host / path_prefix / prefix tests */
    PyObject **path_prefixes; /* str, for the cut */
    Py_ssize_t n_path_prefixes;
    PyObject **text_prefixes;
    Py_ssize_t n_text_prefixes;
    int need_chain; /* some non-elementwise group reads it: a list needs its chain id */
} Field;

typedef struct {
    Py_ssize_t *fields; /* indices into the branch's fields */
    Py_ssize_t n_fields;
    int elementwise;
    uint32_t base_id;
    PyObject *fill; /* fill(event) or, elementwise, fill(element) -> tuple */
} Group;

typedef struct {
    Field *fields;
    Py_ssize_t n_fields;
    Group *groups;
    Py_ssize_t n_groups;
    PyObject *always; /* tuple */
} Branch;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *spec;      /* the branches: keeps every borrowed object alive */
    PyObject *branch_of; /* dict: type text -> branch number (our copy: checked once) */
    Py_ssize_t default_branch;
    PyObject *fallback;  /* fallback(event) -> tuple, for whatever is not for the table */
    PyObject *type_key;  /* "type" */
    Branch *branches;
    Py_ssize_t n_branches;
    PyObject **walk; /* read_field's nodes, for the deepest path (one event at a time) */
    Py_ssize_t max_depth;
    uint32_t n_group_ids;
    TextTable texts;
    ConsTable cons;
    PyObject **answers; /* by id; NULL: none yet */
    size_t answers_size;
    uint32_t next_id;
    uint32_t limit;
    int busy;
    /* counters, for tests (stats()) */
    unsigned long long hits, fills, fallbacks, clears;
    unsigned long long probes; /* text slots stepped over: stays near the texts' count */
} Matcher;

/* ---- hashing ------------------------------------------------------------------------ */

static inline uint64_t mix(uint64_t h) {
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* Texts come from outside (URLs, categories, free-form attrs): with a hash anyone can
   compute, a sender crafts texts that all land in one probe chain, each new one walking the
   whole chain (with the unkeyed word-mixing hash this replaced, texts whose mixed 8-byte
   words differ only in the top bit of a pair of words shared their hash: 2**k texts of 16k
   bytes in one chain, a seed or not). CPython's keyed hash of str (SipHash, PYTHONHASHSEED)
   is the one its own dicts rely on for the same traffic. */
static uint64_t hash_bytes(const char *p, size_t n, int kind) {
    uint64_t h = (uint64_t)_Py_HashBytes(p, (Py_ssize_t)n) ^ (uint64_t)kind;
    return h ? h : 1;
}

/* ---- tables ------------------------------------------------------------------------- */

static int text_init(TextTable *t, size_t cap) {
    t->slots = PyMem_Calloc(cap, sizeof(TextSlot));
    if (!t->slots) return -1;
    t->mask = cap - 1;
    t->used = 0;
    return 0;
}

static void text_free(TextTable *t) {
    if (!t->slots) return;
    for (size_t i = 0; i <= t->mask; i++) {
        if (t->slots[i].hash && t->slots[i].nbytes > INLINE_BYTES) PyMem_Free(t->slots[i].u.data);
    }
    PyMem_Free(t->slots);
    t->slots = NULL;
}

static int text_grow(TextTable *t) {
    size_t cap = (t->mask + 1) * 2;
    TextSlot *slots = PyMem_Calloc(cap, sizeof(TextSlot));
    if (!slots) return -1;
    for (size_t i = 0; i <= t->mask; i++) {
        TextSlot *s = &t->slots[i];
        if (!s->hash) continue;
        size_t j = s->hash & (cap - 1);
        while (slots[j].hash) j = (j + 1) & (cap - 1);
        slots[j] = *s;
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->mask = cap - 1;
    return 0;
}

/* The id of a text; a new id when `insert`, else ID_NONE when unknown. -1 on memory error
   (as (uint32_t)-1, never a valid id), with MemoryError set. */
static uint32_t text_id(Matcher *m, const char *data, size_t nbytes, int kind, int insert) {
    TextTable *t = &m->texts;
    uint64_t h = hash_bytes(data, nbytes, kind);
    size_t j = h & t->mask;
    for (;;) {
        TextSlot *s = &t->slots[j];
        if (!s->hash) break;
        if (s->hash == h && s->nbytes == nbytes && s->kind == (uint32_t)kind &&
            memcmp(slot_data(s), data, nbytes) == 0)
            return s->id;
        j = (j + 1) & t->mask;
        m->probes++;
    }
    if (!insert) return ID_NONE;
    TextSlot *s = &t->slots[j];
    if (nbytes <= INLINE_BYTES) {
        memcpy(s->u.inline_data, data, nbytes);
    } else {
        char *copy = PyMem_Malloc(nbytes);
        if (!copy) {
            PyErr_NoMemory();
            return (uint32_t)-1;
        }
        memcpy(copy, data, nbytes);
        s->u.data = copy;
    }
    s->hash = h;
    s->id = m->next_id++;
    s->nbytes = (uint32_t)nbytes;
    s->kind = (uint32_t)kind;
    t->used++;
    if (t->used * 2 > t->mask + 1 && text_grow(t) < 0) {
        PyErr_NoMemory(); /* the text is in (the table is just fuller): the event fails */
        return (uint32_t)-1;
    }
    return m->next_id - 1;
}

static int cons_init(ConsTable *t, size_t cap) {
    t->slots = PyMem_Calloc(cap, sizeof(ConsSlot));
    if (!t->slots) return -1;
    t->mask = cap - 1;
    t->used = 0;
    return 0;
}

static int cons_grow(ConsTable *t) {
    size_t cap = (t->mask + 1) * 2;
    ConsSlot *slots = PyMem_Calloc(cap, sizeof(ConsSlot));
    if (!slots) return -1;
    for (size_t i = 0; i <= t->mask; i++) {
        ConsSlot *s = &t->slots[i];
        if (!s->key) continue;
        size_t j = mix(s->key) & (cap - 1);
        while (slots[j].key) j = (j + 1) & (cap - 1);
        slots[j] = *s;
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->mask = cap - 1;
    return 0;
}

static uint32_t cons_id(Matcher *m, uint32_t a, uint32_t b, int insert) {
    ConsTable *t = &m->cons;
    uint64_t key = ((uint64_t)a << 32) | b;
    size_t j = mix(key) & t->mask;
    for (;;) {
        ConsSlot *s = &t->slots[j];
        if (!s->key) break;
        if (s->key == key) return s->id;
        j = (j + 1) & t->mask;
    }
    if (!insert) return ID_NONE;
    ConsSlot *s = &t->slots[j];
    s->key = key;
    s->id = m->next_id++;
    t->used++;
    if (t->used * 2 > t->mask + 1 && cons_grow(t) < 0) {
        PyErr_NoMemory();
        return (uint32_t)-1;
    }
    return m->next_id - 1;
}

static void drop_answers(Matcher *m) {
    if (!m->answers) return;
    for (size_t i = 0; i < m->answers_size; i++) Py_CLEAR(m->answers[i]);
}

/* Forget every text, cell and answer (ids restart after the group ids). The new tables
   are made first: when they cannot be, the old ones stay (and the next event tries again),
   never a matcher without tables. */
static int matcher_reset(Matcher *m) {
    TextTable texts;
    ConsTable cons;
    if (text_init(&texts, 1024) < 0 || cons_init(&cons, 1024) < 0) {
        if (texts.slots) PyMem_Free(texts.slots);
        PyErr_NoMemory();
        return -1;
    }
    drop_answers(m);
    text_free(&m->texts);
    PyMem_Free(m->cons.slots);
    m->texts = texts;
    m->cons = cons;
    m->next_id = FIRST_GROUP_ID + m->n_group_ids;
    return 0;
}

static PyObject *answer_of(Matcher *m, uint32_t id) {
    return id < m->answers_size ? m->answers[id] : NULL;
}

static int store_answer(Matcher *m, uint32_t id, PyObject *answer) {
    if (id >= m->answers_size) {
        size_t size = m->answers_size ? m->answers_size : 1024;
        while (size <= id) size *= 2;
        PyObject **grown = PyMem_Realloc(m->answers, size * sizeof(PyObject *));
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        memset(grown + m->answers_size, 0, (size - m->answers_size) * sizeof(PyObject *));
        m->answers = grown;
        m->answers_size = size;
    }
    Py_INCREF(answer);
    Py_XSETREF(m->answers[id], answer);
    return 0;
}

/* ---- reading an event ---------------------------------------------------------------- */

/* The raw value at a field's path (borrowed), NULL when missing. -1 on error. `walk[i]` is
   the node below the path's first i keys (NULL: none), kept for the next field, which
   starts from the nodes the two paths share (geo.country, geo.metro: "geo" read once).
   `walk` has room for the deepest path of the rule set (m->walk). */
static int read_field(PyObject *event, const Field *f, PyObject **walk, PyObject **out) {
    walk[0] = event;
    for (Py_ssize_t i = f->shared; i < f->depth; i++) {
        PyObject *node = walk[i];
        if (!node || !PyDict_Check(node)) {
            walk[i + 1] = NULL;
            continue;
        }
        node = PyDict_GetItemWithError(node, f->keys[i]);
        if (!node && PyErr_Occurred()) return -1;
        walk[i + 1] = node;
    }
    PyObject *node = walk[f->depth];
    *out = node == Py_None ? NULL : node;
    return 0;
}

static Py_ssize_t find_char(const void *data, int kind, Py_ssize_t len, Py_ssize_t from,
                            Py_UCS4 ch) {
    if (kind == PyUnicode_1BYTE_KIND) {
        if (from >= len) return -1;
        const char *found = memchr((const char *)data + from, (int)ch, (size_t)(len - from));
        return found ? found - (const char *)data : -1;
    }
    for (Py_ssize_t i = from; i < len; i++) {
        if (PyUnicode_READ(kind, data, i) == ch) return i;
    }
    return -1;
}

static int starts_with_ascii(const void *data, int kind, Py_ssize_t len, const char *lit) {
    Py_ssize_t n = (Py_ssize_t)strlen(lit);
    if (len < n) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyUnicode_READ(kind, data, i) != (Py_UCS4)(unsigned char)lit[i]) return 0;
    }
    return 1;
}

/* Longest common prefix of text[at:] and `want`, in characters. */
static Py_ssize_t common_prefix(const void *data, int kind, Py_ssize_t len, Py_ssize_t at,
                                PyObject *want) {
    const void *wd = PyUnicode_DATA(want);
    int wk = PyUnicode_KIND(want);
    Py_ssize_t wl = PyUnicode_GET_LENGTH(want);
    Py_ssize_t n = 0;
    if (kind == PyUnicode_1BYTE_KIND && wk == PyUnicode_1BYTE_KIND) {
        const unsigned char *a = (const unsigned char *)data + at, *b = wd;
        Py_ssize_t most = wl < len - at ? wl : len - at;
        while (n < most && a[n] == b[n]) n++;
        return n;
    }
    while (n < wl && at + n < len &&
           PyUnicode_READ(kind, data, at + n) == PyUnicode_READ(wk, wd, n))
        n++;
    return n;
}

/* Characters of an http(s) URL its key keeps: through the '/' after the host, then as much
   of the path as some path_prefix test shares with it, and as much of the text as some
   prefix test shares with it. Nothing past that can change a host, host_suffix,
   path_prefix, prefix, exists or missing answer (a prefix test passes exactly when all of
   it is shared). -1: not an http(s)://host/... URL. */
static Py_ssize_t url_cut(const Field *f, PyObject *text) {
    const void *data = PyUnicode_DATA(text);
    int kind = PyUnicode_KIND(text);
    Py_ssize_t len = PyUnicode_GET_LENGTH(text);
    Py_ssize_t start;
    if (starts_with_ascii(data, kind, len, "https://"))
        start = 8;
    else if (starts_with_ascii(data, kind, len, "http://"))
        start = 7;
    else
        return -1;
    Py_ssize_t end = find_char(data, kind, len, start, '/');
    if (end < 0) return -1;
    Py_ssize_t keep = 1;
    for (Py_ssize_t i = 0; i < f->n_path_prefixes; i++) {
        Py_ssize_t n = common_prefix(data, kind, len, end, f->path_prefixes[i]);
        if (n > keep) keep = n;
    }
    Py_ssize_t cut = end + keep;
    for (Py_ssize_t i = 0; i < f->n_text_prefixes; i++) {
        Py_ssize_t n = common_prefix(data, kind, len, 0, f->text_prefixes[i]);
        if (n > cut) cut = n;
    }
    return cut < len ? cut : len;
}

#define MAX_ELEMENTS 64

typedef struct {
    PyObject *raw;          /* held by match_branch (fillers run Python); NULL: missing */
    int is_list;
    Py_ssize_t n;           /* elements (1 for a text) */
    uint32_t ids[MAX_ELEMENTS];
    Py_ssize_t cut;         /* URL fields: characters kept of the text */
    uint32_t chain;         /* the list's (or text's) key id; 0 while not computed */
} Value;

/* 1: ok; 0: not for the table (fall back); -1: error. */
static int value_ids(Matcher *m, const Field *f, PyObject *raw, Value *v) {
    v->raw = raw;
    v->chain = ID_NONE;
    v->cut = -1;
    v->is_list = 0;
    v->n = 0;
    if (raw == NULL) return 1;
    if (PyUnicode_CheckExact(raw)) {
        Py_ssize_t len = PyUnicode_GET_LENGTH(raw);
        if (f->url) {
            len = url_cut(f, raw);
            if (len < 0) return 0;
            v->cut = len;
        }
        int kind = PyUnicode_KIND(raw);
        if ((size_t)len * kind > UINT32_MAX) return 0; /* a slot's nbytes is 32 bits */
        uint32_t id = text_id(m, PyUnicode_DATA(raw), (size_t)len * kind, kind, 1);
        if (id == (uint32_t)-1) return -1;
        v->ids[0] = id;
        v->n = 1;
        v->chain = id;
        return 1;
    }
    if (!PyList_CheckExact(raw) || f->url) return 0;
    Py_ssize_t n = PyList_GET_SIZE(raw);
    if (n > MAX_ELEMENTS) return 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyList_GET_ITEM(raw, i);
        if (!PyUnicode_CheckExact(item)) return 0;
        int kind = PyUnicode_KIND(item);
        if ((size_t)PyUnicode_GET_LENGTH(item) * kind > UINT32_MAX) return 0;
        uint32_t id = text_id(m, PyUnicode_DATA(item),
                              (size_t)PyUnicode_GET_LENGTH(item) * kind, kind, 1);
        if (id == (uint32_t)-1) return -1;
        v->ids[i] = id;
    }
    v->is_list = 1;
    v->n = n;
    if (f->need_chain) {
        uint32_t chain = ID_LIST;
        for (Py_ssize_t i = 0; i < n; i++) {
            chain = cons_id(m, chain, v->ids[i], 1);
            if (chain == (uint32_t)-1) return -1;
        }
        v->chain = chain;
    }
    return 1;
}

/* ---- the answer ---------------------------------------------------------------------- */

typedef struct {
    PyObject **items;
    Py_ssize_t n, cap;
    PyObject *stack[64];
} Out;

static int out_push(Out *o, PyObject *item) {
    if (o->n == o->cap) {
        Py_ssize_t cap = o->cap * 2;
        PyObject **grown;
        if (o->items == o->stack) {
            grown = PyMem_Malloc(cap * sizeof(PyObject *));
            if (grown) memcpy(grown, o->stack, o->n * sizeof(PyObject *));
        } else {
            grown = PyMem_Realloc(o->items, cap * sizeof(PyObject *));
        }
        if (!grown) {
            PyErr_NoMemory();
            return -1;
        }
        o->items = grown;
        o->cap = cap;
    }
    o->items[o->n++] = item;
    return 0;
}

static int out_extend(Out *o, PyObject *answer, int dedup) {
    Py_ssize_t n = PyTuple_GET_SIZE(answer);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PyTuple_GET_ITEM(answer, i);
        if (dedup) {
            int seen = 0;
            for (Py_ssize_t j = 0; j < o->n; j++) {
                if (o->items[j] == item) {
                    seen = 1;
                    break;
                }
            }
            if (seen) continue;
        }
        if (out_push(o, item) < 0) return -1;
    }
    return 0;
}

/* The stored answer of `key`, or the group's filler's (called with `arg`) stored now.
   Borrowed (kept by m->answers until the next reset, never during an event). */
static PyObject *answer_or_fill(Matcher *m, uint32_t key, PyObject *fill, PyObject *arg) {
    PyObject *answer = answer_of(m, key);
    if (answer) return answer;
    m->fills++;
    PyObject *made = PyObject_CallOneArg(fill, arg);
    if (!made) return NULL;
    if (!PyTuple_CheckExact(made)) {
        Py_DECREF(made);
        PyErr_SetString(PyExc_TypeError, "a group's filler must return a tuple");
        return NULL;
    }
    int failed = store_answer(m, key, made);
    Py_DECREF(made);
    return failed ? NULL : m->answers[key];
}

/* Element i of a value, for an elementwise filler. A filler that ran before (Python) may
   have changed the list in the event: its element i must still be the text whose id keyed
   the look-up, or the answer stored would be another text's (or the read past its end). */
static PyObject *element_object(Matcher *m, const Value *v, Py_ssize_t i) {
    if (v->is_list) {
        if (i < PyList_GET_SIZE(v->raw)) {
            PyObject *item = PyList_GET_ITEM(v->raw, i);
            if (PyUnicode_CheckExact(item)) {
                int kind = PyUnicode_KIND(item);
                size_t nbytes = (size_t)PyUnicode_GET_LENGTH(item) * kind;
                if (text_id(m, PyUnicode_DATA(item), nbytes, kind, 0) == v->ids[i]) {
                    Py_INCREF(item);
                    return item;
                }
            }
        }
        PyErr_SetString(PyExc_RuntimeError, "the event changed while it was matched");
        return NULL;
    }
    if (v->cut >= 0) return PyUnicode_Substring(v->raw, 0, v->cut);
    Py_INCREF(v->raw);
    return v->raw;
}

static PyObject *match_branch(Matcher *m, const Branch *b, PyObject *event) {
    Value values_stack[8];
    Value *values = values_stack;
    PyObject *result = NULL;
    Out out;
    out.items = out.stack;
    out.n = 0;
    out.cap = 64;
    if (b->n_fields > 8) {
        values = PyMem_Malloc(b->n_fields * sizeof(Value));
        if (!values) return PyErr_NoMemory();
    }
    Py_ssize_t held = 0; /* values[:held].raw are strong references */
    for (Py_ssize_t i = 0; i < b->n_fields; i++) {
        PyObject *raw;
        if (read_field(event, &b->fields[i], m->walk, &raw) < 0) goto done;
        /* Borrowed from the event, which fillers (Python) could change: held until done. */
        Py_XINCREF(raw);
        values[i].raw = raw;
        held++;
        int ok = value_ids(m, &b->fields[i], raw, &values[i]);
        if (ok < 0) goto done;
        if (ok == 0) {
            m->fallbacks++;
            result = PyObject_CallOneArg(m->fallback, event);
            goto done;
        }
    }
    if (out_extend(&out, b->always, 0) < 0) goto done;
    for (Py_ssize_t g = 0; g < b->n_groups; g++) {
        const Group *grp = &b->groups[g];
        if (grp->elementwise) {
            const Value *v = &values[grp->fields[0]];
            for (Py_ssize_t i = 0; i < v->n; i++) {
                uint32_t key = cons_id(m, grp->base_id, v->ids[i], 1);
                if (key == (uint32_t)-1) goto done;
                PyObject *answer = answer_of(m, key);
                if (!answer) {
                    PyObject *element = element_object(m, v, i);
                    if (!element) goto done;
                    answer = answer_or_fill(m, key, grp->fill, element);
                    Py_DECREF(element);
                    if (!answer) goto done;
                }
                if (out_extend(&out, answer, v->n > 1) < 0) goto done;
            }
            continue;
        }
        uint32_t key = grp->base_id;
        for (Py_ssize_t i = 0; i < grp->n_fields; i++) {
            key = cons_id(m, key, values[grp->fields[i]].chain, 1);
            if (key == (uint32_t)-1) goto done;
        }
        PyObject *answer = answer_or_fill(m, key, grp->fill, event);
        if (!answer) goto done;
        if (out_extend(&out, answer, 0) < 0) goto done;
    }
    m->hits++;
    result = PyTuple_New(out.n);
    if (result) {
        for (Py_ssize_t i = 0; i < out.n; i++) {
            Py_INCREF(out.items[i]);
            PyTuple_SET_ITEM(result, i, out.items[i]);
        }
    }
done:
    for (Py_ssize_t i = 0; i < held; i++) Py_XDECREF(values[i].raw);
    if (out.items != out.stack) PyMem_Free(out.items);
    if (values != values_stack) PyMem_Free(values);
    return result;
}

static PyObject *Matcher_vectorcall(PyObject *self, PyObject *const *args, size_t nargsf,
                                    PyObject *kwnames) {
    Matcher *m = (Matcher *)self;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "match(event) takes one argument");
        return NULL;
    }
    PyObject *event = args[0];
    if (m->busy || !PyDict_Check(event)) {
        m->fallbacks++;
        return PyObject_CallOneArg(m->fallback, event);
    }
    Py_ssize_t branch = m->default_branch;
    PyObject *kind = PyDict_GetItemWithError(event, m->type_key);
    if (kind && kind != Py_None) {
        if (!PyUnicode_CheckExact(kind)) {
            m->fallbacks++;
            return PyObject_CallOneArg(m->fallback, event);
        }
        PyObject *n = PyDict_GetItemWithError(m->branch_of, kind);
        if (n) {
            branch = PyLong_AsSsize_t(n);
        } else if (PyErr_Occurred()) {
            return NULL;
        }
    } else if (PyErr_Occurred()) {
        return NULL;
    }
    if (m->next_id >= m->limit) {
        m->clears++;
        if (matcher_reset(m) < 0) return NULL;
    }
    m->busy = 1;
    PyObject *result = match_branch(m, &m->branches[branch], event);
    m->busy = 0;
    return result;
}

/* ---- construction -------------------------------------------------------------------- */

static int fill_strs(PyObject *seq, PyObject ***out, Py_ssize_t *n) {
    *n = PyTuple_GET_SIZE(seq);
    *out = PyMem_Calloc(*n ? *n : 1, sizeof(PyObject *));
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        PyObject *s = PyTuple_GET_ITEM(seq, i);
        if (!PyUnicode_CheckExact(s)) {
            PyErr_SetString(PyExc_TypeError, "expected a tuple of str");
            return -1;
        }
        (*out)[i] = s;
    }
    return 0;
}

/* spec: tuple of branches; branch = (fields, groups, always);
   field = (path: tuple[str], url: bool, path_prefixes: tuple[str], text_prefixes: tuple[str]);
   group = (field indices: tuple[int], elementwise: bool, fill). All tuples. */
static int parse_branch(Matcher *m, PyObject *spec, Branch *b) {
    PyObject *fields, *groups, *always;
    if (!PyArg_ParseTuple(spec, "O!O!O!", &PyTuple_Type, &fields, &PyTuple_Type, &groups,
                          &PyTuple_Type, &always))
        return -1;
    b->always = always;
    b->n_fields = PyTuple_GET_SIZE(fields);
    b->fields = PyMem_Calloc(b->n_fields ? b->n_fields : 1, sizeof(Field));
    b->n_groups = PyTuple_GET_SIZE(groups);
    b->groups = PyMem_Calloc(b->n_groups ? b->n_groups : 1, sizeof(Group));
    if (!b->fields || !b->groups) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < b->n_fields; i++) {
        Field *f = &b->fields[i];
        PyObject *path, *paths, *texts;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, i), "O!pO!O!", &PyTuple_Type, &path,
                              &f->url, &PyTuple_Type, &paths, &PyTuple_Type, &texts))
            return -1;
        if (fill_strs(path, &f->keys, &f->depth) < 0) return -1;
        if (f->depth < 1) {
            PyErr_SetString(PyExc_ValueError, "a field path has a key at least");
            return -1;
        }
        /* Any depth: rules may name attrs.<a>.<b>... as deep as they like. */
        if (f->depth > m->max_depth) m->max_depth = f->depth;
        if (i > 0) {
            const Field *prev = &b->fields[i - 1];
            while (f->shared < f->depth - 1 && f->shared < prev->depth &&
                   prev->keys[f->shared] == f->keys[f->shared])
                f->shared++;
        }
        if (fill_strs(paths, &f->path_prefixes, &f->n_path_prefixes) < 0) return -1;
        if (fill_strs(texts, &f->text_prefixes, &f->n_text_prefixes) < 0) return -1;
    }
    for (Py_ssize_t g = 0; g < b->n_groups; g++) {
        Group *grp = &b->groups[g];
        PyObject *indices;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(groups, g), "O!pO", &PyTuple_Type, &indices,
                              &grp->elementwise, &grp->fill))
            return -1;
        grp->n_fields = PyTuple_GET_SIZE(indices);
        grp->fields = PyMem_Calloc(grp->n_fields ? grp->n_fields : 1, sizeof(Py_ssize_t));
        if (!grp->fields) {
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < grp->n_fields; i++) {
            Py_ssize_t k = PyLong_AsSsize_t(PyTuple_GET_ITEM(indices, i));
            if (k < 0 || k >= b->n_fields) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad field index");
                return -1;
            }
            grp->fields[i] = k;
            if (!grp->elementwise) b->fields[k].need_chain = 1;
        }
        if (grp->elementwise && grp->n_fields != 1) {
            PyErr_SetString(PyExc_ValueError, "an elementwise group reads one field");
            return -1;
        }
        grp->base_id = FIRST_GROUP_ID + m->n_group_ids++;
    }
    return 0;
}

static void free_branches(Matcher *m) {
    if (!m->branches) return;
    for (Py_ssize_t i = 0; i < m->n_branches; i++) {
        Branch *b = &m->branches[i];
        if (b->fields) {
            for (Py_ssize_t j = 0; j < b->n_fields; j++) {
                PyMem_Free(b->fields[j].keys);
                PyMem_Free(b->fields[j].path_prefixes);
                PyMem_Free(b->fields[j].text_prefixes);
            }
        }
        if (b->groups) {
            for (Py_ssize_t j = 0; j < b->n_groups; j++) PyMem_Free(b->groups[j].fields);
        }
        PyMem_Free(b->fields);
        PyMem_Free(b->groups);
    }
    PyMem_Free(m->branches);
    m->branches = NULL;
}

static int Matcher_init(PyObject *self, PyObject *args, PyObject *kwargs) {
    Matcher *m = (Matcher *)self;
    static char *kwlist[] = {"branches", "branch_of", "default_branch", "fallback", "limit",
                             NULL};
    PyObject *branches, *branch_of, *fallback;
    Py_ssize_t default_branch;
    Py_ssize_t limit = 1 << 20;
    if (m->spec) {
        PyErr_SetString(PyExc_RuntimeError, "Matcher is initialised once");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!nO|n", kwlist, &PyTuple_Type,
                                     &branches, &PyDict_Type, &branch_of, &default_branch,
                                     &fallback, &limit))
        return -1;
    m->n_branches = PyTuple_GET_SIZE(branches);
    if (default_branch < 0 || default_branch >= m->n_branches) {
        PyErr_SetString(PyExc_ValueError, "default_branch out of range");
        return -1;
    }
    /* Ids are 32 bits and an event may add some past the limit: far below 2**32. */
    if (limit < 0 || limit > (Py_ssize_t)1 << 31) {
        PyErr_SetString(PyExc_ValueError, "limit is 0 to 2**31");
        return -1;
    }
    /* The branches tuple itself, not `args`: given by keyword, it is not in `args`. */
    m->spec = Py_NewRef(branches);
    /* A copy: the caller's dict could change after the branch numbers are checked. */
    m->branch_of = PyDict_Copy(branch_of);
    if (!m->branch_of) return -1;
    m->fallback = Py_NewRef(fallback);
    m->default_branch = default_branch;
    m->limit = (uint32_t)limit;
    m->type_key = PyUnicode_InternFromString("type");
    if (!m->type_key) return -1;
    m->branches = PyMem_Calloc(m->n_branches ? m->n_branches : 1, sizeof(Branch));
    if (!m->branches) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < m->n_branches; i++) {
        if (parse_branch(m, PyTuple_GET_ITEM(branches, i), &m->branches[i]) < 0) return -1;
    }
    m->walk = PyMem_Calloc(m->max_depth + 1, sizeof(PyObject *));
    if (!m->walk) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(m->branch_of, &pos, &key, &value)) {
        Py_ssize_t n = PyLong_AsSsize_t(value);
        if (!PyUnicode_CheckExact(key) || n < 0 || n >= m->n_branches) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad branch_of entry");
            return -1;
        }
    }
    if (matcher_reset(m) < 0) return -1;
    /* Callable only now: a failed __init__ leaves an object without tables, which then
       raises TypeError when called (PyVectorcall_Call) instead of reading them. */
    m->vectorcall = Matcher_vectorcall;
    return 0;
}

static int Matcher_traverse(PyObject *self, visitproc visit, void *arg) {
    Matcher *m = (Matcher *)self;
    Py_VISIT(m->spec);
    Py_VISIT(m->branch_of);
    Py_VISIT(m->fallback);
    if (m->answers) {
        for (size_t i = 0; i < m->answers_size; i++) Py_VISIT(m->answers[i]);
    }
    return 0;
}

static int Matcher_clear(PyObject *self) {
    Matcher *m = (Matcher *)self;
    m->vectorcall = NULL; /* its fallback and fillers are gone: not callable any more */
    drop_answers(m);
    Py_CLEAR(m->spec);
    Py_CLEAR(m->branch_of);
    Py_CLEAR(m->fallback);
    return 0;
}

static void Matcher_dealloc(PyObject *self) {
    Matcher *m = (Matcher *)self;
    PyObject_GC_UnTrack(self);
    Matcher_clear(self);
    Py_CLEAR(m->type_key);
    free_branches(m);
    text_free(&m->texts);
    PyMem_Free(m->cons.slots);
    PyMem_Free(m->answers);
    PyMem_Free(m->walk);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *Matcher_stats(PyObject *self, PyObject *unused) {
    Matcher *m = (Matcher *)self;
    return Py_BuildValue("{sKsKsKsKsIsnsK}", "hits", m->hits, "fills", m->fills, "fallbacks",
                         m->fallbacks, "clears", m->clears, "ids", m->next_id, "texts",
                         (Py_ssize_t)m->texts.used, "probes", m->probes);
}

static PyMethodDef Matcher_methods[] = {
    {"stats", Matcher_stats, METH_NOARGS,
     "Counters: hits, fills, fallbacks, clears, ids, texts, probes."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MatcherType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "segment_rules._fastmatch.Matcher",
    .tp_basicsize = sizeof(Matcher),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Matcher, vectorcall),
    .tp_doc = "match(event) -> tuple of test ids, from remembered group answers.",
    .tp_new = PyType_GenericNew,
    .tp_init = Matcher_init,
    .tp_call = PyVectorcall_Call,
    .tp_traverse = Matcher_traverse,
    .tp_clear = Matcher_clear,
    .tp_dealloc = Matcher_dealloc,
    .tp_methods = Matcher_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "segment_rules._fastmatch",
    "The all-hits path of rule matching (see segment_rules/fast_match.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastmatch(void) {
    if (PyType_Ready(&MatcherType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (!mod) return NULL;
    if (PyModule_AddObjectRef(mod, "Matcher", (PyObject *)&MatcherType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
