// l2c::forecast_store_ on CPU:  x += gate[:, None, :] * y;  diff2 <- diff;  diff <- y - cache;
// cache <- y.
//
// One pass over a computed branch output: y is read once, and the stream and the branch's
// forecast state (cache, first and second differences) are each read and written once, where
// separate ops would read y three times and the differences twice.
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
struct ForecastStoreRows {
  static L2C_INLINE void run(T* L2C_RESTRICT x, const T* L2C_RESTRICT y,
                             const T* L2C_RESTRICT gate, T* L2C_RESTRICT cache,
                             T* L2C_RESTRICT diff, T* L2C_RESTRICT diff2, int64_t N, int64_t C,
                             int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* L2C_RESTRICT xr = x + r * C;
      const T* L2C_RESTRICT yr = y + r * C;
      T* L2C_RESTRICT cr = cache + r * C;
      T* L2C_RESTRICT dr = diff + r * C;
      T* L2C_RESTRICT d2r = kDiff2 ? diff2 + r * C : nullptr;
      const T* L2C_RESTRICT gr = kGate ? gate + (r / N) * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const T yv = yr[c];
        const float yf = Convert<T>::load(yv);
        if constexpr (kDiff2) d2r[c] = dr[c];
        dr[c] = Convert<T>::store(yf - Convert<T>::load(cr[c]));
        cr[c] = yv;
        const float add = kGate ? Convert<T>::load(gr[c]) * yf : yf;
        xr[c] = Convert<T>::store(Convert<T>::load(xr[c]) + add);
      }
    }
  }
};

template <typename T, bool kGate>
void run_rows(T* x, const T* y, const T* gate, T* cache, T* diff, T* diff2, int64_t N, int64_t C,
              int64_t rows) {
  at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
    if (diff2 != nullptr) {
      run<ForecastStoreRows<T, kGate, true>>(x, y, gate, cache, diff, diff2, N, C, begin, end);
    } else {
      run<ForecastStoreRows<T, kGate, false>>(x, y, gate, cache, diff, diff2, N, C, begin, end);
    }
  });
}

void forecast_store_cpu(const at::Tensor& x, const at::Tensor& y,
                        const std::optional<at::Tensor>& gate, const at::Tensor& cache,
                        const at::Tensor& diff, const std::optional<at::Tensor>& diff2) {
  check_forecast_store_args(x, y, gate, cache, diff, diff2);
  if (x.numel() == 0) return;
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t rows = x.size(0) * N;
  dispatch_dtype(x.scalar_type(), "l2c::forecast_store_", [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.mutable_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    T* cp = cache.mutable_data_ptr<T>();
    T* dp = diff.mutable_data_ptr<T>();
    T* d2p = diff2.has_value() ? diff2->mutable_data_ptr<T>() : nullptr;
    if (gate.has_value()) {
      run_rows<T, true>(xp, yp, gate->const_data_ptr<T>(), cp, dp, d2p, N, C, rows);
    } else {
      run_rows<T, false>(xp, yp, nullptr, cp, dp, d2p, N, C, rows);
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) { m.impl("forecast_store_", &l2c::cpu::forecast_store_cpu); }
