// l2c::forecast_residual_ on CPU:  x += gate[:, None, :] * (cache + a * diff + b * diff2).
//
// One pass: a reused branch's forecast (cached output extrapolated by its stored differences) is
// formed in float32 registers and added to the stream, instead of one read-modify-write of x per
// term.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace l2c {
namespace cpu {
namespace {

// Rows [begin, end) of the [B * N, C] view; row r belongs to sample r / N.
template <typename T, bool kGate, bool kDiff2>
struct ForecastResidualRows {
  static L2C_INLINE void run(T* L2C_RESTRICT x, const T* L2C_RESTRICT cache,
                             const T* L2C_RESTRICT diff, const T* L2C_RESTRICT diff2,
                             const T* L2C_RESTRICT gate, float a, float b, int64_t N, int64_t C,
                             int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* L2C_RESTRICT xr = x + r * C;
      const T* L2C_RESTRICT cr = cache + r * C;
      const T* L2C_RESTRICT dr = diff + r * C;
      const T* L2C_RESTRICT d2r = kDiff2 ? diff2 + r * C : nullptr;
      const T* L2C_RESTRICT gr = kGate ? gate + (r / N) * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        float v = Convert<T>::load(cr[c]) + a * Convert<T>::load(dr[c]);
        if constexpr (kDiff2) v += b * Convert<T>::load(d2r[c]);
        if constexpr (kGate) v *= Convert<T>::load(gr[c]);
        xr[c] = Convert<T>::store(Convert<T>::load(xr[c]) + v);
      }
    }
  }
};

template <typename T, bool kGate>
void run_rows(T* x, const T* cache, const T* diff, const T* diff2, const T* gate, float a, float b,
              int64_t N, int64_t C, int64_t rows) {
  at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
    if (diff2 != nullptr) {
      run<ForecastResidualRows<T, kGate, true>>(x, cache, diff, diff2, gate, a, b, N, C, begin, end);
    } else {
      run<ForecastResidualRows<T, kGate, false>>(x, cache, diff, diff2, gate, a, b, N, C, begin, end);
    }
  });
}

void forecast_residual_cpu(const at::Tensor& x, const at::Tensor& cache, const at::Tensor& diff,
                           const std::optional<at::Tensor>& diff2,
                           const std::optional<at::Tensor>& gate, double a, double b) {
  check_forecast_residual_args(x, cache, diff, diff2, gate, a, b);
  if (x.numel() == 0) return;
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t rows = x.size(0) * N;
  dispatch_dtype(x.scalar_type(), "l2c::forecast_residual_", [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.mutable_data_ptr<T>();
    const T* cp = cache.const_data_ptr<T>();
    const T* dp = diff.const_data_ptr<T>();
    const T* d2p = diff2.has_value() ? diff2->const_data_ptr<T>() : nullptr;
    const float af = static_cast<float>(a), bf = static_cast<float>(b);
    if (gate.has_value()) {
      run_rows<T, true>(xp, cp, dp, d2p, gate->const_data_ptr<T>(), af, bf, N, C, rows);
    } else {
      run_rows<T, false>(xp, cp, dp, d2p, nullptr, af, bf, N, C, rows);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) { m.impl("forecast_residual_", &l2c::cpu::forecast_residual_cpu); }
