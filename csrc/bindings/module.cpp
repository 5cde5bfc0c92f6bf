// The extension module: the op library `sapiens2_cuda` (each kernel family adds its ops with
// S2_FRAGMENT in its own binding file) and, in the CUDA build, a bare Python module so that
// `import sapiens2._C` loads the ops. No pybind11: the ops are reached through torch.ops, which
// keeps the build fast. The emulation build is loaded with torch.ops.load_library instead.
#include "common.h"

#define S2_LIBRARY_(ns, m) TORCH_LIBRARY(ns, m)
S2_LIBRARY_(S2_NS, m) {}

#ifndef SAPIENS2_EMU
#include <Python.h>

static struct PyModuleDef s2_module = {PyModuleDef_HEAD_INIT, "_C",
                                       "sapiens2 hand-written CUDA kernels (ops in torch.ops.sapiens2_cuda)", -1,
                                       nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&s2_module); }
#endif
