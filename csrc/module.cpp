// The Python module object of tcsm_kernels._C. Importing it runs the static TORCH_LIBRARY
// registrations of the *_op.cpp files; the module itself exports nothing.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}
