// Flat element-wise kernel dst = Op(a, b) shared by residual_apply and residual_delta_store.
#pragma once

#include "common.cuh"

namespace l2c {
namespace cuda {
namespace detail {

// Grid-stride over `chunks` chunks of VEC elements; each thread keeps kElementwiseUnroll chunks
// in flight. dst may be the same memory as a or b (each element is read before it is written,
// by the same thread), so no pointer is __restrict__. The last `tail` (< VEC) elements, from
// `tail_start`, are done element-wise by the first threads of block 0.
template <typename T, int VEC, typename Op, Store kStore, typename IndexT>
__global__ void __launch_bounds__(kElementwiseThreads)
    binary_flat_kernel(T* dst, const T* a, const T* b, IndexT chunks, IndexT tail_start, int tail) {
  constexpr int U = kElementwiseUnroll;
  const IndexT stride = static_cast<IndexT>(gridDim.x) * blockDim.x;
  for (IndexT i = static_cast<IndexT>(blockIdx.x) * blockDim.x + threadIdx.x; i < chunks;
       i += stride * U) {
    Raw<T, VEC> ra[U], rb[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        ra[u] = load_raw<T, VEC>(a + j * VEC);
        rb[u] = load_raw<T, VEC>(b + j * VEC);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const IndexT j = i + u * stride;
      if (j < chunks) {
        float va[VEC], vb[VEC], r[VEC];
        unpack<T, VEC>(ra[u], va);
        unpack<T, VEC>(rb[u], vb);
#pragma unroll
        for (int k = 0; k < VEC; ++k) r[k] = Op::apply(va[k], vb[k]);
        store_chunk<T, VEC, kStore>(dst + j * VEC, r);
      }
    }
  }
  if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < tail) {
    const IndexT e = tail_start + threadIdx.x;
    float va[1], vb[1], r[1];
    load_chunk<T, 1>(a + e, va);
    load_chunk<T, 1>(b + e, vb);
    r[0] = Op::apply(va[0], vb[0]);
    store_chunk<T, 1, kStore>(dst + e, r);
  }
}

template <typename T, typename Op, Store kStore>
cudaError_t launch_binary_flat(T* dst, const T* a, const T* b, int64_t numel,
                               cudaStream_t stream) {
  if (numel <= 0) return cudaSuccess;
  constexpr int P = kPack<T>;
  const bool vec = aligned16(dst) && aligned16(a) && aligned16(b);
  const int64_t chunks = vec ? numel / P : numel;
  const int tail = vec ? static_cast<int>(numel % P) : 0;
  const int64_t tail_start = numel - tail;
  constexpr int threads = kElementwiseThreads;
  unsigned blocks = 0;
  const cudaError_t err =
      grid_size(chunks, static_cast<int64_t>(threads) * kElementwiseUnroll, threads, &blocks);
  if (err != cudaSuccess) return err;
  if (fits_int32(numel)) {
    const auto c = static_cast<uint32_t>(chunks);
    const auto t0 = static_cast<uint32_t>(tail_start);
    if (vec) {
      binary_flat_kernel<T, P, Op, kStore, uint32_t><<<blocks, threads, 0, stream>>>(dst, a, b, c, t0, tail);
    } else {
      binary_flat_kernel<T, 1, Op, kStore, uint32_t><<<blocks, threads, 0, stream>>>(dst, a, b, c, t0, 0);
    }
  } else {
    if (vec) {
      binary_flat_kernel<T, P, Op, kStore, int64_t><<<blocks, threads, 0, stream>>>(dst, a, b, chunks, tail_start, tail);
    } else {
      binary_flat_kernel<T, 1, Op, kStore, int64_t><<<blocks, threads, 0, stream>>>(dst, a, b, chunks, tail_start, 0);
    }
  }
  return cudaGetLastError();
}

}  // namespace detail
}  // namespace cuda
}  // namespace l2c
