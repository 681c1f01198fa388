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

static const char *GEO_FIELDS[] = {"country", "region", "metro", "city", "zip"};

/* event.get(name): borrowed, NULL when absent or null (JSON null is "absent" in v1). */
static int field(PyObject *event, const char *name, PyObject **out) {
    PyObject *value = PyDict_GetItemString(event, name);
    *out = value == Py_None ? NULL : value;
    return 0;
}

static int uid_ok(PyObject *event, PyObject *key) {
    PyObject *uid = PyDict_GetItemString(event, "uid");
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
static int ts_ok(PyObject *event, double latest, double *out) {
    PyObject *ts = PyDict_GetItemString(event, "ts");
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
    (void)module;
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
    if (!PyDict_Check(event) || !uid_ok(event, key)) Py_RETURN_FALSE;
    double ts;
    if (!ts_ok(event, latest, &ts)) Py_RETURN_FALSE;
    PyObject *kind, *url, *categories, *geo, *attrs;
    field(event, "type", &kind);
    if (kind == NULL || !PyUnicode_Check(kind)) Py_RETURN_FALSE;
    int known = PySet_Contains(types, kind);
    if (known < 0) return NULL;
    if (!known) Py_RETURN_FALSE;
    field(event, "url", &url);
    if (!optional_str(url)) Py_RETURN_FALSE;
    field(event, "categories", &categories);
    if (categories != NULL) {
        if (!PyList_Check(categories) || PyList_GET_SIZE(categories) > MAX_CATEGORIES)
            Py_RETURN_FALSE;
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(categories); i++)
            if (!PyUnicode_Check(PyList_GET_ITEM(categories, i))) Py_RETURN_FALSE;
    }
    field(event, "geo", &geo);
    if (geo != NULL) {
        if (!PyDict_Check(geo)) Py_RETURN_FALSE;
        for (size_t i = 0; i < sizeof GEO_FIELDS / sizeof *GEO_FIELDS; i++) {
            PyObject *part;
            field(geo, GEO_FIELDS[i], &part);
            if (!optional_str(part)) Py_RETURN_FALSE;
        }
    }
    field(event, "attrs", &attrs);
    if (attrs != NULL && !PyDict_Check(attrs)) Py_RETURN_FALSE;
    PyObject *stored = PyDict_GetItemString(event, "ts");
    if (!PyFloat_CheckExact(stored)) { /* the Python stores float(ts) */
        PyObject *as_float = PyFloat_FromDouble(ts);
        if (as_float == NULL) return NULL;
        int rc = PyDict_SetItemString(event, "ts", as_float);
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "dmp._events",
    "The valid event's path of dmp/events.py's decode_event, in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__events(void) { return PyModule_Create(&module); }
