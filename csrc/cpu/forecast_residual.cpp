// l2c::forecast_residual_ on CPU:  x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2).
//
// One pass: a reused branch's forecast (the polynomial through its last stored outputs, evaluated
// at this step) is formed in float32 registers and added to the stream, instead of one
// read-modify-write of x per stored output.
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
template <typename T, bool kGate, bool kY2>
struct ForecastResidualRows {
  static L2C_INLINE void run(T* L2C_RESTRICT x, const T* L2C_RESTRICT y0,
                             const T* L2C_RESTRICT y1, const T* L2C_RESTRICT y2,
                             const T* L2C_RESTRICT gate, float c0, float c1, float c2, int64_t N,
                             int64_t C, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* L2C_RESTRICT xr = x + r * C;
      const T* L2C_RESTRICT y0r = y0 + r * C;
      const T* L2C_RESTRICT y1r = y1 + r * C;
      const T* L2C_RESTRICT y2r = kY2 ? y2 + r * C : nullptr;
      const T* L2C_RESTRICT gr = kGate ? gate + (r / N) * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        float v = c0 * Convert<T>::load(y0r[c]) + c1 * Convert<T>::load(y1r[c]);
        if constexpr (kY2) v += c2 * Convert<T>::load(y2r[c]);
        if constexpr (kGate) v *= Convert<T>::load(gr[c]);
        xr[c] = Convert<T>::store(Convert<T>::load(xr[c]) + v);
      }
    }
  }
};

template <typename T, bool kGate>
void run_rows(T* x, const T* y0, const T* y1, const T* y2, const T* gate, float c0, float c1,
              float c2, int64_t N, int64_t C, int64_t rows) {
  at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
    if (y2 != nullptr) {
      run<ForecastResidualRows<T, kGate, true>>(x, y0, y1, y2, gate, c0, c1, c2, N, C, begin, end);
    } else {
      run<ForecastResidualRows<T, kGate, false>>(x, y0, y1, y2, gate, c0, c1, c2, N, C, begin, end);
    }
  });
}

void forecast_residual_cpu(const at::Tensor& x, const at::Tensor& y0, const at::Tensor& y1,
                           const std::optional<at::Tensor>& y2,
                           const std::optional<at::Tensor>& gate, double c0, double c1,
                           double c2) {
  check_forecast_residual_args(x, y0, y1, y2, gate, c0, c1, c2);
  if (x.numel() == 0) return;
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t rows = x.size(0) * N;
  dispatch_dtype(x.scalar_type(), "l2c::forecast_residual_", [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.mutable_data_ptr<T>();
    const T* y0p = y0.const_data_ptr<T>();
    const T* y1p = y1.const_data_ptr<T>();
    const T* y2p = y2.has_value() ? y2->const_data_ptr<T>() : nullptr;
    const float f0 = static_cast<float>(c0), f1 = static_cast<float>(c1), f2 = static_cast<float>(c2);
    if (gate.has_value()) {
      run_rows<T, true>(xp, y0p, y1p, y2p, gate->const_data_ptr<T>(), f0, f1, f2, N, C, rows);
    } else {
      run_rows<T, false>(xp, y0p, y1p, y2p, nullptr, f0, f1, f2, N, C, rows);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) { m.impl("forecast_residual_", &l2c::cpu::forecast_residual_cpu); }
