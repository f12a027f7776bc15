// l2c::adaln_modulate on CPU:
//   out = LayerNorm(x) * (1 + scale[:, None, :]) + shift[:, None, :]
// LayerNorm over C without affine: float32 statistics, biased variance, eps inside the sqrt.
//
// One pass over memory: each row is read from memory once (the two statistics passes and the
// output pass re-read it from L1), the output is written once, and nothing is materialised
// between LayerNorm and the modulation. Rows of 16-bit dtypes are converted to float once,
// into a per-task buffer; so are shift and 1 + scale, once per sample.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_common.h"

namespace l2c {
namespace cpu {
namespace {

// Sum of x[0..C) as float with kLanes independent partial sums (vectorisable without
// reassociation), combined in a fixed order. For 16-bit T the converted row is kept in `buf`.
template <typename T>
L2C_INLINE float lane_sum(const T* L2C_RESTRICT x, float* L2C_RESTRICT buf, int64_t C) {
  constexpr bool kBuffer = !std::is_same_v<T, float>;
  float acc[kLanes] = {};
  const int64_t main = C - C % kLanes;
  for (int64_t c = 0; c < main; c += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const float v = Convert<T>::load(x[c + k]);
      if constexpr (kBuffer) buf[c + k] = v;
      acc[k] += v;
    }
  }
  for (int64_t c = main; c < C; ++c) {
    const float v = Convert<T>::load(x[c]);
    if constexpr (kBuffer) buf[c] = v;
    acc[c - main] += v;
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t k = 0; k < w; ++k) acc[k] += acc[k + w];
  }
  return acc[0];
}

// Sum of (v[c] - mean)^2, same scheme.
L2C_INLINE float lane_sq_dev_sum(const float* L2C_RESTRICT v, int64_t C, float mean) {
  float acc[kLanes] = {};
  const int64_t main = C - C % kLanes;
  for (int64_t c = 0; c < main; c += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const float d = v[c + k] - mean;
      acc[k] += d * d;
    }
  }
  for (int64_t c = main; c < C; ++c) {
    const float d = v[c] - mean;
    acc[c - main] += d * d;
  }
  for (int64_t w = kLanes / 2; w > 0; w /= 2) {
    for (int64_t k = 0; k < w; ++k) acc[k] += acc[k + w];
  }
  return acc[0];
}

// Rows [begin, end) of the [B * N, C] view; row r belongs to sample r / N.
// `work` holds 3 * C floats: the float row (16-bit T only), 1 + scale and shift of the current
// sample (converted once per sample, not once per row).
template <typename T>
struct AdaLNModulateRows {
  static L2C_INLINE void run(T* L2C_RESTRICT out, const T* L2C_RESTRICT x,
                             const T* L2C_RESTRICT shift, const T* L2C_RESTRICT scale,
                             float* L2C_RESTRICT work, int64_t N, int64_t C, float eps,
                             int64_t begin, int64_t end) {
    float* L2C_RESTRICT buf = work;
    float* L2C_RESTRICT scale1 = work + C;
    float* L2C_RESTRICT shiftf = work + 2 * C;
    const float inv_c = 1.0f / static_cast<float>(C);
    int64_t sample = -1;
    for (int64_t r = begin; r < end; ++r) {
      if (r / N != sample) {
        sample = r / N;
        const T* L2C_RESTRICT sc = scale + sample * C;
        const T* L2C_RESTRICT sh = shift + sample * C;
        for (int64_t c = 0; c < C; ++c) {
          scale1[c] = 1.0f + Convert<T>::load(sc[c]);
          shiftf[c] = Convert<T>::load(sh[c]);
        }
      }
      const T* L2C_RESTRICT xr = x + r * C;
      T* L2C_RESTRICT outr = out + r * C;

      const float mean = lane_sum(xr, buf, C) * inv_c;
      const float* L2C_RESTRICT v;
      if constexpr (std::is_same_v<T, float>) {
        v = xr;
      } else {
        v = buf;
      }
      const float var = lane_sq_dev_sum(v, C, mean) * inv_c;
      const float rstd = 1.0f / std::sqrt(var + eps);
      for (int64_t c = 0; c < C; ++c) {
        outr[c] = Convert<T>::store((v[c] - mean) * rstd * scale1[c] + shiftf[c]);
      }
    }
  }
};

at::Tensor adaln_modulate_cpu(const at::Tensor& x, const at::Tensor& shift,
                              const at::Tensor& scale, double eps) {
  check_adaln_modulate_args(x, shift, scale, eps);
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  const int64_t N = x.size(1);
  const int64_t C = x.size(2);
  const int64_t rows = x.size(0) * N;
  const float eps_f = static_cast<float>(eps);

  dispatch_dtype(x.scalar_type(), "l2c::adaln_modulate", [&](auto tag) {
    using T = decltype(tag);
    T* op = out.mutable_data_ptr<T>();
    const T* xp = x.const_data_ptr<T>();
    const T* shp = shift.const_data_ptr<T>();
    const T* scp = scale.const_data_ptr<T>();
    at::parallel_for(0, rows, grain_rows(C), [&](int64_t begin, int64_t end) {
      std::vector<float> work(3 * C);
      run<AdaLNModulateRows<T>>(op, xp, shp, scp, work.data(), N, C, eps_f, begin, end);
    });
  });
  return out;
}

}  // namespace
}  // namespace cpu
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CPU, m) { m.impl("adaln_modulate", &l2c::cpu::adaln_modulate_cpu); }
