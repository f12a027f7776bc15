// l2c::gated_residual_ on CPU:  x += gate[:, None, :] * y  (x += y without gate);  cache <- y.
//
// One pass over memory: each element of y is read once, x is read and written once, and the
// cache copy is written in the same loop.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace l2c {
namespace cpu {
namespace {

// Elements [begin, end) of the flat tensors (no gate: the op is purely element-wise).
template <typename T, bool kCache>
struct ResidualAddFlat {
  static L2C_INLINE void run(T* L2C_RESTRICT x, const T* L2C_RESTRICT y, T* L2C_RESTRICT cache,
                             int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T yv = y[i];
      if constexpr (kCache) cache[i] = yv;
      x[i] = Convert<T>::store(Convert<T>::load(x[i]) + Convert<T>::load(yv));
    }
  }
};

// Rows [begin, end) of the [B * N, C] view; row r belongs to sample r / N.
template <typename T, bool kCache>
struct GatedResidualRows {
  static L2C_INLINE void run(T* L2C_RESTRICT x, const T* L2C_RESTRICT y,
                             const T* L2C_RESTRICT gate, T* L2C_RESTRICT cache, int64_t N,
                             int64_t C, int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* L2C_RESTRICT xr = x + r * C;
      const T* L2C_RESTRICT yr = y + r * C;
      const T* L2C_RESTRICT gr = gate + (r / N) * C;
      T* L2C_RESTRICT cr = kCache ? cache + r * C : nullptr;
      for (int64_t c = 0; c < C; ++c) {
        const T yv = yr[c];
        if constexpr (kCache) cr[c] = yv;
        xr[c] = Convert<T>::store(Convert<T>::load(xr[c]) +
                                  Convert<T>::load(gr[c]) * Convert<T>::load(yv));
      }
    }
  }
};

void gated_residual_cpu(const at::Tensor& x, const at::Tensor& y,
                        const std::optional<at::Tensor>& gate,
                        const std::optional<at::Tensor>& cache) {
  check_gated_residual_args(x, y, gate, cache);
  const int64_t numel = x.numel();
  if (numel == 0) return;
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t rows = x.size(0) * N;

  dispatch_dtype(x.scalar_type(), "l2c::gated_residual_", [&](auto tag) {
    using T = decltype(tag);
    T* xp = x.mutable_data_ptr<T>();
    const T* yp = y.const_data_ptr<T>();
    T* cp = cache.has_value() ? cache->mutable_data_ptr<T>() : nullptr;
    if (gate.has_value()) {
      const T* gp = gate->const_data_ptr<T>();
      at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
        if (cp != nullptr) {
          run<GatedResidualRows<T, true>>(xp, yp, gp, cp, N, C, begin, end);
        } else {
          run<GatedResidualRows<T, false>>(xp, yp, gp, cp, N, C, begin, end);
        }
      });
    } else {
      at::parallel_for(0, numel, kGrainElements, [&](int64_t begin, int64_t end) {
        if (cp != nullptr) {
          run<ResidualAddFlat<T, true>>(xp, yp, cp, begin, end);
        } else {
          run<ResidualAddFlat<T, false>>(xp, yp, cp, begin, end);
        }
      });
    }
  });
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) { m.impl("gated_residual_", &l2c::cpu::gated_residual_cpu); }
