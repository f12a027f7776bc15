// l2c::residual_apply_ on CPU:  out <- inp + cache  (one pass; out may be inp or cache).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace l2c {
namespace cpu {
namespace {

struct Add {
  static L2C_INLINE float apply(float a, float b) { return a + b; }
};

void residual_apply_cpu(const at::Tensor& out, const at::Tensor& inp, const at::Tensor& cache) {
  check_residual_apply_args(out, inp, cache);
  const int64_t numel = out.numel();
  if (numel == 0) return;
  const bool out_is_inp = out.const_data_ptr() == inp.const_data_ptr();
  const bool out_is_cache = out.const_data_ptr() == cache.const_data_ptr();
  dispatch_dtype(out.scalar_type(), "l2c::residual_apply_", [&](auto tag) {
    using T = decltype(tag);
    T* dst = out.mutable_data_ptr<T>();
    const T* a = inp.const_data_ptr<T>();
    const T* b = cache.const_data_ptr<T>();
    at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
      if (out_is_inp && out_is_cache) {
        run<BinaryFlat<T, Add, Alias::kAB>>(dst, nullptr, nullptr, begin, end);
      } else if (out_is_inp) {
        run<BinaryFlat<T, Add, Alias::kA>>(dst, nullptr, b, begin, end);
      } else if (out_is_cache) {
        run<BinaryFlat<T, Add, Alias::kB>>(dst, a, nullptr, begin, end);
      } else {
        run<BinaryFlat<T, Add, Alias::kNone>>(dst, a, b, begin, end);
      }
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) { m.impl("residual_apply_", &l2c::cpu::residual_apply_cpu); }
