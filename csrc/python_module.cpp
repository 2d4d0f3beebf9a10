// flashkd._C: importing it loads this library, whose static initializers
// register the ops with torch. It exposes nothing to Python itself, so it
// uses only the stable ABI and one wheel serves every CPython >= 3.10.
#include <Python.h>

static struct PyModuleDef flashkd_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr,
                                            nullptr, nullptr, nullptr, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&flashkd_module); }
