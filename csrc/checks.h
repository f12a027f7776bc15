// Argument checks shared by the CPU and CUDA implementations of the l2c ops.
//
// The Python layer (l2c_kernels.ops) validates and makes tensors contiguous
// before calling the ops; these checks catch direct calls through torch.ops.l2c
// with a message that names the op and the offending argument.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>

namespace l2c {

// True for the dtypes every backend implements (float32, float16, bfloat16).
inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// Activation: a contiguous [B, N, C] tensor of a supported dtype.
inline void check_activation(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": '", name, "' is an undefined tensor");
  TORCH_CHECK(t.dim() == 3, op, ": '", name, "' must be a 3-D [B, N, C] tensor, got shape ",
              t.sizes());
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": '", name,
              "' must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": '", name,
              "' must be contiguous (call .contiguous() first); got strides ", t.strides(),
              " for shape ", t.sizes());
}

// `t` must match `ref` (named `ref_name`) in shape, dtype and device, and be contiguous.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& ref,
                       const char* ref_name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": '", name, "' is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device(), op, ": '", name, "' is on ", t.device(), " but '",
              ref_name, "' is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": '", name, "' has dtype ",
              t.scalar_type(), " but '", ref_name, "' has dtype ", ref.scalar_type(),
              " (all tensor arguments must share one dtype)");
  TORCH_CHECK(t.sizes() == ref.sizes(), op, ": '", name, "' has shape ", t.sizes(), " but '",
              ref_name, "' has shape ", ref.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": '", name,
              "' must be contiguous (call .contiguous() first); got strides ", t.strides(),
              " for shape ", t.sizes());
}

// Per-sample vector: a contiguous [B, C] tensor with the dtype and device of `ref`
// (a [B, N, C] activation named `ref_name`).
inline void check_per_sample(const at::Tensor& t, const char* name, const at::Tensor& ref,
                             const char* ref_name, const char* op) {
  TORCH_CHECK(t.defined(), op, ": '", name, "' is an undefined tensor");
  TORCH_CHECK(t.device() == ref.device(), op, ": '", name, "' is on ", t.device(), " but '",
              ref_name, "' is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": '", name, "' has dtype ",
              t.scalar_type(), " but '", ref_name, "' has dtype ", ref.scalar_type(),
              " (all tensor arguments must share one dtype)");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == ref.size(0) && t.size(1) == ref.size(2), op, ": '",
              name, "' must have shape [B, C] = [", ref.size(0), ", ", ref.size(2), "] to match '",
              ref_name, "' of shape ", ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": '", name,
              "' must be contiguous (call .contiguous() first); got strides ", t.strides(),
              " for shape ", t.sizes());
}

namespace detail {
inline bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto* a0 = static_cast<const char*>(a.const_data_ptr());
  const auto* a1 = a0 + a.numel() * a.element_size();
  const auto* b0 = static_cast<const char*>(b.const_data_ptr());
  const auto* b1 = b0 + b.numel() * b.element_size();
  return a0 < b1 && b0 < a1;
}
inline bool same_memory(const at::Tensor& a, const at::Tensor& b) {
  return a.const_data_ptr() == b.const_data_ptr() &&
         a.numel() * a.element_size() == b.numel() * b.element_size();
}
}  // namespace detail

// `out` is written while `other` is read: they must be disjoint.
inline void check_disjoint(const at::Tensor& out, const char* out_name, const at::Tensor& other,
                           const char* other_name, const char* op) {
  TORCH_CHECK(!detail::overlaps(out, other), op, ": '", out_name,
              "' must not share memory with '", other_name, "'");
}

// `out` is written element by element from `other`: the same memory (an in-place update)
// is fine, a partial overlap is not.
inline void check_disjoint_or_same(const at::Tensor& out, const char* out_name,
                                   const at::Tensor& other, const char* other_name,
                                   const char* op) {
  TORCH_CHECK(!detail::overlaps(out, other) || detail::same_memory(out, other), op, ": '",
              out_name, "' partially overlaps '", other_name,
              "'; they must be disjoint or the very same tensor");
}

// ---------------------------------------------------------------------------------------------
// Per-op validation, identical on every backend.

inline void check_gated_residual_args(const at::Tensor& x, const at::Tensor& y,
                                      const std::optional<at::Tensor>& gate,
                                      const std::optional<at::Tensor>& cache) {
  constexpr const char* op = "l2c::gated_residual_";
  check_activation(x, op, "x");
  check_like(y, "y", x, "x", op);
  check_disjoint(x, "x", y, "y", op);
  if (gate.has_value()) {
    check_per_sample(*gate, "gate", x, "x", op);
    check_disjoint(x, "x", *gate, "gate", op);
  }
  if (cache.has_value()) {
    check_like(*cache, "cache", x, "x", op);
    check_disjoint(*cache, "cache", x, "x", op);
    check_disjoint(*cache, "cache", y, "y", op);
    if (gate.has_value()) check_disjoint(*cache, "cache", *gate, "gate", op);
  }
}

inline void check_cfg_mean_store_args(const at::Tensor& x, const at::Tensor& y,
                                      const at::Tensor& cache) {
  constexpr const char* op = "l2c::cfg_mean_store_";
  check_activation(x, op, "x");
  check_like(y, "y", x, "x", op);
  TORCH_CHECK(x.size(0) % 2 == 0, op,
              ": the batch of 'x' must be even (conditional and unconditional halves), got shape ",
              x.sizes());
  TORCH_CHECK(cache.defined(), op, ": 'cache' is an undefined tensor");
  TORCH_CHECK(cache.device() == x.device(), op, ": 'cache' is on ", cache.device(),
              " but 'x' is on ", x.device());
  TORCH_CHECK(cache.scalar_type() == x.scalar_type(), op, ": 'cache' has dtype ",
              cache.scalar_type(), " but 'x' has dtype ", x.scalar_type(),
              " (all tensor arguments must share one dtype)");
  TORCH_CHECK(cache.dim() == 3 && cache.size(0) == x.size(0) / 2 && cache.size(1) == x.size(1) &&
                  cache.size(2) == x.size(2),
              op, ": 'cache' must have shape [B/2, N, C] = [", x.size(0) / 2, ", ", x.size(1), ", ",
              x.size(2), "], got ", cache.sizes());
  TORCH_CHECK(cache.is_contiguous(), op,
              ": 'cache' must be contiguous (call .contiguous() first); got strides ",
              cache.strides(), " for shape ", cache.sizes());
  check_disjoint(x, "x", y, "y", op);
  check_disjoint(cache, "cache", x, "x", op);
  check_disjoint(cache, "cache", y, "y", op);
}

// The residual ops are plain elementwise: any shape, as long as all three match.
inline void check_residual_args(const at::Tensor& dst, const char* dst_name, const at::Tensor& a,
                                const char* a_name, const at::Tensor& b, const char* b_name,
                                const char* op) {
  TORCH_CHECK(dst.defined(), op, ": '", dst_name, "' is an undefined tensor");
  TORCH_CHECK(is_supported_dtype(dst.scalar_type()), op, ": '", dst_name,
              "' must be float32, float16 or bfloat16, got ", dst.scalar_type());
  TORCH_CHECK(dst.is_contiguous(), op, ": '", dst_name,
              "' must be contiguous (call .contiguous() first); got strides ", dst.strides(),
              " for shape ", dst.sizes());
  check_like(a, a_name, dst, dst_name, op);
  check_like(b, b_name, dst, dst_name, op);
  check_disjoint_or_same(dst, dst_name, a, a_name, op);
  check_disjoint_or_same(dst, dst_name, b, b_name, op);
}

inline void check_residual_delta_store_args(const at::Tensor& cache, const at::Tensor& out,
                                            const at::Tensor& inp) {
  check_residual_args(cache, "cache", out, "out", inp, "inp", "l2c::residual_delta_store_");
}

inline void check_residual_apply_args(const at::Tensor& out, const at::Tensor& inp,
                                      const at::Tensor& cache) {
  check_residual_args(out, "out", inp, "inp", cache, "cache", "l2c::residual_apply_");
}

inline void check_forecast_residual_args(const at::Tensor& x, const at::Tensor& y0,
                                         const at::Tensor& y1,
                                         const std::optional<at::Tensor>& y2,
                                         const std::optional<at::Tensor>& gate, double c0,
                                         double c1, double c2) {
  constexpr const char* op = "l2c::forecast_residual_";
  TORCH_CHECK(std::isfinite(c0), op, ": 'c0' must be a finite float, got ", c0);
  TORCH_CHECK(std::isfinite(c1), op, ": 'c1' must be a finite float, got ", c1);
  TORCH_CHECK(std::isfinite(c2), op, ": 'c2' must be a finite float, got ", c2);
  check_activation(x, op, "x");
  check_like(y0, "y0", x, "x", op);
  check_disjoint(x, "x", y0, "y0", op);
  check_like(y1, "y1", x, "x", op);
  check_disjoint(x, "x", y1, "y1", op);
  if (y2.has_value()) {
    check_like(*y2, "y2", x, "x", op);
    check_disjoint(x, "x", *y2, "y2", op);
  }
  if (gate.has_value()) {
    check_per_sample(*gate, "gate", x, "x", op);
    check_disjoint(x, "x", *gate, "gate", op);
  }
}

inline void check_adaln_modulate_args(const at::Tensor& x, const at::Tensor& shift,
                                      const at::Tensor& scale, double eps) {
  constexpr const char* op = "l2c::adaln_modulate";
  check_activation(x, op, "x");
  check_per_sample(shift, "shift", x, "x", op);
  check_per_sample(scale, "scale", x, "x", op);
  TORCH_CHECK(eps >= 0.0, op, ": 'eps' must be >= 0, got ", eps);
}

}  // namespace l2c
