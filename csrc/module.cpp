// The Python module l2c_kernels._C. Importing it registers the l2c operators
// (torch.ops.l2c.*); its functions report how this build was made.
#include <Python.h>

#include "cpu/cpu_capability.h"

#if defined(__has_include)
#if __has_include("l2c_build_config.h")
#include "l2c_build_config.h"  // written by setup.py
#endif
#endif

#ifndef L2C_BUILD_TORCH_VERSION
#define L2C_BUILD_TORCH_VERSION "unknown"
#endif
#ifndef L2C_BUILD_CUDA_ARCHS
#define L2C_BUILD_CUDA_ARCHS ""
#endif
#ifndef L2C_WITH_CUDA
#define L2C_WITH_CUDA 0
#endif

#if L2C_WITH_CUDA
namespace l2c {
namespace cuda {
int runtime_version_built();  // CUDART_VERSION, defined in cuda_bindings.cpp
}  // namespace cuda
}  // namespace l2c
#endif

namespace {

PyObject* cuda_compiled(PyObject*, PyObject*) { return PyBool_FromLong(L2C_WITH_CUDA); }

PyObject* cuda_archs(PyObject*, PyObject*) {
  return PyUnicode_FromString(L2C_WITH_CUDA ? L2C_BUILD_CUDA_ARCHS : "");
}

PyObject* cuda_version(PyObject*, PyObject*) {
#if L2C_WITH_CUDA
  const int v = l2c::cuda::runtime_version_built();
  return PyUnicode_FromFormat("%d.%d", v / 1000, (v % 1000) / 10);
#else
  Py_RETURN_NONE;
#endif
}

PyObject* torch_version(PyObject*, PyObject*) {
  return PyUnicode_FromString(L2C_BUILD_TORCH_VERSION);
}

PyObject* cpu_capability(PyObject*, PyObject*) {
  return PyUnicode_FromString(l2c::cpu::capability());
}

PyObject* cpu_variants(PyObject*, PyObject*) {
  return PyUnicode_FromString(l2c::cpu::compiled_variants());
}

PyObject* cpu_parallel(PyObject*, PyObject*) {
#ifdef _OPENMP
  return PyUnicode_FromString("openmp");
#else
  return PyUnicode_FromString("serial");
#endif
}

PyMethodDef methods[] = {
    {"cuda_compiled", cuda_compiled, METH_NOARGS,
     "True if the CUDA kernels were compiled into this build."},
    {"cuda_archs", cuda_archs, METH_NOARGS,
     "The TORCH_CUDA_ARCH_LIST the CUDA kernels were compiled for ('' without CUDA)."},
    {"cuda_version", cuda_version, METH_NOARGS,
     "The CUDA runtime version the kernels were built against, e.g. '12.8' (None without CUDA)."},
    {"torch_version", torch_version, METH_NOARGS,
     "torch.__version__ of the torch this extension was built against."},
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The variant of the CPU kernels in use: 'avx2' or 'default' (follows "
     "torch.backends.cpu.get_cpu_capability() and ATEN_CPU_CAPABILITY)."},
    {"cpu_variants", cpu_variants, METH_NOARGS,
     "Comma-separated variants of the CPU kernels compiled in, e.g. 'default,avx2'."},
    {"cpu_parallel", cpu_parallel, METH_NOARGS,
     "How the CPU kernels spread rows over threads: 'openmp' (torch's intra-op pool, "
     "torch.set_num_threads) or 'serial'."},
    {nullptr, nullptr, 0, nullptr}};

PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "l2c_kernels._C",
    "Compiled l2c operators (registered as torch.ops.l2c.*) and the facts of this build.",
    -1,
    methods,
    nullptr,
    nullptr,
    nullptr,
    nullptr};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module_def); }
