// l2c::forecast_residual_ on CUDA:  x += gate[:, None, :] * (cache + a * diff + b * diff2).
//
// One pass: cache, diff and diff2 are read once through the read-only path with the default
// eviction policy (not evict-first: they are read again at later steps), x is read and written
// once. The forecast is formed in float32 and x rounded once.
#include "common.cuh"

namespace l2c {
namespace cuda {
namespace {

using detail::Load;
using detail::Raw;

// Grid-stride over chunks of VEC elements of the flat [B * N * C] tensors. With a gate, VEC
// divides C so a chunk never straddles rows: element e belongs to sample e / (N * C) and
// column e % C.
template <typename T, int VEC, bool kGate, bool kDiff2, typename IndexT, typename Div>
__global__ void __launch_bounds__(detail::kElementwiseThreads)
    forecast_residual_kernel(T* __restrict__ x, const T* __restrict__ cache,
                             const T* __restrict__ diff, const T* __restrict__ diff2,
                             const T* __restrict__ gate, float a, float b_coef, IndexT chunks,
                             Div sample_of, Div column_of) {
  constexpr int U = detail::kElementwiseUnroll;
  const IndexT stride = static_cast<IndexT>(gridDim.x) * blockDim.x;
  for (IndexT i = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += stride * U) {
    Raw<T, VEC> rx[U], rc[U], rd[U], rd2[U], rg[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        const IndexT e = j * VEC;
        rc[u] = detail::load_raw<T, VEC, Load::kReadOnly>(cache + e);
        rd[u] = detail::load_raw<T, VEC, Load::kReadOnly>(diff + e);
        if constexpr (kDiff2) rd2[u] = detail::load_raw<T, VEC, Load::kReadOnly>(diff2 + e);
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
        float vx[VEC], vc[VEC], vd[VEC], f[VEC];
        detail::unpack<T, VEC>(rx[u], vx);
        detail::unpack<T, VEC>(rc[u], vc);
        detail::unpack<T, VEC>(rd[u], vd);
#pragma unroll
        for (int k = 0; k < VEC; ++k) f[k] = vc[k] + a * vd[k];
        if constexpr (kDiff2) {
          float vd2[VEC];
          detail::unpack<T, VEC>(rd2[u], vd2);
#pragma unroll
          for (int k = 0; k < VEC; ++k) f[k] += b_coef * vd2[k];
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

template <typename T, int VEC, bool kGate, bool kDiff2>
cudaError_t launch(T* x, const T* cache, const T* diff, const T* diff2, const T* gate, float a,
                   float b_coef, int64_t N, int64_t C, int64_t numel, cudaStream_t stream) {
  return detail::launch_rows<VEC>(N, C, numel, [&](unsigned blocks, int threads, auto chunks,
                                                    auto sample_of, auto column_of) {
    using IndexT = decltype(chunks);
    using Div = decltype(sample_of);
    forecast_residual_kernel<T, VEC, kGate, kDiff2, IndexT, Div>
        <<<blocks, threads, 0, stream>>>(x, cache, diff, diff2, gate, a, b_coef, chunks, sample_of, column_of);
  });
}

template <typename T, int VEC>
cudaError_t launch_vec(T* x, const T* cache, const T* diff, const T* diff2, const T* gate,
                       float a, float b_coef, int64_t N, int64_t C, int64_t numel,
                       cudaStream_t stream) {
  if (gate != nullptr) {
    return diff2 != nullptr ? launch<T, VEC, true, true>(x, cache, diff, diff2, gate, a, b_coef,
                                                         N, C, numel, stream)
                            : launch<T, VEC, true, false>(x, cache, diff, diff2, gate, a, b_coef,
                                                          N, C, numel, stream);
  }
  return diff2 != nullptr ? launch<T, VEC, false, true>(x, cache, diff, diff2, gate, a, b_coef, N,
                                                        C, numel, stream)
                          : launch<T, VEC, false, false>(x, cache, diff, diff2, gate, a, b_coef,
                                                         N, C, numel, stream);
}

}  // namespace

cudaError_t forecast_residual(void* x, const void* cache, const void* diff, const void* diff2,
                              const void* gate, float a, float b_coef, int64_t B, int64_t N,
                              int64_t C, DType dtype, cudaStream_t stream) {
  const int64_t numel = B * N * C;
  if (numel <= 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = detail::kPack<T>;
    T* xp = static_cast<T*>(x);
    const T* cp = static_cast<const T*>(cache);
    const T* dp = static_cast<const T*>(diff);
    const T* d2p = static_cast<const T*>(diff2);
    const T* gp = static_cast<const T*>(gate);
    // 16-byte chunks need aligned pointers and chunks that do not straddle rows (C % P == 0;
    // without a gate, numel % P == 0 is enough).
    const bool vec = detail::aligned16(xp) && detail::aligned16(cp) && detail::aligned16(dp) &&
                     (d2p == nullptr || detail::aligned16(d2p)) &&
                     (gp == nullptr || detail::aligned16(gp)) &&
                     (gp != nullptr ? C % P == 0 : numel % P == 0);
    return vec ? launch_vec<T, P>(xp, cp, dp, d2p, gp, a, b_coef, N, C, numel, stream)
               : launch_vec<T, 1>(xp, cp, dp, d2p, gp, a, b_coef, N, C, numel, stream);
  });
}

}  // namespace cuda
}  // namespace l2c
