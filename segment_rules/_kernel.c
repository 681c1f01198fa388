/*
 * segment_rules._kernel: a cookie history's per-event and per-cookie rule work, in C.
 *
 * CompiledRules (segment_rules/compiler.py) holds a cookie's history as a dict of trait id
 * -> list, and with 1,000 segments ingest spent a third of its time in three Python loops
 * over it (docs/decisions/0015):
 *   - record: add an event's time to the "times" trait of every test it passed (and drop
 *     what no rule can still use), and its points to every decaying score. The other kinds
 *     of trait (sums, first seen, sequences: 3 % of events in the load test) stay in
 *     Python: the call says whether the event fed one.
 *   - prune: drop entries older than their trait keeps them, and traits no rule uses.
 *   - evaluate: the active base segments a history holds at a time, and the earliest time
 *     that can change with no new event. Every leaf but sums and averages (whose math.fsum
 *     stays in Python: its closure is called with the same (history, now, change times)
 *     arguments as in compiler.py), and/or/not and segment TTLs run here.
 * Each does exactly what the Python in compiler.py does, with the same lists changed in
 * place; the Python stays as the reference, and a property test holds the two equal.
 *
 * Times are compared as doubles: they are floats (or ints below 2**53) in every history.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <string.h>

enum { K_TIMES, K_VALUES, K_FIRST, K_DECAY, K_DONE };
enum { OP_ALL, OP_ANY, OP_NOT, OP_COUNT, OP_PY, OP_TTL, OP_LAPSED, OP_FIRST, OP_DONE, OP_DECAYED, OP_WINDOWED };

typedef struct {
    PyObject *id; /* the trait id: the history's key */
    int kind;
    Py_ssize_t keep;
    double keep_for;
    Py_ssize_t *checks; /* the checks (active base segments) reading this trait */
    Py_ssize_t nchecks;
} Trait;

typedef struct {
    Py_ssize_t trait; /* a times or decaying-score trait */
    double points, half_life; /* a decaying score's */
    PyObject *points_obj; /* stored as given in a new score state, as the Python does */
} Update;

typedef struct {
    Update *updates; /* the times and decaying-score traits this test feeds, in order */
    Py_ssize_t nupdates;
    int other; /* feeds some trait of another kind too */
} Test;

typedef struct {
    int op;
    Py_ssize_t n;      /* children (all, any, not) or traits (ttl, windowed score) */
    Py_ssize_t *items; /* child node indices, or trait indices */
    double *weights;   /* windowed score: each trait's points */
    Py_ssize_t trait;  /* count, lapsed, first seen, sequence, decaying score */
    long at_least;     /* count */
    long at_most;      /* count; < 0: no upper bound */
    double span;       /* count, sequence: the window; ttl: the TTL; lapsed: within;
                        * first seen: within; scores: the window or the half-life */
    double memory;     /* lapsed: the lookback; first seen, decaying score: the memory */
    double least;      /* scores: at least this many points */
    PyObject *call;    /* py: the leaf's closure */
} Node;

typedef struct {
    PyObject *id;
    Py_ssize_t holds;
    Py_ssize_t ttl; /* -1: none */
} Check;

typedef struct {
    PyObject_HEAD
    Trait *traits;
    Py_ssize_t ntraits;
    PyObject *trait_of; /* dict: trait id -> index */
    Test *tests;
    Py_ssize_t ntests;
    PyObject *test_of; /* dict: test id -> index */
    Node *nodes;
    Py_ssize_t nnodes, capnodes;
    Check *checks;
    Py_ssize_t nchecks;
    unsigned char *marks; /* evaluate's candidates, one byte per check */
} Kernel;

/* -- helpers ---------------------------------------------------------------------------- */

static inline int as_time(PyObject *o, double *out) {
    if (PyFloat_Check(o)) {
        *out = PyFloat_AS_DOUBLE(o);
        return 0;
    }
    /* Only ints besides: anything else could run Python code (__float__) while a borrowed
     * list is being read. The Python refuses such entries too, by comparing them. */
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "a time must be a number, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    double v = PyLong_AsDouble(o);
    if (v == -1.0 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

/* An entry's time: the entry itself, or its first element when it is a list ([t, value]). */
static inline int entry_time(PyObject *o, double *out) {
    if (PyList_Check(o)) {
        if (PyList_GET_SIZE(o) == 0) {
            PyErr_SetString(PyExc_IndexError, "empty history entry");
            return -1;
        }
        o = PyList_GET_ITEM(o, 0);
    }
    return as_time(o, out);
}

/* bisect.bisect_right(list, bound, key=_time): entries whose time is <= bound. */
static Py_ssize_t bisect_right(PyObject *list, double bound, int keyed) {
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(list);
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        double t;
        PyObject *item = PyList_GET_ITEM(list, mid);
        if ((keyed ? entry_time(item, &t) : as_time(item, &t)) < 0) return -1;
        if (bound < t)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* compiler._cut / _cut_times: drop entries at or before ``bound``, and all but ``keep``. */
static int cut(PyObject *list, double bound, Py_ssize_t keep, int keyed) {
    Py_ssize_t n = PyList_GET_SIZE(list);
    Py_ssize_t drop = bisect_right(list, bound, keyed);
    if (drop < 0) return -1;
    if (n - keep > drop) drop = n - keep;
    if (drop > 0) return PyList_SetSlice(list, 0, drop, NULL);
    return 0;
}

static PyObject *history_list(PyObject *history, PyObject *key) {
    PyObject *state = PyDict_GetItemWithError(history, key);
    if (state != NULL && !PyList_Check(state)) {
        PyErr_Format(PyExc_TypeError, "history entry %R is not a list", key);
        return NULL;
    }
    return state; /* borrowed; NULL without an error when absent */
}

static int check_history(PyObject *history) {
    if (!PyDict_Check(history)) {
        PyErr_SetString(PyExc_TypeError, "history must be a dict");
        return -1;
    }
    return 0;
}

static int ready(Kernel *k) {
    if (k->trait_of == NULL || k->test_of == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "the kernel was not built (Kernel.__init__ failed?)");
        return 0;
    }
    return 1;
}

static int index_of(PyObject *map, PyObject *key, Py_ssize_t *out) {
    PyObject *found = PyDict_GetItemWithError(map, key);
    if (found == NULL) return PyErr_Occurred() ? -1 : 0;
    *out = PyLong_AsSsize_t(found);
    if (*out == -1 && PyErr_Occurred()) return -1;
    return 1;
}

/* -- record ----------------------------------------------------------------------------- */

/* compiler._add_points: a decaying score as [reference time, score at that time]. */
static int add_points(Trait *t, Update *u, PyObject *history, PyObject *ts_obj, double ts,
                      double now) {
    PyObject *state = history_list(history, t->id);
    if (state == NULL && PyErr_Occurred()) return -1;
    double ref = 0.0, score = 0.0;
    if (state != NULL) {
        if (PyList_GET_SIZE(state) == 0) {
            PyErr_SetString(PyExc_IndexError, "list index out of range");
            return -1;
        }
        if (as_time(PyList_GET_ITEM(state, 0), &ref) < 0) return -1;
    }
    if (state == NULL || ref <= now - t->keep_for) {
        PyObject *fresh = PyList_New(2);
        if (fresh == NULL) return -1;
        PyList_SET_ITEM(fresh, 0, Py_NewRef(ts_obj));
        PyList_SET_ITEM(fresh, 1, Py_NewRef(u->points_obj));
        int rc = PyDict_SetItem(history, t->id, fresh);
        Py_DECREF(fresh);
        return rc;
    }
    if (PyList_GET_SIZE(state) != 2) { /* the Python's "ref, score = state" */
        PyErr_SetString(PyExc_ValueError, "a score state is [time, score]");
        return -1;
    }
    if (as_time(PyList_GET_ITEM(state, 1), &score) < 0) return -1;
    if (ts >= ref) {
        PyObject *moved = PyFloat_FromDouble(score * exp2(-(ts - ref) / u->half_life) + u->points);
        if (moved == NULL) return -1;
        PyObject *pair = PyList_New(2);
        if (pair == NULL) {
            Py_DECREF(moved);
            return -1;
        }
        PyList_SET_ITEM(pair, 0, Py_NewRef(ts_obj));
        PyList_SET_ITEM(pair, 1, moved);
        int rc = PyDict_SetItem(history, t->id, pair);
        Py_DECREF(pair);
        return rc;
    }
    PyObject *added = PyFloat_FromDouble(score + u->points * exp2(-(ref - ts) / u->half_life));
    if (added == NULL) return -1;
    return PyList_SetItem(state, 1, added); /* steals the reference */
}

static int record_one(Trait *t, Update *u, PyObject *history, PyObject *ts_obj, double ts,
                      double now) {
    double bound = now - t->keep_for;
    if (ts <= bound) return 0; /* too late to count anywhere */
    if (t->kind == K_DECAY) return add_points(t, u, history, ts_obj, ts, now);
    PyObject *stamps = history_list(history, t->id);
    if (stamps == NULL && PyErr_Occurred()) return -1;
    if (stamps == NULL || PyList_GET_SIZE(stamps) == 0) {
        PyObject *fresh = PyList_New(1);
        if (fresh == NULL) return -1;
        Py_INCREF(ts_obj);
        PyList_SET_ITEM(fresh, 0, ts_obj);
        int rc = PyDict_SetItem(history, t->id, fresh);
        Py_DECREF(fresh);
        return rc;
    }
    Py_ssize_t n = PyList_GET_SIZE(stamps);
    double last;
    if (as_time(PyList_GET_ITEM(stamps, n - 1), &last) < 0) return -1;
    if (ts >= last) {
        if (PyList_Append(stamps, ts_obj) < 0) return -1;
    } else {
        Py_ssize_t at = bisect_right(stamps, ts, 0); /* bisect.insort: after equal times */
        if (at < 0 || PyList_Insert(stamps, at, ts_obj) < 0) return -1;
    }
    double first;
    if (as_time(PyList_GET_ITEM(stamps, 0), &first) < 0) return -1;
    if (first <= bound) return cut(stamps, bound, t->keep, 0);
    n = PyList_GET_SIZE(stamps);
    if (n > t->keep) return PyList_SetSlice(stamps, 0, n - t->keep, NULL);
    return 0;
}

static PyObject *Kernel_record(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Kernel *k = (Kernel *)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "record(history, ts, tests, now)");
        return NULL;
    }
    PyObject *history = args[0], *ts_obj = args[1];
    double ts, now;
    if (!ready(k) || check_history(history) < 0 || as_time(ts_obj, &ts) < 0 || as_time(args[3], &now) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[2], "tests must be a sequence");
    if (seq == NULL) return NULL;
    int other = 0;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t at;
        int found = index_of(k->test_of, items[i], &at);
        if (found < 0) goto fail;
        if (!found) continue;
        Test *test = &k->tests[at];
        other |= test->other;
        for (Py_ssize_t j = 0; j < test->nupdates; j++) {
            Update *u = &test->updates[j];
            if (record_one(&k->traits[u->trait], u, history, ts_obj, ts, now) < 0) goto fail;
        }
    }
    Py_DECREF(seq);
    return PyBool_FromLong(other);
fail:
    Py_DECREF(seq);
    return NULL;
}

/* -- prune ------------------------------------------------------------------------------ */

static PyObject *Kernel_prune(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Kernel *k = (Kernel *)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "prune(history, now)");
        return NULL;
    }
    PyObject *history = args[0];
    double now;
    if (!ready(k) || check_history(history) < 0 || as_time(args[1], &now) < 0) return NULL;
    PyObject *keys = PyDict_Keys(history); /* deleted from while walked */
    if (keys == NULL) return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(keys); i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        Py_ssize_t at;
        int found = index_of(k->trait_of, key, &at);
        if (found < 0) goto fail;
        if (!found) { /* no rule uses this state any more */
            if (PyDict_DelItem(history, key) < 0) goto fail;
            continue;
        }
        Trait *t = &k->traits[at];
        PyObject *state = history_list(history, key);
        if (state == NULL) {
            if (PyErr_Occurred()) goto fail;
            continue;
        }
        double bound = now - t->keep_for;
        Py_ssize_t n = PyList_GET_SIZE(state);
        if (t->kind == K_TIMES) {
            if (n) {
                double first;
                if (as_time(PyList_GET_ITEM(state, 0), &first) < 0) goto fail;
                if (n <= t->keep && first > bound) continue; /* the common case: nothing to drop */
            }
            if (cut(state, bound, t->keep, 0) < 0) goto fail;
        } else if (t->kind == K_VALUES) {
            if (cut(state, bound, t->keep, 1) < 0) goto fail;
        } else {
            int clear = n == 0;
            if (!clear) {
                double when;
                if (as_time(PyList_GET_ITEM(state, t->kind == K_FIRST ? n - 1 : 0), &when) < 0)
                    goto fail;
                clear = when <= bound;
            }
            if (clear && PyList_SetSlice(state, 0, n, NULL) < 0) goto fail;
        }
        if (PyList_GET_SIZE(state) == 0 && PyDict_DelItem(history, key) < 0) goto fail;
    }
    Py_DECREF(keys);
    Py_RETURN_NONE;
fail:
    Py_DECREF(keys);
    return NULL;
}

/* -- evaluate --------------------------------------------------------------------------- */

typedef struct {
    PyObject *history;
    PyObject *now_obj;
    double now;
    double next; /* earliest change time so far; INFINITY: none */
    PyObject *changes; /* for Python leaves, made on first use */
} Eval;

static inline void changes_at(Eval *e, double t) {
    if (t < e->next) e->next = t;
}

static int holds(Kernel *k, Py_ssize_t at, Eval *e);

/* compiler._count_within: the trait's times within ``span`` of now (-1: error); the count
 * can only drop when the oldest of them leaves the span. */
static Py_ssize_t count_within(Kernel *k, Py_ssize_t trait, double span, Eval *e) {
    PyObject *stamps = history_list(e->history, k->traits[trait].id);
    if (stamps == NULL) return PyErr_Occurred() ? -1 : 0;
    Py_ssize_t start = bisect_right(stamps, e->now - span, 0);
    if (start < 0) return -1;
    Py_ssize_t n = PyList_GET_SIZE(stamps) - start;
    if (n) {
        double oldest;
        if (as_time(PyList_GET_ITEM(stamps, start), &oldest) < 0) return -1;
        changes_at(e, oldest + span);
    }
    return n;
}

static int holds_count(Kernel *k, Node *node, Eval *e) {
    Py_ssize_t n = count_within(k, node->trait, node->span, e);
    if (n < 0) return -1;
    return node->at_least <= n && (node->at_most < 0 || n <= node->at_most);
}

static int holds_python(Node *node, Eval *e) {
    if (e->changes == NULL && (e->changes = PyList_New(0)) == NULL) return -1;
    PyObject *args[3] = {e->history, e->now_obj, e->changes};
    PyObject *result = PyObject_Vectorcall(node->call, args, 3, NULL);
    if (result == NULL) return -1;
    int ok = PyObject_IsTrue(result);
    Py_DECREF(result);
    if (ok < 0) return -1;
    Py_ssize_t n = PyList_GET_SIZE(e->changes);
    for (Py_ssize_t i = 0; i < n; i++) {
        double t;
        if (as_time(PyList_GET_ITEM(e->changes, i), &t) < 0) return -1;
        changes_at(e, t);
    }
    if (n && PyList_SetSlice(e->changes, 0, n, NULL) < 0) return -1;
    return ok;
}

/* compiler._ttl_check: the newest time of the segment's traits, plus its TTL, is ahead. */
static int holds_ttl(Kernel *k, Node *node, Eval *e) {
    int any = 0;
    double newest = 0.0;
    for (Py_ssize_t i = 0; i < node->n; i++) {
        Trait *t = &k->traits[node->items[i]];
        PyObject *state = history_list(e->history, t->id);
        if (state == NULL) {
            if (PyErr_Occurred()) return -1;
            continue;
        }
        Py_ssize_t n = PyList_GET_SIZE(state);
        if (n == 0) continue;
        double last;
        int rc;
        if (t->kind == K_FIRST) {
            if (n < 2) {
                PyErr_SetString(PyExc_IndexError, "first-seen state has no last time");
                return -1;
            }
            rc = as_time(PyList_GET_ITEM(state, 1), &last);
        } else if (t->kind == K_DECAY || t->kind == K_DONE) {
            rc = as_time(PyList_GET_ITEM(state, 0), &last);
        } else {
            rc = entry_time(PyList_GET_ITEM(state, n - 1), &last);
        }
        if (rc < 0) return -1;
        if (!any || last > newest) newest = last;
        any = 1;
    }
    if (!any || newest + node->span <= e->now) return 0;
    changes_at(e, newest + node->span);
    return 1;
}

/* The state of a leaf's trait: borrowed, NULL (no error) when absent or empty. */
static int leaf_state(Kernel *k, Node *node, Eval *e, PyObject **out) {
    PyObject *state = history_list(e->history, k->traits[node->trait].id);
    if (state == NULL && PyErr_Occurred()) return -1;
    *out = state != NULL && PyList_GET_SIZE(state) ? state : NULL;
    return 0;
}

static int item_time(PyObject *list, Py_ssize_t i, double *out) {
    if (i < 0) i += PyList_GET_SIZE(list);
    if (i < 0 || i >= PyList_GET_SIZE(list)) {
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        return -1;
    }
    return as_time(PyList_GET_ITEM(list, i), out);
}

/* compiler._lapsed: seen within the lookback, but not within ``within``. */
static int holds_lapsed(Kernel *k, Node *node, Eval *e) {
    PyObject *stamps;
    double last;
    if (leaf_state(k, node, e, &stamps) < 0) return -1;
    if (stamps == NULL) return 0;
    if (item_time(stamps, -1, &last) < 0) return -1;
    if (last > e->now - node->span) {
        changes_at(e, last + node->span); /* lapses then */
        return 0;
    }
    if (last > e->now - node->memory) {
        changes_at(e, last + node->memory); /* forgotten then */
        return 1;
    }
    return 0;
}

/* A time at state[i] within ``span`` of now holds, until it leaves the span. */
static int within_span(Eval *e, PyObject *state, Py_ssize_t i, double span) {
    double t;
    if (item_time(state, i, &t) < 0) return -1;
    if (!(t > e->now - span)) return 0; /* as the Python compares: NaN does not hold */
    changes_at(e, t + span);
    return 1;
}

/* compiler's first_seen: [first, last], forgotten ``memory`` after the last. */
static int holds_first(Kernel *k, Node *node, Eval *e) {
    PyObject *state;
    double last;
    if (leaf_state(k, node, e, &state) < 0) return -1;
    if (state == NULL) return 0;
    if (item_time(state, 1, &last) < 0) return -1;
    if (last <= e->now - node->memory) return 0;
    return within_span(e, state, 0, node->span);
}

/* compiler's sequence: the latest completion time, within the window. */
static int holds_done(Kernel *k, Node *node, Eval *e) {
    PyObject *state;
    if (leaf_state(k, node, e, &state) < 0) return -1;
    return state == NULL ? 0 : within_span(e, state, 0, node->span);
}

/* compiler._decayed_holds: compare times, not scores, so the crossing is exact. */
static int holds_decayed(Kernel *k, Node *node, Eval *e) {
    PyObject *state;
    double ref, score;
    if (leaf_state(k, node, e, &state) < 0) return -1;
    if (state == NULL) return 0;
    if (item_time(state, 0, &ref) < 0) return -1;
    if (ref <= e->now - node->memory) return 0;
    if (item_time(state, 1, &score) < 0) return -1;
    if (score <= 0) return 0;
    if (PyList_GET_SIZE(state) != 2) { /* the Python's "ref, score = state" */
        PyErr_SetString(PyExc_ValueError, "a score state is [time, score]");
        return -1;
    }
    double crossing = ref + node->span * log2(score / node->least);
    if (e->now < crossing) {
        double forgotten = ref + node->memory;
        changes_at(e, crossing < forgotten ? crossing : forgotten);
        return 1;
    }
    return 0;
}

/* compiler's windowed score: each test's points per event within the window. */
static int holds_windowed(Kernel *k, Node *node, Eval *e) {
    double total = 0.0;
    for (Py_ssize_t i = 0; i < node->n; i++) {
        Py_ssize_t count = count_within(k, node->items[i], node->span, e);
        if (count < 0) return -1;
        total += node->weights[i] * (double)count;
    }
    return total >= node->least;
}

static int holds(Kernel *k, Py_ssize_t at, Eval *e) {
    Node *node = &k->nodes[at];
    switch (node->op) {
    case OP_COUNT:
        return holds_count(k, node, e);
    case OP_PY:
        return holds_python(node, e);
    case OP_TTL:
        return holds_ttl(k, node, e);
    case OP_LAPSED:
        return holds_lapsed(k, node, e);
    case OP_FIRST:
        return holds_first(k, node, e);
    case OP_DONE:
        return holds_done(k, node, e);
    case OP_DECAYED:
        return holds_decayed(k, node, e);
    case OP_WINDOWED:
        return holds_windowed(k, node, e);
    case OP_NOT: {
        int r = holds(k, node->items[0], e);
        return r < 0 ? -1 : !r;
    }
    default: { /* all / any: every part runs, whatever the first ones said (change times) */
        int every = node->op == OP_ALL, result = every;
        for (Py_ssize_t i = 0; i < node->n; i++) {
            int r = holds(k, node->items[i], e);
            if (r < 0) return -1;
            result = every ? (result && r) : (result || r);
        }
        return result;
    }
    }
}

static PyObject *Kernel_evaluate(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    Kernel *k = (Kernel *)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "evaluate(history, now)");
        return NULL;
    }
    Eval e = {args[0], args[1], 0.0, INFINITY, NULL};
    if (!ready(k) || check_history(e.history) < 0 || as_time(e.now_obj, &e.now) < 0) return NULL;
    /* A rule never holds without its state: only segments reading a trait held are tried.
     * The marks are taken into this call's own list, in order, before any Python leaf can
     * run (and call evaluate again). */
    Py_ssize_t lo = k->nchecks, hi = 0, pos = 0, ncands = 0;
    PyObject *key, *value, *members = NULL, *next = NULL, *out = NULL;
    Py_ssize_t *cands = NULL;
    while (PyDict_Next(e.history, &pos, &key, &value)) {
        Py_ssize_t at;
        int found = index_of(k->trait_of, key, &at);
        if (found < 0) goto done;
        if (!found) continue;
        Trait *t = &k->traits[at];
        for (Py_ssize_t j = 0; j < t->nchecks; j++) {
            Py_ssize_t c = t->checks[j];
            k->marks[c] = 1;
            if (c < lo) lo = c;
            if (c >= hi) hi = c + 1;
        }
    }
    if (hi > lo) {
        cands = PyMem_Malloc((size_t)(hi - lo) * sizeof(Py_ssize_t));
        if (cands == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (Py_ssize_t c = lo; c < hi; c++)
        if (k->marks[c]) {
            k->marks[c] = 0;
            cands[ncands++] = c;
        }
    lo = hi = 0;
    members = PyList_New(0);
    if (members == NULL) goto done;
    for (Py_ssize_t i = 0; i < ncands; i++) {
        Check *check = &k->checks[cands[i]];
        int r = holds(k, check->holds, &e);
        if (r > 0 && check->ttl >= 0) r = holds(k, check->ttl, &e);
        if (r < 0 || (r && PyList_Append(members, check->id) < 0)) goto done;
    }
    /* INFINITY is "no change time": a change time can only be a time plus a duration. */
    next = e.next == INFINITY ? Py_NewRef(Py_None) : PyFloat_FromDouble(e.next);
    if (next != NULL) out = PyTuple_Pack(2, members, next);
done:
    for (Py_ssize_t c = lo; c < hi; c++) k->marks[c] = 0; /* after an error while marking */
    PyMem_Free(cands);
    Py_XDECREF(members);
    Py_XDECREF(next);
    Py_XDECREF(e.changes);
    return out;
}

/* -- building --------------------------------------------------------------------------- */

static int read_indices(PyObject *seq, Py_ssize_t limit, Py_ssize_t **out, Py_ssize_t *n) {
    PyObject *fast = PySequence_Fast(seq, "expected a sequence of indices");
    if (fast == NULL) return -1;
    *n = PySequence_Fast_GET_SIZE(fast);
    *out = PyMem_Calloc((size_t)(*n ? *n : 1), sizeof(Py_ssize_t));
    if (*out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        Py_ssize_t v = PyLong_AsSsize_t(PySequence_Fast_GET_ITEM(fast, i));
        if (v == -1 && PyErr_Occurred()) break;
        if (v < 0 || v >= limit) {
            PyErr_Format(PyExc_ValueError, "index %zd out of range 0..%zd", v, limit - 1);
            break;
        }
        (*out)[i] = v;
    }
    Py_DECREF(fast);
    return PyErr_Occurred() ? -1 : 0;
}

/* A node spec, as compiler.py writes it: (op, ...) tuples; returns the node's index. */
static Py_ssize_t add_node(Kernel *k, PyObject *spec) {
    int op;
    if (!PyTuple_Check(spec) || PyTuple_GET_SIZE(spec) < 2) {
        PyErr_SetString(PyExc_ValueError, "a node is a tuple (op, ...)");
        return -1;
    }
    op = (int)PyLong_AsLong(PyTuple_GET_ITEM(spec, 0));
    if (op == -1 && PyErr_Occurred()) return -1;
    Node node = {0};
    node.op = op;
    node.at_most = -1;
    Py_ssize_t size = PyTuple_GET_SIZE(spec);
    if (op == OP_ALL || op == OP_ANY || op == OP_NOT) {
        PyObject *parts = PyTuple_GET_ITEM(spec, 1);
        if (op == OP_NOT) parts = PyTuple_GetSlice(spec, 1, 2);
        else Py_INCREF(parts);
        if (parts == NULL) return -1;
        PyObject *fast = PySequence_Fast(parts, "a node's parts must be a sequence");
        Py_DECREF(parts);
        if (fast == NULL) return -1;
        node.n = PySequence_Fast_GET_SIZE(fast);
        node.items = PyMem_Calloc((size_t)(node.n ? node.n : 1), sizeof(Py_ssize_t));
        if (node.items == NULL) {
            Py_DECREF(fast);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < node.n; i++) {
            Py_ssize_t child = add_node(k, PySequence_Fast_GET_ITEM(fast, i));
            if (child < 0) {
                Py_DECREF(fast);
                PyMem_Free(node.items);
                return -1;
            }
            node.items[i] = child;
        }
        Py_DECREF(fast);
    } else if (op == OP_COUNT && size == 5) {
        node.trait = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 1));
        node.at_least = PyLong_AsLong(PyTuple_GET_ITEM(spec, 2));
        node.at_most = PyLong_AsLong(PyTuple_GET_ITEM(spec, 3));
        node.span = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 4));
        if (PyErr_Occurred()) return -1;
        if (node.trait < 0 || node.trait >= k->ntraits) {
            PyErr_SetString(PyExc_ValueError, "count node: trait index out of range");
            return -1;
        }
    } else if ((op == OP_LAPSED || op == OP_FIRST || op == OP_DECAYED || op == OP_DONE) &&
               size == (op == OP_DONE ? 3 : op == OP_DECAYED ? 5 : 4)) {
        /* (op, trait, span[, memory[, least]]) */
        node.trait = PyLong_AsSsize_t(PyTuple_GET_ITEM(spec, 1));
        if (PyErr_Occurred()) return -1;
        double *fields[] = {&node.span, &node.memory, &node.least};
        for (Py_ssize_t i = 2; i < size; i++) {
            *fields[i - 2] = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, i));
            if (PyErr_Occurred()) return -1;
        }
        if (node.trait < 0 || node.trait >= k->ntraits) {
            PyErr_SetString(PyExc_ValueError, "leaf node: trait index out of range");
            return -1;
        }
        if (op == OP_DECAYED && !(node.span > 0 && node.least > 0)) {
            PyErr_SetString(PyExc_ValueError, "decaying score: half-life and points must be > 0");
            return -1;
        }
    } else if (op == OP_WINDOWED && size == 5) {
        /* (op, (trait, ...), (points, ...), window, least) */
        Py_ssize_t nweights;
        PyObject *fast = PySequence_Fast(PyTuple_GET_ITEM(spec, 2), "points must be a sequence");
        if (fast == NULL) return -1;
        nweights = PySequence_Fast_GET_SIZE(fast);
        node.weights = PyMem_Calloc((size_t)(nweights ? nweights : 1), sizeof(double));
        if (node.weights == NULL) {
            Py_DECREF(fast);
            PyErr_NoMemory();
            return -1;
        }
        for (Py_ssize_t i = 0; i < nweights && !PyErr_Occurred(); i++)
            node.weights[i] = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(fast, i));
        Py_DECREF(fast);
        if (!PyErr_Occurred()) node.span = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 3));
        if (!PyErr_Occurred()) node.least = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 4));
        if (PyErr_Occurred() ||
            read_indices(PyTuple_GET_ITEM(spec, 1), k->ntraits, &node.items, &node.n) < 0) {
            PyMem_Free(node.weights);
            PyMem_Free(node.items);
            return -1;
        }
        if (node.n != nweights) {
            PyErr_SetString(PyExc_ValueError, "windowed score: one points value per trait");
            PyMem_Free(node.weights);
            PyMem_Free(node.items);
            return -1;
        }
    } else if (op == OP_PY && size == 2) {
        node.call = PyTuple_GET_ITEM(spec, 1);
        if (!PyCallable_Check(node.call)) {
            PyErr_SetString(PyExc_TypeError, "python node: not callable");
            return -1;
        }
        Py_INCREF(node.call);
    } else if (op == OP_TTL && size == 3) {
        if (read_indices(PyTuple_GET_ITEM(spec, 1), k->ntraits, &node.items, &node.n) < 0) {
            PyMem_Free(node.items);
            return -1;
        }
        node.span = PyFloat_AsDouble(PyTuple_GET_ITEM(spec, 2));
        if (PyErr_Occurred()) {
            PyMem_Free(node.items);
            return -1;
        }
    } else {
        PyErr_Format(PyExc_ValueError, "unknown node %R", spec);
        return -1;
    }
    if (k->nnodes == k->capnodes) {
        Py_ssize_t cap = k->capnodes ? k->capnodes * 2 : 64;
        Node *grown = PyMem_Realloc(k->nodes, (size_t)cap * sizeof(Node));
        if (grown == NULL) {
            PyMem_Free(node.items);
            PyMem_Free(node.weights);
            Py_XDECREF(node.call);
            PyErr_NoMemory();
            return -1;
        }
        k->nodes = grown;
        k->capnodes = cap;
    }
    k->nodes[k->nnodes] = node;
    return k->nnodes++;
}

static void kernel_free(Kernel *k) {
    for (Py_ssize_t i = 0; i < k->ntraits; i++) {
        Py_XDECREF(k->traits[i].id);
        PyMem_Free(k->traits[i].checks);
    }
    PyMem_Free(k->traits);
    k->traits = NULL;
    k->ntraits = 0;
    for (Py_ssize_t i = 0; i < k->ntests; i++) {
        for (Py_ssize_t j = 0; k->tests[i].updates && j < k->tests[i].nupdates; j++)
            Py_XDECREF(k->tests[i].updates[j].points_obj);
        PyMem_Free(k->tests[i].updates);
    }
    PyMem_Free(k->tests);
    k->tests = NULL;
    k->ntests = 0;
    for (Py_ssize_t i = 0; i < k->nnodes; i++) {
        PyMem_Free(k->nodes[i].items);
        PyMem_Free(k->nodes[i].weights);
        Py_XDECREF(k->nodes[i].call);
    }
    PyMem_Free(k->nodes);
    k->nodes = NULL;
    k->nnodes = k->capnodes = 0;
    for (Py_ssize_t i = 0; i < k->nchecks; i++) Py_XDECREF(k->checks[i].id);
    PyMem_Free(k->checks);
    k->checks = NULL;
    k->nchecks = 0;
    PyMem_Free(k->marks);
    k->marks = NULL;
    Py_CLEAR(k->trait_of);
    Py_CLEAR(k->test_of);
}

/*
 * Kernel(traits, tests, checks)
 *   traits: ((id, kind, keep, keep_for, (check index, ...)), ...)
 *   tests:  {test id: (((trait index, points, half-life), ...), feeds another kind)}: the
 *           times and decaying-score traits it feeds, in order (points and half-life for
 *           a score, zero for times)
 *   checks: ((segment id, holds node, ttl node or None), ...)
 */
static int Kernel_init(PyObject *self, PyObject *args, PyObject *kwargs) {
    Kernel *k = (Kernel *)self;
    PyObject *traits, *tests, *checks;
    static char *kwlist[] = {"traits", "tests", "checks", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!O!", kwlist, &PyTuple_Type, &traits,
                                     &PyDict_Type, &tests, &PyTuple_Type, &checks))
        return -1;
    kernel_free(k);
    Py_ssize_t ntraits = PyTuple_GET_SIZE(traits), nchecks = PyTuple_GET_SIZE(checks);
    k->traits = PyMem_Calloc((size_t)(ntraits ? ntraits : 1), sizeof(Trait));
    k->checks = PyMem_Calloc((size_t)(nchecks ? nchecks : 1), sizeof(Check));
    k->marks = PyMem_Calloc((size_t)(nchecks ? nchecks : 1), 1);
    k->tests = PyMem_Calloc((size_t)(PyDict_GET_SIZE(tests) + 1), sizeof(Test));
    k->trait_of = PyDict_New();
    k->test_of = PyDict_New();
    if (!k->traits || !k->checks || !k->marks || !k->tests || !k->trait_of || !k->test_of) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < ntraits; i++) {
        Trait *t = &k->traits[i];
        PyObject *spec = PyTuple_GET_ITEM(traits, i), *read;
        int kind;
        if (!PyArg_ParseTuple(spec, "UindO;a trait is (id, kind, keep, keep_for, checks)",
                              &t->id, &kind, &t->keep, &t->keep_for, &read))
            goto fail;
        Py_INCREF(t->id);
        k->ntraits = i + 1;
        if (kind < K_TIMES || kind > K_DONE) {
            PyErr_Format(PyExc_ValueError, "unknown trait kind %d", kind);
            goto fail;
        }
        t->kind = kind;
        if (read_indices(read, nchecks, &t->checks, &t->nchecks) < 0) goto fail;
        PyObject *at = PyLong_FromSsize_t(i);
        if (at == NULL || PyDict_SetItem(k->trait_of, t->id, at) < 0) {
            Py_XDECREF(at);
            goto fail;
        }
        Py_DECREF(at);
    }
    Py_ssize_t pos = 0, ntests = PyDict_GET_SIZE(tests);
    PyObject *test_id, *spec;
    while (PyDict_Next(tests, &pos, &test_id, &spec)) {
        if (k->ntests >= ntests) {
            PyErr_SetString(PyExc_RuntimeError, "tests changed while the kernel was built");
            goto fail;
        }
        Test *test = &k->tests[k->ntests];
        PyObject *updates;
        int other;
        if (!PyArg_ParseTuple(spec, "O!p;a test is ((update, ...), feeds another kind)",
                              &PyTuple_Type, &updates, &other))
            goto fail;
        k->ntests++;
        test->other = other;
        test->nupdates = PyTuple_GET_SIZE(updates);
        test->updates = PyMem_Calloc((size_t)(test->nupdates ? test->nupdates : 1), sizeof(Update));
        if (test->updates == NULL) {
            PyErr_NoMemory();
            goto fail;
        }
        for (Py_ssize_t j = 0; j < test->nupdates; j++) {
            Update *u = &test->updates[j];
            PyObject *points;
            if (!PyArg_ParseTuple(PyTuple_GET_ITEM(updates, j),
                                  "nOd;an update is (trait index, points, half-life)", &u->trait,
                                  &points, &u->half_life))
                goto fail;
            if (!PyFloat_Check(points) && !PyLong_Check(points)) {
                PyErr_SetString(PyExc_TypeError, "an update's points must be a number");
                goto fail;
            }
            u->points_obj = Py_NewRef(points);
            if (as_time(points, &u->points) < 0) goto fail;
            if (u->trait < 0 || u->trait >= ntraits) {
                PyErr_SetString(PyExc_ValueError, "update: trait index out of range");
                goto fail;
            }
            int kind = k->traits[u->trait].kind;
            if (kind != K_TIMES && (kind != K_DECAY || !(u->half_life > 0))) {
                PyErr_SetString(PyExc_ValueError,
                                "an update is of a times trait, or a score's with a half-life");
                goto fail;
            }
        }
        PyObject *at = PyLong_FromSsize_t(k->ntests - 1);
        if (at == NULL || PyDict_SetItem(k->test_of, test_id, at) < 0) {
            Py_XDECREF(at);
            goto fail;
        }
        Py_DECREF(at);
    }
    for (Py_ssize_t i = 0; i < nchecks; i++) {
        Check *c = &k->checks[i];
        PyObject *holds_spec, *ttl_spec;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(checks, i), "UOO;a check is (id, holds, ttl)",
                              &c->id, &holds_spec, &ttl_spec))
            goto fail;
        Py_INCREF(c->id);
        k->nchecks = i + 1;
        c->ttl = -1;
        if ((c->holds = add_node(k, holds_spec)) < 0) goto fail;
        if (ttl_spec != Py_None && (c->ttl = add_node(k, ttl_spec)) < 0) goto fail;
    }
    k->nchecks = nchecks;
    return 0;
fail:
    kernel_free(k);
    return -1;
}

static int Kernel_traverse(PyObject *self, visitproc visit, void *arg) {
    Kernel *k = (Kernel *)self;
    for (Py_ssize_t i = 0; i < k->nnodes; i++) Py_VISIT(k->nodes[i].call);
    return 0;
}

static int Kernel_clear(PyObject *self) {
    Kernel *k = (Kernel *)self;
    for (Py_ssize_t i = 0; i < k->nnodes; i++) Py_CLEAR(k->nodes[i].call);
    return 0;
}

static void Kernel_dealloc(PyObject *self) {
    PyObject_GC_UnTrack(self);
    kernel_free((Kernel *)self);
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef Kernel_methods[] = {
    {"record", (PyCFunction)(void (*)(void))Kernel_record, METH_FASTCALL,
     "record(history, ts, tests, now) -> whether a test fed a trait of another kind"},
    {"prune", (PyCFunction)(void (*)(void))Kernel_prune, METH_FASTCALL,
     "prune(history, now): drop what no rule can still use"},
    {"evaluate", (PyCFunction)(void (*)(void))Kernel_evaluate, METH_FASTCALL,
     "evaluate(history, now) -> (active base segment ids held, next change time or None)"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject KernelType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "segment_rules._kernel.Kernel",
    .tp_basicsize = sizeof(Kernel),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A rule set's record, prune and evaluate over a cookie history (compiler.py).",
    .tp_new = PyType_GenericNew,
    .tp_init = Kernel_init,
    .tp_traverse = Kernel_traverse,
    .tp_clear = Kernel_clear,
    .tp_dealloc = Kernel_dealloc,
    .tp_methods = Kernel_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "segment_rules._kernel",
    "A cookie history's record, prune and evaluate in C (segment_rules/compiler.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__kernel(void) {
    if (PyType_Ready(&KernelType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    if (PyModule_AddObjectRef(mod, "Kernel", (PyObject *)&KernelType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
