// Python module init of madtp_kernels._C. `import madtp_kernels._C` only has to load the library so that the
// static op registrations in ops.cpp run; a bare PyInit (no pybind11) keeps the import free of any CUDA call,
// so it works on a machine without a GPU or driver.
#include <Python.h>

extern "C" PyObject* PyInit__C() {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "madtp_kernels CUDA ops (see torch.ops.madtp_kernels)",
                               -1, nullptr};
  return PyModule_Create(&module);
}
