// l2c::forecast_store_ on CUDA:  x += gate[:, None, :] * y; diff2, diff, cache = diff, y - cache, y
//
// One pass: y is read once (evict-first: it is dead afterwards), x is read and written once, and
// the old cache and diff are read once before they are overwritten. The forecast state (cache,
// diff, diff2) gets evict-first stores: it is read at a later step.
#include "common.cuh"

namespace l2c {
namespace cuda {
namespace {

using detail::Load;
using detail::Raw;
using detail::Store;

// Grid-stride over chunks of VEC elements of the flat [B * N * C] tensors. With a gate, VEC
// divides C so a chunk never straddles rows: element e belongs to sample e / (N * C) and
// column e % C. Each element of cache and diff is read before it is written, by the same
// thread, so their loads use the plain (coherent) path.
template <typename T, int VEC, bool kGate, bool kDiff2, typename IndexT, typename Div>
__global__ void __launch_bounds__(detail::kElementwiseThreads)
    forecast_store_kernel(T* __restrict__ x, const T* __restrict__ y, const T* __restrict__ gate,
                          T* __restrict__ cache, T* __restrict__ diff, T* __restrict__ diff2,
                          IndexT chunks, Div sample_of, Div column_of) {
  constexpr int U = detail::kElementwiseUnroll;
  const IndexT stride = static_cast<IndexT>(gridDim.x) * blockDim.x;
  for (IndexT i = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += stride * U) {
    Raw<T, VEC> rx[U], ry[U], rc[U], rd[U], rg[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        const IndexT e = j * VEC;
        ry[u] = detail::load_raw<T, VEC, Load::kStream>(y + e);
        rc[u] = detail::load_raw<T, VEC>(cache + e);
        if constexpr (kDiff2) rd[u] = detail::load_raw<T, VEC>(diff + e);
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
        float vx[VEC], vy[VEC], vc[VEC], vd[VEC];
        detail::unpack<T, VEC>(ry[u], vy);
        detail::unpack<T, VEC>(rc[u], vc);
#pragma unroll
        for (int k = 0; k < VEC; ++k) vd[k] = vy[k] - vc[k];
        if constexpr (kDiff2) detail::store_raw<T, VEC, Store::kStream>(diff2 + e, rd[u]);
        detail::store_chunk<T, VEC, Store::kStream>(diff + e, vd);
        detail::store_raw<T, VEC, Store::kStream>(cache + e, ry[u]);
        detail::unpack<T, VEC>(rx[u], vx);
        if constexpr (kGate) {
          float vg[VEC];
          detail::unpack<T, VEC>(rg[u], vg);
#pragma unroll
          for (int k = 0; k < VEC; ++k) vx[k] += vg[k] * vy[k];
        } else {
#pragma unroll
          for (int k = 0; k < VEC; ++k) vx[k] += vy[k];
        }
        detail::store_chunk<T, VEC>(x + e, vx);
      }
    }
  }
}

template <typename T, int VEC, bool kGate, bool kDiff2>
cudaError_t launch(T* x, const T* y, const T* gate, T* cache, T* diff, T* diff2, int64_t N,
                   int64_t C, int64_t numel, cudaStream_t stream) {
  return detail::launch_rows<VEC>(N, C, numel, [&](unsigned blocks, int threads, auto chunks,
                                                    auto sample_of, auto column_of) {
    using IndexT = decltype(chunks);
    using Div = decltype(sample_of);
    forecast_store_kernel<T, VEC, kGate, kDiff2, IndexT, Div>
        <<<blocks, threads, 0, stream>>>(x, y, gate, cache, diff, diff2, chunks, sample_of, column_of);
  });
}

template <typename T, int VEC>
cudaError_t launch_vec(T* x, const T* y, const T* gate, T* cache, T* diff, T* diff2, int64_t N,
                       int64_t C, int64_t numel, cudaStream_t stream) {
  if (gate != nullptr) {
    return diff2 != nullptr
               ? launch<T, VEC, true, true>(x, y, gate, cache, diff, diff2, N, C, numel, stream)
               : launch<T, VEC, true, false>(x, y, gate, cache, diff, diff2, N, C, numel, stream);
  }
  return diff2 != nullptr
             ? launch<T, VEC, false, true>(x, y, gate, cache, diff, diff2, N, C, numel, stream)
             : launch<T, VEC, false, false>(x, y, gate, cache, diff, diff2, N, C, numel, stream);
}

}  // namespace

cudaError_t forecast_store(void* x, const void* y, const void* gate, void* cache, void* diff,
                           void* diff2, int64_t B, int64_t N, int64_t C, DType dtype,
                           cudaStream_t stream) {
  const int64_t numel = B * N * C;
  if (numel <= 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = detail::kPack<T>;
    T* xp = static_cast<T*>(x);
    const T* yp = static_cast<const T*>(y);
    const T* gp = static_cast<const T*>(gate);
    T* cp = static_cast<T*>(cache);
    T* dp = static_cast<T*>(diff);
    T* d2p = static_cast<T*>(diff2);
    // 16-byte chunks need aligned pointers and chunks that do not straddle rows (C % P == 0;
    // without a gate, numel % P == 0 is enough).
    const bool vec = detail::aligned16(xp) && detail::aligned16(yp) && detail::aligned16(cp) &&
                     detail::aligned16(dp) && (d2p == nullptr || detail::aligned16(d2p)) &&
                     (gp == nullptr || detail::aligned16(gp)) &&
                     (gp != nullptr ? C % P == 0 : numel % P == 0);
    return vec ? launch_vec<T, P>(xp, yp, gp, cp, dp, d2p, N, C, numel, stream)
               : launch_vec<T, 1>(xp, yp, gp, cp, dp, d2p, N, C, numel, stream);
  });
}

}  // namespace cuda
}  // namespace l2c
