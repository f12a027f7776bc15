// Device helpers shared by the l2c CUDA kernels: dtype traits, 16-byte packed loads/stores with
// float conversion, fast integer division, launch configuration and dtype dispatch.
//
// Plain CUDA (no torch headers). Compiles with torch's default nvcc flags, which disable the
// implicit __half / __nv_bfloat16 conversions and operators: every conversion here is explicit.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "l2c/launchers.h"

#define L2C_DEVICE __device__ __forceinline__
#define L2C_HOST_DEVICE __host__ __device__ __forceinline__

namespace l2c {
namespace cuda {
namespace detail {

// ---- tuning knobs -------------------------------------------------------------------------

// Threads per block of the element-wise kernels.
constexpr int kElementwiseThreads = 256;
// 16-byte chunks each thread has in flight per loop iteration in the element-wise kernels.
constexpr int kElementwiseUnroll = 2;
// Grid-stride kernels launch at most this many waves of fully occupied SMs.
constexpr int kMaxWaves = 4;
// Resident threads per SM assumed when sizing grids (sm_80 / sm_90: 2048).
constexpr int kThreadsPerSm = 2048;

// ---- dtype traits -------------------------------------------------------------------------

// Elements per 16-byte chunk.
template <typename T>
constexpr int kPack = 16 / static_cast<int>(sizeof(T));

template <typename T>
L2C_DEVICE float to_float(T v);
template <>
L2C_DEVICE float to_float<float>(float v) {
  return v;
}
template <>
L2C_DEVICE float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
L2C_DEVICE float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
L2C_DEVICE T from_float(float v);
template <>
L2C_DEVICE float from_float<float>(float v) {
  return v;
}
template <>
L2C_DEVICE __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
L2C_DEVICE __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// ---- 32-bit words <-> floats (two 16-bit elements or one float per word) -----------------

template <typename T>
struct Word;

template <>
struct Word<float> {
  static constexpr int kElems = 1;
  static L2C_DEVICE void unpack(uint32_t w, float* f) { f[0] = __uint_as_float(w); }
  static L2C_DEVICE uint32_t pack(const float* f) { return __float_as_uint(f[0]); }
};

template <>
struct Word<__nv_bfloat16> {
  static constexpr int kElems = 2;
  static L2C_DEVICE void unpack(uint32_t w, float* f) {
    f[0] = __uint_as_float(w << 16);
    f[1] = __uint_as_float(w & 0xFFFF0000u);
  }
  static L2C_DEVICE uint32_t pack(const float* f) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(f[0], f[1]);  // .x = f[0] (low half)
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};

template <>
struct Word<__half> {
  static constexpr int kElems = 2;
  static L2C_DEVICE void unpack(uint32_t w, float* f) {
    __half2 h;
    memcpy(&h, &w, sizeof(h));
    const float2 v = __half22float2(h);
    f[0] = v.x;
    f[1] = v.y;
  }
  static L2C_DEVICE uint32_t pack(const float* f) {
    const __half2 h = __floats2half2_rn(f[0], f[1]);
    uint32_t w;
    memcpy(&w, &h, sizeof(w));
    return w;
  }
};

// ---- chunk loads and stores ----------------------------------------------------------------
//
// A chunk is VEC consecutive elements: VEC == kPack<T> (one 16-byte access, pointer 16-byte
// aligned) or VEC == 1 (one element). load_raw/store_raw move the bits; unpack/pack convert
// them to/from float.

enum class Load {
  kDefault,   // plain load (data this kernel may also write)
  kReadOnly,  // ld.global.nc: read-only for the whole kernel
  kStream,    // ld.global.cs: read once, evict first
};

enum class Store {
  kDefault,  // plain store
  kStream,   // st.global.cs: not read again soon (caches for a later step)
};

// Raw bits of a chunk: a uint4 for 16 bytes, else one element in the low bits of a uint32_t.
template <typename T, int VEC>
using Raw = std::conditional_t<VEC == 1, uint32_t, uint4>;

template <typename T, int VEC, Load kLoad = Load::kDefault>
L2C_DEVICE Raw<T, VEC> load_raw(const T* p) {
  static_assert(VEC == 1 || VEC == kPack<T>, "a chunk is one element or 16 bytes");
  if constexpr (VEC == 1 && sizeof(T) == 4) {
    const unsigned int* q = reinterpret_cast<const unsigned int*>(p);
    if constexpr (kLoad == Load::kReadOnly) return __ldg(q);
    if constexpr (kLoad == Load::kStream) return __ldcs(q);
    if constexpr (kLoad == Load::kDefault) return *q;
  } else if constexpr (VEC == 1) {
    const unsigned short* q = reinterpret_cast<const unsigned short*>(p);
    if constexpr (kLoad == Load::kReadOnly) return static_cast<uint32_t>(__ldg(q));
    if constexpr (kLoad == Load::kStream) return static_cast<uint32_t>(__ldcs(q));
    if constexpr (kLoad == Load::kDefault) return static_cast<uint32_t>(*q);
  } else {
    const uint4* q = reinterpret_cast<const uint4*>(p);
    if constexpr (kLoad == Load::kReadOnly) return __ldg(q);
    if constexpr (kLoad == Load::kStream) return __ldcs(q);
    if constexpr (kLoad == Load::kDefault) return *q;
  }
}

template <typename T, int VEC, Store kStore = Store::kDefault>
L2C_DEVICE void store_raw(T* p, const Raw<T, VEC>& raw) {
  if constexpr (VEC == 1 && sizeof(T) == 4) {
    unsigned int* q = reinterpret_cast<unsigned int*>(p);
    if constexpr (kStore == Store::kStream) {
      __stcs(q, raw);
    } else {
      *q = raw;
    }
  } else if constexpr (VEC == 1) {
    unsigned short* q = reinterpret_cast<unsigned short*>(p);
    const unsigned short bits = static_cast<unsigned short>(raw);
    if constexpr (kStore == Store::kStream) {
      __stcs(q, bits);
    } else {
      *q = bits;
    }
  } else {
    uint4* q = reinterpret_cast<uint4*>(p);
    if constexpr (kStore == Store::kStream) {
      __stcs(q, raw);
    } else {
      *q = raw;
    }
  }
}

template <typename T, int VEC>
L2C_DEVICE void unpack(const Raw<T, VEC>& raw, float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    float two[2];
    Word<T>::unpack(raw, two);  // the element sits in the low bits
    f[0] = two[0];
  } else {
    constexpr int E = Word<T>::kElems;
    Word<T>::unpack(raw.x, f + 0 * E);
    Word<T>::unpack(raw.y, f + 1 * E);
    Word<T>::unpack(raw.z, f + 2 * E);
    Word<T>::unpack(raw.w, f + 3 * E);
  }
}

template <typename T, int VEC>
L2C_DEVICE Raw<T, VEC> pack(const float (&f)[VEC]) {
  if constexpr (VEC == 1) {
    const T h = from_float<T>(f[0]);
    if constexpr (sizeof(T) == 4) {
      uint32_t bits;
      memcpy(&bits, &h, sizeof(bits));
      return bits;
    } else {
      unsigned short bits;
      memcpy(&bits, &h, sizeof(bits));
      return static_cast<uint32_t>(bits);
    }
  } else {
    constexpr int E = Word<T>::kElems;
    uint4 raw;
    raw.x = Word<T>::pack(f + 0 * E);
    raw.y = Word<T>::pack(f + 1 * E);
    raw.z = Word<T>::pack(f + 2 * E);
    raw.w = Word<T>::pack(f + 3 * E);
    return raw;
  }
}

template <typename T, int VEC, Load kLoad = Load::kDefault>
L2C_DEVICE void load_chunk(const T* p, float (&f)[VEC]) {
  unpack<T, VEC>(load_raw<T, VEC, kLoad>(p), f);
}

template <typename T, int VEC, Store kStore = Store::kDefault>
L2C_DEVICE void store_chunk(T* p, const float (&f)[VEC]) {
  store_raw<T, VEC, kStore>(p, pack<T, VEC>(f));
}

// ---- integer division ------------------------------------------------------------------------

// Division by a fixed divisor d >= 1 with a multiply-high and a shift; exact for n < 2^31.
struct FastDivmod32 {
  uint32_t divisor = 1;
  uint32_t magic = 1;
  uint32_t shift = 0;

  FastDivmod32() = default;
  explicit FastDivmod32(uint32_t d) : divisor(d) {
    shift = 0;
    while (shift < 32 && (uint64_t{1} << shift) < d) ++shift;
    magic = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  L2C_DEVICE uint32_t div(uint32_t n) const { return (__umulhi(n, magic) + n) >> shift; }
  L2C_DEVICE uint32_t mod(uint32_t n) const { return n - div(n) * divisor; }
};

struct Divmod64 {
  int64_t divisor = 1;
  Divmod64() = default;
  explicit Divmod64(int64_t d) : divisor(d) {}
  L2C_DEVICE int64_t div(int64_t n) const { return n / divisor; }
  L2C_DEVICE int64_t mod(int64_t n) const { return n % divisor; }
};

// 32-bit indexing is used when every element index fits (the common case).
inline bool fits_int32(int64_t n) { return n <= INT32_MAX; }

// ---- launch configuration ------------------------------------------------------------------

// Multiprocessor count of the current device, cached per device.
inline cudaError_t sm_count(int* out) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cache[kMaxDevices] = {};
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxDevices) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) {
      *out = cached;
      return cudaSuccess;
    }
  }
  int count = 0;
  err = cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  if (device >= 0 && device < kMaxDevices) cache[device].store(count, std::memory_order_relaxed);
  *out = count;
  return cudaSuccess;
}

// Blocks for a grid-stride kernel over `items` work items, `per_block` items per block and
// iteration: enough to cover the work, at most kMaxWaves waves of fully occupied SMs.
inline cudaError_t grid_size(int64_t items, int64_t per_block, int threads, unsigned* blocks) {
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t needed = (items + per_block - 1) / per_block;
  const int64_t cap = static_cast<int64_t>(sms) * (kThreadsPerSm / threads) * kMaxWaves;
  int64_t n = needed < cap ? needed : cap;
  if (n < 1) n = 1;
  *blocks = static_cast<unsigned>(n);
  return cudaSuccess;
}

// Launches a grid-stride kernel over the chunks of VEC elements of flat [B * N * C] tensors
// that also index per-sample [B, C] vectors: calls
//   launch(blocks, threads, chunks, sample_of, column_of)
// with 32-bit indices and FastDivmod32 divisors (by N * C and by C) when every element index
// fits, 64-bit ones otherwise, then returns cudaGetLastError().
template <int VEC, typename F>
cudaError_t launch_rows(int64_t N, int64_t C, int64_t numel, F&& launch) {
  constexpr int threads = kElementwiseThreads;
  const int64_t chunks = numel / VEC;
  unsigned blocks = 0;
  const cudaError_t err =
      grid_size(chunks, static_cast<int64_t>(threads) * kElementwiseUnroll, threads, &blocks);
  if (err != cudaSuccess) return err;
  if (fits_int32(numel)) {
    launch(blocks, threads, static_cast<uint32_t>(chunks),
           FastDivmod32(static_cast<uint32_t>(N * C)), FastDivmod32(static_cast<uint32_t>(C)));
  } else {
    launch(blocks, threads, chunks, Divmod64(N * C), Divmod64(C));
  }
  return cudaGetLastError();
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Calls f(T{}) with T in {float, __half, __nv_bfloat16}; cudaErrorInvalidValue for other tags.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      return f(float{});
    case DType::kFloat16:
      return f(__half{});
    case DType::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace detail
}  // namespace cuda
}  // namespace l2c
