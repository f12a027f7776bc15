// Schemas of the l2c operators. Kernels are registered per backend:
//   CPU  - csrc/cpu/<op>.cpp       (TORCH_LIBRARY_IMPL(l2c, CPU, m))
//   CUDA - csrc/cuda_bindings.cpp  (TORCH_LIBRARY_IMPL(l2c, CUDA, m)), CUDA builds only
// Fake (meta) implementations for torch.compile / FakeTensor are registered from Python by
// l2c_kernels.ops.
//
// Conventions: activations are contiguous [B, N, C], per-sample vectors contiguous [B, C], all
// tensors of one call share dtype and device. Ops ending in '_' write into their (a!)/(b!)
// arguments and return nothing.
#include <torch/library.h>

TORCH_LIBRARY(l2c, m) {
  // x += gate[:, None, :] * y  (x += y when gate is None); cache <- y when given, same pass.
  m.def("gated_residual_(Tensor(a!) x, Tensor y, Tensor? gate, Tensor(b!)? cache) -> ()");
  // x += y; cache <- (y[:B/2] + y[B/2:]) / 2 with cache of shape [B/2, N, C] (B even).
  m.def("cfg_mean_store_(Tensor(a!) x, Tensor y, Tensor(b!) cache) -> ()");
  // cache <- out - inp
  m.def("residual_delta_store_(Tensor(a!) cache, Tensor out, Tensor inp) -> ()");
  // out <- inp + cache
  m.def("residual_apply_(Tensor(a!) out, Tensor inp, Tensor cache) -> ()");
  // x += gate[:, None, :] * (c0 * y0 + c1 * y1 + c2 * y2)  (no gate: x += ...; no y2: no c2 term).
  // Reuses a branch by extrapolating its last stored outputs (forecast schedules).
  m.def(
      "forecast_residual_(Tensor(a!) x, Tensor y0, Tensor y1, Tensor? y2, Tensor? gate, float c0, "
      "float c1, float c2) -> ()");
  // LayerNorm over C without affine (float32 statistics, biased variance, eps inside the sqrt),
  // then * (1 + scale[:, None, :]) + shift[:, None, :]. Returns a new tensor like x.
  m.def("adaln_modulate(Tensor x, Tensor shift, Tensor scale, float eps) -> Tensor");
}
