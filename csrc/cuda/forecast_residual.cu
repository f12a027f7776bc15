// l2c::forecast_residual_ on CUDA:  x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2).
//
// One pass: y0, y1 and y2 (a branch's last stored outputs) are read once through the read-only
// path with the default eviction policy (not evict-first: they are read again at later steps), x
// is read and written once. The forecast is formed in float32 and x rounded once.
#include "common.cuh"

namespace l2c {
namespace cuda {
namespace {

using detail::Load;
using detail::Raw;

// Grid-stride over chunks of VEC elements of the flat [B * N * C] tensors. With a gate, VEC
// divides C so a chunk never straddles rows: element e belongs to sample e / (N * C) and
// column e % C.
template <typename T, int VEC, bool kGate, bool kY2, typename IndexT, typename Div>
__global__ void __launch_bounds__(detail::kElementwiseThreads)
    forecast_residual_kernel(T* __restrict__ x, const T* __restrict__ y0,
                             const T* __restrict__ y1, const T* __restrict__ y2,
                             const T* __restrict__ gate, float c0, float c1, float c2, IndexT chunks,
                             Div sample_of, Div column_of) {
  constexpr int U = detail::kElementwiseUnroll;
  const IndexT stride = static_cast<IndexT>(gridDim.x) * blockDim.x;
  for (IndexT i = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += stride * U) {
    Raw<T, VEC> rx[U], r0[U], r1[U], r2[U], rg[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        const IndexT e = j * VEC;
        r0[u] = detail::load_raw<T, VEC, Load::kReadOnly>(y0 + e);
        r1[u] = detail::load_raw<T, VEC, Load::kReadOnly>(y1 + e);
        if constexpr (kY2) r2[u] = detail::load_raw<T, VEC, Load::kReadOnly>(y2 + e);
        rx[u] = detail::load_raw<T, VEC>(x + e);
        if constexpr (kGate) {
          const IndexT g = sample_of.div(e) * column_of.divisor + column_of.mod(e);
          rg[u] = detail::load_raw<T, VEC, Load::kReadOnly>(gate + g);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        const IndexT e = j * VEC;
        float vx[VEC], v0[VEC], v1[VEC], f[VEC];
        detail::unpack<T, VEC>(rx[u], vx);
        detail::unpack<T, VEC>(r0[u], v0);
        detail::unpack<T, VEC>(r1[u], v1);
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = c0 * v0[k] + c1 * v1[k];
        if constexpr (kY2) {
          float v2[VEC];
          detail::unpack<T, VEC>(r2[u], v2);
#pragma unroll
          for (int k = 0; k < VEC; ++k) f[k] += c2 * v2[k];
        }
        if constexpr (kGate) {
          float vg[VEC];
          detail::unpack<T, VEC>(rg[u], vg);
#pragma unroll
          for (int k = 0; k < VEC; ++k) vx[k] += vg[k] * f[k];
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) vx[k] += f[k];
        }
        detail::store_chunk<T, VEC>(x + e, vx);
      }
    }
  }
}

template <typename T, int VEC, bool kGate, bool kY2>
cudaError_t launch(T* x, const T* y0, const T* y1, const T* y2, const T* gate, float c0, float c1,
                   float c2, int64_t N, int64_t C, int64_t numel, cudaStream_t stream) {
  return detail::launch_rows<VEC>(N, C, numel, [&](unsigned blocks, int threads, auto chunks,
                                                    auto sample_of, auto column_of) {
    using IndexT = decltype(chunks);
    using Div = decltype(sample_of);
    forecast_residual_kernel<T, VEC, kGate, kY2, IndexT, Div><<<blocks, threads, 0, stream>>>(
        x, y0, y1, y2, gate, c0, c1, c2, chunks, sample_of, column_of);
  });
}

template <typename T, int VEC>
cudaError_t launch_vec(T* x, const T* y0, const T* y1, const T* y2, const T* gate, float c0,
                       float c1, float c2, int64_t N, int64_t C, int64_t numel,
                       cudaStream_t stream) {
  if (gate != nullptr) {
    return y2 != nullptr
               ? launch<T, VEC, true, true>(x, y0, y1, y2, gate, c0, c1, c2, N, C, numel, stream)
               : launch<T, VEC, true, false>(x, y0, y1, y2, gate, c0, c1, c2, N, C, numel, stream);
  }
  return y2 != nullptr
             ? launch<T, VEC, false, true>(x, y0, y1, y2, gate, c0, c1, c2, N, C, numel, stream)
             : launch<T, VEC, false, false>(x, y0, y1, y2, gate, c0, c1, c2, N, C, numel, stream);
}

}  // namespace

cudaError_t forecast_residual(void* x, const void* y0, const void* y1, const void* y2,
                              const void* gate, float c0, float c1, float c2, int64_t B, int64_t N,
                              int64_t C, DType dtype, cudaStream_t stream) {
  const int64_t numel = B * N * C;
  if (numel <= 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = detail::kPack<T>;
    T* xp = static_cast<T*>(x);
    const T* p0 = static_cast<const T*>(y0);
    const T* p1 = static_cast<const T*>(y1);
    const T* p2 = static_cast<const T*>(y2);
    const T* gp = static_cast<const T*>(gate);
    // 16-byte chunks need aligned pointers and chunks that do not straddle rows (C % P == 0;
    // without a gate, numel % P == 0 is enough).
    const bool vec = detail::aligned16(xp) && detail::aligned16(p0) && detail::aligned16(p1) &&
                     (p2 == nullptr || detail::aligned16(p2)) &&
                     (gp == nullptr || detail::aligned16(gp)) &&
                     (gp != nullptr ? C % P == 0 : numel % P == 0);
    return vec ? launch_vec<T, P>(xp, p0, p1, p2, gp, c0, c1, c2, N, C, numel, stream)
               : launch_vec<T, 1>(xp, p0, p1, p2, gp, c0, c1, c2, N, C, numel, stream);
  });
}

}  // namespace cuda
}  // namespace l2c
