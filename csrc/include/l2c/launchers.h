// Host-side launchers of the l2c CUDA kernels (csrc/cuda/<op>.cu).
//
// Plain CUDA, no torch headers: raw device pointers, int64 sizes, an explicit stream and a dtype
// tag. All tensors are contiguous and share the dtype; activations are [B, N, C] row-major and
// per-sample vectors [B, C]. Arithmetic is in float32 with one rounding per stored element.
//
// Each launcher validates nothing beyond what it needs to pick a kernel (the caller checks
// shapes, dtypes, devices and overlap), launches on `stream` without synchronising, and returns
// cudaGetLastError() after the launch (cudaSuccess when there is nothing to do). Launchers may be
// called while `stream` is being captured into a CUDA graph.
//
// Vectorisation: when every pointer of a call is 16-byte aligned and the row length allows it,
// kernels move 16 bytes per access (4 float32 or 8 float16/bfloat16 elements); otherwise they
// fall back to element-wise access. Any C >= 1 and N >= 1 work.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace l2c {
namespace cuda {

enum class DType : int {
  kFloat32 = 0,
  kFloat16 = 1,
  kBFloat16 = 2,
};

// x[b, n, c] += gate[b, c] * y[b, n, c]   (x += y when gate == nullptr)
// cache[b, n, c] = y[b, n, c]             (when cache != nullptr), in the same pass.
// x, y, cache: [B, N, C]; gate: [B, C]. x and cache must not overlap y or each other.
cudaError_t gated_residual(void* x, const void* y, const void* gate, void* cache, int64_t B,
                           int64_t N, int64_t C, DType dtype, cudaStream_t stream);

// x += y;  cache = (y[:B/2] + y[B/2:]) / 2
// x, y: [B, N, C] with B even; cache: [B/2, N, C]. No overlaps.
cudaError_t cfg_mean_store(void* x, const void* y, void* cache, int64_t B, int64_t N, int64_t C,
                           DType dtype, cudaStream_t stream);

// cache = out - inp, over `numel` elements. cache may be the same memory as out or inp
// (in-place); partial overlaps are not allowed.
cudaError_t residual_delta_store(void* cache, const void* out, const void* inp, int64_t numel,
                                 DType dtype, cudaStream_t stream);

// out = inp + cache, over `numel` elements. out may be the same memory as inp or cache.
cudaError_t residual_apply(void* out, const void* inp, const void* cache, int64_t numel,
                           DType dtype, cudaStream_t stream);

// x[b, n, c] += gate[b, c] * (c0 * y0 + c1 * y1 + c2 * y2)[b, n, c]
// (no gate when gate == nullptr; no c2 term when y2 == nullptr). The sum is formed in float32 and
// x rounded once. x, y0, y1, y2: [B, N, C]; gate: [B, C]. x must not overlap the inputs.
cudaError_t forecast_residual(void* x, const void* y0, const void* y1, const void* y2,
                              const void* gate, float c0, float c1, float c2, int64_t B, int64_t N,
                              int64_t C, DType dtype, cudaStream_t stream);

// out = LayerNorm(x) * (1 + scale[:, None, :]) + shift[:, None, :]
// LayerNorm over C without affine: float32 mean and biased variance, rstd = 1/sqrt(var + eps).
// x, out: [B, N, C]; shift, scale: [B, C]. out must not overlap the inputs.
cudaError_t adaln_modulate(void* out, const void* x, const void* shift, const void* scale,
                           int64_t B, int64_t N, int64_t C, float eps, DType dtype,
                           cudaStream_t stream);

}  // namespace cuda
}  // namespace l2c
