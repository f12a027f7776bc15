// l2c::adaln_modulate on CUDA:
//   out = LayerNorm(x) * (1 + scale[:, None, :]) + shift[:, None, :]
// LayerNorm over C without affine: float32 mean and biased variance (two passes over the row
// held in registers), rstd = rsqrt(var + eps).
//
// Each row is read from global memory once and written once. A row is handled by a group of
// `threads_per_row` threads (a multiple of 32; several rows per block when that is small), each
// holding ITEMS chunks of VEC elements as raw bits in registers (16-bit dtypes stay packed and
// are converted per pass). Reductions: warp shuffles, then shared memory across the warps of
// the row. Rows too long for registers (C above 8192 chunks) use a looping kernel instead.
#include "common.cuh"

namespace l2c {
namespace cuda {
namespace {

using detail::Load;
using detail::Raw;

// Threads per row the launcher aims for; each thread then holds ITEMS = 1, 2, 4 or 8 chunks.
constexpr int kRowThreadsTarget = 128;
constexpr int kMaxItems = 8;
constexpr int kMaxBlockThreads = 1024;

L2C_DEVICE float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum of v over the threads of this row (threadIdx.y); every thread gets the result, summed in
// the same order. `red` holds one float per warp of the block. Must be reached by all threads
// of the block (it may __syncthreads()).
L2C_DEVICE float row_sum(float v, float* red) {
  v = warp_sum(v);
  const int warps_per_row = blockDim.x >> 5;
  if (warps_per_row == 1) return v;
  const int base = threadIdx.y * warps_per_row;
  if ((threadIdx.x & 31) == 0) red[base + (threadIdx.x >> 5)] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < warps_per_row; ++w) total += red[base + w];
  return total;
}

template <typename T, int VEC, int ITEMS>
__global__ void __launch_bounds__(kMaxBlockThreads)
    adaln_modulate_kernel(T* __restrict__ out, const T* __restrict__ x,
                          const T* __restrict__ shift, const T* __restrict__ scale, int64_t rows,
                          int64_t N, int C, float inv_c, float eps) {
  // Two buffers, alternated between the two reductions of a row: with that, one
  // __syncthreads() per reduction is enough, also across loop iterations.
  __shared__ float red[2][kMaxBlockThreads / 32];
  const int chunks = C / VEC;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row0 = static_cast<int64_t>(blockIdx.x) * blockDim.y; row0 < rows;
       row0 += row_step) {  // block-uniform: every thread reaches the reductions
    const int64_t row = row0 + threadIdx.y;
    const bool active = row < rows;
    const T* xr = x + row * C;

    Raw<T, VEC> raw[ITEMS];
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int cv = threadIdx.x + it * blockDim.x;
      if (active && cv < chunks) raw[it] = detail::load_raw<T, VEC>(xr + cv * VEC);
    }

    float sum = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int cv = threadIdx.x + it * blockDim.x;
      if (active && cv < chunks) {
        float v[VEC];
        detail::unpack<T, VEC>(raw[it], v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) sum += v[k];
      }
    }
    const float mean = row_sum(sum, red[0]) * inv_c;

    float sq = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int cv = threadIdx.x + it * blockDim.x;
      if (active && cv < chunks) {
        float v[VEC];
        detail::unpack<T, VEC>(raw[it], v);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float d = v[k] - mean;
          sq += d * d;
        }
      }
    }
    const float rstd = rsqrtf(row_sum(sq, red[1]) * inv_c + eps);

    if (active) {
      const int64_t sample = row / N;
      const T* sh = shift + sample * C;
      const T* sc = scale + sample * C;
      T* outr = out + row * C;
#pragma unroll
      for (int it = 0; it < ITEMS; ++it) {
        const int cv = threadIdx.x + it * blockDim.x;
        if (cv < chunks) {
          float v[VEC], s[VEC], h[VEC];
          detail::unpack<T, VEC>(raw[it], v);
          detail::load_chunk<T, VEC, Load::kReadOnly>(sc + cv * VEC, s);
          detail::load_chunk<T, VEC, Load::kReadOnly>(sh + cv * VEC, h);
#pragma unroll
          for (int k = 0; k < VEC; ++k) v[k] = (v[k] - mean) * rstd * (1.f + s[k]) + h[k];
          detail::store_chunk<T, VEC>(outr + cv * VEC, v);
        }
      }
    }
  }
}

// Rows of any length: one row per block, three passes over the row in global memory (the
// second and third mostly hit L1/L2).
template <typename T>
__global__ void __launch_bounds__(kMaxBlockThreads)
    adaln_modulate_loop_kernel(T* __restrict__ out, const T* __restrict__ x,
                               const T* __restrict__ shift, const T* __restrict__ scale,
                               int64_t rows, int64_t N, int64_t C, float inv_c, float eps) {
  __shared__ float red[2][kMaxBlockThreads / 32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const T* xr = x + row * C;
    float sum = 0.f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) sum += detail::to_float(xr[c]);
    const float mean = row_sum(sum, red[0]) * inv_c;
    float sq = 0.f;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float d = detail::to_float(xr[c]) - mean;
      sq += d * d;
    }
    const float rstd = rsqrtf(row_sum(sq, red[1]) * inv_c + eps);
    const int64_t sample = row / N;
    const T* sh = shift + sample * C;
    const T* sc = scale + sample * C;
    T* outr = out + row * C;
    for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
      const float v = (detail::to_float(xr[c]) - mean) * rstd *
                          (1.f + detail::to_float(sc[c])) + detail::to_float(sh[c]);
      outr[c] = detail::from_float<T>(v);
    }
  }
}

template <typename T, int VEC, int ITEMS>
cudaError_t launch_rows(T* out, const T* x, const T* shift, const T* scale, int64_t rows,
                        int64_t N, int64_t C, float eps, int threads_per_row,
                        cudaStream_t stream) {
  const int rows_per_block = threads_per_row < kRowThreadsTarget ? kRowThreadsTarget / threads_per_row : 1;
  const dim3 block(threads_per_row, rows_per_block);
  unsigned blocks = 0;
  const cudaError_t err =
      detail::grid_size(rows, rows_per_block, threads_per_row * rows_per_block, &blocks);
  if (err != cudaSuccess) return err;
  adaln_modulate_kernel<T, VEC, ITEMS><<<blocks, block, 0, stream>>>(
      out, x, shift, scale, rows, N, static_cast<int>(C), 1.f / static_cast<float>(C), eps);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_vec(T* out, const T* x, const T* shift, const T* scale, int64_t rows,
                       int64_t N, int64_t C, float eps, cudaStream_t stream) {
  const int64_t chunks = C / VEC;
  int items = 1;
  while (items < kMaxItems && (chunks + items - 1) / items > kRowThreadsTarget) items *= 2;
  const int64_t threads = (chunks + items - 1) / items;
  if (threads > kMaxBlockThreads) {
    constexpr int kLoopThreads = 512;
    unsigned blocks = 0;
    const cudaError_t err = detail::grid_size(rows, 1, kLoopThreads, &blocks);
    if (err != cudaSuccess) return err;
    adaln_modulate_loop_kernel<T><<<blocks, kLoopThreads, 0, stream>>>(
        out, x, shift, scale, rows, N, C, 1.f / static_cast<float>(C), eps);
    return cudaGetLastError();
  }
  const int threads_per_row = static_cast<int>((threads + 31) / 32 * 32);
  switch (items) {
    case 1:
      return launch_rows<T, VEC, 1>(out, x, shift, scale, rows, N, C, eps, threads_per_row, stream);
    case 2:
      return launch_rows<T, VEC, 2>(out, x, shift, scale, rows, N, C, eps, threads_per_row, stream);
    case 4:
      return launch_rows<T, VEC, 4>(out, x, shift, scale, rows, N, C, eps, threads_per_row, stream);
    default:
      return launch_rows<T, VEC, 8>(out, x, shift, scale, rows, N, C, eps, threads_per_row, stream);
  }
}

}  // namespace

cudaError_t adaln_modulate(void* out, const void* x, const void* shift, const void* scale,
                           int64_t B, int64_t N, int64_t C, float eps, DType dtype,
                           cudaStream_t stream) {
  const int64_t rows = B * N;
  if (rows <= 0 || C <= 0) return cudaSuccess;
  return detail::dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int P = detail::kPack<T>;
    T* op = static_cast<T*>(out);
    const T* xp = static_cast<const T*>(x);
    const T* shp = static_cast<const T*>(shift);
    const T* scp = static_cast<const T*>(scale);
    const bool vec = detail::aligned16(op) && detail::aligned16(xp) && detail::aligned16(shp) &&
                     detail::aligned16(scp) && C % P == 0;
    return vec ? launch_vec<T, P>(op, xp, shp, scp, rows, N, C, eps, stream)
               : launch_vec<T, 1>(op, xp, shp, scp, rows, N, C, eps, stream);
  });
}

}  // namespace cuda
}  // namespace l2c
