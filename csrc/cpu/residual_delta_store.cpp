// l2c::residual_delta_store_ on CPU:  cache <- out - inp  (one pass; cache may be out or inp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace l2c {
namespace cpu {
namespace {

struct Sub {
  static L2C_INLINE float apply(float a, float b) { return a - b; }
};

void residual_delta_store_cpu(const at::Tensor& cache, const at::Tensor& out,
                              const at::Tensor& inp) {
  check_residual_delta_store_args(cache, out, inp);
  const int64_t numel = cache.numel();
  if (numel == 0) return;
  const bool cache_is_out = cache.const_data_ptr() == out.const_data_ptr();
  const bool cache_is_inp = cache.const_data_ptr() == inp.const_data_ptr();
  dispatch_dtype(cache.scalar_type(), "l2c::residual_delta_store_", [&](auto tag) {
    using T = decltype(tag);
    T* dst = cache.mutable_data_ptr<T>();
    const T* a = out.const_data_ptr<T>();
    const T* b = inp.const_data_ptr<T>();
    at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
      if (cache_is_out && cache_is_inp) {
        run<BinaryFlat<T, Sub, Alias::kAB>>(dst, nullptr, nullptr, begin, end);
      } else if (cache_is_out) {
        run<BinaryFlat<T, Sub, Alias::kA>>(dst, nullptr, b, begin, end);
      } else if (cache_is_inp) {
        run<BinaryFlat<T, Sub, Alias::kB>>(dst, a, nullptr, begin, end);
      } else {
        run<BinaryFlat<T, Sub, Alias::kNone>>(dst, a, b, begin, end);
      }
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) {
  m.impl("residual_delta_store_", &l2c::cpu::residual_delta_store_cpu);
}
