// l2c::cfg_mean_store_ on CUDA:  x += y;  cache = (y[:B/2] + y[B/2:]) / 2.
//
// One pass: chunk i of the conditional half and chunk i of the unconditional half are handled by
// the same thread, so y is read once (evict-first: dead afterwards) and the cache written once
// (evict-first: read at a later step).
#include "common.cuh"

namespace l2c {
namespace cuda {
namespace {

using detail::Load;
using detail::Raw;
using detail::Store;

template <typename T, int VEC, typename IndexT>
__global__ void __launch_bounds__(detail::kElementwiseThreads)
    cfg_mean_store_kernel(T* __restrict__ x, const T* __restrict__ y, T* __restrict__ cache,
                          IndexT chunks, IndexT half) {
  constexpr int U = detail::kElementwiseUnroll;
  const IndexT stride = static_cast<IndexT>(gridDim.x) * blockDim.x;
  for (IndexT i = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += stride * U) {
    Raw<T, VEC> rx0[U], rx1[U], ry0[U], ry1[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        const IndexT e = j * VEC;
        ry0[u] = detail::load_raw<T, VEC, Load::kStream>(y + e);
        ry1[u] = detail::load_raw<T, VEC, Load::kStream>(y + half + e);
        rx0[u] = detail::load_raw<T, VEC>(x + e);
        rx1[u] = detail::load_raw<T, VEC>(x + half + e);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        const IndexT e = j * VEC;
        float x0[VEC], x1[VEC], y0[VEC], y1[VEC], m[VEC];
        detail::unpack<T, VEC>(rx0[u], x0);
        detail::unpack<T, VEC>(rx1[u], x1);
        detail::unpack<T, VEC>(ry0[u], y0);
        detail::unpack<T, VEC>(ry1[u], y1);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          m[k] = y0[k] * 0.5f + y1[k] * 0.5f;  // cannot overflow, unlike (y0 + y1) / 2
          x0[k] += y0[k];
          x1[k] += y1[k];
        }
        detail::store_chunk<T, VEC>(x + e, x0);
        detail::store_chunk<T, VEC>(x + half + e, x1);
        detail::store_chunk<T, VEC, Store::kStream>(cache + e, m);
      }
    }
  }
}

template <typename T, int VEC>
cudaError_t launch(T* x, const T* y, T* cache, int64_t half, cudaStream_t stream) {
  constexpr int threads = detail::kElementwiseThreads;
  const int64_t chunks = half / VEC;
  unsigned blocks = 0;
  const cudaError_t err = detail::grid_size(
      chunks, static_cast<int64_t>(threads) * detail::kElementwiseUnroll, threads, &blocks);
  if (err != cudaSuccess) return err;
  if (detail::fits_int32(2 * half)) {
    cfg_mean_store_kernel<T, VEC, uint32_t><<<blocks, threads, 0, stream>>>(
        x, y, cache, static_cast<uint32_t>(chunks), static_cast<uint32_t>(half));
  } else {
    cfg_mean_store_kernel<T, VEC, int64_t><<<blocks, threads, 0, stream>>>(x, y, cache, chunks, half);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cfg_mean_store(void* x, const void* y, void* cache, int64_t B, int64_t N, int64_t C,
                           DType dtype, cudaStream_t stream) {
  if (B <= 0 || B % 2 != 0) return B == 0 ? cudaSuccess : cudaErrorInvalidValue;
  const int64_t half = (B / 2) * N * C;
  if (half <= 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = detail::kPack<T>;
    T* xp = static_cast<T*>(x);
    const T* yp = static_cast<const T*>(y);
    T* cp = static_cast<T*>(cache);
    // The second half starts `half` elements in: it is 16-byte aligned when half % P == 0.
    const bool vec = detail::aligned16(xp) && detail::aligned16(yp) && detail::aligned16(cp) &&
                     half % P == 0;
    return vec ? launch<T, P>(xp, yp, cp, half, stream) : launch<T, 1>(xp, yp, cp, half, stream);
  });
}

}  // namespace cuda
}  // namespace l2c
