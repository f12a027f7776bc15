// CUDA implementations of the l2c operators: the shared argument checks (checks.h), then the
// plain-CUDA launchers (csrc/include/l2c/launchers.h) on torch's current stream of the tensors'
// device. Compiled only in CUDA builds.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
// at::cuda::getCurrentCUDAStream (c10::cuda's, re-exported into at::cuda). Not
// ATen/cuda/CUDAContext.h: it needs the cuBLAS/cuSPARSE/cuSOLVER headers, which a minimal CUDA
// toolkit lacks.
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "l2c/launchers.h"

namespace l2c {
namespace cuda {

// Reported by l2c_kernels._C.cuda_version() (see csrc/module.cpp).
int runtime_version_built() { return CUDART_VERSION; }

namespace {

DType dtype_of(const at::Tensor& t, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, op, ": unsupported dtype ", t.scalar_type(),
              " (expected float32, float16 or bfloat16)");
  return DType::kFloat32;  // not reached
}

void check_on_cuda(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": '", name, "' must be a CUDA tensor, got one on ", t.device());
}

// Launchers return cudaGetLastError() after the launch.
void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

// The current stream of the current device (set by a CUDAGuard on the tensors' device).
cudaStream_t current_stream() { return at::cuda::getCurrentCUDAStream().stream(); }

void gated_residual_cuda(const at::Tensor& x, const at::Tensor& y,
                         const std::optional<at::Tensor>& gate,
                         const std::optional<at::Tensor>& cache) {
  constexpr const char* op = "l2c::gated_residual_";
  check_gated_residual_args(x, y, gate, cache);
  check_on_cuda(x, op, "x");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(l2c::cuda::gated_residual(x.mutable_data_ptr(), y.const_data_ptr(),
                                         gate.has_value() ? gate->const_data_ptr() : nullptr,
                                         cache.has_value() ? cache->mutable_data_ptr() : nullptr,
                                         x.size(0), x.size(1), x.size(2), dtype_of(x, op),
                                         current_stream()),
               op);
}

void cfg_mean_store_cuda(const at::Tensor& x, const at::Tensor& y, const at::Tensor& cache) {
  constexpr const char* op = "l2c::cfg_mean_store_";
  check_cfg_mean_store_args(x, y, cache);
  check_on_cuda(x, op, "x");
  if (cache.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(l2c::cuda::cfg_mean_store(x.mutable_data_ptr(), y.const_data_ptr(),
                                         cache.mutable_data_ptr(), x.size(0), x.size(1),
                                         x.size(2), dtype_of(x, op), current_stream()),
               op);
}

void residual_delta_store_cuda(const at::Tensor& cache, const at::Tensor& out,
                               const at::Tensor& inp) {
  constexpr const char* op = "l2c::residual_delta_store_";
  check_residual_delta_store_args(cache, out, inp);
  check_on_cuda(cache, op, "cache");
  if (cache.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(cache.device());
  check_launch(l2c::cuda::residual_delta_store(cache.mutable_data_ptr(), out.const_data_ptr(),
                                               inp.const_data_ptr(), cache.numel(),
                                               dtype_of(cache, op), current_stream()),
               op);
}

void residual_apply_cuda(const at::Tensor& out, const at::Tensor& inp, const at::Tensor& cache) {
  constexpr const char* op = "l2c::residual_apply_";
  check_residual_apply_args(out, inp, cache);
  check_on_cuda(out, op, "out");
  if (out.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(l2c::cuda::residual_apply(out.mutable_data_ptr(), inp.const_data_ptr(),
                                         cache.const_data_ptr(), out.numel(),
                                         dtype_of(out, op), current_stream()),
               op);
}

void forecast_residual_cuda(const at::Tensor& x, const at::Tensor& y0, const at::Tensor& y1,
                            const std::optional<at::Tensor>& y2,
                            const std::optional<at::Tensor>& gate, double c0, double c1,
                            double c2) {
  constexpr const char* op = "l2c::forecast_residual_";
  check_forecast_residual_args(x, y0, y1, y2, gate, c0, c1, c2);
  check_on_cuda(x, op, "x");
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(l2c::cuda::forecast_residual(
                   x.mutable_data_ptr(), y0.const_data_ptr(), y1.const_data_ptr(),
                   y2.has_value() ? y2->const_data_ptr() : nullptr,
                   gate.has_value() ? gate->const_data_ptr() : nullptr, static_cast<float>(c0),
                   static_cast<float>(c1), static_cast<float>(c2), x.size(0), x.size(1),
                   x.size(2), dtype_of(x, op), current_stream()),
               op);
}

at::Tensor adaln_modulate_cuda(const at::Tensor& x, const at::Tensor& shift,
                               const at::Tensor& scale, double eps) {
  constexpr const char* op = "l2c::adaln_modulate";
  check_adaln_modulate_args(x, shift, scale, eps);
  check_on_cuda(x, op, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() == 0) return out;
  check_launch(l2c::cuda::adaln_modulate(out.mutable_data_ptr(), x.const_data_ptr(),
                                         shift.const_data_ptr(), scale.const_data_ptr(),
                                         x.size(0), x.size(1), x.size(2),
                                         static_cast<float>(eps), dtype_of(x, op),
                                         current_stream()),
               op);
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace l2c

TORCH_LIBRARY_IMPL(l2c, CUDA, m) {
  m.impl("gated_residual_", &l2c::cuda::gated_residual_cuda);
  m.impl("cfg_mean_store_", &l2c::cuda::cfg_mean_store_cuda);
  m.impl("residual_delta_store_", &l2c::cuda::residual_delta_store_cuda);
  m.impl("residual_apply_", &l2c::cuda::residual_apply_cuda);
  m.impl("forecast_residual_", &l2c::cuda::forecast_residual_cuda);
  m.impl("adaln_modulate", &l2c::cuda::adaln_modulate_cuda);
}
