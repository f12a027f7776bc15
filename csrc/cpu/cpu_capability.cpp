// Run-time choice between the default and avx2 variants of the CPU kernels.
#include "cpu/cpu_capability.h"

#include <ATen/Version.h>

#include "cpu/cpu_common.h"

namespace l2c {
namespace cpu {

namespace {

bool detect_avx2() {
#if L2C_CPU_HAVE_AVX2
  // Follow torch: ATEN_CPU_CAPABILITY=default turns the vectorised paths off for both.
  const std::string torch_capability = at::get_cpu_capability();
  if (torch_capability != "AVX2" && torch_capability != "AVX512") return false;
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

}  // namespace

bool use_avx2() {
  static const bool value = detect_avx2();
  return value;
}

const char* capability() { return use_avx2() ? "avx2" : "default"; }

const char* compiled_variants() {
#if L2C_CPU_HAVE_AVX2
  return "default,avx2";
#else
  return "default";
#endif
}

}  // namespace cpu
}  // namespace l2c
