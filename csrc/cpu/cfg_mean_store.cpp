// l2c::cfg_mean_store_ on CPU:  x += y;  cache <- (y[:B/2] + y[B/2:]) / 2.
//
// One pass: element i of the conditional half and element i of the unconditional half are
// handled together, so y is read once.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace l2c {
namespace cpu {
namespace {

// Elements [begin, end) of one half; `half` = (B / 2) * N * C.
template <typename T>
struct CfgMeanStoreFlat {
  static L2C_INLINE void run(T* L2C_RESTRICT x, const T* L2C_RESTRICT y, T* L2C_RESTRICT cache,
                             int64_t half, int64_t begin, int64_t end) {
    T* L2C_RESTRICT x1 = x + half;
    const T* L2C_RESTRICT y1 = y + half;
    for (int64_t i = begin; i < end; ++i) {
      const float a = Convert<T>::load(y[i]);
      const float b = Convert<T>::load(y1[i]);
      x[i] = Convert<T>::store(Convert<T>::load(x[i]) + a);
      x1[i] = Convert<T>::store(Convert<T>::load(x1[i]) + b);
      // 0.5 * a + 0.5 * b: the halving is exact and the sum cannot overflow ((a + b) / 2 can).
      cache[i] = Convert<T>::store(a * 0.5f + b * 0.5f);
    }
  }
};

void cfg_mean_store_cpu(const at::Tensor& x, const at::Tensor& y, const at::Tensor& cache) {
  check_cfg_mean_store_args(x, y, cache);
  const int64_t half = cache.numel();
  if (half == 0) return;
  dispatch_dtype(x.scalar_type(), "l2c::cfg_mean_store_", [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.mutable_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    T* cp = cache.mutable_data_ptr<T>();
    // Each element moves 2 x (x, y) + 1 cache: half the grain of a single-stream op.
    at::parallel_for(0, half, kGrainElements / 2, [&](int64_t begin, int64_t end) {
      run<CfgMeanStoreFlat<T>>(xp, yp, cp, half, begin, end);
    });
  });
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) { m.impl("cfg_mean_store_", &l2c::cpu::cfg_mean_store_cpu); }
