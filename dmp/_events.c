/*
 * dmp._events: the valid event's path of dmp/events.py's decode_event, in C.
 *
 * usable(event, key, latest, types) says whether a decoded event passes every check of
 * event format v1 exactly as decode_event's Python would, and then stores its ts as a
 * float, as the Python does. It only ever says yes or no: on "no" (or anything unusual)
 * the Python checks run and name what is wrong, so the reasons stay in one place. With
 * 1,000 segments the Python checks were a tenth of ingest's time (docs/decisions/0015).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#define MAX_UID_LENGTH 128
#define MAX_CATEGORIES 64
#define MIN_TS 946684800.0
#define MAX_TS 4102444800.0

/* The field names, as interned str made once: PyDict_GetItemString would make and hash a
 * new str per look-up, which cost more than all the checks together. */
enum { F_UID, F_TS, F_TYPE, F_URL, F_CATEGORIES, F_GEO, F_ATTRS, F_GEO_FIRST };
static const char *NAMES[] = {"uid", "ts", "type", "url", "categories", "geo", "attrs",
                              "country", "region", "metro", "city", "zip"};
#define N_NAMES (sizeof NAMES / sizeof *NAMES)

typedef struct {
    PyObject *names[N_NAMES];
} State;

static inline State *state_of(PyObject *module) { return (State *)PyModule_GetState(module); }

/* event.get(name): borrowed, NULL when absent or null (JSON null is "absent" in v1). */
static inline PyObject *field(PyObject *event, PyObject *name) {
    PyObject *value = PyDict_GetItemWithError(event, name);
    if (value == NULL) PyErr_Clear(); /* str keys: a failure is only "absent" */
    return value == Py_None ? NULL : value;
}

static int uid_ok(State *st, PyObject *event, PyObject *key) {
    PyObject *uid = field(event, st->names[F_UID]);
    if (uid == NULL || !PyUnicode_Check(uid) || key == Py_None || !PyBytes_Check(key)) return 0;
    Py_ssize_t length = PyUnicode_GET_LENGTH(uid);
    if (length == 0 || length > MAX_UID_LENGTH) return 0;
    Py_ssize_t size;
    const char *utf8 = PyUnicode_AsUTF8AndSize(uid, &size);
    if (utf8 == NULL) { /* not encodable: the Python path decides what that is */
        PyErr_Clear();
        return 0;
    }
    return size == PyBytes_GET_SIZE(key) && memcmp(utf8, PyBytes_AS_STRING(key), size) == 0;
}

/* A number (not true/false) in the plausible range and not too far ahead: its value. */
static int ts_ok(State *st, PyObject *event, double latest, double *out) {
    PyObject *ts = field(event, st->names[F_TS]);
    if (ts == NULL) return 0;
    double value;
    if (PyFloat_Check(ts)) {
        value = PyFloat_AS_DOUBLE(ts);
    } else if (PyLong_Check(ts) && !PyBool_Check(ts)) {
        int overflow;
        long long whole = PyLong_AsLongLongAndOverflow(ts, &overflow);
        if (overflow || (whole == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return 0;
        }
        /* Exact below 2**53, which is all the range admits. */
        if (whole < (long long)MIN_TS || whole > (long long)MAX_TS) return 0;
        value = (double)whole;
    } else {
        return 0;
    }
    if (!(MIN_TS <= value && value <= MAX_TS && value <= latest)) return 0; /* NaN too */
    *out = value;
    return 1;
}

static int optional_str(PyObject *value) { return value == NULL || PyUnicode_Check(value); }

static PyObject *usable(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    State *st = state_of(module);
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "usable(event, key, latest, types)");
        return NULL;
    }
    PyObject *event = args[0], *key = args[1], *types = args[3];
    double latest = PyFloat_AsDouble(args[2]);
    if (latest == -1.0 && PyErr_Occurred()) return NULL;
    if (!PyAnySet_Check(types)) {
        PyErr_SetString(PyExc_TypeError, "types must be a set or frozenset");
        return NULL;
    }
    if (!PyDict_Check(event) || !uid_ok(st, event, key)) Py_RETURN_FALSE;
    double ts;
    if (!ts_ok(st, event, latest, &ts)) Py_RETURN_FALSE;
    PyObject *kind = field(event, st->names[F_TYPE]);
    if (kind == NULL || !PyUnicode_Check(kind)) Py_RETURN_FALSE;
    int known = PySet_Contains(types, kind);
    if (known < 0) return NULL;
    if (!known) Py_RETURN_FALSE;
    PyObject *url = field(event, st->names[F_URL]);
    if (!optional_str(url)) Py_RETURN_FALSE;
    PyObject *categories = field(event, st->names[F_CATEGORIES]);
    if (categories != NULL) {
        if (!PyList_Check(categories) || PyList_GET_SIZE(categories) > MAX_CATEGORIES)
            Py_RETURN_FALSE;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(categories); i++)
            if (!PyUnicode_Check(PyList_GET_ITEM(categories, i))) Py_RETURN_FALSE;
    }
    PyObject *geo = field(event, st->names[F_GEO]);
    if (geo != NULL) {
        if (!PyDict_Check(geo)) Py_RETURN_FALSE;
        for (size_t i = F_GEO_FIRST; i < N_NAMES; i++)
            if (!optional_str(field(geo, st->names[i]))) Py_RETURN_FALSE;
    }
    PyObject *attrs = field(event, st->names[F_ATTRS]);
    if (attrs != NULL && !PyDict_Check(attrs)) Py_RETURN_FALSE;
    if (!PyFloat_CheckExact(field(event, st->names[F_TS]))) { /* the Python stores float(ts) */
        PyObject *as_float = PyFloat_FromDouble(ts);
        if (as_float == NULL) return NULL;
        int rc = PyDict_SetItem(event, st->names[F_TS], as_float);
        Py_DECREF(as_float);
        if (rc < 0) return NULL;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef methods[] = {
    {"usable", (PyCFunction)(void (*)(void))usable, METH_FASTCALL,
     "usable(event, key, latest, types) -> whether decode_event's checks all pass (then ts is "
     "stored as a float)"},
    {NULL, NULL, 0, NULL},
};

static int module_traverse(PyObject *module, visitproc visit, void *arg) {
    State *st = state_of(module);
    for (size_t i = 0; st != NULL && i < N_NAMES; i++) Py_VISIT(st->names[i]);
    return 0;
}

static int module_clear(PyObject *module) {
    State *st = state_of(module);
    for (size_t i = 0; st != NULL && i < N_NAMES; i++) Py_CLEAR(st->names[i]);
    return 0;
}

static void module_free(void *module) { module_clear((PyObject *)module); }

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dmp._events",
    "The valid event's path of dmp/events.py's decode_event, in C.", sizeof(State), methods,
    NULL, module_traverse, module_clear, module_free,
};

PyMODINIT_FUNC PyInit__events(void) {
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    State *st = state_of(mod);
    for (size_t i = 0; i < N_NAMES; i++) {
        st->names[i] = PyUnicode_InternFromString(NAMES[i]);
        if (st->names[i] == NULL) {
            Py_DECREF(mod);
            return NULL;
        }
    }
    return mod;
}
