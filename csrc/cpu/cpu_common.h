// Shared helpers for the CPU kernels.
//
// Vectorisation. The row loops are plain C++ over float arithmetic, written so the compiler
// vectorises them (unit-stride, `__restrict__`, no loop-carried dependences; reductions keep
// kLanes independent partial sums). Every kernel body is compiled twice:
//   * `default`: the baseline ISA of the build (SSE2 on x86-64, NEON on arm64), so the
//     extension runs on any CPU torch runs on (no -march=native);
//   * `avx2`: the same body under __attribute__((target("avx2,fma,f16c"))), x86-64 + GCC/Clang only.
// The avx2 variant is chosen at run time when torch's own CPU capability
// (at::get_cpu_capability(), i.e. torch.backends.cpu.get_cpu_capability(), which honours
// ATEN_CPU_CAPABILITY=default) is AVX2 or AVX512 and the CPU reports avx2, fma and f16c.
// Only the kernel body is compiled for AVX2: helpers it does not inline stay baseline code,
// so no AVX2 instruction can leak into code that runs on other CPUs.
//
// Numerics. Loads convert to float, all arithmetic is in float, and each output is rounded
// once to the storage dtype. The build disables floating-point contraction
// (-ffp-contract=off), so the default and avx2 variants give bit-identical results, and
// float32 element-wise results match eager PyTorch exactly.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <utility>

#if defined(_MSC_VER) && !defined(__clang__)
#define L2C_INLINE __forceinline
#define L2C_RESTRICT __restrict
#else
#define L2C_INLINE inline __attribute__((always_inline))
#define L2C_RESTRICT __restrict__
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(L2C_CPU_NO_AVX2)
#define L2C_CPU_HAVE_AVX2 1
#define L2C_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#else
#define L2C_CPU_HAVE_AVX2 0
#endif

namespace l2c {
namespace cpu {

// Elements per chunk in reductions: independent partial sums the compiler maps onto SIMD
// registers (2 x 8 floats with AVX2, 4 x 4 with SSE2/NEON).
constexpr int64_t kLanes = 16;

// Work per at::parallel_for task, in elements (matches at::internal::GRAIN_SIZE).
constexpr int64_t kGrainElements = 32768;

inline int64_t grain_rows(int64_t row_elements) {
  return row_elements >= kGrainElements ? 1 : kGrainElements / (row_elements > 0 ? row_elements : 1);
}

// ---- float <-> storage conversions -------------------------------------------------------

template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static L2C_INLINE float load(float v) { return v; }
  static L2C_INLINE float store(float v) { return v; }
};

template <>
struct Convert<c10::BFloat16> {
  static L2C_INLINE float load(c10::BFloat16 v) {
    const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof(f));
    return f;
  }
  // Round to nearest even; NaN becomes the canonical quiet NaN (as c10::BFloat16 does).
  // Branch-free so that the store loops vectorise.
  static L2C_INLINE c10::BFloat16 store(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint16_t bits = (f != f) ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
    return c10::BFloat16(bits, c10::BFloat16::from_bits());
  }
};

template <>
struct Convert<c10::Half> {
  static L2C_INLINE float load(c10::Half v) { return static_cast<float>(v); }
  static L2C_INLINE c10::Half store(float f) { return c10::Half(f); }
};

template <typename T>
L2C_INLINE float load(const T* p, int64_t i) {
  return Convert<T>::load(p[i]);
}

template <typename T>
L2C_INLINE void store(T* p, int64_t i, float v) {
  p[i] = Convert<T>::store(v);
}

// ---- element-wise binary kernel ------------------------------------------------------------

// Which inputs the destination is (an in-place call): none, `a`, `b` or both.
enum class Alias { kNone, kA, kB, kAB };

// dst[i] = Op(a[i], b[i]) for i in [begin, end). When the destination is one of the inputs, that
// input is read through `dst` (its own pointer is unused and may be null), so every pointer
// stays restrict-valid.
template <typename T, typename Op, Alias kAlias>
struct BinaryFlat {
  static L2C_INLINE void run(T* L2C_RESTRICT dst, const T* L2C_RESTRICT a,
                             const T* L2C_RESTRICT b, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      constexpr bool kDstIsA = kAlias == Alias::kA || kAlias == Alias::kAB;
      constexpr bool kDstIsB = kAlias == Alias::kB || kAlias == Alias::kAB;
      const float va = Convert<T>::load(kDstIsA ? dst[i] : a[i]);
      const float vb = Convert<T>::load(kDstIsB ? dst[i] : b[i]);
      dst[i] = Convert<T>::store(Op::apply(va, vb));
    }
  }
};

// Calls f(T{}) with T the C++ type of `dtype` (float, c10::BFloat16 or c10::Half).
template <typename F>
inline void dispatch_dtype(c10::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case c10::ScalarType::Float:
      f(float{});
      break;
    case c10::ScalarType::BFloat16:
      f(c10::BFloat16{});
      break;
    case c10::ScalarType::Half:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, op, ": unsupported dtype ", dtype,
                  " (expected float32, float16 or bfloat16)");
  }
}

// ---- ISA variants --------------------------------------------------------------------------

// Kernel::run(args...) must be declared L2C_INLINE so that each variant below compiles its
// own copy of the body for its ISA.
template <typename Kernel, typename... Args>
void run_default(Args... args) {
  Kernel::run(args...);
}

#if L2C_CPU_HAVE_AVX2
template <typename Kernel, typename... Args>
L2C_TARGET_AVX2 void run_avx2(Args... args) {
  Kernel::run(args...);
}
#endif

// True when the avx2 variants run (decided once per process; see the top of this file).
bool use_avx2();

// Runs the variant chosen by use_avx2().
template <typename Kernel, typename... Args>
inline void run(Args... args) {
#if L2C_CPU_HAVE_AVX2
  if (use_avx2()) {
    run_avx2<Kernel>(args...);
    return;
  }
#endif
  run_default<Kernel>(args...);
}

}  // namespace cpu
}  // namespace l2c
